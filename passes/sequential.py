"""A sequential executor: graphs run node by node over the whole calibration
set held as cached activations, so that a pass which fits layers in network
order (``refit``, ``repair``) reads the data once, instead of once per layer
depth through truncated graphs (``waves.py``), as GPTQ / llm-compressor's
sequential pipelines do.

The walk. A pass builds a *schedule* before it runs anything: the nodes of
each graph it needs (the ancestors of what it reads), in the graph's order,
interleaved with its own *events* (fit this layer, repair this site). An
event is placed where its inputs are final: right after the last node it
reads, which topological order puts after every earlier event those nodes
depend on. A graph advances only as far as the next event needs, so the
merged model and the originals side by side (the ``joint`` graph) move
forward together. Each node is evaluated for every batch before the next
node (an ``fx.Interpreter`` per graph, the same calls the compiled module
makes, in the same order), so an event sees all batches' values at once and
what it writes (new weights) is used by every later node. The data is read
once, at the start: the placeholders' values per batch are the first
cached activations.

Memory. The cache holds, for each node still to be read, its value for
every batch; a value is freed after its last reader (the schedule knows
every read's position). Bytes held are counted per distinct tensor storage
(the q, k and v views of one fused projection count once), and ``peak`` is
the most the cache held after any step; a node's transient values (its own
output while computed, a spilled value read back) are not counted.

Spill. With ``max_memory`` (bytes), whenever the cache holds more, values are
written to disk, those read farthest in the future first (Belady's rule on
the schedule), one batch's value at a time, until it fits. A spilled tensor
is saved with ``torch.save`` as the storage span it covers, in its own dtype,
with its shape, strides and offset, so it comes back bit for bit with the
same strides (kernels then see exactly the tensor they would have); a
tuple or list of tensors is spilled element by element, anything else stays
in memory (counted). Files live in a temporary folder removed at the end.
An in-place op (``relu_``, ``+=``) on a spilled value changes the copy read
back, not the file: exact where the mutated value has no other reader (a
norm's output into its ReLU, a residual branch into ``+=``), which is how
traced models use them; a later reader of a spilled, mutated value would see
it unmutated. Without ``max_memory`` (and without ``dtype``, below) the walk
has the program's semantics.

Lower precision, opt-in. With ``dtype`` (``torch.float16`` or
``torch.bfloat16``), floating values of a wider dtype are kept in ``dtype``
(in memory and spilled) and read back converted to their own dtype: half the
memory of float32 activations, at a rounding error the cache bounds for
every value it rounds (``rounding``: the largest bound on |x - stored| /
max|x|, ``_lower_one``) and reports. A value that does not fit ``dtype``'s normal range (float16 stops
at 65504 and its normal numbers at 6.1e-5) keeps its own dtype and is
counted. Every value is rounded, the fits'
targets too: keeping the targets (and, for the two sides of a fit to round
alike, the merged layers' outputs) in float32 kept 82% of the float32 peak
on a ViT and still did not make a self-merge exact (the refit's own float
noise moves its inputs across float16 rounding boundaries), so the opt-in
buys the memory, and the merge's report says what it cost. A read gives a
fresh tensor, so an in-place op on it has the spilled values' caveat above.
"""
from __future__ import annotations

import bisect
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Sequence

import torch
import torch.fx as fx

__all__ = ["ActivationCache", "Executor", "GraphWalk", "Step", "LOW_PRECISION"]

Key = Hashable
LOW_PRECISION = (torch.float16, torch.bfloat16)  # what cached activations may be kept in, opt-in


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _storage(t: torch.Tensor) -> tuple[tuple, int]:
    s = t.untyped_storage()
    return (t.device.type, t.device.index, s.data_ptr()), s.nbytes()


def _packable(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.layout == torch.strided and not t.is_quantized


def _spillable(value: Any) -> bool:
    if _packable(value):
        return True
    return type(value) in (tuple, list) and bool(value) and all(_packable(v) for v in value)


def _pack(t: torch.Tensor) -> dict:
    """The storage span ``t`` covers (offset to its last element), cloned, with
    its shape and strides: unpacked, the same bits with the same strides."""
    span = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride())) if t.numel() else 0
    data = torch.as_strided(t, (span,), (1,)).clone() if span else t.new_empty(0)
    return {"data": data, "shape": tuple(t.shape), "stride": tuple(t.stride())}


def _unpack(d: dict) -> torch.Tensor:
    return torch.as_strided(d["data"], d["shape"], d["stride"], 0)


class ActivationCache:
    """Per-batch values under keys (a graph's node, or the data's ``("input", i)``).

    ``uses[key]`` lists the schedule positions that read it and ``step`` is
    the position running now: a value is kept while a later read remains, and
    spilled in order of its next read (the farthest first)."""

    def __init__(self, max_memory: int | None = None, spill_dir: str | Path | None = None,
                 dtype: torch.dtype | None = None):
        if max_memory is not None and max_memory < 0:
            raise ValueError(f"max_memory must be >= 0 bytes (or None: no limit), got {max_memory}")
        if dtype is not None and dtype not in LOW_PRECISION:
            raise ValueError(f"cached activations can be kept in {' or '.join(map(str, LOW_PRECISION))} "
                             f"(or None: their own dtype), got {dtype}")
        self.max_memory = max_memory
        self.dtype = dtype
        self._own: dict[tuple[Key, int], Any] = {}  # the dtypes of values kept in ``dtype``
        self.rounding = 0.0
        self.rounded = self.kept_own = 0
        self.uses: dict[Key, list[int]] = {}
        self.step = -1
        self._ram: dict[Key, dict[int, Any]] = {}
        self._disk: dict[Key, dict[int, Path]] = {}
        self._refs: dict[tuple[Key, int], list[tuple]] = {}
        self._storages: dict[tuple, list[int]] = {}  # id -> [nbytes, references]
        self._parent = spill_dir
        self._dir: Path | None = None
        self._files = 0
        self.held = self.peak = 0
        self.spilled_bytes = self.spills = self.reloads = 0

    # values ---------------------------------------------------------------
    def put(self, key: Key, batch: int, value: Any) -> None:
        """Store ``value`` (replacing one already there); dropped at once if
        nothing reads ``key`` after the current step."""
        self._remove(key, batch)
        if self._next(key) is None:
            return
        if self.dtype is not None:
            value = self._lower(key, batch, value)
        self._ram.setdefault(key, {})[batch] = value
        refs = []
        for t in _tensors(value):
            sid, nbytes = _storage(t)
            entry = self._storages.setdefault(sid, [nbytes, 0])
            if entry[1] == 0:
                self.held += nbytes
            entry[1] += 1
            refs.append(sid)
        self._refs[key, batch] = refs
        self._fit()
        self.peak = max(self.peak, self.held)

    def get(self, key: Key, batch: int) -> Any:
        own = self._own.get((key, batch))
        value = self._read(key, batch)
        if own is None:
            return value
        if isinstance(value, torch.Tensor):
            return value.to(own)
        return type(value)(v.to(d) if d is not None else v for v, d in zip(value, own))  # a tuple or list

    def _read(self, key: Key, batch: int) -> Any:
        ram = self._ram.get(key)
        if ram is not None and batch in ram:
            return ram[batch]
        path = self._disk[key][batch]
        self.reloads += 1
        packed = torch.load(path, weights_only=True)
        if isinstance(packed, dict):
            return _unpack(packed)
        kind, items = packed
        return (tuple if kind == "tuple" else list)(_unpack(d) for d in items)

    def _lower(self, key: Key, batch: int, value: Any) -> Any:
        """``value`` with its wider floating tensors in ``self.dtype``; their
        own dtypes noted for ``get``, the rounding bounded. Plain tuples and
        lists only: a named tuple (a leaf module's output) cannot be rebuilt
        from its items alone, so it keeps its dtype."""
        if isinstance(value, torch.Tensor):
            low, own = self._lower_one(value)
            if own is not None:
                self._own[key, batch] = own
            return low
        if type(value) in (tuple, list) and any(isinstance(v, torch.Tensor) for v in value):
            pairs = [self._lower_one(v) if isinstance(v, torch.Tensor) else (v, None) for v in value]
            if any(own is not None for _, own in pairs):
                self._own[key, batch] = [own for _, own in pairs]
                return type(value)(low for low, _ in pairs)
        return value

    def _lower_one(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.dtype | None]:
        """``t`` in ``self.dtype``, or as it is where that would lose more than
        rounding: values past the dtype's range (and NaN, inf), and values
        whose largest magnitude is below its smallest normal number (a
        LayerScale branch at 1e-6 would be stored as float16 subnormals, with
        fewer significant bits, or flushed to zero); sparse tensors stay too.

        The rounding is bounded, not measured: measuring it (upcast, subtract,
        reduce) cost 2.5x the conversion itself on CPU, and round to nearest
        guarantees |x - stored| <= u |x| (u: half the dtype's epsilon) for
        normal numbers and half the subnormal spacing below them, which is at
        most u max|x| once max|x| is normal: relative to the value's largest
        magnitude the error is at most u, reached up to max|x| / |x| of the
        worst-rounded x (measured 0.6x on 2000 Gaussian values, 1x to 2x
        within one binade)."""
        if (not t.is_floating_point() or t.element_size() <= self.dtype.itemsize or t.numel() == 0
                or t.layout != torch.strided):
            return t, None
        low, high = torch.aminmax(t)  # one pass; NaN or inf fail the range check below and keep the value
        scale = float(torch.maximum(-low, high))
        info = torch.finfo(self.dtype)
        if not info.smallest_normal <= scale <= info.max:
            if scale != 0:  # all zeros are stored exactly
                self.kept_own += 1
                return t, None
        else:
            self.rounding = max(self.rounding, info.eps / 2)
        self.rounded += 1
        low = t.to(self.dtype)
        return low, t.dtype

    def drop(self, key: Key) -> None:
        for batch in list(self._ram.get(key, ())) + list(self._disk.get(key, ())):
            self._remove(key, batch)
        self._ram.pop(key, None)
        self._disk.pop(key, None)

    def has(self, key: Key) -> bool:
        return bool(self._ram.get(key)) or bool(self._disk.get(key))

    def close(self) -> None:
        self._ram.clear()
        self._disk.clear()
        self._own.clear()
        self._refs.clear()
        self._storages.clear()
        self.held = 0
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def summary(self) -> dict[str, Any]:
        out = {"peak_bytes": self.peak, "max_memory": self.max_memory, "spilled_bytes": self.spilled_bytes,
               "spilled_values": self.spills, "reloads": self.reloads}
        if self.dtype is not None:
            out.update(cache_dtype=str(self.dtype).removeprefix("torch."), rounding_rel_bound=self.rounding,
                       values_rounded=self.rounded, values_kept_in_own_dtype=self.kept_own)
        return out

    # bookkeeping ----------------------------------------------------------
    def _next(self, key: Key) -> int | None:
        pos = self.uses.get(key, ())
        i = bisect.bisect_right(pos, self.step)
        return pos[i] if i < len(pos) else None

    def _release(self, key: Key, batch: int) -> None:
        for sid in self._refs.pop((key, batch), ()):
            entry = self._storages[sid]
            entry[1] -= 1
            if entry[1] == 0:
                self.held -= entry[0]
                del self._storages[sid]

    def _remove(self, key: Key, batch: int) -> None:
        self._own.pop((key, batch), None)
        ram = self._ram.get(key)
        if ram is not None and batch in ram:
            del ram[batch]
            self._release(key, batch)
        disk = self._disk.get(key)
        if disk is not None and batch in disk:
            disk.pop(batch).unlink(missing_ok=True)

    def _fit(self) -> None:
        """Spill values, the farthest next read first, until the cache holds
        no more than ``max_memory``."""
        if self.max_memory is None or self.held <= self.max_memory:
            return
        def upcoming(key: Key) -> float:  # a value the current step reads counts as read now
            pos = self.uses.get(key, ())
            i = bisect.bisect_left(pos, self.step)
            return pos[i] if i < len(pos) else float("inf")

        for key in sorted((k for k in self._ram if self._ram[k]), key=upcoming, reverse=True):
            for batch in sorted(self._ram[key], reverse=True):
                if self.held <= self.max_memory:
                    return
                if _spillable(self._ram[key][batch]):
                    self._spill(key, batch)

    def _spill(self, key: Key, batch: int) -> None:
        value = self._ram[key].pop(batch)
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="fxzip-spill-", dir=self._parent))
        path = self._dir / f"{self._files}.pt"
        self._files += 1
        packed = _pack(value) if isinstance(value, torch.Tensor) else \
            ("tuple" if isinstance(value, tuple) else "list", [_pack(t) for t in value])
        torch.save(packed, path)
        self._disk.setdefault(key, {})[batch] = path
        self._release(key, batch)
        self.spills += 1
        self.spilled_bytes += sum(t.numel() * t.element_size() for t in _tensors(value))


@dataclass
class Step:
    """One position of a schedule: a graph node evaluated for every batch
    (``walk`` and ``node``), or an event (``run``); ``reads`` are the keys it
    reads (kept until then)."""

    reads: tuple[Key, ...]
    walk: "GraphWalk | None" = None
    node: fx.Node | None = None
    run: Callable[[], None] | None = None
    label: str = ""


class GraphWalk:
    """One graph's nodes, in order, each evaluated for every batch from the
    cache. ``needed``: the node names whose values some event reads; the walk
    evaluates them and their ancestors, nothing else."""

    def __init__(self, gm: fx.GraphModule, tag: str, needed: Iterable[str]):
        self.gm, self.tag = gm, tag
        self.nodes = {n.name: n for n in gm.graph.nodes}
        self.placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self._slot = {n: i for i, n in enumerate(self.placeholders)}
        keep: set[str] = set()
        todo = [self.nodes[n] for n in needed]
        while todo:
            n = todo.pop()
            if n.name not in keep:
                keep.add(n.name)
                todo.extend(n.all_input_nodes)
        self.order = [n for n in gm.graph.nodes if n.name in keep and n.op not in ("placeholder", "get_attr", "output")]
        self.position = {n.name: i for i, n in enumerate(self.order)}
        self._cursor = 0
        self._interp = fx.Interpreter(gm, garbage_collect_values=False)

    def key(self, node: fx.Node | str) -> Key | None:
        node = self.nodes[node] if isinstance(node, str) else node
        if node.op == "placeholder":
            return ("input", self._slot[node])
        if node.op == "get_attr":
            return None  # a parameter or buffer: read when used
        return (self.tag, node.name)

    def reads(self, nodes: Iterable[fx.Node | str]) -> tuple[Key, ...]:
        keys = (self.key(n) for n in nodes)
        return tuple(dict.fromkeys(k for k in keys if k is not None))

    def until(self, names: Iterable[str]) -> list[Step]:
        """Evaluation steps from where the walk stands up to and including
        every node of ``names`` (nothing if they are computed already)."""
        last = max((self.position[n] for n in names if n in self.position), default=-1)
        steps = []
        while self._cursor <= last:
            node = self.order[self._cursor]
            steps.append(Step(self.reads(node.all_input_nodes), self, node, label=f"{self.tag}:{node.name}"))
            self._cursor += 1
        return steps

    def evaluate(self, nodes: Sequence[fx.Node], fetch: Callable[[fx.Node], Any]) -> Any:
        """Run ``nodes`` in order on one batch (values of other nodes from
        ``fetch``); the last one's value."""
        env: dict[fx.Node, Any] = {}
        interp = self._interp
        for node in nodes:
            for a in node.all_input_nodes:
                if a not in env:
                    env[a] = interp.fetch_attr(a.target) if a.op == "get_attr" else fetch(a)
            interp.env = env
            env[node] = interp.run_node(node)
        interp.env = {}
        return env[nodes[-1]]


class Executor:
    """Runs a schedule (a list of ``Step``) over the calibration batches, read
    once. ``passes``: model passes over the data, one per walked graph's model
    (the caller says how many models each graph runs)."""

    def __init__(self, batches: Iterable[tuple], max_memory: int | None = None,
                 spill_dir: str | Path | None = None, dtype: torch.dtype | None = None):
        self.batches = batches
        self.cache = ActivationCache(max_memory, spill_dir, dtype)
        self.walks: list[GraphWalk] = []
        self.n_batches = 0

    def walk(self, gm: fx.GraphModule, tag: str, needed: Iterable[str]) -> GraphWalk:
        w = GraphWalk(gm, tag, needed)
        self.walks.append(w)
        return w

    def get(self, key: Key, batch: int) -> Any:
        return self.cache.get(key, batch)

    def put(self, key: Key, batch: int, value: Any) -> None:
        self.cache.put(key, batch, value)

    def run(self, steps: Sequence[Step], progress: Callable[[Iterable], Iterable] = lambda x: x) -> None:
        cache = self.cache
        for i, step in enumerate(steps):
            step.reads = tuple(dict.fromkeys(step.reads))
            for key in step.reads:
                cache.uses.setdefault(key, []).append(i)
        try:
            with torch.no_grad():
                self._read_inputs()
                for i, step in enumerate(progress(steps)):
                    cache.step = i
                    if step.node is not None:
                        walk, node = step.walk, step.node
                        key = walk.key(node)
                        for b in range(self.n_batches):
                            value = walk.evaluate([node], lambda a: cache.get(walk.key(a), b))
                            cache.put(key, b, value)
                    else:
                        step.run()
                    for key in step.reads:
                        if cache.uses[key][-1] == i:
                            cache.drop(key)
        finally:
            cache.close()

    def _read_inputs(self) -> None:
        """The one read of the data: every batch's placeholder values (bound as
        ``fx.Interpreter`` binds a call's arguments), cached for the walks."""
        placeholders = max((w.placeholders for w in self.walks), key=len, default=[])
        self.cache.step = -1
        b = -1
        for b, batch in enumerate(self.batches):
            args = iter(batch)
            for i, p in enumerate(placeholders):
                if p.target.startswith("*"):
                    value = list(args)
                else:
                    value = next(args, _MISSING)
                    if value is _MISSING:
                        if not p.args:
                            raise RuntimeError(f"the batch has no value for the model's argument {p.target!r}")
                        value = p.args[0]
                self.cache.put(("input", i), b, value)
        self.n_batches = b + 1


_MISSING = object()
