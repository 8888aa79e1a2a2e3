"""Build one graph that runs N copies of an architecture on the same input.

Nodes are interleaved (node i of every model, then node i+1), so a value of
model 0 dies as soon as the other models have produced their copy of it:
calibrating N models costs N forward passes and about N times one model's
working set, never a stash of activations.
"""
from __future__ import annotations

from typing import Sequence

import torch.fx as fx
from torch import nn

from fxzip.align import CommonPart

__all__ = ["side_by_side"]


def side_by_side(models: Sequence[fx.GraphModule], common: CommonPart | None = None
                 ) -> tuple[fx.GraphModule, list[dict[str, fx.Node]]]:
    """Returns the joint module (submodules ``m0``, ``m1``, ...) and, per model,
    a map from the original node names to their copies. The joint forward
    returns the tuple of the models' outputs.

    With ``common`` (models aligned by ``fxzip.align``, not node for node) only
    the common part runs, in model 0's order, each model-0 node followed by its
    partners; the maps then take model 0's node names, and the forward returns
    None (the observers are what calibration runs it for)."""
    if common is not None:
        return _aligned(models, common)
    root = nn.Module()
    for k, m in enumerate(models):
        root.add_module(f"m{k}", m)
    graph = fx.Graph()
    envs: list[dict[fx.Node, fx.Node]] = [{} for _ in models]
    names: list[dict[str, fx.Node]] = [{} for _ in models]
    node_lists = [list(m.graph.nodes) for m in models]
    outputs = []
    for column in zip(*node_lists):
        for k, node in enumerate(column):
            if node.op == "placeholder":
                new = envs[0][column[0]] if k > 0 else graph.placeholder(node.target, default_value=
                                                                         node.args[0] if node.args else fx.node.inspect.Signature.empty)
            elif node.op == "output":
                outputs.append(fx.node.map_arg(node.args[0], lambda n, e=envs[k]: e[n]))
                continue
            else:
                new = graph.node_copy(node, lambda n, e=envs[k]: e[n])
                if node.op in ("call_module", "get_attr"):
                    new.target = f"m{k}.{node.target}"
                new.name = f"m{k}_{node.name}" if node.op != "placeholder" else new.name
            new.meta = dict(node.meta)
            envs[k][node] = new
            names[k][node.name] = new
    graph.output(tuple(outputs))
    gm = fx.GraphModule(root, graph, "SideBySide")
    return gm, names


def _aligned(models: Sequence[fx.GraphModule], common: CommonPart) -> tuple[fx.GraphModule, list[dict[str, fx.Node]]]:
    root = nn.Module()
    for k, m in enumerate(models):
        root.add_module(f"m{k}", m)
    graph = fx.Graph()
    envs: list[dict[fx.Node, fx.Node]] = [{} for _ in models]
    names: list[dict[str, fx.Node]] = [{} for _ in models]
    for n0 in common.views[0].nodes:
        if n0.name not in common.prefix:
            continue
        for k, view in enumerate(common.views):
            node, env = common.maps[k][n0.name], envs[k]
            if node not in env:  # a model-0 alias (nn.Identity) stands for a node copied already
                if node.op == "placeholder":
                    new = envs[0][common.maps[0][n0.name]] if k > 0 else graph.placeholder(
                        node.target, default_value=node.args[0] if node.args else fx.node.inspect.Signature.empty)
                else:
                    new = graph.node_copy(node, lambda a, e=env, v=view: e[a] if a in e else e[v.resolve(a)])
                    if node.op in ("call_module", "get_attr"):
                        new.target = f"m{k}.{node.target}"
                    new.name = f"m{k}_{node.name}"
                new.meta = dict(node.meta)
                env[node] = new
            names[k][n0.name] = env[node]
    graph.output(None)
    return fx.GraphModule(root, graph, "SideBySide"), names
