"""Partial zip: a merged trunk up to a cut point, one head per model after it."""
from __future__ import annotations

import copy
import io

import pytest
import timm
import torch
from helpers import assert_heads_compute, assert_same_function, batches, max_rel_diff, outputs, prepared

import fxzip
from fxzip import zoo
from fxzip.evaluate import count_macs


@pytest.fixture(scope="module")
def resnet20_setup():
    data = batches((32, 3, 16, 16), 3)
    return prepared(zoo.resnet20(width=1), data), prepared(zoo.resnet20(width=1), data, seed=1), data


def test_resnet20_cut_points_count_like_the_papers(resnet20_setup):
    a, _, data = resnet20_setup
    cuts = fxzip.cut_points(a, data[0])
    assert cuts[0].k == 0 and all(c.m == 20 for c in cuts)
    ks = [c.k for c in cuts]
    assert 7 in ks and 13 in ks and 19 in ks and ks == sorted(ks)
    stage_ends = {c.k: c for c in cuts}
    assert not stage_ends[7].needs_gather and not stage_ends[13].needs_gather  # consumers are convs only
    assert stage_ends[5].needs_gather  # mid-stage: the identity shortcut reads the cut


def test_self_merge_every_cut_resnet20(resnet20_setup):
    a, _, data = resnet20_setup
    for cut in fxzip.cut_points(a, data[0]):
        partial = fxzip.merge(a, copy.deepcopy(a), data=data, stop_at=cut, reset_bn=False, progress=False)
        assert_heads_compute(a, partial, data, 2)


def test_self_merge_every_cut_resnet18():
    data = batches((16, 3, 64, 64), 2)
    model = prepared(timm.create_model("resnet18", num_classes=10), data)
    cal = fxzip.calibrate(model, copy.deepcopy(model), data=data, progress=False)
    for cut in fxzip.cut_points(model, data[0]):
        partial = fxzip.merge(*cal.originals, data=cal, stop_at=cut.name, reset_bn=False, progress=False)
        assert_heads_compute(model, partial, data, 2)


def test_stop_at_zero_is_the_ensemble(resnet20_setup):
    a, b, data = resnet20_setup
    ens = fxzip.merge(a, b, data=data, stop_at=0, reset_bn=False, progress=False)
    for x in data:
        with torch.no_grad():
            ya, yb = ens(x)
            assert torch.equal(ya, a(x)) and torch.equal(yb, b(x))


def test_norm_reset_leaves_what_no_merged_weight_feeds(resnet20_setup):
    """The reset re-estimates the statistics a merge changed. With nothing
    merged (stop_at=0) every head is its model, untouched, even on data whose
    statistics differ from the ones the models hold; at a later cut the trunk's
    norms and the heads' (fed by the merged trunk) are re-estimated."""
    a, b, _ = resnet20_setup
    other = [2.0 * x + 0.5 for x in batches((32, 3, 16, 16), 2, seed=11)]  # not the statistics a and b hold
    kept = fxzip.merge(a, b, data=other, stop_at=0, reset_bn=True, progress=False)
    with torch.no_grad():
        ya, yb = kept(other[0])
        assert torch.equal(ya, a(other[0])) and torch.equal(yb, b(other[0]))
    partial = fxzip.merge(a, b, data=other, stop_at=7, reset_bn=True, progress=False)
    state = partial.state_dict()
    before = a.state_dict()
    for name in ("trunk.bn1.running_var", "head0.layer3.2.bn2.running_var"):
        original = before[name.split(".", 1)[1]]
        assert not torch.allclose(state[name], original), name


@pytest.mark.parametrize("n_models", [3, 4])
def test_many_copies_merge_back_fully_and_partially(resnet20_setup, n_models):
    a, _, data = resnet20_setup
    models = [a] + [fxzip.permute_channels(a, seed=s, example_inputs=data[0]) for s in range(1, n_models)]
    for method, kw in [("permute", {}), ("weight_average", {}), ("zipit", {"alpha": 1.0, "beta": 0.0})]:
        if method == "weight_average":
            models_used = [a] + [copy.deepcopy(a) for _ in range(n_models - 1)]
        else:
            models_used = models
        full = fxzip.merge(*models_used, data=data, method=method, reset_bn=False, progress=False, **kw)
        assert_same_function(a, full, data)
        partial = fxzip.merge(*models_used, data=data, method=method, stop_at=13, reset_bn=False,
                              progress=False, **kw)
        assert_heads_compute(a, partial, data, n_models)


def test_zipit_with_beta_uses_its_within_model_budget(resnet20_setup):
    a, b, data = resnet20_setup
    c = prepared(zoo.resnet20(width=1), data, seed=2)
    merged = fxzip.merge(a, b, c, data=data, method="zipit", alpha=0.5, beta=0.5, reset_bn=False, progress=False)
    for space in merged.meta["fxzip"].spaces:
        if space.matched:
            budget = int(0.5 * 2 * space.size / 3)
            assert max(space.within) <= budget
            assert sum(space.within) > 0  # with three unrelated models beta is used


def test_macs_between_one_model_and_the_ensemble(resnet20_setup):
    a, b, data = resnet20_setup
    x = data[0][:1]
    one = count_macs(a, x)
    assert count_macs(fxzip.merge(a, b, data=data, progress=False), x) == one
    assert count_macs(fxzip.merge(a, b, data=data, stop_at=0, progress=False), x) == 2 * one
    for k in (7, 13, 19):
        partial = fxzip.merge(a, b, data=data, stop_at=k, progress=False)
        macs = count_macs(partial, x)
        assert one < macs < 2 * one
        assert partial.meta["fxzip"].macs == {"merged": macs, "original": one, "ensemble": 2 * one}


def test_partial_state_dict_round_trip_and_compile(resnet20_setup):
    a, b, data = resnet20_setup
    partial = fxzip.merge(a, b, data=data, stop_at=5, progress=False)  # mid-stage: uses gathers
    buffer = io.BytesIO()
    torch.save(partial.state_dict(), buffer)
    other = fxzip.merge(a, b, data=data, stop_at=5, method="weight_average", progress=False)
    buffer.seek(0)
    other.load_state_dict(torch.load(buffer))
    for p, q in zip(outputs(partial, data[:1])[0], outputs(other, data[:1])[0]):
        assert torch.equal(p, q)
    buffer = io.BytesIO()
    torch.save(partial, buffer)
    buffer.seek(0)
    pickled = torch.load(buffer, weights_only=False)
    for p, q in zip(outputs(partial, data[:1])[0], outputs(pickled, data[:1])[0]):
        assert torch.equal(p, q)
    compiled = torch.compile(partial)
    with torch.no_grad():
        for p, q in zip(partial(data[0]), compiled(data[0])):
            assert max_rel_diff(p, q) < 1e-4
