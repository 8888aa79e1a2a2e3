"""Recompute batch-norm running statistics of a graph on data.

Done on the graph rather than with ``model.train()``: timm's ``BatchNormAct2d``
traces to ``F.batch_norm(..., training=False)`` on attributes, which train
mode would not touch. Each batch-norm node is swapped, in a temporary copy of
the graph, for a module that normalises with the batch's statistics (what a
norm layer in train mode feeds forward) and accumulates them; afterwards the
running mean/variance are the plain average over batches of the batch mean
and unbiased variance, exactly ``nn.BatchNorm`` with ``momentum=None``.
Dropout and everything else stay in eval mode.

Under ``torch.distributed`` (``fxzip.distributed``) each rank sums its own
batches' statistics and the sums and batch counts are all-reduced after the
pass, so the running statistics are one process's average over all ranks'
batches (not SyncBatchNorm's statistics of the ranks' batches pooled).
"""
from __future__ import annotations

from typing import Any, Callable, Container, Iterable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxzip.distributed import sum_across_ranks, sum_fields_across_ranks

__all__ = ["batch_norm_nodes", "reset_batch_norm"]


class _BatchStats(nn.Module):
    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps
        self.mean_sum: torch.Tensor | None = None
        self.var_sum: torch.Tensor | None = None
        self.batches = 0

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
        c = x.shape[1]
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
        # the sums over batches are kept in float64
        self.mean_sum = mean.double() if self.mean_sum is None else self.mean_sum.add_(mean)
        self.var_sum = unbiased.double() if self.var_sum is None else self.var_sum.add_(unbiased)
        self.batches += 1
        return out


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
        stats = _BatchStats(float(eps))
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
    seen = 0
    with torch.no_grad():
        for batch in progress(batches):
            call(tmp, batch)
            seen += 1
    # several processes: the per-batch sums and batch counts of every rank, once
    seen = sum_across_ranks(seen)
    sum_fields_across_ranks([s for s, _, _ in collectors], "mean_sum", "var_sum", "batches")
    if seen == 0:
        raise ValueError("reset_norm_stats got no batches: data is empty")
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
