"""MuDSC: matching under dual-space constraints (seed 003, section 3.2).

A unit is matched on a blend of two Pearson similarities: of its activations
(fixed, from calibration) and of its *weights*: every weight coupled to it,
with the neighbouring spaces' current matches applied so that the weights of
different models are compared in one (merged) coordinate system. Because the
weight similarity of a space depends on the matches of its neighbours, the
spaces are re-matched one at a time in a seeded random order, sweep after
sweep (coordinate ascent on the summed objective, Eq. 4), keeping the best
matches seen.

Weight representation (Eq. 6, generalised to any traced graph). For unit ``i``
of model ``k`` in space ``s``, for every parameter axis laid out over ``s``
(``GraphAnalysis.param_roles``) and every segment of that axis that resolves
to ``s``, the slice of ``W_k`` at unit ``i`` (all ``inner`` elements), after
the parameter's *other* channel axes are mapped into merged coordinates:

- a "U" axis (a producer row's input side, space ``t``) is multiplied by
  ``U_k^t``: model ``k``'s members of every merged unit summed into its bin
  (``index_add``, exactly as ``passes.fold`` does), i.e. ``W_k P_{l-1}`` of
  Eq. 6: the weight the unit applies to each merged input feature;
- an "M" axis (a consumer column's output side, space ``t'``) is mapped by
  model ``k``'s *own mean*: summed into the merged bins and divided by how many
  of model ``k``'s units the bin holds (a bin without one stays 0), i.e.
  ``P_{l+1} W_{l+1}^T`` of Eq. 6: the weight the unit sends into each merged
  output feature. A permutation maps to a permutation (weight 1).
- axes without a role (kernel taps) stay; 1-D parameters (norm affine,
  biases) contribute their entry. Batch-norm running statistics are left out
  (they are buffers describing data, not weights; the reference implementation
  ignores them by default too).
- a grouped convolution's weight (``AxisRole.groups > 1``: its input axis
  holds one group's channels) is used as the equivalent dense, block-diagonal
  weight, so a unit's input side is placed by the merged channel it reads.

All of one unit's pieces are concatenated; ``S_weights`` is the Pearson
correlation of those vectors over the ``N * n`` stacked units (each vector is
centred over its own entries; a zero or constant vector correlates 0, never
NaN).

Why these two maps (the invariant ``tests/test_mudsc.py`` checks): a unit and
its true partner in a functionally identical model must get *identical*
vectors, so their weight similarity is exactly 1, also when a neighbouring
space holds within-model merges. Take a model B equal to A up to a
permutation, except that two duplicate units of A (same producer rows, same
feature) are one unit in B, its outgoing weights their sum (the freed unit
pruned). The merged unit of the duplicates holds two units of A and one of B.

- A reader of that feature (a producer row's input side) weighs it ``a + b``
  in A (two columns) and ``a + b`` in B (one column): the *sum* per model
  agrees. A mean (``(a + b) / 2`` against ``a + b``) would not.
- A writer into it (a consumer column's output side) sends ``w`` to each of
  A's two copies (their producer rows are equal) and ``w`` to B's one: the
  *mean* per model agrees. A sum (``2 w`` against ``w``), or any map that
  scales both models' entries by one common factor per merged unit, would not.

The fold's ``N * M_k`` (sum divided by the cluster size over *all* models,
times N) on the output side was used here before; it is the sum times a common
factor per merged unit, so it fails the second case. The MuDSC reference code
(zju-vipa/training_free_model_merging, ``homogeneous_tasks/mudsc.py``,
``WeightFusion.get_weight_vectors``) maps a producer's input side by its merge
matrix times N (the sum times ``N / cluster size``) and a consumer's output side
by its unmerge (the sum). Its input side keeps true matches exact (the factor is
common to all models) but re-weights the entries: an input feature nobody
merged counts N times, one merged from four units half. Its output side is
the sum, which fails the second case. All of these agree for one-to-one
pairs across models (permutations, ``mudsc_permute``), where Eq. 6 is stated.

Objective and stopping rule (``dual_space_match``, ``objective``): the reference
code's is the default (``WeightFusion.iter_transform`` there); fxzip's own is kept
as ``objective("pairs")``:

- ``"pairs"`` (fxzip's): a space's value is the mean combined similarity
  (``ws * S_weights + (1 - ws) * S_activations``) over every pair of units in one
  merged unit (``mean_matched_correlation``), ``S_weights`` under the *final*
  assignments of its neighbours (a space matched early in a sweep is re-evaluated,
  from its matched pairs, when a neighbour moved after it); the objective is the
  mean over spaces. A sweep becomes the best when it changed an assignment and
  raised the objective by more than ``_IMPROVE_TOL`` (1e-7).
- ``"merge_value"`` (the reference's, default): a space's value is the ``merge_value`` its matcher returns: for the
  zip, the mean of the similarities at which the greedy merged (a cluster that
  re-entered the pool merges at ``alpha`` times its parents' minimum, so the value
  falls with alpha whatever the features), for the alignment the mean matched
  correlation; it is recorded when the space is matched and not recomputed when a
  neighbour moves later in the sweep. A sweep becomes the best when the mean over
  spaces is strictly above the best's (no tolerance, a sweep that changed nothing
  included). Its order comes from ``torch.randperm`` with a ``torch.Generator``
  seeded 0 (fxzip: ``numpy.random.default_rng(seed).permutation``).
- the same in both: the first sweep is always taken, a non-improving sweep reverts
  to the best matches, ``patience`` (reference ``tol``) 5 and at most 100 sweeps.

Why the reference's is the default: measured over the CIFAR tables' pairs
(``benchmarks/mudsc_objective.py``: ResNet-20 x1, GroupNorm ResNet-20, ViT, 3 pairs
each, alpha / beta 0.5 / 1 and 0.3 / 0.125), it is +0.23 ± 0.37 joint points above
fxzip's rule, so the measurements do not favour fxzip's, and the reference's is
the one the papers' numbers were made with. What fxzip's rule has for it: its
value is a function of the returned state alone (``tests/test_mudsc.py`` rebuilds
it from scratch under ``objective("pairs")``), where the reference's mixes values
computed under neighbours that later changed. The sweep order stays numpy's.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .analysis import GraphAnalysis
from .assignment import axis_index, merged_length
from .layout import Segment
from .matching import Match, Similarity, mean_matched_correlation, weight_average

__all__ = ["dual_space_match", "unit_blocks", "weight_representation", "weight_correlation", "SKIPPED_LEAVES",
           "objective", "OBJECTIVES"]

SKIPPED_LEAVES = ("running_mean", "running_var")
"""State entries (by the last part of their name) that are statistics, not weights."""

_CONSTANT_REL = 1e-5
"""A unit vector whose variance is below this fraction of its mean square is
constant: with a float32 Gram, ``sum x^2 - (sum x)^2 / L`` of a constant vector
is rounding noise of about 1e-7 of ``sum x^2``."""

OBJECTIVES = ("pairs", "merge_value")
"""How a sweep is scored (see the module docstring; the default is the second): ``"pairs"`` (fxzip's: each
space's mean matched combined similarity under the final assignments; a sweep
must change an assignment and gain more than ``_IMPROVE_TOL``) or
``"merge_value"`` (the reference code's: the value its matcher returned when the
space was matched, for the zip the mean similarity at which the greedy merged
(a grouped space, zipped group by group, its mean matched similarity then),
never re-evaluated; any strict gain counts)."""

_objective = "merge_value"


@contextlib.contextmanager
def objective(name: str) -> Iterator[None]:
    """Score MuDSC's sweeps by ``name`` (``OBJECTIVES``) inside the block, e.g. to
    measure the reference code's rule against fxzip's
    (``benchmarks/mudsc_objective.py``). Not thread-safe: it sets a module default."""
    global _objective
    if name not in OBJECTIVES:
        raise ValueError(f"unknown MuDSC objective {name!r}; choose one of {OBJECTIVES}")
    before, _objective = _objective, name
    try:
        yield
    finally:
        _objective = before


_IMPROVE_TOL = 1e-7
"""A sweep improves on the best only by more than this. A space's value is
computed either from its Gram (right after it is matched) or from its matched
pairs (when a neighbour changed later in the sweep): the two float32 paths
differ by ~1e-8 in a mean correlation, which must not count as progress and
reset the patience counter."""


# ----------------------------------------------------------------------------------------------
# the weight representation


@dataclass(frozen=True)
class _Axis:
    """Another channel axis of a block's parameter, folded into merged coordinates."""

    axis: int
    segments: tuple[Segment, ...]  # resolved space ids
    role: str


@dataclass(frozen=True)
class Block:
    """The slice of parameter ``param`` along ``axis`` that belongs to one segment
    of a space: unit ``i`` owns elements ``offset + i*inner .. offset + (i+1)*inner``.
    ``deps`` are the matched spaces on its other axes: its rows change only when
    one of their assignments does (what the Gram cache keys on)."""

    param: str
    axis: int
    offset: int
    size: int
    inner: int
    others: tuple[_Axis, ...]
    deps: frozenset[int]
    width: int  # entries per unit


class _Representation:
    """Per-space blocks of the N models' weights, and their rows for a given
    assignment of every space."""

    def __init__(self, analysis: GraphAnalysis, states: Sequence[Mapping[str, torch.Tensor]],
                 wanted: set[int], matched: set[int], skip: Sequence[str] = SKIPPED_LEAVES):
        self.n_models = len(states)
        self.sizes = {sp.index: sp.size for sp in analysis.spaces}
        self.blocks: dict[int, list[Block]] = {s: [] for s in wanted}
        self.tensors: dict[str, list[torch.Tensor]] = {}
        for name, roles in analysis.param_roles.items():
            if name.rsplit(".", 1)[-1] in skip:
                continue
            axes = [(r.axis, analysis.resolved(r.segments), r.role, getattr(r, "groups", 1)) for r in roles]
            if not any(seg.space in wanted for _, segs, _, _ in axes for seg in segs):
                continue
            missing = [k for k, st in enumerate(states) if name not in st]
            if missing:
                raise KeyError(f"parameter '{name}' of the analysis is not in the state dict of model {missing[0]}; "
                               "pass the traced GraphModules' state_dict()s")
            if not torch.is_floating_point(states[0][name]):
                continue
            tensors = [_dense(states[k][name], roles, name).float() for k in range(self.n_models)]
            shape = tensors[0].shape
            for a, segs, role, _ in axes:
                others = tuple(_Axis(b, s2, r2) for b, s2, r2, _ in axes if b != a)
                deps = frozenset(seg.space for o in others for seg in o.segments if seg.space in matched)
                rest = math.prod(shape[d] for d in range(len(shape)) if d != a)
                offset = 0
                for seg in segs:
                    if seg.space in wanted:
                        self.blocks[seg.space].append(Block(name, a, offset, seg.size, seg.inner, others, deps,
                                                            seg.inner * rest))
                    offset += seg.length
                if offset != shape[a]:
                    raise ValueError(f"parameter '{name}' axis {a} has {shape[a]} elements but its channel "
                                     f"layout covers {offset}")
            self.tensors[name] = tensors
        self.deps = {s: frozenset().union(*(b.deps for b in bl)) if bl else frozenset()
                     for s, bl in self.blocks.items()}
        self.width = {s: sum(b.width for b in bl) for s, bl in self.blocks.items()}

    def rows_per_model(self, block: Block, assign: Mapping[int, torch.Tensor]) -> list[torch.Tensor]:
        """For every model, (size, width) float32: the block's vector of every unit."""
        parts = []
        for k in range(self.n_models):
            t = self.tensors[block.param][k].narrow(block.axis, block.offset, block.size * block.inner)
            for other in block.others:
                t = _fold_axis(t, other, assign, k)
            parts.append(t.movedim(block.axis, 0).reshape(block.size, -1))
        return parts


def _fold_axis(t: torch.Tensor, other: _Axis, assign: Mapping[int, torch.Tensor], k: int) -> torch.Tensor:
    """Model ``k``'s weight ``t`` with its axis ``other.axis`` in merged coordinates:
    every merged unit gets the sum of model ``k``'s members on a "U" axis (a
    producer's input side) and their mean on an "M" axis (a consumer's output
    side); a merged unit without a member of model ``k`` gets 0. Why these two
    and not the fold's ``N * M``: see the module docstring."""
    idx = axis_index(other.segments, assign, k)
    length = merged_length(other.segments, assign)  # more than one model's under merged_width
    identity = torch.equal(idx, torch.arange(idx.numel())) and length == idx.numel()
    members = None
    if other.role == "M":
        members = torch.zeros(length).index_add_(0, idx, torch.ones(idx.numel()))
        if bool((members <= 1).all()):
            members = None  # a permutation (or a partial one): every mean is its single member
    if identity and members is None:
        return t
    moved = t.movedim(other.axis, 0).contiguous()
    if not identity:
        moved = moved.new_zeros((length,) + moved.shape[1:]).index_add_(0, idx, moved)
    if members is not None:
        moved = moved / members.clamp_min(1).reshape(-1, *([1] * (moved.dim() - 1)))
    return moved.movedim(0, other.axis)


def _dense(t: torch.Tensor, roles: Sequence[Any], name: str) -> torch.Tensor:
    """A grouped convolution's weight as the equivalent dense block-diagonal weight.

    Why: the input axis of a grouped weight holds only its own group's channels,
    so the same column index means a different input channel in every group;
    placed densely, position ``j`` always means input channel ``j`` and the
    merged input side of every row is well defined (zeros outside its group)."""
    grouped = [r for r in roles if getattr(r, "groups", 1) > 1]
    if not grouped:
        return t
    out_axes = [r.axis for r in roles if getattr(r, "groups", 1) == 1 and r.role == "M"]
    m_axis = out_axes[0] if out_axes else 0
    for r in grouped:
        g, u = r.groups, r.axis
        per_in, c_out = t.shape[u], t.shape[m_axis]
        if c_out % g:
            raise ValueError(f"parameter '{name}': {c_out} output channels are not divisible into {g} groups")
        per_out = c_out // g
        shape = list(t.shape)
        shape[u] = per_in * g
        d = t.new_zeros(shape)
        for G in range(g):
            d.narrow(m_axis, G * per_out, per_out).narrow(u, G * per_in, per_in).copy_(
                t.narrow(m_axis, G * per_out, per_out))
        t = d
    return t


# ----------------------------------------------------------------------------------------------
# Grams and correlations

_REBUILD_EVERY = 8
"""A cached Gram updated incrementally this many times is rebuilt from scratch,
so float32 rounding of the subtract-and-add updates never accumulates."""


@dataclass
class _GramState:
    gram: torch.Tensor                 # float32 (N n, N n), or (n, N n) in alignment mode
    sums: torch.Tensor                 # (N n,) float64: per-unit sums (centring)
    sq: torch.Tensor                   # (N n,) float64: per-unit sums of squares (alignment mode)
    snap: dict[int, torch.Tensor]      # the dependency assignments it was built from
    updates: int = 0


class _WeightGrams:
    """``S_weights`` per space from per-block Grams, cached across sweeps.

    Why blocks: a space's representation is a concatenation, so its Gram is the
    sum of the blocks' Grams, and a block changes only when the assignment of a
    space on its other axes changes. The last Gram of every space is kept with
    the assignments it was built from: when none changed it is reused as is;
    when some did, only the affected blocks are recomputed (their old Gram is
    rebuilt from the old assignments and subtracted; chosen when that is less
    than half the work of a full rebuild, e.g. a residual stream with many
    readers of which one changed), otherwise the Gram is rebuilt.

    Why model blocks: the Gram is symmetric, so only the blocks ``(k, l)``,
    ``k <= l``, of the models are multiplied (3/4 of the work for two models).
    In alignment mode (``align=True``: the matcher reads only model 0 against
    each other model, as ``permute`` and its group form do) only the blocks
    ``(0, l)`` are, a quarter of the full work for two models; the rest of the
    returned matrix is NaN, so a matcher that reads it fails loudly.

    Products run as float32 GEMMs accumulated in place (``addmm_``: about twice
    as fast as float64 and no conversion pass over an (N n)^2 matrix); the
    per-unit sums are float64, and the correlation is formed in float64. The
    weights' vectors have near-zero means, so the centring cancels nothing and
    float32 products lose nothing a correlation needs.
    """

    def __init__(self, rep: _Representation, cache: bool = True, align: bool = False):
        self.rep = rep
        self.cache = cache
        self.align = align
        n_models = rep.n_models
        self.model_blocks = ([(0, l) for l in range(1, n_models)] if align else
                             [(k, l) for k in range(n_models) for l in range(k, n_models)])
        self.states: dict[int, _GramState] = {}
        self.counts = {"full": 0, "incremental": 0, "reused": 0}

    def _accumulate(self, st: _GramState, block: Block, assign, sign: float) -> None:
        xs = self.rep.rows_per_model(block, assign)
        n = block.size
        for k, l in self.model_blocks:
            st.gram[k * n:(k + 1) * n, l * n:(l + 1) * n].addmm_(xs[k], xs[l].T, alpha=sign)
        for k, x in enumerate(xs):
            st.sums[k * n:(k + 1) * n] += sign * x.sum(1).to(torch.float64)
            if self.align:
                st.sq[k * n:(k + 1) * n] += sign * (x * x).sum(1).to(torch.float64)

    def _build(self, space: int, assign, deps) -> _GramState:
        n = self.rep.sizes[space]
        total = self.rep.n_models * n
        # alignment mode keeps only model 0's rows: (n, N n) instead of (N n, N n)
        st = _GramState(torch.zeros(n if self.align else total, total), torch.zeros(total, dtype=torch.float64),
                        torch.zeros(total, dtype=torch.float64), {d: assign[d] for d in deps})
        for b in self.rep.blocks[space]:
            self._accumulate(st, b, assign, 1.0)
        self.counts["full"] += 1
        return st

    def gram_state(self, space: int, assign: Mapping[int, torch.Tensor]) -> _GramState:
        blocks = self.rep.blocks[space]
        deps = self.rep.deps[space]
        st = self.states.get(space)
        if st is not None:
            changed = {d for d in deps if not _same(st.snap[d], assign[d])}
            if not changed:
                self.counts["reused"] += 1
                return st
            stale = [b for b in blocks if b.deps & changed]
            if 2 * sum(b.width for b in stale) < self.rep.width[space] and st.updates < _REBUILD_EVERY:
                old = dict(assign)
                old.update(st.snap)
                for b in stale:
                    self._accumulate(st, b, old, -1.0)
                    self._accumulate(st, b, assign, 1.0)
                st.snap = {d: assign[d] for d in deps}
                st.updates += 1
                self.counts["incremental"] += 1
                return st
        st = self._build(space, assign, deps)
        if self.cache:
            self.states[space] = st
        return st

    def correlation(self, space: int, assign: Mapping[int, torch.Tensor]) -> torch.Tensor:
        n_models, n = self.rep.n_models, self.rep.sizes[space]
        total = n_models * n
        if not self.rep.blocks[space]:
            out = torch.zeros(total, total, dtype=torch.float64)
            return self._mask(out, n) if self.align else out
        st = self.gram_state(space, assign)
        length = self.rep.width[space]
        if not self.align:
            gram = st.gram.to(torch.float64)
            for k, l in self.model_blocks:
                if l > k:
                    gram[l * n:(l + 1) * n, k * n:(k + 1) * n] = gram[k * n:(k + 1) * n, l * n:(l + 1) * n].T
            return _pearson(gram, st.sums, gram.diagonal().clone(), length)
        out = torch.full((total, total), float("nan"), dtype=torch.float64)
        var, const = _variance(st.sq, st.sums, length)
        rows = slice(0, n)
        for _, l in self.model_blocks:
            cols = slice(l * n, (l + 1) * n)
            cov = st.gram[rows, cols].to(torch.float64) - torch.outer(st.sums[rows], st.sums[cols]) / length
            c = _normalise(cov, var[rows], var[cols], const[rows], const[cols])
            out[rows, cols] = c
            out[cols, rows] = c.T
        return out

    @staticmethod
    def _mask(out: torch.Tensor, n: int) -> torch.Tensor:
        """Alignment mode: NaN outside the blocks (0, l) and (l, 0)."""
        keep = torch.zeros_like(out, dtype=torch.bool)
        keep[:n, n:] = True
        keep[n:, :n] = True
        return out.masked_fill(~keep, float("nan"))

    def matched_pairs(self, space: int, assign: Mapping[int, torch.Tensor], pairs: tuple[torch.Tensor, torch.Tensor]
                      ) -> torch.Tensor:
        """Weight correlation of the given stacked-unit pairs only: O(pairs * L)
        instead of the O((N n)^2 L) Gram; what the objective of a state needs."""
        p, q = pairs
        blocks = self.rep.blocks[space]
        if not blocks:
            return torch.zeros(p.numel(), dtype=torch.float64)
        dots = torch.zeros(p.numel(), dtype=torch.float64)
        total = self.rep.n_models * self.rep.sizes[space]
        sq = torch.zeros(total, dtype=torch.float64)
        sums = torch.zeros(total, dtype=torch.float64)
        for b in blocks:
            x = torch.cat(self.rep.rows_per_model(b, assign), 0)
            dots += (x[p] * x[q]).sum(1).to(torch.float64)
            sq += (x * x).sum(1).to(torch.float64)
            sums += x.sum(1).to(torch.float64)
        length = self.rep.width[space]
        var, const = _variance(sq, sums, length)
        cov = dots - sums[p] * sums[q] / length
        safe = torch.where(const, torch.ones_like(var), var)
        corr = (cov / (safe[p] * safe[q]).sqrt()).clamp(-1, 1)
        return torch.where(const[p] | const[q], torch.zeros_like(corr), corr)


def _variance(sq: torch.Tensor, sums: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-vector (unnormalised) variance, and which vectors are constant (zero included)."""
    var = (sq - sums * sums / length).clamp_min(0)
    return var, var <= _CONSTANT_REL * sq.clamp_min(0)


def _normalise(cov: torch.Tensor, var_r: torch.Tensor, var_c: torch.Tensor, const_r: torch.Tensor,
               const_c: torch.Tensor) -> torch.Tensor:
    """``cov / sqrt(v_i * v_j)``, not ``/ (std_i * std_j)``: identical vectors then
    correlate exactly 1 (what makes a self-merge the identity under zipit's ties).
    Constant vectors correlate 0."""
    safe_r = torch.where(const_r, torch.ones_like(var_r), var_r)
    safe_c = torch.where(const_c, torch.ones_like(var_c), var_c)
    corr = (cov / torch.outer(safe_r, safe_c).sqrt()).clamp(-1, 1)
    corr[const_r, :] = 0
    corr[:, const_c] = 0
    return corr


def _pearson(gram: torch.Tensor, sums: torch.Tensor, sq: torch.Tensor, length: int) -> torch.Tensor:
    """Pearson correlation of vectors from their Gram, per-vector sums and common length."""
    if length == 0:
        return torch.zeros_like(gram)
    var, const = _variance(sq, sums, length)
    cov = gram.sub_(torch.outer(sums, sums), alpha=1.0 / length)
    return _normalise(cov, var, var, const, const)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or torch.equal(a, b)


def _identity_assign(analysis: GraphAnalysis, n_models: int, assign: Mapping[int, torch.Tensor] | None = None
                     ) -> dict[int, torch.Tensor]:
    out = {sp.index: torch.arange(sp.size).repeat(n_models, 1) for sp in analysis.spaces}
    for s, a in (assign or {}).items():
        out[int(s)] = torch.as_tensor(a).long()
    return out


# ----------------------------------------------------------------------------------------------
# public helpers (inspection and tests)


def unit_blocks(analysis: GraphAnalysis, states: Sequence[Mapping[str, torch.Tensor]], space: int,
                assign: Mapping[int, torch.Tensor] | None = None, skip: Sequence[str] = SKIPPED_LEAVES
                ) -> list[tuple[Block, torch.Tensor]]:
    """The pieces of the weight representation of every unit of ``space``: a list of
    (block, rows) with rows (N * n, width), unit ``i`` of model ``k`` at row
    ``k * n + i``. ``assign`` maps spaces to (N, n) assignments; spaces not in it
    keep the identity."""
    full = _identity_assign(analysis, len(states), assign)
    rep = _Representation(analysis, states, {space}, set(full), skip)
    return [(b, torch.cat(rep.rows_per_model(b, full), 0)) for b in rep.blocks[space]]


def weight_representation(analysis: GraphAnalysis, states: Sequence[Mapping[str, torch.Tensor]], space: int,
                          assign: Mapping[int, torch.Tensor] | None = None, skip: Sequence[str] = SKIPPED_LEAVES
                          ) -> torch.Tensor:
    """(N * n, L): every unit's concatenated weight vector (see the module docstring)."""
    pieces = [rows for _, rows in unit_blocks(analysis, states, space, assign, skip)]
    if not pieces:
        return torch.zeros(len(states) * analysis.spaces[space].size, 0)
    return torch.cat(pieces, 1)


def weight_correlation(analysis: GraphAnalysis, states: Sequence[Mapping[str, torch.Tensor]], space: int,
                       assign: Mapping[int, torch.Tensor] | None = None, skip: Sequence[str] = SKIPPED_LEAVES
                       ) -> torch.Tensor:
    """``S_weights`` of ``space`` (float64, (N n, N n)) as the matching computes it."""
    full = _identity_assign(analysis, len(states), assign)
    rep = _Representation(analysis, states, {space}, set(full), skip)
    return _WeightGrams(rep, cache=False).correlation(space, full)


# ----------------------------------------------------------------------------------------------
# the iteration


@dataclass
class _Matched:
    snap: dict[int, torch.Tensor]   # the dependency assignments the matches were computed from
    matches: dict[int, Match]
    values: dict[int, float]


@dataclass
class _Evaluated:
    snap: dict[int, torch.Tensor]   # dependencies and the space itself
    value: float


@dataclass
class _Best:
    """The best state seen so far: what is returned, and where ``revert`` continues from."""

    objective: float
    matches: dict[int, Match]
    assign: dict[int, torch.Tensor]
    values: dict[int, float]
    sweep: int


Unit = tuple[int, ...]


def _units_of(spaces: Sequence[int | Sequence[int]], match_space: Callable | None,
              match_block: Callable | None) -> list[Unit]:
    """The steps of a sweep, one per entry of ``spaces`` (a tie block is one step).

    Why checked up front: a space in two steps would get two assignments in one
    sweep, and a tie block (or a run without ``match_space``) has nothing to match
    it without ``match_block``."""
    units: list[Unit] = []
    for entry in spaces:
        unit = tuple(int(s) for s in entry) if isinstance(entry, (tuple, list)) else (int(entry),)
        if unit and unit not in units:
            units.append(unit)
    flat = [s for u in units for s in u]
    if len(set(flat)) != len(flat):
        raise ValueError("a space appears in two entries of spaces")
    if any(len(u) > 1 for u in units) and match_block is None:
        raise ValueError("tuple entries of spaces (tie blocks) need match_block")
    if match_space is None and match_block is None:
        raise ValueError("give match_space, match_block or both")
    return units


class _DualSpace:
    """The state of the coordinate ascent: the current match and assignment of every
    space, and the caches that keep a sweep cheap.

    Why one object: a space's weight similarity, and so its value in the objective,
    depends on its neighbours' current assignments, so the re-matching step, the
    objective and ``revert`` all read and write the same state. Two caches rest on
    that dependency being explicit (``deps``): a step whose inputs did not change
    since it last ran is not re-run (the matchers are deterministic), and a space's
    value is not re-evaluated while the assignments it was computed from hold."""

    def __init__(self, analysis: GraphAnalysis, states: Sequence[Mapping[str, torch.Tensor]], units: list[Unit],
                 activation: Mapping[int, Any] | None, weight_similarity: float,
                 match_space: Callable[[int, Similarity], Match] | None,
                 match_block: Callable[[Unit, dict[int, Similarity]], dict[int, Match]] | None,
                 skip: Sequence[str], cache: bool, align: bool):
        self.units = units
        self.flat = [s for u in units for s in u]
        self.n_models = len(states)
        self.weight_similarity = weight_similarity
        self.match_space, self.match_block = match_space, match_block
        self.act: dict[int, Similarity] = {}
        if activation is not None:
            self.act = {s: Similarity.of(activation[s]) for s in self.flat if activation.get(s) is not None}
        self.ws = {s: weight_similarity if s in self.act else 1.0 for s in self.flat}
        rep = _Representation(analysis, states, {s for s in self.flat if self.ws[s] > 0}, set(self.flat), skip)
        self.grams = _WeightGrams(rep, cache, align)
        self.deps = {s: rep.deps.get(s, frozenset()) for s in self.flat}
        self.unit_deps = {u: frozenset().union(*(self.deps[s] for s in u)) for u in units}
        self._start(analysis)
        self.last: dict[Unit, _Matched] = {}
        self.evaluated: dict[int, _Evaluated] = {}
        self.calls = {"matcher": 0, "matcher_reused": 0, "pair_evaluations": 0}
        self.rule = _objective
        self.recorded: dict[int, float] = {}  # "merge_value": each space's value when it was last matched

    def _start(self, analysis: GraphAnalysis) -> None:
        """The point the sweeps ascend from: Eq. 8 (activation matching) for a step whose
        spaces all have activations, else Eq. 7 (the identity); every other space of the
        graph keeps the identity."""
        sizes = {sp.index: sp.size for sp in analysis.spaces}
        self.matches: dict[int, Match] = {}
        for u in self.units:
            if all(s in self.act for s in u):
                self.matches.update(self.run(u, {s: self.act[s] for s in u}))
            else:
                self.matches.update({s: weight_average(None, self.n_models, sizes[s]) for s in u})
        self.assign = _identity_assign(analysis, self.n_models, {s: m.assign for s, m in self.matches.items()})

    def run(self, unit: Unit, sims: dict[int, Similarity]) -> dict[int, Match]:
        """The caller's matcher for one step: ``match_space`` for a single space when given,
        else ``match_block`` (tie blocks, or every step without ``match_space``)."""
        if len(unit) == 1 and self.match_space is not None:
            return {unit[0]: self.match_space(unit[0], sims[unit[0]])}
        out = self.match_block(unit, sims)
        return {s: out[s] for s in unit}

    def snapshot(self, keys) -> dict[int, torch.Tensor]:
        return {d: self.assign[d] for d in keys}

    def unchanged(self, snap: dict[int, torch.Tensor]) -> bool:
        return all(_same(a, self.assign[d]) for d, a in snap.items())

    def combined(self, s: int) -> torch.Tensor:
        """Eq. 4's blend ``ws * S_weights + (1 - ws) * S_activations`` under the current
        assignments of the neighbours (no Gram at all when ``ws`` is 0)."""
        ws = self.ws[s]
        if ws == 0.0:
            return self.act[s].correlation().to(torch.float64)
        w = self.grams.correlation(s, self.assign)
        if ws == 1.0:
            return w
        return ws * w + (1.0 - ws) * self.act[s].correlation().to(torch.float64)

    def value_of(self, s: int) -> float:
        """The space's mean matched combined similarity under the current assignments;
        cached while the assignments it was computed from hold. Under the reference
        rule (``"merge_value"``), the value recorded when the space was last matched."""
        if self.rule == "merge_value" and s in self.recorded:
            return self.recorded[s]
        ev = self.evaluated.get(s)
        if ev is not None and self.unchanged(ev.snap):
            return ev.value
        v = self._pair_value(s)
        self.calls["pair_evaluations"] += 1
        self.evaluated[s] = _Evaluated(self.snapshot(self.deps[s] | {s}), v)
        return v

    def _pair_value(self, s: int) -> float:
        """The value from the matched pairs only (no Gram): what a space needs when a
        neighbour moved after it was matched."""
        cid = self.assign[s].reshape(-1)
        same = cid[:, None] == cid[None, :]
        p, q = torch.nonzero(torch.triu(same, diagonal=1), as_tuple=True)
        if p.numel() == 0:
            return float("nan")
        ws = self.ws[s]
        total = torch.zeros(p.numel(), dtype=torch.float64)
        if ws > 0:
            total += ws * self.grams.matched_pairs(s, self.assign, (p, q))
        if ws < 1:
            total += (1.0 - ws) * self.act[s].correlation().to(torch.float64)[p, q]
        return float(total.mean())

    def objective(self) -> tuple[float, dict[int, float]]:
        """The mean over spaces of their values (spaces with no matched pair left out)."""
        values = {s: self.value_of(s) for s in self.flat}
        finite = [v for v in values.values() if not math.isnan(v)]
        return (float(np.mean(finite)) if finite else float("nan")), values

    def step(self, u: Unit) -> None:
        """Re-match one step given its neighbours' current assignments, and take its matches."""
        prev = self.last.get(u)
        if prev is not None and self.unchanged(prev.snap):
            step = prev                          # same inputs, same (deterministic) matches
            self.calls["matcher_reused"] += 1
        else:
            step = self.last[u] = self._rematch(u)
        for s in u:
            self.matches[s] = step.matches[s]
            new = step.matches[s].assign.long()
            if not torch.equal(new, self.assign[s]):   # keep the tensor when equal: cheap identity checks
                self.assign[s] = new
        for s in u:
            if s in step.values:
                # valid while the inputs it was computed from hold: a tie partner (or the
                # space itself, for a weight mapping a space to itself) that just moved
                # makes it stale, and the objective then re-evaluates it from the pairs
                valid = {s: self.assign[s], **{d: step.snap[d] for d in self.deps[s]}}
                self.evaluated[s] = _Evaluated(valid, step.values[s])
                self.recorded[s] = step.values[s]

    def _rematch(self, u: Unit) -> _Matched:
        """Run the matcher on the combined similarities of the step's spaces; their values
        come for free from the matrices just built."""
        snap = self.snapshot(self.unit_deps[u])
        mats = {s: self.combined(s) for s in u}
        sims = {s: Similarity(c, self.act[s].constant(), self.act[s].mean, classes=self.act[s].constant_classes())
                if s in self.act else Similarity(c)
                for s, c in mats.items()}
        found = self.run(u, sims)
        vals = {s: mean_matched_correlation(mats[s], found[s].assign) for s in u}
        if self.rule == "merge_value":  # the zip's own merge values where it gives them
            given = {s: found[s].extra.get("merge_value", math.nan) for s in u}
            vals = {s: given[s] if not math.isnan(given[s]) else v for s, v in vals.items()}
        # alignment mode with N > 2: pairs of models 1.. are NaN in the matrix; from the pairs
        vals = {s: v for s, v in vals.items() if not math.isnan(v)}
        self.calls["matcher"] += 1
        return _Matched(snap, found, vals)

    def sweep(self, rng: np.random.Generator, history: dict[str, Any]) -> tuple[float, dict[int, float], int]:
        """One sweep: every step once, in a fresh seeded random order; recorded in ``history``.
        Returns the objective after it, the spaces' values and how many spaces moved."""
        t0 = time.perf_counter()
        order = [self.units[i] for i in rng.permutation(len(self.units))]
        before = dict(self.assign)
        for u in order:
            self.step(u)
        obj, values = self.objective()
        moved = sum(not _same(before[s], self.assign[s]) for s in self.flat)
        history["objective"].append(obj)
        history["orders"].append([u[0] if len(u) == 1 else u for u in order])
        history["changed"].append(moved)
        history["seconds"].append(time.perf_counter() - t0)
        return obj, values, moved


def _ascend(state: _DualSpace, seed: int, patience: int, max_sweeps: int, revert: bool, progress: bool
            ) -> tuple[_Best, dict[str, Any]]:
    """Coordinate ascent on the objective (Eq. 4): sweeps until ``patience`` sweeps
    brought no improvement or ``max_sweeps`` ran. Returns the best state and the history.

    Why the first sweep is always taken, and why an improvement must exceed
    ``_IMPROVE_TOL`` and change an assignment: see ``dual_space_match`` and
    ``_IMPROVE_TOL``."""
    obj, values = state.objective() if state.flat else (float("nan"), {})
    best = _Best(obj, dict(state.matches), dict(state.assign), values, 0)
    history: dict[str, Any] = {
        "objective": [obj], "sweeps": 0, "best_sweep": 0, "best_objective": obj, "seed": seed,
        "weight_similarity": state.weight_similarity, "orders": [], "changed": [], "seconds": [],
        "init": {"activation": sum(s in state.act for s in state.flat),
                 "identity": sum(s not in state.act for s in state.flat)},
        "stopped": "max_sweeps", "objective_rule": state.rule,
    }
    rng = np.random.default_rng(seed)
    stall = 0
    bar = tqdm(total=max_sweeps, desc="fxzip mudsc", disable=not progress or not state.units, leave=False)
    try:
        for sweep in range(1, max_sweeps + 1 if state.units else 1):
            obj, values, moved = state.sweep(rng, history)
            history["sweeps"] = sweep
            differs = any(not torch.equal(best.assign[s], state.assign[s]) for s in state.flat)
            if state.rule == "merge_value":  # the reference's: any strict gain, changed or not
                better = obj > best.objective or math.isnan(best.objective)
            else:
                better = differs and (obj > best.objective + _IMPROVE_TOL or math.isnan(best.objective))
            if sweep == 1 or better:
                best = _Best(obj, dict(state.matches), dict(state.assign), values, sweep)
                stall = 0
            else:
                stall += 1
                if revert:
                    state.matches, state.assign = dict(best.matches), dict(best.assign)
            bar.update(1)
            bar.set_postfix(objective=f"{obj:.4f}", best=f"{best.objective:.4f}", changed=moved)
            if stall >= patience:
                history["stopped"] = "patience"
                break
    finally:
        bar.close()
    return best, history


def _result(state: _DualSpace, best: _Best, history: dict[str, Any], start_time: float
            ) -> tuple[dict[int, Match], dict]:
    """The best matches, each with its space's value as ``extra["mudsc_similarity"]``,
    and the history completed with the best sweep and the work counters."""
    out = {}
    for s in state.flat:
        m = best.matches[s]
        out[s] = Match(m.assign, list(m.within), m.cross, m.budget_relaxed,
                       {**m.extra, "mudsc_similarity": best.values.get(s, float("nan"))})
    calls = state.calls
    history.update(best_sweep=best.sweep, best_objective=best.objective, matcher_calls=calls["matcher"],
                   matcher_reused=calls["matcher_reused"], pair_evaluations=calls["pair_evaluations"],
                   grams=dict(state.grams.counts), total_seconds=time.perf_counter() - start_time)
    return out, history


def dual_space_match(analysis: GraphAnalysis, states: Sequence[Mapping[str, torch.Tensor]],
                     spaces: Sequence[int | Sequence[int]], activation: Mapping[int, Any] | None,
                     match_space: Callable[[int, Similarity], Match] | None,
                     weight_similarity: float = 0.5, seed: int = 0, patience: int = 5, max_sweeps: int = 100,
                     progress: bool = True, *,
                     match_block: Callable[[Unit, dict[int, Similarity]], dict[int, Match]] | None = None,
                     align: bool = False, revert: bool = True, skip: Sequence[str] = SKIPPED_LEAVES,
                     cache: bool = True) -> tuple[dict[int, Match], dict]:
    """MuDSC: match ``spaces`` on ``weight_similarity * S_weights + (1 - weight_similarity) * S_activations``.

    Args:
        analysis: the ``GraphAnalysis`` of the traced architecture.
        states: the N models' state dicts (the traced GraphModules' ``state_dict()``).
        spaces: the spaces to match; every other space keeps the identity assignment. An
            entry may be a tuple of spaces that share one group assignment (a tie block of
            ``GraphAnalysis.ties``): it is re-matched as one step, by ``match_block``.
        activation: ``{space: Similarity}`` (or ``SpaceStats``) of activation correlations, or
            ``None`` (data-free: ``S_weights`` alone, identity start, Eq. 7). A space missing
            from the dict is treated as data-free.
        match_space: ``match_space(space, similarity) -> Match``, the caller's matcher for a
            single space (group structure and constraints are its business). It must be
            deterministic: a step whose inputs did not change since it last ran is not re-run.
        weight_similarity: the balance factor alpha of Eq. 4 (0: activations only).
        seed: seeds the random order of the steps in every sweep (numpy ``default_rng``).
        patience, max_sweeps: stop after ``patience`` sweeps without improvement of the
            objective, or after ``max_sweeps`` sweeps.
        match_block: ``match_block(block, {space: similarity}) -> {space: Match}`` for tuple
            entries of ``spaces`` (e.g. ``fxzip.grouped.match_units``); with ``match_space=None``
            it matches single spaces too, called with 1-tuples.
        align: the matchers read only model 0's units against each other model's (alignment-
            based matching: ``permute`` and its group form, i.e. ``mudsc_permute``). Then only
            those blocks of ``S_weights`` are computed (for two models a quarter of the work);
            the other entries of the matrix the matcher gets are NaN.
        revert: after a sweep that does not improve, continue from the best matches (as the
            reference implementation does): later sweeps then try other orders from the best
            point instead of drifting away from it.
        skip: state entries (last name part) left out of the representation.
        cache: keep each space's Gram between sweeps (memory: one float32 (N n)^2 matrix per
            space, (n, N n) with ``align``; about 130 MB for two ResNet-50s, 65 MB aligned).

    Returns:
        ``(matches, history)``: the best ``Match`` of every space in ``spaces`` (its
        ``extra["mudsc_similarity"]`` is that space's mean matched combined similarity) and a
        history dict: ``objective`` (index 0: the starting matches, then one per sweep),
        ``sweeps``, ``best_sweep``, ``best_objective``, ``seed``, ``orders`` (steps per sweep),
        ``changed`` (spaces whose assignment changed, per sweep), ``stopped``, ``init``,
        ``seconds`` (per sweep) and work counters.

    The objective of a set of matches is the mean over spaces of the mean combined
    similarity of the matched pairs (``mean_matched_correlation`` of the combined matrix),
    each space's ``S_weights`` taken with the *final* matches of its neighbours: a space
    matched early in a sweep is re-evaluated (matched pairs only, no Gram) when a
    neighbour changed after it. As in the reference implementation, the first sweep's
    matches are always taken (the start is a single-space matching whose objective is
    only reported, as ``objective[0]``): a greedy zip does not maximise this objective, so
    comparing against the start would often return plain activation matching.
    """
    if not 0.0 <= weight_similarity <= 1.0:
        raise ValueError(f"weight_similarity must be in [0, 1], got {weight_similarity}")
    if patience < 1:
        raise ValueError(f"patience must be at least 1, got {patience}")
    start_time = time.perf_counter()
    units = _units_of(spaces, match_space, match_block)
    state = _DualSpace(analysis, states, units, activation, weight_similarity, match_space, match_block,
                       skip, cache, align)
    best, history = _ascend(state, seed, patience, max_sweeps, revert, progress)
    return _result(state, best, history, start_time)
