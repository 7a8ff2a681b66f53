"""How the Qwen engines draw text tokens: `generate()`'s processors for the same settings, and never a NaN.

The reference processors are built by transformers' own `generate()` machinery (`_prepare_generation_config`, then
`_get_logits_processor`) from the checkpoint's generation config and the request's overrides, and compared with what
the engine builds for that request.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from tiny_qwen3 import build_tiny_qwen3
from transformers import GenerationConfig, LogitsProcessorList

from omnivox.pipeline.engines.base import (
    AudioPart,
    InvalidRequest,
    Message,
    ResponseRequest,
    SamplingParams,
    TextPart,
)
from omnivox.pipeline.engines.qwen3_omni import Qwen3OmniEngine, pick_tokens, step_generations
from omnivox.pipeline.engines.qwen_common import Sampling, TokenSampler


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Qwen3OmniEngine]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        path = build_tiny_qwen3(tmp_path_factory.mktemp("tiny-qwen3-sampling"))
        loaded = Qwen3OmniEngine(str(path), device="cpu", max_audio_frames=4, talker_temperature=0.0)
        loaded.load()
        yield loaded
    finally:
        torch.set_num_threads(threads)


def _request(**sampling: Any) -> ResponseRequest:
    return ResponseRequest(
        messages=(Message("user", (TextPart("Hello there"),)),),
        output_audio=False,
        sampling=SamplingParams(max_tokens=6, **sampling),
    )


def _generate_kwargs(request: dict[str, Any]) -> dict[str, Any]:
    """A request's overrides as `generate()` arguments: a temperature is OpenAI's greedy (0) / sample (> 0) switch."""
    kwargs = {key: value for key, value in request.items() if key != "temperature"}
    if "temperature" in request:
        temperature = request["temperature"]
        kwargs.update(do_sample=temperature > 0, **({"temperature": temperature} if temperature > 0 else {}))
    return kwargs


CASES = [
    pytest.param({}, {"temperature": 0.8}, id="greedy checkpoint, request samples: generate adds top_k 50"),
    pytest.param({"do_sample": True}, {}, id="checkpoint samples and sets nothing else: transformers defaults"),
    pytest.param(
        {"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.05},
        {},
        id="checkpoint's own settings",
    ),
    pytest.param(
        {"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.8},
        {"temperature": 1.0, "top_p": 0.95},
        id="request overrides some of the checkpoint's",
    ),
    pytest.param({"do_sample": True, "top_k": 20}, {"temperature": 0}, id="temperature 0 is greedy"),
    pytest.param({}, {"top_k": 5, "top_p": 0.5}, id="no temperature keeps a greedy checkpoint greedy"),
]


@pytest.mark.parametrize(("checkpoint", "request_overrides"), CASES)
def test_the_text_processors_are_those_generate_builds_for_the_same_settings(
    engine: Qwen3OmniEngine, checkpoint: dict[str, Any], request_overrides: dict[str, Any]
) -> None:
    thinker = engine.model.thinker
    saved = thinker.generation_config
    thinker.generation_config = GenerationConfig(**checkpoint)
    try:
        engine.install(engine.model, engine.tokenizer)  # reads the checkpoint's generation config
        plan = engine.prepare(_request(**request_overrides))
        config, _ = thinker._prepare_generation_config(None, **_generate_kwargs(request_overrides))
        expected = thinker._get_logits_processor(generation_config=config, input_ids_seq_length=4, device="cpu")
    finally:
        thinker.generation_config = saved
        engine.install(engine.model, engine.tokenizer)
    processors = TokenSampler(plan.text_sampling, None).processors

    assert [type(p).__name__ for p in processors] == [type(p).__name__ for p in expected]
    assert plan.text_sampling.greedy == (not config.do_sample)
    history = torch.tensor([[3, 7, 7, 11]])
    logits = torch.randn(2, 64, generator=torch.Generator().manual_seed(1))
    for row in logits:
        ours = processors(history, row[None].clone())
        theirs = LogitsProcessorList(expected)(history, row[None].clone())
        torch.testing.assert_close(ours, theirs)


def test_integer_and_tiny_temperatures_answer_like_any_other(engine: Qwen3OmniEngine) -> None:
    """An integer temperature (JSON `2`) used to reach transformers' warper, which accepts only floats; 1e-40 made
    logits / temperature overflow to inf and the probabilities NaN."""
    for temperature in (2, 1e-40):
        plan = engine.prepare(_request(temperature=temperature, seed=1))
        generation = engine.make_generation(plan)
        while not generation.finished:
            result = step_generations([generation])[0]
            assert not isinstance(result, BaseException), result
        assert len(generation.text_ids) == 6
    assert engine.prepare(_request(temperature=1e-40)).text_sampling.temperature == 0.01


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), -1.0, 3.0])
def test_a_sampling_value_no_door_would_pass_is_refused_by_the_engine_too(
    engine: Qwen3OmniEngine, temperature: float
) -> None:
    with pytest.raises(InvalidRequest, match="temperature"):
        engine.prepare(_request(temperature=temperature))


def test_audio_with_nan_or_infinite_samples_is_refused_before_it_reaches_the_model(engine: Qwen3OmniEngine) -> None:
    for bad in (np.nan, np.inf):
        pcm = np.zeros(16_000, dtype=np.float32)
        pcm[100] = bad
        request = ResponseRequest(messages=(Message("user", (AudioPart(pcm),)),))
        with pytest.raises(InvalidRequest, match="NaN or infinite"):
            engine._checked_prepare(request)


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")])
def test_samplers_never_hand_multinomial_a_nan(poison: float) -> None:
    """On CUDA a NaN or inf probability is a device-side assert that breaks the context for every later request; on
    the CPU the same input raises. Both samplers turn such scores into a valid distribution first."""
    logits = torch.randn(1, 32, generator=torch.Generator().manual_seed(0))
    logits[0, 3] = poison
    everything = torch.full((1, 32), poison)
    sampler = TokenSampler(Sampling(temperature=0.7, top_k=0), torch.Generator().manual_seed(0))

    for scores in (logits, everything):
        assert 0 <= sampler(scores.clone(), torch.tensor([[1]])) < 32
        picked = pick_tokens(scores.clone(), temperature=0.9, top_k=5, top_p=0.8, generators=(None,))
        assert 0 <= int(picked) < 32
    if poison == float("inf"):
        assert sampler(logits.clone(), torch.tensor([[1]])) == 3  # an infinite score is the certain choice
