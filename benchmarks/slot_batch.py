"""What one batched decode step on the shared KV slots costs as more sessions share it (`engines/slots.py`).

    python benchmarks/slot_batch.py                                  # CPU, a small random text model
    python benchmarks/slot_batch.py --size 7b --device cuda --graphs  # the Qwen2.5-Omni-7B thinker stack

Random weights of the real shapes: the cost of a step does not depend on their values. Every session holds
`--context` tokens of KV. Prints the step of one session on its own growing cache (what interleaving costs per
session), then, per number of sessions stepping together on the slots, the time of one slot step (every slot runs,
taking part or not) and its cost per session.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from transformers import DynamicCache
from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniTextConfig
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniThinkerTextModel

from omnivox.pipeline.engines.slots import SlotBatch

SIZES: dict[str, dict[str, Any]] = {
    "small": {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 4, "num_attention_heads": 8},
    "7b": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28},
}


def build(size: str, device: torch.device, dtype: torch.dtype) -> Qwen2_5OmniThinkerTextModel:
    head_dim = SIZES[size]["hidden_size"] // SIZES[size]["num_attention_heads"]
    unit = head_dim // 16  # TMRoPE splits half the head into 2:3:3 (time, height, width): 16/24/24 at 7B
    config = Qwen2_5OmniTextConfig(
        **SIZES[size],
        num_key_value_heads=4,
        vocab_size=1024,
        max_position_embeddings=32_768,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2 * unit, 3 * unit, 3 * unit]},
    )
    return Qwen2_5OmniThinkerTextModel(config).to(device=device, dtype=dtype).eval()


def prefill(body: torch.nn.Module, tokens: int, device: torch.device, dtype: torch.dtype) -> DynamicCache:
    embeds = torch.randn(1, tokens, body.config.hidden_size, device=device, dtype=dtype)
    positions = torch.arange(tokens, device=device).view(1, 1, -1).expand(3, 1, -1)
    return body(inputs_embeds=embeds, position_ids=positions, use_cache=True).past_key_values


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sessions", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8])
    parser.add_argument("--context", type=int, default=512, help="tokens of KV each session holds")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--graphs", action="store_true", help="replay the step as a CUDA graph")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    body = build(args.size, device, dtype)
    slots = max(args.sessions)
    batch = SlotBatch(
        body,
        name="thinker",
        slots=slots,
        tokens=args.context + args.steps * 2 + 8,
        dtype=dtype,
        device=device,
        graphs=args.graphs,
    )
    cache = prefill(body, args.context, device, dtype)
    seats = [batch.admit(cache, 0) for _ in range(slots)]
    print(
        f"# {args.size} thinker stack on {device} ({dtype}), {slots} slots of {args.context} tokens, graphs "
        f"{args.graphs}"
    )
    alone = prefill(body, args.context, device, dtype)
    one = torch.randn(1, 1, body.config.hidden_size, device=device, dtype=dtype)
    times = []
    for step in range(args.steps):
        position = torch.full((3, 1, 1), args.context + step, device=device)
        synchronize(device)
        started = time.perf_counter()
        body(inputs_embeds=one, position_ids=position, past_key_values=alone, use_cache=True)
        synchronize(device)
        times.append(time.perf_counter() - started)
    print(f"one session on its own growing cache (the eager path): {statistics.median(times) * 1000:.2f} ms a step")
    print("sessions  slot step (median)  per session")
    for sessions in args.sessions:
        rows = seats[:sessions]
        embeds = torch.randn(sessions, 1, body.config.hidden_size, device=device, dtype=dtype)
        times = []
        for _ in range(args.steps):
            synchronize(device)
            started = time.perf_counter()
            batch.step(rows, embeds)
            synchronize(device)
            times.append(time.perf_counter() - started)
        for slot in rows:  # back to the same context for the next row of the table
            batch.release(slot)
        seats[:sessions] = [batch.admit(cache, 0) for _ in rows]
        step = statistics.median(times) * 1000
        print(f"{sessions:8d}  {step:15.2f} ms  {step / sessions:8.2f} ms")


if __name__ == "__main__":
    main()
