"""merged_width: merged spaces between one model's width and the ensemble's.

Invariants: at merged_width=N nothing is merged, so on a BatchNorm CNN without
the norm reset the result computes the mean of the N models exactly (a full
zip) or each model exactly (a partial zip's heads); at any width, a
self-merge and the merge with a permuted copy are still the original
function (features kept apart are copies whose next layer shares their
weight); the multiply-adds follow the widened layers' shapes.
"""
from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_same_function, batches, max_rel_diff, outputs, prepared
from torch import nn

import fxzip
from fxzip import zoo
from fxzip.matching import matcher_registered

SHAPE = (16, 3, 16, 16)


@pytest.fixture(scope="module")
def pair():
    data = batches(SHAPE, 2)
    return prepared(zoo.resnet20(), data, seed=0), prepared(zoo.resnet20(), data, seed=1), data


def _layer_macs(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[float, int, int]]:
    """Per conv/linear: (multiply-adds for one sample, in channels, out channels),
    measured with forward hooks (independent of fxzip's MAC counter)."""
    found: dict[str, tuple[float, int, int]] = {}

    def hook(name):
        def fn(mod, inp, out):
            if isinstance(mod, nn.Conv2d):
                per_out = mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
                found[name] = (float(out[0].numel() * per_out), mod.in_channels, mod.out_channels)
            else:
                found[name] = (float(mod.in_features * mod.out_features), mod.in_features, mod.out_features)
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(x[:1])
    for h in handles:
        h.remove()
    return found


@pytest.mark.parametrize("method", ["zipit", "permute"])
def test_width_n_is_the_ensemble_mean_and_macs_follow_the_shapes(pair, method):
    a, b, data = pair
    merged = fxzip.merge(a, b, data=data, method=method, merged_width=2.0, reset_bn=False, progress=False)
    for x in data:
        with torch.no_grad():
            want = (a(x) + b(x)) / 2
            assert max_rel_diff(want, merged(x)) <= 1e-5
    report = merged.meta["fxzip"]
    assert report.widened
    assert all(row.merged == 2 * row.size for row in report.spaces if row.matched)
    # every conv/linear between two doubled spaces costs 4x, the stem and the
    # classifier (fixed input / output) 2x
    before, after = _layer_macs(a, data[0]), _layer_macs(merged, data[0])
    expected = 0.0
    for name, (macs, c_in, c_out) in before.items():
        _, w_in, w_out = after[name]
        assert w_in in (c_in, 2 * c_in) and w_out in (c_out, 2 * c_out)
        expected += macs * (w_in / c_in) * (w_out / c_out)
    assert sum(m for m, _, _ in after.values()) == pytest.approx(expected)
    assert report.macs["merged"] == pytest.approx(expected, rel=0.02)  # + norms/adds fxzip also counts
    assert report.macs["merged"] > report.macs["ensemble"]  # sqrt(N) is the break-even width


@pytest.mark.parametrize("method,kwargs", [("zipit", {}), ("permute", {}), ("zipit", {"beta": 0.0})])
def test_any_width_keeps_self_merge_and_permutation_recovery(pair, method, kwargs):
    a, _, data = pair
    permuted = fxzip.permute_channels(a, seed=3, example_inputs=data[0])
    for other in (copy.deepcopy(a), permuted):
        merged = fxzip.merge(a, other, data=data, method=method, merged_width=1.5, reset_bn=False, progress=False,
                             **kwargs)
        widths = {row.size: row.merged for row in merged.meta["fxzip"].spaces if row.matched}
        assert widths == {16: 24, 32: 48, 64: 96}
        assert_same_function(a, merged, data)


def test_grouped_spaces_widen_by_whole_heads():
    """A ViT's attention spaces grow by whole heads; at merged_width=N a self-merge
    is exact even through LayerNorm (every feature exactly twice)."""
    data = batches((8, 3, 32, 32), 2)
    vit = prepared(zoo.cifar_vit(depth=2), data)
    merged = fxzip.merge(vit, copy.deepcopy(vit), data=data, merged_width=2.0, progress=False)
    heads = vit.blocks[0].attn.num_heads
    rows = [row for row in merged.meta["fxzip"].spaces if "groups" in row.note and row.matched]
    assert rows and all(row.merged == 2 * row.size for row in rows)
    assert_same_function(vit, merged, data)
    # 1.5: whole heads (3 heads of 32 -> 4 or 5 heads), never a fraction of a head
    merged = fxzip.merge(vit, copy.deepcopy(vit), data=data, merged_width=1.5, progress=False)
    for row in merged.meta["fxzip"].spaces:
        if "groups" in row.note and row.matched:
            assert row.merged % (row.size // heads) == 0 and row.merged > row.size


def test_partial_zip_at_width_n_keeps_every_model(pair, tmp_path):
    a, b, data = pair
    merged = fxzip.merge(a, b, data=data, merged_width=2.0, stop_at=9, reset_bn=False, progress=False)
    for x in data:
        with torch.no_grad():
            out = merged(x)
            assert max_rel_diff(a(x), out[0]) <= 1e-5 and max_rel_diff(b(x), out[1]) <= 1e-5
    copies = [fxzip.permute_channels(a, seed=s, example_inputs=data[0]) for s in (1, 2)]
    # alpha=1: a re-entering cluster keeps its members' similarity, so the third
    # copy of a feature joins its cluster (at 0.3 it may lose to unrelated pairs)
    merged = fxzip.merge(a, *copies, data=data, merged_width=1.5, stop_at=13, reset_bn=False, progress=False,
                         alpha=1.0, beta=0.0)
    for x in data:
        with torch.no_grad():
            assert all(max_rel_diff(a(x), head) <= 1e-5 for head in merged(x))


def test_widened_full_zip_saves_as_a_program(pair, tmp_path):
    a, b, data = pair
    merged = fxzip.merge(a, b, data=data, merged_width=1.25, progress=False)
    out = fxzip.save(merged, tmp_path / "wide")
    assert (out / "model.pt2").exists() and not (out / "model.safetensors").exists()
    program = torch.export.load(str(out / "model.pt2")).module()
    for want, x in zip(outputs(merged, data), data):
        with torch.no_grad():
            assert max_rel_diff(want, program(x)) <= 1e-5


def test_width_by_space_name_and_spaces_that_cannot_grow():
    """A dict widens the named spaces only; a space read through a channel slice
    keeps one model's width and the report says which op held it."""

    class Sliced(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
            self.conv3, self.fc = nn.Conv2d(4, 8, 1), nn.Linear(8, 5)

        def forward(self, x):
            h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
            h = torch.relu(self.conv3(h[:, :4]))
            return self.fc(h.mean((2, 3)))

    data = batches((8, 3, 8, 8), 2)
    model = prepared(Sliced(), data)
    merged = fxzip.merge(model, copy.deepcopy(model), data=data, merged_width=2.0, progress=False)
    rows = {row.name: row for row in merged.meta["fxzip"].spaces}
    assert rows["conv1"].merged == 16 and rows["conv3"].merged == 16
    held = [row for row in rows.values() if "kept at one model's width" in row.note]
    assert held and all("getitem" in row.note for row in held)
    assert_same_function(model, merged, data)
    only = fxzip.merge(model, copy.deepcopy(model), data=data, merged_width={"conv1": 2.0}, progress=False)
    widths = {row.name: row.merged for row in only.meta["fxzip"].spaces}
    assert widths["conv1"] == 16 and widths["conv3"] == 0
    assert_same_function(model, only, data)
    with pytest.raises(ValueError, match="does not have.*conv1"):
        fxzip.merge(model, copy.deepcopy(model), data=data, merged_width={"nope": 2.0}, progress=False)


@pytest.mark.parametrize("bad", [0.5, 3.0, True, "2"])
def test_width_is_checked_before_any_work(pair, bad):
    a, b, data = pair
    with pytest.raises(ValueError, match="merged_width must be a number from 1.0"):
        fxzip.merge(a, b, data=data, merged_width=bad, progress=False)


def test_methods_that_cannot_widen_say_so(pair):
    a, b, data = pair
    with pytest.raises(ValueError, match="weight_average has no similarity"):
        fxzip.merge(a, b, data=data, method="weight_average", merged_width=1.5, progress=False)

    def fixed_width(stats, n_models, size, **_):  # a user matcher that ignores merged=
        return fxzip.matching.permute(stats, n_models, size)

    with matcher_registered("fixed_width", fixed_width):
        with pytest.raises(ValueError, match="must accept merged="):
            fxzip.merge(a, b, data=data, method="fixed_width", merged_width=1.5, progress=False)
        fxzip.merge(a, b, data=data, method="fixed_width", progress=False)  # width 1 still works
