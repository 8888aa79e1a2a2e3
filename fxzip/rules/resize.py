"""What width rules share (``merged_width``): a layout's channel count under
merged sizes, and rewriting a channel count held in a call's arguments.

Why here: the width rule of an op lives with its channel rule (``layers.py``'s
norms), and ``passes.widen`` rewrites ``view``/``reshape`` sizes the same way;
both need these, and neither should import the planning in ``fxzip.widths``.
``analysis`` below is the ``fxzip.analysis.GraphAnalysis`` (its ``layouts`` and
``space_of``), a layer above the rules, so it is not imported."""
from __future__ import annotations

from typing import Any, Mapping

import torch.fx as fx

from ..layout import Layout

__all__ = ["layout_sizes", "input_ratio", "scaled", "set_arg"]


def layout_sizes(lay: Layout, sizes: Mapping[int, int], analysis: Any) -> tuple[int, int, float]:
    """(old length, new length, group ratio) of a layout's channel axis under
    merged ``sizes`` (space index -> merged features, widened spaces only)."""
    old = new = 0
    for s in lay.segments:
        i = analysis.space_of[s.space]
        old += s.length
        new += sizes.get(i, s.size) * s.inner
    ratio = new / old if old else 1.0
    return old, new, ratio


def input_ratio(node: fx.Node, analysis: Any, sizes: Mapping[int, int]) -> float:
    """How much the channel axis of the node's first argument grew (1 when it has none)."""
    lay = analysis.layouts.get(node.args[0].name) if isinstance(node.args[0], fx.Node) else None
    return layout_sizes(lay, sizes, analysis)[2] if isinstance(lay, Layout) else 1.0


def scaled(value: int, ratio: float, node: fx.Node) -> int:
    """``value`` channels (or groups) times ``ratio``, refused unless whole."""
    result = value * ratio
    if abs(result - round(result)) > 1e-9:
        raise ValueError(f"node {node.name} holds {value} channels, which merged_width cannot scale by "
                         f"{ratio:.3f}; keep this space at merged_width 1")
    return int(round(result))


def set_arg(node: fx.Node, index: int, name: str, value: Any) -> None:
    """Set argument ``index`` of a call, or its keyword ``name`` when it was not passed by position."""
    if len(node.args) > index:
        node.args = node.args[:index] + (value,) + node.args[index + 1:]
    else:
        node.kwargs = {**node.kwargs, name: value}
