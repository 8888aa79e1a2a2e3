"""Split a merged graph at a cut point into a shared trunk and one head per model.

The trunk is the merged model up to the cut; head k is model k's own remaining
layers. Head k reads the merged features through its unmerge U_k, which is a
0/1 assignment: a weight layer reading the cut absorbs it into its input
columns (``W_k U_k``, an index_add), and every other reader (an identity
shortcut, a norm, a layer scale) gets ``index_select`` on the channel axis,
exact and free of multiply-adds. The base models are never re-run: the work
is exactly trunk + heads.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Mapping, Sequence

import networkx as nx
import torch
import torch.fx as fx
from torch import nn

from fxzip.align import CommonPart
from fxzip.analysis import GraphAnalysis
from fxzip.assignment import axis_index, merged_length
from fxzip.cuts import INPUT, CutPoint, absorbing_readers, absorbing_users, gathering_readers

from .widen import replace_tensors

__all__ = ["depends_on_trunk", "split_at_cut", "split_aligned", "UNMERGE", "Unmerge"]

UNMERGE = "fxzip_unmerge"
"""``node.meta`` key of a head's gather of the trunk's merged features (an ``Unmerge``)."""


@dataclass(frozen=True)
class Unmerge:
    """Head ``head`` reads the cut through a gather: the model's own features
    there are model ``head``'s node ``source``, channels on axis ``dim``
    (what ``passes.cut_map`` fits a least-squares map to)."""

    head: int
    source: str
    dim: int


def split_at_cut(merged: fx.GraphModule, models: Sequence[fx.GraphModule], analysis: GraphAnalysis,
                 cut: CutPoint, assign: Mapping[int, torch.Tensor]) -> fx.GraphModule:
    """One GraphModule returning the tuple of the heads' outputs (model order)."""
    nodes = list(merged.graph.nodes)
    trunk, cut_node = _trunk(nodes, cut)
    absorbing = absorbing_users(cut_node, analysis) if cut_node is not None else set()
    root = nn.Module()
    root.add_module("trunk", merged)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in nodes:
        if n in trunk:
            env[n] = _copy(graph, n, env, "trunk")
    outputs = []
    for k, model in enumerate(models):
        head = copy.deepcopy(model)
        root.add_module(f"head{k}", head)
        head_nodes = {n.name: n for n in head.graph.nodes}
        henv: dict[fx.Node, fx.Node] = {}
        for n in nodes:
            if n in trunk and n is not cut_node:
                henv[head_nodes[n.name]] = env[n]
        gather = None
        if cut_node is not None:
            idx = axis_index(cut.segments, assign, k).to(torch.long)
            identity = torch.equal(idx, torch.arange(len(idx))) and merged_length(cut.segments, assign) == len(idx)
            if set(cut_node.users) - absorbing:  # registered even when identity: one structure per cut
                root.register_buffer(f"unmerge{k}", idx.clone().to(_device_of(merged)))
                gather = graph.call_function(torch.index_select, (env[cut_node], cut.dim, graph.get_attr(f"unmerge{k}")))
                gather.meta[UNMERGE] = Unmerge(k, cut_node.name, cut.dim)
            for user in absorbing:
                if not identity:
                    _absorb_unmerge(head, user.name, analysis, assign, k)
        if cut_node is not None:
            henv[head_nodes[cut_node.name]] = gather if gather is not None else env[cut_node]
        for n in nodes:
            if n in trunk or n.op == "output":
                continue
            hn = head_nodes[n.name]
            if n in absorbing:  # reads the merged features directly: its weight holds U_k
                new = graph.node_copy(hn, lambda a: env[cut_node] if a.name == cut_node.name else henv[a])
            else:
                new = graph.node_copy(hn, lambda a: henv[a])
            if hn.op in ("call_module", "get_attr"):
                new.target = f"head{k}.{hn.target}"
            new.name = f"head{k}_{hn.name}"
            henv[hn] = new
        out = next(n for n in reversed(head.graph.nodes) if n.op == "output")
        outputs.append(fx.node.map_arg(out.args[0], lambda a: henv[a]))
    graph.output(tuple(outputs))
    gm = fx.GraphModule(root, graph, "PartialZip")
    gm.graph.lint()
    return gm.eval()  # like a full zip: inference mode (a new root module starts in training mode)


def split_aligned(merged: fx.GraphModule, models: Sequence[fx.GraphModule], common: CommonPart, cut: CutPoint,
                  assign: Mapping[int, torch.Tensor]) -> fx.GraphModule:
    """``split_at_cut`` for models aligned by ``fxzip.align`` (other names, other
    heads): head k is model k's own graph after its partner of the cut node,
    reading the trunk where model k reads its partners of the trunk's nodes.
    Which head layers absorb U_k is found by structure (``absorbing_readers``):
    heads are never analyzed."""
    nodes = list(merged.graph.nodes)
    trunk, cut_node = _trunk(nodes, cut)
    root = nn.Module()
    root.add_module("trunk", merged)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in nodes:
        if n in trunk:
            env[n] = _copy(graph, n, env, "trunk")
    outputs = []
    for k, model in enumerate(models):
        view = common.views[k]
        head = copy.deepcopy(model)
        root.add_module(f"head{k}", head)
        head_nodes = {n.name: n for n in head.graph.nodes}
        value: dict[fx.Node, fx.Node] = {}  # model k's node -> what the whole module computes for it
        for n in nodes:
            if n in trunk and n is not cut_node and n.name in common.maps[k]:
                value.setdefault(view.resolve(common.maps[k][n.name]), env[n])
        mine, absorbing = None, set()
        if cut_node is not None:
            mine = view.resolve(common.maps[k][cut.name])
            absorbing = absorbing_readers(view, mine, cut.dim)
            idx = axis_index(cut.segments, assign, k).to(torch.long)
            gather = None
            if gathering_readers(view, mine, cut.dim):
                root.register_buffer(f"unmerge{k}", idx.clone().to(_device_of(merged)))
                gather = graph.call_function(torch.index_select,
                                             (env[cut_node], cut.dim, graph.get_attr(f"unmerge{k}")))
                gather.meta[UNMERGE] = Unmerge(k, mine.name, cut.dim)
            if not torch.equal(idx, torch.arange(len(idx))) or merged_length(cut.segments, assign) != len(idx):
                for reader in absorbing:
                    _absorb_columns(head, reader.target, idx, merged_length(cut.segments, assign))
            value[mine] = gather if gather is not None else env[cut_node]
        henv: dict[str, fx.Node] = {}
        for nk in view.nodes:
            if nk.op == "output":
                continue
            if view.resolve(nk) in value:
                henv[nk.name] = value[view.resolve(nk)]
                continue
            hn = head_nodes[nk.name]
            if nk in absorbing:  # reads the merged features directly: its weight holds U_k
                new = graph.node_copy(hn, lambda a: env[cut_node] if view.resolve(view.named(a.name)) is mine
                                      else henv[a.name])
            else:
                new = graph.node_copy(hn, lambda a: henv[a.name])
            if hn.op in ("call_module", "get_attr"):
                new.target = f"head{k}.{hn.target}"
            new.name = f"head{k}_{hn.name}"
            henv[nk.name] = new
        out = next(n for n in reversed(head.graph.nodes) if n.op == "output")
        outputs.append(fx.node.map_arg(out.args[0], lambda a: henv[a.name]))
    graph.output(tuple(outputs))
    gm = fx.GraphModule(root, graph, "PartialZip")
    gm.graph.lint()
    return gm.eval()  # like a full zip: inference mode (a new root module starts in training mode)


def depends_on_trunk(split: fx.GraphModule) -> set[str]:
    """Names of the nodes of a split partial zip whose values depend on the
    trunk's (merged) parameters or buffers. The rest compute what the original
    models computed (a head fed only by the raw input, every head of a zip that
    stops before the first weight layer), so a norm reset must leave them alone:
    re-estimating a model's own statistics on the other tasks' data only moves
    them away from the ones it was trained with."""
    def owns_state(node: fx.Node) -> bool:
        if node.op == "get_attr":
            return True
        if node.op == "call_module":
            mod = split.get_submodule(node.target)
            return any(True for _ in mod.parameters()) or any(True for _ in mod.buffers())
        return False

    changed: set[str] = set()
    for node in split.graph.nodes:
        from_trunk = isinstance(node.target, str) and node.target.split(".")[0] == "trunk" and owns_state(node)
        if from_trunk or any(a.name in changed for a in node.all_input_nodes):
            changed.add(node.name)
    return changed


def _trunk(nodes: Sequence[fx.Node], cut: CutPoint) -> tuple[set[fx.Node], fx.Node | None]:
    """The nodes the trunk computes (the cut and its ancestors, every input) and the cut node."""
    by_name = {n.name: n for n in nodes}
    # every input stays an input of the whole module (also optional ones the
    # trunk does not read, such as timm's attn_mask)
    trunk = {n for n in nodes if n.op == "placeholder"}
    if cut.name == INPUT:
        return trunk, None
    cut_node = by_name[cut.name]
    flow = nx.DiGraph((i.name, n.name) for n in nodes for i in n.all_input_nodes)
    flow.add_node(cut.name)
    return trunk | {by_name[a] for a in nx.ancestors(flow, cut.name)} | {cut_node}, cut_node


def _absorb_columns(head: fx.GraphModule, target: str, idx: torch.Tensor, length: int) -> None:
    """W_k <- W_k U_k for a conv/linear module (input channels on weight axis 1),
    ``length`` merged input channels (more than W_k has under merged_width)."""
    with torch.no_grad():
        _put(head, f"{target}.weight", _columns(_get(head, f"{target}.weight"), 1, idx, length))


def _put(head: fx.GraphModule, name: str, value: torch.Tensor) -> None:
    """Write ``value`` into tensor ``name``: in place, or as a wider tensor (and
    resized module) when merged_width widened the merged features it reads."""
    tensor = _get(head, name)
    if value.shape == tensor.shape:
        tensor.copy_(value)
    else:
        replace_tensors(head, {name: value})


def _columns(tensor: torch.Tensor, axis: int, idx: torch.Tensor, length: int) -> torch.Tensor:
    shape = list(tensor.shape)
    shape[axis] = length
    return tensor.new_zeros(shape).index_add_(axis, idx.to(tensor.device), tensor)


def _copy(graph: fx.Graph, n: fx.Node, env: dict, prefix: str) -> fx.Node:
    new = graph.node_copy(n, lambda a: env[a])
    if n.op in ("call_module", "get_attr"):
        new.target = f"{prefix}.{n.target}"
    return new


def _absorb_unmerge(head: fx.GraphModule, node_name: str, analysis: GraphAnalysis,
                    assign: Mapping[int, torch.Tensor], k: int) -> None:
    """W_k <- W_k U_k on the input axis of ``node_name``'s weight."""
    with torch.no_grad():
        for param, axis, segments in analysis.consumed[node_name]:
            tensor = _get(head, param)
            resolved = analysis.resolved(segments)
            idx = axis_index(resolved, assign, k)
            _put(head, param, _columns(tensor, axis, idx, merged_length(resolved, assign)))


def _device_of(module: nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


def _get(module: nn.Module, target: str) -> torch.Tensor:
    obj = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
