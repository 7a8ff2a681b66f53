"""A tiny random Qwen3-Omni (about 3.6 M parameters) built from the real config classes, for CPU tests.

It goes through `save_pretrained` / `from_pretrained`, so the engine under test runs the same loading code as with
the real checkpoint. Dimensions are tiny; the structure (MoE thinker, MoE talker with a shared expert, 15-step code
predictor, causal code2wav with 1920 samples per frame) is the real one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tiny_common import HIDDEN, byte_level_tokenizer, random_model, tiny_audio_config, tiny_vision_config
from transformers import PreTrainedTokenizerBase, Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|audio_pad|>",
    "<|audio_start|>",
    "<|audio_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|tts_pad|>",
    "<|tts_bos|>",
    "<|tts_eos|>",
)
TOP_LEVEL_TOKEN_IDS = (
    "im_start_token_id",
    "im_end_token_id",
    "tts_pad_token_id",
    "tts_bos_token_id",
    "tts_eos_token_id",
    "system_token_id",
    "user_token_id",
    "assistant_token_id",
)
CODEC_EOS = 2150


def build_tokenizer() -> PreTrainedTokenizerBase:
    """A byte-level tokenizer with no merges plus the Qwen3-Omni special tokens: needs no download."""
    return byte_level_tokenizer(
        SPECIAL_TOKENS,
        extra_special_tokens={
            "audio_token": "<|audio_pad|>",
            "audio_bos_token": "<|audio_start|>",
            "audio_eos_token": "<|audio_end|>",
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_bos_token": "<|vision_start|>",
            "vision_eos_token": "<|vision_end|>",
        },
    )


def tiny_config(tokenizer: PreTrainedTokenizerBase) -> Qwen3OmniMoeConfig:
    """Every sub-model 1-2 layers of width 32; undeclared attributes the 5.23 code reads are supplied."""
    token_id = tokenizer.convert_tokens_to_ids
    mrope = {
        "rope_type": "default",
        "rope_theta": 1e6,
        "mrope_section": [4, 2, 2],
        "interleaved": True,
        "mrope_interleaved": True,
    }
    multimodal_ids = {
        "audio_token_id": token_id("<|audio_pad|>"),
        "image_token_id": token_id("<|image_pad|>"),
        "video_token_id": token_id("<|video_pad|>"),
        "vision_start_token_id": token_id("<|vision_start|>"),
        "audio_start_token_id": token_id("<|audio_start|>"),
    }
    moe_text: dict[str, Any] = {
        "hidden_size": HIDDEN,
        "intermediate_size": 64,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "moe_intermediate_size": 16,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "rope_parameters": mrope,
        "max_position_embeddings": 4096,
    }
    return Qwen3OmniMoeConfig(
        thinker_config={
            **multimodal_ids,
            "user_token_id": token_id("user"),
            "audio_config": tiny_audio_config(downsample_hidden_size=8),
            "vision_config": tiny_vision_config(deepstack_visual_indexes=[0]),
            "text_config": {**moe_text, "vocab_size": len(tokenizer), "num_hidden_layers": 2},
        },
        talker_config={
            **multimodal_ids,
            "num_code_groups": 16,
            "thinker_hidden_size": HIDDEN,
            "accept_hidden_layer": 1,
            "position_id_per_seconds": 13,
            "spatial_merge_size": 2,
            "codec_eos_token_id": CODEC_EOS,
            "codec_pad_id": 2148,
            "codec_bos_id": 2149,
            "codec_nothink_id": 2155,
            "codec_think_bos_id": 2156,
            "codec_think_eos_id": 2157,
            "speaker_id": {"chelsie": 2301, "ethan": 2302, "aiden": 2303},
            "text_config": {
                **moe_text,
                "vocab_size": 3072,
                "num_hidden_layers": 1,
                "shared_expert_intermediate_size": 32,
            },
            "code_predictor_config": {
                "vocab_size": 2048,
                "hidden_size": HIDDEN,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
                "head_dim": 16,
                "num_code_groups": 16,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
            },
        },
        code2wav_config={
            "codebook_size": 2048,
            "num_quantizers": 16,
            "hidden_size": HIDDEN,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "sliding_window": 72,
            "upsample_rates": [8, 5, 4, 3],
            "upsampling_ratios": [2, 2],
            "decoder_dim": 64,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        },
        im_start_token_id=token_id("<|im_start|>"),
        im_end_token_id=token_id("<|im_end|>"),
        tts_pad_token_id=token_id("<|tts_pad|>"),
        tts_bos_token_id=token_id("<|tts_bos|>"),
        tts_eos_token_id=token_id("<|tts_eos|>"),
        system_token_id=token_id("system"),
        user_token_id=token_id("user"),
        assistant_token_id=token_id("assistant"),
    )


def full_size_config(tokenizer: PreTrainedTokenizerBase, *, shallow: bool = False) -> Qwen3OmniMoeConfig:
    """The Qwen3-Omni-30B-A3B dimensions (35.3 B parameters, 70.5 GB in bf16) with the tiny tokenizer's special ids.

    Random weights at these dimensions cost the same compute as the checkpoint, for benchmarks without downloads.
    Values are transformers' defaults where they match the checkpoint, set here where they differ.

    `shallow` keeps every width but cuts the depth, for CPU tests (about 0.7 B parameters, 2.9 GB in float32): one
    thinker layer (the talker then reads its layer 1), two of every other stack (audio and vision encoders, with
    one deepstack layer, talker, code predictor, code2wav transformer), 8 experts per MoE layer instead of 128
    (each token still routed to the real 8 or 6 of them), and tied thinker embeddings (the 152064 x 2048
    vocabulary matrix held once).
    """
    tiny = tiny_config(tokenizer).to_dict()
    mrope = {
        "rope_type": "default",
        "rope_theta": 1e6,
        "mrope_section": [24, 20, 20],
        "interleaved": True,
        "mrope_interleaved": True,
    }
    thinker, talker = tiny["thinker_config"], tiny["talker_config"]
    multimodal_ids = {key: thinker[key] for key in ("audio_token_id", "image_token_id", "video_token_id")}
    multimodal_ids |= {"vision_start_token_id": thinker["vision_start_token_id"]}
    multimodal_ids |= {"audio_start_token_id": thinker["audio_start_token_id"]}
    config = Qwen3OmniMoeConfig(
        thinker_config={
            **multimodal_ids,
            "user_token_id": thinker["user_token_id"],
            "audio_config": {"output_dim": 2048},
            "vision_config": {"out_hidden_size": 2048},
            "text_config": {
                "vocab_size": 152064,
                "hidden_size": 2048,
                "intermediate_size": 768,
                "num_hidden_layers": 48,
                "num_attention_heads": 32,
                "num_key_value_heads": 4,
                "head_dim": 128,
                "moe_intermediate_size": 768,
                "num_experts": 128,
                "num_experts_per_tok": 8,
                "norm_topk_prob": True,
                "rope_parameters": mrope,
                "max_position_embeddings": 65536,
            },
        },
        talker_config={
            **multimodal_ids,
            **{key: talker[key] for key in ("codec_eos_token_id", "codec_pad_id", "codec_bos_id", "speaker_id")},
            **{key: talker[key] for key in ("codec_nothink_id", "codec_think_bos_id", "codec_think_eos_id")},
            "num_code_groups": 16,
            "thinker_hidden_size": 2048,
            "accept_hidden_layer": 24,
            "position_id_per_seconds": 13,
            "spatial_merge_size": 2,
            "text_config": {
                "vocab_size": 3072,
                "hidden_size": 1024,
                "intermediate_size": 2048,
                "num_hidden_layers": 20,
                "num_attention_heads": 16,
                "num_key_value_heads": 2,
                "head_dim": 128,
                "moe_intermediate_size": 384,
                "shared_expert_intermediate_size": 768,
                "num_experts": 128,
                "num_experts_per_tok": 6,
                "norm_topk_prob": True,
                "rope_parameters": mrope,
                "max_position_embeddings": 65536,
            },
            "code_predictor_config": {
                "vocab_size": 2048,
                "hidden_size": 1024,
                "intermediate_size": 3072,
                "num_hidden_layers": 5,
                "num_attention_heads": 16,
                "num_key_value_heads": 8,
                "head_dim": 128,
                "num_code_groups": 16,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
                "max_position_embeddings": 65536,
            },
        },
        code2wav_config={"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
        **{key: tiny[key] for key in TOP_LEVEL_TOKEN_IDS},
    )
    if not shallow:
        return config
    whole = config.to_dict()
    thinker, talker = whole["thinker_config"], whole["talker_config"]
    thinker |= {"tie_word_embeddings": True}
    thinker["text_config"] |= {"num_hidden_layers": 1, "num_experts": 8, "tie_word_embeddings": True}
    thinker["audio_config"] |= {"encoder_layers": 2}
    thinker["vision_config"] |= {"depth": 2, "deepstack_visual_indexes": [1]}
    talker |= {"accept_hidden_layer": 1}
    talker["text_config"] |= {"num_hidden_layers": 2, "num_local_experts": 8}  # its name for num_experts
    talker["code_predictor_config"] |= {"num_hidden_layers": 2}
    whole["code2wav_config"] |= {"num_hidden_layers": 2}
    for stack in (thinker["text_config"], talker["text_config"], talker["code_predictor_config"]):
        stack.pop("layer_types", None)  # derived from the number of layers again
    return Qwen3OmniMoeConfig(**whole)


def random_qwen3(
    config: Qwen3OmniMoeConfig, device: str = "cpu", dtype: torch.dtype = torch.float32, *, draw_once: bool = True
) -> torch.nn.Module:
    """A randomly initialised model built directly on `device` in `dtype` (no checkpoint, no copy; see
    `random_model` for `draw_once`)."""
    model = random_model(Qwen3OmniMoeForConditionalGeneration, config, device, dtype, draw_once=draw_once)
    with torch.no_grad():
        for module in model.modules():  # transformers 5.23 leaves these torch.empty: garbage that differs per process
            if type(module).__name__ == "Qwen3OmniMoeTalkerTextExperts":
                for parameter in module.parameters():
                    torch.nn.init.normal_(parameter, std=0.02)
    return model.eval()


def build_tiny_qwen3(directory: Path, seed: int = 0) -> Path:
    """Write a tiny random checkpoint (weights, config, tokenizer) to `directory` and return it."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    random_qwen3(tiny_config(tokenizer), draw_once=False).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
