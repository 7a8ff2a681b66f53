"""Decode steps of many sessions as one batch, on preallocated KV slots where each row is its own sequence.

A decode step of a 7B thinker or talker reads every weight once whatever the batch size, so on a GPU stepping eight
sessions together costs little more than stepping one. Sessions start, speak and stop at different times, so the
rows of one batch sit at different positions: `SlotLayer` writes each row's new key and value at that row's own
position, and each row attends through its own mask. All buffers have fixed shapes, so a whole step of every slot
can be captured once as a CUDA graph and replayed.

A graphed step runs every slot; an eager one runs the slots up to the highest seated one (seats are handed out
lowest first). Rows that take no part write into a scratch column that no mask ever shows, and their outputs are
dropped; a free slot attends only to that scratch column so its row stays finite.

Prefills stay per request (their lengths vary) and their KV is copied into a free slot (`admit`). A sequence that
fills its slot continues on a growing cache of its own (`SlotSeats`), so a long conversation never has to give up
its slot for fear of a long answer.

The per-row mask is built for the attention implementation the decoder stack runs: SDPA takes the boolean mask,
eager attention adds its mask to the scores and so gets 0 / -inf. FlashAttention 2 has no per-row 4-D mask at all
and is refused (the engines pick SDPA for `static_cache`).
"""

from __future__ import annotations

import copy
import heapq
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import Cache, DynamicCache
from transformers.cache_utils import StaticLayer

from omnivox.pipeline.engines.base import EngineError
from omnivox.pipeline.engines.stepping import Call

log = logging.getLogger(__name__)


class SlotLayer(StaticLayer):
    """A static cache layer whose rows are independent sequences, each written at its own position."""

    def __init__(self, max_cache_len: int, write_positions: torch.Tensor) -> None:
        super().__init__(max_cache_len=max_cache_len)
        self._write_positions = write_positions

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        index = self._write_positions.view(-1, 1, 1, 1)
        self.keys.scatter_(2, index.expand_as(key_states), key_states)
        self.values.scatter_(2, index.expand_as(value_states), value_states)
        return self.keys, self.values

    def first_rows(self, rows: int, write_positions: torch.Tensor) -> SlotLayer:
        """This layer's first `rows` rows as a layer of their own (views: what it writes lands here)."""
        view = copy.copy(self)
        view.keys, view.values, view.batch_size = self.keys[:rows], self.values[:rows], rows
        view._write_positions = write_positions
        return view


class SlotCache(Cache):
    """One `SlotLayer` per decoder layer, all reading the same per-row write positions."""

    def __init__(self, num_layers: int, max_cache_len: int, write_positions: torch.Tensor) -> None:
        super().__init__(layers=[SlotLayer(max_cache_len, write_positions) for _ in range(num_layers)])

    def first_rows(self, rows: int, write_positions: torch.Tensor) -> SlotCache:
        view = copy.copy(self)
        view.layers = [layer.first_rows(rows, write_positions) for layer in self.layers]
        return view


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


MASKED_ATTENTION = ("sdpa", "eager")
"""Attention implementations that read a 4-D mask as one: SDPA (boolean or additive) and eager (additive only)."""


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean "may attend" mask as eager attention wants it: 0 where allowed, the dtype's minimum elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


class SlotBatch:
    """`slots` sequences of one decoder stack, stepped together one token each.

    Per slot the host keeps the length and the rope offset (positions are explicit: the model classes keep rope
    offsets on the module, which interleaved sessions would overwrite). With `graphs` (CUDA only) the step of all
    slots is captured once, at construction, while every slot is free.
    """

    def __init__(
        self,
        body: torch.nn.Module,
        *,
        name: str,
        slots: int,
        tokens: int,
        dtype: torch.dtype,
        device: torch.device,
        graphs: bool = False,
    ) -> None:
        config = body.config
        attention = config._attn_implementation
        if attention not in MASKED_ATTENTION:
            raise EngineError(
                f"the {name} slots (static_cache) pass a per-row attention mask that {attention} cannot read; "
                f"set attn_implementation: sdpa or eager"
            )
        self.name, self.slots, self.tokens = name, slots, tokens
        self._body = body
        self._dtype = dtype
        self._additive = attention == "eager"
        self._scratch = tokens  # one column past the usable length
        self._write = torch.full((slots,), self._scratch, dtype=torch.long, device=device)
        self._cache = SlotCache(config.num_hidden_layers, tokens + 1, self._write)
        shape = (slots, config.num_key_value_heads, 0, _head_dim(config))
        for layer in self._cache.layers:
            empty = torch.empty(shape, dtype=dtype, device=device)
            layer.lazy_initialization(empty, empty)
        self._embeds = torch.zeros(slots, 1, config.hidden_size, dtype=dtype, device=device)
        self._positions = torch.zeros(3, slots, 1, dtype=torch.long, device=device)
        self._mask = torch.zeros(slots, 1, 1, tokens + 1, dtype=torch.bool, device=device)
        self._mask[..., self._scratch] = True
        self._lengths = [0] * slots
        self._rope_deltas = [0] * slots
        self._free = list(range(slots))  # a heap: the lowest free slot is seated first
        self._heads: dict[int, SlotCache] = {}
        self._graph: torch.cuda.CUDAGraph | None = None
        self._hidden: torch.Tensor | None = None
        if graphs:
            self._graph, self._hidden = self._capture()

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def admit(self, prefill: Cache, rope_delta: int) -> int:
        """Copy a batch-1 prefill's KV into a free slot; returns the slot."""
        length = prefill.get_seq_length()
        if length >= self.tokens:
            raise EngineError(f"the prompt ({length} tokens) does not fit the {self.name} slots ({self.tokens})")
        if not self._free:
            raise EngineError(f"no free {self.name} slot")
        slot = heapq.heappop(self._free)
        for layer, source in zip(self._cache.layers, prefill.layers, strict=True):
            layer.keys[slot, :, :length].copy_(source.keys[0])
            layer.values[slot, :, :length].copy_(source.values[0])
        self._mask[slot].zero_()
        self._mask[slot, ..., :length] = True
        self._lengths[slot], self._rope_deltas[slot] = length, rope_delta
        return slot

    def is_full(self, slot: int) -> bool:
        return self._lengths[slot] >= self.tokens

    def export(self, slot: int) -> tuple[DynamicCache, int]:
        """A copy of one slot's sequence as a batch-1 growing cache, with its rope offset (to continue it there)."""
        length = self._lengths[slot]
        cache = DynamicCache()
        for index, layer in enumerate(self._cache.layers):
            keys, values = layer.keys[slot : slot + 1, :, :length], layer.values[slot : slot + 1, :, :length]
            cache.update(keys.clone(), values.clone(), index)
        return cache, self._rope_deltas[slot]

    def release(self, slot: int) -> None:
        """Free a slot for the next request (its stale KV is hidden by the mask)."""
        self._mask[slot].zero_()
        self._mask[slot, ..., self._scratch] = True
        self._lengths[slot] = 0
        heapq.heappush(self._free, slot)

    def step(self, slots: Sequence[int], embeds: torch.Tensor) -> torch.Tensor:
        """Feed one input embedding `[len(slots), 1, hidden]` to each listed slot; returns their last hidden
        states `[len(slots), hidden]` in the same order. A full slot is the caller's to refuse (`is_full`)."""
        lengths = [self._lengths[slot] for slot in slots]
        write = [self._scratch] * self.slots
        for slot, length in zip(slots, lengths, strict=True):
            write[slot] = length
            self._lengths[slot] = length + 1
        device = self._write.device
        rows = torch.tensor(slots, dtype=torch.long, device=device)
        at = torch.tensor(lengths, dtype=torch.long, device=device)
        self._write.copy_(torch.tensor(write, dtype=torch.long))
        self._embeds.zero_()
        self._embeds[rows] = embeds.to(self._embeds.dtype)
        self._positions.zero_()
        self._positions[:, rows, 0] = at + torch.tensor([self._rope_deltas[slot] for slot in slots], device=device)
        self._mask[rows, 0, 0, at] = True
        if self._graph is not None and self._hidden is not None:
            self._graph.replay()
            return self._hidden[rows]
        return self._forward(max(slots) + 1)[rows]

    def _forward(self, rows: int | None = None) -> torch.Tensor:
        """The step of the first `rows` slots (all by default: the fixed shape a graph needs). Slots are handed out
        lowest first, so without a graph a step costs about as many rows as sessions are seated."""
        cache = self._cache
        if rows is not None and rows < self.slots:
            if rows not in self._heads:
                self._heads[rows] = self._cache.first_rows(rows, self._write[:rows])
            cache = self._heads[rows]
        mask = self._mask[:rows]
        return self._body(
            inputs_embeds=self._embeds[:rows],
            position_ids=self._positions[:, :rows],
            attention_mask=additive_mask(mask, self._dtype) if self._additive else mask,
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state[:, -1]

    @torch.inference_mode()  # as the steps it stands for run: no autograd records inside the graph
    def _capture(self) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Record the step of all slots (after warm-up runs on a side stream, as PyTorch requires). Every slot is
        free and writes to the scratch column, so the warm-up runs leave no trace."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            hidden = self._forward()
        log.info("captured the %s step of %d slots as a CUDA graph", self.name, self.slots)
        return graph, hidden


class SlotPool(ABC):
    """An engine's decode slots: a thinker and a talker `SlotBatch`, answering the calls of every session at once.

    Both Qwen-Omni families keep the decoder stacks at `thinker.model.language_model` and `talker.model`.
    """

    def __init__(
        self,
        model: Any,
        *,
        slots: int,
        thinker_tokens: int,
        talker_tokens: int,
        dtype: torch.dtype,
        device: torch.device,
        graphs: bool,
    ) -> None:
        thinker, talker = model.thinker, model.talker
        self.text_embed, self.lm_head, self.codec_head = (
            thinker.get_input_embeddings(),
            thinker.lm_head,
            talker.codec_head,
        )
        self.device = device
        shared: dict[str, Any] = {"slots": slots, "dtype": dtype, "device": device, "graphs": graphs}
        self.thinker = SlotBatch(thinker.model.language_model, name="thinker", tokens=thinker_tokens, **shared)
        self.talker = SlotBatch(talker.model, name="talker", tokens=talker_tokens, **shared)

    def thinker_step(self, calls: list[Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One batched thinker step for calls `(slot, token, ...)`: (input embeddings, last hidden states, logits)."""
        tokens = torch.tensor([[args[1]] for args in calls], device=self.device)
        embeds = self.text_embed(tokens)
        hidden = self.thinker.step([args[0] for args in calls], embeds)
        return embeds, hidden, self.lm_head(hidden)

    @abstractmethod
    def run(self, part: str, calls: list[Any]) -> list[Any]:
        """Answer the calls of one part; each call's args start with its slot."""


class SlotSeats:
    """One request's seats in a `SlotPool`: a thinker slot from its prefill on, a talker slot while it speaks.

    A part whose sequence fills its slot (or whose prompt does not fit one) goes on, token for token the same, on a
    growing cache from `growing` (the engine's reference path); `on_fallback` hears why, for the metrics.
    """

    def __init__(
        self,
        pool: SlotPool,
        growing: Callable[[], GrowingCaches],
        on_fallback: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self._pool = pool
        self._slots: dict[str, int] = {}
        self._make_growing = growing
        self._growing: GrowingCaches | None = None
        self._on_fallback = on_fallback

    def _batch(self, part: str) -> SlotBatch:
        return self._pool.thinker if part == "thinker" else self._pool.talker

    def _grown(self) -> GrowingCaches:
        if self._growing is None:
            self._growing = self._make_growing()
        return self._growing

    def begin_thinker(self, cache: Cache, rope_delta: int) -> None:
        self._slots["thinker"] = self._pool.thinker.admit(cache, rope_delta)

    def begin_talker(self, cache: Cache, rope_delta: int) -> None:
        if cache.get_seq_length() >= self._pool.talker.tokens or not self._pool.talker.free_slots:
            self._on_fallback("talker_prompt_too_long" if self._pool.talker.free_slots else "no_free_slot")
            self._grown().begin_talker(cache, rope_delta)
            return
        self._slots["talker"] = self._pool.talker.admit(cache, rope_delta)

    def call(self, part: str, *args: Any) -> Call:
        slot = self._slots.get(part)
        if slot is None:
            return self._grown().call(part, *args)
        batch = self._batch(part)
        if batch.is_full(slot):  # continue alone on a growing cache; the other sessions of the batch go on
            cache, rope_delta = batch.export(slot)
            batch.release(self._slots.pop(part))
            self._on_fallback(f"{part}_outgrew_slot")
            log.info("a %s sequence outgrew its slot (%d tokens): it goes on on a growing cache", part, batch.tokens)
            grown = self._grown()
            (grown.begin_thinker if part == "thinker" else grown.begin_talker)(cache, rope_delta)
            return grown.call(part, *args)
        return Call(self._pool, part, (slot, *args))

    def end_talker(self) -> None:
        if "talker" in self._slots:
            self._pool.talker.release(self._slots.pop("talker"))
        elif self._growing is not None:
            self._growing.end_talker()

    def release(self) -> None:
        self.end_talker()
        if "thinker" in self._slots:
            self._pool.thinker.release(self._slots.pop("thinker"))
        if self._growing is not None:
            self._growing.release()
            self._growing = None


class GrowingCaches(ABC):
    """One request's decode steps through the model's own `forward` on growing `DynamicCache`s: the reference
    path. It answers its own calls one at a time (caches of different lengths do not batch)."""

    def __init__(self) -> None:
        self.thinker_cache: Cache | None = None
        self.thinker_rope_delta = 0
        self.talker_cache: Cache | None = None
        self.talker_rope_delta = 0

    def begin_thinker(self, cache: Cache, rope_delta: int) -> None:
        self.thinker_cache, self.thinker_rope_delta = cache, rope_delta

    def begin_talker(self, cache: Cache, rope_delta: int) -> None:
        self.talker_cache, self.talker_rope_delta = cache, rope_delta

    def call(self, part: str, *args: Any) -> Call:
        return Call(self, part, args)

    def run(self, part: str, calls: list[Any]) -> list[Any]:
        step = self.thinker_step if part == "thinker" else self.talker_step
        return [step(*args) for args in calls]

    @abstractmethod
    def thinker_step(self, *args: Any) -> Any:
        """One thinker token through `thinker_cache`."""

    @abstractmethod
    def talker_step(self, *args: Any) -> Any:
        """One talker position through `talker_cache`."""

    def end_talker(self) -> None:
        self.talker_cache = None

    def release(self) -> None:
        self.thinker_cache = self.talker_cache = None


Decoder = SlotSeats | GrowingCaches
"""Where a request's decode calls go: shared batched slots, or its own growing caches."""
