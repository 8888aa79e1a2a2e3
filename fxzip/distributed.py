"""Merging with several processes (``torch.distributed``): data-parallel statistics.

Everything fxzip streams over the data is a sum over samples (counts, sums and
Gram matrices per feature space, batch-norm batch statistics, the refit's
normal equations), so a merge scales out like data-parallel inference: when a
process group is initialised (``torch.distributed.init_process_group``, e.g.
under ``torchrun``) and has more than one rank, ``fxzip.merge``,
``fxzip.calibrate`` and ``fxzip.reset_norm_stats`` treat ``data`` as *this
rank's shard* and combine every statistic across ranks exactly once, at the end
of each pass over the data. Every rank then holds the statistics one process
would have computed on the union of the shards, matches on them (matching is
deterministic, so every rank computes the same assignment) and ends with the
same merged weights, bit for bit (checked at the end: a hash of the merged
state_dict is compared across ranks).

What agrees, and how:

* **Calibration**: each space's statistics are sums of float32 block products
  of features shifted by one vector (``fxzip.stats``). Every rank uses rank
  0's first-batch mean (broadcast during the first batch, before anything is
  accumulated), so the per-batch products are exactly those one process on
  the same batches computes; the float64 sums are then all-reduced. With the
  shards in order (rank 0 holding the first batch) and the same thread count,
  the result differs from one process's only by the order of the float64
  additions.
* **Norm reset**: the per-batch means and unbiased variances are summed per
  rank, and the sums and the batch count are all-reduced: the running
  statistics are one process's on the same batches (not SyncBatchNorm's
  pooled batches).
* **Matching** runs on every rank, not on rank 0 followed by a broadcast: the
  statistics are identical on every rank after the all-reduce (each reduced
  element is computed once and copied to every rank), matching is a
  deterministic function of them (MuDSC's sweep order comes from ``seed``), so
  every rank gets the same assignment without shipping it, and no rank idles.
  A matcher that is not deterministic is caught by the final check.

Before any pass over the data, every rank's settings, model weights (a hash
of every state_dict tensor) and data are compared in one collective, and a
difference raises ``DistributedError`` (a ``ValueError``) on every rank, naming
the setting, the first differing tensor or the rank without data; tracing and
analysis errors are shared the same way. Nothing hangs waiting for a rank
that has already failed.

Your data loader decides the shard. Use a sampler that neither shuffles nor
pads: ``torch.utils.data.DistributedSampler``'s defaults do both
(``shuffle=True``; and when the dataset does not divide evenly, samples are
*repeated* to give every rank the same count), which changes the batches and
so the statistics (``shuffle=False, drop_last=False`` still pads). Sharding
whole batches, ``fxzip.distributed.shard_batches``, gives every rank a subset of
the batches one process would see, in order, so the result is one process's
on the same batches::

    sampler = fxzip.distributed.shard_batches(len(dataset), batch_size=64)
    loader = DataLoader(dataset, batch_sampler=sampler)
    merged = fxzip.merge(a, b, data=loader)   # the same on every rank
    fxzip.save(merged, "out")                 # writes on rank 0 only

``max_batches`` caps each rank's shard. On GPUs use the NCCL backend (one
device per rank: ``torch.cuda.set_device(local_rank)`` before
``init_process_group``); statistics accumulate on the GPU in float32 GEMMs
with float64 sums, TF32 off for them. On CPUs use gloo. Only rank 0 shows
progress bars, and only rank 0 writes files (``fxzip.save`` on any other
rank returns without writing; ``fxzip merge`` under ``torchrun`` likewise).

Passes that stream data call ``sum_across_ranks`` / ``sum_fields_across_ranks``
once at the end of each pass; both are no-ops without a process group (or
inside ``with fxzip.distributed.local():``).
"""
from __future__ import annotations

import hashlib
import itertools
import os
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistributedError", "active", "rank", "world_size", "is_main", "local", "check_ranks", "ranks_agree",
           "sum_across_ranks", "sum_fields_across_ranks", "agree_shifts", "reduce_observers", "check_same_result",
           "shard_batches", "init_from_env", "from_env", "state_digests"]

BUCKET = 1 << 22  # float64 elements per all-reduce of small tensors concatenated (32 MB)


class DistributedError(ValueError):
    """Ranks that cannot merge together (different settings, models or data),
    raised on every rank before any pass over the data."""


_local_depth = 0


def active() -> bool:
    """A process group with more than one rank is initialised (and not
    switched off with ``local()``): fxzip combines statistics across ranks."""
    return (_local_depth == 0 and dist.is_available() and dist.is_initialized()
            and dist.get_world_size() > 1)


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0, or no process group: the rank that shows progress and writes files."""
    return rank() == 0


@contextmanager
def local() -> Iterator[None]:
    """Inside this block fxzip ignores the process group: every call works on
    this rank's data alone (e.g. to prepare per-rank models before merging)."""
    global _local_depth
    _local_depth += 1
    try:
        yield
    finally:
        _local_depth -= 1


# ----------------------------------------------------------------------------- objects (control messages)

_control: list = []  # [(world group, gloo group for objects)]


def _object_group():
    """Python objects travel over gloo: with NCCL as the default backend,
    ``all_gather_object`` would need each rank's CUDA device to be set, and a
    message that cannot be sent is worse than the error it carries."""
    if dist.get_backend() == "gloo":
        return None
    world = dist.group.WORLD
    if not _control or _control[0][0] is not world:
        _control[:] = [(world, dist.new_group(backend="gloo"))]
    return _control[0][1]


def _gather(obj: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=_object_group())
    return out


# ----------------------------------------------------------------------------- checks before any pass over the data

def state_digests(model: Any) -> list[tuple[str, tuple, str, str]]:
    """(name, shape, dtype, hash of the bytes) of every state_dict entry."""
    if not isinstance(model, nn.Module):
        return [("<not a module>", (), type(model).__name__, "")]
    out = []
    for name, t in model.state_dict().items():
        if not isinstance(t, torch.Tensor):
            out.append((name, (), type(t).__name__, repr(t)))
            continue
        flat = t.detach().reshape(-1).contiguous().cpu()
        raw = flat.view(torch.uint8).numpy() if flat.numel() else b""
        out.append((name, tuple(t.shape), str(t.dtype).replace("torch.", ""),
                    hashlib.blake2b(raw, digest_size=16).hexdigest()))
    return out


def _canon(value: Any) -> str:
    if isinstance(value, Mapping):
        return repr(sorted((str(k), _canon(v)) for k, v in value.items()))
    name = getattr(value, "name", None)
    if name is not None and not isinstance(value, (str, int, float)):
        return f"{type(value).__name__}({name!r})"
    return repr(value)


_END = object()


def _peek(data: Any) -> tuple[Any, str]:
    """(data, what this rank holds): "none", "ok" or "empty". A one-shot
    iterator's first batch is put back in front of it."""
    if data is None:
        return data, "none"
    if type(data).__name__ == "Calibration":
        return data, "calibration"
    try:
        return data, "empty" if len(data) == 0 else "ok"
    except TypeError:
        pass
    try:
        it = iter(data)
    except TypeError:
        return data, "ok"  # not iterable: fxzip's own check says so, on every rank alike
    first = next(it, _END)
    if first is _END:
        return data, "empty"
    if it is data:
        data = itertools.chain([first], it)
    return data, "ok"


def check_ranks(models: Sequence[Any], data: Any, settings: Mapping[str, Any], what: str = "fxzip.merge") -> Any:
    """Compare settings, model weights and data across ranks in one collective;
    raise ``DistributedError`` on every rank if they differ. Returns ``data``
    (a one-shot iterator with its first batch put back)."""
    if not active():
        return data
    from .version import __version__

    mine: dict[str, Any] = {"settings": {k: _canon(v) for k, v in settings.items()},
                            "software": {"torch": torch.__version__, "fxzip": __version__}}
    mine["settings"]["number of models"] = repr(len(models))
    try:
        mine["models"] = [state_digests(m) for m in models]
        data, mine["data"] = _peek(data)
    except Exception as exc:  # noqa: BLE001 - every rank learns what failed on which
        mine["error"] = f"{type(exc).__name__}: {exc}"
    everyone = _gather(mine)
    problem = _compare(everyone, what)
    if problem:
        raise DistributedError(f"{what} under torch.distributed ({len(everyone)} ranks): {problem}")
    return data


def _differs(values: list[Any]) -> str:
    groups: dict[str, list[int]] = {}
    for r, v in enumerate(values):
        groups.setdefault(str(v), []).append(r)
    return " but ".join(f"{v} on rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))}"
                        for v, rs in groups.items())


def _compare(everyone: list[dict], what: str) -> str:
    errors = [(r, e["error"]) for r, e in enumerate(everyone) if "error" in e]
    if errors:
        return "; ".join(f"rank {r} failed while checking its inputs: {msg}" for r, msg in errors)
    for key in everyone[0]["software"]:
        values = [e["software"].get(key) for e in everyone]
        if len(set(values)) > 1:
            return f"ranks run different software: {key} is {_differs(values)}. Install the same versions."
    names = list(dict.fromkeys(k for e in everyone for k in e["settings"]))
    for key in names:
        values = [e["settings"].get(key, "<not given>") for e in everyone]
        if len(set(values)) > 1:
            return (f"ranks were given different settings: {key} is {_differs(values)}. Pass the same "
                    f"arguments to {what} on every rank.")
    empty = [r for r, e in enumerate(everyone) if e["data"] == "empty"]
    if empty:
        return (f"rank{'s' if len(empty) > 1 else ''} {', '.join(map(str, empty))} got no data (an empty shard). "
                f"Give every rank at least one batch: fewer processes than batches "
                f"(fxzip.distributed.shard_batches gives batch i to rank i % world_size).")
    kinds = [e["data"] for e in everyone]
    if len(set(kinds)) > 1:
        return f"ranks were given different kinds of data: {_differs(kinds)}."
    for k in range(len(everyone[0]["models"])):
        per_rank = [e["models"][k] for e in everyone]
        problem = _first_difference(per_rank)
        if problem:
            return (f"ranks were given different models: model {k} {problem}. Every rank must merge the same "
                    "weights (load the same checkpoints, or seed the initialisation alike).")
    return ""


def _first_difference(per_rank: list[list[tuple]]) -> str:
    ref = per_rank[0]
    for r, entries in enumerate(per_rank[1:], 1):
        for i in range(max(len(ref), len(entries))):
            a = ref[i] if i < len(ref) else None
            b = entries[i] if i < len(entries) else None
            if a == b:
                continue
            if a is None or b is None or a[0] != b[0]:
                na, nb = (x[0] if x else "<none>" for x in (a, b))
                return f"has state_dict entry {i} named {na!r} on rank 0 but {nb!r} on rank {r}"
            if a[1:3] != b[1:3]:
                return (f"has tensor {a[0]!r} of shape {list(a[1])} {a[2]} on rank 0 but {list(b[1])} {b[2]} "
                        f"on rank {r}")
            return f"has different values in tensor {a[0]!r} on rank 0 and rank {r}"
    return ""


@contextmanager
def ranks_agree(doing: str) -> Iterator[None]:
    """Run a block that may fail on one rank only (tracing on the rank's own
    first batch, say): afterwards every rank learns whether any failed, and all
    raise (the failing rank its own error, the others ``DistributedError``
    naming it) instead of leaving the others waiting in the next collective."""
    if not active():
        yield
        return
    error: BaseException | None = None
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
        error = exc
    statuses = _gather(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(r, s) for r, s in enumerate(statuses) if s is not None]
    if failed:
        raise DistributedError("; ".join(f"rank {r} failed while {doing}: {s}" for r, s in failed)
                               + " (every rank stops here)")


# ----------------------------------------------------------------------------- sums across ranks

def _leaves(obj: Any, out: list, sig: list) -> None:
    if isinstance(obj, torch.Tensor):
        out.append(obj)
        sig.append(("t", tuple(obj.shape), str(obj.dtype)))
    elif isinstance(obj, bool) or obj is None:
        sig.append(("c", repr(obj)))
    elif isinstance(obj, (int, float)):
        out.append(obj)
        sig.append(("n", type(obj).__name__))
    elif isinstance(obj, Mapping):
        sig.append(("d", tuple(map(str, obj.keys()))))
        for v in obj.values():
            _leaves(v, out, sig)
    elif isinstance(obj, (list, tuple)):
        sig.append(("l", len(obj)))
        for v in obj:
            _leaves(v, out, sig)
    else:
        raise TypeError(f"sum_across_ranks: cannot sum a {type(obj).__name__}")


def _rebuild(obj: Any, it: Iterator) -> Any:
    if isinstance(obj, torch.Tensor):
        return next(it)
    if isinstance(obj, bool) or obj is None:
        return obj
    if isinstance(obj, (int, float)):
        return next(it)
    if isinstance(obj, Mapping):
        return {k: _rebuild(v, it) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_rebuild(v, it) for v in obj)
    return [_rebuild(v, it) for v in obj]


def sum_across_ranks(obj: Any) -> Any:
    """Sum ``obj`` over all ranks: tensors, Python numbers and None, nested in
    lists, tuples and dicts of the same structure on every rank. Tensors are
    summed in place (in float64; other dtypes are converted for the sum and
    back); numbers come back summed (ints stay ints). Returns the summed
    structure; without a process group, ``obj`` unchanged. One all-reduce per
    32 MB of small tensors; large float64 tensors are reduced in place. A
    structure that differs between ranks raises ``DistributedError`` on every
    rank (one small exchange first, so nothing is summed out of step)."""
    if not active():
        return obj
    leaves: list = []
    sig: list = []
    _leaves(obj, leaves, sig)
    digest = hashlib.blake2b(repr(sig).encode(), digest_size=16).hexdigest()
    digests = _gather(digest)
    if len(set(digests)) > 1:
        raise DistributedError("sum_across_ranks: the ranks' statistics have different structures (shapes, keys "
                               f"or numbers of entries): {_differs(digests)}. A pass saw different data layouts "
                               "on different ranks.")
    tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
    numbers = [x for x in leaves if not isinstance(x, torch.Tensor)]
    device = tensors[0].device if tensors else _collective_device()
    extra = torch.tensor([float(x) for x in numbers], dtype=torch.float64, device=device)
    _all_reduce_(tensors + [extra])
    summed = iter(extra.tolist())
    reduced = iter([t if isinstance(t, torch.Tensor) else
                    (int(round(next(summed))) if isinstance(t, int) else next(summed)) for t in leaves])
    return _rebuild(obj, reduced)


def sum_fields_across_ranks(objects: Iterable[Any], *names: str) -> None:
    """``sum_across_ranks`` of the attributes ``names`` of every object, written
    back in place (one collective for all of them), e.g. the normal equations of
    every layer of a refit wave: ``sum_fields_across_ranks(normals, "gram",
    "cross", "tt", "n")``."""
    if not active():
        return
    objects = list(objects)
    values = sum_across_ranks([[getattr(o, n) for n in names] for o in objects])
    for o, vals in zip(objects, values):
        for n, v in zip(names, vals):
            setattr(o, n, v)


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce_(tensors: list[torch.Tensor]) -> None:
    """Sum every tensor over the ranks, in place, in float64 (NCCL: CPU tensors
    travel through the rank's GPU)."""
    nccl = dist.get_backend() == "nccl"
    small: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        where = _collective_device() if nccl and not t.is_cuda else t.device
        if t.dtype == torch.float64 and t.is_contiguous() and t.numel() >= BUCKET and where == t.device:
            dist.all_reduce(t)
        elif t.numel():
            small.setdefault(where, []).append(t)
    for device, ts in small.items():
        start = 0
        while start < len(ts):
            stop, size = start, 0
            while stop < len(ts) and (size == 0 or size + ts[stop].numel() <= BUCKET):
                size += ts[stop].numel()
                stop += 1
            chunk = ts[start:stop]
            flat = torch.cat([t.detach().reshape(-1).to(device=device, dtype=torch.float64) for t in chunk])
            dist.all_reduce(flat)
            offset = 0
            for t in chunk:
                n = t.numel()
                with torch.no_grad():
                    t.copy_(flat[offset:offset + n].view(t.shape))
                offset += n
            start = stop


# ----------------------------------------------------------------------------- calibration

def agree_shifts(observers: nn.Module) -> None:
    """Every ``SpaceObserver`` under ``observers`` shifts by rank 0's first-batch
    mean: broadcast during the first batch, before anything is accumulated
    (each rank calls the observers in the same graph order, so the broadcasts
    pair up)."""
    from .stats import SpaceObserver

    hook = _broadcast_from_0 if active() else None
    for m in observers.modules():
        if isinstance(m, SpaceObserver):
            m.agree_shift = hook


def _broadcast_from_0(t: torch.Tensor) -> None:
    dist.broadcast(t, src=0)


def reduce_observers(observers: nn.Module, n_batches: int, n_samples: int) -> tuple[int, int]:
    """All-reduce every observer's count, sums and Gram matrix (once, after the
    pass); returns the batch and sample counts of all ranks together."""
    from .stats import SpaceObserver

    if not active():
        return n_batches, n_samples
    obs = [m for m in observers.modules() if isinstance(m, SpaceObserver)]
    summed = sum_across_ranks([[o.count, o.total, o.gram] for o in obs] + [n_batches, n_samples])
    return summed[-2], summed[-1]


# ----------------------------------------------------------------------------- after the merge

def check_same_result(merged: nn.Module) -> None:
    """Every rank must end with the same merged weights, bit for bit: compare a
    hash of the state_dict across ranks, raise naming the first differing
    tensor (a pass that did not combine its statistics, a matcher that is not
    deterministic). Records the world size in the report's details."""
    if not active():
        return
    digests = _gather(state_digests(merged))
    problem = _first_difference(digests)
    if problem:
        raise DistributedError(
            f"the ranks ended with different merged models: the result {problem}. Some pass over the data did not "
            "combine its statistics across ranks (or a matcher is not deterministic); please report it.")
    report = getattr(merged, "meta", {}).get("fxzip")
    if report is not None and hasattr(report, "details"):
        report.details["distributed"] = {"world_size": dist.get_world_size(), "backend": str(dist.get_backend())}


# ----------------------------------------------------------------------------- data and start-up

def shard_batches(n_samples: int, batch_size: int, max_batches: int | None = None, *, rank: int | None = None,
                  world_size: int | None = None) -> list[list[int]]:
    """A batch sampler for ``DataLoader(dataset, batch_sampler=...)``: the batches
    one process would read (samples in order, ``batch_size`` each, the last one
    short, at most ``max_batches``), batch ``i`` going to rank ``i %
    world_size``. No sample is repeated or dropped, so the ranks' batches
    together are exactly one process's, and rank 0 holds the first.
    ``rank``/``world_size`` default to this process's."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    r = (dist.get_rank() if active() else 0) if rank is None else rank
    w = (dist.get_world_size() if active() else 1) if world_size is None else world_size
    if not 0 <= r < w:
        raise ValueError(f"rank {r} is not in 0..{w - 1}")
    batches = [list(range(s, min(s + batch_size, n_samples))) for s in range(0, n_samples, batch_size)]
    if max_batches is not None:
        batches = batches[:max_batches]
    return batches[r::w]


def init_from_env(device: str | torch.device = "cpu") -> bool:
    """Initialise the default process group from ``torchrun``'s environment
    (``WORLD_SIZE`` > 1) unless one exists: NCCL for a CUDA ``device`` (each
    rank on ``cuda:LOCAL_RANK``), gloo otherwise. Returns whether it created
    the group (then the caller destroys it)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return True


@contextmanager
def from_env(device: str | torch.device = "cpu") -> Iterator[None]:
    """``init_from_env`` for the length of a block; the group it created is
    destroyed at the end (``fxzip merge`` under ``torchrun``)."""
    created = init_from_env(device)
    try:
        yield
    finally:
        if created:
            dist.destroy_process_group()
