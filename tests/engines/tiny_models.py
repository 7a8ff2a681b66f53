"""A tiny random Qwen2.5-Omni (about 1.2 M parameters) built from the real config classes, for CPU tests.

It is saved with `save_pretrained` (plus a fake `spk_dict.pt` and an offline tokenizer) so the engine under test
runs the same loading code as with the real checkpoint. Dimensions are tiny; the structure (thinker with audio
encoder, talker, DiT + BigVGAN token2wav with 480 samples per code) is the real one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tiny_common import HIDDEN, byte_level_tokenizer, random_model, tiny_audio_config, tiny_vision_config
from transformers import (
    LogitsProcessor,
    PreTrainedTokenizerBase,
    Qwen2_5OmniConfig,
    Qwen2_5OmniForConditionalGeneration,
)

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|AUDIO|>",
    "<|audio_bos|>",
    "<|audio_eos|>",
    "<|IMAGE|>",
    "<|VIDEO|>",
    "<|vision_bos|>",
    "<|vision_eos|>",
    "<|tts_pad|>",
    "<|tts_bos|>",
    "<|tts_eos|>",
    "<|spk_chelsie|>",
    "<|spk_ethan|>",
)
CODEBOOK_SIZE = 8193
"""token2wav's code embedding has 8193 rows: talker ids above that are special tokens, not codes."""
CODEC_STOP_IDS = (8292, 8294)


def build_tokenizer() -> PreTrainedTokenizerBase:
    """Byte-level tokenizer with no merges plus the Qwen2.5-Omni special tokens: needs no download."""
    return byte_level_tokenizer(SPECIAL_TOKENS)


def tiny_qwen2_5_config(tokenizer: PreTrainedTokenizerBase) -> Qwen2_5OmniConfig:
    """Every sub-model 1-2 layers of width 32; the undeclared `vision_*_token_id` that 5.23 reads are supplied."""
    token_id = tokenizer.convert_tokens_to_ids
    mrope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}
    multimodal_ids = {
        "audio_token_index": token_id("<|AUDIO|>"),
        "image_token_index": token_id("<|IMAGE|>"),
        "video_token_index": token_id("<|VIDEO|>"),
        "audio_start_token_id": token_id("<|audio_bos|>"),
        "audio_end_token_id": token_id("<|audio_eos|>"),
        "vision_start_token_id": token_id("<|vision_bos|>"),
        "vision_end_token_id": token_id("<|vision_eos|>"),
    }
    small: dict[str, Any] = {"num_attention_heads": 2, "num_key_value_heads": 1, "rope_parameters": mrope}
    return Qwen2_5OmniConfig(
        thinker_config={
            **multimodal_ids,
            "user_token_id": token_id("user"),
            "audio_config": tiny_audio_config(),
            "vision_config": tiny_vision_config(fullatt_block_indexes=[0]),
            "text_config": {
                **small,
                "vocab_size": len(tokenizer),
                "hidden_size": HIDDEN,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "max_position_embeddings": 4096,
            },
        },
        talker_config={
            **multimodal_ids,
            **small,
            "vocab_size": 8448,
            "embedding_size": HIDDEN,
            "hidden_size": HIDDEN,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "head_dim": 16,
            "max_position_embeddings": 8192,
            "tts_text_start_token_id": token_id("<|tts_bos|>"),
            "tts_text_end_token_id": token_id("<|tts_eos|>"),
            "tts_text_pad_token_id": token_id("<|tts_pad|>"),
        },
        token2wav_config={
            "dit_config": {
                "hidden_size": 32,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "head_dim": 16,
                "emb_dim": 16,
                "block_size": 24,
                "look_ahead_layers": [1],
                "look_backward_layers": [0],
                "num_embeds": CODEBOOK_SIZE,
                "mel_dim": 80,
                "enc_emb_dim": 16,
                "enc_dim": 16,
                "enc_channels": [16, 16, 16],
                "enc_kernel_sizes": [5, 3, 1],
                "enc_dilations": [1, 2, 1],
                "enc_attention_channels": 8,
                "enc_se_channels": 8,
                "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
            },
            "bigvgan_config": {
                "mel_dim": 80,
                "upsample_initial_channel": 128,
                "resblock_kernel_sizes": [3],
                "resblock_dilation_sizes": [[1, 3, 5]],
                "upsample_rates": [5, 3, 2, 2, 2, 2],
                "upsample_kernel_sizes": [11, 7, 4, 4, 4, 4],
            },
        },
    )


FULL_SIZES: dict[str, dict[str, dict[str, Any]]] = {
    # thinker text/audio/vision and token2wav: the config-class defaults are the 7B checkpoint's, except vision
    # hidden_size (1280). The talker class defaults copy the thinker, so the checkpoint's talker dims are given.
    "7b": {
        "text": {"tie_word_embeddings": False},
        "audio": {},
        "vision": {"hidden_size": 1280},
        "talker": {
            "embedding_size": 3584,
            "hidden_size": 896,
            "intermediate_size": 18944,
            "num_hidden_layers": 24,
            "num_attention_heads": 12,
            "num_key_value_heads": 4,
            "head_dim": 128,
        },
    },
    # 3B: thinker as Qwen2.5-3B; talker dims assumed from the published 3B config (896 wide, 24 layers).
    "3b": {
        "text": {
            "hidden_size": 2048,
            "intermediate_size": 11008,
            "num_hidden_layers": 36,
            "num_attention_heads": 16,
            "num_key_value_heads": 2,
            "vocab_size": 151936,
            "tie_word_embeddings": True,
        },
        "audio": {"output_dim": 2048},
        "vision": {"hidden_size": 1280, "out_hidden_size": 2048},
        "talker": {
            "embedding_size": 2048,
            "hidden_size": 896,
            "intermediate_size": 4864,
            "num_hidden_layers": 24,
            "num_attention_heads": 14,
            "num_key_value_heads": 2,
            "head_dim": 64,
        },
    },
}
"""Qwen2.5-Omni's checkpoint dimensions where they differ from the config classes' defaults."""


def full_size_config(
    tokenizer: PreTrainedTokenizerBase, size: str = "7b", *, shallow: bool = False
) -> Qwen2_5OmniConfig:
    """Qwen2.5-Omni at the checkpoint's widths (hidden sizes, heads, head_dim, mrope sections, vocabulary and codec
    sizes, DiT and BigVGAN widths) with the tiny tokenizer's special ids.

    `shallow` keeps every width but cuts the depth, for CPU tests (about 1.1 B parameters, 4.5 GB in float32 at 7B):
    one thinker layer, two of every other stack (a windowed and a full-attention vision block; a DiT layer looking
    back and one looking ahead), one BigVGAN residual block per upsampling, and tied thinker embeddings (the
    152064 x 3584 vocabulary matrix held once, not twice).
    """
    tiny = tiny_qwen2_5_config(tokenizer)
    dims = FULL_SIZES[size]
    mrope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}
    ids = {k: v for k, v in tiny.thinker_config.to_dict().items() if k.endswith(("token_id", "token_index"))}
    talker_ids = {k: v for k, v in tiny.talker_config.to_dict().items() if k.endswith(("_id", "token_index"))}
    text, audio, vision = {**dims["text"], "rope_parameters": mrope}, dict(dims["audio"]), dict(dims["vision"])
    talker = {**talker_ids, **dims["talker"], "vocab_size": 8448, "rope_parameters": mrope}
    token2wav: dict[str, Any] = {}
    if shallow:
        text |= {"num_hidden_layers": 1, "tie_word_embeddings": True}
        audio |= {"encoder_layers": 2}
        vision |= {"depth": 2, "fullatt_block_indexes": [1]}
        talker |= {"num_hidden_layers": 2}
        token2wav = {
            "dit_config": {"num_hidden_layers": 2, "look_backward_layers": [0], "look_ahead_layers": [1]},
            "bigvgan_config": {"resblock_kernel_sizes": [3], "resblock_dilation_sizes": [[1, 3, 5]]},
        }
    tied = {"tie_word_embeddings": text["tie_word_embeddings"]}  # the thinker ties its head by its own flag
    return Qwen2_5OmniConfig(
        thinker_config={**ids, **tied, "audio_config": audio, "vision_config": vision, "text_config": text},
        talker_config=talker,
        token2wav_config=token2wav,
    )


def random_speakers(tokenizer: PreTrainedTokenizerBase, config: Qwen2_5OmniConfig) -> dict[str, dict[str, Any]]:
    """Chelsie and Ethan as `spk_dict.pt` holds them, with random conditioning (from torch's global generator)."""
    dit = config.token2wav_config.dit_config
    return {
        name: {
            "bos_token": tokenizer.convert_tokens_to_ids(f"<|spk_{name.lower()}|>"),
            "cond": torch.randn(1, dit.enc_emb_dim),
            "ref_mel": torch.randn(1, 300, dit.mel_dim),
        }
        for name in ("Chelsie", "Ethan")
    }


def random_qwen2_5(
    config: Qwen2_5OmniConfig,
    tokenizer: PreTrainedTokenizerBase,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Qwen2_5OmniForConditionalGeneration:
    """A randomly initialised model with its two speakers, built directly on `device` in `dtype` (token2wav stays
    float32, as `from_pretrained` gives it)."""
    model = random_model(Qwen2_5OmniForConditionalGeneration, config, device, dtype)
    model.speaker_map.update(random_speakers(tokenizer, config))
    return model  # type: ignore[return-value]


def build_tiny_qwen2_5(directory: Path, *, seed: int = 0) -> Path:
    """Write a tiny random Qwen2.5-Omni checkpoint (weights, config, spk_dict.pt, tokenizer) into `directory`."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    model = Qwen2_5OmniForConditionalGeneration(tiny_qwen2_5_config(tokenizer))
    speakers = random_speakers(tokenizer, model.config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    torch.save(speakers, directory / "spk_dict.pt")
    return directory


class OnlyCodes(LogitsProcessor):
    """A random talker also samples special ids that are not codec codes (token2wav would fail on them): keep
    the codebook and the stop ids."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        stops = list(CODEC_STOP_IDS)
        kept = scores[..., stops].clone()
        scores[..., CODEBOOK_SIZE:] = -float("inf")
        scores[..., stops] = kept
        return scores
