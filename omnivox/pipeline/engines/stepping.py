"""Run one step of many generations so that their model calls of the same kind go to the GPU as one batch.

A generation writes its step as straight-line code that `yield`s each model call it needs (a `Call`) and receives
the answer; `run_steps` advances every generation to its next call, then answers the waiting calls part by part in
a fixed order (the thinker before the talker, and so on), one `runner.run(part, [...])` per runner. A runner that
can batch (the shared decode slots) answers all sessions at once; a per-request runner (growing caches) answers
its one call. The step logic thus exists once, whether one session or twenty are speaking.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from omnivox.pipeline.engines.base import Delta


class CallRunner(Protocol):
    def run(self, part: str, calls: list[Any]) -> list[Any]:
        """Answer the calls (their `args`, in order) of one part; returns one answer per call."""


@dataclass(frozen=True)
class Call:
    """A model call a generation waits on: `runner` answers it together with the other calls of `part`."""

    runner: CallRunner
    part: str
    args: Any


StepPlan = Generator[Call, Any, list[Delta]]
"""One step of one generation: yields its model calls, returns the step's deltas."""


def only_result(results: list[list[Delta] | BaseException]) -> list[Delta]:
    """The deltas of a step run for one generation alone, raising what failed it."""
    (result,) = results
    if isinstance(result, BaseException):
        raise result
    return result


def run_steps(plans: Sequence[StepPlan], part_order: Sequence[str]) -> list[list[Delta] | BaseException]:
    """Advance every plan to its end; returns each step's deltas, or the exception that ended it.

    A failing runner fails only the generations whose calls it held: the exception is raised inside each of them
    (so they can clean up) and returned in their place; the others go on.
    """
    rank = {part: index for index, part in enumerate(part_order)}
    results: list[list[Delta] | BaseException | None] = [None] * len(plans)
    waiting: dict[int, Call] = {}

    def resume(index: int, answer: Any = None, error: BaseException | None = None) -> None:
        plan = plans[index]
        try:
            waiting[index] = plan.send(answer) if error is None else plan.throw(error)
        except StopIteration as stop:
            results[index] = stop.value
        except Exception as exc:
            results[index] = exc

    for index in range(len(plans)):
        resume(index)
    while waiting:
        part = min((call.part for call in waiting.values()), key=rank.__getitem__)
        by_runner: dict[int, list[int]] = {}
        for index, call in waiting.items():
            if call.part == part:
                by_runner.setdefault(id(call.runner), []).append(index)
        for indices in by_runner.values():
            calls = [waiting.pop(index) for index in indices]
            try:
                answers = calls[0].runner.run(part, [call.args for call in calls])
            except Exception as exc:
                for index in indices:
                    resume(index, error=exc)
                continue
            for index, answer in zip(indices, answers, strict=True):
                resume(index, answer)
    return [result if result is not None else [] for result in results]
