"""Library helpers wrapped for torch.fx are traced into the ops they run.

A library registers a helper with ``torch.fx.wrap`` so that its own fx users
see one call node (torchvision's ``stochastic_depth``); to fxzip's channel
analysis such a node would be an unknown op. fxzip traces through it, unless a
rule is registered for the function, which then wins.
"""
from __future__ import annotations

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from helpers import assert_same_function, batches, prepared
from torch import nn
from torchvision.ops import StochasticDepth, stochastic_depth

import fxzip
from fxzip.rules import rule_registered

pytestmark = pytest.mark.usefixtures("one_thread")


def channel_gate(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """A helper a library would keep as one fx node: per-channel scaling."""
    return x * scale.view(1, -1, 1, 1).sigmoid()


torch.fx.wrap("channel_gate")


class Block(nn.Module):
    """A residual conv block calling two fx-wrapped helpers: this module's own
    ``channel_gate`` and torchvision's ``stochastic_depth`` (through
    ``StochasticDepth``, as torchvision's models call it; identity in eval)."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.scale = nn.Parameter(torch.randn(width))
        self.drop = StochasticDepth(0.1, "row")  # calls the wrapped stochastic_depth in torchvision.ops
        self.head = nn.Linear(width, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).relu()
        branch = channel_gate(self.bn(self.conv(x)), self.scale)
        x = x + self.drop(branch)
        return self.head(x.mean((2, 3)))


def _targets(gm: torch.fx.GraphModule) -> set:
    return {n.target for n in gm.graph.nodes if n.op == "call_function"}


def test_fx_wrapped_helpers_are_traced_into_their_ops_and_merge_exactly():
    data = batches((8, 3, 16, 16), 3)
    model = prepared(Block(), data)
    gm = fxzip.trace(model, data[0])
    assert channel_gate not in _targets(gm) and stochastic_depth not in _targets(gm)
    assert_same_function(model, fxzip.merge(model, model, data=data, progress=False), data)
    permuted = fxzip.permute_channels(model, seed=1, example_inputs=data[0])
    assert_same_function(model, permuted, data)
    assert_same_function(model, fxzip.merge(model, permuted, data=data, method="permute", progress=False), data)


def test_torch_fx_still_keeps_them_whole_for_other_tracers():
    """fxzip's tracing leaves torch.fx's table of wrapped functions as it was."""
    fxzip.trace(Block().eval(), torch.randn(2, 3, 16, 16))
    plain = torch.fx.symbolic_trace(Block().eval())
    assert channel_gate in _targets(plain) and stochastic_depth in _targets(plain)


def test_a_rule_registered_for_a_wrapped_helper_keeps_it_one_node():
    def gate_rule(ctx, node):  # channels pass through, as for an element-wise op
        ctx.set(node, ctx.layout(node.args[0]))

    with rule_registered(gate_rule, channel_gate):
        gm = fxzip.trace(Block().eval(), torch.randn(2, 3, 16, 16))
    assert channel_gate in _targets(gm) and stochastic_depth not in _targets(gm)


class Tokens(nn.Module):
    """Constructs of torchvision's MaxViT and Swin at the torch level: axes
    swapped by ``swapaxes`` / ``swapdims`` / ``transpose`` with keywords, and an
    attention mask built in the forward with ``x.new_zeros``."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, stride=2, padding=1)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.head = nn.Linear(width, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.swapaxes(self.stem(x).flatten(2), 1, 2)  # (B, N, C)
        q, k, v = self.qkv(t).chunk(3, dim=-1)
        mask = t.new_zeros((t.shape[1], t.shape[1]))
        mask[:, -1] = -1.0
        scores = (q @ torch.transpose(k, dim0=-2, dim1=-1)) * q.shape[-1] ** -0.5 + mask
        t = t + self.proj(scores.softmax(-1) @ v)
        return self.head(t.swapdims(-1, -2).mean(-1))


def test_swapped_axes_and_masks_built_in_the_forward_merge_exactly():
    data = batches((8, 3, 16, 16), 3)
    model = prepared(Tokens(), data)
    assert_same_function(model, fxzip.merge(model, model, data=data, progress=False), data)
    permuted = fxzip.permute_channels(model, seed=1, example_inputs=data[0])
    assert_same_function(model, permuted, data)
    assert_same_function(model, fxzip.merge(model, permuted, data=data, method="permute", progress=False), data)


class InputSkip(nn.Module):
    """Features concatenated with a channel-free tensor on their channel axis:
    the model input fed again (U-Net, DenseNet-style skips) and coordinates
    computed in the forward (CoordConv, RAFT's flow next to its motion features)."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.mix = nn.Conv2d(width + 3 + 2, width, 3, padding=1)
        self.head = nn.Linear(width, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        coords = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")).to(x)
        y = torch.cat([self.stem(x).relu(), x, coords[None].expand(b, 2, h, w)], dim=1)
        return self.head(self.mix(y).relu().mean((2, 3)))


def test_features_concatenated_with_untracked_channels_merge_exactly():
    data = batches((8, 3, 8, 8), 3)
    model = prepared(InputSkip(), data)
    analysis = fxzip.analyze(fxzip.trace(model, data[0]))
    kept = [sp for sp in analysis.spaces if not sp.mergeable and sp.size in (3, 2)]
    assert len(kept) == 2, "the input's and the coordinates' channels stay in place"
    assert_same_function(model, fxzip.merge(model, model, data=data, progress=False), data)
    permuted = fxzip.permute_channels(model, seed=1, example_inputs=data[0])
    assert_same_function(model, permuted, data)
    assert_same_function(model, fxzip.merge(model, permuted, data=data, method="permute", progress=False), data)


class Resample(nn.Module):
    """Features resampled with ``F.grid_sample`` at coordinates a layer computed
    (a spatial transformer; RAFT looks up its correlations at positions moved
    by its predicted flow): the features' channels pass through, the
    coordinates' space stays in place."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.offsets = nn.Conv2d(width, 2, 3, padding=1)
        self.head = nn.Linear(width, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x).relu()
        grid = self.offsets(y).tanh().permute(0, 2, 3, 1)
        sampled = F.grid_sample(y, grid, align_corners=False)
        return self.head(sampled.mean((2, 3)))


def test_grid_sample_at_computed_coordinates_merges_exactly():
    data = batches((8, 3, 8, 8), 3)
    model = prepared(Resample(), data)
    analysis = fxzip.analyze(fxzip.trace(model, data[0]))
    coords = next(sp for sp in analysis.spaces if "offsets" in sp.producers)
    assert not coords.mergeable, "the coordinates are read by position"
    assert_same_function(model, fxzip.merge(model, model, data=data, progress=False), data)
    permuted = fxzip.permute_channels(model, seed=1, example_inputs=data[0])
    assert_same_function(model, permuted, data)
    assert_same_function(model, fxzip.merge(model, permuted, data=data, method="permute", progress=False), data)
