"""A refit partial zip in one read of the data: the trunk, the cut maps, the head layers.

After the split (``passes.split``) the trunk is refit as a full zip's layers
are (``passes.refit``: each to the matched average of the originals' outputs,
fed the merged model's own inputs), and each head k, which reads the trunk's
merged features ``z``, gets two fits that make it compute model k's function
again from them:

* where a head gathers the merged channels (an identity shortcut, a norm, a
  transformer's residual stream), the 0/1 gather becomes a least-squares map
  ``M_k`` to model k's own features at the cut (``passes.cut_map``);
* each head layer that reads the trunk, directly or through one-input ops
  without fitted weights (its weights hold ``W_k U_k``), is refit so that,
  fed what it now reads, it reproduces model k's own output of that layer
  (``t = y_k``: a head is not merged; the ridge pulls toward ``W_k U_k``).

All are closed-form fits with the refit's normal equations and ridge. Each
needs the fits before it (a map reads the refit trunk's output, a head layer
reads through the map); with the sequential executor (``passes.sequential``)
that is still one read of the data: the split model and the originals side
by side (the ``joint`` graph) walk forward together over the cached
activations; a trunk layer is fitted where its input is final, a map where
the trunk's output and model k's feature are, its output then takes the
gather's place for every batch, and a head layer is fitted where its input
(through the map) is final. After the walk the gathers are rewired to the
fitted maps (``cutmapK`` modules, counted in the MACs). Two models: 3 model
passes, as a full zip's refit (models that differ after the trunk add a walk
of each model whose head nodes the joint graph lacks). The weights are
those of refitting the trunk before the split, the maps in a second read
and the head layers in a third (the same float operations per batch, in the
same order; checked bit for bit when this replaced them).

Invariants: a self-merge or a permuted copy keeps the folded trunk, the
gather (``U_k z = x_k``) and the folded head weights (``W_k U_k z = y_k``)
exactly.
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.fx as fx
from torch import nn

from fxzip.analysis import GraphAnalysis
from fxzip.assignment import cluster_sizes
from fxzip.distributed import sum_fields_across_ranks

from .cut_map import CUT_MAP, _channels_last, _gather_as_linear, _rewire, _Site
from .real_tokens import RealTokens
from .refit import (
    DEFAULT_RIDGE,
    RefitLayer,
    RefitResult,
    _fit,
    _fittable,
    _Normal,
    _out_rows,
    _real_rows,
    _rows,
    _untie_refit,
    find_layers,
    refit_steps,
    their_nodes,
)
from .sequential import Executor, GraphWalk, Step
from .split import UNMERGE

__all__ = ["refit_partial", "head_layers"]

_WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _in_head(node: fx.Node, head: str) -> bool:
    """Whether ``node`` belongs to head ``head`` of a split partial zip (its
    modules live under ``head``, its other nodes are named ``head_...``)."""
    return node.name.startswith(head + "_") or (node.op == "call_module" and node.target.split(".")[0] == head)


def _reads_trunk(split: fx.GraphModule, src: fx.Node, head: str) -> bool:
    """Whether a head layer's input ``src`` is the trunk's output, directly or
    through a chain of the head's one-input ops that hold no fitted weight (a
    pre-norm transformer's LayerNorm, an activation, a reshape): the layer then
    still reads the merged features through ``U_k``. A chain through another
    weight layer or a join of several tensors (a residual add) is the head's
    own computation."""
    while _in_head(src, head):
        if src.op == "call_module" and isinstance(split.get_submodule(src.target), _WEIGHT_LAYERS):
            return False
        tensors = [a for a in src.all_input_nodes if a.op != "get_attr"]
        if len(tensors) != 1:
            return False
        src = tensors[0]
    return src.op != "placeholder"


def head_layers(split: fx.GraphModule) -> tuple[list[tuple[RefitLayer, int, str]], list[str]]:
    """The head layers a refit partial zip fits: ``(layer, head k, its node name
    in model k)``, and the ones it cannot fit, with the reason."""
    heads = {name for name, _ in split.named_children() if name.startswith("head")}
    layers: list[tuple[RefitLayer, int, str]] = []
    skipped: list[str] = []
    for node in split.graph.nodes:
        head = node.target.split(".")[0] if node.op == "call_module" else None
        if head not in heads or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        mod = split.get_submodule(node.target)
        if not isinstance(mod, _WEIGHT_LAYERS):
            continue
        src = node.args[0]
        if not _reads_trunk(split, src, head):
            continue  # reads its own head's features (or the raw input): model k's weights already fit
        why = _fittable(mod)
        if why is not None:
            skipped.append(f"{node.target}: {why}")
            continue
        k = int(head[len("head"):])
        layers.append((RefitLayer(node.target, node.name, src.name, ()), k, node.name[len(head) + 1:]))
    return layers, skipped


def refit_partial(split: fx.GraphModule, analysis: GraphAnalysis, joint: fx.GraphModule,
                  node_maps: Sequence[dict[str, fx.Node]], assign: Mapping[int, torch.Tensor],
                  models: Sequence[fx.GraphModule], batches: Iterable[tuple], ridge: float = DEFAULT_RIDGE,
                  progress: Callable[[Iterable], Iterable] = lambda x: x, max_memory: int | None = None,
                  cache_dtype: torch.dtype | None = None) -> tuple[RefitResult, RefitResult, RefitResult]:
    """Refit a partial zip in place, in one walk over the data: the trunk's
    layers as a full zip's (``passes.refit``), then the cut maps and the head
    layers (module docstring). Returns (trunk, maps, head layers); each
    result's ``passes`` and ``data_reads`` are the one walk's (count them
    once): the split model, the originals side by side (``joint``, whose
    ``node_maps`` name the trunk's and, for models of one architecture, the
    heads' targets) and each model whose head nodes ``joint`` lacks (models
    that differ after the trunk). ``max_memory`` / ``cache_dtype``: the
    executor's cache, as for the refit."""
    trunk, skipped = find_layers(split, analysis)
    trunk = [l for l in trunk if l.name.startswith("trunk.")]
    skipped = [why for why in skipped if why.startswith("trunk.")]
    _untie_refit(split, trunk)
    counts = {sp: cluster_sizes(a) for sp, a in assign.items()}
    sites = [_Site(n, n.meta[UNMERGE].head, n.meta[UNMERGE].source, n.meta[UNMERGE].dim)
             for n in split.graph.nodes if UNMERGE in n.meta]
    layers, head_skipped = head_layers(split)
    run = Executor(batches, max_memory, dtype=cache_dtype)
    mine = run.walk(split, "split", [l.input for l in trunk] + [s.gather.args[0].name for s in sites]
                    + [s.gather.name for s in sites] + [l.input for l, _, _ in layers])
    theirs_of = their_nodes(trunk, node_maps)
    targets = [(s.head, s.source) for s in sites] + [(k, orig) for _, k, orig in layers]
    in_joint = {(k, name): node_maps[k][name].name for k, name in targets if name in node_maps[k]}
    joint_walk = run.walk(joint, "joint", [n for names in theirs_of.values() for n in names] + list(in_joint.values()))
    own: dict[int, list[str]] = {}
    for k, name in targets:
        if (k, name) not in in_joint:
            own.setdefault(k, []).append(name)
    own_walks = {k: run.walk(models[k], f"model{k}", names) for k, names in sorted(own.items())}

    def target(k: int, name: str):
        """Model k's node ``name``: its walk and its name there."""
        return (joint_walk, in_joint[k, name]) if (k, name) in in_joint else (own_walks[k], name)

    steps = refit_steps(run, split, mine, joint_walk, trunk, theirs_of, assign, counts, ridge)
    tokens = RealTokens(split.graph)
    mask_key = mine.key(tokens.node) if tokens else None  # fits over real tokens only
    order = {name: i for i, name in enumerate(n.name for n in split.graph.nodes)}
    events = sorted([(order[s.gather.name], "map", s) for s in sites]
                    + [(order[l.node], "layer", (l, k, orig)) for l, k, orig in layers], key=lambda e: e[0])
    map_layers: list[RefitLayer] = []
    for _, kind, item in events:
        if kind == "map":
            steps += _map_steps(item, split, mine, target(item.head, item.source), run, tokens, mask_key, ridge,
                                map_layers)
        else:
            layer, k, orig = item
            walk, name = target(k, orig)
            steps += mine.until([layer.input])
            steps += walk.until([name])
            steps.append(_layer_step(layer, split, mine.key(layer.input), walk.key(name), run, tokens, mask_key,
                                     ridge))
    run.run(steps, progress)
    for s, layer in zip(sites, map_layers):
        split.add_module(layer.name, s.module)
        _rewire(split.graph, s, layer.name)
    if sites:
        split.graph.eliminate_dead_code()
        split.graph.lint()
        split.recompile()
    walked = 1 + len(node_maps) + len(own_walks)  # every graph over the data once
    memory = run.cache.summary()
    return (RefitResult(trunk, walked, skipped, "sequential", 1, memory),
            RefitResult(map_layers, walked, [], "sequential", 1, memory),
            RefitResult([l for l, _, _ in layers], walked, head_skipped, "sequential", 1, memory))


def _map_steps(s: _Site, split: fx.GraphModule, mine: GraphWalk, source: tuple[GraphWalk, str], run: Executor,
               tokens: RealTokens, mask_key, ridge: float, fitted: list[RefitLayer]) -> list[Step]:
    """Head ``s.head``'s cut map: fitted once the trunk's output and model k's
    feature (``source``: its walk and node name) are final; then its output,
    for every batch, is the gather's value."""
    z_node = s.gather.args[0]
    theirs, source_name = source
    steps = mine.until([z_node.name]) + theirs.until([source_name])
    z_key, x_key = mine.key(z_node), theirs.key(source_name)
    name = CUT_MAP.format(head=s.head)
    layer = RefitLayer(name, name, z_node.name, ())
    fitted.append(layer)

    def fit() -> None:
        for b in range(run.n_batches):
            z, x = run.get(z_key, b), run.get(x_key, b)
            if s.module is None:
                s.module = _gather_as_linear(split, s, z.shape[s.dim], x.shape[s.dim]).to(z.device, z.dtype)
                s.normal, s.rank = _Normal(s.module), z.dim()
            mask = tokens.mask_of(run.get(mask_key, b)) if mask_key else None
            keep = tokens.positions(z_node, mask, z.movedim(s.dim, -1).shape[:-1])
            s.normal.add(_channels_last(z, s.dim), _channels_last(x, s.dim).double(), keep)
        sum_fields_across_ranks([s.normal], "gram", "cross", "tt", "n")
        _fit(layer, s.module, s.normal, ridge)

    steps.append(Step((z_key, x_key) + ((mask_key,) if mask_key else ()), run=fit, label=f"fit {name}"))
    replaced = False
    for step in mine.until([s.gather.name]):
        if step.node is not s.gather:
            steps.append(step)
            continue
        replaced = True
        gather_key = mine.key(s.gather)

        def apply_map() -> None:  # the map's output stands in for the gather's, batch by batch
            for b in range(run.n_batches):
                z = run.get(z_key, b)
                run.put(gather_key, b, s.module(z.movedim(s.dim, -1)).movedim(-1, s.dim))

        steps.append(Step((z_key,), run=apply_map, label=f"apply {name}"))
    if not replaced:  # the walk computed the gather before its map was fitted: the heads would read the gather
        raise RuntimeError(f"refit of a partial zip: head {s.head}'s gather {s.gather.name!r} was computed before "
                           f"its cut map {name!r} was fitted; this is a bug in fxzip's step order, please report it")
    return steps


def _layer_step(layer: RefitLayer, split: fx.GraphModule, x_key, y_key, run: Executor, tokens: RealTokens,
                mask_key, ridge: float) -> Step:
    """Fit one head layer on what it reads (through the maps) to model k's output of it."""

    def fit() -> None:
        mod = split.get_submodule(layer.name)
        normal = _Normal(mod)
        for b in range(run.n_batches):
            x = run.get(x_key, b)
            rows = _rows(mod, x)
            mask = tokens.mask_of(run.get(mask_key, b)) if mask_key else None
            normal.add(rows, _out_rows(mod, run.get(y_key, b)).double(),
                       _real_rows(tokens, layer.input, mask, mod, x, rows.shape[0]))
        sum_fields_across_ranks([normal], "gram", "cross", "tt", "n")
        _fit(layer, mod, normal, ridge)

    return Step((x_key, y_key) + ((mask_key,) if mask_key else ()), run=fit, label=f"fit {layer.name}")
