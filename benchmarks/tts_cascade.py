"""The TTS stage and the cascade engine on this CPU: Piper's real-time factor per core, first-clause latency, the
cascade's first audio against a stand-in streaming LLM's first token, and pocketsphinx word error rate of Piper
against espeak-ng on the same sentences.

    PYTHONPATH=. python benchmarks/tts_cascade.py [--runs 30] [--only rtf,first,cascade,wer]

- rtf: each sentence synthesised by the bundled Piper voice on one onnxruntime thread: synthesis time / audio time
  over all sentences, as wall time and as the thread's CPU time (per core, whatever else the machine runs).
- first: a complete 6-word clause handed to the TTS stage -> its first PCM (phonemes, the graph's front, the first
  decoder window, the thread hops), p50/p95 of wall time, and the CPU time of that work on one core.
- cascade: the cascade engine over the remote LLM stage and a stand-in LLM server on loopback whose first token comes
  after a fixed delay and the other tokens right after it; first audio - first token next to the TTS stage's own
  latency for that first clause, alternated run by run (goal: within it + 20 ms).
- wer: the same sentences spoken by Piper and by espeak-ng (170 words per minute), recognised by pocketsphinx.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time
from collections.abc import AsyncIterator

import numpy as np

from omnivox.pipeline.audio import resample, synthesize_speech
from omnivox.pipeline.engines.base import AudioDelta, Message, ResponseRequest, TextPart
from omnivox.pipeline.engines.cascade import CascadeEngine
from omnivox.pipeline.recognisers import PocketsphinxRecogniser
from omnivox.pipeline.tts import TtsSettings, create_tts_stage
from omnivox.pipeline.tts.base import speakable
from omnivox.pipeline.tts.clauses import words_of
from omnivox.pipeline.tts.piper import BUNDLED, PiperVoice
from tests.cascade_helpers import TextLlmStandIn, llm_server

SENTENCES = [
    "The birch canoe slid on the smooth planks.",
    "Glue the sheet to the dark blue background.",
    "It is easy to tell the depth of a well.",
    "These days a chicken leg is a rare dish.",
    "Rice is often served in round bowls.",
    "The juice of lemons makes fine punch.",
    "The box was thrown beside the parked truck.",
    "The hogs were fed chopped corn and garbage.",
    "Four hours of steady work faced us.",
    "A large size in stockings is hard to sell.",
    "The boy was there when the sun rose.",
    "A rod is used to catch pink salmon.",
]
SIX_WORDS = [
    "Please call me back this afternoon. ",
    "The weather looks fine for tomorrow. ",
    "Your order will arrive on Friday. ",
    "I can help you with that. ",
    "Let me check the schedule first. ",
    "The meeting starts at ten sharp. ",
]
FIRST_TOKEN_S = 0.2
ANSWER = "I can help you with that. Let me look at your account and the latest bookings for this week."


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def rtf() -> None:
    voice = PiperVoice(BUNDLED, threads=1)
    list(voice.stream(["Warm", "up."]))
    synth = cpu = audio = 0.0
    for sentence in SENTENCES:
        words = [speakable(w) for w in words_of(sentence)]
        started, started_cpu = time.perf_counter(), time.thread_time()
        samples = sum(chunk.pcm.size for chunk in voice.stream(words))
        synth += time.perf_counter() - started
        cpu += time.thread_time() - started_cpu  # one onnxruntime thread runs on the calling thread
        audio += samples / voice.rate
    print(
        f"Piper en_US-joe-medium, 1 thread: {audio:.1f} s of speech in {synth:.2f} s wall, {cpu:.2f} s CPU: "
        f"RTF {synth / audio:.3f} wall, {cpu / audio:.3f} per core (CPU)"
    )


async def first_pcm_ms(stage: object, clause: str) -> float:
    async def text() -> AsyncIterator[str]:
        yield clause

    started = time.perf_counter()
    async for delta in stage.speak(text(), "alloy"):  # type: ignore[attr-defined]
        if isinstance(delta, AudioDelta):
            return (time.perf_counter() - started) * 1000
    raise RuntimeError("no audio")


async def first(runs: int) -> None:
    stage = create_tts_stage(TtsSettings())
    await stage.start()
    await first_pcm_ms(stage, "Warm up. ")
    times = [await first_pcm_ms(stage, SIX_WORDS[run % len(SIX_WORDS)]) for run in range(runs)]
    p50, p95 = percentile(times, 50), percentile(times, 95)
    print(f"first clause (6 words) -> first PCM: p50 {p50:.0f} ms  p95 {p95:.0f} ms (wall, through the stage)")
    await stage.close()
    voice = PiperVoice(BUNDLED, threads=1)
    cpu = []
    for run in range(runs):
        words = [speakable(w) for w in words_of(SIX_WORDS[run % len(SIX_WORDS)])]
        started = time.thread_time()
        next(iter(voice.stream(words)))
        cpu.append((time.thread_time() - started) * 1000)
    print(f"  the CPU time of that work (one core): p50 {percentile(cpu, 50):.0f} ms  p95 {percentile(cpu, 95):.0f} ms")


async def cascade(runs: int) -> None:
    stand_in = TextLlmStandIn(ANSWER, first_token_s=FIRST_TOKEN_S, token_s=0.0)
    stage = create_tts_stage(TtsSettings())
    with llm_server(stand_in) as url:
        engine = CascadeEngine("stand-in", tts=stage, llm={"remote": {"url": url}}, recogniser={"kind": "pocketsphinx"})
        await engine.start()
        request = ResponseRequest(messages=(Message("user", (TextPart("Can you help me?"),)),))
        gaps: list[float] = []
        clause: list[float] = []
        for _ in range(runs + 1):  # alternated, so both see the same machine
            async for delta in engine.respond(request):
                if isinstance(delta, AudioDelta):
                    gaps.append((time.monotonic() - stand_in.first_token_at[-1]) * 1000)
                    break
            clause.append(await first_pcm_ms(stage, "I can help you with that. "))
        await engine.close()
    gaps, clause = gaps[1:], clause[1:]  # the first request warms the connection
    extra = [gap - alone for gap, alone in zip(gaps, clause, strict=True)]
    print(
        f"cascade first audio - first token: p50 {percentile(gaps, 50):.0f} ms  p95 {percentile(gaps, 95):.0f} ms; "
        f"the clause alone: p50 {percentile(clause, 50):.0f} ms  p95 {percentile(clause, 95):.0f} ms; "
        f"difference run by run: p50 {percentile(extra, 50):.0f} ms  p95 {percentile(extra, 95):.0f} ms "
        f"(first token at {FIRST_TOKEN_S * 1000:.0f} ms, the other tokens right after it)"
    )


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z' ]", " ", text.lower()).split()


def word_errors(reference: list[str], hypothesis: list[str]) -> int:
    row = list(range(len(hypothesis) + 1))
    for i, ref in enumerate(reference, 1):
        previous, row[0] = row[0], i
        for j, hyp in enumerate(hypothesis, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (ref != hyp))
    return row[-1]


def wer() -> None:
    recogniser = PocketsphinxRecogniser()
    voice = PiperVoice(BUNDLED, threads=1)
    totals = {"piper": 0, "espeak-ng": 0}
    reference_words = 0
    for sentence in SENTENCES:
        reference = words(sentence)
        reference_words += len(reference)
        piper = np.concatenate([c.pcm for c in voice.stream([speakable(w) for w in words_of(sentence)])])
        spoken = {
            "piper": resample(piper, voice.rate, 16_000),
            "espeak-ng": synthesize_speech(sentence, 16_000, "en-us", 170),
        }
        for name, audio in spoken.items():
            totals[name] += word_errors(reference, words(recogniser.recognise(audio)))
    for name, errors in totals.items():
        print(f"pocketsphinx WER, {name:9s}: {errors / reference_words:.1%} ({errors}/{reference_words} words)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--only", default="rtf,first,cascade,wer")
    args = parser.parse_args()
    parts = set(args.only.split(","))
    if "rtf" in parts:
        rtf()
    if "first" in parts:
        asyncio.run(first(args.runs))
    if "cascade" in parts:
        asyncio.run(cascade(args.runs))
    if "wer" in parts:
        wer()


if __name__ == "__main__":
    main()
