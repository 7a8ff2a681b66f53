"""Which decode path a Qwen3-Omni request takes, and that every path says the same (tiny random model, CPU).

The shared slots and the unrolled code predictor build their own attention masks; these tests run them under eager
attention (which adds a mask to the scores) as well as SDPA, check the start-up refusals of combinations that cannot
work, the code predictor's graph plan, and that a long conversation keeps its slot.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from tiny_qwen3 import build_tiny_qwen3
from transformers import PreTrainedTokenizerBase, Qwen3OmniMoeForConditionalGeneration

from omnivox.pipeline.engines import qwen3_omni
from omnivox.pipeline.engines.base import AudioPart, EngineError, Message, ResponseRequest, SamplingParams
from omnivox.pipeline.engines.qwen2_5_omni import Qwen25OmniEngine
from omnivox.pipeline.engines.qwen3_omni import (
    FrameRequest,
    Qwen3Generation,
    Qwen3OmniEngine,
    Qwen3OmniOptions,
    UnrolledCodePredictor,
    check_experts,
    planned_batch_sizes,
    step_generations,
)
from omnivox.pipeline.engines.qwen_common import resolve_attention

FRAMES = 12
GREEDY = {"talker_temperature": 0.0, "talker_repetition_penalty": 1.0}


@dataclass
class Loaded:
    path: Path
    model: Qwen3OmniMoeForConditionalGeneration
    tokenizer: PreTrainedTokenizerBase

    def engine(self, **options: Any) -> Qwen3OmniEngine:
        settings = {"device": "cpu", "max_audio_frames": FRAMES, **GREEDY, **options}
        engine = Qwen3OmniEngine(str(self.path), **settings)
        engine.install(self.model, self.tokenizer)
        return engine


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model gains nothing from more, and loses much when the cores are shared
    try:
        yield build_tiny_qwen3(tmp_path_factory.mktemp("tiny-qwen3-paths"))
    finally:
        torch.set_num_threads(threads)


def _load(path: Path, attention: str) -> Loaded:
    loader = Qwen3OmniEngine(str(path), device="cpu", attn_implementation=attention)
    loader.load()
    assert loader.model.config.thinker_config.text_config._attn_implementation == attention
    return Loaded(path, loader.model, loader.tokenizer)


@pytest.fixture(scope="module")
def eager(checkpoint: Path) -> Loaded:
    return _load(checkpoint, "eager")


@pytest.fixture(scope="module")
def sdpa(checkpoint: Path) -> Loaded:
    return _load(checkpoint, "sdpa")


def _tone(seconds: float, hz: float) -> np.ndarray:
    t = np.arange(int(seconds * 16_000)) / 16_000
    return (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def _request(seconds: float = 1.5, hz: float = 220, max_tokens: int | None = 16) -> ResponseRequest:
    return ResponseRequest(
        messages=(Message("user", (AudioPart(_tone(seconds, hz)),)),),
        instructions="You are a helpful assistant.",
        sampling=SamplingParams(max_tokens=max_tokens),
    )


def _answer(engine: Qwen3OmniEngine, *requests: ResponseRequest) -> list[Qwen3Generation]:
    """The requests answered together, one batched step for all at a time."""
    sessions = [engine.make_generation(engine.prepare(request)) for request in requests]
    while live := [session for session in sessions if not session.finished]:
        for result in step_generations(live):
            assert not isinstance(result, BaseException), result
    return sessions


def _codes(generation: Qwen3Generation) -> torch.Tensor:
    return torch.stack(generation.frames, dim=-1)


# ---------------------------------------------------------------------------------------------- attention
def test_under_eager_attention_the_slots_and_the_unrolled_predictor_say_what_the_growing_caches_say(
    eager: Loaded, sdpa: Loaded
) -> None:
    requests = (_request(), _request(2.5, 330))
    growing = _answer(eager.engine(), *requests)
    batched = _answer(
        eager.engine(static_cache=True, static_cache_tokens=256, max_active=2, cuda_graphs=True), *requests
    )
    under_sdpa = _answer(sdpa.engine(), *requests)

    assert isinstance(batched[0]._engine.code_predictor, UnrolledCodePredictor)
    assert [session.decoding for session in batched] == ["static", "static"]
    for one, other, third in zip(growing, batched, under_sdpa, strict=True):
        assert one.text_ids == other.text_ids == third.text_ids
        assert torch.equal(_codes(one), _codes(other))
        assert torch.equal(_codes(one), _codes(third))


@pytest.mark.parametrize("engine_class", [Qwen3OmniEngine, Qwen25OmniEngine])
def test_flash_attention_with_a_path_that_builds_its_own_masks_is_refused_at_start(engine_class: type) -> None:
    with pytest.raises(EngineError, match=r"flash_attention_2 cannot read .*static_cache.*attn_implementation: sdpa"):
        engine_class("unused", device="cpu", attn_implementation="flash_attention_2", static_cache=True)
    if engine_class is Qwen3OmniEngine:
        with pytest.raises(EngineError, match=r"flash_attention_2 cannot read .*cuda_graphs"):
            engine_class("unused", device="cpu", attn_implementation="flash_attention_2", cuda_graphs=True)


def test_auto_attention_picks_sdpa_when_a_path_builds_its_own_masks(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else real_find_spec(name, *a)
    )
    cuda = torch.device("cuda")

    assert resolve_attention("auto", cuda, torch.bfloat16, engine="test") == "flash_attention_2"
    assert resolve_attention("auto", cuda, torch.bfloat16, engine="test", own_masks=("static_cache",)) == "sdpa"


def test_experts_kernels_that_cannot_work_are_refused_before_loading() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    graphed = Qwen3OmniOptions(static_cache=True, cuda_graphs=True, experts_implementation="eager")

    with pytest.raises(EngineError, match="experts_implementation eager picks its experts on the host"):
        check_experts(graphed, cuda, falls_back=lambda device: False)
    with pytest.raises(EngineError, match=r"grouped_mm has no kernel .* torch >= 2\.9 .* batched_mm"):
        check_experts(Qwen3OmniOptions(), cuda, falls_back=lambda device: True)
    with pytest.raises(EngineError, match="experts_implementation must be one of"):
        check_experts(Qwen3OmniOptions(experts_implementation="fast"), cpu)
    check_experts(graphed, cpu)  # nothing is captured off CUDA
    check_experts(Qwen3OmniOptions(experts_implementation="batched_mm", cuda_graphs=True), cuda, lambda d: True)
    check_experts(Qwen3OmniOptions(cuda_graphs=True, experts_implementation="eager"), cuda, lambda d: False)
    with pytest.raises(EngineError, match="experts_implementation must be one of"):
        Qwen3OmniEngine("unused", device="cpu", experts_implementation="fast")


# ---------------------------------------------------------------------------------------------- predictor graphs
class EagerGraph:
    """Stands in for a captured CUDA graph on the CPU: static padded buffers, and the frame run on them at replay."""

    built: ClassVar[list[int]] = []
    fail_at: ClassVar[int | None] = None

    @staticmethod
    def memory_pool() -> None:
        return None

    def __init__(self, predictor: UnrolledCodePredictor, rows: int, pool: Any) -> None:
        if rows == EagerGraph.fail_at:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing (simulated)")
        EagerGraph.built.append(rows)
        self._predictor, self.rows = predictor, rows
        width = predictor.talker.get_input_embeddings().embedding_dim
        self._hidden = torch.zeros(rows, 1, width)
        self._first_codes = torch.zeros(rows, dtype=torch.long)

    def replay(self, hidden: torch.Tensor, first_codes: torch.Tensor, noise: Any) -> tuple[torch.Tensor, torch.Tensor]:
        rows = hidden.shape[0]
        self._hidden[:rows] = hidden
        self._first_codes[:rows] = first_codes
        codes, sums = self._predictor.frame(self._hidden, self._first_codes, None)
        return codes[:rows], sums[:rows]


def test_predictor_graph_sizes_are_planned_to_cover_every_batch() -> None:
    assert planned_batch_sizes(1) == (1,)
    assert planned_batch_sizes(6) == (1, 2, 4, 6)
    assert planned_batch_sizes(16) == (1, 2, 4, 8, 16)
    for largest in range(1, 20):
        sizes = planned_batch_sizes(largest)
        assert all(any(size >= batch for size in sizes) for batch in range(1, largest + 1))
        assert max(sizes) == largest and len(sizes) <= largest.bit_length() + 1


@torch.inference_mode()
def test_predictor_graphs_are_all_captured_at_start_and_padded_batches_give_the_same_frames(
    sdpa: Loaded, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(qwen3_omni, "_PredictorGraph", EagerGraph)
    monkeypatch.setattr(EagerGraph, "built", [])
    predictor = UnrolledCodePredictor(sdpa.model.talker, sdpa.engine().options.talker_sampling)
    generator = torch.Generator().manual_seed(0)
    width = sdpa.model.talker.get_input_embeddings().embedding_dim
    requests = [
        FrameRequest(torch.randn(1, 1, width, generator=generator), torch.tensor([code])) for code in (5, 9, 17)
    ]
    eager_codes, eager_sums = predictor(requests, [None] * 3)

    predictor.capture_graphs(6)
    captured = list(EagerGraph.built)
    codes, sums = predictor(requests, [None] * 3)  # three rows run in the graph of four

    assert captured == [1, 2, 4, 6] and predictor.graph_sizes == (1, 2, 4, 6)
    assert EagerGraph.built == captured  # nothing captured during traffic
    assert torch.equal(codes, eager_codes)
    torch.testing.assert_close(sums, eager_sums)


@torch.inference_mode()
def test_a_failed_predictor_capture_is_logged_and_the_predictor_runs_eagerly(
    sdpa: Loaded, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(qwen3_omni, "_PredictorGraph", EagerGraph)
    monkeypatch.setattr(EagerGraph, "fail_at", 4)
    predictor = UnrolledCodePredictor(sdpa.model.talker, sdpa.engine().options.talker_sampling)
    width = sdpa.model.talker.get_input_embeddings().embedding_dim
    requests = [FrameRequest(torch.ones(1, 1, width), torch.tensor([code])) for code in (3, 4)]
    expected = predictor(requests, [None] * 2)

    with caplog.at_level(logging.ERROR):
        predictor.capture_graphs(8)

    assert predictor.graph_sizes == ()
    assert "running it eagerly" in caplog.text and "simulated" in caplog.text
    assert torch.equal(predictor(requests, [None] * 2)[0], expected[0])


# ---------------------------------------------------------------------------------------------- slot budget
def test_a_long_conversation_keeps_its_slot_and_an_answer_that_outgrows_it_goes_on_unchanged(sdpa: Loaded) -> None:
    """With no answer limit the engine used to reserve `max_text_tokens` (1024) in the slot, so a prompt within a few
    turns of `static_cache_tokens` was decoded eagerly. Now the prompt only has to fit: the answer decodes in the
    batch and, once the slot is full, goes on on a growing cache of its own with the same tokens."""
    request = _request(max_tokens=None)
    prompt = sdpa.engine().prepare(request).inputs.prompt_tokens
    reference = _answer(sdpa.engine(max_text_tokens=24), request)[0]
    engine = sdpa.engine(max_text_tokens=24, static_cache=True, static_cache_tokens=prompt + 8, max_active=2)

    answered = _answer(engine, request)[0]

    assert answered.decoding == "static"
    assert len(reference.text_ids) > 9  # so the answer really outgrew the 8 tokens of room
    assert answered.text_ids == reference.text_ids
    assert torch.equal(_codes(answered), _codes(reference))
    assert engine.static_cache_fallbacks == {"thinker_outgrew_slot": 1}
    assert engine.slots is not None and engine.slots.thinker.free_slots == 2


def test_a_prompt_that_does_not_fit_decodes_eagerly_and_is_counted(sdpa: Loaded) -> None:
    request = _request()
    prompt = sdpa.engine().prepare(request).inputs.prompt_tokens
    engine = sdpa.engine(static_cache=True, static_cache_tokens=prompt, max_active=1)

    answered = _answer(engine, request)[0]

    assert answered.decoding == "eager"
    assert engine.static_cache_fallbacks == {"thinker_prompt_too_long": 1}
