"""Batched stepping: the model calls of many sessions' steps go to their runner together, part by part."""

from __future__ import annotations

from typing import Any

from omnivox.pipeline.engines.base import Delta, TextDelta
from omnivox.pipeline.engines.stepping import Call, StepPlan, run_steps


class RecordingRunner:
    """Answers each call with its argument doubled and records every batch it was given."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.batches: list[tuple[str, list[Any]]] = []
        self.fail_on = fail_on

    def run(self, part: str, calls: list[Any]) -> list[Any]:
        self.batches.append((part, list(calls)))
        if part == self.fail_on:
            raise RuntimeError(f"{part} failed")
        return [2 * value for value in calls]


def thinker_then_talker(runner: RecordingRunner, value: int, cleanups: list[int]) -> StepPlan:
    try:
        thought = yield Call(runner, "thinker", value)
        spoken = yield Call(runner, "talker", thought + 1)
    finally:
        cleanups.append(value)
    return [TextDelta(f"{value}->{spoken}")]


def talker_only(runner: RecordingRunner, value: int) -> StepPlan:
    spoken = yield Call(runner, "talker", value)
    return [TextDelta(f"talker {spoken}")]


def no_calls() -> StepPlan:
    deltas: list[Delta] = [TextDelta("done")]
    return deltas
    yield  # a generator that finishes without calling the model


ORDER = ("thinker", "talker")


def test_calls_of_one_part_go_to_a_shared_runner_as_one_batch_in_part_order() -> None:
    shared = RecordingRunner()
    cleanups: list[int] = []
    results = run_steps(
        [thinker_then_talker(shared, 1, cleanups), talker_only(shared, 10), thinker_then_talker(shared, 5, cleanups)],
        ORDER,
    )
    assert shared.batches == [("thinker", [1, 5]), ("talker", [10, 3, 11])]
    assert results == [[TextDelta("1->6")], [TextDelta("talker 20")], [TextDelta("5->22")]]


def test_separate_runners_are_called_separately() -> None:
    first, second = RecordingRunner(), RecordingRunner()
    run_steps([thinker_then_talker(first, 1, []), thinker_then_talker(second, 2, [])], ORDER)
    assert first.batches == [("thinker", [1]), ("talker", [3])]
    assert second.batches == [("thinker", [2]), ("talker", [5])]


def test_a_failing_runner_fails_only_the_steps_whose_calls_it_held() -> None:
    broken, healthy = RecordingRunner(fail_on="talker"), RecordingRunner()
    cleanups: list[int] = []
    results = run_steps(
        [thinker_then_talker(broken, 1, cleanups), thinker_then_talker(healthy, 2, cleanups), no_calls()], ORDER
    )
    assert isinstance(results[0], RuntimeError) and str(results[0]) == "talker failed"
    assert results[1] == [TextDelta("2->10")]
    assert results[2] == [TextDelta("done")]
    assert sorted(cleanups) == [1, 2]  # the failed step ran its own clean-up
