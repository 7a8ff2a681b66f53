"""The shared decode slots on their own: rows at different positions, freed slots, and the batching benchmark."""

from __future__ import annotations

import importlib

import pytest
import torch

from omnivox.pipeline.engines.slots import SlotBatch


@torch.inference_mode()
def test_rows_at_different_positions_step_as_each_would_alone() -> None:
    benchmark = importlib.import_module("benchmarks.slot_batch")
    torch.manual_seed(0)
    body = benchmark.build("small", torch.device("cpu"), torch.float32)
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


@pytest.mark.slow
def test_the_batching_benchmark_runs(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    benchmark = importlib.import_module("benchmarks.slot_batch")
    monkeypatch.setattr("sys.argv", ["slot_batch", "--sessions", "1,2", "--context", "16", "--steps", "2"])
    benchmark.main()
    printed = capsys.readouterr().out
    assert "growing cache" in printed and "per session" in printed
    assert len([line for line in printed.splitlines() if line.strip().startswith(("1 ", "2 "))]) == 2
