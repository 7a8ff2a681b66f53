"""VAD: speech made by espeak-ng is detected, silence and noise are not, and sessions do not share state."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from omnivox.pipeline.audio import synthesize_speech
from omnivox.pipeline.vad import VAD_RATE, BatchedSileroVad, SileroVad, Vad, WebRtcVad, create_vad

LEAD_SILENCE_S = 1.0
TRAIL_SILENCE_S = 1.0


@pytest.fixture(scope="module")
def caller_audio() -> tuple[np.ndarray, float]:
    """One second of silence, a spoken sentence, one second of silence; returns the audio and the speech length."""
    speech = synthesize_speech("Hello there, I would like to book a table for two people tonight.", rate=VAD_RATE)
    silence_before = np.zeros(int(LEAD_SILENCE_S * VAD_RATE), dtype=np.float32)
    silence_after = np.zeros(int(TRAIL_SILENCE_S * VAD_RATE), dtype=np.float32)
    return np.concatenate((silence_before, speech, silence_after)), len(speech) / VAD_RATE


def frames_of(audio: np.ndarray, frame_samples: int) -> list[np.ndarray]:
    return [audio[start : start + frame_samples] for start in range(0, len(audio) - frame_samples + 1, frame_samples)]


def probability_now(vad: Vad, frame: np.ndarray) -> float:
    """The probability of `frame` itself (the batched silero answers a frame late unless waited for)."""
    value = vad.probability(frame)
    if isinstance(vad, BatchedSileroVad):
        assert vad.wait()
        return vad.latest
    return value


def probabilities(vad: Vad, audio: np.ndarray) -> np.ndarray:
    return np.array([probability_now(vad, frame) for frame in frames_of(audio, vad.frame_samples)])


def frame_times(vad: Vad, count: int) -> np.ndarray:
    return np.arange(count) * vad.frame_samples / VAD_RATE


@pytest.mark.parametrize("kind", ["silero", "webrtc"])
def test_speech_is_detected_and_silence_is_not(kind: str, caller_audio: tuple[np.ndarray, float]) -> None:
    audio, speech_s = caller_audio
    vad = create_vad(kind)
    probs = probabilities(vad, audio)
    times = frame_times(vad, len(probs))
    speech_end = LEAD_SILENCE_S + speech_s
    in_speech = (times > LEAD_SILENCE_S + 0.2) & (times < speech_end - 0.3)
    assert np.all((probs >= 0.0) & (probs <= 1.0))
    assert np.max(probs[times < LEAD_SILENCE_S - 0.1]) < 0.5
    assert np.max(probs[times > speech_end + 0.5]) < 0.5
    # Speech has short pauses between words; most of it must read as speech.
    assert np.mean(probs[in_speech] > 0.5) > 0.8


@pytest.mark.parametrize("kind", ["silero", "webrtc"])
def test_background_noise_is_not_speech(kind: str) -> None:
    noise = (0.03 * np.random.default_rng(7).standard_normal(2 * VAD_RATE)).astype(np.float32)
    assert np.mean(probabilities(create_vad(kind), noise) > 0.5) < 0.1


def test_silero_ignores_mains_hum() -> None:
    """Loud 50 Hz hum is where silero earns its cost: the energy-based WebRTC detector calls it speech."""
    hum = (0.3 * np.sin(2 * np.pi * 50 * np.arange(2 * VAD_RATE) / VAD_RATE)).astype(np.float32)
    assert np.mean(probabilities(SileroVad(), hum) > 0.5) < 0.1


@pytest.mark.parametrize("kind", ["silero", "webrtc"])
def test_interleaved_sessions_keep_independent_state(kind: str, caller_audio: tuple[np.ndarray, float]) -> None:
    speech_stream, _ = caller_audio
    silence_stream = np.zeros_like(speech_stream)
    alone_speech = probabilities(create_vad(kind), speech_stream)
    alone_silence = probabilities(create_vad(kind), silence_stream)

    first, second = create_vad(kind), create_vad(kind)
    interleaved_speech, interleaved_silence = [], []
    for speech_frame, silence_frame in zip(
        frames_of(speech_stream, first.frame_samples), frames_of(silence_stream, second.frame_samples), strict=True
    ):
        interleaved_speech.append(probability_now(first, speech_frame))
        interleaved_silence.append(probability_now(second, silence_frame))

    assert np.allclose(interleaved_speech, alone_speech, atol=1e-6)
    assert np.allclose(interleaved_silence, alone_silence, atol=1e-6)


def test_silero_reset_forgets_the_stream(caller_audio: tuple[np.ndarray, float]) -> None:
    audio, _ = caller_audio
    vad = SileroVad()
    fresh = probabilities(vad, audio[:VAD_RATE])
    probabilities(vad, audio[VAD_RATE : 2 * VAD_RATE])
    vad.reset()
    assert np.allclose(probabilities(vad, audio[:VAD_RATE]), fresh, atol=1e-6)


def test_silero_instances_share_one_model() -> None:
    assert SileroVad()._session is SileroVad()._session


@pytest.mark.parametrize(("vad", "wrong_size"), [(SileroVad, 480), (WebRtcVad, 512)])
def test_wrong_frame_size_is_rejected(vad: type, wrong_size: int) -> None:
    with pytest.raises(ValueError, match="exactly"):
        vad().probability(np.zeros(wrong_size, dtype=np.float32))


def test_frame_sizes() -> None:
    assert SileroVad.frame_samples == 512
    assert WebRtcVad.frame_samples == 480


def test_webrtc_aggressiveness_is_validated() -> None:
    with pytest.raises(ValueError, match="aggressiveness"):
        WebRtcVad(4)


def test_create_vad_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="'cobra'"):
        create_vad("cobra")


def test_batched_silero_matches_silero_frame_by_frame_across_many_sessions(
    caller_audio: tuple[np.ndarray, float],
) -> None:
    """Eight sessions submit frames together (one batch each round) and get what one silero per session gives."""
    audio, _ = caller_audio
    frames = frames_of(audio, SileroVad.frame_samples)
    reference = probabilities(SileroVad(), audio)
    sessions = [BatchedSileroVad() for _ in range(8)]
    results: list[list[float]] = [[] for _ in sessions]
    for frame in frames:
        for vad in sessions:
            vad.probability(frame)
        for vad, collected in zip(sessions, results, strict=True):
            assert vad.wait()
            collected.append(vad.latest)
    for collected in results:
        assert np.allclose(collected, reference, atol=1e-4)


def test_batched_silero_returns_each_result_once_one_frame_late_even_in_a_burst(
    caller_audio: tuple[np.ndarray, float],
) -> None:
    """A client may send audio faster than real time: every frame's result still reaches the turn detector."""
    audio, _ = caller_audio
    reference = probabilities(SileroVad(), audio)
    vad = BatchedSileroVad()
    returned = [vad.probability(frame) for frame in frames_of(audio, vad.frame_samples)]
    assert returned[0] == 0.0
    assert np.allclose(returned[1:], reference[:-1], atol=1e-4)


async def test_batched_silero_settle_waits_for_results_while_the_event_loop_runs(
    caller_audio: tuple[np.ndarray, float],
) -> None:
    """An asyncio shell awaits `settle()` rather than blocking in `probability`: other tasks run meanwhile, and each
    session still gets every frame's result once, one frame late."""
    audio, _ = caller_audio
    frames = frames_of(audio, SileroVad.frame_samples)[:40]
    reference = probabilities(SileroVad(), audio)[: len(frames)]
    sessions = [BatchedSileroVad() for _ in range(4)]
    returned: list[list[float]] = [[] for _ in sessions]
    other_turns = 0

    async def other_work() -> None:
        nonlocal other_turns
        while True:
            other_turns += 1
            await asyncio.sleep(0)

    other = asyncio.create_task(other_work())
    for frame in frames:
        for vad, collected in zip(sessions, returned, strict=True):
            await vad.settle()
            assert not vad.pending
            collected.append(vad.probability(frame))
    other.cancel()
    assert other_turns > 0
    for collected in returned:
        assert collected[0] == 0.0
        assert np.allclose(collected[1:], reference[:-1], atol=1e-4)
