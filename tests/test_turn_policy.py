"""Turn taking in the session core, under a fake clock: semantic_vad's end-of-turn check, false interruptions that
pause and resume the answer, and the caller-audio cleaner's place in the stream."""

from __future__ import annotations

import numpy as np
import pytest

from omnivox.pipeline.echo_cancel import CleanupSettings
from omnivox.pipeline.engines.base import AudioDelta, TextDelta
from omnivox.pipeline.events import AudioIn, ClientEvent, EngineDone, EngineOutput, PlayoutProgress
from omnivox.pipeline.pacer import FramePacer
from omnivox.pipeline.session import Session, SessionOptions
from omnivox.pipeline.turns import END_OF_TURN_CHECK_MS, PREDICT_AFTER_MS, SEMANTIC_EAGERNESS
from tests.core_helpers import CoreDriver, EnergyVad, silence, tone


def first_turn(driver: CoreDriver, speech_s: float = 0.8) -> None:
    driver.stream_audio(np.concatenate([silence(0.4), tone(speech_s)]))


# ---------------------------------------------------------------- semantic_vad


def test_semantic_vad_asks_the_model_early_and_ends_a_complete_turn_at_the_check() -> None:
    driver = CoreDriver.create({"type": "semantic_vad"})
    first_turn(driver)
    driver.stream_audio(silence(PREDICT_AFTER_MS / 1000 + 0.02))
    assert len(driver.predictions) == 1
    prediction = driver.predictions[0]
    # the model sees the turn up to where the silence began (its trailing silence is synthesised)
    assert prediction.audio.size == pytest.approx((0.3 + 0.8) * 16_000, abs=0.04 * 16_000)
    driver.predicted(0.9)
    assert "input_audio_buffer.speech_stopped" not in driver.types(), "answered before the silence was long enough"
    driver.stream_audio(silence((END_OF_TURN_CHECK_MS - PREDICT_AFTER_MS) / 1000))
    assert "input_audio_buffer.speech_stopped" in driver.types()
    assert driver.of_type("response.created")
    stopped = driver.of_type("input_audio_buffer.speech_stopped")[0].payload
    assert stopped["audio_end_ms"] == pytest.approx(1200, abs=40)


def test_semantic_vad_waits_through_a_mid_sentence_pause_the_model_calls_incomplete() -> None:
    driver = CoreDriver.create({"type": "semantic_vad"})
    first_turn(driver)
    driver.stream_audio(silence(0.1))
    driver.predicted(0.1)
    driver.stream_audio(silence(0.8))  # a 900 ms pause in all
    assert "input_audio_buffer.speech_stopped" not in driver.types()
    driver.stream_audio(tone(0.5))  # the caller goes on
    driver.stream_audio(silence(0.1))
    assert len(driver.predictions) == 2
    driver.predicted(0.2)
    longest = SEMANTIC_EAGERNESS["auto"].max_silence_ms / 1000
    driver.stream_audio(silence(longest - 0.2))
    assert "input_audio_buffer.speech_stopped" not in driver.types()
    driver.stream_audio(silence(0.2))
    assert driver.types().count("input_audio_buffer.speech_stopped") == 1
    assert driver.types().count("input_audio_buffer.speech_started") == 1


def test_a_late_answer_for_an_earlier_pause_is_ignored() -> None:
    driver = CoreDriver.create({"type": "semantic_vad"})
    first_turn(driver)
    driver.stream_audio(silence(0.1))
    stale = driver.predictions[-1].check_id
    driver.stream_audio(tone(0.4))
    driver.predicted(0.99, check_id=stale)
    driver.stream_audio(silence(0.04))
    assert "input_audio_buffer.speech_stopped" not in driver.types()


def test_a_model_failure_falls_back_to_the_longest_silence() -> None:
    driver = CoreDriver.create({"type": "semantic_vad", "eagerness": "high"})
    first_turn(driver)
    driver.stream_audio(silence(0.1))
    driver.predicted(None)
    driver.stream_audio(silence(0.5))
    assert "input_audio_buffer.speech_stopped" not in driver.types()
    driver.stream_audio(silence(SEMANTIC_EAGERNESS["high"].max_silence_ms / 1000 - 0.5))
    assert "input_audio_buffer.speech_stopped" in driver.types()


def test_eagerness_sets_threshold_and_longest_silence() -> None:
    driver = CoreDriver.create({"type": "semantic_vad", "eagerness": "low"})
    first_turn(driver)
    driver.stream_audio(silence(0.2))
    driver.predicted(SEMANTIC_EAGERNESS["low"].threshold - 0.01)
    driver.stream_audio(silence(0.2))
    assert "input_audio_buffer.speech_stopped" not in driver.types()
    shown = driver.session.config["audio"]["input"]["turn_detection"]
    assert shown["type"] == "semantic_vad" and shown["eagerness"] == "low"


# ---------------------------------------------------------------- speech over an answer


def answering(driver: CoreDriver, seconds: float = 4.0) -> str:
    first_turn(driver)
    driver.stream_audio(silence(0.7))
    response_id = driver.started[-1].response_id
    driver.engine(TextDelta("a long answer"))
    driver.engine(AudioDelta(tone(seconds, 24_000, 0.2)))
    driver.engine_done()
    driver.stream_audio(silence(1.0))
    return response_id


def cancelled(driver: CoreDriver, response_id: str) -> bool:
    done = [e.payload["response"] for e in driver.of_type("response.done")]
    return any(r["id"] == response_id and r["status"] == "cancelled" for r in done)


def sent_ms(driver: CoreDriver, response_id: str) -> float:
    return sum(a.pcm.size for a in driver.audio if a.response_id == response_id) / 24


def test_a_backchannel_pauses_the_answer_then_it_resumes_whole() -> None:
    driver = CoreDriver.create()
    response_id = answering(driver)
    onset = driver.now
    driver.stream_audio(tone(0.5))  # "uh huh": shorter than min_interruption_ms
    paused_at = max(t for a, t in zip(driver.audio, driver.audio_times, strict=True) if a.response_id == response_id)
    assert paused_at - onset <= 0.25, "the agent kept talking over the caller"
    before = sent_ms(driver, response_id)
    driver.stream_audio(silence(0.2))
    assert sent_ms(driver, response_id) == before, "resumed before the caller was silent again"
    driver.stream_audio(silence(0.2))
    assert not cancelled(driver, response_id)
    assert "input_audio_buffer.speech_started" not in driver.types()[2:], "the client was told of a false turn"
    driver.advance(5.0)
    done = driver.of_type("response.done")[-1].payload["response"]
    assert done["status"] == "completed"
    assert sent_ms(driver, response_id) == pytest.approx(4000, abs=1)
    assert driver.session.false_interruptions == 1
    # the backchannel never became a user turn
    assert [item.role for item in driver.session.conversation.items] == ["user", "assistant"]


def test_speech_that_lasts_min_interruption_ms_cancels_and_becomes_the_next_turn() -> None:
    driver = CoreDriver.create()
    response_id = answering(driver)
    driver.stream_audio(tone(0.65))
    assert not cancelled(driver, response_id)
    driver.stream_audio(tone(0.15))
    assert cancelled(driver, response_id)
    started = driver.of_type("input_audio_buffer.speech_started")[-1].payload
    assert started["audio_start_ms"] == pytest.approx(driver.now * 1000 - 800 - 300, abs=40)
    driver.stream_audio(silence(0.7))
    assert [item.role for item in driver.session.conversation.items][:3] == ["user", "assistant", "user"]


def test_min_interruption_ms_zero_cancels_at_once() -> None:
    driver = CoreDriver.create({"type": "server_vad", "min_interruption_ms": 0})
    response_id = answering(driver)
    driver.stream_audio(tone(0.12))
    assert cancelled(driver, response_id)


def test_a_door_that_owns_playout_resumes_from_what_was_played() -> None:
    driver = CoreDriver.create(server_playout=True, output_rate=24_000, lead_ms=100, frame_ms=20)
    response_id = answering(driver)
    item_id = driver.audio[-1].item_id
    played_ms = sent_ms(driver, response_id) - 100  # the door's queue still holds 100 ms
    driver.record(driver.session.handle(PlayoutProgress(item_id, played_ms), driver.now))
    driver.stream_audio(tone(0.3))
    assert driver.cleared == 1, "the door must drop what it queued"
    unheard_ms = sent_ms(driver, response_id) - played_ms
    driver.stream_audio(silence(0.4))
    driver.advance(5.0)
    assert driver.of_type("response.done")[-1].payload["response"]["status"] == "completed"
    frames = [a.pcm for a in driver.audio if a.response_id == response_id]
    total = np.concatenate(frames)
    answer = tone(4.0, 24_000, 0.2)
    resend = total.size - answer.size
    assert resend == pytest.approx(unheard_ms * 24, abs=1), "the unplayed audio is sent again, nothing more"
    played = int(played_ms * 24)
    resumed = total[played + resend :]
    assert np.allclose(resumed, answer[played:], atol=1e-3), "it resumes at the played position"


def test_pacer_pause_rewinds_and_resume_continues_in_order() -> None:
    pacer = FramePacer(1000, frame_ms=10, lead_ms=0)
    pacer.push(np.arange(100, dtype=np.float32))
    pacer.finish()
    first = [frame for step in range(4) for frame in pacer.pop_due(step * 0.01)]
    assert np.concatenate(first).tolist() == list(range(40))
    pacer.pause(rewind_samples=15)
    assert pacer.pop_due(1.0) == [] and not pacer.drained
    pacer.resume()
    rest = np.concatenate([frame for step in range(10) for frame in pacer.pop_due(5.0 + step * 0.01)])
    assert rest.tolist() == list(range(25, 100))
    assert pacer.drained


# ---------------------------------------------------------------- the caller-audio cleaner


class HalvingCleaner:
    """Test double: halves the caller's audio, one chunk late, and keeps the agent audio it is given."""

    def __init__(self, settings: CleanupSettings) -> None:
        self.settings = settings
        self.far: list[np.ndarray] = []
        self._held = np.zeros(0, np.float32)

    def process(self, pcm: np.ndarray, now: float) -> np.ndarray:
        out, self._held = self._held, pcm * 0.5
        return out

    def take(self) -> np.ndarray:
        return np.zeros(0, np.float32)

    def flush(self) -> np.ndarray:
        out, self._held = self._held, np.zeros(0, np.float32)
        return out

    def far_end(self, pcm: np.ndarray, rate: int, now: float) -> None:
        self.far.append(pcm)

    def far_end_dropped(self) -> None:
        self.far.clear()

    @property
    def echo_suspected(self) -> bool:
        return self.settings.echo_cancellation


def cleaned_session() -> tuple[Session, list[HalvingCleaner]]:
    made: list[HalvingCleaner] = []

    def factory(settings: CleanupSettings) -> HalvingCleaner:
        made.append(HalvingCleaner(settings))
        return made[-1]

    options = SessionOptions(echo_cancellation=True, defaults={"audio": {"input": {"turn_detection": None}}})
    return Session(options, vad_factory=EnergyVad, cleaner_factory=factory), made


def test_the_cleaner_sees_the_caller_first_and_the_agent_as_reference() -> None:
    session, made = cleaned_session()
    session.start(0.0)
    session.handle(AudioIn(tone(0.2)), 0.2)
    session.handle(AudioIn(tone(0.2)), 0.4)
    assert made and made[0].settings == CleanupSettings(echo_cancellation=True)
    outputs = session.handle(ClientEvent("input_audio_buffer.commit"), 0.5)
    committed = session.conversation.items[-1].audio
    assert committed.size == tone(0.4).size, "a commit flushes what the cleaner still holds"
    assert np.allclose(committed, np.concatenate([tone(0.2), tone(0.2)]) * 0.5)
    assert any(getattr(o, "type", "") == "input_audio_buffer.committed" for o in outputs)
    session.handle(ClientEvent("response.create"), 0.5)
    rid = session.active_response_id
    assert rid is not None
    session.handle(EngineOutput(rid, AudioDelta(tone(0.5, 24_000))), 0.5)
    session.handle(EngineDone(rid), 0.5)
    for step in range(1, 20):
        session.handle(AudioIn(silence(0.04)), 0.5 + step * 0.04)
    assert sum(chunk.size for chunk in made[0].far) == tone(0.5, 24_000).size


def test_session_update_switches_echo_cancellation_and_noise_reduction() -> None:
    session, made = cleaned_session()
    session.start(0.0)
    session.handle(AudioIn(tone(0.1)), 0.1)
    update = {"type": "realtime", "audio": {"input": {"echo_cancellation": False, "noise_reduction": None}}}
    outputs = session.handle(ClientEvent("session.update", {"session": update}), 0.2)
    assert outputs[-1].payload["session"]["audio"]["input"]["echo_cancellation"] is False
    session.handle(AudioIn(tone(0.1)), 0.3)
    assert len(made) == 1, "no cleaner for a session that asks for none"
    update = {"type": "realtime", "audio": {"input": {"noise_reduction": {"type": "far_field"}}}}
    session.handle(ClientEvent("session.update", {"session": update}), 0.4)
    session.handle(AudioIn(tone(0.1)), 0.5)
    assert made[-1].settings == CleanupSettings(echo_cancellation=False, noise_reduction="far_field")


@pytest.mark.parametrize(
    "audio_input",
    [{"echo_cancellation": "yes"}, {"noise_reduction": {"type": "underwater"}}, {"noise_reduction": "near_field"}],
)
def test_bad_cleanup_settings_are_an_error(audio_input: dict) -> None:
    session, _ = cleaned_session()
    session.start(0.0)
    before = session.config
    update = {"type": "realtime", "audio": {"input": audio_input}}
    outputs = session.handle(ClientEvent("session.update", {"session": update}), 0.1)
    assert outputs[-1].type == "error"
    assert session.config == before


def test_on_a_line_with_echo_speech_counts_only_after_the_answers_echo_is_over() -> None:
    options = SessionOptions(echo_cancellation=True, defaults={})
    session = Session(options, vad_factory=EnergyVad, cleaner_factory=HalvingCleaner)
    driver = CoreDriver(session)
    driver.record(session.start(0.0))
    response_id = answering(driver)
    # 700 ms of speech would do on an echo-free line; here the first 200 ms lead + 250 ms echo tail do not count
    driver.stream_audio(tone(1.0) * 2)
    assert not cancelled(driver, response_id)
    driver.stream_audio(tone(0.4) * 2)
    assert cancelled(driver, response_id)
