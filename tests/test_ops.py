"""Simple ops the analysis follows: powers (StarReLU), padding modules, im2col
(``nn.Unfold``), recurrent layers over tokens, ``torch.stack`` of branches,
and split attention over a radix or path axis (ResNeSt, SKNet).
Each in a small model, checked by self-merge identity and permutation
recovery (and that the permutation really moved the op's weights)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_same_function, batches, prepared
from torch import nn

import fxzip
from fxzip.passes.fold import all_tensors


class StarReLUNet(nn.Module):
    """MetaFormer's StarReLU: ``s * relu(x) ** 2 + b`` with scalar s, b."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.scale = nn.Parameter(torch.ones(1))
        self.bias = nn.Parameter(torch.zeros(1))
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        y = self.scale * F.relu(self.a(x)) ** 2 + self.bias
        y = torch.pow(F.relu(self.b(y)), 1.5)
        return self.head(y.mean((2, 3)))


class PaddedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3)
        self.pad = nn.ConstantPad2d((1, 1, 1, 1), 0.5)
        self.zpad = nn.ZeroPad2d((0, 1, 0, 1))
        self.b = nn.Conv2d(8, 8, 3)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        y = self.zpad(self.pad(F.relu(self.a(x))))
        return self.head(F.relu(self.b(y)).mean((2, 3)))


class WindowsNet(nn.Module):
    """Overlapping windows by ``Tensor.unfold`` along both spatial axes (HaloNet's
    key/value blocks), each window position summed into the block."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        y = F.pad(F.relu(self.a(x)), [1, 1, 1, 1]).unfold(2, 4, 2).unfold(3, 4, 2)  # (B, C, h, w, 4, 4)
        return self.head(F.relu(self.b(y.sum((-2, -1)))).mean((2, 3)))


class UnfoldNet(nn.Module):
    """Patches by im2col, then a Linear over each patch's C * kh * kw values."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.unfold = nn.Unfold(kernel_size=2, stride=2)
        self.embed = nn.Linear(6 * 4, 12)
        self.head = nn.Linear(12, 10)

    def forward(self, x):
        patches = self.unfold(F.relu(self.a(x))).transpose(1, 2)  # (B, L, 24)
        return self.head(F.gelu(self.embed(patches)).mean(1))


class RecurrentNet(nn.Module):
    """A bidirectional two-layer LSTM over tokens (Sequencer's token mixer) and a GRU."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(10, 8)
        self.lstm = nn.LSTM(8, 6, num_layers=2, batch_first=True, bidirectional=True)
        self.gru = nn.GRU(12, 5, batch_first=True)
        self.head = nn.Linear(5, 10)

    def forward(self, x):  # (B, tokens, 10)
        y, _ = self.lstm(self.embed(x))
        z, _ = self.gru(y)
        return self.head(z.mean(1))


class StackNet(nn.Module):
    """Two branches stacked on a new axis and summed (selective-kernel style)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.Conv2d(8, 8, 3, padding=1)
        self.b2 = nn.Conv2d(8, 8, 5, padding=2)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        s = F.relu(self.stem(x))
        y = torch.stack([F.relu(self.b1(s)), F.relu(self.b2(s))], dim=1).sum(1)
        return self.head(y.mean((2, 3)))


class RadixSplitAttention(nn.Module):
    """ResNeSt's split attention: a grouped conv makes ``radix`` parts, summed for
    the attention and weighted by a softmax over the radix axis."""

    def __init__(self, c_in: int = 8, c: int = 6, radix: int = 2):
        super().__init__()
        self.radix = radix
        self.stem = nn.Conv2d(3, c_in, 3, padding=1)
        self.conv = nn.Conv2d(c_in, c * radix, 3, padding=1, groups=radix)
        self.bn = nn.BatchNorm2d(c * radix)
        self.fc1 = nn.Conv2d(c, 4, 1)
        self.fc2 = nn.Conv2d(4, c * radix, 1)
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(F.relu(self.stem(x)))))
        b, rc, h, w = x.shape
        x = x.reshape(b, self.radix, rc // self.radix, h, w)
        attn = self.fc2(F.relu(self.fc1(x.sum(1).mean((2, 3), keepdim=True))))
        attn = F.softmax(attn.view(b, 1, self.radix, -1).transpose(1, 2), dim=1).reshape(b, -1)
        out = (x * attn.reshape(b, self.radix, rc // self.radix, 1, 1)).sum(dim=1)
        return self.head(out.mean((2, 3)))


class SelectiveKernel(nn.Module):
    """SKNet: branches stacked on a path axis, weighted by a softmax over paths."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.paths = nn.ModuleList([nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 5, padding=2)])
        self.reduce = nn.Conv2d(c, 4, 1)
        self.select = nn.Conv2d(4, 2 * c, 1)
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        s = F.relu(self.stem(x))
        x = torch.stack([F.relu(p(s)) for p in self.paths], dim=1)
        a = self.select(F.relu(self.reduce(x.sum(1).mean((2, 3), keepdim=True))))
        b, c2, h, w = a.shape
        a = torch.softmax(a.view(b, 2, c2 // 2, h, w), dim=1)
        return self.head(torch.sum(x * a, dim=1).mean((2, 3)))


class BlurPoolNet(nn.Module):
    """Anti-aliased downsampling with a per-channel filter kept in a
    non-persistent buffer (outside the state dict, still one row per channel)."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.a = nn.Conv2d(3, c, 3, padding=1)
        self.register_buffer("filt", torch.rand(c, 1, 3, 3), persistent=False)
        self.b = nn.Conv2d(c, c, 3, padding=1)
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        y = F.conv2d(F.pad(F.relu(self.a(x)), (1, 1, 1, 1), mode="reflect"), self.filt, stride=2, groups=8)
        return self.head(F.relu(self.b(y)).mean((2, 3)))


class RepeatedQuery(nn.Module):
    """A global summary repeated along tokens (GCViT's global query), gating every token."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 8)
        self.head = nn.Linear(8, 10)

    def forward(self, x):  # (B, tokens, 6)
        y = F.relu(self.a(x))
        g = self.b(y.mean(1, keepdim=True)).repeat_interleave(y.shape[1], dim=1)
        return self.head((y * torch.sigmoid(g)).mean(1))


OPS = {
    "pow": (StarReLUNet, (16, 3, 8, 8), ["a.weight", "b.weight"]),
    "padding": (PaddedNet, (16, 3, 8, 8), ["a.weight", "b.weight"]),
    "unfold": (UnfoldNet, (16, 3, 8, 8), ["a.weight", "embed.weight"]),
    "windows": (WindowsNet, (16, 3, 8, 8), ["a.weight", "b.weight"]),
    "recurrent": (RecurrentNet, (32, 7, 10), ["embed.weight", "lstm.weight_ih_l0", "lstm.weight_ih_l1_reverse",
                                              "lstm.weight_hh_l1", "gru.weight_hh_l0"]),
    "non_persistent_buffer": (BlurPoolNet, (16, 3, 8, 8), ["a.weight", "filt", "b.weight"]),
    "repeat_interleave": (RepeatedQuery, (32, 5, 6), ["a.weight", "b.weight"]),
    "stack": (StackNet, (16, 3, 8, 8), ["stem.weight", "b1.weight", "b2.weight"]),
    "radix_split_attention": (RadixSplitAttention, (16, 3, 8, 8), ["stem.weight", "conv.weight", "bn.weight",
                                                                   "fc1.weight", "fc2.weight"]),
    "selective_kernel": (SelectiveKernel, (16, 3, 8, 8), ["stem.weight", "paths.0.weight", "paths.1.weight",
                                                          "reduce.weight", "select.weight"]),
}


def _setup(name):
    make, shape, _ = OPS[name]
    data = batches(shape, 4)
    return prepared(make(), data), data


@pytest.mark.parametrize("name", list(OPS))
def test_self_merge(name):
    model, data = _setup(name)
    merged = fxzip.merge(model, copy.deepcopy(model), data=data, method="zipit", reset_bn=False, progress=False)
    assert_same_function(model, merged, data)


@pytest.mark.parametrize("name", list(OPS))
def test_permutation_recovery(name):
    model, data = _setup(name)
    permuted = fxzip.permute_channels(model, seed=1, example_inputs=data[0])
    assert_same_function(model, permuted, data)
    before, after = all_tensors(model), all_tensors(permuted)
    moved = {k for k, v in before.items() if not torch.equal(v, after[k])}
    assert set(OPS[name][2]) <= moved, f"not permuted: {set(OPS[name][2]) - moved}"
    merged = fxzip.merge(model, permuted, data=data, method="zipit", beta=0.0, reset_bn=False, progress=False)
    assert_same_function(model, merged, data)


class FinalState(nn.Module):
    """The classifier reads the last layer's final hidden state ``h_n[-1]``."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 6, num_layers=2, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        _, (h, _) = self.lstm(x)
        return self.head(h[-1])


def test_recurrent_final_state_follows_its_layer():
    data = batches((32, 5, 4), 3)
    model = prepared(FinalState(), data)
    merged = fxzip.merge(model, copy.deepcopy(model), data=data, reset_bn=False, progress=False)
    assert_same_function(model, merged, data)
    permuted = fxzip.permute_channels(model, seed=1, example_inputs=data[0])
    assert not torch.equal(permuted.state_dict()["lstm.weight_hh_l1"], model.state_dict()["lstm.weight_hh_l1"])
    assert_same_function(model, permuted, data)
    merged = fxzip.merge(model, permuted, data=data, beta=0.0, reset_bn=False, progress=False)
    assert_same_function(model, merged, data)
