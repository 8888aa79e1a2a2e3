"""``fxzip.merge``: trace -> analyze -> calibrate -> match -> fold -> reset.

Every input is checked before any forward pass over the data, so a mistake
costs seconds, not a calibration run.
"""
from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.fx as fx
from torch import nn
from tqdm.auto import tqdm

from . import distributed as _dist
from .align import CommonPart
from .analysis import GraphAnalysis
from .cuts import choose_cut, find_cuts, resolve_cut, shared_cuts
from .data import Batches
from .grouped import blocks_of, identity_match, match_all, match_units
from .matching import MATCHERS, Similarity, get_matcher, mean_matched_correlation
from .mudsc import dual_space_match
from .passes.fold import fold
from .passes.observe import OBSERVERS, insert_observers
from .passes.refit import DEFAULT_RIDGE, refit_heads
from .passes.refit import refit as refit_weights
from .passes.repair import repair as repair_variance
from .passes.reset_norm import reset_batch_norm
from .passes.side_by_side import side_by_side
from .passes.split import depends_on_trunk, split_aligned, split_at_cut, trunk_node_names
from .probes import DEFAULT_PROBES, PROBE_POLICIES, ProbePolicy, probe_policy
from .report import MergeReport, SpaceReport
from .trace import default_example, trace
from .trunk import analyze_models
from .widths import WidthPlan, plan_widths

__all__ = ["merge", "calibrate", "Calibration", "check_same_architecture"]


def merge(*models: nn.Module, data: Iterable[Any] | None, method: str = "zipit", alpha: float = 0.3,
          beta: float = 0.125, stop_at: Any = None, reset_bn: bool | None = None, max_batches: int | None = None,
          inputs: Callable[[Any], Any] | None = None, progress: bool = True, weight_similarity: float = 0.5,
          example_inputs: Any = None, seed: int = 0, probes: str | ProbePolicy = DEFAULT_PROBES,
          repair: bool = False, refit: bool | float = False,
          merged_width: float | Mapping[str, float] = 1.0) -> fx.GraphModule:
    """Merge models of one architecture, trained on different tasks, into one.

    Args:
        models: two or more models with the same architecture (any ``nn.Module``
            torch.fx can trace, timm models included). They are never modified.
            Models are matched by structure and data flow, not by names: one
            architecture from other code (timm's and torchvision's resnet18)
            merges fully, taking model 0's structure and names. Models that
            agree from the input up to some layer and differ after it (another
            number of classes, another head) give a partial zip at the last cut
            point they share (see ``stop_at``).
        data: unlabeled calibration batches (a DataLoader, or a list of tensors or
            of (x, y) tuples); a few hundred images suffice. A ``Calibration``
            from ``fxzip.calibrate`` reuses its statistics. ``None``: a data-free
            merge (``method="mudsc"``/``"mudsc_permute"`` with
            ``weight_similarity=1.0``, or ``"weight_average"``); then
            ``example_inputs`` gives the shapes for tracing. Under
            ``torch.distributed`` (more than one rank): this rank's shard, the
            statistics combined across ranks, every rank returning the same
            model (``fxzip.distributed``; shard without shuffling or padding:
            ``DistributedSampler``'s defaults do both, which changes the
            statistics).
        method: "zipit", "permute", "weight_average" (or another registered
            matcher), or MuDSC's dual-space matching on top of zipit ("mudsc") or
            of permute ("mudsc_permute").
        alpha, beta: zipit's repeated-matching factor and within-model budget
            (also used by "mudsc").
        stop_at: partial zip: a cut point's name, a ``CutPoint`` or an int k (the
            last cut with ``k`` or fewer layers zipped; 0 zips nothing). The result
            then returns a tuple with one output per model (see ``fxzip.cut_points``).
            For models that differ after a shared trunk it may pick an earlier cut
            than the last shared one; a later one is an error.
        reset_bn: recompute batch-norm statistics of the result on ``data``
            (default: whenever there is data). Without data the running
            statistics are merged like the weights. In a partial zip, norms
            that no merged weight feeds (every head of ``stop_at=0``) keep
            their model's own statistics.
        max_batches: use at most this many batches of ``data`` (per rank
            under ``torch.distributed``).
        inputs: picks the model input out of a batch, e.g. ``lambda b: b["image"]``.
        weight_similarity: MuDSC's balance: similarity = ``weight_similarity *
            S_weights + (1 - weight_similarity) * S_activations``.
        example_inputs: an input batch for tracing when ``data`` is None (timm
            models with a declared input size need none).
        seed: seeds MuDSC's order of re-matching spaces.
        probes: where each feature space is observed (``fxzip.probes``): "all"
            probe points pooled, "last" (where a stream leaves its stage),
            "before_reduce" (feature maps before global pooling or class-token
            select, not after), combinations, or a ``ProbePolicy``. With a
            ``Calibration`` as ``data`` it must be the calibration's policy.
        repair: variance repair (REPAIR): give every merged feature, where it
            enters a nonlinearity or a norm, the mean and std its matched
            originals had, folded into the layer that produces it (no new
            parameters; ``fxzip.passes.repair``). For BatchNorm features the norm
            reset does this; repair covers GroupNorm, LayerNorm, norm-free nets
            and transformers. Costs one pass over ``data`` for the targets and
            about one per layer depth (``report.details["repair"]``). Full zips.
        refit: closed-form least-squares refit of every weight layer, in network
            order, so that on the merged model's own inputs it reproduces the
            matched average of the originals' outputs (``fxzip.passes.refit``);
            works with every matcher. ``True`` uses a ridge toward the folded
            weights of 1e-3 of the Gram's mean eigenvalue; a float sets that
            factor. One pass over ``data`` per layer depth
            (``report.details["refit"]``). Full and partial zips: a partial
            zip's trunk is refit before the split, then each head's first
            layers are refit to reproduce their own model's outputs from the
            trunk's merged features (one more pass). Runs before ``repair``
            and the norm reset.
        merged_width: merged features per space as a multiple of one model's
            width: 1.0 merges as the papers do; N keeps every feature of the N
            models apart (the ensemble, side by side); in between, the least
            similar features stay apart (zipit stops clustering early, permute
            leaves its weakest matches unmerged; grouped spaces grow by whole
            heads or groups). A layer between two widened spaces costs
            ``merged_width**2`` times its multiply-adds (``report.macs``), so a
            full zip is cheaper than the ensemble below ``sqrt(N)``. A dict maps
            a space's report name to its factor (others stay at 1). Spaces that
            pass through an op that cannot take more channels (a channel slice,
            a module fxzip cannot resize) keep one model's width and the report
            says why. The result's layers are wider, so it no longer loads into
            the original class (``fxzip.save`` writes a ``torch.export`` program).

    Returns:
        Full zip: a ``GraphModule`` with the architecture's nodes and parameter
        shapes (its ``state_dict`` loads into a fresh model). Partial zip: a
        ``GraphModule`` with submodules ``trunk`` and ``head0..headN-1``.
        ``result.meta["fxzip"]`` is a ``MergeReport`` (``.cut`` and ``.cut_reason``
        say where a partial zip was cut and why).
    """
    # several processes: this rank's data is its shard; ranks must agree on everything else
    data = _dist.check_ranks(models, data, {k: v for k, v in locals().items() if k not in _PER_RANK})
    progress = progress and _dist.is_main()
    matcher = _check_args(models, method, alpha, beta, stop_at)
    _check_width_arg(merged_width, method, len(models))
    policy = probe_policy(probes)
    if repair and data is None:
        raise ValueError("repair=True measures the merged features on data; pass data=..., or repair=False for a "
                         "data-free merge.")
    if refit is not False and data is None:
        raise ValueError("refit fits the merged weights on data; pass data=..., or refit=False for a data-free merge.")
    ridge = DEFAULT_RIDGE if refit is True else float(refit) if refit is not False else 0.0
    if refit is not False and not ridge > 0:
        raise ValueError(f"refit must be True or a positive ridge factor, got {refit!r}")
    reset_bn = _check_data_free(models, data, method, weight_similarity, reset_bn, example_inputs)
    if isinstance(data, Calibration):
        cal = data.reused_for(models, policy)
    elif data is None:
        cal = _prepare(models, [example_inputs if example_inputs is not None else default_example(models[0])],
                       None, inputs, policy)
    else:
        cal = _prepare(models, data, max_batches, inputs, policy)
    seconds = dict(cal.seconds)
    analysis, gms, batches, common = cal.analysis, cal.models, cal.batches, cal.common
    with _timed(seconds, "analysis"):
        if common is None:
            cut = resolve_cut(stop_at, find_cuts(gms[0], analysis)) if stop_at is not None else None
            cut_reason = "" if cut is None else f"stop_at={stop_at!r}"
        else:
            cut, cut_reason = choose_cut(stop_at, shared_cuts(gms, common, analysis), common)
    # aligned models: every model's weights under model 0's names
    states = [common.state(k) for k in range(len(gms))] if common is not None else None
    report_warnings = _output_warnings(analysis, gms, common) if cut is None else []
    plan = plan_widths(gms[0], analysis, merged_width, len(models))
    data_free = data is None
    needs_activations = method != "weight_average" and not (method in DUAL_SPACE and weight_similarity == 1.0)
    if needs_activations and not data_free and not (cut is not None and cut.k == 0):
        with _timed(seconds, "calibration"):
            cal.run(progress)  # a no-op when the statistics were computed before
    details: dict[str, Any] = {}
    with _timed(seconds, "matching"):
        if method in DUAL_SPACE:
            matches, rows, details = _dual_space(analysis, states or gms, cal.stats, matcher, len(models), alpha,
                                                 beta, method, weight_similarity, seed, progress, plan.widths)
        else:
            matches, rows = _match_all(analysis, cal.stats, matcher, len(models), alpha, beta, method, progress,
                                       plan.widths)
        _note_widths(rows, plan)
    if needs_activations and not data_free:
        details["probes"] = cal.probes.name
    fitting = [name for name, on in (("refit", refit is not False), ("repair", repair)) if on]
    if "repair" in fitting and cut is not None:
        msg = "repair applies to full zips only; the partial zip was not changed by it"
        warnings.warn(msg, stacklevel=2)
        report_warnings.append(msg)
        fitting.remove("repair")
    joint, node_maps = side_by_side(gms, common) if fitting else (None, None)
    refit_bar = lambda it: tqdm(list(it), desc="fxzip refit", disable=not progress, leave=False)  # noqa: E731
    with _timed(seconds, "folding"):
        assign = {i: m.assign for i, m in matches.items()}
        merged = fold(gms[0], states or gms, analysis, assign)
    if "refit" in fitting:  # a partial zip's trunk is refit before the split, its heads after
        with _timed(seconds, "refit"):
            trunk = None if cut is None else trunk_node_names(merged, cut)
            fitted = refit_weights(merged, analysis, joint, node_maps, assign, batches, ridge, progress=refit_bar,
                                   only=trunk)
            details["refit"] = fitted.summary()
    with _timed(seconds, "folding"):
        if cut is not None and common is not None:
            merged = split_aligned(merged, gms, common, cut, assign)
        elif cut is not None:
            merged = split_at_cut(merged, gms, analysis, cut, assign)
        if plan.widths:
            _check_widened(merged, batches.example)
    if "refit" in fitting and cut is not None:
        with _timed(seconds, "refit"):
            heads = refit_heads(merged, gms, batches, ridge)  # head k is a copy of gms[k]
            details["refit"]["heads"] = heads.summary()
            details["refit"]["passes"] += heads.passes
    if "repair" in fitting:
        with _timed(seconds, "repair"):
            if reset_bn:  # the repair measures features downstream of the norms: reset them first
                reset_batch_norm(merged, batches, lambda m, b: m(*b))
            mergeable = {sp.index for sp in analysis.spaces if sp.mergeable}
            fixed = repair_variance(merged, analysis, mergeable, joint, node_maps, assign, batches)
            details["repair"] = {**fixed.summary(), "norm_reset_passes": 2 if reset_bn else 0}
    if reset_bn:
        with _timed(seconds, "reset"):  # a partial zip's heads before any merged weight keep their statistics
            reset_batch_norm(merged, batches, lambda m, b: m(*b),
                             progress=lambda b: tqdm(b, total=len(batches) or None, desc="fxzip reset norms",
                                                     disable=not progress, leave=False),
                             only=None if cut is None else depends_on_trunk(merged))
    seconds["total"] = sum(seconds.values())
    report = MergeReport(method, len(models), rows, seconds, cal.n_batches, cal.n_samples, report_warnings, cut,
                         _macs(merged, gms, batches.example, common is None or common.full), details, cut_reason)
    merged.meta["fxzip"] = report.mark_head_only(merged)
    _dist.check_same_result(merged)  # every rank holds the same weights, bit for bit
    return merged


_PER_RANK = ("models", "data", "max_batches", "inputs", "progress", "example_inputs")
"""merge's arguments that may differ between ranks (the rest must agree)."""


class Calibration:
    """Traced models, their analysis and (once run) per-space statistics.

    Pass it as ``data`` to ``merge`` to try several methods, alpha/beta values
    or cut points on one set of statistics: calibration runs once.
    """

    def __init__(self, originals: Sequence[nn.Module], models: list[fx.GraphModule], analysis: GraphAnalysis,
                 batches: Batches, seconds: dict[str, float], common: CommonPart | None = None,
                 probes: ProbePolicy = PROBE_POLICIES[DEFAULT_PROBES]):
        self.originals = list(originals)
        self.probes = probes
        self.models, self.analysis, self.batches = models, analysis, batches
        self.common = common  # None: node-for-node identical graphs; else the alignment (fxzip.align)
        self.seconds = seconds
        self.spaces = [sp.index for sp in analysis.spaces if sp.mergeable and sp.probes]
        self.stats: dict = {}
        self.n_batches = self.n_samples = 0

    def run(self, progress: bool = True) -> "Calibration":
        if not self.stats and self.spaces:
            self.stats, self.n_batches, self.n_samples = _calibrate(self.models, self.analysis, self.spaces,
                                                                    self.batches, progress, self.common, self.probes)
        return self

    def reused_for(self, models: Sequence[nn.Module], probes: ProbePolicy | None = None) -> "Calibration":
        if len(models) != len(self.originals) or any(a is not b for a, b in zip(models, self.originals)):
            raise ValueError("this Calibration was computed for other models; pass the same model objects, "
                             "in the same order, as to fxzip.calibrate")
        if probes is not None and probes != self.probes:
            raise ValueError(f"this Calibration observed the models with probes={self.probes.name!r}, not "
                             f"{probes.name!r}; pass probes= to fxzip.calibrate instead (statistics depend on it)")
        return self


def calibrate(*models: nn.Module, data: Iterable[Any], max_batches: int | None = None,
              inputs: Callable[[Any], Any] | None = None, progress: bool = True,
              probes: str | ProbePolicy = DEFAULT_PROBES) -> Calibration:
    """Trace, analyze and calibrate once; then ``merge(*models, data=calibration, ...)``
    as often as you like (the hyperparameter grid of the papers costs one pass).
    ``probes``: the probe policy (see ``merge``); merges of this calibration use it.
    Under ``torch.distributed`` ``data`` is this rank's shard (see ``merge``)."""
    data = _dist.check_ranks(models, data, {"probes": probes}, "fxzip.calibrate")
    progress = progress and _dist.is_main()
    _check_args(models, "weight_average", 0.0, 0.0, None)
    cal = _prepare(models, data, max_batches, inputs, probe_policy(probes))
    start = time.perf_counter()
    cal.run(progress)
    cal.seconds["calibration"] = time.perf_counter() - start
    return cal


def _prepare(models, data, max_batches, inputs, probes: ProbePolicy = PROBE_POLICIES[DEFAULT_PROBES]) -> Calibration:
    seconds: dict[str, float] = {}
    with _dist.ranks_agree("reading its data, tracing and analysing the models"):
        batches = Batches(data, max_batches, inputs)
        with _timed(seconds, "trace"):
            gms = [trace(m, batches.example) for m in models]
        with _timed(seconds, "analysis"):
            common, analysis = analyze_models(gms)  # aligns the models unless their graphs are identical
    return Calibration(models, gms, analysis, batches, seconds, common, probes)


DUAL_SPACE = {"mudsc": "zipit", "mudsc_permute": "permute"}
"""MuDSC methods and the matcher each re-runs on the blended similarity."""


def _check_data_free(models, data, method: str, weight_similarity: float, reset_bn: bool | None,
                     example_inputs: Any) -> bool:
    """Validate the data-free options before any work; returns the effective reset_bn."""
    if not 0.0 <= weight_similarity <= 1.0:
        raise ValueError(f"weight_similarity must be in [0, 1], got {weight_similarity}")
    if data is not None:
        return True if reset_bn is None else reset_bn
    if reset_bn:
        raise ValueError("reset_bn=True needs data to recompute the norm statistics on; with data=None they "
                         "are merged like the weights. Pass data=..., or reset_bn=False.")
    if method in DUAL_SPACE and weight_similarity != 1.0:
        raise ValueError(f"data=None leaves method={method!r} no activations to compare; a data-free MuDSC merge "
                         "matches on weights alone: pass weight_similarity=1.0 (or give data).")
    if method not in DUAL_SPACE and method != "weight_average":
        raise ValueError(f"method={method!r} matches features by their activations and needs data; for a data-free "
                         "merge use method='mudsc' (or 'mudsc_permute') with weight_similarity=1.0.")
    if example_inputs is None:
        default_example(models[0])  # raises, naming example_inputs, when the model declares no input size
    return False


def _check_args(models: Sequence[nn.Module], method: str, alpha: float, beta: float, stop_at: Any):
    if len(models) < 2:
        raise ValueError(f"merge needs at least two models, got {len(models)}")
    from .trace import check_model

    for k, m in enumerate(models):
        check_model(m, f"model {k}")  # a state_dict or a torch.compile wrapper: says what to pass instead
    for k, m in enumerate(models):
        check_finite(m, f"model {k}")  # NaN would only fail later, deep in the matcher
    devices = [_device_dtype(m) for m in models]
    if len(set(devices)) > 1:
        raise ValueError(
            "models live on different devices/dtypes: "
            + ", ".join(f"model {k}: {d} {t}" for k, (d, t) in enumerate(devices))
            + ". Move them to one, e.g. model.to('cpu', torch.float32), before merging."
        )
    if method not in MATCHERS and method not in DUAL_SPACE:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(MATCHERS) + sorted(DUAL_SPACE)}")
    matcher = get_matcher(DUAL_SPACE.get(method, method))
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if method in ("zipit", "mudsc") and alpha == 0 and len(models) > 2:
        raise ValueError("zipit with alpha=0 never lets a merged cluster re-enter the pool, so only pairs "
                         f"form; merging {len(models)} models needs alpha > 0.")
    return matcher


NORM_STATISTICS = ("running_mean", "running_var")
"""Buffers that must be finite like parameters (a diverged batch norm)."""


def check_finite(model: nn.Module, who: str = "the model") -> None:
    """Raise ``ValueError`` naming the first tensor of ``model`` that holds NaN or
    Inf: every parameter, and every floating buffer, except that a buffer other
    than a norm's running statistics may hold -Inf (attention masks and
    padding biases use -Inf on purpose; NaN and +Inf are never meant). Costs one
    sum per tensor (NaN and Inf propagate into it), and an exact count only when
    the sum is not finite."""
    tensors = [("parameter", n, t) for n, t in model.named_parameters()]
    tensors += [("buffer", n, t) for n, t in model.named_buffers()]
    for kind, name, t in tensors:
        if not t.is_floating_point() or t.numel() == 0:
            continue
        data = t.detach()
        total = data.sum(dtype=torch.float32) if data.element_size() < 4 else data.sum()
        if bool(torch.isfinite(total)):
            continue
        nan, pos, neg = int(torch.isnan(data).sum()), int(torch.isposinf(data).sum()), int(torch.isneginf(data).sum())
        if kind == "buffer" and not name.endswith(NORM_STATISTICS) and nan == 0 and pos == 0:
            continue  # -Inf only: a mask
        if nan + pos + neg == 0:
            continue  # the sum overflowed; every value is finite
        what = ", ".join(f"{n} {label}" for n, label in ((nan, "NaN"), (pos, "+Inf"), (neg, "-Inf")) if n)
        raise ValueError(f"{who}'s {kind} {name!r} holds {what} (of {data.numel()} values): the model diverged "
                         "in training or its weights were corrupted when saved; use a checkpoint from before the "
                         "divergence, or re-export it")


def _device_dtype(m: nn.Module) -> tuple[str, str]:
    for t in list(m.parameters()) + list(m.buffers()):
        if t.is_floating_point():
            return str(t.device), str(t.dtype)
    return "cpu", "none"


def check_same_architecture(gms: Sequence[fx.GraphModule]) -> None:
    """Raise ``ValueError`` unless the traced models are one architecture,
    compared by structure and data flow, not by names (``fxzip.align``: timm's
    and torchvision's resnet18 are one). The message names the first difference
    in the user's terms: module path, type, configuration and shapes. ``merge``
    itself also accepts models that differ after a shared trunk (a partial zip)."""
    from .align import architecture_difference

    difference = architecture_difference(gms)
    if difference is not None:
        raise ValueError(difference)


def _output_warnings(analysis: GraphAnalysis, gms: Sequence[fx.GraphModule] = (),
                     common: CommonPart | None = None) -> list[str]:
    """Messages for the report of a full zip about what happens to the output
    space. A stream that also feeds the network inside is a ``warnings.warn``
    (change the call: add a head, or cut earlier). Output layers (a classifier)
    are averaged as if the models' outputs meant the same thing, which is what a
    shared label space or a CLIP-style embedding wants and what two heads of
    different tasks do not: that is said in the report every time (not as a
    Python warning: it is not a mistake in the call), with the partial zip
    that keeps one head per model."""
    out = []
    heads = []
    for sp in analysis.spaces:
        if sp.touches_output and len(sp.producers) > 1 and sp.consumers:
            msg = (f"the output space ({sp.size} channels) also contains internal producers "
                   f"{sp.producers[:6]}{'...' if len(sp.producers) > 6 else ''}: the whole stream is averaged "
                   "without matching (e.g. a backbone with num_classes=0). Add a head, or cut earlier.")
            warnings.warn(msg, stacklevel=3)
            out.append(msg)
        elif sp.touches_output and sp.producers:
            heads.append(sp)
    if heads:
        out.append(_outputs_averaged(heads, gms, analysis, common))
    return out


def _outputs_averaged(heads: list, gms: Sequence[fx.GraphModule], analysis: GraphAnalysis,
                      common: CommonPart | None) -> str:
    """The report's note that the output layers were averaged, naming the last cut before them."""
    from .report import OUTPUTS_AVERAGED

    layers = sorted({p for sp in heads for p in sp.producers})
    cut = None
    if gms:
        try:
            cuts = find_cuts(gms[0], analysis) if common is None else shared_cuts(gms, common, analysis)
            before = [c for c in cuts if c.k < c.m and c.space not in {sp.index for sp in heads}]
            cut = before[-1] if before else None
        except Exception:  # noqa: BLE001 - only a suggestion; the merge does not depend on it
            cut = None
    if cut is not None and cut.k > 0:
        suggest = (f"the partial zip at the last cut before them keeps one head per model: "
                   f"stop_at={cut.name!r} (fxzip merge --stop-at {cut.name}; {cut.k} of {cut.m} layers zipped)")
    else:
        suggest = "a partial zip keeps one head per model (stop_at=..., fxzip merge --stop-at; see fxzip.cut_points)"
    sizes = ", ".join(f"{sp.size}" for sp in heads)
    return (f"{OUTPUTS_AVERAGED}: the models' output layers ({', '.join(layers[:6])}{'...' if len(layers) > 6 else ''}"
            f"; {sizes} outputs) are averaged as if their outputs meant the same thing (one label set, or a shared "
            f"embedding). If the models are different tasks (e.g. classes 0-4 and 5-9), the merged outputs mean "
            f"neither: {suggest}.")


def _calibrate(gms, analysis: GraphAnalysis, spaces: list[int], batches: Batches, progress: bool,
               common: CommonPart | None = None, probes: ProbePolicy = PROBE_POLICIES[DEFAULT_PROBES]):
    joint, node_maps = side_by_side(gms, common)
    insert_observers(joint, node_maps, analysis, spaces, probes)
    device, _ = _device_dtype(gms[0])
    joint.get_submodule(OBSERVERS).to(device)  # statistics accumulate where the features are (GPU models)
    _dist.agree_shifts(joint.get_submodule(OBSERVERS))  # several processes: one shift, rank 0's
    joint.eval()
    n_batches = n_samples = 0
    with torch.no_grad():
        for batch in tqdm(batches, total=len(batches) or None, desc="fxzip calibrate", disable=not progress,
                          leave=False):
            joint(*batch)
            n_batches += 1
            n_samples += int(batch[0].shape[0]) if batch and hasattr(batch[0], "shape") else 0
    holder = joint.get_submodule(OBSERVERS)
    n_batches, n_samples = _dist.reduce_observers(holder, n_batches, n_samples)  # sums of every rank, once
    return {i: holder.get_submodule(f"s{i}").stats() for i in spaces}, n_batches, n_samples


def _match_all(analysis, stats, matcher, n_models, alpha, beta, method, progress: bool = False,
               widths: dict[int, int] | None = None):
    sims = {i: Similarity.of(st) for i, st in stats.items()}
    bar = (lambda blocks: tqdm(blocks, desc="fxzip match", disable=not progress, leave=False))
    matches = match_all(analysis, sims, matcher, n_models, alpha=alpha, beta=beta, progress=bar, widths=widths or {})
    return matches, _report_rows(analysis, sims, matches, method)


def _dual_space(analysis, models, stats, matcher, n_models, alpha, beta, method, weight_similarity, seed, progress,
                widths: dict[int, int] | None = None):
    """MuDSC (``fxzip.mudsc``): the units it re-matches are ``grouped.blocks_of``,
    each matched by the group-aware ``match_units`` on the blended similarity."""
    activation = {i: Similarity.of(st) for i, st in stats.items()} if weight_similarity < 1.0 else None
    units = [block for block in blocks_of(analysis) if all(analysis.spaces[i].mergeable for i in block)]

    def match_block(unit, sims):
        return match_units(analysis, unit, sims, matcher, n_models, alpha=alpha, beta=beta, widths=widths or {})

    states = [{k: v.detach().cpu() for k, v in (m if isinstance(m, dict) else m.state_dict()).items()}
              for m in models]  # matching runs on CPU
    best, history = dual_space_match(analysis, states, units, activation, None,
                                     weight_similarity=weight_similarity, seed=seed, progress=progress,
                                     match_block=match_block, align=method == "mudsc_permute")
    matches = {sp.index: best.get(sp.index) or identity_match(n_models, sp.size) for sp in analysis.spaces}
    rows = _report_rows(analysis, activation or {}, matches, method)
    return matches, rows, {"mudsc": history}


def _report_rows(analysis, sims, matches, method) -> list[SpaceReport]:
    rows: list[SpaceReport] = []
    for sp in analysis.spaces:
        m = matches[sp.index]
        notes = []
        if sp.groups > 1:
            notes.append(f"{sp.groups} groups" + (f", tied with {[i for i in sp.tie if i != sp.index]}"
                                                  if len(sp.tie) > 1 else ""))
        if sp.bilinear:
            notes.append("q.k: cross-model only")
        if m.budget_relaxed:
            notes.append("budget relaxed")
        if sp.index in sims and sp.mergeable:
            sim = sims[sp.index]
            rows.append(SpaceReport(sp.index, sp.name, sp.size, True, m.within, m.cross,
                                    int(sim.constant().sum()), mean_matched_correlation(sim.correlation(), m.assign),
                                    "; ".join(notes)))
        else:
            why = ("output" if sp.touches_output else "; ".join(sorted(set(sp.fixed)))[:60] if sp.fixed
                   else "no probe point" if not sp.probes else method)
            rows.append(SpaceReport(sp.index, sp.name, sp.size, method == "weight_average" and not sp.fixed
                                    and not sp.touches_output, m.within, m.cross, 0, float("nan"),
                                    "; ".join(["identity: " + why] + notes)))
    from .naming import space_label

    for row, sp in zip(rows, analysis.spaces):
        row.label = space_label(sp)  # what the space is: "layer1 stream (conv1, ...)", "layer2.0 hidden (conv1)"
        row.assignment = matches[sp.index].assign.tolist()  # [model][unit] -> merged unit (report.json)
    return rows


def _macs(merged: fx.GraphModule, gms: Sequence[fx.GraphModule], example: tuple, same: bool = True
          ) -> dict[str, float]:
    """Multiply-adds per input (batch of one) of the result, one original (model 0)
    and the ensemble (``same``: the models are one architecture, N times model 0)."""
    from .evaluate import count_macs

    one = tuple(t[:1] if isinstance(t, torch.Tensor) and t.dim() > 0 else t for t in example)
    original = count_macs(gms[0], one)
    ensemble = original * len(gms) if same else original + sum(count_macs(gm, one) for gm in gms[1:])
    return {"merged": count_macs(merged, one), "original": original, "ensemble": ensemble}


def _check_width_arg(merged_width: Any, method: str, n_models: int) -> None:
    """merged_width's type and range, before any work (per-space names are
    checked once the model is traced)."""
    values = list(merged_width.values()) if isinstance(merged_width, Mapping) else [merged_width]
    for w in values:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 1.0 <= float(w) <= n_models:
            raise ValueError(f"merged_width must be a number from 1.0 (one model's width) to {n_models} (the "
                             f"{n_models} models side by side), or a dict of such numbers, got {w!r}")
    if any(float(w) > 1.0 for w in values) and method == "weight_average":
        raise ValueError("weight_average has no similarity to choose which features to keep apart; use "
                         "merged_width=1.0 with it, or method='zipit' / 'permute' to widen")


def _note_widths(rows: list[SpaceReport], plan: WidthPlan) -> None:
    for row in rows:
        if row.index in plan.widths:
            row.merged = plan.widths[row.index]
        elif row.index in plan.kept:
            row.note = "; ".join(filter(None, [row.note, f"kept at one model's width: {plan.kept[row.index]}"]))


def _check_widened(merged: fx.GraphModule, example: tuple) -> None:
    """Run one sample through the widened graph so that a size fxzip did not
    rewrite fails here, naming the node, instead of in the user's code."""
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


@contextmanager
def _timed(seconds: dict[str, float], key: str):
    start = time.perf_counter()
    yield
    seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - start
