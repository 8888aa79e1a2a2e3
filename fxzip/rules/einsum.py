"""``torch.einsum``: the same products as ``matmul`` and element-wise rules,
written as an equation. The equation says which axis of each operand meets
which, so the channel axis is followed by its label:

* one operand with channels (or a head axis), the other without: channels
  whose label survives pass to the output (``attn @ v`` and per-channel
  scales); channels contracted against a parameter are read like keys (a
  relative position table: MViT-v2, SAM), the table follows the space;
* both with channels under one contracted label: ``q . k`` (one bilinear space);
* an attention map (head axis only) against values: the heads are tied.

Anything else (a contraction of channels with a computed tensor, a channel x
channel map, an ellipsis over tracked axes) stops the analysis with the
equation and the reason.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..layout import NO_CHANNELS, Layout
from .heads import shared_head_basis
from .registry import FREE, group_aware, register_rule

_AXES = ("dim", "group_dim", "stack_dim")


def _parse(equation: str, n_operands: int) -> tuple[list[str], str] | None:
    """Input label strings and the output labels (implicit output: the labels
    that appear once, sorted, as torch does). None with an ellipsis."""
    eq = equation.replace(" ", "")
    if "." in eq:
        return None
    lhs, arrow, out = eq.partition("->")
    ins = lhs.split(",")
    if len(ins) != n_operands:
        return None
    if not arrow:
        labels = "".join(ins)
        out = "".join(sorted(c for c in set(labels) if labels.count(c) == 1))
    return ins, out


def _labels_of(lay: Layout, labels: str) -> dict[str, str]:
    """Which label each tracked axis (channels, heads, stack) carries."""
    return {k: labels[getattr(lay, k)] for k in _AXES if getattr(lay, k) is not None}


def _varies(ctx, x, labels: str, label: str) -> bool:
    shape = ctx.shape(x) if isinstance(x, fx.Node) else None
    return label in labels and shape is not None and shape[labels.index(label)] != 1


@register_rule(torch.einsum, torch.functional.einsum, width=FREE)
@group_aware
def einsum(ctx, node: fx.Node) -> None:
    equation = node.args[0]
    operands = list(node.args[1]) if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) \
        else list(node.args[1:])
    lays = [ctx.layout(x) if isinstance(x, fx.Node) else NO_CHANNELS for x in operands]
    if not any(l.has_channels or l.grouped for l in lays):
        ctx.set(node, NO_CHANNELS)
        return
    parsed = _parse(equation, len(operands)) if isinstance(equation, str) else None
    if parsed is None:
        ctx.fail(node, f"einsum {equation!r} with an ellipsis or an equation fxzip cannot read over channels; "
                       "write the axes out.")
    ins, out = parsed
    for labels, lay in zip(ins, lays):
        if (lay.has_channels or lay.grouped) and len(set(labels)) != len(labels):
            ctx.fail(node, f"einsum {equation!r} repeats a label inside one operand (a diagonal) of a tensor with "
                           "channels; fxzip follows einsums whose operands name each axis once.")
    if any(l.stack_dim is not None for l in lays):
        ctx.fail(node, f"einsum {equation!r} reads a stacked q/k/v tensor; unbind it first.")
    if len(operands) == 1:
        _one(ctx, node, equation, lays[0], ins[0], out)
    elif len(operands) == 2:
        _two(ctx, node, equation, operands, lays, ins, out)
    else:
        ctx.fail(node, f"einsum {equation!r} of {len(operands)} operands with channels; fxzip follows one or two.")


def _one(ctx, node: fx.Node, equation: str, lay: Layout, labels: str, out: str) -> None:
    """A transpose (and sums over channel-free axes)."""
    tracked = _labels_of(lay, labels)
    if any(label not in out for label in tracked.values()):
        ctx.fail(node, f"einsum {equation!r} sums over the channel or head axis; fxzip follows sums over other "
                       "axes only.")
    where = {k: out.index(label) for k, label in tracked.items()}
    ctx.set(node, Layout(where.get("dim"), lay.segments, group_dim=where.get("group_dim")), passthrough=True)


def _two(ctx, node: fx.Node, equation: str, operands: list, lays: list[Layout], ins: list[str], out: str) -> None:
    ta, tb = _labels_of(lays[0], ins[0]), _labels_of(lays[1], ins[1])
    # the operand with channels first (with none, the one with heads)
    order = [0, 1] if (lays[0].has_channels or not lays[1].has_channels) else [1, 0]
    if not lays[0].has_channels and not lays[1].has_channels and not lays[0].grouped:
        order = [1, 0]
    (a, b), (la, lb), (_, sb), (ta, tb) = ([operands[i] for i in order], [lays[i] for i in order],
                                            [ins[i] for i in order], [(ta, tb)[i] for i in order])
    c, g = ta.get("dim"), ta.get("group_dim")
    if g is not None and tb.get("group_dim") not in (None, g):
        ctx.fail(node, f"einsum {equation!r} pairs the head axes of its operands differently.")
    place = lambda label: out.index(label) if label is not None and label in out else None  # noqa: E731
    if g is not None and place(g) is None and (c is None or c in out):
        ctx.fail(node, f"einsum {equation!r} sums over the head axis of {a.name}; fxzip follows sums over other "
                       "axes only.")
    if not lb.has_channels and not lb.grouped:
        if c is None:  # an attention map against a channel-free tensor
            if g is not None and _varies(ctx, b, sb, g):
                ctx.fail(node, f"einsum {equation!r} weighs each head of {a.name} by {b.name}; fxzip follows "
                               "per-head tensors through element-wise ops and matmul, not through einsum.")
            ctx.set(node, Layout(None, la.segments, group_dim=place(g)) if place(g) is not None else NO_CHANNELS)
            return
        if g is not None and _varies(ctx, b, sb, g):
            ctx.fail(node, f"einsum {equation!r} weighs each head of {a.name} by {b.name}; fxzip follows "
                           "tensors shared by the heads here.")
        if c in out:  # channels pass (attn @ v, a per-channel scale)
            if _varies(ctx, b, sb, c):
                if lb.param is not None and lb.param.axes[sb.index(c)] is not None:
                    ctx.role(node, lb.param.name, lb.param.axes[sb.index(c)], la.segments, "M")
                else:
                    ctx.fix(la.segments, f"untracked tensor: {b.name} varies per channel at {node.name}")
            ctx.set(node, Layout(place(c), la.segments, group_dim=place(g)), passthrough=True)
            return
        if lb.param is not None and c in sb and lb.param.axes[sb.index(c)] is not None:
            # channels read against a parameter table, like keys
            ctx.role(node, lb.param.name, lb.param.axes[sb.index(c)], shared_head_basis(ctx, node, a, la), "M")
            ctx.mark_bilinear(la.segments)
            ctx.set(node, Layout(None, la.segments, group_dim=place(g)) if place(g) is not None else NO_CHANNELS)
            return
        ctx.fail(node, f"einsum {equation!r} contracts the channels of {a.name} with {b.name}, a computed tensor: "
                       "a layer whose weight is not a parameter; register a rule for it.")
    cb = tb.get("dim")
    if c is not None and cb == c and c not in out:  # q . k
        ctx.unify(node, la.segments, lb.segments)
        ctx.mark_bilinear(la.segments)
        ctx.set(node, Layout(None, la.segments, group_dim=place(g)) if place(g) is not None else NO_CHANNELS)
        return
    if c is not None and cb is None and c in out and g is not None and tb.get("group_dim") == g:
        # values against an attention map: head h's pattern weighs head h's values
        heads = ctx.shape(node)[place(g)] if place(g) is not None else None
        ctx.tie_groups(node, lb.segments, la.segments, heads)
        ctx.set(node, Layout(place(c), la.segments, group_dim=place(g)), passthrough=True)
        return
    ctx.fail(node, f"einsum {equation!r} multiplies channels of {a.name} and {b.name} in a way fxzip does not "
                   "follow (it follows q . k, attention @ values and products with channel-free tensors).")
