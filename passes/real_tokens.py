"""Which samples of a feature are real tokens, for every pass that sums over samples.

A language model's batches are right-padded to one length, and the padded
positions carry whatever the pad id computes to: samples of nothing. The
calibration's statistics skip them (``fxzip.stats``); the passes that fit or
measure on the merged model's own features (the refit, a partial zip's head
refit and cut maps, REPAIR) must skip the same positions, or a batch with
much padding pulls every fit toward the pad token's features.

The mask describes only features computed from the inputs it belongs to
(``fxzip.keyword_inputs.MASKED_INPUTS``: token ids and their companions); an
encoder-decoder's decoder features, or anything computed from another data
input, keep every sample. Which axes of a feature are (batch, sequence) is
``fxzip.stats._real_positions``'s rule, shared with the calibration so the
statistics and the fits count the same samples.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.fx as fx

from fxzip.keyword_inputs import MASKED_INPUTS, PADDING_MASK, padding_mask
from fxzip.stats import _real_positions

__all__ = ["RealTokens", "maskable_nodes"]


def maskable_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose samples the padding mask describes: computed from the inputs
    the mask belongs to (``MASKED_INPUTS``) and no other data input. Empty when
    the model takes no padding mask."""
    inputs: dict[fx.Node, frozenset[str]] = {}
    has_mask = False
    for node in graph.nodes:
        if node.op == "placeholder":
            has_mask |= node.name == PADDING_MASK
            inputs[node] = frozenset({node.name}) if node.meta.get("tensor_meta") is not None else frozenset()
        else:
            inputs[node] = frozenset().union(*(inputs.get(i, frozenset()) for i in node.all_input_nodes))
    if not has_mask:
        return set()
    return {n for n, names in inputs.items() if names and names <= MASKED_INPUTS}


class RealTokens:
    """The padding mask of one graph's inputs and the nodes it describes.

    ``mask(inputs)`` reads a batch's (batch, sequence) boolean mask of real
    tokens (None: no mask, or no padding in it); ``positions(node, mask,
    sample_shape)`` the flat indices of a value's real samples, or None when
    every sample counts (then no copy is made)."""

    def __init__(self, graph: fx.Graph):
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        names = [p.name for p in placeholders]
        self.slot = names.index(PADDING_MASK) if PADDING_MASK in names else None
        self.node = placeholders[self.slot] if self.slot is not None else None
        self._maskable = {n.name for n in maskable_nodes(graph)}

    def __bool__(self) -> bool:
        return bool(self._maskable)

    def mask(self, inputs: Sequence) -> torch.Tensor | None:
        return padding_mask(tuple(inputs), self.slot)

    def mask_of(self, value: object) -> torch.Tensor | None:
        """The mask from the padding-mask input's own value (a cached placeholder)."""
        return padding_mask((value,), 0)

    def positions(self, node: fx.Node | str, mask: torch.Tensor | None,
                  sample_shape: Sequence[int]) -> torch.Tensor | None:
        name = node if isinstance(node, str) else node.name
        if mask is None or name not in self._maskable:
            return None
        real = _real_positions(mask, torch.Size(sample_shape))
        return None if real is None else real.to(mask.device)
