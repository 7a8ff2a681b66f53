"""The Qwen2.5-Omni engine at the 7B checkpoint's widths (one or two layers per stack, random weights): the tiny
models are 32 wide everywhere, so a dimension mixed up between two stacks would pass there and fail only here.

The model (about 1.1 B parameters, 4.5 GB in float32) is built once for this module and freed after it.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from test_qwen2_5_omni import (
    AS_GENERATE,
    GREEDY,
    SAMPLES_PER_CODE,
    pcm_of,
    run_to_end,
    talker_reference_with_mask,
    tone,
)
from tiny_models import OnlyCodes, build_tokenizer, full_size_config, random_qwen2_5
from transformers import LogitsProcessorList, PreTrainedTokenizerBase, Qwen2_5OmniForConditionalGeneration

from omnivox.pipeline.engines.base import AudioPart, ImagePart, Message, ResponseRequest, SamplingParams
from omnivox.pipeline.engines.qwen2_5_omni import Qwen25OmniEngine
from omnivox.pipeline.engines.qwen2_5_token2wav import DitSolver, Token2WavStream
from tests.image_fixtures import png_image

pytestmark = pytest.mark.slow

TEXT_TOKENS = 8
CODES = 30
LIMITS = {
    "device": "cpu",
    "max_text_tokens": TEXT_TOKENS,
    "max_audio_codes": CODES,
    "dit_steps": 2,
    "system_prompt": "",
}
"""Widths are what is tested here, and CPU time is short: two ODE steps (each is a DiT pass over every window), and
no system prompt (the byte-level test tokenizer spells the official one in 160 tokens, each a 7B-wide prefill)."""


class RealWidth:
    """The shallow full-width model and its tokenizer; `engine()` installs it in an engine with some options."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.tokenizer: PreTrainedTokenizerBase = build_tokenizer()
        self.model: Qwen2_5OmniForConditionalGeneration = random_qwen2_5(
            full_size_config(self.tokenizer, shallow=True), self.tokenizer
        )

    def engine(self, **options: Any) -> Qwen25OmniEngine:
        engine = Qwen25OmniEngine("random-qwen2.5-omni-7b-shallow", **{**LIMITS, **options})
        engine.install(self.model, self.tokenizer)
        return engine


@pytest.fixture(scope="module")
def real() -> Iterator[RealWidth]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see tests/conftest.py: more threads only fight the other tests on two cores
    model = RealWidth()
    try:
        yield model
    finally:
        del model
        gc.collect()
        torch.set_num_threads(threads)


def test_the_shallow_model_has_the_7b_widths(real: RealWidth) -> None:
    config = real.model.config
    text, talker = config.thinker_config.text_config, config.talker_config
    assert (text.hidden_size, text.num_attention_heads, text.num_key_value_heads, text.vocab_size) == (
        3584,
        28,
        4,
        152064,
    )
    assert text.rope_parameters["mrope_section"] == [16, 24, 24]
    assert (talker.hidden_size, talker.num_attention_heads, talker.head_dim, talker.vocab_size) == (896, 12, 128, 8448)
    assert config.token2wav_config.dit_config.hidden_size == 1024
    assert config.token2wav_config.bigvgan_config.upsample_initial_channel == 1536


def test_streamed_text_and_codes_equal_generate(real: RealWidth) -> None:
    engine = real.engine(**AS_GENERATE)
    request = ResponseRequest(messages=(Message("user", (AudioPart(tone(1.0)),)),))
    plan = engine.prepare(request)
    generation, deltas = run_to_end(engine, request)
    vocoder_inputs: list[torch.Tensor] = []
    hook = real.model.token2wav.register_forward_pre_hook(lambda _module, args: vocoder_inputs.append(args[0]))
    try:
        sequences, _ = real.model.generate(
            **plan.inputs.tensors(torch.device("cpu"), torch.float32),
            speaker="Chelsie",
            thinker_max_new_tokens=TEXT_TOKENS,
            thinker_do_sample=False,
            thinker_eos_token_id=sorted(engine.text_eos_ids),
            talker_max_new_tokens=CODES,
            talker_do_sample=False,
            talker_repetition_penalty=1.0,
            talker_logits_processor=LogitsProcessorList([OnlyCodes()]),
            token2wav_num_steps=2,
        )
    finally:
        hook.remove()

    assert generation.text_ids == sequences[0, plan.inputs.prompt_tokens :].tolist()
    assert generation.codes == vocoder_inputs[0][0].tolist()
    assert len(pcm_of(deltas)) == SAMPLES_PER_CODE * len(generation.codes) > 0


def test_the_production_talker_on_static_slots_with_an_image_equals_the_reference(real: RealWidth) -> None:
    engine = real.engine(static_cache=True, static_cache_tokens=512, max_active=2, **GREEDY)
    parts = (ImagePart(png_image(60, 90)), AudioPart(tone(1.0)))
    request = ResponseRequest(messages=(Message("user", parts),), sampling=SamplingParams(temperature=0.0))
    text_ids, codes = talker_reference_with_mask(engine, request, text_tokens=TEXT_TOKENS, codes=CODES)
    generation, deltas = run_to_end(engine, request)

    assert generation.decoding == "static"
    assert (generation.text_ids, generation.codes) == (text_ids, codes)
    assert len(pcm_of(deltas)) == SAMPLES_PER_CODE * len(codes) > 0


def test_the_vocoder_stream_at_full_width_joins_like_the_whole_utterance(real: RealWidth) -> None:
    """The DiT step (time embedding, speaker encoder, codec embedding and input projection widths) equals the
    model's forward, and the stream, its last window padded to a fixed length, equals the whole decode."""
    engine = real.engine()
    dit = real.model.token2wav.code2wav_dit_model
    speaker = real.model.speaker_map["Ethan"]
    generator = torch.Generator().manual_seed(2)
    codes = [int(c) for c in torch.randint(0, 8192, (60,), generator=generator)]
    with torch.inference_mode():
        state = torch.randn(1, 40, dit.mel_dim, generator=generator)
        window = torch.tensor([codes[:20]])
        output = dit(
            hidden_states=state,
            quantized_code=window,
            speaker_embedding=speaker["cond"][:, None].expand(-1, 40, -1),
            condition_vector=speaker["ref_mel"],
            time_step=torch.tensor(0.5),
            apply_cfg=True,
        )
        guided, unguided = output.chunk(2)
        velocity = engine.dit_solver.velocity(state, window, engine.voices["Ethan"], 0.5)
        torch.testing.assert_close(velocity, guided + (guided - unguided) * 0.5, rtol=1e-4, atol=1e-5)

        solver = DitSolver(dit, steps=2, fixed_lengths=Token2WavStream.regular_windows(48))
        stream = Token2WavStream(
            real.model.token2wav,
            solver,
            voice=engine.voices["Ethan"],
            max_codes=len(codes),
            generator=torch.Generator().manual_seed(3),
        )
        streamed = np.concatenate([pcm for code in codes for pcm in stream.push(code)] + stream.flush())
        whole = stream.vocode(stream.denoise(stream.noise, torch.tensor([codes]))).numpy()
    assert len(streamed) == len(whole) == SAMPLES_PER_CODE * len(codes)
    assert np.abs(streamed - whole).max() <= 1e-2 * np.abs(whole).max()
