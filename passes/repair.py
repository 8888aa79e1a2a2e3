"""Variance repair (REPAIR, Jordan et al. 2022) for merges without BatchNorm.

Averaging matched features shrinks their variance (two features correlated
0.5 average to a std of about 0.87 of theirs), and the loss compounds layer
by layer. REPAIR gives each merged feature, where it enters a nonlinearity or
a norm, the mean and std its matched originals had on average::

    target mean = sum_k M_k mu_k        target std = sum_k M_k sigma_k

A BatchNorm after a layer does that already once its statistics are reset;
this pass does it in closed form for everything else (GroupNorm, LayerNorm,
norm-free nets, transformers) and folds the correction into the layer that
produced the feature, so the merged model keeps its architecture and gains no
parameter.

Sites. A *site* is a layer ``A`` with a per-channel affine output (a Conv /
Linear with a bias, a GroupNorm / LayerNorm with affine parameters; a
weight-standardised conv or a bias-free layer cannot take the shift and is
left to the next norm's site) whose output space was merged, followed through
identity-like ops (dropout, drop-path, ``nn.Identity``, layer views) to the
point ``Z`` something else reads:

* ``Z = A(x)`` (a hidden feature before its nonlinearity, a conv before a
  GroupNorm, q/k/v before attention): the affine ``a (D - mu_D) + mu_D + b``
  meets both targets exactly;
* ``Z = R + A(x)`` (a residual stream: ``A`` is the last layer of a branch):
  the shift still meets the mean, but the stream's other term bounds the
  variance from below: ``Var(Z) = Var(R) + a^2 Var(D) + 2 a Cov(R, D)``. The
  scale is the root of ``Var(Z) = target^2`` nearest 1 (the smallest change);
  when the target is below the reachable minimum, the minimiser
  ``a = -Cov(R, D) / Var(D)`` (the reachable variance nearest the target).
  Features with zero variance keep their scale and only move their mean.

Sites whose point a BatchNorm reads are left to the norm reset.

Order and cost. Each site's statistics are measured on the merged model with
every earlier site already repaired (exact, in network order). The wave
schedule (``schedule="waves"``): sites none of which feeds another form one
*wave* and share a read of the data; a chain network needs about one per
layer, each only up to that wave's deepest node; the targets need one more
(all models side by side). The default, ``schedule="sequential"``
(``passes/sequential.py``), reads the data once: the merged graph and the originals side by side are
walked node by node over the cached activations, each site measured where
its ``direct`` and ``rest`` values are final, corrected, and its layer's
output recomputed with the new weights for every batch (``max_memory``
bounds the cache, the rest spilled to disk bit for bit). Both give the same
weights (the same float operations, in the same order). ``passes``: model
passes over the data (one per model graph run over the whole set): waves,
N (the targets) + one per wave; sequential, 1 + N. ``data_reads``: reads of
the batches. Statistics are float64 sums of float32 activations.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.fx as fx
from torch import nn

from fxzip.analysis import GraphAnalysis
from fxzip.assignment import axis_counts, axis_index, cluster_sizes, merged_length
from fxzip.distributed import sum_across_ranks
from fxzip.layout import Layout
from fxzip.passes.real_tokens import RealTokens
from fxzip.passes.reset_norm import batch_norm_nodes
from fxzip.passes.sequential import Executor, Step
from fxzip.passes.waves import depth_levels, truncated

__all__ = ["RepairSite", "RepairResult", "find_sites", "repair"]

_ADDS = {operator.add, operator.iadd, torch.add}
_IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_IDENTITY_METHODS = {"contiguous", "clone"}
_IDENTITY_FUNCTIONS = {torch.nn.functional.dropout}


@dataclass
class RepairSite:
    """Layer ``layer`` (a module path) adjusts point ``point`` (a node name,
    channels on ``dim``); ``rest`` is the stream's other term when the point is
    a residual add (``point = rest + direct``)."""

    layer: str
    direct: str
    point: str
    rest: str | None
    dim: int
    segments: tuple
    level: int = 0
    target_mean: torch.Tensor | None = None
    target_std: torch.Tensor | None = None
    reached: dict[str, float] = field(default_factory=dict)


@dataclass
class RepairResult:
    """``passes``: model passes over the data, ``data_reads``: reads of the
    batches (module docstring); ``memory``: the sequential executor's cache."""

    sites: list[RepairSite]
    passes: int
    skipped: list[str]
    schedule: str = "waves"
    data_reads: int = 0
    memory: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        bounded = sum(1 for s in self.sites if s.reached.get("bounded", 0) > 0)
        return {"sites": len(self.sites), "passes": self.passes, "data_reads": self.data_reads,
                "schedule": self.schedule, "memory": self.memory, "bounded_features": bounded,
                "skipped": self.skipped}


def _module_kind(mod: nn.Module) -> str | None:
    """'weight' for a plain conv / linear with a bias, 'norm' for an affine
    GroupNorm / LayerNorm; None for anything whose output a scaled weight and
    a shifted bias would not move affinely (weight standardisation, no bias)."""
    conv_like = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    if isinstance(mod, conv_like):
        plain = any(type(mod).forward is base.forward for base in conv_like)
        return "weight" if plain and mod.bias is not None else None
    if isinstance(mod, (nn.GroupNorm, nn.LayerNorm)):
        affine = getattr(mod, "affine", getattr(mod, "elementwise_affine", False))
        same = type(mod).forward in (nn.GroupNorm.forward, nn.LayerNorm.forward) or \
            type(mod).__name__ in ("LayerNorm", "LayerNorm2d", "GroupNorm")
        return "norm" if affine and mod.weight is not None and mod.bias is not None and same else None
    return None


def _identity_like(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        return isinstance(mod, _IDENTITY_MODULES) or type(mod).__name__ == "DropPath"
    if node.op == "call_method":
        return node.target in _IDENTITY_METHODS
    if node.op == "call_function":
        return node.target in _IDENTITY_FUNCTIONS
    return False


def find_sites(gm: fx.GraphModule, analysis: GraphAnalysis, mergeable: set[int]) -> tuple[list[RepairSite], list[str]]:
    """The repair sites of ``gm`` (a fold of the analysed graph, same node names)."""
    bn_inputs = {n.args[0].name for n, *_ in batch_norm_nodes(gm) if n.args and isinstance(n.args[0], fx.Node)}
    sites, skipped = [], []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        lay = analysis.layouts.get(node.name)
        if not isinstance(lay, Layout) or not lay.has_channels:
            continue
        segments = analysis.resolved(lay.segments)
        if not all(s.space in mergeable for s in segments):
            continue
        mod = gm.get_submodule(node.target)
        kind = _module_kind(mod)
        if kind is None:
            if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                skipped.append(f"{node.target} (no bias or weight standardisation: repaired through the next norm)")
            continue
        direct = node
        while len(direct.users) == 1 and _identity_like(gm, next(iter(direct.users))):
            direct = next(iter(direct.users))
        point, rest = direct, None
        if len(direct.users) == 1:
            user = next(iter(direct.users))
            others = [a for a in user.args if isinstance(a, fx.Node) and a is not direct]
            if user.op == "call_function" and user.target in _ADDS and len(others) == 1 and len(user.args) == 2 \
                    and not user.kwargs and _same(analysis, direct, user) and _same(analysis, direct, others[0]):
                point, rest = user, others[0]
        if point.name in bn_inputs:
            continue  # the norm reset gives what feeds a BatchNorm its statistics
        if any(s.point == point.name for s in sites):
            skipped.append(f"{node.target} (its stream point {point.name} is repaired through another layer)")
            continue
        sites.append(RepairSite(node.target, direct.name, point.name, rest.name if rest is not None else None,
                                lay.dim, tuple(segments)))
    _levels(gm, sites)
    return sites, skipped


def _same(analysis: GraphAnalysis, a: fx.Node, b: fx.Node) -> bool:
    """Same channel layout and same shape (no broadcasting in the add)."""
    shape = lambda n: getattr(n.meta.get("tensor_meta"), "shape", None)  # noqa: E731
    la, lb = analysis.layouts.get(a.name), analysis.layouts.get(b.name)
    if not (isinstance(la, Layout) and isinstance(lb, Layout) and la.has_channels and lb.has_channels):
        return False
    return la.dim == lb.dim and analysis.resolved(la.segments) == analysis.resolved(lb.segments) \
        and shape(a) is not None and shape(a) == shape(b)


def _levels(gm: fx.GraphModule, sites: list[RepairSite]) -> None:
    """A site's level: the most repaired points on any path into its layer or
    its stream's other term. Sites of one level never feed each other."""
    depth = depth_levels(gm, {s.point for s in sites})
    layer_node = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    for s in sites:
        inputs = [a.name for a in layer_node[s.layer].all_input_nodes] + ([s.rest] if s.rest else [])
        s.level = max((depth[a] for a in inputs), default=0)


def _channels(x: torch.Tensor, dim: int, keep: torch.Tensor | None = None) -> torch.Tensor:
    """(channels, samples) in float64; ``keep``: only those samples (real tokens)."""
    c = x.movedim(dim, 0).reshape(x.shape[dim], -1)
    return (c if keep is None else c.index_select(1, keep)).double()


def _real(tokens: RealTokens, node: str, mask: torch.Tensor | None, x: torch.Tensor, dim: int) -> torch.Tensor | None:
    """The samples of ``x`` (channel axis ``dim``) at real tokens, None: all."""
    return None if mask is None else tokens.positions(node, mask, x.movedim(dim, 0).shape[1:])


def _targets(joint: fx.GraphModule, node_maps: Sequence[dict[str, fx.Node]], sites: list[RepairSite],
             assign: Mapping[int, torch.Tensor], batches: Iterable[tuple]) -> None:
    """One pass over the originals (side by side): each site's target mean and
    std per merged channel, ``sum_k M_k mu_k`` and ``sum_k M_k sigma_k``."""
    n_models = len(node_maps)
    names = [node_maps[k][s.point].name for s in sites for k in range(n_models)]
    module = truncated(joint, names)
    tokens = RealTokens(joint.graph)
    first = [torch.zeros(0)] * len(names)
    second = [torch.zeros(0)] * len(names)
    count = [0] * len(names)
    for batch in batches:
        with torch.no_grad():
            outs = module(*batch)
        mask = tokens.mask(batch) if tokens else None
        for i, x in enumerate(outs):
            dim = sites[i // n_models].dim
            _add_point_sums(first, second, count, i, x, dim, _real(tokens, names[i], mask, x, dim))
    first, second, count = sum_across_ranks((first, second, count))
    counts = {sp: cluster_sizes(a) for sp, a in assign.items()}
    for j, s in enumerate(sites):
        part = slice(j * n_models, (j + 1) * n_models)
        _set_target(s, first[part], second[part], count[part], assign, counts)


def _set_target(s: RepairSite, first: Sequence[torch.Tensor], second: Sequence[torch.Tensor], count: Sequence[int],
                assign: Mapping[int, torch.Tensor], counts: Mapping[int, torch.Tensor]) -> None:
    """The site's target mean and std from each model's sums at its point."""
    size = merged_length(s.segments, assign)  # more than one model's under merged_width
    mean_t = torch.zeros(size, dtype=torch.float64)
    std_t = torch.zeros(size, dtype=torch.float64)
    for k in range(len(first)):
        mu = first[k] / count[k]
        var = (second[k] / count[k] - mu * mu).clamp_min(0)
        idx = axis_index(s.segments, assign, k)
        mean_t.index_add_(0, idx, mu)
        std_t.index_add_(0, idx, var.sqrt())
    per = axis_counts(s.segments, counts).double()
    s.target_mean, s.target_std = mean_t / per, std_t / per


def _add_point_sums(first: list, second: list, count: list, k: int, x: torch.Tensor, dim: int,
                    keep: torch.Tensor | None = None) -> None:
    """Model k's sums at a site's point, one batch more."""
    c = _channels(x, dim, keep)
    first[k] = first[k] + c.sum(1) if count[k] else c.sum(1)
    second[k] = second[k] + (c * c).sum(1) if count[k] else (c * c).sum(1)
    count[k] += c.shape[1]


def _add_measured(sums: dict, n: dict, s: RepairSite, direct: torch.Tensor, rest: torch.Tensor | None,
                  keep: torch.Tensor | None = None) -> None:
    """The merged model's sums at a site, one batch more."""
    d = _channels(direct, s.dim, keep)
    parts = {"d": d.sum(1), "dd": (d * d).sum(1)}
    if s.rest:
        r = _channels(rest, s.dim, keep)
        parts.update(r=r.sum(1), rr=(r * r).sum(1), rd=(r * d).sum(1))
    for key, v in parts.items():
        sums[f"{s.point}|{key}"] = sums.get(f"{s.point}|{key}", 0) + v
    n[s.point] += d.shape[1]


def _correct(gm: fx.GraphModule, s: RepairSite, sums: Mapping[str, torch.Tensor], n: Mapping[str, int]) -> None:
    """Fold the affine correction that gives the site its targets into its layer."""
    m = lambda key: sums[f"{s.point}|{key}"] / n[s.point]  # noqa: E731
    mu_d, var_d = m("d"), (m("dd") - m("d") ** 2).clamp_min(0)
    if s.rest:
        mu_r, var_r = m("r"), (m("rr") - m("r") ** 2).clamp_min(0)
        cov = m("rd") - mu_r * mu_d
    else:
        mu_r, var_r, cov = torch.zeros_like(mu_d), torch.zeros_like(mu_d), torch.zeros_like(mu_d)
    a, bounded = _scale(var_d, cov, var_r, s.target_std ** 2, s.rest is not None)
    # D' = a (D - mu_D) + mu_D + b with mean(Z') = target: b = target - mu_R - mu_D
    shift = (1 - a) * mu_d + (s.target_mean - mu_r - mu_d)
    _apply(gm, s, a, shift)
    s.reached = {"bounded": int(bounded.sum()), "scale_min": float(a.min()), "scale_max": float(a.max())}


def _scale(var_d: torch.Tensor, cov: torch.Tensor, var_r: torch.Tensor, target_var: torch.Tensor,
           has_rest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel scale ``a > 0`` of the direct term and whether the target
    was out of reach. A negative scale would flip a residual branch, so only
    positive roots count; with none, the positive minimiser of the variance if
    there is one, else the scale stays 1 (only the mean moves)."""
    tiny = var_d <= 1e-12 * (var_d.max().clamp_min(1e-300))
    safe = torch.where(tiny, torch.ones_like(var_d), var_d)
    one = torch.ones_like(var_d)
    if not has_rest:
        a = (target_var / safe).sqrt()
        return torch.where(tiny, one, a), torch.zeros_like(a, dtype=torch.bool)
    disc = cov * cov - safe * (var_r - target_var)
    root = disc.clamp_min(0).sqrt()
    lo, hi = (-cov - root) / safe, (-cov + root) / safe
    lo = torch.where(lo > 0, lo, torch.full_like(lo, float("inf")))
    hi = torch.where(hi > 0, hi, torch.full_like(hi, float("inf")))
    nearest = torch.where((lo - 1).abs() < (hi - 1).abs(), lo, hi)
    reachable = (disc >= 0) & torch.isfinite(nearest)
    vertex = -cov / safe
    fallback = torch.where(vertex > 0, vertex, one)
    a = torch.where(reachable, nearest, fallback)
    return torch.where(tiny, one, a), ~reachable & ~tiny


def _apply(gm: fx.GraphModule, site: RepairSite, a: torch.Tensor, shift: torch.Tensor) -> None:
    """``D' = a D + shift`` per output channel, folded into the layer."""
    mod = gm.get_submodule(site.layer)
    with torch.no_grad():
        w = mod.weight
        view = [1] * w.dim()
        view[0] = -1
        w.mul_(a.to(w.dtype).reshape(view))
        mod.bias.mul_(a.to(w.dtype)).add_(shift.to(w.dtype))


SCHEDULES = ("waves", "sequential")


def repair(merged: fx.GraphModule, analysis: GraphAnalysis, mergeable: set[int], joint: fx.GraphModule,
           node_maps: Sequence[dict[str, fx.Node]], assign: Mapping[int, torch.Tensor],
           batches: Iterable[tuple], progress: Callable[[Iterable], Iterable] = lambda x: x,
           schedule: str = "sequential", max_memory: int | None = None,
           cache_dtype: torch.dtype | None = None) -> RepairResult:
    """Repair ``merged`` in place (see the module docstring); ``joint`` runs the
    originals side by side with ``node_maps`` from model-0 node names.
    ``schedule``: ``"sequential"`` (the default: one read, at most ``max_memory`` bytes of cached
    activations, the rest spilled to disk; ``cache_dtype``: keep them in float16 /
    bfloat16, the rounding reported in ``memory``) or ``"waves"`` (one read of the
    data per wave)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"repair schedule must be one of {SCHEDULES}, got {schedule!r}")
    sites, skipped = find_sites(merged, analysis, mergeable)
    if not sites:
        return RepairResult([], 0, skipped, schedule)
    if schedule == "sequential":
        return _repair_sequential(merged, sites, skipped, joint, node_maps, assign, batches, progress, max_memory,
                                  cache_dtype)
    n_models = len(node_maps)
    _targets(joint, node_maps, sites, assign, batches)
    tokens = RealTokens(merged.graph)
    levels = sorted({s.level for s in sites})
    for level in progress(levels):
        wave = [s for s in sites if s.level == level]
        names: list[str] = []
        for s in wave:
            names += [s.direct] + ([s.rest] if s.rest else [])
        names = list(dict.fromkeys(names))
        module = truncated(merged, names)
        pos = {n: i for i, n in enumerate(names)}
        sums: dict[str, torch.Tensor] = {}
        n = {s.point: 0 for s in wave}
        for batch in batches:
            with torch.no_grad():
                outs = module(*batch)
            mask = tokens.mask(batch) if tokens else None
            for s in wave:
                direct = outs[pos[s.direct]]
                _add_measured(sums, n, s, direct, outs[pos[s.rest]] if s.rest else None,
                              _real(tokens, s.direct, mask, direct, s.dim))
        sums, n = sum_across_ranks((sums, n))  # several processes: every rank's sums, once
        for s in wave:
            _correct(merged, s, sums, n)
    return RepairResult(sites, n_models + len(levels), skipped, "waves", 1 + len(levels))


def _repair_sequential(merged: fx.GraphModule, sites: list[RepairSite], skipped: list[str], joint: fx.GraphModule,
                       node_maps: Sequence[dict[str, fx.Node]], assign: Mapping[int, torch.Tensor],
                       batches: Iterable[tuple], progress: Callable[[Iterable], Iterable],
                       max_memory: int | None, cache_dtype: torch.dtype | None = None) -> RepairResult:
    """One walk of the merged graph and of the originals over the cached data:
    a site is measured once its ``direct`` and ``rest`` values are computed
    (every site upstream is corrected by then), corrected, and its layer's
    output (through the identity-like chain to ``direct``) recomputed from the
    layer's cached inputs with the new weights."""
    n_models = len(node_maps)
    counts = {sp: cluster_sizes(a) for sp, a in assign.items()}
    layer_node = {n.target: n for n in merged.graph.nodes if n.op == "call_module"}
    chains: dict[str, list[fx.Node]] = {}
    for s in sites:
        chain = [layer_node[s.layer]]
        while chain[-1].name != s.direct:
            chain.append(next(iter(chain[-1].users)))
        chains[s.point] = chain
    feeds = {s.point: [a.name for c in chains[s.point] for a in c.all_input_nodes if a not in chains[s.point]]
             for s in sites}
    measured = {s.point: [s.direct] + ([s.rest] if s.rest else []) for s in sites}
    theirs_of = {s.point: [node_maps[k][s.point].name for k in range(n_models)] for s in sites}
    run = Executor(batches, max_memory, dtype=cache_dtype)
    mine = run.walk(merged, "merged", [n for s in sites for n in measured[s.point] + feeds[s.point]])
    theirs = run.walk(joint, "joint", [n for names in theirs_of.values() for n in names])
    mine_tokens, their_tokens = RealTokens(merged.graph), RealTokens(joint.graph)
    mask_key = mine.key(mine_tokens.node) if mine_tokens or their_tokens else None  # real tokens only
    steps: list[Step] = []
    for s in sorted(sites, key=lambda s: max(mine.position[n] for n in measured[s.point])):
        steps += mine.until(measured[s.point])
        steps += theirs.until(theirs_of[s.point])
        direct, rest = mine.key(s.direct), mine.key(s.rest) if s.rest else None
        t_keys = theirs.reads(theirs_of[s.point])

        def fix(s: RepairSite = s, direct=direct, rest=rest, t_keys=t_keys) -> None:
            sums: dict[str, torch.Tensor] = {}
            n = {s.point: 0}
            first = [torch.zeros(0)] * n_models
            second = [torch.zeros(0)] * n_models
            count = [0] * n_models
            for b in range(run.n_batches):
                mask = mine_tokens.mask_of(run.get(mask_key, b)) if mask_key else None
                d = run.get(direct, b)
                _add_measured(sums, n, s, d, run.get(rest, b) if rest else None,
                              _real(mine_tokens, s.direct, mask, d, s.dim))
                for k, key in enumerate(t_keys):
                    x = run.get(key, b)
                    _add_point_sums(first, second, count, k, x, s.dim,
                                    _real(their_tokens, theirs_of[s.point][k], mask, x, s.dim))
            sums, n, first, second, count = sum_across_ranks((sums, n, first, second, count))  # every rank's sums
            _set_target(s, first, second, count, assign, counts)
            _correct(merged, s, sums, n)
            chain = chains[s.point]
            for b in range(run.n_batches):  # the layer's output with its new weights
                run.put(direct, b, mine.evaluate(chain, lambda a: run.get(mine.key(a), b)))

        reads = mine.reads(measured[s.point] + feeds[s.point]) + t_keys + ((mask_key,) if mask_key else ())
        steps.append(Step(reads, run=fix, label=f"repair {s.point}"))
    run.run(steps, progress)
    return RepairResult(sites, 1 + n_models, skipped, "sequential", 1, run.cache.summary())
