"""The sequential executor (``passes/sequential.py``): the refit and the repair
walked node by node over cached activations give the wave schedule's weights,
in one read of the data, within a memory budget (values past it spilled to
disk and read back bit for bit)."""
from __future__ import annotations

import collections
import copy

import pytest
import torch
from helpers import assert_same_function, batches, prepared
from test_repair import NormFreeNet
from torch import nn

import fxzip
from fxzip import zoo
from fxzip.passes.refit import refit
from fxzip.passes.repair import repair
from fxzip.passes.sequential import ActivationCache
from fxzip.passes.side_by_side import side_by_side

pytestmark = pytest.mark.usefixtures("one_thread")

REL = 1e-6

MODELS = {
    "resnet20": (lambda: zoo.resnet20(), (16, 3, 16, 16)),
    "vit": (lambda: zoo.cifar_vit(depth=2), (8, 3, 32, 32)),
}


def _folded(make, shape, method="zipit", n_batches=3):
    """Two different models, their calibration and the folded merge (no refit)."""
    data = batches(shape, n_batches)
    a, b = prepared(make(), data, seed=0), prepared(make(), data, seed=1)
    cal = fxzip.calibrate(a, b, data=data, progress=False)
    folded = fxzip.merge(a, b, data=cal, method=method, reset_bn=False, progress=False)
    assign = {s.index: torch.tensor(s.assignment) for s in folded.meta["fxzip"].spaces}
    return cal, folded, assign


def _refit(cal, folded, assign, **kwargs):
    joint, node_maps = side_by_side(cal.models, cal.common)
    m = copy.deepcopy(folded)
    return m, refit(m, cal.analysis, joint, node_maps, assign, cal.batches, **kwargs)


def _max_rel(a: nn.Module, b: nn.Module) -> float:
    worst = 0.0
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        if p.is_floating_point() and p.numel():
            worst = max(worst, float((p - q).abs().max() / p.abs().max().clamp_min(1e-30)))
    return worst


@pytest.mark.parametrize("name", list(MODELS))
def test_sequential_refit_equals_the_waves(name):
    """Same weights as the wave refit to 1e-6 relative (only the order of float
    sums may differ); one read of the data, one pass per model plus the merged
    one, against (1 + models) per wave."""
    cal, folded, assign = _folded(*MODELS[name])
    waves, w = _refit(cal, folded, assign, schedule="waves")
    seq, s = _refit(cal, folded, assign)  # the default
    assert s.schedule == "sequential" and w.schedule == "waves"
    assert [l.name for l in s.layers] == [l.name for l in w.layers] and len(s.layers) > 5
    assert _max_rel(waves, seq) <= REL
    assert _max_rel(folded, seq) > 1e-3  # the refit did change the weights
    for lw, ls in zip(w.layers, s.layers):
        assert ls.samples == lw.samples and ls.loss_refit == pytest.approx(lw.loss_refit, rel=1e-6, abs=1e-12)
    assert s.passes == 1 + 2 and s.data_reads == 1
    waves_run = len({l.level for l in w.layers})
    assert w.data_reads == waves_run > 1 and w.passes == waves_run * (1 + 2)
    summary = s.summary()
    assert summary["passes"] == 3 and summary["schedule"] == "sequential"
    assert summary["memory"]["peak_bytes"] > 0 and summary["memory"]["spilled_bytes"] == 0


def test_spilled_refit_is_bit_identical_within_the_budget():
    """A budget below what the walk holds spills the values needed last to disk;
    read back bit for bit, the weights are exactly those of the unbounded walk,
    and the memory held stays within the budget."""
    cal, folded, assign = _folded(*MODELS["vit"])
    free, f = _refit(cal, folded, assign)
    peak = f.memory["peak_bytes"]
    for budget in (peak // 3, 0):
        tight, t = _refit(cal, folded, assign, max_memory=budget)
        assert all(torch.equal(p, q) for p, q in zip(free.state_dict().values(), tight.state_dict().values()))
        assert t.memory["peak_bytes"] <= budget and t.memory["spilled_bytes"] > 0
        assert t.memory["max_memory"] == budget
    assert t.passes == f.passes == 3


@pytest.mark.parametrize("name", list(MODELS))
def test_sequential_refit_keeps_self_merge_and_permutation_recovery(name):
    """The invariants through the executor with everything spilled: a self-merge
    and a permuted copy come back exactly."""
    make, shape = MODELS[name]
    data = batches(shape, 2)
    model = prepared(make(), data)
    permuted = fxzip.permute_channels(model, seed=1, example_inputs=data[0])
    for other in (copy.deepcopy(model), permuted):
        cal = fxzip.calibrate(model, other, data=data, progress=False)
        folded = fxzip.merge(model, other, data=cal, method="permute", reset_bn=False, progress=False)
        assign = {s.index: torch.tensor(s.assignment) for s in folded.meta["fxzip"].spaces}
        fitted, res = _refit(cal, folded, assign, max_memory=0)
        assert res.layers and res.memory["spilled_bytes"] > 0
        assert_same_function(model, fitted, data)


def test_merge_refits_sequentially_by_default():
    """``fxzip.merge(refit=True)`` runs the executor: the report counts one pass
    per model plus the merged model, and the memory it held; a partial zip the
    same: one walk for the trunk, the least-squares maps where the heads gather
    the cut and the heads' layers after them."""
    make, shape = MODELS["resnet20"]
    data = batches(shape, 2)
    a, b = prepared(make(), data, seed=0), prepared(make(), data, seed=1)
    full = fxzip.merge(a, b, data=data, refit=True, reset_bn=False, progress=False).meta["fxzip"].details["refit"]
    assert full["schedule"] == "sequential" and full["passes"] == 3 and full["data_reads"] == 1
    assert full["memory"]["peak_bytes"] > 0
    part = fxzip.merge(a, b, data=data, stop_at=9, refit=True, reset_bn=False, progress=False)
    fitted = part.meta["fxzip"].details["refit"]
    assert fitted["heads"]["layers"] == 2 and fitted["heads"]["passes"] == 3
    assert fitted["cut_maps"]["layers"] == 2 and fitted["cut_maps"]["passes"] == 3  # 9 is mid-stage: a gather cut
    assert fitted["heads"]["data_reads"] == fitted["cut_maps"]["data_reads"] == 1  # one walk for all three
    assert fitted["passes"] == 3 and fitted["data_reads"] == 1


@pytest.mark.parametrize("make,shape", [
    (NormFreeNet, (16, 3, 16, 16)),
    (lambda: zoo.resnet20(norm="group"), (16, 3, 16, 16)),
    (lambda: zoo.cifar_vit(depth=2), (8, 3, 32, 32)),
], ids=["normfree", "resnet20gn", "vit"])
def test_sequential_repair_equals_the_waves(make, shape):
    data = batches(shape, 3)
    a, b = prepared(make(), data, seed=0), prepared(make(), data, seed=1)
    cal = fxzip.calibrate(a, b, data=data, progress=False)
    folded = fxzip.merge(a, b, data=cal, method="zipit", reset_bn=False, progress=False)
    assign = {s.index: torch.tensor(s.assignment) for s in folded.meta["fxzip"].spaces}
    mergeable = {sp.index for sp in cal.analysis.spaces if sp.mergeable}
    joint, node_maps = side_by_side(cal.models, cal.common)
    got = {}
    for schedule, budget in [("waves", None), ("sequential", None), ("sequential", 0)]:
        m = copy.deepcopy(folded)
        got[schedule, budget] = m, repair(m, cal.analysis, mergeable, joint, node_maps, assign, cal.batches,
                                          schedule=schedule, max_memory=budget)
    (w, rw), (s, rs), (z, rz) = got.values()
    assert rs.sites and [x.point for x in rs.sites] == [x.point for x in rw.sites]
    assert _max_rel(w, s) <= REL and _max_rel(folded, s) > 1e-3
    assert all(torch.equal(p, q) for p, q in zip(s.state_dict().values(), z.state_dict().values()))
    assert rs.passes == 3 and rs.data_reads == 1 and rz.memory["spilled_bytes"] > 0
    assert rw.passes == 2 + rw.data_reads - 1 and rw.data_reads == 1 + len({x.level for x in rw.sites})


@pytest.mark.parametrize("make", [
    lambda: torch.randn(4, 6, 5, 5),
    lambda: torch.randn(4, 6, 5, 5).to(memory_format=torch.channels_last),
    lambda: torch.randn(3, 4, 10)[:, 1:3, ::3],  # a strided view with gaps
    lambda: torch.randn(8, 5).T,
    lambda: torch.randn(1, 6).expand(4, 6),  # stride 0
    lambda: torch.randn(5, 7).to(torch.bfloat16),
    lambda: torch.randn(5, 7).half(),
    lambda: torch.arange(12).reshape(3, 4),
    lambda: torch.tensor(3.5),
    lambda: torch.zeros(0, 3),
    lambda: (torch.randn(2, 3), torch.randn(4)[::2]),
])
def test_spill_round_trip_is_exact(make, tmp_path):
    """What goes to disk comes back with the same dtype, shape, strides and bits."""
    value = make()
    cache = ActivationCache(max_memory=0, spill_dir=tmp_path)
    cache.uses[("x",)] = [1]
    cache.put(("x",), 0, value)
    assert cache.held == 0 and cache.spills == (1 if any(t.numel() for t in _leaves(value)) else 0)
    back = cache.get(("x",), 0)
    for want, got in zip(_leaves(value), _leaves(back)):
        assert got.dtype == want.dtype and got.shape == want.shape and got.stride() == want.stride()
        assert torch.equal(got, want)
        assert torch.equal(got.flatten().contiguous().view(torch.uint8), want.flatten().contiguous().view(torch.uint8))
    assert type(back) is type(value)
    cache.close()
    assert not any(tmp_path.iterdir())


def _leaves(value):
    return list(value) if isinstance(value, (tuple, list)) else [value]


def test_cache_counts_shared_storage_once():
    """Views of one tensor (q, k, v of a fused projection) hold its storage once."""
    cache = ActivationCache()
    base = torch.randn(3, 10, 4)
    for i in range(3):
        cache.uses[("v", i)] = [1]
        cache.put(("v", i), 0, base[i])
    assert cache.held == base.untyped_storage().nbytes() == cache.peak
    for i in range(3):
        cache.drop(("v", i))
    assert cache.held == 0


def test_low_precision_cache_rounds_once_and_bounds_it(tmp_path):
    """``dtype=float16``: a float32 value comes back as float32 holding exactly
    its float16 rounding (in memory and spilled); the rounding reported is a
    true bound on the measured one (half of float16's epsilon, 2^-11),
    reached up to the factor max|x| / |x| of the worst-rounded value (1 to 2
    within one binade); values outside float16's normal range (past 65504,
    or all below its smallest normal 6.1e-5, which would be stored as
    subnormals with fewer bits) keep their dtype (counted), and so do named
    tuples and integers."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 33, generator=g)
    tiny = torch.randn(50, generator=g) * 1e-6  # float16's subnormals: spacing 2^-24
    big = torch.randn(8, generator=g) * 1e6  # past float16's 65504
    ids = torch.arange(10)
    for budget in (None, 0):  # held in memory, then spilled
        cache = ActivationCache(max_memory=budget, spill_dir=tmp_path, dtype=torch.float16)
        for key, value in (("x", x), ("big", big), ("ids", ids), ("pair", (x[:, :5], ids))):
            cache.uses[key] = [1]
            cache.put(key, 0, value)
        got = cache.get("x", 0)
        assert got.dtype == torch.float32 and torch.equal(got, x.half().float())
        pair = cache.get("pair", 0)
        assert torch.equal(pair[0], x[:, :5].half().float()) and torch.equal(pair[1], ids)
        assert torch.equal(cache.get("big", 0), big) and torch.equal(cache.get("ids", 0), ids)
        measured = max(float((v - v.half().float()).abs().max() / v.abs().max()) for v in (x, x[:, :5]))
        summary = cache.summary()
        assert 0 < measured <= summary["rounding_rel_bound"] == 2.0 ** -11
        assert summary["values_kept_in_own_dtype"] == 1 and summary["values_rounded"] == 2
        assert summary["cache_dtype"] == "float16"
        pair = collections.namedtuple("Pair", "q k")(x, x)  # cannot be rebuilt from its items: kept
        for key, value in (("tiny", tiny), ("named", pair)):
            cache.uses[key] = [1]
            cache.put(key, 0, value)
        assert torch.equal(cache.get("tiny", 0), tiny) and cache.get("named", 0) is pair
        assert cache.kept_own == 2 and cache.rounding == 2.0 ** -11  # the tiny value is not rounded
        cache.close()
    dense = 1 + torch.rand(100_000, generator=g)  # one binade, [1, 2): the bound is reached
    cache = ActivationCache(dtype=torch.float16)
    cache.uses["dense"] = [1]
    cache.put("dense", 0, dense)
    measured = float((dense - dense.half().float()).abs().max() / dense.abs().max())
    assert 0.49 * cache.rounding <= measured <= cache.rounding
    with pytest.raises(ValueError, match="float16 or torch.bfloat16"):
        ActivationCache(dtype=torch.int8)


def test_float16_cache_halves_the_memory_and_reports_its_rounding():
    """``cache_dtype="float16"``: every cached activation is rounded once, so
    the cache holds about half the bytes of the float32 walk; the merge's
    report bounds how much it rounded, and that is the scale of what it costs:
    a self-merge, exact without it, comes back within 10x that bound. A dtype it cannot keep activations in is refused up front."""
    make, shape = MODELS["vit"]
    data = batches(shape, 2)
    model = prepared(make(), data)
    exact = fxzip.merge(model, copy.deepcopy(model), data=data, method="permute", refit=True, reset_bn=False,
                        progress=False)
    half = fxzip.merge(model, copy.deepcopy(model), data=data, method="permute", refit=True, cache_dtype="float16",
                       reset_bn=False, progress=False)
    assert_same_function(model, exact, data)
    full, low = (m.meta["fxzip"].details["refit"]["memory"] for m in (exact, half))
    assert "cache_dtype" not in full and low["cache_dtype"] == "float16"
    assert 0 < low["rounding_rel_bound"] <= 2.0 ** -11 and low["values_rounded"] > 0
    assert low["peak_bytes"] <= 0.55 * full["peak_bytes"]
    with torch.no_grad():
        want = torch.cat([model(x) for x in data])
        got = torch.cat([half(x) for x in data])
    error = float((got - want).abs().max() / want.abs().max())
    assert 0 < error <= 10 * low["rounding_rel_bound"]
    with pytest.raises(ValueError, match="cache_dtype"):
        fxzip.merge(model, copy.deepcopy(model), data=data, refit=True, cache_dtype="int8", progress=False)


def test_partial_zip_head_refit_spilled_equals_in_memory():
    """The cut maps and the head layers walk the data once through the executor;
    spilling every cached value (``max_memory=0``), the gather's values the
    maps' outputs replace included, gives the same weights bit for bit."""
    make, shape = MODELS["resnet20"]
    data = batches(shape, 2)
    a, b = prepared(make(), data, seed=0), prepared(make(), data, seed=1)
    kept = fxzip.merge(a, b, data=data, stop_at=9, refit=True, reset_bn=False, progress=False)
    spilled = fxzip.merge(a, b, data=data, stop_at=9, refit=True, reset_bn=False, progress=False, max_memory=0)
    assert spilled.meta["fxzip"].details["refit"]["memory"]["spilled_bytes"] > 0
    s1, s2 = kept.state_dict(), spilled.state_dict()
    assert s1.keys() == s2.keys() and any(k.startswith("cutmap") for k in s1)
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
