"""Capture (``torch.export``, non-strict): models whose forward has Python
control flow on shapes (which torch.fx's symbolic tracing cannot follow) are
captured specialised to the example's spatial size, keep the batch size
symbolic, and merge exactly; a model that branches on the batch size is
captured for that batch size, and says so; control flow on tensor values
fails with a TraceError that names the line."""
from __future__ import annotations

import copy
import importlib
import logging
import math

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from helpers import assert_same_function, batches, prepared, redraw
from torch import nn

import fxzip

trace_module = importlib.import_module("fxzip.trace")  # fxzip.trace is the function


def tensor_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """Nodes whose value, when captured, was a tensor (not a size read off one)."""
    return [n for n in gm.graph.nodes if n.op != "output" and isinstance(n.meta.get("val"), torch.Tensor)]


# ------------------------------------------------ models with shape control flow

class ShapeIf(nn.Module):
    """``if x.shape[1] != dim``: project only when the width differs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 12, 3, padding=1)
        self.bn = nn.BatchNorm2d(12)
        self.conv2 = nn.Conv2d(12, 16, 3, padding=1)
        self.dim = 16
        self.proj = nn.Conv2d(12, 16, 1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv1(x)))
        skip = self.proj(h) if h.shape[1] != self.dim else h
        h = torch.relu(self.conv2(h) + skip)
        return self.fc(h.mean((2, 3)))


class WindowPad(nn.Module):
    """Swin-style: pad H, W to a multiple of the window, attend within windows, crop."""

    def __init__(self, dim: int = 16, heads: int = 2, window: int = 4) -> None:
        super().__init__()
        self.window, self.heads = window, heads
        self.stem = nn.Conv2d(3, dim, 3, padding=1)
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.fc = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).permute(0, 2, 3, 1)
        B, H, W, C = x.shape
        ws = self.window
        h = self.norm(x)
        if H % ws or W % ws:
            h = F.pad(h, (0, 0, 0, (ws - W % ws) % ws, 0, (ws - H % ws) % ws))
        Hp, Wp = h.shape[1], h.shape[2]
        h = h.reshape(B, Hp // ws, ws, Wp // ws, ws, C).transpose(2, 3).reshape(-1, ws * ws, C)
        q, k, v = self.qkv(h).reshape(h.shape[0], ws * ws, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(-1, ws * ws, C)
        h = self.proj(h).reshape(B, Hp // ws, Wp // ws, ws, ws, C).transpose(2, 3).reshape(B, Hp, Wp, C)
        x = x + h[:, :H, :W]
        return self.fc(x.mean((1, 2)))


class LoopOverShape(nn.Module):
    """Downsample until the spatial size is small: the loop count is a shape."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(c, o, 3, padding=1) for c, o in [(3, 8), (8, 16)])
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        i = 0
        while x.size(-1) > 2:
            x = F.max_pool2d(torch.relu(self.convs[i](x)), 2)
            i += 1
        return self.fc(x.flatten(2).mean(-1))


class SqrtTokens(nn.Module):
    """Tokens back to a square image with ``int(N ** 0.5)`` (a ViT-ish conv FFN)."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 2, stride=2)
        self.norm = nn.LayerNorm(dim)
        self.dw = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.mlp = nn.Linear(dim, dim)
        self.fc = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        B, N, C = x.shape
        side = int(math.sqrt(N))
        assert side * side == N, "square inputs only"
        h = self.norm(x).transpose(1, 2).reshape(B, C, side, side)
        x = x + self.mlp(F.gelu(self.dw(h).flatten(2).transpose(1, 2)))
        return self.fc(x.mean(1))


SHAPE_MODELS = {"shape_if": ShapeIf, "window_pad": WindowPad, "loop_over_shape": LoopOverShape,
                "sqrt_tokens": SqrtTokens}


def _model_and_data(name: str, size: int = 10) -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    data = batches((8, 3, size, size), 2)
    return prepared(SHAPE_MODELS[name](), data), data


@pytest.mark.parametrize("name", list(SHAPE_MODELS))
def test_shape_control_flow_traces_and_self_merges(name: str) -> None:
    model, data = _model_and_data(name)
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(copy.deepcopy(model))  # plain torch.fx cannot follow it
    gm = fxzip.trace(model, data[0])
    assert all("tensor_meta" in n.meta for n in tensor_nodes(gm))
    assert set(gm.state_dict()) == set(model.state_dict())
    assert all(isinstance(gm.get_submodule(n.target), nn.Module) for n in gm.graph.nodes if n.op == "call_module")
    assert_same_function(model, gm, [torch.randn(b, 3, 10, 10) for b in (1, 3, 8)])  # any batch size
    merged = fxzip.merge(model, copy.deepcopy(model), data=data, reset_bn=False, progress=False)
    assert_same_function(model, merged, data)


@pytest.mark.parametrize("name", ["window_pad", "sqrt_tokens"])
def test_shape_control_flow_permutation_recovery(name: str) -> None:
    model, data = _model_and_data(name)
    permuted = fxzip.permute_channels(model, seed=1, example_inputs=data[0])
    assert_same_function(model, permuted, data)
    changed = [k for k, v in model.state_dict().items()
               if v.is_floating_point() and not torch.equal(v, permuted.state_dict()[k])]
    assert len(changed) > len(model.state_dict()) // 3
    merged = fxzip.merge(model, permuted, data=data, method="permute", reset_bn=False, progress=False)
    assert_same_function(model, merged, data)


def test_spatial_size_is_specialised_batch_size_is_not() -> None:
    model, data = _model_and_data("window_pad")
    gm = fxzip.trace(model, data[0])
    assert "x.size(0)" in gm.code  # B is read from the input, not baked
    assert_same_function(model, gm, [torch.randn(b, 3, 10, 10) for b in (1, 5)])
    with pytest.raises(Exception):
        gm(torch.randn(2, 3, 12, 12))  # padding was specialised to 10x10


def test_user_model_is_not_mutated() -> None:
    model, data = _model_and_data("window_pad")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fxzip.trace(model, data[0])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training


def test_multihead_attention_is_decomposed_into_its_projections_and_heads() -> None:
    class Mha(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(4, 8)
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
            self.fc = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.embed(x)
            if h.shape[1] > 1:
                h = h + self.mha(h, h, h)[0]
            return self.fc(h.mean(1))

    model = Mha().eval()
    gm = fxzip.trace(model, torch.randn(4, 6, 4))
    assert not any(n.op == "call_module" and n.target == "mha" for n in gm.graph.nodes)
    assert "mha.in_proj_weight" in gm.state_dict()
    assert_same_function(model, gm, [torch.randn(b, 6, 4) for b in (1, 5)])


# ------------------------------------------------------------ clear refusals

class Gate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0:  # a branch on tensor values
            return self.conv(x)
        return x


class ValueBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3)
        self.blocks = nn.Sequential(nn.ReLU(), Gate())
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


def test_branch_on_tensor_values_names_the_line() -> None:
    with pytest.raises(fxzip.TraceError) as info:
        fxzip.trace(ValueBranch(), torch.randn(2, 3, 8, 8))
    msg = str(info.value)
    assert "cannot capture ValueBranch" in msg and "control flow" in msg and "tensor values" in msg
    assert "test_capture.py" in msg and "in forward: `if x.mean() > 0:`" in msg
    assert "register_leaf_module" in msg


def test_item_in_a_branch_is_refused_but_in_arithmetic_is_recorded() -> None:
    class Item(nn.Module):
        def __init__(self, branch: bool) -> None:
            super().__init__()
            self.fc, self.branch = nn.Linear(4, 4), branch

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            scale = x.abs().max().item()
            if self.branch and scale > 1.0:
                return self.fc(x)
            if x.shape[1] == 4:  # a branch on a shape
                x = x * scale
            return self.fc(x)

    with pytest.raises(fxzip.TraceError, match=r"depends on tensor values at .*`if self.branch and scale > 1.0:`"):
        fxzip.trace(Item(True), torch.randn(2, 4))
    model = Item(False).eval()
    gm = fxzip.trace(model, torch.randn(2, 4))
    assert_same_function(model, gm, [torch.randn(3, 4) * 5, torch.randn(5, 4) * 0.1])


class PerSample(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.fc(x[b]) for b in range(x.shape[0])])


def test_control_flow_on_the_batch_size_fixes_the_batch_size_and_says_so(caplog) -> None:
    model, x = PerSample().eval(), torch.randn(3, 4)
    with caplog.at_level(logging.INFO, logger="fxzip"):
        gm = fxzip.trace(model, x)
    (record,) = [r for r in caplog.records if r.name == "fxzip.trace"]
    assert "PerSample: the batch size cannot stay symbolic" in record.getMessage()
    assert "capturing it for batches of 3" in record.getMessage()
    assert_same_function(model, gm, [x, torch.randn(3, 4)])
    with pytest.raises(ValueError, match="captured for batches of 3 .* a batch of 5"):
        gm(torch.randn(5, 4))  # never three of the five samples silently


def test_a_model_captured_for_one_batch_size_merges() -> None:
    """A fixed-batch graph merges (its cost is counted at the captured size, not
    on a batch of one), and so does its permuted copy, itself such a graph."""
    torch.manual_seed(0)
    model = nn.Sequential(PerSample(), nn.ReLU(), nn.Linear(4, 4)).eval()
    data = [torch.randn(3, 4) for _ in range(4)]
    merged = fxzip.merge(model, copy.deepcopy(model), data=data, progress=False)
    assert_same_function(model, merged, data)
    assert merged.meta["fxzip"].macs["merged"] == merged.meta["fxzip"].macs["original"] == 4 * 4 + 4 * 4
    permuted = fxzip.permute_channels(model, seed=1, example_inputs=data[0])
    recovered = fxzip.merge(model, permuted, data=data, progress=False)
    assert_same_function(model, recovered, data)


# ------------------------------------------------------------------- timm

def test_timm_model_that_symbolic_tracing_cannot_follow() -> None:
    """Hiera's forward has ``mask=None``: plain fx makes it a placeholder, takes the
    ``if mask is not None`` branch and the graph cannot run; capture
    keeps the default and captures its shape arithmetic."""
    timm = pytest.importorskip("timm")
    model = redraw(timm.create_model("hiera_tiny_224", pretrained=False, num_classes=10, img_size=64).eval())
    gm = fxzip.trace(model, torch.randn(2, 3, 64, 64))
    assert sum(isinstance(gm.get_submodule(n.target), nn.Linear) for n in gm.graph.nodes
               if n.op == "call_module") >= 20
    assert set(gm.state_dict()) == set(model.state_dict())
    assert_same_function(model, gm, [torch.randn(3, 3, 64, 64)])


def test_timm_notrace_modules_keep_the_batch_size_symbolic() -> None:
    """MobileViT blocks are timm no-trace modules that reshape with ``B``;
    captured through, the graph still runs at another batch size."""
    timm = pytest.importorskip("timm")
    model = redraw(timm.create_model("mobilevitv2_050", pretrained=False, num_classes=10).eval())
    gm = fxzip.trace(model, torch.randn(2, 3, 64, 64))
    assert_same_function(model, gm, [torch.randn(3, 3, 64, 64)])


class Switch(nn.Module):
    """One architecture, two behaviours chosen by a plain attribute."""

    def __init__(self, gelu: bool) -> None:
        super().__init__()
        self.gelu = gelu
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(F.gelu(h) if self.gelu else torch.relu(h))


def test_a_merge_captures_each_architecture_once_and_never_mixes_behaviours() -> None:
    x = torch.randn(4, 4)
    a, b, c = (redraw(Switch(gelu).eval(), seed) for gelu, seed in ((True, 0), (True, 1), (False, 2)))
    gms = trace_module.trace_models([a, b, c], x)
    assert gms[1].code == gms[0].code and gms[2].code != gms[0].code  # c's setting differs: its own capture
    assert [n.meta.get("tensor_meta") for n in gms[1].graph.nodes] == [n.meta.get("tensor_meta") for n in gms[0].graph.nodes]
    for model, gm in zip((a, b, c), gms):
        assert_same_function(model, gm, [x, torch.randn(7, 4)])  # each over its own weights
