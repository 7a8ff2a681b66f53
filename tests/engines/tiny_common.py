"""What the tiny random Qwen2.5-Omni and Qwen3-Omni share: the offline tokenizer, the encoder configs, test images.

Both families use a Qwen2 byte-level tokenizer and the same Whisper-style audio encoder and ViT vision encoder
shapes, so the tiny builders take these from one place and add only their own special tokens and config keys.
"""

from __future__ import annotations

import types
from typing import Any

import numpy as np
import torch
from tokenizers import AddedToken
from tokenizers.pre_tokenizers import ByteLevel
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Qwen2Tokenizer, WhisperFeatureExtractor
from transformers.initialization import no_init_weights

HIDDEN = 32
"""Width of every tiny sub-model."""
ROLE_TOKENS = ("system", "user", "assistant")
"""Single tokens: Qwen3-Omni's `generate()` reads the role id right after `<|im_start|>`."""
TOOL_TOKENS = ("<tool_call>", "</tool_call>")
"""Single, non-special tokens, as in the Qwen tokenizers: the engines see a function call begin at one token."""


def byte_level_tokenizer(special_tokens: tuple[str, ...], **options: Any) -> PreTrainedTokenizerBase:
    """A byte-level tokenizer with no merges plus `special_tokens` and the roles: needs no download.

    `options` go to `Qwen2Tokenizer` (Qwen3-Omni names its multimodal tokens with `extra_special_tokens`).
    """
    vocab = {char: index for index, char in enumerate(sorted(ByteLevel.alphabet()))}
    for token in special_tokens + ROLE_TOKENS + TOOL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], eos_token="<|im_end|>", pad_token="<|endoftext|>", **options)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens], special_tokens=True)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in ROLE_TOKENS + TOOL_TOKENS])
    return tokenizer


def tiny_audio_config(**extra: Any) -> dict[str, Any]:
    """A one-layer audio encoder over 128 mel bins; `extra` adds the keys only one family has."""
    return {
        "d_model": HIDDEN,
        "encoder_layers": 1,
        "encoder_attention_heads": 2,
        "encoder_ffn_dim": 64,
        "num_mel_bins": 128,
        "output_dim": HIDDEN,
        **extra,
    }


def tiny_vision_config(**extra: Any) -> dict[str, Any]:
    """A one-block vision encoder; `extra` adds the keys only one family has."""
    return {
        "depth": 1,
        "hidden_size": HIDDEN,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": HIDDEN,
        **extra,
    }


def processor_audio(processor_class: type, clips: list[np.ndarray]) -> dict[str, Any]:
    """What a Qwen-Omni processor class makes of audio clips given together (its own `_process_audio`, with its own
    audio settings): `input_features`, `feature_attention_mask`, `num_audio_tokens`.

    The processors cannot be built here (their video part needs torchvision), so the method runs on a stand-in with
    the one attribute it reads besides its arguments: the 128-bin Whisper feature extractor both checkpoints ship.
    """
    stand_in = types.SimpleNamespace(feature_extractor=WhisperFeatureExtractor(feature_size=128), n_window=50)
    stand_in.replace_audio_token = lambda inputs, audio_idx: ""
    kwargs = {**processor_class.audio_kwargs, "return_tensors": "pt"}
    audio_inputs, _ = processor_class._process_audio(stand_in, clips, **kwargs)
    return audio_inputs


def random_model(
    model_class: type[PreTrainedModel],
    config: Any,
    device: str | torch.device,
    dtype: torch.dtype,
    *,
    draw_once: bool = True,
) -> PreTrainedModel:
    """`model_class(config)` built directly on `device` in `dtype`.

    With `draw_once` its weights are drawn once, by transformers' own initialisation (`init_weights`) without
    torch's default one before it: that halves the time a CPU takes to build a model with a billion parameters,
    most of it spent drawing random numbers. Without, it is built as usual (the tiny checkpoints keep the weights
    their tests were written against)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        if not draw_once:
            with torch.device(device):
                return model_class(config).eval()
        with torch.device(device), no_init_weights():
            model = model_class(config)
        model.tie_weights()  # before drawing: a tied head would otherwise be drawn (and held) once more first
        with torch.device(device):
            model.init_weights()
    finally:
        torch.set_default_dtype(previous)
    return model.eval()
