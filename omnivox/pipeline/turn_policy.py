"""What speech over the agent's answer means: a real interruption, or a false one (a backchannel such as "mm-hm", a
cough, a door, the agent's own echo) that must not cost the caller the rest of the answer.

The answer pauses at the first sign of speech, so a real barge-in still silences the agent within a frame or two.
The speech becomes an interruption, and cancels the answer, once it has lasted `min_interruption_ms` (on a line with
an echo counted from when the agent's audio already on its way has stopped echoing, `counts_from_ms`: the pause,
plus the audio the client still had to play, plus `ECHO_TAIL_MS` for the way back through a room or a line); when it
ends
sooner (the caller silent again for `resume_after_ms`) it was a backchannel or noise, told apart by its length, and
the answer resumes where it paused. Until the interruption is confirmed the client hears nothing of it (no
`speech_started`), so a client that stops its own playback on that event does not drop the answer either.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from omnivox.pipeline.turns import SpeechStarted, TurnDetector

ECHO_TAIL_MS = 250
"""How late the agent's own voice can still come back into the caller's microphone after it stopped playing."""


class Verdict(Enum):
    UNDECIDED = "undecided"
    INTERRUPTION = "interruption"
    """The speech lasted `min_interruption_ms`: cancel the answer; the speech is the caller's next turn."""
    FALSE_INTERRUPTION = "false_interruption"
    """The speech ended sooner: resume the answer and forget the speech."""


@dataclass
class SuspectedInterruption:
    onset: SpeechStarted
    min_interruption_ms: int
    resume_after_ms: int
    counts_from_ms: float = 0.0
    """Speech before this input-audio position may be the agent's own echo: it pauses, but does not interrupt."""

    def judge(self, detector: TurnDetector, stopped: bool) -> Verdict:
        """Called after every VAD frame while the answer is paused; `stopped`: the detector ended the speech."""
        if detector.speaking and detector.speech_ms_since(self.counts_from_ms) >= self.min_interruption_ms:
            return Verdict.INTERRUPTION
        if stopped or not detector.speaking or detector.silence_ms >= self.resume_after_ms:
            return Verdict.FALSE_INTERRUPTION
        return Verdict.UNDECIDED
