"""Matching under group structure (MuDSC section 3.3) and bilinear spaces.

A grouped space (attention heads, GroupNorm groups, grouped-conv groups) may
only move units inside a group and groups as wholes, and spaces tied by the
analysis (q/k and v of one attention; a grouped conv's input and output)
must share one group assignment. So matching is two-level:

1. groups to groups: the similarity of group g of model 0 and group h of
   model k is the mean similarity of the best one-to-one assignment of their
   units, summed over the spaces of the tie block; each model's groups are
   aligned to model 0's by a linear sum assignment;
2. units within matched groups, by the chosen matcher, on the sub-matrix of
   those groups (zipit's within-model merges therefore stay inside a group).

Merged group g holds merged units ``g * D ... (g + 1) * D - 1``: heads stay
heads, ``num_heads`` and ``head_dim`` stay valid.

Bilinear spaces (q and k, read as ``q . k`` with no weight layer to absorb the
unmerge) get cross-model matches only (``beta = 0``): a within-model merge
would count a merged unit twice in one model's logits and once in the merged
model's (``U^T U`` is not the identity there), while one-to-one matches keep
``q . k`` exactly. We chose this over rescaling q and k rows because the
rescaling differs per model and cannot be folded into one set of weights.
"""
from __future__ import annotations

import itertools
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from .analysis import FeatureSpace, GraphAnalysis
from .matching import Match, Similarity, weight_average

__all__ = ["identity_match", "match_space", "match_block", "match_all", "group_scores", "blocks_of"]

Matcher = Callable[..., Match]


def identity_match(n_models: int, size: int) -> Match:
    """Channel i of every model is one feature (what unmatched spaces keep)."""
    return weight_average(None, n_models, size)


def _kwargs(space: FeatureSpace, kwargs: Mapping) -> dict:
    out = {k: v for k, v in kwargs.items() if k != "widths"}
    if space.bilinear:
        out["beta"] = 0.0
    return out


def match_space(space: FeatureSpace, sim: Similarity, matcher: Matcher, n_models: int, **kwargs) -> Match:
    """One ungrouped space. ``widths`` (in ``kwargs``): merged features per space
    index where ``merged_width`` widens it."""
    merged = kwargs.get("widths", {}).get(space.index, space.size)
    extra = {"merged": merged} if merged != space.size else {}
    match = matcher(sim, n_models, space.size, **_kwargs(space, kwargs), **extra)
    got = int(match.assign.max()) + 1 if match.assign.numel() else 0
    if got != merged:
        raise ValueError(f"the matcher returned {got} merged features for the space of {space.name} "
                         f"({space.size} channels) where {merged} were asked (merged_width); a custom matcher "
                         "must accept merged= to support merged_width")
    return match


def group_scores(matrix: torch.Tensor, size: int, groups: int, k: int, rigid: bool = False) -> np.ndarray:
    """(groups, groups): mean similarity of the best unit assignment between
    group g of model 0 and group h of model k (of unit i to unit i when the
    units are ``rigid``: fixed inside their group)."""
    d = size // groups
    block = matrix[:size, k * size:(k + 1) * size].double()
    pairs = block.reshape(groups, d, groups, d).permute(0, 2, 1, 3)  # (g, h, i, j)
    if rigid:
        return pairs.diagonal(dim1=2, dim2=3).mean(-1).numpy()
    if d == 1:
        return pairs[..., 0, 0].numpy()
    if d <= 5:  # all d! assignments at once: cheaper than G^2 calls into scipy
        perms = torch.tensor(list(itertools.permutations(range(d))))
        vals = pairs[:, :, torch.arange(d)[None, :], perms]  # (g, h, d!, d)
        return vals.mean(-1).amax(-1).numpy()
    out = np.empty((groups, groups))
    arr = pairs.numpy()
    for g in range(groups):
        for h in range(groups):
            r, c = linear_sum_assignment(arr[g, h], maximize=True)
            out[g, h] = arr[g, h][r, c].mean()
    return out


def match_block(block: Sequence[FeatureSpace], sims: Mapping[int, Similarity], matcher: Matcher,
                n_models: int, **kwargs) -> dict[int, Match]:
    """Spaces sharing one group assignment: groups first, then units inside.

    With ``merged_width`` (``widths`` in ``kwargs``) a block keeps more groups
    than one model has: the least similar aligned groups (model k's group
    against the model-0 group it was aligned to) become merged groups of their
    own, whole (heads stay heads)."""
    groups = block[0].groups
    movable = all(sp.mergeable for sp in block)
    widths = kwargs.get("widths", {})
    merged_groups = widths.get(block[0].index, block[0].size) // block[0].group_size
    order = [np.arange(groups)]
    scores = [np.ones((groups, groups))]
    for k in range(1, n_models):
        score = np.zeros((groups, groups))
        for sp in block:
            if sp.index in sims and movable:
                score += group_scores(sims[sp.index].correlation(), sp.size, groups, k, rigid=sp.rigid)
        if movable and score.any():
            rows, cols = linear_sum_assignment(score, maximize=True)
            perm = np.empty(groups, dtype=np.int64)
            perm[rows] = cols
        else:
            perm = np.arange(groups)
        order.append(perm)
        scores.append(score)
    members = [[(k, int(order[k][g])) for k in range(n_models)] for g in range(groups)]
    if merged_groups > groups:
        weakest = sorted((float(scores[k][g, order[k][g]]), k, g) for k in range(1, n_models) for g in range(groups))
        for _, k, g in weakest[:merged_groups - groups]:
            members[g] = [(kk, h) for kk, h in members[g] if kk != k]
            members.append([(k, int(order[k][g]))])
    out: dict[int, Match] = {}
    for sp in block:
        out[sp.index] = _within_groups(sp, sims.get(sp.index) if sp.mergeable else None, members, matcher,
                                       n_models, kwargs)
    return out


def _within_groups(sp: FeatureSpace, sim: Similarity | None, members: list[list[tuple[int, int]]],
                   matcher: Matcher, n_models: int, kwargs: Mapping) -> Match:
    """Units inside each merged group ``members[j]`` (pairs of model and that
    model's group), which becomes merged group ``j``."""
    d, n = sp.group_size, sp.size
    assign = torch.empty(n_models, n, dtype=torch.long)
    within = [0] * n_models
    cross, relaxed = 0, False
    local = torch.arange(d)
    for j, group in enumerate(members):
        if sim is None or sp.rigid or len(group) == 1:  # rigid: unit i of a group stays unit i
            for k, h in group:
                assign[k, h * d:(h + 1) * d] = j * d + local
            cross += d * (len(group) - 1)
            continue
        index = torch.cat([k * n + h * d + local for k, h in group])
        m = matcher(sim.subset(index), len(group), d, **_kwargs(sp, kwargs))
        for i, (k, h) in enumerate(group):
            assign[k, h * d:(h + 1) * d] = j * d + m.assign[i]
            within[k] += m.within[i]
        cross += m.cross
        relaxed |= m.budget_relaxed
    return Match(assign, within, cross, relaxed)


def blocks_of(analysis: GraphAnalysis) -> list[tuple[int, ...]]:
    """The units of matching: every tie block, then every other space alone."""
    tied = {i for block in analysis.ties for i in block}
    return list(analysis.ties) + [(sp.index,) for sp in analysis.spaces if sp.index not in tied]


def match_all(analysis: GraphAnalysis, sims: Mapping[int, Similarity], matcher: Matcher, n_models: int,
              progress: Callable[[list], Iterable] = lambda blocks: blocks, **kwargs) -> dict[int, Match]:
    """A match for every space: grouped blocks two-level, plain spaces directly,
    spaces without a similarity (fixed, output, no probe) the identity.
    ``progress`` wraps the list of blocks (a tqdm bar in ``merge``)."""
    out: dict[int, Match] = {}
    for block in progress(blocks_of(analysis)):
        out.update(match_units(analysis, block, sims, matcher, n_models, **kwargs))
    return out


def match_units(analysis: GraphAnalysis, block: tuple[int, ...], sims: Mapping[int, Similarity],
                matcher: Matcher, n_models: int, **kwargs) -> dict[int, Match]:
    """Match one unit of ``blocks_of``: what MuDSC re-matches in each step."""
    spaces = [analysis.spaces[i] for i in block]
    if spaces[0].groups > 1:
        return match_block(spaces, sims, matcher, n_models, **kwargs)
    sp = spaces[0]
    if sp.index in sims and sp.mergeable and not sp.rigid:
        return {sp.index: match_space(sp, sims[sp.index], matcher, n_models, **kwargs)}
    return {sp.index: identity_match(n_models, sp.size)}
