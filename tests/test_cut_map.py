"""Least-squares maps at a partial zip's gather cuts (``passes/cut_map.py``).

Invariants: with a permuted copy the gather already reconstructs every
model's features, so the fitted map is the gather itself and the heads compute
their models exactly; with two different models the map reconstructs each
model's cut features at least as well as the gather on the calibration data
(strictly better here), and it costs exactly C_merged x C_k multiply-adds per
position per head.
"""
from __future__ import annotations

import pytest
import torch
from helpers import assert_heads_compute, batches, prepared

import fxzip
from fxzip import zoo
from fxzip.evaluate import count_macs

CASES = {  # a cut that a head reads through a gather: the mid-stage shortcut, the ViT's residual stream
    "resnet20_gn": (lambda: zoo.resnet20(norm="group"), (16, 3, 16, 16), 5),
    "vit": (lambda: zoo.cifar_vit(depth=2), (8, 3, 32, 32), "add_1"),
}


def _maps(partial):
    return {name: mod for name, mod in partial.named_children() if name.startswith("cutmap")}


@pytest.mark.parametrize("name", list(CASES))
def test_permuted_copy_keeps_the_gather_and_computes_exactly(name):
    make, shape, cut = CASES[name]
    data = batches(shape, 2)
    model = prepared(make(), data)
    permuted = fxzip.permute_channels(model, seed=1, example_inputs=data[0])
    partial = fxzip.merge(model, permuted, data=data, stop_at=cut, refit=True, reset_bn=False, progress=False)
    maps = _maps(partial)
    assert sorted(maps) == ["cutmap0", "cutmap1"]
    for k, mod in enumerate(maps.values()):
        idx = partial.get_buffer(f"unmerge{k}")
        gather = torch.zeros_like(mod.weight)
        gather[torch.arange(len(idx)), idx] = 1.0
        assert torch.allclose(mod.weight, gather, atol=1e-5) and mod.bias.abs().max() < 1e-5
    assert_heads_compute(model, partial, data[:1], 2)


@pytest.mark.parametrize("name", list(CASES))
def test_two_models_the_map_reconstructs_better_than_the_gather_at_its_cost(name):
    make, shape, cut = CASES[name]
    data = batches(shape, 3)
    a, b = prepared(make(), data), prepared(make(), data, seed=5)
    plain = fxzip.merge(a, b, data=data, stop_at=cut, reset_bn=False, progress=False)
    partial = fxzip.merge(a, b, data=data, stop_at=cut, refit=True, reset_bn=False, progress=False)
    maps = partial.meta["fxzip"].details["refit"]["cut_maps"]
    assert maps["layers"] == 2
    for row in maps["per_layer"].values():
        assert row["loss_refit"] < row["loss_folded"]  # the fitted map beats the gather on the data
    # its cost: one C_merged x C_k product per position per head, counted like any layer
    extra = count_macs(partial, data[0][:1]) - count_macs(plain, data[0][:1])
    rows = []
    hooks = [m.register_forward_hook(lambda mod, args, out: rows.append(args[0].numel() // mod.in_features))
             for m in _maps(partial).values()]
    with torch.no_grad():
        partial(data[0][:1])
    for hook in hooks:
        hook.remove()
    assert extra == sum(n * m.weight.numel() for n, m in zip(rows, _maps(partial).values()))
    # the exported program computes what the module does
    program = torch.export.export(partial, (data[0],), strict=False).module()
    with torch.no_grad():
        for want, got in zip(partial(data[0]), program(data[0])):
            assert torch.allclose(want, got, atol=1e-5, rtol=1e-5)
