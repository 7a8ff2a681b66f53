"""A tiny random Phi-4-multimodal checkpoint built from the real config classes: no download, saved with its
tokenizer and audio feature extractor so that the stage loads it as it loads the real one."""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_common import HIDDEN, byte_level_tokenizer
from transformers import Phi4MultimodalConfig, Phi4MultimodalFeatureExtractor, Phi4MultimodalForCausalLM

SPECIAL_TOKENS = ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|image|>", "<|audio|>")


def build_tiny_phi4(directory: Path) -> Path:
    tokenizer = byte_level_tokenizer(
        SPECIAL_TOKENS,
        extra_special_tokens={"image_token": "<|image|>", "audio_token": "<|audio|>"},
    )
    tokenizer.eos_token = "<|end|>"
    ids = tokenizer.convert_tokens_to_ids
    config = Phi4MultimodalConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        bos_token_id=ids("<|endoftext|>"),
        pad_token_id=ids("<|endoftext|>"),
        eos_token_id=[ids("<|end|>"), ids("<|endoftext|>")],
        vision_config={
            "hidden_size": HIDDEN,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 56,
            "patch_size": 14,
            "crop_size": 56,
            "image_token_id": ids("<|image|>"),
        },
        audio_config={
            "hidden_size": HIDDEN,
            "intermediate_size": 64,
            "num_blocks": 2,
            "num_attention_heads": 2,
            "ext_pw_out_channel": HIDDEN,
            "depthwise_separable_out_channel": HIDDEN,
            "nemo_conv_channels": HIDDEN,
            "left_chunk": 4,
            "bias_max_distance": 100,
            "audio_token_id": ids("<|audio|>"),
        },
    )
    torch.manual_seed(0)
    model = Phi4MultimodalForCausalLM(config).eval()
    model.generation_config.do_sample = False
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    Phi4MultimodalFeatureExtractor().save_pretrained(directory)
    return directory
