"""The Qwen3-Omni engine at the 30B-A3B checkpoint's widths (one or two layers per stack, 8 experts per MoE layer,
random weights): the tiny model is 32 wide everywhere, so a dimension mixed up between two stacks would pass there
and fail only here.

The model (about 0.8 B parameters, 3.2 GB in float32) is built once for this module and freed after it.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from test_qwen3_omni import Tiny, _audio, _codes, _generate, _generation, _request, _run, _tone
from tiny_qwen3 import build_tokenizer, full_size_config, random_qwen3

from omnivox.pipeline.engines.base import AudioPart, ImagePart, Message
from omnivox.pipeline.engines.qwen3_omni import step_generations
from tests.image_fixtures import png_image

pytestmark = pytest.mark.slow

TEXT_TOKENS = 5
FRAMES = 6


@pytest.fixture(scope="module")
def real() -> Iterator[Tiny]:
    """The shallow full-width model, installed by `Tiny.engine()` like the tiny one (the path is never read)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see tests/conftest.py: more threads only fight the other tests on two cores
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    model = Tiny(
        Path("random-qwen3-omni-30b-a3b-shallow"), random_qwen3(full_size_config(tokenizer, shallow=True)), tokenizer
    )
    try:
        yield model
    finally:
        del model
        gc.collect()
        torch.set_num_threads(threads)


def test_the_shallow_model_has_the_30b_a3b_widths(real: Tiny) -> None:
    config = real.model.config
    text, talker = config.thinker_config.text_config, config.talker_config.text_config
    assert (text.hidden_size, text.num_attention_heads, text.head_dim, text.vocab_size) == (2048, 32, 128, 152064)
    assert text.rope_parameters["mrope_section"] == [24, 20, 20]
    assert (talker.hidden_size, talker.num_attention_heads, talker.num_key_value_heads) == (1024, 16, 2)
    assert config.talker_config.code_predictor_config.hidden_size == 1024
    assert (config.code2wav_config.hidden_size, config.code2wav_config.decoder_dim) == (1024, 1536)


def test_the_stream_equals_generate_text_codes_and_audio(real: Tiny) -> None:
    request = _request(max_tokens=TEXT_TOKENS)
    reference = _generate(real, request, text_tokens=TEXT_TOKENS, frames=FRAMES)
    generation = _generation(real, request, max_audio_frames=FRAMES)
    audio = _audio(_run(generation))

    assert generation.text_ids == reference.text_ids
    assert torch.equal(_codes(generation), reference.codes)
    assert audio.shape == reference.wav.shape
    assert np.abs(audio - reference.wav).max() <= 1e-4 * np.abs(reference.wav).max()


def test_sessions_batched_on_static_slots_with_the_unrolled_predictor_say_what_generate_says(real: Tiny) -> None:
    """Two sessions, one with an image, share every thinker, talker, predictor and code2wav call."""
    requests = [
        _request(max_tokens=TEXT_TOKENS),
        _request(Message("user", (ImagePart(png_image(64, 96)), AudioPart(_tone(1.0, 330)))), max_tokens=TEXT_TOKENS),
    ]
    references = [_generate(real, request, text_tokens=TEXT_TOKENS, frames=FRAMES) for request in requests]
    engine = real.engine(
        static_cache=True, static_cache_tokens=256, max_active=2, cuda_graphs=True, max_audio_frames=FRAMES
    )
    sessions = [engine.make_generation(engine.prepare(request)) for request in requests]
    while live := [session for session in sessions if not session.finished]:
        assert not any(isinstance(result, BaseException) for result in step_generations(live))

    for session, reference in zip(sessions, references, strict=True):
        assert session.decoding == "static"
        assert session.text_ids == reference.text_ids
        assert torch.equal(_codes(session), reference.codes)
