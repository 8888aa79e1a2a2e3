"""``permute_channels``: the same function with every mergeable space shuffled.

It is both a user tool (make a model whose weights differ but whose function
is identical) and the check of the analysis: if any rule put a tensor in the
wrong space, the permuted copy computes something else.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .analysis import GraphAnalysis, analyze
from .grouped import blocks_of
from .passes.fold import fold
from .trace import default_example, trace

__all__ = ["permute_channels", "random_assignment"]


def permute_channels(model: nn.Module, seed: int = 0, example_inputs: Any = None) -> fx.GraphModule:
    """A copy of ``model`` with a random channel permutation in every mergeable space.

    Spaces pinned to the identity (the model's output, anything fed by the raw
    input) are left alone, exactly as a merge leaves them. Grouped spaces keep
    their groups: one random group (head) permutation per tie block (shared by
    q, k, v and proj of an attention; by a grouped conv's input and output),
    then a random permutation of units inside every group.
    """
    example = default_example(model) if example_inputs is None else example_inputs
    gm = trace(model, example)
    analysis = analyze(gm)
    return fold(gm, [gm], analysis, random_assignment(analysis, seed))


def random_assignment(analysis: GraphAnalysis, seed: int = 0) -> dict[int, torch.Tensor]:
    """A random permutation per mergeable space that respects groups and ties
    (``assign[space]`` of shape (1, size), as ``fold`` takes it)."""
    gen = torch.Generator().manual_seed(seed)
    assign = {}
    for block in blocks_of(analysis):
        spaces = [analysis.spaces[i] for i in block]
        groups = spaces[0].groups
        movable = all(sp.mergeable for sp in spaces)
        order = torch.randperm(groups, generator=gen) if movable else torch.arange(groups)
        for sp in spaces:
            d = sp.group_size
            if not sp.mergeable:
                assign[sp.index] = torch.arange(sp.size)[None, :]
                continue
            inner = torch.stack([torch.arange(d) if sp.rigid else torch.randperm(d, generator=gen)
                                 for _ in range(groups)])  # (groups, d); rigid: units keep their position
            # unit (g, i) goes to group order[g], position inner[g, i]
            assign[sp.index] = (order[:, None] * d + inner).reshape(1, -1)
    return assign
