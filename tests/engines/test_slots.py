"""The shared decode slots on their own: rows at different positions, freed slots, and the batching benchmark."""

from __future__ import annotations

import copy
import importlib
from typing import Any

import pytest
import torch

from omnivox.pipeline.engines.base import EngineError
from omnivox.pipeline.engines.slots import SlotBatch


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@torch.inference_mode()
def test_rows_at_different_positions_step_as_each_would_alone(attention: str) -> None:
    """Under either attention that reads a 4-D mask (eager adds it to the scores: it gets 0 / -inf, not booleans)."""
    benchmark = importlib.import_module("benchmarks.slot_batch")
    torch.manual_seed(0)
    body = benchmark.build("small", torch.device("cpu"), torch.float32)
    body.set_attn_implementation(attention)
    short, long = (benchmark.prefill(body, tokens, torch.device("cpu"), torch.float32) for tokens in (5, 9))
    batch = SlotBatch(body, name="thinker", slots=3, tokens=16, dtype=torch.float32, device=torch.device("cpu"))
    rows = [batch.admit(short, 0), batch.admit(long, 7)]  # the second with a rope offset, as audio prompts have
    embeds = torch.randn(2, 1, body.config.hidden_size)

    together = batch.step(rows, embeds)

    for row, (cache, offset) in enumerate(((short, 0), (long, 7))):
        position = torch.full((3, 1, 1), cache.get_seq_length() + offset)
        alone = body(inputs_embeds=embeds[row : row + 1], position_ids=position, past_key_values=cache, use_cache=True)
        torch.testing.assert_close(together[row], alone.last_hidden_state[0, -1], rtol=1e-4, atol=1e-5)
    assert batch.free_slots == 1
    for slot in rows:
        batch.release(slot)
    assert batch.free_slots == 3 and not batch.is_full(rows[0])


@torch.inference_mode()
def test_a_sequence_that_outgrows_its_slot_goes_on_on_a_growing_cache_with_the_same_states() -> None:
    benchmark = importlib.import_module("benchmarks.slot_batch")
    torch.manual_seed(0)
    body = benchmark.build("small", torch.device("cpu"), torch.float32)
    batch = SlotBatch(body, name="thinker", slots=2, tokens=8, dtype=torch.float32, device=torch.device("cpu"))
    reference = benchmark.prefill(body, 6, torch.device("cpu"), torch.float32)
    slot = batch.admit(copy.deepcopy(reference), 3)
    embeds = torch.randn(4, 1, 1, body.config.hidden_size)

    def alone(cache: Any, offset: int, embed: torch.Tensor) -> torch.Tensor:
        position = torch.full((3, 1, 1), cache.get_seq_length() + offset)
        out = body(inputs_embeds=embed, position_ids=position, past_key_values=cache, use_cache=True)
        return out.last_hidden_state[0, -1]

    expected = [alone(reference, 3, embed) for embed in embeds]
    stepped = [batch.step([slot], embeds[index])[0] for index in range(2)]
    assert batch.is_full(slot)
    grown, offset = batch.export(slot)
    batch.release(slot)
    stepped += [alone(grown, offset, embeds[index]) for index in range(2, 4)]

    for got, want in zip(stepped, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert batch.free_slots == 2


def test_flash_attention_is_refused_by_the_slots() -> None:
    benchmark = importlib.import_module("benchmarks.slot_batch")
    body = benchmark.build("small", torch.device("cpu"), torch.float32)
    body.config._attn_implementation = "flash_attention_2"  # as a model loaded with it says (flash-attn absent here)
    with pytest.raises(EngineError, match="attn_implementation: sdpa or eager"):
        SlotBatch(body, name="thinker", slots=1, tokens=8, dtype=torch.float32, device=torch.device("cpu"))


@pytest.mark.slow
def test_the_batching_benchmark_runs(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    benchmark = importlib.import_module("benchmarks.slot_batch")
    monkeypatch.setattr("sys.argv", ["slot_batch", "--sessions", "1,2", "--context", "16", "--steps", "2"])
    benchmark.main()
    printed = capsys.readouterr().out
    assert "growing cache" in printed and "per session" in printed
    assert len([line for line in printed.splitlines() if line.strip().startswith(("1 ", "2 "))]) == 2
