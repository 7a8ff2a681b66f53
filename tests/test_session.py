"""The session core under a fake clock: turns, responses, pacing, barge-in, truncation, races."""

from __future__ import annotations

import numpy as np
import pytest

from omnivox.pipeline.engines.base import AudioDelta, TextDelta, TextPart
from tests.core_helpers import CoreDriver, silence, tone

CANONICAL = [
    "response.created",
    "response.output_item.added",
    "conversation.item.added",
    "response.content_part.added",
]
CLOSING = [
    "response.output_audio.done",
    "response.output_audio_transcript.done",
    "response.content_part.done",
    "response.output_item.done",
    "conversation.item.done",
    "response.done",
]


def manual_turn(driver: CoreDriver, seconds: float = 1.0) -> None:
    driver.append_pcm24(tone(seconds, 24_000))
    driver.send("input_audio_buffer.commit")


def test_session_created_first_with_ga_shape() -> None:
    driver = CoreDriver.create()
    first = driver.events[0]
    assert first.type == "session.created"
    session = first.payload["session"]
    assert session["type"] == "realtime"
    assert session["audio"]["input"]["turn_detection"]["silence_duration_ms"] == 500
    assert session["audio"]["output"]["format"] == {"type": "audio/pcm", "rate": 24000}


def test_manual_turn_commit_creates_user_item_with_16khz_audio() -> None:
    driver = CoreDriver.create(turn_detection=None)
    manual_turn(driver, 1.0)
    assert driver.types()[-3:] == ["input_audio_buffer.committed", "conversation.item.added", "conversation.item.done"]
    item = driver.session.conversation.items[0]
    assert item.role == "user"
    assert abs(item.audio.size - 16_000) < 200
    assert driver.of_type("conversation.item.done")[0].payload["item"]["content"][0]["type"] == "input_audio"


@pytest.mark.parametrize("seconds", [0.0, 0.05])
def test_commit_under_100ms_is_an_error_and_session_goes_on(seconds: float) -> None:
    driver = CoreDriver.create(turn_detection=None)
    if seconds:
        driver.append_pcm24(tone(seconds, 24_000))
    driver.send("input_audio_buffer.commit", event_id="client_7")
    error = driver.events[-1]
    assert error.type == "error"
    assert error.payload["error"]["code"] == "input_audio_buffer_commit_empty"
    assert error.payload["error"]["event_id"] == "client_7"
    manual_turn(driver, 0.5)
    assert driver.types()[-1] == "conversation.item.done"


def test_clear_empties_the_buffer() -> None:
    driver = CoreDriver.create(turn_detection=None)
    driver.append_pcm24(tone(0.5, 24_000))
    driver.send("input_audio_buffer.clear")
    assert driver.types()[-1] == "input_audio_buffer.cleared"
    driver.send("input_audio_buffer.commit")
    assert driver.events[-1].payload["error"]["code"] == "input_audio_buffer_commit_empty"


def test_full_response_sequence_paced_in_40ms_frames() -> None:
    driver = CoreDriver.create(turn_detection=None)
    manual_turn(driver)
    driver.send("response.create")
    assert driver.types()[-4:] == CANONICAL
    request = driver.started[-1].request
    assert isinstance(request.messages[0].parts[0].pcm, np.ndarray)
    driver.speak("Hello there", 1.0)
    driver.engine_done()
    driver.advance(2.0)
    assert driver.types()[-len(CLOSING) :] == CLOSING
    done = driver.of_type("response.done")[0].payload["response"]
    assert done["status"] == "completed"
    frames = [a.pcm.size for a in driver.audio]
    assert all(size == 960 for size in frames)
    assert sum(frames) == 24_000
    transcript = driver.of_type("response.output_audio_transcript.done")[0].payload["transcript"]
    deltas = "".join(e.payload["delta"] for e in driver.of_type("response.output_audio_transcript.delta"))
    assert transcript == deltas == "Hello there"
    assert driver.session.conversation.items[-1].to_json()["content"][0]["transcript"] == "Hello there"


def test_pacer_sends_lead_at_once_then_real_time() -> None:
    driver = CoreDriver.create(turn_detection=None)
    manual_turn(driver)
    driver.send("response.create")
    driver.engine(AudioDelta(tone(2.0, 24_000)))
    assert len(driver.audio) == 5  # 200 ms lead = five 40 ms frames at once
    driver.advance(1.0, step=0.001)
    sent_ms = 40 * len(driver.audio)
    assert 1200 - 40 <= sent_ms <= 1200 + 40  # real time plus the lead, never a burst
    gaps = np.diff(driver.audio_times[5:])
    assert np.all(gaps >= 0.039)


def test_no_event_follows_response_done_and_late_deltas_are_dropped() -> None:
    driver = CoreDriver.create(turn_detection=None)
    manual_turn(driver)
    driver.send("response.create")
    rid = driver.started[-1].response_id
    driver.speak("One", 0.2)
    driver.send("response.cancel")
    assert driver.cancelled == [rid]
    count = len(driver.events)
    driver.engine(TextDelta("late"), rid)
    driver.engine(AudioDelta(tone(0.5, 24_000)), rid)
    driver.engine_done(rid)
    driver.advance(1.0)
    assert len(driver.events) == count
    done = driver.of_type("response.done")[0].payload["response"]
    assert done["status"] == "cancelled"
    assert done["status_details"]["reason"] == "client_cancelled"


def test_cancel_without_active_response_is_an_error() -> None:
    driver = CoreDriver.create(turn_detection=None)
    driver.send("response.cancel")
    assert driver.events[-1].payload["error"]["code"] == "response_cancel_not_active"


def test_second_response_create_while_active_is_rejected_first_completes() -> None:
    driver = CoreDriver.create(turn_detection=None)
    manual_turn(driver)
    driver.send("response.create")
    driver.send("response.create")
    assert driver.events[-1].payload["error"]["code"] == "conversation_already_has_active_response"
    driver.speak("Hi", 0.3)
    driver.engine_done()
    driver.advance(1.0)
    assert driver.of_type("response.done")[0].payload["response"]["status"] == "completed"
    assert len(driver.started) == 1


def test_server_vad_turn_events_and_auto_response() -> None:
    driver = CoreDriver.create()
    driver.stream_audio(np.concatenate([silence(1.0), tone(1.0), silence(1.0)]))
    types = driver.types()
    started = driver.of_type("input_audio_buffer.speech_started")[0].payload
    stopped = driver.of_type("input_audio_buffer.speech_stopped")[0].payload
    assert abs(started["audio_start_ms"] - (1000 - 300)) <= 20
    assert abs(stopped["audio_end_ms"] - 2000) <= 40
    assert started["item_id"] == stopped["item_id"]
    order = [
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "conversation.item.added",
        "conversation.item.done",
        "response.created",
    ]
    assert [t for t in types if t in order][: len(order)] == order
    user = driver.session.conversation.items[0]
    assert user.id == started["item_id"]
    assert 1.3 <= user.audio.size / 16_000 <= 1.5  # 300 ms prefix + 1 s speech + 100 ms tail


def test_create_response_false_emits_turn_but_no_response() -> None:
    driver = CoreDriver.create({"type": "server_vad", "create_response": False})
    driver.stream_audio(np.concatenate([silence(0.5), tone(0.6), silence(0.8)]))
    assert "input_audio_buffer.committed" in driver.types()
    assert "response.created" not in driver.types()


@pytest.mark.parametrize("listened_s", [0.9, 1.7, 3.3])
def test_listening_keeps_only_the_recent_window_for_a_commit(listened_s: float) -> None:
    """Between turns the buffer holds prefix padding + min speech + 500 ms, however long the caller was silent
    (the held audio is trimmed lazily, but a commit sees exactly that window)."""
    driver = CoreDriver.create({"type": "server_vad", "create_response": False})
    driver.stream_audio(silence(listened_s))
    driver.send("input_audio_buffer.commit")
    committed = driver.session.conversation.items[-1]
    assert committed.audio.size == (300 + 64 + 500) * 16


def test_barge_in_cancels_truncates_and_next_turn_sees_only_heard_text() -> None:
    driver = CoreDriver.create()
    driver.stream_audio(np.concatenate([silence(0.5), tone(0.8), silence(0.7)]))
    rid = driver.started[-1].response_id
    words = " ".join(f"word{i}" for i in range(40))
    driver.engine(TextDelta(words))
    driver.engine(AudioDelta(tone(4.0, 24_000)))
    driver.stream_audio(silence(1.0))  # one second of the answer plays
    onset = driver.now
    driver.stream_audio(tone(0.9))  # longer than min_interruption_ms: an interruption, not a backchannel
    started = driver.of_type("input_audio_buffer.speech_started")[-1]
    assert driver.cancelled == [rid]
    last_audio_time = max(t for a, t in zip(driver.audio, driver.audio_times, strict=True) if a.response_id == rid)
    assert last_audio_time - onset <= 0.25
    done = driver.of_type("response.done")[-1].payload["response"]
    assert done["status"] == "cancelled" and done["status_details"]["reason"] == "turn_detected"
    truncated = driver.of_type("conversation.item.truncated")[-1].payload
    sent_ms = 40 * sum(1 for a in driver.audio if a.response_id == rid)
    assert truncated["audio_end_ms"] == sent_ms
    assert driver.types().index("response.done") > driver.types().index(started.type)
    # nothing of the cancelled response after its response.done
    driver.engine(AudioDelta(tone(1.0, 24_000)), rid)
    driver.advance(0.5)
    assert sum(1 for a in driver.audio if a.response_id == rid) * 40 == sent_ms
    driver.stream_audio(silence(0.8))
    request = driver.started[-1].request
    assistant = next(m for m in request.messages if m.role == "assistant")
    heard = assistant.parts[0]
    assert isinstance(heard, TextPart)
    assert 0 < len(heard.text) < len(words)
    assert words.startswith(heard.text)


def test_interrupt_response_false_lets_the_agent_finish() -> None:
    driver = CoreDriver.create({"type": "server_vad", "interrupt_response": False})
    driver.stream_audio(np.concatenate([silence(0.5), tone(0.8), silence(0.7)]))
    driver.speak("Keep talking", 1.0)
    driver.engine_done()
    driver.stream_audio(tone(0.4))
    assert driver.cancelled == []
    driver.advance(2.0)
    assert driver.of_type("response.done")[0].payload["response"]["status"] == "completed"


def test_client_truncate_rules() -> None:
    driver = CoreDriver.create(turn_detection=None)
    manual_turn(driver)
    driver.send("response.create")
    driver.speak("Hello there general", 1.0)
    driver.engine_done()
    driver.advance(2.0)
    user_id = driver.session.conversation.items[0].id
    item_id = driver.session.conversation.items[1].id
    driver.send("conversation.item.truncate", item_id=item_id, content_index=0, audio_end_ms=5000)
    sent_ms = int(driver.session.conversation.items[1].audio_sent_ms)
    assert sent_ms == 1000
    assert driver.events[-1].payload == {"item_id": item_id, "content_index": 0, "audio_end_ms": sent_ms}
    assert driver.session.conversation.items[1].heard_text() == "Hello there general"
    driver.send("conversation.item.truncate", item_id=user_id, content_index=0, audio_end_ms=10)
    assert driver.events[-1].type == "error"
    driver.send("conversation.item.truncate", item_id=item_id, content_index=0, audio_end_ms=400)
    assert driver.events[-1].type == "conversation.item.truncated"
    assert driver.events[-1].payload == {"item_id": item_id, "content_index": 0, "audio_end_ms": 400}
    assert driver.session.conversation.items[1].heard_text() == "Hello"


def test_item_create_retrieve_delete() -> None:
    driver = CoreDriver.create(turn_detection=None)
    driver.send(
        "conversation.item.create",
        item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
    )
    assert driver.types()[-2:] == ["conversation.item.added", "conversation.item.done"]
    item_id = driver.events[-1].payload["item"]["id"]
    driver.send("conversation.item.retrieve", item_id=item_id)
    assert driver.events[-1].payload["item"]["content"] == [{"type": "input_text", "text": "Hi"}]
    driver.send("response.create")
    assert driver.started[-1].request.messages[0].parts == (TextPart("Hi"),)
    driver.send("response.cancel")
    driver.send("conversation.item.delete", item_id=item_id)
    assert driver.events[-1].type == "conversation.item.deleted"
    driver.send("conversation.item.delete", item_id="nope", event_id="e1")
    assert driver.events[-1].payload["error"]["event_id"] == "e1"


def test_session_update_partial_merge_and_manual_switch() -> None:
    driver = CoreDriver.create()
    driver.send(
        "session.update",
        session={
            "type": "realtime",
            "instructions": "be brief",
            "tracing": "auto",
            "audio": {"output": {"voice": "ash"}},
        },
    )
    session = driver.events[-1].payload["session"]
    assert driver.events[-1].type == "session.updated"
    assert session["instructions"] == "be brief" and session["audio"]["output"]["voice"] == "ash"
    assert session["audio"]["input"]["turn_detection"]["type"] == "server_vad"
    driver.send("session.update", session={"type": "realtime", "audio": {"input": {"turn_detection": None}}})
    assert driver.events[-1].payload["session"]["audio"]["input"]["turn_detection"] is None
    driver.stream_audio(np.concatenate([silence(0.5), tone(0.6), silence(0.8)]))
    assert "input_audio_buffer.speech_started" not in driver.types()


@pytest.mark.parametrize(
    "update",
    [
        {"audio": {"input": {"turn_detection": {"type": "magic"}}}},
        {"audio": {"output": {"format": {"type": "audio/pcm", "rate": 16000}}}},
        {"output_modalities": ["video"]},
        {"temperature": "hot"},
    ],
)
def test_invalid_session_update_is_an_error_and_keeps_the_old_session(update: dict) -> None:
    driver = CoreDriver.create()
    before = driver.session.config
    driver.send("session.update", session={"type": "realtime", **update})
    assert driver.events[-1].type == "error"
    assert driver.session.config == before


def test_g711_output_frames_are_8khz() -> None:
    driver = CoreDriver.create(turn_detection=None)
    driver.send(
        "session.update",
        session={
            "type": "realtime",
            "audio": {"input": {"format": {"type": "audio/pcmu"}}, "output": {"format": {"type": "audio/pcmu"}}},
        },
    )
    assert driver.session.output_rate == 8000
    import base64

    from omnivox.pipeline.audio import mulaw_encode

    driver.send("input_audio_buffer.append", audio=base64.b64encode(mulaw_encode(tone(0.5, 8000))).decode())
    driver.send("input_audio_buffer.commit")
    assert abs(driver.session.conversation.items[0].audio.size - 8000) < 200
    driver.send("response.create")
    driver.engine(AudioDelta(tone(0.4, 24_000)))
    driver.engine_done()
    driver.advance(1.0)
    assert sum(a.pcm.size for a in driver.audio) == pytest.approx(3200, abs=8)
    assert driver.audio[0].pcm.size == 320


def test_bad_base64_and_odd_length_audio_are_errors() -> None:
    driver = CoreDriver.create(turn_detection=None)
    driver.send("input_audio_buffer.append", audio="***", event_id="a1")
    assert driver.events[-1].payload["error"]["code"] == "invalid_audio"
    driver.send("input_audio_buffer.append", audio="AAAA", event_id="a2")
    assert driver.events[-1].payload["error"]["event_id"] == "a2"


def test_engine_failure_fails_the_response_and_session_goes_on() -> None:
    from omnivox.pipeline.events import EngineFailed

    driver = CoreDriver.create(turn_detection=None)
    manual_turn(driver)
    driver.send("response.create")
    rid = driver.started[-1].response_id
    driver.record(driver.session.handle(EngineFailed(rid, "engine_out_of_memory", "GPU out of memory"), driver.now))
    assert driver.of_type("error")[-1].payload["error"]["code"] == "engine_out_of_memory"
    assert driver.of_type("response.done")[-1].payload["response"]["status"] == "failed"
    driver.send("response.create")
    assert driver.types()[-1] == "response.content_part.added"


def test_idle_timeout_triggers_a_response() -> None:
    driver = CoreDriver.create({"type": "server_vad", "idle_timeout_ms": 5000})
    driver.stream_audio(np.concatenate([silence(0.5), tone(0.6), silence(0.7)]))
    driver.speak("Hi", 0.2)
    driver.engine_done()
    driver.advance(0.5)
    driver.stream_audio(silence(5.2))
    assert "input_audio_buffer.timeout_triggered" in driver.types()
    assert len(driver.started) == 2


def test_audio_item_created_by_the_client_keeps_its_whole_length() -> None:
    import base64

    from omnivox.pipeline.audio import float_to_pcm16

    driver = CoreDriver.create(turn_detection=None)
    audio = base64.b64encode(float_to_pcm16(tone(0.5, 24_000))).decode()
    driver.send(
        "conversation.item.create",
        item={"type": "message", "role": "user", "content": [{"type": "input_audio", "audio": audio}]},
    )
    assert driver.session.conversation.items[0].audio.size == 8000


def test_input_transcription_is_requested_and_reported_per_item() -> None:
    from omnivox.pipeline.events import TranscribeAudio, TranscriptionDone

    driver = CoreDriver.create(turn_detection=None)
    driver.send(
        "session.update",
        session={"type": "realtime", "audio": {"input": {"transcription": {"model": "whisper-1", "language": "en"}}}},
    )
    driver.append_pcm24(tone(0.5, 24_000))
    orders = [o for o in driver.send("input_audio_buffer.commit") if isinstance(o, TranscribeAudio)]
    assert len(orders) == 1 and orders[0].language == "en" and orders[0].audio.size == 8000
    item_id = orders[0].item_id
    driver.record(driver.session.handle(TranscriptionDone(item_id, "hello there"), driver.now))
    completed = driver.events[-1]
    assert completed.type == "conversation.item.input_audio_transcription.completed"
    assert completed.payload["transcript"] == "hello there"
    assert completed.payload["usage"] == {"type": "duration", "seconds": 0.5}
    driver.send("conversation.item.retrieve", item_id=item_id)
    assert driver.events[-1].payload["item"]["content"][0]["transcript"] == "hello there"
    driver.record(driver.session.handle(TranscriptionDone(item_id, None, "no recogniser"), driver.now))
    assert driver.events[-1].type == "conversation.item.input_audio_transcription.failed"


def test_no_transcription_requested_by_default() -> None:
    from omnivox.pipeline.events import TranscribeAudio

    driver = CoreDriver.create(turn_detection=None)
    driver.append_pcm24(tone(0.5, 24_000))
    assert not [o for o in driver.send("input_audio_buffer.commit") if isinstance(o, TranscribeAudio)]
