"""Closed-form least-squares refit of a merged model's weights (issue 12).

ZipIt and MuDSC choose which features to average; the merged weights are
then fixed averages. The refit keeps the matching and re-solves every weight
layer so that, fed the merged model's own inputs, it reproduces the matched
average of the original models' outputs (PLeaS's layer-wise objective, solved
in closed form instead of with Adam)::

    min_W  (1/n) sum_samples || W x~ - t ||^2 + lambda || W - W_fold ||^2
    x~ = [x*, 1],   t = sum_k M_k y_k

``x*`` is the layer's input in the merged model (the layers before it already
refit), ``y_k`` model k's output of the same layer on the same image, ``M_k``
the output space's merge (a unit's target is the mean of its cluster's
members). Solution: ``W = (C_tx + lambda W_fold)(C_xx + lambda I)^-1`` with
``C_xx = E[x~ x~^T]``, ``C_tx = E[t x~^T]`` (per-sample means, so lambda does
not scale with n), accumulated in float64. The products themselves are
formed in float64 too, although they are most of the refit's time: formed
in float32 per 1024-row chunk (the chunk sums in float64) the Gram is within
1e-6 of ``sqrt(G_ii G_jj)``, but each layer's solve amplifies the rounding
of its inputs, and on ResNet-20 and the CIFAR ViT the last layers' weights
end 3e-3 (relative) from the float64 refit's, for 4-13% less time
(``benchmarks/results/perf.md``, "Refit and repair"). Convolutions are fitted on their
im2col patches (the Gram is ``(C_in/g * kh * kw + 1)^2`` per group; grouped and
depthwise convs are solved group by group). The bias column is part of ``W``
and is penalised like every other entry (toward the folded bias), so a
constant input feature cannot make the solve singular. ``lambda = ridge *
trace(C_xx) / dim``: relative to the Gram's mean eigenvalue, so it means the
same for every layer and input scale (default ``ridge = 1e-3``); a group whose
inputs are all zero on the data takes the layer's scale, and keeps W_fold.

Invariants: when the models are one (a self-merge, a permuted copy) the
folded weights solve the system exactly (``t = W_fold x~`` for every
sample), so the refit returns them for any lambda.

Order: every layer is fitted on inputs that already reflect the refit of
all layers before it. The default schedule (``schedule="sequential"``,
``passes/sequential.py``) reads the data once and walks the merged graph node
by node over the cached activations of the whole calibration set, the
originals side by side (the ``joint`` graph) advancing in the same walk: a
layer is fitted as soon as its input is final (topological order puts every
layer feeding it before it), then its output is computed for every batch
with its new weights and the walk goes on. ``max_memory`` bounds the cached
activations (the rest spilled to disk, bit for bit); the peak held is in the
summary. The earlier schedule (``schedule="waves"``) is kept for comparison:
layers none of which feeds another share one pass over the data (a *wave*:
parallel branches, q/k/v), a chain network one pass per layer, each through
graphs truncated after the wave's inputs. Both fit the same weights (the same
float operations per batch, in the same order). The target is taken at the
layer's raw output (before any norm or nonlinearity). With BatchNorm the
merged norms keep their folded statistics during the refit and are reset
afterwards (``merge`` runs fold -> refit -> repair -> norm reset).

Passes (``RefitResult.passes``): model passes over the calibration data, one
for each model's graph run over the whole set (however much of it runs):
sequential, 1 (the merged model) + N (the originals); waves, (1 + N) per
wave. ``data_reads``: how many times the batches were read (1; one per wave).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxzip.analysis import GraphAnalysis
from fxzip.assignment import axis_counts, axis_index, cluster_sizes, merged_length
from fxzip.distributed import sum_fields_across_ranks
from fxzip.layout import Layout
from fxzip.passes.real_tokens import RealTokens
from fxzip.passes.sequential import Executor, GraphWalk, Step
from fxzip.passes.ties import tied_names, untie
from fxzip.passes.waves import depth_levels, truncated

__all__ = ["DEFAULT_RIDGE", "RefitLayer", "RefitResult", "refit"]

DEFAULT_RIDGE = 1e-3

_CONVS = (nn.Conv1d, nn.Conv2d)


@dataclass
class RefitLayer:
    name: str          # module path
    node: str          # node name in the merged graph
    input: str         # node name of its input
    segments: tuple    # output channel layout (resolved spaces)
    level: int = 0
    ridge: float = 0.0  # the lambda used (mean over groups)
    loss_folded: float = float("nan")
    loss_refit: float = float("nan")
    samples: int = 0


@dataclass
class RefitResult:
    """``passes``: model passes over the calibration data (one per model graph
    run over the whole set; the module docstring); ``data_reads``: reads of the
    batches; ``memory``: the sequential executor's cache (``peak_bytes`` held,
    ``max_memory``, ``spilled_bytes``, ...), empty for the other schedules."""

    layers: list[RefitLayer]
    passes: int
    skipped: list[str] = field(default_factory=list)
    schedule: str = "sequential"
    data_reads: int = 0
    memory: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"layers": len(self.layers), "passes": self.passes, "data_reads": self.data_reads,
                "schedule": self.schedule, "memory": self.memory, "skipped": self.skipped,
                "per_layer": {l.name: {"ridge": l.ridge, "loss_folded": l.loss_folded, "loss_refit": l.loss_refit,
                                       "samples": l.samples} for l in self.layers}}


def _fittable(mod: nn.Module) -> str | None:
    """Why a weight layer cannot be refit in closed form, or None if it can."""
    if isinstance(mod, nn.Linear):
        return None if type(mod).forward is nn.Linear.forward else "custom forward"
    if isinstance(mod, _CONVS):
        if type(mod).forward not in (nn.Conv1d.forward, nn.Conv2d.forward):
            return "custom forward (e.g. weight standardisation)"
        if mod.padding_mode != "zeros":
            return f"padding_mode={mod.padding_mode!r}"
        if isinstance(mod.padding, str):
            return f"padding={mod.padding!r}"
        return None
    return "not a Linear / Conv1d / Conv2d"


def find_layers(gm: fx.GraphModule, analysis: GraphAnalysis) -> tuple[list[RefitLayer], list[str]]:
    layers, skipped = [], []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        if not isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            continue
        why = _fittable(mod)
        lay = analysis.layouts.get(node.name)
        out_dim = (len(node.meta["tensor_meta"].shape) - 1) if isinstance(mod, nn.Linear) else 1
        if why is None and not (isinstance(lay, Layout) and lay.has_channels and lay.dim == out_dim):
            why = "its output channels are not a feature space (a layer along another axis)"
        if why is None and not isinstance(node.args[0], fx.Node):
            why = "its input is not a tensor of the graph"
        if why is not None:
            skipped.append(f"{node.target}: {why}")
            continue
        layers.append(RefitLayer(node.target, node.name, node.args[0].name, tuple(analysis.resolved(lay.segments))))
    depth = depth_levels(gm, {l.node for l in layers})
    for l in layers:
        l.level = depth[l.input]
    return layers, skipped


def _rows(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows of (patch) features: (rows, in_features)."""
    if isinstance(mod, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if isinstance(mod, nn.Conv1d):
        x = x.unsqueeze(-1)
        k, s, p, d = (mod.kernel_size[0], 1), (mod.stride[0], 1), (mod.padding[0], 0), (mod.dilation[0], 1)
    else:
        k, s, p, d = mod.kernel_size, mod.stride, mod.padding, mod.dilation
    cols = F.unfold(x, k, dilation=d, padding=p, stride=s)  # (B, C*kh*kw, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _real_rows(tokens: RealTokens, node: str, mask: torch.Tensor | None, mod: nn.Module, x: torch.Tensor,
               n_rows: int) -> torch.Tensor | None:
    """The rows of ``_rows(mod, x)`` at real tokens (``passes.real_tokens``), or
    None when every row counts: a Linear's rows are the samples of ``x`` over
    all but its last axis, a convolution's (batch, output position)."""
    if mask is None:
        return None
    shape = x.shape[:-1] if isinstance(mod, nn.Linear) else (x.shape[0], n_rows // max(x.shape[0], 1))
    return tokens.positions(node, mask, shape)


def _out_rows(mod: nn.Module, y: torch.Tensor) -> torch.Tensor:
    if isinstance(mod, nn.Linear):
        return y.reshape(-1, y.shape[-1])
    return y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1])


class _Normal:
    """Float64 sums of one layer's normal equations, per group."""

    def __init__(self, mod: nn.Module):
        self.groups = getattr(mod, "groups", 1)
        self.bias = mod.bias is not None
        self.gram: torch.Tensor | None = None
        self.cross: torch.Tensor | None = None
        self.tt: torch.Tensor | None = None
        self.n = 0

    def add(self, x: torch.Tensor, t: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """One batch's rows of inputs ``x`` and targets ``t``; ``keep``: only these
        rows are samples (real tokens), None: every row."""
        if keep is not None:
            x, t = x.index_select(0, keep), t.index_select(0, keep)
        g = self.groups
        x = x.double()
        if self.bias:
            x = torch.cat([x, x.new_ones(x.shape[0], 1)], 1) if g == 1 else x
        t = t.double()
        if g == 1:
            gram, cross = (x.T @ x)[None], (t.T @ x)[None]
        else:
            xg = x.reshape(x.shape[0], g, -1)
            if self.bias:
                xg = torch.cat([xg, xg.new_ones(xg.shape[0], g, 1)], 2)
            tg = t.reshape(t.shape[0], g, -1)
            gram = torch.einsum("rgd,rge->gde", xg, xg)
            cross = torch.einsum("rgo,rgd->god", tg, xg)
        tt = (t * t).sum()
        if self.gram is None:
            self.gram, self.cross, self.tt = gram, cross, tt
        else:
            self.gram += gram
            self.cross += cross
            self.tt += tt
        self.n += x.shape[0]


def _folded(mod: nn.Module) -> torch.Tensor:
    """(groups, out / groups, in / groups * k [+ 1]) in float64."""
    g = getattr(mod, "groups", 1)
    w = mod.weight.detach().double().reshape(mod.weight.shape[0], -1)
    if mod.bias is not None:
        w = torch.cat([w, mod.bias.detach().double()[:, None]], 1)
    return w.reshape(g, w.shape[0] // g, w.shape[1])


def _solve(normal: _Normal, w_fold: torch.Tensor, ridge: float) -> tuple[torch.Tensor, float, float, float]:
    """W per group; returns (W, lambda, loss at W_fold, loss at W) (per-sample means)."""
    n = normal.n
    c_xx, c_tx = normal.gram / n, normal.cross / n
    dim = c_xx.shape[-1]
    mean_eig = c_xx.diagonal(dim1=-2, dim2=-1).sum(-1) / dim  # (groups,)
    # a group whose inputs are all zero on the data (a dead channel into a bias-free depthwise conv) has
    # no scale of its own: take the layer's, or 1 if the whole layer sees nothing; with C_xx = C_tx = 0
    # the solution is then W_fold for any lambda > 0
    seen = mean_eig[mean_eig > 0]
    mean_eig = torch.where(mean_eig > 0, mean_eig, seen.mean() if seen.numel() else torch.ones((), dtype=mean_eig.dtype))
    lam = ridge * mean_eig
    eye = torch.eye(dim, dtype=torch.float64)
    lhs = c_xx + lam[:, None, None] * eye
    rhs = c_tx + lam[:, None, None] * w_fold
    w = torch.linalg.solve(lhs, rhs.transpose(1, 2)).transpose(1, 2)  # (C_xx + lam I) symmetric

    def loss(m: torch.Tensor) -> float:
        # E||W x - t||^2 = tr(W C_xx W^T) - 2 tr(W C_tx^T) + E||t||^2
        return float((torch.einsum("god,gde,goe->", m, c_xx, m) - 2 * torch.einsum("god,god->", m, c_tx))
                     + normal.tt / n)

    return w, float(lam.mean()), loss(w_fold), loss(w)


def _write(mod: nn.Module, w: torch.Tensor) -> None:
    flat = w.reshape(-1, w.shape[-1])
    with torch.no_grad():
        if mod.bias is not None:
            mod.bias.copy_(flat[:, -1].to(mod.bias.dtype))
            flat = flat[:, :-1]
        mod.weight.copy_(flat.reshape(mod.weight.shape).to(mod.weight.dtype))


def _target(outs: Sequence[torch.Tensor], mod: nn.Module, layer: RefitLayer, assign: Mapping[int, torch.Tensor],
            counts: Mapping[int, torch.Tensor]) -> torch.Tensor:
    """``sum_k M_k y_k``: each merged unit the mean of its cluster's outputs."""
    total = None
    for k, y in enumerate(outs):
        rows = _out_rows(mod, y).double()
        idx = axis_index(layer.segments, assign, k).to(rows.device)
        part = rows.new_zeros((rows.shape[0], merged_length(layer.segments, assign))).index_add_(1, idx, rows)
        total = part if total is None else total + part
    return total / axis_counts(layer.segments, counts).to(total)


SCHEDULES = ("sequential", "waves")


def refit(merged: fx.GraphModule, analysis: GraphAnalysis, joint: fx.GraphModule,
          node_maps: Sequence[dict[str, fx.Node]], assign: Mapping[int, torch.Tensor], batches: Iterable[tuple],
          ridge: float = DEFAULT_RIDGE, progress: Callable[[Iterable], Iterable] = lambda x: x,
          one_pass: bool = False, only: set[str] | None = None, schedule: str = "sequential",
          max_memory: int | None = None, cache_dtype: torch.dtype | None = None) -> RefitResult:
    """Refit every fittable weight layer of ``merged`` in place (module docstring).
    ``schedule``: ``"sequential"`` (one read of the data, ``max_memory`` bytes
    of cached activations at most, the rest spilled to disk; ``cache_dtype``:
    keep them in float16 / bfloat16, the rounding reported in ``memory``) or ``"waves"``
    (one read per layer depth). ``one_pass``: fit every layer on the *folded*
    model's inputs in a single wave (the cheap approximation
    ``benchmarks/refit_passes.py`` measures against the exact network-order
    refit; a wave schedule). ``only``: the node names that may be refit (a
    subset; a partial zip is refit whole by ``passes.head_refit``)."""
    if ridge <= 0:
        raise ValueError(f"refit ridge must be > 0 (it keeps the solve well posed), got {ridge}")
    if schedule not in SCHEDULES:
        raise ValueError(f"refit schedule must be one of {SCHEDULES}, got {schedule!r}")
    layers, skipped = find_layers(merged, analysis)
    if only is not None:
        layers = [l for l in layers if l.node in only]
    if not layers:
        return RefitResult([], 0, skipped, "one pass" if one_pass else schedule)
    _untie_refit(merged, layers)
    counts = {s: cluster_sizes(a) for s, a in assign.items()}
    if one_pass or schedule == "waves":
        return _refit_waves(merged, layers, skipped, joint, node_maps, assign, counts, batches, ridge, progress,
                            one_pass)
    return _refit_sequential(merged, layers, skipped, joint, node_maps, assign, counts, batches, ridge, progress,
                             max_memory, cache_dtype)


def _untie_refit(merged: fx.GraphModule, layers: list[RefitLayer]) -> None:
    """A refit layer's weight shared with another module (tied embeddings) gets
    its own copy first: the fit is for this layer's inputs only."""
    refit = {f"{layer.name}.{leaf}" for layer in layers for leaf in ("weight", "bias")}
    for names in tied_names(merged):
        if refit & set(names):
            untie(merged, sorted(names, key=lambda n: n not in refit))


def _fit(layer: RefitLayer, mod: nn.Module, normal: _Normal, ridge: float) -> None:
    w, layer.ridge, layer.loss_folded, layer.loss_refit = _solve(normal, _folded(mod), ridge)
    layer.samples = normal.n
    _write(mod, w)


def _refit_sequential(merged: fx.GraphModule, layers: list[RefitLayer], skipped: list[str], joint: fx.GraphModule,
                      node_maps: Sequence[dict[str, fx.Node]], assign: Mapping[int, torch.Tensor],
                      counts: Mapping[int, torch.Tensor], batches: Iterable[tuple], ridge: float,
                      progress: Callable[[Iterable], Iterable], max_memory: int | None,
                      cache_dtype: torch.dtype | None = None) -> RefitResult:
    """One walk of the merged graph and of the originals over the cached data:
    each layer fitted where its input is final, its output then computed with
    the new weights (``passes/sequential.py``)."""
    theirs_of = their_nodes(layers, node_maps)
    run = Executor(batches, max_memory, dtype=cache_dtype)
    mine = run.walk(merged, "merged", [l.input for l in layers])
    theirs = run.walk(joint, "joint", [n for names in theirs_of.values() for n in names])
    run.run(refit_steps(run, merged, mine, theirs, layers, theirs_of, assign, counts, ridge), progress)
    return RefitResult(layers, 1 + len(node_maps), skipped, "sequential", 1, run.cache.summary())


def their_nodes(layers: Sequence[RefitLayer], node_maps: Sequence[dict[str, fx.Node]]) -> dict[str, list[str]]:
    """Each layer's node in every model of the ``joint`` graph (its targets)."""
    return {l.node: [m[l.node].name for m in node_maps] for l in layers}


def refit_steps(run: Executor, merged: fx.GraphModule, mine: GraphWalk, theirs: GraphWalk,
                layers: Sequence[RefitLayer], theirs_of: Mapping[str, list[str]], assign: Mapping[int, torch.Tensor],
                counts: Mapping[int, torch.Tensor], ridge: float) -> list[Step]:
    """The schedule that refits ``layers`` of ``merged`` (walked as ``mine``) to
    the matched average of the originals' outputs (walked as ``theirs``), each
    where its input is final; other passes append their own events after it
    (a partial zip's heads, ``passes.head_refit``)."""
    tokens = RealTokens(merged.graph)
    mask_key = mine.key(tokens.node) if tokens else None  # the padding mask: fits over real tokens only
    steps: list[Step] = []
    for l in layers:  # graph order: a layer's fit comes before any node that reads its output
        steps += mine.until([l.input])
        steps += theirs.until(theirs_of[l.node])
        x_key, t_keys = mine.key(l.input), theirs.reads(theirs_of[l.node])

        def fit(l: RefitLayer = l, x_key=x_key, t_keys=t_keys) -> None:
            mod = merged.get_submodule(l.name)
            normal = _Normal(mod)
            for b in range(run.n_batches):
                t = _target([run.get(k, b) for k in t_keys], mod, l, assign, counts)
                x = run.get(x_key, b)
                rows = _rows(mod, x)
                mask = tokens.mask_of(run.get(mask_key, b)) if mask_key else None
                normal.add(rows, t, _real_rows(tokens, l.input, mask, mod, x, rows.shape[0]))
            sum_fields_across_ranks([normal], "gram", "cross", "tt", "n")  # several processes: every rank's sums
            _fit(l, mod, normal, ridge)

        reads = (x_key, *t_keys) + ((mask_key,) if mask_key else ())
        steps.append(Step(reads, run=fit, label=f"fit {l.name}"))
    return steps


def _refit_waves(merged: fx.GraphModule, layers: list[RefitLayer], skipped: list[str], joint: fx.GraphModule,
                 node_maps: Sequence[dict[str, fx.Node]], assign: Mapping[int, torch.Tensor],
                 counts: Mapping[int, torch.Tensor], batches: Iterable[tuple], ridge: float,
                 progress: Callable[[Iterable], Iterable], one_pass: bool) -> RefitResult:
    """One read of the data per wave (layers of one input depth), through the
    merged graph and the originals truncated after the wave's nodes."""
    if one_pass:
        for layer in layers:
            layer.level = 0
    n_models = len(node_maps)
    tokens = RealTokens(merged.graph)
    waves = 0
    for level in progress(sorted({l.level for l in layers})):
        wave = [l for l in layers if l.level == level]
        inputs = list(dict.fromkeys(l.input for l in wave))
        mine = truncated(merged, inputs)
        theirs = truncated(joint, [node_maps[k][l.node].name for l in wave for k in range(n_models)])
        mods = [merged.get_submodule(l.name) for l in wave]
        normals = [_Normal(m) for m in mods]
        for batch in batches:
            with torch.no_grad():
                xs = dict(zip(inputs, mine(*batch)))
                ys = theirs(*batch)
            mask = tokens.mask(batch) if tokens else None
            for i, (l, mod, normal) in enumerate(zip(wave, mods, normals)):
                t = _target(ys[i * n_models:(i + 1) * n_models], mod, l, assign, counts)
                rows = _rows(mod, xs[l.input])
                normal.add(rows, t, _real_rows(tokens, l.input, mask, mod, xs[l.input], rows.shape[0]))
        sum_fields_across_ranks(normals, "gram", "cross", "tt", "n")  # several processes: every rank's sums, once
        waves += 1
        for l, mod, normal in zip(wave, mods, normals):
            _fit(l, mod, normal, ridge)
    return RefitResult(layers, waves * (1 + n_models), skipped, "one pass" if one_pass else "waves", waves)
