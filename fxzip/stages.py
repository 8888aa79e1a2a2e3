"""The stages of a merge, in order, over one ``MergeState``.

``MERGE_STAGES`` is the order of a merge, written once::

    capture -> cut -> widths -> calibrate -> match -> fold -> refit -> split
    -> check_widths -> refit_heads -> repair -> reset -> report

``CALIBRATE_STAGES`` (``fxzip.calibrate``) is its first part. Each stage says
what it reads and writes (checked by ``pipeline.check_order`` when this module
is imported) and when it applies; a partial zip is the state's ``cut``, which
the split, the refits and the norm reset read, not a branch in ``merge``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx
from torch import nn
from tqdm.auto import tqdm

from . import distributed as _dist
from .calibration import Calibration, capture
from .cuts import CutPoint, choose_cut, find_cuts, resolve_cut, shared_cuts
from .evaluate import count_macs
from .match_spaces import match_dual_space, match_spaces, note_widths
from .options import MergeOptions
from .passes.fold import fold
from .passes.head_refit import refit_partial
from .passes.refit import refit
from .passes.repair import repair
from .passes.reset_norm import reset_batch_norm
from .passes.side_by_side import side_by_side
from .passes.split import depends_on_trunk, split_aligned, split_at_cut
from .passes.ties import UNTIED
from .pipeline import Stage, StageResult, check_order
from .report import MergeReport, SpaceReport, output_warnings
from .trace import captured_batch_size, default_example, first_samples
from .warn import warn_caller
from .widths import WidthPlan, plan_widths

__all__ = ["MergeState", "MERGE_STAGES", "CALIBRATE_STAGES"]


@dataclass(eq=False)
class MergeState:
    """Everything a merge has found so far. Fields a stage writes start as
    ``None`` (``cut`` may stay ``None``: a full zip), and ``Stage.requires``
    checks the ones it reads."""

    originals: Sequence[nn.Module]
    options: MergeOptions
    data: Iterable[Any] | None = None
    max_batches: int | None = None
    inputs: Callable[[Any], Any] | None = None
    example_inputs: Any = None
    calibration: Calibration | None = None
    owns_calibration: bool = False  # made by this merge (not passed as data): its statistics may be freed
    cut: CutPoint | None = None
    cut_reason: str | None = None
    plan: WidthPlan | None = None
    matches: dict[int, Any] | None = None
    rows: list[SpaceReport] | None = None
    graph_module: fx.GraphModule | None = None
    report: MergeReport | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def models(self) -> list[fx.GraphModule]:
        return self.calibration.models

    @cached_property
    def weights(self) -> list[Any]:
        """Every model's weights: the traced models, or (models aligned by
        ``fxzip.align``) their state dicts under model 0's names; built once,
        on first use (the match and the fold both read them)."""
        common = self.calibration.common
        if common is None:
            return self.models
        return [common.state(k) for k in range(len(self.models))]

    @property
    def assign(self) -> dict[int, torch.Tensor]:
        return {i: m.assign for i, m in self.matches.items()}

    @cached_property
    def joint(self) -> tuple[fx.GraphModule, list[dict[str, fx.Node]]]:
        """The originals side by side (their own activations, for the refit and
        the repair); built once, on first use."""
        return side_by_side(self.models, self.calibration.common)

    def bar(self, desc: str, total: int | None = None) -> Callable[[Iterable], Iterable]:
        return lambda it: tqdm(it, total=total, desc=desc, disable=not self.options.progress, leave=False)


class Capture(Stage):
    """Trace every model on the first batch and analyse the graphs (skipped
    when a ``Calibration`` was passed as data: it holds them)."""

    name, writes = "capture", ("calibration",)

    def applies(self, state: MergeState) -> bool:
        return state.calibration is None

    def call(self, graph_module, state: MergeState) -> StageResult:
        data = state.data
        if data is None:  # a data-free merge traces on the example input
            data = [state.example_inputs if state.example_inputs is not None else default_example(state.originals[0])]
        state.calibration = capture(state.originals, data, state.max_batches, state.inputs, state.options.probes)
        state.owns_calibration = True
        state.seconds.update(state.calibration.seconds)
        return StageResult(graph_module)


class ChooseCut(Stage):
    """Where a partial zip splits (``stop_at``, or the last cut models that
    differ after a trunk share); for a full zip, what happens to the outputs."""

    name, timer, reads, writes = "cut", "analysis", ("calibration",), ("cut_reason",)

    def call(self, graph_module, state: MergeState) -> StageResult:
        cal, stop_at = state.calibration, state.options.stop_at
        if cal.common is None:
            state.cut = resolve_cut(stop_at, find_cuts(cal.models[0], cal.analysis)) if stop_at is not None else None
            state.cut_reason = "" if state.cut is None else f"stop_at={stop_at!r}"
        else:
            state.cut, state.cut_reason = choose_cut(stop_at, shared_cuts(cal.models, cal.common, cal.analysis),
                                                     cal.common)
        if state.cut is None:
            state.warnings += output_warnings(cal.analysis, cal.models, cal.common)
        elif state.options.repair:
            msg = "repair applies to full zips only; the partial zip was not changed by it"
            warn_caller(msg)
            state.warnings.append(msg)
        return StageResult(graph_module)


class PlanWidths(Stage):
    """Merged features per space for ``merged_width``, before any data is read
    (a space named wrongly fails here)."""

    name, timer, reads, writes = "widths", "analysis", ("calibration",), ("plan",)

    def call(self, graph_module, state: MergeState) -> StageResult:
        cal = state.calibration
        state.plan = plan_widths(cal.models[0], cal.analysis, state.options.merged_width, len(cal.models))
        return StageResult(graph_module)


class Calibrate(Stage):
    """One pass over the data, the models side by side, observing every space's
    statistics (a no-op when a ``Calibration`` already holds them). Not needed by
    weight-only matching or when nothing is zipped (``stop_at=0``)."""

    name, timer, reads = "calibrate", "calibration", ("calibration",)

    def applies(self, state: MergeState) -> bool:
        nothing_zipped = state.cut is not None and state.cut.k == 0
        return state.options.needs_activations and not state.options.data_free and not nothing_zipped

    def call(self, graph_module, state: MergeState) -> StageResult:
        state.calibration.run(state.options.progress)
        return StageResult(graph_module)


class Match(Stage):
    """Match every space's features across (and within) models."""

    name, timer, reads, writes = "match", "matching", ("calibration", "plan"), ("matches", "rows")

    def call(self, graph_module, state: MergeState) -> StageResult:
        opts, cal = state.options, state.calibration
        n, widths = len(cal.models), state.plan.widths
        measured: dict[str, Any] = {}
        if opts.dual_space:
            state.matches, state.rows, measured = match_dual_space(
                cal.analysis, state.weights, cal.stats, opts.matcher, n, opts.alpha, opts.beta, opts.method,
                opts.weight_similarity, opts.seed, opts.progress, widths)
        else:
            state.matches, state.rows = match_spaces(cal.analysis, cal.stats, opts.matcher, n, opts.alpha,
                                                     opts.beta, opts.method, opts.progress, widths, state.weights,
                                                     release=state.owns_calibration)
        note_widths(state.rows, state.plan)
        if opts.needs_activations and not opts.data_free:
            measured["probes"] = cal.probes.name
        return StageResult(graph_module, measured)


class Fold(Stage):
    """Fold each space's merge and unmerge into one copy of the architecture."""

    name, timer, reads, writes = "fold", "folding", ("calibration", "matches"), ("graph_module",)

    def call(self, graph_module, state: MergeState) -> StageResult:
        cal = state.calibration
        return StageResult(fold(cal.models[0], state.weights, cal.analysis, state.assign))


class Refit(Stage):
    """Closed-form least-squares refit of every weight layer of a full zip (a
    partial zip's trunk and heads are refit together after the split)."""

    name, timer, reads = "refit", "refit", ("calibration", "matches", "graph_module")

    def applies(self, state: MergeState) -> bool:
        return state.options.ridge is not None and state.cut is None

    def call(self, graph_module, state: MergeState) -> StageResult:
        cal = state.calibration
        joint, node_maps = state.joint
        fitted = refit(graph_module, cal.analysis, joint, node_maps, state.assign, cal.batches, state.options.ridge,
                       progress=lambda it: state.bar("fxzip refit")(list(it)),
                       max_memory=state.options.max_memory, cache_dtype=state.options.cache_dtype)
        return StageResult(graph_module, {"refit": fitted.summary()})


class Split(Stage):
    """A partial zip: the merged graph cut into a shared trunk and one head per model."""

    name, timer, reads = "split", "folding", ("calibration", "matches", "graph_module")

    def applies(self, state: MergeState) -> bool:
        return state.cut is not None

    def call(self, graph_module, state: MergeState) -> StageResult:
        cal = state.calibration
        if cal.common is not None:
            return StageResult(split_aligned(graph_module, cal.models, cal.common, state.cut, state.assign))
        return StageResult(split_at_cut(graph_module, cal.models, cal.analysis, state.cut, state.assign))


class CheckWidths(Stage):
    """Run one sample through a widened graph, so that a size fxzip did not
    rewrite fails here, naming the node, instead of in the user's code."""

    name, timer, reads = "check_widths", "folding", ("plan", "graph_module", "calibration")

    def applies(self, state: MergeState) -> bool:
        return bool(state.plan.widths)

    def call(self, graph_module, state: MergeState) -> StageResult:
        check_widened(graph_module, state.calibration.batches.example)
        return StageResult(graph_module)


class RefitHeads(Stage):
    """A refit partial zip, in one walk over the data (``passes.head_refit``):
    the trunk's layers as a full zip's; where a head gathers the merged
    features, a least-squares map to its model's own (``passes.cut_map``); then
    each head's first layers refit to reproduce their own model's outputs
    from what they read."""

    name, timer, reads = "refit", "refit", ("calibration", "matches", "graph_module")

    def applies(self, state: MergeState) -> bool:
        return state.options.ridge is not None and state.cut is not None

    def call(self, graph_module, state: MergeState) -> StageResult:
        cal = state.calibration
        joint, node_maps = state.joint
        trunk, maps, heads = refit_partial(graph_module, cal.analysis, joint, node_maps, state.assign, cal.models,
                                           cal.batches, state.options.ridge,
                                           progress=lambda it: state.bar("fxzip refit")(list(it)),
                                           max_memory=state.options.max_memory,
                                           cache_dtype=state.options.cache_dtype)
        fitted = trunk.summary()  # passes and data_reads: the one walk's, shared by all three
        fitted["heads"] = heads.summary()
        fitted["cut_maps"] = maps.summary()
        return StageResult(graph_module, {"refit": fitted})


class Repair(Stage):
    """REPAIR: every merged feature gets the mean and std its matched originals
    had, where it enters a nonlinearity or a norm. Full zips only."""

    name, timer, reads = "repair", "repair", ("calibration", "matches", "graph_module")

    def applies(self, state: MergeState) -> bool:
        return state.options.repair and state.cut is None

    def call(self, graph_module, state: MergeState) -> StageResult:
        cal, reset = state.calibration, state.options.reset_bn
        if reset:  # the repair measures features downstream of the norms: reset them first
            reset_batch_norm(graph_module, cal.batches, _run_batch)
        mergeable = {sp.index for sp in cal.analysis.spaces if sp.mergeable}
        joint, node_maps = state.joint
        fixed = repair(graph_module, cal.analysis, mergeable, joint, node_maps, state.assign, cal.batches,
                       max_memory=state.options.max_memory, cache_dtype=state.options.cache_dtype)
        return StageResult(graph_module, {"repair": {**fixed.summary(), "norm_reset_passes": 2 if reset else 0}})


class ResetNorms(Stage):
    """Recompute batch-norm statistics of the result on the data. A partial
    zip's heads before any merged weight keep their model's statistics."""

    name, timer, reads = "reset", "reset", ("calibration", "graph_module")

    def applies(self, state: MergeState) -> bool:
        return state.options.reset_bn

    def call(self, graph_module, state: MergeState) -> StageResult:
        batches = state.calibration.batches
        reset_batch_norm(graph_module, batches, _run_batch,
                         progress=state.bar("fxzip reset norms", len(batches) or None),
                         only=None if state.cut is None else depends_on_trunk(graph_module))
        return StageResult(graph_module)


class Report(Stage):
    """The ``MergeReport`` in ``result.meta["fxzip"]``; under torch.distributed,
    a check that every rank holds the same weights, bit for bit."""

    name, reads, writes = "report", ("calibration", "rows", "graph_module", "cut_reason"), ("report",)

    def call(self, graph_module, state: MergeState) -> StageResult:
        cal = state.calibration
        state.seconds["total"] = sum(state.seconds.values())
        macs = merged_macs(graph_module, cal.models, cal.batches.example, cal.common is None or cal.common.full)
        for names in graph_module.meta.get(UNTIED, []):
            state.details.setdefault("untied", []).append(names)
            state.warnings.append(
                f"parameters tied in the models ({', '.join(names)}) were untied: their merged values differ "
                "(a zip within a model, MuDSC weighting, a merged width or a refit gives each role its own "
                "tensor); load the result with the tie off (transformers: tie_word_embeddings=False)")
        state.report = MergeReport(state.options.method, len(cal.models), state.rows, state.seconds, cal.n_batches,
                                   cal.n_samples, state.warnings, state.cut, macs, state.details, state.cut_reason)
        graph_module.meta["fxzip"] = state.report.mark_head_only(graph_module)
        _dist.check_same_result(graph_module)
        return StageResult(graph_module)


CALIBRATE_STAGES: tuple[Stage, ...] = (Capture(), Calibrate())
MERGE_STAGES: tuple[Stage, ...] = (Capture(), ChooseCut(), PlanWidths(), Calibrate(), Match(), Fold(), Refit(),
                                   Split(), CheckWidths(), RefitHeads(), Repair(), ResetNorms(), Report())
check_order(CALIBRATE_STAGES)
check_order(MERGE_STAGES)


def _run_batch(module: fx.GraphModule, batch: tuple) -> Any:
    return module(*batch)


def merged_macs(merged: fx.GraphModule, gms: Sequence[fx.GraphModule], example: tuple, same: bool = True
                ) -> dict[str, float]:
    """Multiply-adds per input of the result, one original (model 0) and the
    ensemble (``same``: the models are one architecture, N times model 0):
    counted on a batch of one, or of the size a graph was captured for
    (``trace.captured_batch_size``), divided by it."""
    n = captured_batch_size(gms[0]) or 1
    batch = first_samples(example, n)

    def per_input(gm: fx.GraphModule) -> int:
        return count_macs(gm, batch) // n

    original = per_input(gms[0])
    ensemble = original * len(gms) if same else original + sum(per_input(gm) for gm in gms[1:])
    return {"merged": per_input(merged), "original": original, "ensemble": ensemble}


def check_widened(merged: fx.GraphModule, example: tuple) -> None:
    """Run one sample through the widened graph; raise naming the node where a
    channel count fxzip did not rewrite fails."""
    from torch.fx.passes.shape_prop import ShapeProp

    one = tuple(t[:1] if isinstance(t, torch.Tensor) and t.dim() > 0 else t for t in example)
    try:
        with torch.no_grad():
            ShapeProp(merged).propagate(*one)
    except Exception as exc:  # noqa: BLE001 - reported with the node it failed at
        node = next((n for n in merged.graph.nodes if n.op not in ("placeholder", "get_attr")
                     and "tensor_meta" not in n.meta), None)
        where = f" at node {node.name} ({node.target})" if node is not None else ""
        cause = str(exc.__cause__ or exc).splitlines()[0]
        raise ValueError(f"the widened model fails{where}: {cause}. That op holds a channel count fxzip does not "
                         "rewrite; pass merged_width as a dict that leaves its space at 1.0, or register a width "
                         "rule (fxzip.widths.register_width_rule)") from None
