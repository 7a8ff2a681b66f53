"""Latency of a Qwen-Omni engine next to the stock `generate()`, measured in the same process.

    python benchmarks/engine_latency.py --model qwen2.5-omni --tiny                      # CPU, seconds
    python benchmarks/engine_latency.py --model qwen2.5-omni --random-weights --size 7b  # GPU, checkpoint-size compute
    python benchmarks/engine_latency.py --model qwen2.5-omni --weights Qwen/Qwen2.5-Omni-7B
    ... --option dit_steps=5 --option dit_dtype=bfloat16 --option first_chunk_codes=24
    ... --option static_cache=true --option cuda_graphs=true
    python benchmarks/engine_latency.py --model qwen3-omni --tiny --codes 30         # --codes: 80 ms frames
    python benchmarks/engine_latency.py --model qwen3-omni --random-weights --codes 62 --option cuda_graphs=true

Prints: thinker prefill and per-step times (thinker, talker, DiT call, vocoder chunk), engine first-audio latency
(request handed to the engine -> first PCM, feature extraction included), real-time factor, playback gaps, and the
number of concurrent sessions that stay at real time with no output underrun; then `generate()` on the same turn.

Random weights give the checkpoint's FLOPs and bytes but meaningless tokens, so every run decodes a fixed answer
length: text and codec stop ids are blocked and the answer ends at `--text-tokens` / `--codes`. A model plugs in by
adding a `ModelBench` to `MODELS`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "engines"))  # the tiny checkpoint builders

from omnivox.pipeline.engines.base import (
    AudioDelta,
    AudioPart,
    Message,
    ResponseRequest,
    SamplingParams,
    TextDelta,
    TextPart,
)
from omnivox.pipeline.engines.qwen_common import QwenOmniEngine

OUTPUT_RATE = 24_000


# ---------------------------------------------------------------------------------------------- timing helpers
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ModuleTimer:
    """Wall time of every forward call of some modules (synchronised on CUDA), keyed by a label."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.calls: dict[str, list[float]] = defaultdict(list)
        self._handles: list[Any] = []
        self._started: dict[str, float] = {}

    def watch(self, label: str, module: torch.nn.Module, last: torch.nn.Module | None = None) -> None:
        """Time each call of `module`, or from its start to the end of `last` (a span of calls)."""

        def before(*_: Any) -> None:
            synchronize(self.device)
            self._started[label] = time.perf_counter()

        def after(*_: Any) -> None:
            synchronize(self.device)
            self.calls[label].append(time.perf_counter() - self._started[label])

        self._handles += [module.register_forward_pre_hook(before), (last or module).register_forward_hook(after)]

    def reset(self) -> None:
        self.calls.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class StepTimer:
    """Times every generation step of an engine; `quiet` keeps the steps that produced no audio (no vocoder work),
    i.e. one thinker plus one talker decode step, whether eager or replayed from a CUDA graph."""

    def __init__(self, engine: QwenOmniEngine) -> None:
        self._engine = engine
        self._make_generation = engine.make_generation
        self.quiet: list[float] = []
        device = engine.runtime.device  # type: ignore[attr-defined]

        def timed_generation(prepared: Any) -> Any:
            generation = self._make_generation(prepared)
            step = generation.step

            def timed_step() -> list[Any]:
                synchronize(device)
                started = time.perf_counter()
                deltas = step()
                synchronize(device)
                if not any(isinstance(delta, AudioDelta) for delta in deltas):
                    self.quiet.append(time.perf_counter() - started)
                return deltas

            generation.step = timed_step
            return generation

        engine.make_generation = timed_generation  # type: ignore[method-assign]

    def reset(self) -> None:
        self.quiet = []

    def remove(self) -> None:
        self._engine.make_generation = self._make_generation  # type: ignore[method-assign]


@dataclass
class Turn:
    """What one request produced, with arrival times relative to the request."""

    first_text: float | None = None
    chunks: list[tuple[float, float]] = field(default_factory=list)
    """(arrival s, audio s) per audio delta."""
    done: float = 0.0

    @property
    def first_audio(self) -> float | None:
        return self.chunks[0][0] if self.chunks else None

    @property
    def audio_seconds(self) -> float:
        return sum(seconds for _, seconds in self.chunks)

    def gaps(self) -> tuple[float, int]:
        """Total underrun and the number of gaps when playback starts at the first chunk."""
        if not self.chunks:
            return 0.0, 0
        playhead, total, count = self.chunks[0][0], 0.0, 0
        for arrival, seconds in self.chunks:
            if arrival > playhead + 1e-6:
                total, count, playhead = total + arrival - playhead, count + 1, arrival
            playhead += seconds
        return total, count


async def timed_turn(engine: QwenOmniEngine, request: ResponseRequest) -> Turn:
    turn = Turn()
    started = time.perf_counter()
    async for delta in engine.respond(request):
        now = time.perf_counter() - started
        if isinstance(delta, TextDelta) and turn.first_text is None:
            turn.first_text = now
        elif isinstance(delta, AudioDelta):
            turn.chunks.append((now, len(delta.pcm) / OUTPUT_RATE))
    turn.done = time.perf_counter() - started
    return turn


# ---------------------------------------------------------------------------------------------- models
class ModelBench(Protocol):
    """One engine family: how to build it with tiny, random or real weights, and how to run its stock path."""

    def build(self, args: argparse.Namespace, options: dict[str, Any]) -> QwenOmniEngine: ...

    def watch(self, engine: QwenOmniEngine, timer: ModuleTimer) -> None:
        """Register the modules whose per-call time is reported."""

    def stage_lines(self, calls: dict[str, list[float]]) -> list[str]:
        """Report lines for the model's own stages (talker, vocoder) from the watched calls."""

    def stock_generate(self, engine: QwenOmniEngine, request: ResponseRequest, args: argparse.Namespace) -> float:
        """Run `generate()` on the request; returns the seconds of audio it produced."""


class Qwen25Bench:
    """Qwen2.5-Omni: tiny checkpoint, random weights at 7B/3B size, or a real checkpoint."""

    def build(self, args: argparse.Namespace, options: dict[str, Any]) -> QwenOmniEngine:
        from omnivox.pipeline.engines.qwen2_5_omni import Qwen25OmniEngine

        fixed = {"max_text_tokens": args.text_tokens, "max_audio_codes": args.codes, **options}
        if args.weights:
            return with_fixed_length(Qwen25OmniEngine(args.weights, **fixed))
        if args.tiny:
            from tiny_models import build_tiny_qwen2_5

            directory = build_tiny_qwen2_5(Path(tempfile.mkdtemp(prefix="tiny-qwen2.5-omni-")))
            return with_fixed_length(Qwen25OmniEngine(str(directory), **fixed))
        return with_fixed_length(random_weights_engine(args.size, **fixed))

    def watch(self, engine: QwenOmniEngine, timer: ModuleTimer) -> None:
        model = engine.model  # type: ignore[attr-defined]
        timer.watch("thinker", model.thinker)  # its first call is the prefill
        timer.watch("audio encoder", model.thinker.model.audio_tower)
        timer.watch("thinker LM", model.thinker.model.language_model)  # every decode step, eager or static
        if model.has_talker:
            timer.watch("talker LM", model.talker.model)
            dit = model.token2wav.code2wav_dit_model
            timer.watch("DiT call", dit.time_embed, last=dit.proj_out)  # one velocity (DitSolver.velocity)
            timer.watch("BigVGAN", model.token2wav.code2wav_bigvgan_model)

    def stage_lines(self, calls: dict[str, list[float]]) -> list[str]:
        if not calls.get("talker LM"):
            return []
        dit_per_chunk = len(calls["DiT call"]) / max(len(calls["BigVGAN"]), 1)
        return [
            f"talker prefill                        {calls['talker LM'][0] * 1000:8.1f} ms",
            f"talker step                           {median_ms(calls['talker LM'][1:])}",
            f"DiT call ({dit_per_chunk:.0f} per chunk)              {median_ms(calls['DiT call'])}",
            f"BigVGAN per chunk                     {median_ms(calls['BigVGAN'])}",
        ]

    def stock_generate(self, engine: QwenOmniEngine, request: ResponseRequest, args: argparse.Namespace) -> float:
        from transformers import LogitsProcessorList

        model, plan = engine.model, engine.prepare(request)  # type: ignore[attr-defined]
        with torch.inference_mode():
            _, wav = model.generate(
                **plan.inputs.tensors(engine.runtime.device, engine.runtime.dtype),  # type: ignore[attr-defined]
                speaker=plan.speaker,
                thinker_max_new_tokens=args.text_tokens,
                thinker_do_sample=False,
                thinker_min_new_tokens=args.text_tokens,
                talker_max_new_tokens=args.codes,
                talker_min_new_tokens=args.codes,
                talker_do_sample=False,
                talker_logits_processor=LogitsProcessorList([engine.codebook_guard]),  # type: ignore[attr-defined]
            )
        return wav.numel() / OUTPUT_RATE


def random_weights_engine(size: str, **options: Any) -> QwenOmniEngine:
    """The engine with checkpoint-size random weights built directly on the device (nothing is downloaded)."""
    from tiny_models import build_tokenizer, full_size_config, random_qwen2_5

    from omnivox.pipeline.engines.qwen2_5_omni import Qwen25OmniEngine

    class RandomQwen25(Qwen25OmniEngine):
        def load_weights(self) -> tuple[Any, Any]:
            tokenizer = build_tokenizer()
            config = full_size_config(tokenizer, size)
            return random_qwen2_5(config, tokenizer, self.runtime.device, self.runtime.dtype), tokenizer

    return RandomQwen25(f"random-qwen2.5-omni-{size}", **options)


def with_fixed_length(engine: QwenOmniEngine) -> QwenOmniEngine:
    """Block the text and codec stop ids once loaded, so every run decodes the same answer length."""
    install = engine.install  # type: ignore[attr-defined]

    def install_without_stops(model: Any, tokenizer: Any) -> None:
        install(model, tokenizer)
        engine.text_eos_ids = frozenset()  # type: ignore[attr-defined]
        if model.has_talker:
            from omnivox.pipeline.engines.qwen2_5_omni import CodebookGuard

            engine.codec_stop_ids = ()  # type: ignore[attr-defined]
            engine.codebook_guard = CodebookGuard(model.config.token2wav_config.dit_config.num_embeds, ())  # type: ignore[attr-defined]

    engine.install = install_without_stops  # type: ignore[attr-defined]
    return engine


class Qwen3Bench:
    """Qwen3-Omni: tiny checkpoint, random weights at 30B-A3B size, or a real checkpoint. `--codes` counts codec
    frames (80 ms each); answers run to their length limits through the engine's `ignore_eos` switch."""

    def build(self, args: argparse.Namespace, options: dict[str, Any]) -> QwenOmniEngine:
        from omnivox.pipeline.engines.qwen3_omni import Qwen3OmniEngine

        fixed = {"max_text_tokens": args.text_tokens, "max_audio_frames": args.codes, "ignore_eos": True, **options}
        if args.weights:
            return Qwen3OmniEngine(args.weights, **fixed)
        if args.tiny:
            from tiny_qwen3 import build_tiny_qwen3

            directory = build_tiny_qwen3(Path(tempfile.mkdtemp(prefix="tiny-qwen3-omni-")))
            return Qwen3OmniEngine(str(directory), **fixed)

        class RandomQwen3(Qwen3OmniEngine):
            def load_weights(self) -> tuple[Any, Any]:
                from tiny_qwen3 import build_tokenizer, full_size_config, random_qwen3

                tokenizer = build_tokenizer()
                return random_qwen3(full_size_config(tokenizer), self.runtime.device, self.runtime.dtype), tokenizer

        return RandomQwen3("random-qwen3-omni-30b-a3b", **fixed)

    def watch(self, engine: QwenOmniEngine, timer: ModuleTimer) -> None:
        model = engine.model  # type: ignore[attr-defined]
        timer.watch("thinker", model.thinker)  # its first call is the prefill
        timer.watch("audio encoder", model.thinker.model.audio_tower)
        timer.watch("thinker LM", model.thinker.model.language_model)
        if model.has_talker:
            timer.watch("talker LM", model.talker.model)
            timer.watch("code predictor", engine.code_predictor)  # type: ignore[attr-defined]  # 15 passes a frame
            code2wav = model.code2wav  # decode_window: the code embedding first, the output convolution last
            timer.watch("code2wav", code2wav.code_embedding, last=code2wav.decoder[-1])

    def stage_lines(self, calls: dict[str, list[float]]) -> list[str]:
        if not calls.get("talker LM"):
            return []
        return [
            f"talker prefill                        {calls['talker LM'][0] * 1000:8.1f} ms",
            f"talker step                           {median_ms(calls['talker LM'][1:])}",
            f"code predictor (15 passes a frame)    {median_ms(calls['code predictor'])}",
            f"code2wav call                         {median_ms(calls['code2wav'])}",
        ]

    def stock_generate(self, engine: QwenOmniEngine, request: ResponseRequest, args: argparse.Namespace) -> float:
        model, plan = engine.model, engine.prepare(request)  # type: ignore[attr-defined]
        speakers = model.config.talker_config.speaker_id
        speaker = next(name for name, index in speakers.items() if index == plan.speaker_id)
        with torch.inference_mode():
            _, wav = model.generate(
                **plan.inputs.tensors(engine.runtime.device, engine.runtime.dtype),  # type: ignore[attr-defined]
                speaker=speaker,
                thinker_max_new_tokens=args.text_tokens,
                thinker_min_new_tokens=args.text_tokens,
                thinker_do_sample=False,
                thinker_eos_token_id=sorted(engine.text_eos_ids),  # type: ignore[attr-defined]
                talker_max_new_tokens=args.codes + 1,  # N talker tokens make N-1 complete frames
                talker_min_new_tokens=args.codes + 1,
                talker_do_sample=False,
            )
        return wav.numel() / OUTPUT_RATE


MODELS: dict[str, Callable[[], ModelBench]] = {"qwen2.5-omni": Qwen25Bench, "qwen3-omni": Qwen3Bench}


# ---------------------------------------------------------------------------------------------- the run
def user_turn(seconds: float, earlier_turns: int = 0) -> ResponseRequest:
    """One user audio turn, after `earlier_turns` exchanges of the same audio and a 30-word spoken answer."""
    t = np.arange(int(seconds * 16_000)) / 16_000
    noise = np.random.default_rng(0).standard_normal(t.shape)
    audio = (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * noise).astype(np.float32)
    user = Message("user", (AudioPart(audio),))
    answer = Message("assistant", (TextPart(" ".join(["word"] * 30)),))
    return ResponseRequest(
        messages=(*[user, answer] * earlier_turns, user), sampling=SamplingParams(temperature=0.0, seed=0)
    )


@contextmanager
def timing(label: str, sink: dict[str, float], device: torch.device) -> Iterator[None]:
    synchronize(device)
    started = time.perf_counter()
    yield
    synchronize(device)
    sink[label] = time.perf_counter() - started


def median_ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:8.1f} ms (n={len(values)})" if values else "       -"


async def run(args: argparse.Namespace) -> dict[str, Any]:
    bench = MODELS[args.model]()
    options = {
        "device": args.device,
        "max_active": max(args.sessions),
        **{k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in args.option)},
    }
    engine = bench.build(args, options)
    device = engine.runtime.device  # type: ignore[attr-defined]
    results: dict[str, Any] = {"model": args.model, "options": options, "device": describe(device)}
    started = time.perf_counter()
    await engine.start()
    results["load_s"] = time.perf_counter() - started
    request = user_turn(args.seconds)
    print(f"# {args.model} on {results['device']}; load {results['load_s']:.1f} s; options {options}")
    print(f"# user turn {args.seconds:.1f} s of audio; answer {args.text_tokens} text tokens, {args.codes} codes")

    for _ in range(args.warmup):
        await timed_turn(engine, request)
    steps = StepTimer(engine)
    timer = ModuleTimer(device)
    bench.watch(engine, timer)
    runs = []
    for _ in range(args.reps):
        timer.reset()
        steps.reset()
        runs.append((await timed_turn(engine, request), dict(timer.calls), list(steps.quiet)))
    timer.remove()
    steps.remove()
    turn, calls, quiet_steps = sorted(runs, key=lambda run: run[0].first_audio or 0.0)[len(runs) // 2]
    gap_total, gap_count = turn.gaps()
    preparations = []
    for _ in range(args.reps):
        prepare_started = time.perf_counter()
        engine.prepare(request)  # type: ignore[attr-defined]
        preparations.append(time.perf_counter() - prepare_started)
    print("\n## engine, one session (median run; CUDA-graph replays are invisible to the per-module hooks)")
    print(f"prompt and audio features (CPU)       {median_ms(preparations)}")
    print(f"thinker prefill (incl. audio encoder) {calls['thinker'][0] * 1000:8.1f} ms")
    print(f"audio encoder                         {median_ms(calls['audio encoder'])}")
    print(f"thinker step                          {median_ms(calls['thinker LM'][1:])}")
    print(f"engine step without vocoder work      {median_ms(quiet_steps)}")
    for line in bench.stage_lines(calls):
        print(line)
    audio_s = turn.audio_seconds
    rtf = turn.done / audio_s if audio_s else float("nan")
    print(f"first text                            {(turn.first_text or 0) * 1000:8.1f} ms")
    print(f"first audio (request -> first PCM)    {(turn.first_audio or 0) * 1000:8.1f} ms")
    print(f"whole answer                          {turn.done:8.2f} s for {audio_s:.2f} s of audio, RTF {rtf:.2f}")
    print(f"playback gaps after first audio       {gap_total * 1000:8.1f} ms in {gap_count} gap(s)")
    results["single"] = {
        "first_audio_s": turn.first_audio,
        "first_text_s": turn.first_text,
        "total_s": turn.done,
        "audio_s": audio_s,
        "rtf": rtf,
        "gap_s": gap_total,
        "gaps": gap_count,
        "module_ms": {label: statistics.median(v) * 1000 for label, v in calls.items() if v},
        "quiet_step_ms": statistics.median(quiet_steps) * 1000 if quiet_steps else None,
        "thinker_prefill_ms": calls["thinker"][0] * 1000,
        "prepare_ms": statistics.median(preparations) * 1000,
    }

    results["with_transcript"] = await with_transcript(engine, request, args.reps)
    results["concurrency"] = await concurrency(engine, request, args.sessions)
    results["history"] = await history_cost(engine, bench, args)

    print("\n## stock generate(), same turn")
    timings: dict[str, float] = {}
    for _ in range(args.reps):
        with timing("generate", timings, device):
            generated_audio = bench.stock_generate(engine, request, args)
    print(f"generate() total = first audio        {timings['generate']:8.2f} s for {generated_audio:.2f} s of audio")
    results["generate"] = {"total_s": timings["generate"], "audio_s": generated_audio}
    await engine.close()
    return results


async def history_cost(engine: QwenOmniEngine, bench: ModelBench, args: argparse.Namespace) -> list[dict[str, Any]]:
    """What a longer conversation costs the thinker prefill and the first audio: encoded whole every turn, and
    continued from the previous turn's stored prompt (engines with `prefix_cache_sessions`)."""
    print("\n## multi-turn: the conversation encoded whole, and continued from the previous turn's prompt")
    print("earlier turns  prompt tokens  whole: prefill  first audio  continued: prefill  first audio")
    rows = []
    for earlier in args.history:
        request = user_turn(args.seconds, earlier)
        prompt_tokens = engine.prepare(request).inputs.prompt_tokens  # type: ignore[attr-defined]
        whole = await timed_prefill(engine, bench, request)
        continued = None
        if earlier and engine.prefixes.capacity:
            conversation = f"bench-{earlier}"
            await timed_turn(engine, replace(user_turn(args.seconds, earlier - 1), conversation_id=conversation))
            continued = await timed_prefill(engine, bench, replace(request, conversation_id=conversation))
            engine.forget_conversation(conversation)
        shown = f"{continued[0] * 1000:12.1f} ms  {continued[1] * 1000:8.1f} ms" if continued else "           -"
        print(f"{earlier:13d}  {prompt_tokens:13d}  {whole[0] * 1000:11.1f} ms  {whole[1] * 1000:8.1f} ms  {shown}")
        rows.append(
            {
                "earlier_turns": earlier,
                "prompt_tokens": prompt_tokens,
                "prefill_s": whole[0],
                "first_audio_s": whole[1],
                "continued_prefill_s": continued[0] if continued else None,
                "continued_first_audio_s": continued[1] if continued else None,
            }
        )
    return rows


async def timed_prefill(engine: QwenOmniEngine, bench: ModelBench, request: ResponseRequest) -> tuple[float, float]:
    """(thinker prefill, first audio) of one turn, in seconds."""
    timer = ModuleTimer(engine.runtime.device)  # type: ignore[attr-defined]
    bench.watch(engine, timer)
    turn = await timed_turn(engine, request)
    timer.remove()
    return timer.calls["thinker"][0], turn.first_audio or 0.0


async def with_transcript(engine: QwenOmniEngine, request: ResponseRequest, reps: int) -> dict[str, float]:
    """First audio when the caller's transcript is requested at the same moment, as a Realtime session with input
    transcription does at every turn (the transcript is background work on the same GPU)."""
    audio = next(part.pcm for message in request.messages for part in message.parts if isinstance(part, AudioPart))
    firsts, transcripts = [], []
    for _ in range(reps):
        started = time.perf_counter()
        transcript = asyncio.create_task(engine.transcribe(audio))  # type: ignore[attr-defined]
        turn = await timed_turn(engine, request)
        await transcript
        firsts.append(turn.first_audio or 0.0)
        transcripts.append(time.perf_counter() - started)
    first, done = statistics.median(firsts), statistics.median(transcripts)
    print("\n## one session with its caller transcript requested at the same time")
    print(f"first audio                           {first * 1000:8.1f} ms; transcript done after {done * 1000:.0f} ms")
    return {"first_audio_s": first, "transcript_s": done}


async def concurrency(engine: QwenOmniEngine, request: ResponseRequest, counts: list[int]) -> list[dict[str, Any]]:
    """N sessions at once through the engine's worker; a count passes when no session's playback underruns."""
    print("\n## concurrent sessions (one worker; one batched step for all with static_cache, else interleaved)")
    print("sessions  first audio p50/max    worst gap    aggregate RTF  real time")
    rows = []
    for count in counts:
        started = time.perf_counter()
        turns = await asyncio.gather(*(timed_turn(engine, request) for _ in range(count)))
        wall = time.perf_counter() - started
        firsts = [t.first_audio or 0.0 for t in turns]
        worst_gap = max(t.gaps()[0] for t in turns)
        audio = sum(t.audio_seconds for t in turns)
        real_time = worst_gap < 0.02
        print(
            f"{count:8d}  {statistics.median(firsts) * 1000:7.0f} / {max(firsts) * 1000:6.0f} ms"
            f"  {worst_gap * 1000:8.0f} ms  {wall / (audio / count):13.2f}  {'yes' if real_time else 'no'}"
        )
        rows.append({"sessions": count, "first_audio_s": firsts, "worst_gap_s": worst_gap, "real_time": real_time})
    sustained = max((row["sessions"] for row in rows if row["real_time"]), default=0)
    print(f"sessions sustained at real time (no underrun): {sustained}")
    return rows


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    threads = torch.get_num_threads()
    return f"CPU {platform.processor() or platform.machine()}, {threads} threads (torch {torch.__version__})"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="qwen2.5-omni")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tiny", action="store_true", help="tiny random checkpoint (CPU tests size)")
    source.add_argument("--random-weights", action="store_true", help="checkpoint-size random weights (GPU)")
    source.add_argument("--weights", help="hub id or local directory of a real checkpoint")
    parser.add_argument("--size", choices=["7b", "3b"], default="7b")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of the user's audio turn")
    parser.add_argument("--text-tokens", type=int, default=40)
    parser.add_argument(
        "--codes", type=int, default=250, help="codec codes per answer (Qwen2.5: 20 ms each; Qwen3: frames, 80 ms each)"
    )
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--sessions", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8])
    parser.add_argument("--history", type=lambda s: [int(x) for x in s.split(",")], default=[0, 4, 16])
    parser.add_argument("--option", action="append", default=[], help="engine option key=value (YAML value)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = asyncio.run(run(args))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
