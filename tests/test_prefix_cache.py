"""The per-conversation prompt store: only a continuing prompt reuses an entry, and memory stays bounded."""

from __future__ import annotations

from typing import Any

from omnivox.pipeline.engines.prefix_cache import Prefix, PrefixStore


def prefix(ids: list[int], audio: tuple[str, ...] = ("a",)) -> Prefix:
    cache: Any = object()  # the store never looks inside the KV
    return Prefix(ids, audio, cache, None)


def test_a_continuing_prompt_takes_the_entry_and_anything_else_misses() -> None:
    store = PrefixStore(4)
    store.put("call", prefix([1, 2, 3]))
    assert store.take("call", [1, 2, 3, 4], ("a", "b")) is not None
    assert store.take("call", [1, 2, 3, 4], ("a",)) is None  # taken: one generation owns it at a time
    for ids, audio in (([1, 2, 3], ("a",)), ([1, 9, 3, 4], ("a",)), ([1, 2, 3, 4], ("z",))):
        store.put("call", prefix([1, 2, 3]))
        assert store.take("call", ids, audio) is None  # same length, edited text, changed audio
    assert (store.hits, store.misses) == (1, 4)


def test_the_least_recently_used_conversation_goes_first_and_forget_frees_at_once() -> None:
    store = PrefixStore(2)
    for name in ("a", "b", "c"):
        store.put(name, prefix([1]))
    assert len(store) == 2 and store.take("a", [1, 2], ("a",)) is None
    store.forget("b")
    assert len(store) == 1 and store.take("c", [1, 2], ("a",)) is not None
    store.put("d", prefix([1]))
    store.clear()  # what the engine does when the GPU runs out of memory
    assert len(store) == 0


def test_nothing_is_kept_without_capacity_or_conversation() -> None:
    store = PrefixStore(0)
    store.put("call", prefix([1]))
    assert len(store) == 0
    store = PrefixStore(2)
    store.put("", prefix([1]))
    assert len(store) == 0
