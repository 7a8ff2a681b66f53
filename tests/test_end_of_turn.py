"""The real models behind turn taking, offline: Smart Turn (features, batching, its verdicts on espeak-ng speech) and
the WebRTC echo canceller with its echo-path judgement."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from transformers import WhisperFeatureExtractor

from omnivox.pipeline.audio import synthesize_speech
from omnivox.pipeline.echo_cancel import ApmCleaner, CleanupSettings
from omnivox.pipeline.end_of_turn import WINDOW_SAMPLES, EndOfTurnBatcher, SmartTurnModel, smart_turn_model_path

RATE = 16_000


@pytest.fixture(scope="module")
def model() -> SmartTurnModel:
    return SmartTurnModel(smart_turn_model_path())


def spoken(text: str, voice: str = "en-us", words_per_minute: int = 160) -> np.ndarray:
    samples = synthesize_speech(text, RATE, voice, words_per_minute)
    voiced = np.flatnonzero(np.abs(samples) > 0.01)
    return samples[voiced[0] : voiced[-1] + 1]


def test_features_are_the_whisper_extractors(model: SmartTurnModel) -> None:
    audio = np.random.default_rng(0).normal(0, 0.1, 3 * RATE).astype(np.float32)
    extractor = WhisperFeatureExtractor(feature_size=80, sampling_rate=RATE)
    expected = extractor(
        model.window(audio),
        sampling_rate=RATE,
        return_tensors="np",
        padding="max_length",
        max_length=WINDOW_SAMPLES,
        truncation=True,
        do_normalize=True,
    )["input_features"][0]
    assert model.features(audio).shape == (80, 800)
    assert np.abs(model.features(audio) - expected).max() < 1e-4


def test_a_finished_question_is_complete_and_a_hesitation_is_not(model: SmartTurnModel) -> None:
    question = spoken("Can you tell me about the weather in Paris tomorrow?")
    complete, hesitating = model.probabilities([question, spoken("I would like to book a table for, uhm,")])
    assert complete > 0.5 > hesitating


async def test_the_batcher_answers_concurrent_sessions_like_one() -> None:
    batcher = EndOfTurnBatcher(None)
    try:
        turns = [spoken(text) for text in ("What time is it?", "My name is John and I, uhm,", "Thanks, that is all.")]
        together = await asyncio.gather(*(batcher.predict(turn) for turn in turns))
        alone = [await batcher.predict(turn) for turn in turns]
    finally:
        batcher.close()
    assert together == pytest.approx(alone, abs=1e-5)
    assert all(0.0 <= p <= 1.0 for p in together)


def run_cleaner(microphone: np.ndarray, agent: np.ndarray, agent_from: int) -> tuple[ApmCleaner, np.ndarray]:
    """Feed 20 ms chunks in 'real time'; the agent's audio is sent (200 ms ahead) from sample `agent_from`."""
    cleaner = ApmCleaner(CleanupSettings(echo_cancellation=True))
    out, sent, now = [], 0, 0.0
    chunk = RATE // 50
    for start in range(0, microphone.size, chunk):
        now += 0.02
        while start >= agent_from and sent < agent.size and sent / RATE <= (start - agent_from) / RATE + 0.2:
            cleaner.far_end(agent[sent : sent + 640], RATE, now)
            sent += 640
        out.append(cleaner.process(microphone[start : start + chunk], now))
        assert cleaner.wait()
    out.append(cleaner.flush())
    return cleaner, np.concatenate(out)


def level_db(samples: np.ndarray) -> float:
    return 10 * float(np.log10(np.mean(samples.astype(np.float64) ** 2) + 1e-12))


@pytest.mark.slow
def test_the_agents_echo_is_cancelled_and_a_caller_on_an_echo_free_line_is_not() -> None:
    agent = spoken("Let me tell you about the weather this week. On Monday it will be sunny and warm.")
    rng = np.random.default_rng(0)
    total, start, delay = 7 * RATE, RATE, int(0.15 * RATE)
    noise = rng.normal(0, 10 ** (-50 / 20), total).astype(np.float32)

    echoed = noise.copy()
    echoed[start + delay : start + delay + agent.size] += agent[: total - start - delay] * 10 ** (-6 / 20)
    cleaner, cleaned = run_cleaner(echoed, agent, start)
    settled = slice(start + delay + RATE // 2, start + delay + agent.size)
    assert cleaner.echo_path.echo
    assert level_db(cleaned[settled]) < level_db(echoed[settled]) - 20, "the echo was not cancelled"

    caller = spoken("Sorry, can I ask something else please?", "en-gb")
    talking = noise.copy()
    barge_in = start + int(2.5 * RATE)
    talking[barge_in : barge_in + caller.size] += caller
    cleaner, cleaned = run_cleaner(talking, agent, start)
    speech = slice(barge_in, barge_in + caller.size)
    assert not cleaner.echo_path.echo
    assert level_db(cleaned[speech]) == pytest.approx(level_db(talking[speech]), abs=1.0), "the caller was muted"
