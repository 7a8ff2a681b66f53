"""Turn taking over the Realtime WebSocket door: end-of-turn latency, cut-offs, echo, false and real barge-ins.

Callers are built here from espeak-ng speech in several voices and rates, with line noise; a caller simulator plays
the agent's own answer back into its microphone (`tests/echo_caller.py`). The scripted engine answers.

  (a) complete questions, then silence: caller's end of speech -> `speech_stopped` and -> `response.created`,
      semantic_vad (default eagerness) against server_vad
  (b) sentences with a 500-900 ms mid-sentence pause ("..., uhm," then the rest): share of turns cut at the pause
  (c) echo: the agent's answer comes back into the microphone 50-250 ms later at -6 to -20 dB with line noise while
      the caller stays silent: answers the agent cancelled, or paused (a gap of 250 ms or more in its audio) and
      resumed, on its own echo, with and without echo cancellation
  (d) backchannels ("mm-hm", "yeah", ...) and noise bursts (a cough, a door) 1.5 s into an answer: answers cancelled
  (e) real barge-ins 1.5 s into an answer (half of them with echo): detected, and caller speech onset -> last agent
      audio delta received (the server stops sending) and -> `response.done`

    python benchmarks/turn_taking.py              # every case: 30 trials each, 50 echo trials per setting
    python benchmarks/turn_taking.py --cases c --echo-trials 20
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omnivox.pipeline.engines.scripted import ScriptedEngine
from tests.echo_caller import RATE, Echo, EchoCaller, voice
from tests.server_helpers import running_server, scripted_config

VOICES = ("en-us", "en-gb", "en-us+f3", "en-us+m3", "en-us+f2")
RATES = (140, 160, 180)
QUESTIONS = (
    "What time is it?",
    "Can you tell me about the weather in Paris tomorrow?",
    "I would like to book a table for four people tonight.",
    "How do I reset my password?",
    "Do you know a good restaurant near the station?",
    "Please remind me to call my mother at six in the evening.",
    "What is the fastest way to get to the airport?",
    "Thanks, that is all I needed.",
)
PAUSED = (
    ("I would like to book a table for, uhm,", "four people tonight."),
    ("Can you tell me about the, uhm,", "weather in Paris tomorrow?"),
    ("My name is John and I, uhm,", "need some help with my account."),
    ("The reason I am calling is that, uhm,", "my internet is down."),
    ("I want to fly to, uhm,", "London next week."),
    ("Could you please send me the, uhm,", "invoice for last month?"),
)
BACKCHANNELS = ("yeah", "okay", "uh huh", "right", "I see", "hmm", "sure")
INTERRUPTIONS = (
    "Wait, stop, I have another question about that.",
    "Sorry, can I ask something else please?",
    "No no, that is not what I meant at all.",
    "Hold on, let me tell you my address first.",
)
REPLY = (
    "Let me tell you everything about the weather this week. On Monday it will be sunny and warm, on Tuesday clouds "
    "come in from the west, and by Wednesday we expect heavy rain across the whole region."
)
ANSWER_WAIT_S = 1.5


def speakers() -> itertools.cycle[tuple[str, int]]:
    return itertools.cycle(itertools.product(VOICES, RATES))


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def summary(name: str, values: list[float]) -> str:
    if not values:
        return f"{name:44s} n=0"
    return (
        f"{name:44s} p50 {percentile(values, 0.5):6.0f} ms  p95 {percentile(values, 0.95):6.0f} ms  "
        f"mean {statistics.fmean(values):6.0f} ms  (n={len(values)})"
    )


def noise_burst(kind: str, rng: np.random.Generator) -> np.ndarray:
    """A cough (two 120 ms bursts of band-limited noise) or a door (a 60 ms knock decaying over 250 ms)."""
    if kind == "door":
        length = int(0.25 * RATE)
        envelope = np.exp(-np.arange(length) / (0.05 * RATE))
        return (0.5 * rng.normal(0, 1, length) * envelope).astype(np.float32)
    burst = int(0.12 * RATE)
    noise = np.convolve(rng.normal(0, 1, burst), np.ones(8) / 8, mode="same") * np.hanning(burst)
    gap = np.zeros(int(0.08 * RATE))
    return (0.4 * np.concatenate((noise, gap, noise))).astype(np.float32)


async def bounded(trials: list[Callable[[], Awaitable[Any]]], parallel: int) -> list[Any]:
    gate = asyncio.Semaphore(parallel)

    async def one(trial: Callable[[], Awaitable[Any]]) -> Any:
        async with gate:
            return await trial()

    return await asyncio.gather(*(one(trial) for trial in trials))


# ---------------------------------------------------------------- (a) and (b): when does the turn end?


async def end_of_turn_trial(url: str, turn_detection: dict[str, Any], speech: np.ndarray) -> tuple[float, float]:
    session = {"audio": {"input": {"turn_detection": turn_detection}}}
    async with EchoCaller(url, session, noise_dbfs=-60.0) as caller:
        await asyncio.sleep(0.3)
        caller.say(speech)
        stopped_at, _ = await caller.wait_for("input_audio_buffer.speech_stopped", timeout=15)
        created_at, _ = await caller.wait_for("response.created", timeout=15)
        end = caller.ends[-1]
        return (stopped_at - end) * 1000, (created_at - end) * 1000


async def case_a(url: str, trials: int, parallel: int) -> None:
    print("\n(a) complete questions, end of speech -> speech_stopped / response.created")
    voices = speakers()
    speeches = [voice(QUESTIONS[i % len(QUESTIONS)], *next(voices)) for i in range(trials)]
    for label, detection in (
        ("semantic_vad (eagerness auto)", {"type": "semantic_vad"}),
        ("server_vad (500 ms silence)", {"type": "server_vad"}),
    ):
        rows = await bounded([lambda s=s, d=detection: end_of_turn_trial(url, d, s) for s in speeches], parallel)
        print(summary(f"{label}: speech_stopped", [r[0] for r in rows]))
        print(summary(f"{label}: response.created", [r[1] for r in rows]))


async def pause_trial(url: str, turn_detection: dict[str, Any], first: np.ndarray, rest: np.ndarray, pause_s: float):
    session = {"audio": {"input": {"turn_detection": turn_detection}}}
    async with EchoCaller(url, session, noise_dbfs=-60.0) as caller:
        await asyncio.sleep(0.3)
        caller.say(first)
        caller.say(np.zeros(int(pause_s * RATE), np.float32))
        caller.say(rest)
        await caller.wait_for("input_audio_buffer.speech_stopped", timeout=20)
        await asyncio.sleep(0.2)
        stops = caller.of_type("input_audio_buffer.speech_stopped")
        second_onset = caller.onsets[1] if len(caller.onsets) > 1 else float("inf")
        return stops[0][0] < second_onset


async def case_b(url: str, trials: int, parallel: int) -> None:
    print("\n(b) sentences with a 500-900 ms mid-sentence pause: turns cut at the pause")
    voices = speakers()
    rng = np.random.default_rng(2)
    cases = []
    for i in range(trials):
        speaker = next(voices)
        first, rest = PAUSED[i % len(PAUSED)]
        cases.append((voice(first, *speaker), voice(rest, *speaker), float(rng.uniform(0.5, 0.9))))
    for label, detection in (
        ("semantic_vad (eagerness auto)", {"type": "semantic_vad"}),
        ("server_vad (500 ms silence)", {"type": "server_vad"}),
    ):
        cut = await bounded([lambda c=c, d=detection: pause_trial(url, d, *c) for c in cases], parallel)
        print(f"{label:44s} cut {sum(cut)}/{len(cut)} ({100 * sum(cut) / len(cut):.0f} %)")


# ---------------------------------------------------------------- (c), (d), (e): speech over an answer


async def answer_trial(
    url: str,
    echo: Echo | None,
    echo_cancellation: bool,
    interjection: np.ndarray | None,
    seed: int,
) -> dict[str, Any]:
    """Ask a question, let the answer play, optionally interject 1.5 s into it; report what became of the answer."""
    session = {"audio": {"input": {"echo_cancellation": echo_cancellation}}}
    async with EchoCaller(url, session, echo=echo, noise_dbfs=-50.0, seed=seed) as caller:
        await asyncio.sleep(0.3)
        caller.say(voice("Tell me about the weather this week.", "en-us", 170))
        first_at, first = await caller.wait_for("response.output_audio.delta", timeout=20)
        response_id = first["response_id"]
        onset = None
        if interjection is not None:
            await asyncio.sleep(max(0.0, first_at + ANSWER_WAIT_S - time.monotonic()))
            caller.say(interjection)
            while not caller.onsets[1:]:
                await asyncio.sleep(0.01)
            onset = caller.onsets[1]
        done_at, done = await caller.wait_for("response.done", timeout=40, after=first_at)
        deltas = [
            at
            for at, event in caller.events
            if event["type"] == "response.output_audio.delta" and event.get("response_id") == response_id
        ]
        arrivals = np.array(deltas)
        return {
            "paused": bool(arrivals.size > 1 and np.diff(arrivals).max() >= 0.25),
            "status": done["response"]["status"],
            "reason": (done["response"].get("status_details") or {}).get("reason"),
            "onset": onset,
            "stopped_ms": None if onset is None else (max(deltas) - onset) * 1000,
            "done_ms": None if onset is None else (done_at - onset) * 1000,
        }


def interrupted(row: dict[str, Any]) -> bool:
    return row["status"] == "cancelled" and row["reason"] == "turn_detected"


async def case_c(url: str, trials: int, parallel: int) -> None:
    print("\n(c) echo of the agent's answer in the caller's microphone (50-250 ms, -6 to -20 dB, line noise)")
    rng = np.random.default_rng(3)
    echoes = [Echo(float(rng.uniform(50, 250)), float(rng.uniform(-20, -6))) for _ in range(trials)]
    for cancellation in (True, False):
        rows = await bounded(
            [lambda e=e, i=i, c=cancellation: answer_trial(url, e, c, None, i) for i, e in enumerate(echoes)],
            parallel,
        )
        count = sum(interrupted(r) for r in rows)
        paused = sum(r["paused"] and not interrupted(r) for r in rows)
        label = "echo cancellation on (default)" if cancellation else "echo cancellation off"
        print(f"{label:44s} answers cancelled {count}/{len(rows)}, paused and resumed {paused}/{len(rows)}")


async def case_d(url: str, trials: int, parallel: int) -> None:
    print("\n(d) backchannels and noise bursts 1.5 s into an answer (no echo): false barge-ins")
    rng = np.random.default_rng(4)
    voices = speakers()
    sounds = []
    for i in range(trials):
        if i % 3 == 2:
            sounds.append(("noise", noise_burst("door" if i % 2 else "cough", rng)))
        else:
            sounds.append(("backchannel", voice(BACKCHANNELS[i % len(BACKCHANNELS)], *next(voices))))
    rows = await bounded(
        [lambda s=s, i=i: answer_trial(url, None, True, s[1], i) for i, s in enumerate(sounds)], parallel
    )
    for kind in ("backchannel", "noise"):
        picked = [r for r, s in zip(rows, sounds, strict=True) if s[0] == kind]
        count = sum(interrupted(r) for r in picked)
        completed = sum(r["status"] == "completed" for r in picked)
        print(f"{kind + 's':44s} false barge-ins {count}/{len(picked)}, answers completed {completed}/{len(picked)}")


async def case_e(url: str, trials: int, parallel: int) -> None:
    print("\n(e) real barge-ins 1.5 s into an answer (every other one with -10 dB echo at 150 ms), default settings")
    voices = speakers()
    cases = [
        (Echo(150.0, -10.0) if i % 2 else None, voice(INTERRUPTIONS[i % len(INTERRUPTIONS)], *next(voices)))
        for i in range(trials)
    ]
    rows = await bounded(
        [lambda c=c, i=i: answer_trial(url, c[0], True, c[1], i) for i, c in enumerate(cases)], parallel
    )
    detected = [r for r in rows if interrupted(r)]
    print(f"{'detected':44s} {len(detected)}/{len(rows)}")
    print(summary("onset -> last agent audio delta", [r["stopped_ms"] for r in detected]))
    print(summary("onset -> response.done (cancelled)", [r["done_ms"] for r in detected]))


CASES = {"a": case_a, "b": case_b, "c": case_c, "d": case_d, "e": case_e}


async def main_async(args: argparse.Namespace) -> None:
    config = scripted_config(server={"max_sessions": 200})
    with running_server(config, ScriptedEngine(reply=REPLY)) as server:
        for name in args.cases:
            parallel = args.parallel if name in "cd" else args.timing_parallel
            trials = args.echo_trials if name == "c" else args.trials
            await CASES[name](server.ws_url, trials, parallel)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="abcde", help="which cases to run (letters a-e)")
    parser.add_argument("--trials", type=int, default=30, help="trials per case and setting")
    parser.add_argument("--echo-trials", type=int, default=50, help="trials of case c per setting")
    parser.add_argument("--parallel", type=int, default=4, help="concurrent callers in cases c and d")
    parser.add_argument("--timing-parallel", type=int, default=3, help="concurrent callers where latency is measured")
    args = parser.parse_args()
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
