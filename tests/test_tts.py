"""The TTS stage: clause cutting as text streams, words released with the audio that speaks them, the Piper voice
(streamed within a clause, exact word starts, intelligible), its errors, and synthesis off the event loop."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from omnivox.pipeline.audio import resample
from omnivox.pipeline.engines.base import AudioDelta, TextDelta, Usage
from omnivox.pipeline.recognisers import PocketsphinxRecogniser
from omnivox.pipeline.tts import TtsSettings, create_tts_stage
from omnivox.pipeline.tts.base import SpeechChunk, SpeechError, speakable
from omnivox.pipeline.tts.clauses import ClauseCutter, words_of
from omnivox.pipeline.tts.piper import BUNDLED, CONTEXT_FRAMES, PiperBackend, PiperVoice
from omnivox.pipeline.tts.stage import TtsStage

STORY = (
    "Sure! The weather this week looks mixed, with sun on Monday and rain later. "
    "Temperatures stay around 3.5 degrees, e.g. cold for May; take a coat. Anything else?"
)


def cut(text: str, pieces: Sequence[str], **options: int) -> list[str]:
    cutter = ClauseCutter(**options)
    clauses = [clause for piece in pieces for clause in cutter.feed(piece)]
    return [*clauses, cutter.flush()]


def test_clauses_end_at_punctuation_followed_by_space_and_join_to_the_text() -> None:
    clauses = cut(STORY, [STORY])
    assert clauses == [
        "Sure! ",
        "The weather this week looks mixed, ",
        "with sun on Monday and rain later. ",
        "Temperatures stay around 3.5 degrees, ",
        "e.g. ",
        "cold for May; ",
        "take a coat. ",
        "Anything else?",
    ]
    assert "".join(clauses) == STORY


def test_streamed_text_gives_the_same_clauses_as_whole_text_and_never_cuts_a_word() -> None:
    rng = random.Random(7)
    whole = cut(STORY, [STORY])
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(STORY)), 12))
        pieces = [STORY[a:b] for a, b in zip([0, *cuts], [*cuts, len(STORY)], strict=True)]
        assert cut(STORY, pieces) == whole


def test_a_clause_completes_as_soon_as_the_space_after_its_punctuation_arrives() -> None:
    cutter = ClauseCutter()
    assert cutter.feed("Hello there.") == []  # "there." could still be "there.com"
    assert cutter.feed(" How") == ["Hello there. "]
    assert cutter.feed(" are you") == []
    assert cutter.flush() == "How are you"


def test_long_text_without_punctuation_is_cut_at_a_word_boundary_before_max_chars() -> None:
    text = " ".join(f"word{i}" for i in range(60))
    clauses = cut(text, [text], max_chars=50)
    assert "".join(clauses) == text
    assert all(len(clause) <= 50 for clause in clauses)
    assert all(clause.endswith(" ") for clause in clauses[:-1])
    words = set(text.split())
    assert all(set(clause.split()) <= words for clause in clauses)


def test_a_comma_ends_a_clause_only_once_it_is_long_enough() -> None:
    assert cut(
        "Well, I think so, and that is the long part, really",
        ["Well, I think so, and that is the long part, really"],
        min_soft_chars=24,
    ) == [
        "Well, I think so, and that is the long part, ",
        "really",
    ]


def test_words_of_keeps_every_character() -> None:
    for clause in ["  Hello,  world! ", "one", "", "   "]:
        assert "".join(words_of(clause)) == clause
    assert words_of(" a **bold** move ") == [" a", " **bold**", " move "]
    assert speakable("**bold**") == "bold" and speakable("##") == ""


# ---------------------------------------------------------------------------------------------- stage alignment


class FakeBackend:
    """Speaks each word as 1000 samples of a constant equal to its index + 1, in chunks of 700 samples."""

    name = "fake"
    rate = 25_000  # 40 ms = 1000 samples
    default_voice = "fake"

    def __init__(self, fail_on: str | None = None) -> None:
        self.clauses: list[list[str]] = []
        self.fail_on = fail_on

    def has_voice(self, voice: str) -> bool:
        return voice == "fake"

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def synthesize(self, words: Sequence[str], voice: str, speed: float) -> AsyncIterator[SpeechChunk]:
        self.clauses.append(list(words))
        if self.fail_on and self.fail_on in words:
            raise SpeechError("the fake voice cannot say that")
        audio = np.concatenate([np.full(1000, index + 1, np.float32) for index in range(len(words))])
        starts = tuple(1000 * index for index in range(len(words)))
        for offset in range(0, audio.size, 700):
            yield SpeechChunk(audio[offset : offset + 700], starts if offset == 0 else ())
            await asyncio.sleep(0)


async def stream_of(*items: object, delay: float = 0.0) -> AsyncIterator[object]:
    for item in items:
        await asyncio.sleep(delay)
        yield item


async def test_each_word_is_released_just_before_the_audio_that_begins_to_speak_it() -> None:
    backend = FakeBackend()
    stage = TtsStage(backend)
    text = "One two, three four five six seven. Eight nine"
    deltas = [d async for d in stage.speak(stream_of("One two, thr", "ee four five six seven. Eig", "ht nine"), "x")]
    assert "".join(d.text for d in deltas if isinstance(d, TextDelta)) == text
    assert [len(clause) for clause in backend.clauses] == [7, 2]
    # each word is released just before the audio delta in which its audio begins: never after, never earlier
    clause_sizes = [7, 2]
    released_at: list[tuple[int, int, int]] = []  # (word's start, samples sent in its clause, next delta's size)
    sent = word = 0
    for index, delta in enumerate(deltas):
        if isinstance(delta, TextDelta):
            for _ in delta.text.split():
                clause_word = word if word < clause_sizes[0] else word - clause_sizes[0]
                if clause_word == 0:
                    sent = 0
                released_at.append((1000 * clause_word, sent, deltas[index + 1].pcm.size))
                word += 1
        else:
            sent += delta.pcm.size
    assert len(released_at) == 9
    for start, sent_before, next_audio in released_at:
        assert sent_before <= start < sent_before + next_audio
    assert sum(d.pcm.size for d in deltas if isinstance(d, AudioDelta)) == 9000


async def test_items_that_are_not_text_pass_through_after_the_audio_before_them() -> None:
    stage = TtsStage(FakeBackend())
    usage = Usage(input_tokens=3, output_tokens=4)
    deltas = [d async for d in stage.speak(stream_of("Hello there friend", usage), "x")]
    assert deltas[-1] is usage
    assert sum(d.pcm.size for d in deltas if isinstance(d, AudioDelta)) == 3000


async def test_unspeakable_clauses_are_released_as_text_without_audio() -> None:
    backend = FakeBackend()
    deltas = [d async for d in TtsStage(backend).speak(stream_of("** ", "--- "), "x")]
    assert [d.text for d in deltas if isinstance(d, TextDelta)] == ["** --- "]
    assert backend.clauses == []


async def test_closing_the_speech_closes_the_text_stream_at_once() -> None:
    closed = asyncio.Event()

    async def endless() -> AsyncIterator[str]:
        try:
            while True:
                yield "more words. "
                await asyncio.sleep(0.001)
        finally:
            closed.set()

    speech = TtsStage(FakeBackend()).speak(endless(), "x")
    await anext(speech)
    await speech.aclose()
    await asyncio.wait_for(closed.wait(), 1)


async def test_a_failing_source_or_voice_fails_the_speech() -> None:
    async def broken() -> AsyncIterator[str]:
        yield "Hello. "
        raise RuntimeError("the LLM went away")

    with pytest.raises(RuntimeError, match="went away"):
        [d async for d in TtsStage(FakeBackend()).speak(broken(), "x")]
    with pytest.raises(SpeechError):
        [d async for d in TtsStage(FakeBackend(fail_on="boom")).speak(stream_of("say boom now"), "x")]


def test_voices_map_openai_names_then_backend_names() -> None:
    stage = TtsStage(FakeBackend(), voices={"echo": "fake"})
    assert stage.voice("echo") == "fake"
    assert stage.voice("alloy") == "fake"  # an OpenAI name without a mapping: the default voice
    assert stage.voice("fake") == "fake"
    assert stage.voice("nobody") is None


# ---------------------------------------------------------------------------------------------- Piper


@pytest.fixture(scope="module")
def joe() -> PiperVoice:
    return PiperVoice(BUNDLED)


def test_piper_audio_streamed_in_windows_equals_the_whole_decode(joe: PiperVoice) -> None:
    words = [speakable(w) for w in words_of("The quick brown fox jumps over the lazy dog, twice, near the river.")]
    ids, owners = joe.ids(words)
    assert len(ids) == len(owners) and max(owners) == len(words) - 1
    inputs = {
        "input": np.array([ids], dtype=np.int64),
        "input_lengths": np.array([len(ids)], dtype=np.int64),
        "scales": np.array([0.667, 1.0, 0.8], dtype=np.float32),
    }
    latent, _ = joe.graphs.front.run(None, inputs)
    whole = joe.graphs.decoder.run(None, {joe.graphs.latent_name: latent})[0].reshape(-1)
    frames = latent.shape[2]
    joe._decode(latent, 0, 1)  # learns the hop
    windows = [joe._decode(latent, start, min(frames, start + 20)) for start in range(0, frames, 20)]
    streamed = np.concatenate(windows)
    assert streamed.size == whole.size == frames * joe._hop
    error = streamed - whole
    snr_db = 10 * np.log10(np.sum(whole**2) / np.sum(error**2))
    assert snr_db > 50, f"joins are audible ({snr_db:.1f} dB, {CONTEXT_FRAMES} context frames)"


def test_piper_word_starts_follow_the_durations(joe: PiperVoice) -> None:
    words = [speakable(w) for w in words_of("Hello, how are you doing today?")]
    chunks = list(joe.stream(words))
    audio = np.concatenate([chunk.pcm for chunk in chunks])
    starts = chunks[0].word_starts
    assert len(chunks) >= 2, "the first window comes before the rest of the clause"
    assert len(starts) == len(words) and list(starts) == sorted(starts)
    assert 0 < starts[0] < starts[-1] < audio.size
    # the first word's audio is silent before its start (the leading pause) and loud after it
    assert np.abs(audio[: starts[0] // 2]).max() < 0.1 < np.abs(audio[starts[0] : starts[1]]).max()


@pytest.mark.slow
def test_piper_speech_is_recognised(joe: PiperVoice) -> None:
    words = [speakable(w) for w in words_of("The quick brown fox jumps over the lazy dog.")]
    audio = np.concatenate([chunk.pcm for chunk in joe.stream(words)])
    heard = PocketsphinxRecogniser().recognise(resample(audio, joe.rate, 16_000))
    assert {"quick", "brown", "fox", "lazy", "dog"} <= set(heard.split())


def test_a_missing_piper_voice_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "en_US-nobody-medium.onnx"
    with pytest.raises(FileNotFoundError, match=r"en_US-nobody-medium\.onnx"):
        create_tts_stage(TtsSettings(piper_voices={"nobody": str(missing)}))
    with pytest.raises(ValueError, match="default Piper voice 'joe'"):
        PiperBackend({"other": BUNDLED}, "joe", ThreadPoolExecutor(1))


@pytest.mark.slow
async def test_piper_synthesis_never_holds_the_event_loop() -> None:
    """onnxruntime releases the GIL: a loop ticking every 5 ms keeps ticking while clauses are synthesised."""
    stage = create_tts_stage(TtsSettings())
    await stage.start()
    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticking = asyncio.create_task(ticker())
    audio = [pcm async for pcm in stage.audio(STORY, "alloy")]
    done.set()
    await ticking
    await stage.close()
    seconds = sum(pcm.size for pcm in audio) / stage.rate
    assert seconds > 8
    assert len(gaps) > 20 and np.percentile(gaps, 99) < 0.06, f"loop stalls: {sorted(gaps)[-5:]}"
