"""Matchers: pure functions from one space's statistics to a clustering.

A matcher returns ``assign`` of shape (N, n): ``assign[k, i]`` is the merged
feature that feature ``i`` of model ``k`` joins. That is all a merge is: the
merge matrix M averages each cluster (rows ``1/|cluster|``) and the unmerge U
is the 0/1 assignment (its pseudo-inverse), so folding needs nothing else.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from .stats import SpaceStats, constant_classes

__all__ = ["Match", "Similarity", "register_matcher", "unregister_matcher", "matcher_registered", "get_matcher", "MATCHERS", "zipit", "zipit_reference", "permute", "weight_average",
           "cluster_assignment", "mean_matched_correlation", "merged_size"]


@dataclass
class Match:
    assign: torch.Tensor                     # (N, n) long
    within: list[int]                        # within-model merges per model
    cross: int                               # merges that joined features of different models only
    budget_relaxed: bool = False             # zipit had to exceed beta's budget to finish
    extra: dict = field(default_factory=dict)


class Similarity:
    """A similarity matrix over the stacked features [model 0 | model 1 | ...],
    with the duck type of ``SpaceStats`` that matchers read: ``correlation()``,
    ``constant()`` and ``mean``.

    Why a separate type: MuDSC matches on a blend of activation and weight
    similarity, and group-aware matching runs a matcher on the sub-matrix of
    one group; both need a matcher input that is not a streamed statistic.
    ``constant``/``mean`` describe features that are constant on the data
    (only activations know that); without them nothing is constant.
    ``signature`` (optional, (N*n, L)): a description of each feature's weights
    that a permutation of the neighbouring spaces leaves unchanged; it pairs
    features the data cannot tell apart (``constant_groups``).
    """

    def __init__(self, matrix: torch.Tensor, constant: torch.Tensor | None = None,
                 mean: torch.Tensor | None = None, signature: torch.Tensor | None = None,
                 classes: torch.Tensor | None = None):
        self.matrix = matrix
        self._constant = constant if constant is not None else torch.zeros(matrix.shape[0], dtype=torch.bool)
        self.mean = mean if mean is not None else torch.zeros(matrix.shape[0], dtype=matrix.dtype)
        # which constants hold one value (``stats.constant_classes``); without
        # the space's scale, the largest |mean| of its features stands in for it
        self.classes = classes if classes is not None else constant_classes(
            self._constant, self.mean, float(self.mean.abs().max()) if self.mean.numel() else 0.0)
        self.signature = signature
        # set by whoever built ``matrix`` for one match and reads it no more:
        # zipit then clusters in it instead of a copy (a ViT-B MLP space's is 302 MB)
        self.disposable = False

    @classmethod
    def of(cls, stats: "SpaceStats | Similarity") -> "Similarity":
        """The matching input of a space's statistics: their correlation, with
        perfectly correlated features of unequal scale told apart
        (``separate_rescaled_copies``)."""
        if isinstance(stats, Similarity):
            return stats
        matrix = stats.correlation()
        separate_rescaled_copies(matrix, stats.mean, stats.variance().clamp_min(0).sqrt())
        return cls(matrix, stats.constant(), stats.mean, classes=stats.constant_classes())

    def correlation(self) -> torch.Tensor:
        return self.matrix

    def constant(self) -> torch.Tensor:
        return self._constant

    def constant_classes(self) -> torch.Tensor:
        return self.classes

    def subset(self, index: torch.Tensor) -> "Similarity":
        """The features ``index`` (stacked indices), in that order."""
        return Similarity(self.matrix[index][:, index], self._constant[index], self.mean[index],
                          None if self.signature is None else self.signature[index], self.classes[index])


PERFECT = 1e-6  # a correlation within this of 1 is the same signal, to float32 noise


def separate_rescaled_copies(matrix: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                             eps: float = PERFECT, rows: int = 256) -> None:
    """Lower, in place, the entries of feature pairs the data correlates
    perfectly (above ``1 - eps``) toward ``1 - eps`` by how unequal their
    scales are (0 for equal mean and std: unchanged; 1: to ``1 - eps``), so
    an entry of 1 drops by up to ``eps`` and no entry falls below one it was
    above that the rule leaves alone.

    Why: correlation cannot tell a feature from a rescaled copy of it. Where
    the data spans fewer directions than the space has features (a relative-
    position MLP sees one fixed table of offsets; a sparse ReLU unit fires on
    one of them), several features correlate 1 with each other, and which of
    them zipit pairs is decided by float32 noise: a permuted copy of a model
    then comes back with two units swapped. A true copy also has its partner's
    mean and scale, so among perfect correlations those win. Entries below
    ``1 - eps`` (every pair in a merge of two different models, in practice)
    are untouched, and the map is monotone in the entry for a given
    mismatch, so the order against them is kept."""
    std = std.to(matrix.dtype)
    mean = mean.to(matrix.dtype)
    for r in range(0, matrix.shape[0], rows):
        block = matrix[r:r + rows]
        hit = torch.nonzero(block > 1 - eps)
        if hit.numel() == 0:
            continue
        i, j = hit[:, 0] + r, hit[:, 1]
        spread = std[i] + std[j] + mean[i].abs() + mean[j].abs()
        mismatch = ((std[i] - std[j]).abs() + (mean[i] - mean[j]).abs()) / spread.clamp_min(torch.finfo(matrix.dtype).tiny)
        entry = block[hit[:, 0], j]
        block[hit[:, 0], j] = entry - (entry - (1 - eps)) * mismatch.clamp(0, 1)


Matcher = Callable[..., Match]
MATCHERS: dict[str, Matcher] = {}


def register_matcher(name: str) -> Callable[[Matcher], Matcher]:
    """Decorator registering a matcher as ``fxzip.merge(..., method=name)``
    (``matcher_registered`` does it for a ``with`` block only).

    A matcher is ``fn(stats, n_models, size, **kwargs) -> Match`` for one feature
    space: ``stats.correlation()`` is the (n_models*size)^2 correlation of the
    stacked features [model 0 | model 1 | ...] (NaN where a feature is constant;
    ``stats.constant()`` flags those), ``kwargs`` carry ``alpha``/``beta`` and
    ``merged=`` when ``merged_width`` widens the space (accept it to support
    widening; ignore the rest with ``**_``). Return ``Match(assign, within,
    cross)``: ``assign[k, i]`` is the merged feature that feature ``i`` of model
    ``k`` joins (``size`` merged features); ``within``/``cross`` count the merges
    for the report. Example (tests/test_extending.py runs it)::

        from scipy.optimize import linear_sum_assignment

        @fxzip.register_matcher("hungarian")
        def hungarian(stats, n_models, size, **_):
            corr = stats.correlation().nan_to_num(0.0)
            assign = [torch.arange(size)]
            for k in range(1, n_models):
                rows, cols = linear_sum_assignment(corr[:size, k * size:(k + 1) * size].numpy(), maximize=True)
                a = torch.empty(size, dtype=torch.long)
                a[torch.as_tensor(cols)] = torch.as_tensor(rows)
                assign.append(a)
            return Match(torch.stack(assign), within=[0] * n_models, cross=size * (n_models - 1))

        merged = fxzip.merge(a, b, data=loader, method="hungarian")
    """

    def deco(fn: Matcher) -> Matcher:
        MATCHERS[name] = fn
        return fn
    return deco


def unregister_matcher(name: str) -> None:
    """Remove the matcher registered as ``name`` (a KeyError when there is none)."""
    if name not in MATCHERS:
        raise KeyError(f"no matcher is registered as {name!r}; registered: {sorted(MATCHERS)}")
    del MATCHERS[name]


@contextmanager
def matcher_registered(name: str, fn: Matcher) -> Iterator[Matcher]:
    """``fn`` registered as ``name`` inside the ``with`` block only (a matcher it
    replaced comes back afterwards)."""
    previous = MATCHERS.get(name)
    MATCHERS[name] = fn
    try:
        yield fn
    finally:
        if previous is None:
            MATCHERS.pop(name, None)
        else:
            MATCHERS[name] = previous


def get_matcher(name: str) -> Matcher:
    if name not in MATCHERS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(MATCHERS)}")
    return MATCHERS[name]


def cluster_assignment(clusters: list[list[int]], n_models: int, size: int, merged: int | None = None
                       ) -> torch.Tensor:
    """Number clusters by their smallest stacked feature index (model 0's first),
    so a self-merge keeps model 0's channel order. ``merged``: how many clusters
    the space keeps (``size`` unless ``merged_width`` widened it)."""
    expected = size if merged is None else merged
    if len(clusters) != expected:
        raise AssertionError(f"expected {expected} clusters, got {len(clusters)}")
    assign = torch.empty(n_models * size, dtype=torch.long)
    for j, members in enumerate(sorted(clusters, key=min)):
        assign[members] = j
    return assign.reshape(n_models, size)


def merged_size(size: int, merged: int | None, n_models: int) -> int:
    """The number of merged features a matcher must return: ``size`` (a merge as
    the papers do it) up to ``n_models * size`` (every feature kept apart)."""
    if merged is None:
        return size
    if not size <= merged <= n_models * size:
        raise ValueError(f"a space of {size} features from {n_models} models can keep {size} to "
                         f"{n_models * size} merged features, not {merged}")
    return int(merged)


@register_matcher("weight_average")
def weight_average(stats: SpaceStats | None, n_models: int, size: int, merged: int | None = None, **_) -> Match:
    """Channel i of every model is one feature: plain weight averaging. It has no
    similarity to choose which features to keep apart, so no ``merged_width``."""
    if merged_size(size, merged, n_models) != size:
        raise ValueError("weight_average has no similarity to choose which features to keep apart; "
                         "use merged_width=1.0 with it, or method='zipit' / 'permute' to widen")
    assign = torch.arange(size).repeat(n_models, 1)
    return Match(assign, [0] * n_models, size * (n_models - 1))


@register_matcher("permute")
def permute(stats: SpaceStats, n_models: int, size: int, merged: int | None = None, **_) -> Match:
    """Align every model to model 0 by a linear sum assignment on the cross-model
    correlations (scipy); merged features average the aligned channels.
    Equal constant features are paired first, in channel order.

    ``merged > size`` (``merged_width``): the ``merged - size`` least correlated
    matches (model k's feature against the model-0 feature it was aligned to)
    are left unmerged: model k's feature becomes a merged feature of its own."""
    merged = merged_size(size, merged, n_models)
    corr = stats.correlation().numpy()
    groups = constant_groups(stats, n_models, size)
    assign = [np.arange(size)]
    for k in range(1, n_models):
        block = corr[:size, k * size:(k + 1) * size].copy()
        for group in groups:  # equal constants: paired in channel order, fixed for the LSA
            r, c = group[0], group[k] - k * size
            block[r, :] = -2.0
            block[:, c] = -2.0
            block[r, c] = 2.0
        rows, cols = linear_sum_assignment(block, maximize=True)
        a = np.empty(size, dtype=np.int64)
        a[cols] = rows
        assign.append(a)
    assign_t = torch.as_tensor(np.stack(assign))
    if merged > size:
        _unmerge_weakest(assign_t, corr, groups, size, merged)
    return Match(assign_t, [0] * n_models, int((assign_t[1:] < size).sum()))


def _unmerge_weakest(assign: torch.Tensor, corr: np.ndarray, constants: list[list[int]], size: int,
                     merged: int) -> None:
    """Give the ``merged - size`` least correlated aligned features of models
    1..N-1 merged features of their own (numbered ``size, size + 1, ...``), in
    place. Equal constants stay merged (they are the same feature); ties go to
    the lowest (model, channel)."""
    n_models = assign.shape[0]
    fixed = {f for group in constants for f in group}
    candidates = []
    for k in range(1, n_models):
        for i in range(size):
            stacked = k * size + i
            if stacked not in fixed:
                candidates.append((float(corr[int(assign[k, i]), stacked]), k, i))
    candidates.sort()
    for j, (_, k, i) in enumerate(candidates[:merged - size]):
        assign[k, i] = size + j


def constant_groups(stats: SpaceStats, n_models: int, size: int) -> list[list[int]]:
    """Clusters of equal constant features, one per model.

    Constants of one value share a class (``stats.constant_classes``: sorted
    values with no gap above a millionth of the space's scale between them,
    linear in the number of constants; a layer can have thousands of dead units).
    Inside one value the data cannot tell the features apart; with a weight
    ``signature`` (``Similarity``) model k's are paired to model 0's by the
    nearest signatures (a linear sum assignment), so a permuted copy's dead
    units find their own partners; without one, in channel order.
    """
    const = stats.constant().numpy()
    if not const.any():
        return []
    classes = stats.constant_classes().numpy()
    signature = getattr(stats, "signature", None)
    queues: list[dict[int, list[int]]] = []
    for k in range(n_models):
        by_value: dict[int, list[int]] = {}
        for i in np.flatnonzero(const[k * size:(k + 1) * size]) + k * size:
            by_value.setdefault(int(classes[i]), []).append(int(i))
        queues.append(by_value)
    groups = []
    for value, firsts in queues[0].items():
        members = [q.get(value, []) for q in queues]
        depth = min(len(m) for m in members)
        if depth == 0:
            continue
        if signature is None or len(firsts) == 1:
            groups += [[m[j] for m in members] for j in range(depth)]
            continue
        partner = {i: [i] for i in firsts}
        for k in range(1, n_models):
            cost = torch.cdist(signature[firsts].double(), signature[members[k]].double()).numpy()
            rows, cols = linear_sum_assignment(cost)
            paired = dict(zip(rows.tolist(), cols.tolist()))
            for r, i in enumerate(firsts):
                if i in partner and r in paired:
                    partner[i].append(members[k][paired[r]])
                else:
                    partner.pop(i, None)
        groups += [g for g in partner.values() if len(g) == n_models]
    return sorted(groups)


@register_matcher("zipit")
def zipit(stats: SpaceStats, n_models: int, size: int, alpha: float = 0.3, beta: float = 0.125,
          owner: str = "models", merged: int | None = None, **_) -> Match:
    """ZipIt!'s greedy matching, with repeated matching (alpha) and a per-model
    budget (beta).

    The N*n features of all models are clustered until n remain, always taking
    the most correlated valid pair of clusters next.

    - A *within-model merge* is a cluster gaining a feature from a model it
      already contains (counted once per such model): ``owner="models"``, a
      cluster belongs to every model it contains. Model m may make at most
      ``floor(beta * (N - 1) * n / N)`` of them, enforced from the first step;
      ``beta=0`` means no cluster ever holds two features of one model, which for
      N=2 is a greedy permutation.
    - ``owner="reference"`` (alias ``"first"``) is the ZipIt! reference code's
      rule, reproduced decision for decision: a cluster is labelled by the model
      of its lowest-index member, and a merge of two clusters of one label is a
      within-model merge; model m may make ``max(1, int(((N-1)*n // N) * beta))``
      of them (the code checks its budget only after a merge, so a budget of 0
      still allows one). When m's budget runs out, every pair of the clusters
      then labelled m is forbidden for good, and a cluster formed later inherits
      each parent's forbidden partners (the code writes -inf into the similarity
      matrix and merges rows by their minimum). So whether {A3, B7} may take B9
      after B's budget ran out depends on history: yes if A3 and B7 merged before
      (the pair was labelled A and B then), no if after (B7's -inf to B9 is
      inherited). Ties go to the lowest row, then the lowest column, as the
      code's argmax over the flattened matrix. ``benchmarks/zipit_owner.py``
      measures the two rules against each other.
    - ``alpha=0``: a merged cluster leaves the pool (only pairs form; N must be 2).
      ``alpha>0``: it re-enters with similarity ``alpha * min`` of its parents'
      similarities to every other cluster (alpha must be <= 1).
    - Ties: at equal similarity a pair across models comes before a pair within
      one model, then the lowest stacked index wins (model 0's features first,
      then model 1's, ...; by row, then by column). This is what makes a
      self-merge with dead (constant) channels the identity.
    - Features constant on the data are zipped first: equal constants of all
      models, in channel order, form full clusters that leave the pool.
    - If the budget leaves no valid pair before n clusters remain (possible for
      N > 2), the budget is lifted for the rest and ``budget_relaxed`` is set.
    - ``merged`` (``merged_width``): stop when that many clusters remain instead
      of n; the least correlated features are the ones left apart.

    ``Match.extra["merge_value"]``: the mean similarity at which the greedy
    merged (a re-entering cluster at its alpha-scaled value), what MuDSC's
    reference code scores a space by (``fxzip.mudsc.objective``).
    """
    merged = merged_size(size, merged, n_models)
    _check_zipit_args(n_models, alpha, beta, owner)
    pool = _ZipPool(stats, n_models, size, beta, ZIPIT_OWNERS[owner])
    total = n_models * size
    while pool.merges < total - merged:
        i, top = pool.best_row()
        if top == -np.inf:
            pool.relax()
            continue
        j = int(pool.best_col[i])
        if not pool.valid(i, j):
            pool.refresh(np.array([i]))
            continue
        pool.join(i, j, alpha)
    clusters = pool.finished + [pool.members[i] for i in np.flatnonzero(pool.active).tolist()]
    merged_at = pool.merged_at
    return Match(cluster_assignment(clusters, n_models, size, merged), pool.within.tolist(), pool.cross,
                 pool.relaxed, {"merge_value": float(np.mean(merged_at)) if merged_at else float("nan")})


@register_matcher("zipit_reference")
def zipit_reference(stats: SpaceStats, n_models: int, size: int, alpha: float = 0.3, beta: float = 0.125,
                    merged: int | None = None, **_) -> Match:
    """ZipIt! as its reference code decides, merge for merge (``zipit`` with
    ``owner="reference"``). With ``probes="reference"`` it reproduces the
    official code's merges of the paper's ResNet-20s (``benchmarks/
    reference_parity.py``; features constant on the data excepted: fxzip zips
    equal constants across models first, the code pairs them by index order).
    fxzip's own rule (``"zipit"``) is kept as the default: see
    ``benchmarks/results/reference_parity.md``."""
    return zipit(stats, n_models, size, alpha=alpha, beta=beta, owner="reference", merged=merged)


def _check_zipit_args(n_models: int, alpha: float, beta: float, owner: str) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if alpha == 0 and n_models > 2:
        raise ValueError("alpha=0 lets a merged cluster never re-enter the pool, so only pairs form; "
                         f"merging {n_models} models needs alpha > 0.")
    if n_models > 64:
        raise ValueError(f"zipit merges at most 64 models at once, got {n_models}; merge them in groups "
                         "(a merged model can be merged again)")
    if owner not in ZIPIT_OWNERS:
        raise ValueError(f"owner must be 'models' or 'reference' (alias 'first'), got {owner!r}")


ZIPIT_OWNERS = {"models": "models", "reference": "reference", "first": "reference"}
"""zipit's ``owner`` values and the rule each names ("first": the reference rule's older name)."""


class _ZipPool:
    """The clusters of ZipIt!'s greedy and, per cluster row, its cached best
    partner. The loop is thousands of small vector ops: numpy (one thread,
    microsecond overhead) is several times faster than torch here, and does not
    stall when the other cores are busy.

    ``comp[c, m]``: cluster ``c`` holds a feature of model ``m`` (with
    ``owner="first"`` only its lowest member's model), also kept as one bit
    mask per cluster (``bits``), so "do clusters r and c share a model" is one
    AND over a row; ``within[m]`` counts model m's within-model merges against
    ``budget[m]``. A cluster that leaves the pool is only marked inactive:
    every read of ``S`` masks inactive columns, so its row and column are
    never cleared (a strided column write per merge cost a tenth of the loop)."""

    def __init__(self, stats: SpaceStats, n_models: int, size: int, beta: float, rule: str):
        total = n_models * size
        self.own_all, self.reference = rule == "models", rule == "reference"
        self.total, self.relaxed = total, False
        disposable = getattr(stats, "disposable", False) and stats.matrix.dtype == torch.float64
        self.S = stats.correlation().numpy() if disposable else stats.correlation().numpy().astype(np.float64)
        if disposable:
            stats.matrix = None  # about to be overwritten: nobody may read it as a similarity
        np.fill_diagonal(self.S, -np.inf)
        self.comp = np.zeros((total, n_models), dtype=bool)
        self.comp[np.arange(total), np.arange(total) // size] = True
        self.bits = np.left_shift(np.uint64(1), (np.arange(total) // size).astype(np.uint64))
        if self.reference:  # the code's own rounding, and its check after the merge (a budget of 0 allows 1)
            allowed = max(1, int(((n_models - 1) * size // n_models) * beta + 1e-4))
        else:
            allowed = math.floor(beta * (n_models - 1) * size / n_models)
        self.budget = np.full(n_models, allowed, dtype=np.int64)
        self.within = np.zeros(n_models, dtype=np.int64)
        self.active = np.ones(total, dtype=bool)
        self.merged_at: list[float] = []  # the similarity of each greedy merge (constants zipped first excluded)
        self.members: dict[int, list[int]] = {i: [i] for i in range(total)}
        self.finished: list[list[int]] = []
        for group in constant_groups(stats, n_models, size):
            # Equal constants carry no correlation signal and tie with each other:
            # zip them across models in channel order and take them out of the pool
            # (this also keeps thousands of dead channels from stalling the greedy).
            self.finished.append(group)
            for f in group:
                self.members.pop(f)
            self._retire(group)
        self.merges = self.cross = sum(len(g) - 1 for g in self.finished)
        self.best_val = np.full(total, -np.inf)
        self.best_col = np.zeros(total, dtype=np.int64)
        self.best_across = np.zeros(total, dtype=bool)
        for chunk in np.array_split(np.arange(total), max(1, total // 256)):
            self.refresh(chunk)

    def _retire(self, rows) -> None:
        self.active[rows] = False

    def exhausted(self) -> np.uint64:
        """The bit mask of the models whose within-model budget is spent."""
        spent = np.flatnonzero(self.within >= self.budget)
        return np.uint64(sum(1 << int(m) for m in spent))

    def invalid(self, rows: np.ndarray, shared: np.ndarray) -> np.ndarray:
        """(rows, total): pairs that would exceed an exhausted model's budget,
        inactive columns and the pair of a row with itself. ``shared``: the
        models each pair's clusters have in common (bit masks)."""
        exhausted = self.exhausted()
        bad = ~self.active[None, :] if not exhausted else ((shared & exhausted) != 0) | ~self.active[None, :]
        bad = np.broadcast_to(bad, shared.shape).copy()
        bad[np.arange(len(rows)), rows] = True
        return bad

    def refresh(self, rows: np.ndarray) -> None:
        """Recompute the cached best partner of ``rows``: a pair across models
        wins a tie with a pair within one model."""
        neg = -np.inf
        shared = self.bits[rows][:, None] & self.bits[None, :]
        vals = np.where(self.invalid(rows, shared), neg, self.S[rows])
        overlap = shared != 0
        r = np.arange(len(rows))
        if self.reference:  # the lowest column among ties, across models or not
            first = vals.argmax(1)
            across = inside = first
            take_across = ~overlap[r, first]
        else:
            across = np.where(overlap, neg, vals).argmax(1)
            inside = np.where(overlap, vals, neg).argmax(1)
            take_across = vals[r, across] >= vals[r, inside]
        self.best_col[rows] = np.where(take_across, across, inside)
        self.best_val[rows] = vals[r, self.best_col[rows]]
        self.best_across[rows] = take_across

    def best_row(self) -> tuple[int, float]:
        """The row of the most similar pair and its similarity; among ties a pair
        across models, then the lowest row."""
        masked = np.where(self.active, self.best_val, -np.inf)
        top = masked.max()
        tied = np.flatnonzero(masked == top)
        if self.reference:
            return int(tied[0]), float(top)
        tied_across = tied[self.best_across[tied]]
        return int(tied_across[0] if len(tied_across) else tied[0]), float(top)

    def relax(self) -> None:
        """No valid pair is left: lift the budget for the rest (``budget_relaxed``)."""
        if self.relaxed:
            raise RuntimeError("zipit found no pair to merge although clusters remain")
        self.relaxed = True
        self.budget[:] = self.total
        for chunk in np.array_split(np.flatnonzero(self.active), max(1, int(self.active.sum()) // 256)):
            self.refresh(chunk)

    def valid(self, i: int, j: int) -> bool:
        """The cached pair is still allowed (``j`` may have merged, a budget may be spent)."""
        return bool(self.active[j]) and not (self.bits[i] & self.bits[j] & self.exhausted())

    def join(self, i: int, j: int, alpha: float) -> None:
        """Merge clusters ``i`` and ``j`` into the lower index; with ``alpha > 0``
        it re-enters the pool with ``alpha * min`` of its parents' similarities."""
        self.merged_at.append(float(self.S[i, j]))
        overlap = self.comp[i] & self.comp[j]
        spent_before = self.within >= self.budget
        self.within += overlap
        self.cross += int(not overlap.any())
        self.merges += 1
        keep, drop = min(i, j), max(i, j)
        merged_row = alpha * np.minimum(self.S[i], self.S[j]) if alpha > 0 else None
        self.members[keep] = self.members[keep] + self.members.pop(drop)
        if self.own_all:  # else keep stays the lowest member, so its model labels the cluster
            self.comp[keep] |= self.comp[drop]
            self.bits[keep] |= self.bits[drop]
        self._retire(drop)
        if merged_row is None:
            self.finished.append(self.members.pop(keep))
            self._retire(keep)
        else:
            merged_row[keep] = merged_row[drop] = -np.inf
            self.S[keep, :] = merged_row
            self.S[:, keep] = merged_row
        if self.reference:
            self._forbid_spent(np.flatnonzero((self.within >= self.budget) & ~spent_before))
        stale = ((self.best_col == i) | (self.best_col == j)) & self.active
        if merged_row is not None:
            stale[keep] = True
            self._offer(keep, merged_row, stale)
        if stale.any():
            self.refresh(np.flatnonzero(stale))

    def _forbid_spent(self, models: np.ndarray) -> None:
        """The reference rule: a model whose budget just ran out forbids every
        pair of the clusters it labels now, in the matrix itself, so clusters
        formed from them later inherit it (their rows are minima)."""
        for m in models.tolist():
            labelled = np.flatnonzero(self.active & (self.bits == np.uint64(1 << m)))
            self.S[np.ix_(labelled, labelled)] = -np.inf

    def _offer(self, keep: int, merged_row: np.ndarray, stale: np.ndarray) -> None:
        """The re-entering cluster beats a row's cached best only where alpha*min
        exceeds it (rows whose similarities are all negative, or exhausted)."""
        better = merged_row > self.best_val
        if self.reference:  # a tie goes to the lower column
            better |= (merged_row == self.best_val) & (keep < self.best_col) & (merged_row > -np.inf)
        better &= self.active & ~stale
        if better.any():
            rows = np.flatnonzero(better)
            shared = self.bits[rows] & self.bits[keep]
            ok = (shared & self.exhausted()) == 0
            self.best_val[rows[ok]] = merged_row[rows[ok]]
            self.best_col[rows[ok]] = keep
            self.best_across[rows[ok]] = shared[ok] == 0


def matched_pairs(assign: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every ordered pair (a, b), a != b, of stacked features that share a
    merged feature (vectorised: a space has thousands of clusters)."""
    cid = assign.reshape(-1)
    order = torch.argsort(cid, stable=True)
    _, counts = torch.unique_consecutive(cid[order], return_counts=True)
    size = counts.repeat_interleave(counts)                 # per sorted feature: its cluster's size
    start = (torch.cumsum(counts, 0) - counts).repeat_interleave(counts)  # ... and where its cluster starts
    a = torch.arange(len(cid)).repeat_interleave(size)      # each feature once per member of its cluster
    offset = torch.arange(len(a)) - (torch.cumsum(size, 0) - size).repeat_interleave(size)
    b = start.repeat_interleave(size) + offset
    keep = a != b
    return order[a[keep]], order[b[keep]]


def mean_matched_correlation(corr: "torch.Tensor | SpaceStats", assign: torch.Tensor) -> float:
    """Mean correlation over all pairs of features that share a merged feature
    (of a matrix, or of statistics: then without building the matrix)."""
    rows, cols = matched_pairs(assign)
    if not len(rows):
        return float("nan")
    values = corr.correlation_at(rows, cols) if isinstance(corr, SpaceStats) else corr[rows, cols]
    return float(values.mean())
