"""What the tiny random Qwen2.5-Omni and Qwen3-Omni share: the offline tokenizer, the encoder configs, test images.

Both families use a Qwen2 byte-level tokenizer and the same Whisper-style audio encoder and ViT vision encoder
shapes, so the tiny builders take these from one place and add only their own special tokens and config keys.
"""

from __future__ import annotations

import io
from typing import Any

import av
import numpy as np
from tokenizers import AddedToken
from tokenizers.pre_tokenizers import ByteLevel
from transformers import PreTrainedTokenizerBase, Qwen2Tokenizer

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


def png_image(height: int, width: int) -> bytes:
    """A seeded random RGB picture encoded as PNG (what a client sends as an image part)."""
    pixels = (np.random.default_rng(0).random((height, width, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="image2pipe") as container:
        stream = container.add_stream("png")
        stream.width, stream.height, stream.pix_fmt = width, height, "rgb24"
        for packet in [*stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")), *stream.encode()]:
            container.mux(packet)
    return buffer.getvalue()
