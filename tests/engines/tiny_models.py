"""A tiny random Qwen2.5-Omni (about 1.2 M parameters) built from the real config classes, for CPU tests.

It is saved with `save_pretrained` (plus a fake `spk_dict.pt` and an offline tokenizer) so the engine under test
runs the same loading code as with the real checkpoint. Dimensions are tiny; the structure (thinker with audio
encoder, talker, DiT + BigVGAN token2wav with 480 samples per code) is the real one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tiny_common import HIDDEN, byte_level_tokenizer, tiny_audio_config, tiny_vision_config
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


def build_tiny_qwen2_5(directory: Path, *, seed: int = 0) -> Path:
    """Write a tiny random Qwen2.5-Omni checkpoint (weights, config, spk_dict.pt, tokenizer) into `directory`."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    model = Qwen2_5OmniForConditionalGeneration(tiny_qwen2_5_config(tokenizer))
    dit = model.config.token2wav_config.dit_config
    speakers = {
        name: {
            "bos_token": tokenizer.convert_tokens_to_ids(f"<|spk_{name.lower()}|>"),
            "cond": torch.randn(1, dit.enc_emb_dim),
            "ref_mel": torch.randn(1, 300, dit.mel_dim),
        }
        for name in ("Chelsie", "Ethan")
    }
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
