"""Recompute batch-norm running statistics of a graph on data.

Done on the graph rather than with ``model.train()``: timm's ``BatchNormAct2d``
traces to ``F.batch_norm(..., training=False)`` on attributes, which train
mode would not touch. Each batch-norm node is swapped, in a temporary copy of
the graph, for a module that normalises with the batch's statistics (what a
norm layer in train mode feeds forward) and accumulates them; afterwards the
running mean/variance are the plain average over batches of the batch mean
and unbiased variance, exactly ``nn.BatchNorm`` with ``momentum=None``.
Dropout and everything else stay in eval mode.

A batch that leaves some norm one value per channel (one sample reaching a 1x1
map, or a ``BatchNorm1d`` on pooled features) has no variance: train-mode
batch norm refuses it (``Expected more than 1 value per channel``), and its
statistics would not be defined. Such a batch never reaches a norm in
training mode: it is joined (``torch.cat`` on the batch axis) with the batch
after it, or, when it is the last, with the batch before it, and the joined
batch counts as one. So a calibration set whose size leaves one sample in the
last batch gives exactly the statistics of the same samples batched with the
last two batches as one. Data without such a batch is processed batch by
batch exactly as before (the same sums in the same order). A lone sample with
no other batch to join is left out with a warning (an error when no batch is
left).

Under ``torch.distributed`` (``fxzip.distributed``) each rank sums its own
batches' statistics and the sums and batch counts are all-reduced after the
pass, so the running statistics are one process's average over all ranks'
batches (not SyncBatchNorm's statistics of the ranks' batches pooled).
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Container, Iterable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxzip.distributed import active as _distributed
from fxzip.distributed import sum_across_ranks, sum_fields_across_ranks

__all__ = ["batch_norm_nodes", "reset_batch_norm"]


class _OneValuePerChannel(Exception):
    """A norm met a batch with fewer than two values per channel (internal: the
    reset joins that batch with another and runs it again)."""

    def __init__(self, norm: str, shape: tuple[int, ...]):
        super().__init__(norm, shape)
        self.norm, self.shape = norm, shape


class _BatchStats(nn.Module):
    def __init__(self, eps: float, norm: str = ""):
        super().__init__()
        self.eps = eps
        self.norm = norm  # the norm node's name, for messages
        self.mean_sum: torch.Tensor | None = None
        self.var_sum: torch.Tensor | None = None
        self.batches = 0
        self.current: list[tuple[torch.Tensor, torch.Tensor]] = []  # this batch's (mean, unbiased variance)

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
        c = x.shape[1]
        if x.numel() < 2 * c:
            # one value per channel: no variance, and train-mode batch norm raises; the
            # reset joins this batch with a neighbour instead (nothing was accumulated)
            raise _OneValuePerChannel(self.norm, tuple(x.shape))
        if x.dtype in (torch.float32, torch.float64) and all(t is None or t.dtype == x.dtype for t in (weight, bias)):
            # One fused call: train-mode batch norm normalises with the batch's
            # statistics and, with momentum 1, writes exactly the batch mean and
            # unbiased variance into the fresh running buffers (0 * 0 + 1 * stat).
            # torch.var_mean over the non-channel dims of an NCHW tensor alone
            # took 4x as long as this whole call.
            mean = torch.zeros(c, dtype=x.dtype, device=x.device)
            unbiased = torch.zeros(c, dtype=x.dtype, device=x.device)
            out = F.batch_norm(x, mean, unbiased, weight, bias, True, 1.0, self.eps)
        else:
            # half precision: running buffers would have to be half too, so the
            # statistics are computed in float32 separately
            n = x.numel() // c
            dims = [d for d in range(x.dim()) if d != 1]
            var, mean = torch.var_mean(x.float(), dims, correction=0)
            unbiased = var * n / max(n - 1, 1)
            out = F.batch_norm(x, None, None, weight, bias, True, 0.0, self.eps)
        # kept until the batch is known to count (see reset_batch_norm), then added
        self.current.append((mean, unbiased))
        return out

    def commit(self, contributions: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Add one batch's statistics; the sums over batches are kept in float64."""
        for mean, unbiased in contributions:
            self.mean_sum = mean.double() if self.mean_sum is None else self.mean_sum.add_(mean)
            self.var_sum = unbiased.double() if self.var_sum is None else self.var_sum.add_(unbiased)
            self.batches += 1


def batch_norm_nodes(gm: fx.GraphModule) -> list[tuple[fx.Node, str, str, Any, Any, float]]:
    """(node, running_mean name, running_var name, weight arg, bias arg, eps) for every
    batch norm with running statistics, module or functional."""
    found = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                found.append((node, f"{node.target}.running_mean", f"{node.target}.running_var",
                              f"{node.target}.weight" if m.affine else None,
                              f"{node.target}.bias" if m.affine else None, m.eps))
        elif node.op == "call_function" and node.target is F.batch_norm:
            args = list(node.args) + [None] * (8 - len(node.args))
            names = ["input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"]
            a = {k: (node.kwargs[k] if k in node.kwargs else v) for k, v in zip(names, args)}
            rm, rv = a["running_mean"], a["running_var"]
            if isinstance(rm, fx.Node) and rm.op == "get_attr" and isinstance(rv, fx.Node) and rv.op == "get_attr":
                eps = a["eps"] if a["eps"] is not None else 1e-5
                found.append((node, rm.target, rv.target, a["weight"], a["bias"], eps))
    return found


def reset_batch_norm(gm: fx.GraphModule, batches: Iterable[Any], call: Callable[[fx.GraphModule, Any], Any],
                     progress: Callable[[Iterable[Any]], Iterable[Any]] = lambda b: b,
                     only: Container[str] | None = None) -> int:
    """Overwrite every batch norm's running statistics in ``gm`` (in place) with
    their average over ``batches``; ``call(module, batch)`` runs one batch.
    ``only``: the names of the norm nodes to reset (default: all).
    Returns the number of batches seen."""
    found = [f for f in batch_norm_nodes(gm) if only is None or f[0].name in only]
    if not found:
        return 0
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, env))
    root: dict[str, Any] = {}
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr"):
            root[node.target] = gm.get_submodule(node.target) if node.op == "call_module" else _get(gm, node.target)
    collectors: list[tuple[_BatchStats, str, str]] = []
    for i, (node, rm, rv, w, b, eps) in enumerate(found):
        new = env[node]
        stats = _BatchStats(float(eps), node.name)
        name = f"fxzip_bn_stats_{i}"
        root[name] = stats
        with graph.inserting_before(new):
            w_arg, b_arg = (_attr_arg(graph, root, gm, env, a) for a in (w, b))
        with graph.inserting_before(new):
            replacement = graph.call_module(name, (new.args[0], w_arg, b_arg))
        new.replace_all_uses_with(replacement)
        graph.erase_node(new)
        collectors.append((stats, rm, rv))
    tmp = fx.GraphModule(root, graph)
    tmp.graph.eliminate_dead_code()
    tmp.recompile()
    tmp.eval()
    seen, left_out = _run_batches(tmp, [s for s, _, _ in collectors], batches, call, progress)
    # several processes: the per-batch sums and batch counts of every rank, once. A norm
    # this rank never fed (its only sample left out) sums zeros, so every rank reduces
    # the same structure
    if _distributed():
        for stats, rm, _ in collectors:
            if stats.mean_sum is None:
                ref = _get(gm, rm)
                stats.mean_sum = torch.zeros(ref.shape, dtype=torch.float64, device=ref.device)
                stats.var_sum = torch.zeros(ref.shape, dtype=torch.float64, device=ref.device)
    seen = sum_across_ranks(seen)
    sum_fields_across_ranks([s for s, _, _ in collectors], "mean_sum", "var_sum", "batches")
    if seen == 0:
        raise ValueError(left_out or "reset_norm_stats got no batches: data is empty")
    if left_out:  # this rank's only sample; other ranks' batches give the statistics (torch.distributed)
        warnings.warn(f"{left_out.split(': pass at least')[0]}: it is left out of the norm reset", stacklevel=3)
    with torch.no_grad():
        for stats, rm, rv in collectors:
            if stats.batches == 0:
                continue  # a norm the data never reached (dead branch)
            mean_t, var_t = _get(gm, rm), _get(gm, rv)
            mean_t.copy_((stats.mean_sum / stats.batches).to(mean_t.dtype))
            var_t.copy_((stats.var_sum / stats.batches).to(var_t.dtype))
            nbt = rm.rsplit(".", 1)[0] + ".num_batches_tracked"
            try:
                _get(gm, nbt).add_(stats.batches)
            except AttributeError:
                pass
    return seen


def _run_batches(tmp: fx.GraphModule, collectors: list[_BatchStats], batches: Iterable[Any],
                 call: Callable[[fx.GraphModule, Any], Any], progress: Callable) -> tuple[int, str | None]:
    """Run every batch through ``tmp`` and add its statistics to ``collectors``;
    returns the number of batches counted and, when a lone sample had to be
    left out, why. A batch that leaves some norm one value per channel is
    joined with the next batch (the last such batch: with the one before it).
    Each batch is added only once the next one has run, so that the last can
    still be joined with it; in order, so data without such batches gives
    exactly the sums of adding every batch as it comes."""

    def run(batch: Any) -> tuple[list | None, _OneValuePerChannel | None]:
        for s in collectors:
            s.current = []
        try:
            call(tmp, batch)
        except _OneValuePerChannel as problem:
            return None, problem
        return [s.current for s in collectors], None

    def commit(contributions: list) -> None:
        for s, c in zip(collectors, contributions):
            s.commit(c)

    seen = 0
    pending: tuple[Any, list] | None = None  # the last batch run, not yet added
    carry: tuple[Any, int, _OneValuePerChannel] | None = None  # a batch to join with the next
    with torch.no_grad():
        for index, batch in enumerate(progress(batches)):
            if carry is not None:
                batch = _join(carry[0], batch, carry)
                carry = None
            contributions, problem = run(batch)
            if contributions is None:
                carry = (batch, index, problem)
                continue
            if pending is not None:
                commit(pending[1])
                seen += 1
            pending = (batch, contributions)
        if carry is not None and pending is not None:
            batch = _join(pending[0], carry[0], carry)
            contributions, problem = run(batch)
            if contributions is not None:
                pending, carry = (batch, contributions), None
        if pending is not None:
            commit(pending[1])
            seen += 1
        for s in collectors:
            s.current = []
    if carry is None:
        return seen, None
    _, index, problem = carry  # one sample and nothing to join it with
    return seen, (f"batch-norm statistics need at least two values per channel, but batch {index} of the data "
                  f"gives norm {problem.norm!r} an input of shape {problem.shape} and there is no other batch to "
                  "join it with: pass at least two samples, or reset_bn=False (--no-reset-bn) to keep the merged "
                  "statistics")


def _join(a: Any, b: Any, carry: tuple[Any, int, _OneValuePerChannel]) -> Any:
    """Two batches as one (tensors concatenated on the batch axis, tuples, lists
    and dicts entry by entry, anything else equal in both)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.dim() > 0 and a.shape[1:] == b.shape[1:] and a.dtype == b.dtype and a.device == b.device:
            return torch.cat([a, b])
    elif isinstance(a, (tuple, list)) and type(a) is type(b) and len(a) == len(b):
        return type(a)(_join(x, y, carry) for x, y in zip(a, b))
    elif isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        return {k: _join(a[k], b[k], carry) for k in a}
    elif a is b or (not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor) and a == b):
        return a
    _, index, problem = carry
    raise ValueError(f"batch-norm statistics need at least two values per channel, but batch {index} of the data "
                     f"gives norm {problem.norm!r} an input of shape {problem.shape}, and fxzip cannot join that "
                     "batch with its neighbour (their inputs differ in shape or kind): use batches of at least two "
                     "samples (e.g. DataLoader(..., drop_last=True) or another batch size), or reset_bn=False "
                     "(--no-reset-bn)")


def _attr_arg(graph: fx.Graph, root: dict, gm: nn.Module, env: dict, arg: Any) -> Any:
    """Module norms name their affine parameters; functional ones pass nodes."""
    if isinstance(arg, str):
        root[arg] = _get(gm, arg)
        return graph.get_attr(arg)
    return env[arg] if isinstance(arg, fx.Node) else arg


def _get(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
