"""Stages run in order over one state: how ``merge`` and ``calibrate`` are put together.

Modelled on ``torch.fx.passes.infra`` (``PassBase``: ``requires`` / ``call`` /
``ensures``; ``PassManager`` runs a list in order). A stage declares the state
fields it reads (``reads``) and the ones it sets (``writes``), so the order of
a pipeline is checked once, when it is built (``check_order``), and every
stage's preconditions are checked when it runs, instead of being comments in
one long function. Each stage takes the state's current ``GraphModule``
(``None`` before the merged graph exists) and the state, and returns the
``GraphModule`` and what it measured (``StageResult``); the pipeline stores
the graph, adds the measurements to the state's ``details`` (the report's
details), and times the stage under its ``timer`` key (``report.seconds``).

Whether a stage runs depends on the options and on what earlier stages found
(``applies``): the refit runs only when asked for, the split only when a cut
was chosen. The cut lives in the state; the stages read it.
"""
from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, Sequence

import torch.fx as fx

__all__ = ["Stage", "StageResult", "StageOrderError", "check_order", "run_stages", "timed"]


@contextmanager
def timed(seconds: dict[str, float], key: str) -> Iterator[None]:
    """Add the wall seconds of the block to ``seconds[key]``: the one clock of a
    merge's phases (``report.seconds``). Looked up on this module at every use,
    so a profiler may wrap it (``benchmarks/perf.py`` adds CPU seconds)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - start


class StageOrderError(RuntimeError):
    """A pipeline whose stages read a field no earlier stage writes: a bug in
    how the pipeline was put together, not in the user's call."""


@dataclass
class StageResult:
    """What a stage returns: the graph after it (``None`` before the merged
    graph exists) and what it measured, keyed as in ``report.details``."""

    graph_module: fx.GraphModule | None
    measured: dict[str, Any] = field(default_factory=dict)


class Stage:
    """One step of a pipeline over a state object (``fxzip.stages.MergeState``).

    Subclasses set ``name`` (for messages), ``timer`` (the key of their time in ``report.seconds``; stages may
    share one), ``reads`` and ``writes`` (state fields), and implement ``call``;
    ``applies`` says whether the options ask for the stage at all.
    """

    name: ClassVar[str] = ""
    timer: ClassVar[str] = ""
    reads: ClassVar[tuple[str, ...]] = ()
    writes: ClassVar[tuple[str, ...]] = ()

    def applies(self, state: Any) -> bool:
        return True

    def requires(self, state: Any) -> None:
        """Every field the stage reads is set (not ``None``)."""
        missing = [f for f in self.reads if getattr(state, f, None) is None]
        if missing:
            raise StageOrderError(f"stage {self.name!r} needs {missing}, which no earlier stage set")

    def call(self, graph_module: fx.GraphModule | None, state: Any) -> StageResult:
        raise NotImplementedError

    def ensures(self, state: Any) -> None:
        """Every field the stage writes is set once it ran."""
        missing = [f for f in self.writes if getattr(state, f, None) is None]
        if missing:
            raise StageOrderError(f"stage {self.name!r} did not set {missing}")

    def __call__(self, state: Any) -> None:
        self.requires(state)
        with timed(state.seconds, self.timer) if self.timer else nullcontext():
            result = self.call(state.graph_module, state)
        state.graph_module = result.graph_module
        state.details.update(result.measured)
        self.ensures(state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def check_order(stages: Sequence[Stage], given: Sequence[str] = ()) -> None:
    """Raise ``StageOrderError`` unless every field a stage reads is ``given``
    (set when the state is made) or written by a stage before it. Checked when a
    pipeline is defined, so a reordering fails at import, not in a user's merge."""
    written = set(given)
    for stage in stages:
        missing = [f for f in stage.reads if f not in written]
        if missing:
            raise StageOrderError(f"stage {stage.name!r} reads {missing} before any stage writes them "
                                  f"(order: {[s.name for s in stages]})")
        written.update(stage.writes)


def run_stages(stages: Sequence[Stage], state: Any) -> Any:
    """Run the stages that apply, in order, over ``state``; returns the state."""
    for stage in stages:
        if stage.applies(state):
            stage(state)
    return state
