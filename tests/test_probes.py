"""Probe policies (``fxzip.probes``): which tensors each policy observes, the
statistics it computes (against a float64 reference built from the probed
tensors themselves), and the invariants under every policy."""
from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_same_function, batches, capture, prepared

import fxzip
from fxzip import zoo
from fxzip.probes import PROBE_ALIASES, PROBE_POLICIES, ProbePolicy, probe_policy, select_probes

POLICIES = sorted(set(PROBE_POLICIES) - set(PROBE_ALIASES))
"""Every distinct preset once (an alias is the same policy as its new name)."""


def _analysis(model, x):
    gm = fxzip.trace(model, (x,))
    return gm, fxzip.analyze(gm)


def _shape(gm, name):
    return tuple(next(n for n in gm.graph.nodes if n.name == name).meta["tensor_meta"].shape)


def test_before_reduce_probes_the_map_a_global_pool_reads():
    """ResNet-20's last stream is read by the classifier after global pooling;
    ``before_reduce`` observes the 8 x 8 map instead of the pooled vector, and
    ``last`` keeps only where each stream leaves its stage."""
    x = torch.randn(2, 3, 32, 32)
    gm, an = _analysis(zoo.resnet20(), x)
    streams = [sp for sp in an.spaces if sp.mergeable and len(sp.probes) > 1]
    assert len(streams) == 3
    last_stage = streams[-1]
    pooled = last_stage.probes[-1]
    assert _shape(gm, pooled.node) == (2, 64)
    assert pooled.unreduced is not None and _shape(gm, pooled.unreduced.node) == (2, 64, 8, 8)
    assert pooled.unreduced.samples == pooled.samples * 64
    chosen = [p.node for p, _ in select_probes(last_stage, PROBE_POLICIES["before_reduce"])]
    assert pooled.node not in chosen and pooled.unreduced.node in chosen
    for sp in streams:
        last = select_probes(sp, PROBE_POLICIES["last"])
        assert [p for p, _ in last] == [sp.probes[-1]]
    assert [p.node for p, _ in select_probes(last_stage, PROBE_POLICIES["reference"])] == \
        [pooled.unreduced.node]
    # a hidden space (inside a block) has one probe point: every policy observes it
    hidden = next(sp for sp in an.spaces if sp.mergeable and len(sp.probes) == 1)
    for policy in PROBE_POLICIES.values():
        assert [p for p, _ in select_probes(hidden, policy)] == hidden.probes


def test_before_reduce_probes_every_token_not_the_class_token():
    x = torch.randn(2, 3, 32, 32)
    gm, an = _analysis(zoo.cifar_vit(depth=2), x)
    stream = max((sp for sp in an.spaces if sp.mergeable), key=lambda sp: len(sp.probes))
    token = stream.probes[-1]
    assert _shape(gm, token.node) == (2, 96)  # the class token after the final norm
    assert token.unreduced is not None
    assert _shape(gm, token.unreduced.node) == (2, 65, 96)


def test_per_point_weights_each_point_equally():
    x = torch.randn(2, 3, 32, 32)
    _, an = _analysis(zoo.resnet20(), x)
    stream = [sp for sp in an.spaces if sp.mergeable and len(sp.probes) > 1][-1]
    chosen = select_probes(stream, PROBE_POLICIES["all_per_point"])
    # sum over a point's samples of the weights is the same for every point
    totals = {round(w * p.samples, 9) for p, w in chosen}
    assert len(totals) == 1 and max(w for _, w in chosen) == 1.0


@pytest.mark.parametrize("policy", POLICIES)
def test_statistics_equal_a_float64_reference(policy):
    """Every space's mean and covariance equal those computed in float64 from
    the probed tensors of both models, weighted as the policy says."""
    data = batches((8, 3, 16, 16), 3)
    a, b = prepared(zoo.resnet20(), data, seed=0), prepared(zoo.resnet20(), data, seed=1)
    cal = fxzip.calibrate(a, b, data=data, progress=False, probes=policy)
    for index, stats in cal.stats.items():
        chosen = select_probes(cal.analysis.spaces[index], PROBE_POLICIES[policy])
        names = {p.node for p, _ in chosen}
        total, gram, count = 0.0, 0.0, 0.0
        seen = [capture(gm, data, names) for gm in cal.models]
        for b in range(len(data)):
            feats = [{name: values[b] for name, values in per_model.items()} for per_model in seen]
            for probe, w in chosen:
                rows = torch.cat([f[probe.node].narrow(probe.dim, probe.offset, probe.size)
                                  .movedim(probe.dim, 0).reshape(probe.size, -1) for f in feats])
                total = total + w * rows.sum(1)
                gram = gram + w * rows @ rows.T
                count += w * rows.shape[1]
        mean = total / count
        cov = gram / count - torch.outer(mean, mean)
        assert torch.allclose(stats.mean, mean, rtol=1e-5, atol=1e-5 * float(mean.abs().max()))
        assert torch.allclose(stats.covariance(), cov, rtol=1e-4, atol=1e-5 * float(cov.abs().max()))


POLICY_MODELS = [(p, "resnet20") for p in POLICIES] + [(p, "vit") for p in ("last", "before_reduce")]


@pytest.mark.parametrize("policy,arch", POLICY_MODELS)  # the ViT with the policies that change what it sees
def test_invariants_hold_for_every_policy(policy, arch):
    make = {"resnet20": lambda: zoo.resnet20(), "vit": lambda: zoo.cifar_vit(depth=2)}[arch]
    data = batches((8, 3, 32, 32), 2)
    model = prepared(make(), data)
    merged = fxzip.merge(model, copy.deepcopy(model), data=data, reset_bn=False, progress=False, probes=policy)
    assert_same_function(model, merged, data)
    permuted = fxzip.permute_channels(model, seed=1, example_inputs=data[0])
    for method, kwargs in [("permute", {}), ("zipit", {"beta": 0.0})]:
        merged = fxzip.merge(model, permuted, data=data, method=method, reset_bn=False, progress=False,
                             probes=policy, **kwargs)
        assert_same_function(model, merged, data)


def test_reference_is_the_old_last_before_reduce():
    """``"reference"`` is the documented name of the reference codes' probe placement; the old
    name is an alias of the same policy, and a zip with either name is bit for bit the same."""
    assert PROBE_ALIASES == {"last_before_reduce": "reference"}
    assert PROBE_POLICIES["last_before_reduce"] is PROBE_POLICIES["reference"]
    assert PROBE_POLICIES["reference"] == ProbePolicy("last", before_reduce=True)
    assert probe_policy("last_before_reduce").name == "reference"
    data = batches((8, 3, 16, 16), 2)
    a, b = prepared(zoo.resnet20(), data, seed=0), prepared(zoo.resnet20(), data, seed=1)
    merged = {name: fxzip.merge(a, b, data=data, alpha=0.5, beta=1.0, progress=False, probes=name)
              for name in ("reference", "last_before_reduce")}
    new, old = (m.state_dict() for m in merged.values())
    assert new.keys() == old.keys() and all(torch.equal(new[k], old[k]) for k in new)
    # the name matters: "all" observes other tensors here, so equality is not vacuous
    other = fxzip.merge(a, b, data=data, alpha=0.5, beta=1.0, progress=False, probes="all").state_dict()
    assert any(not torch.equal(new[k], other[k]) for k in new)
    # a calibration made under the old name serves merges asking for the new one
    cal = fxzip.calibrate(a, b, data=data, progress=False, probes="last_before_reduce")
    again = fxzip.merge(a, b, data=cal, alpha=0.5, beta=1.0, progress=False, probes="reference").state_dict()
    assert all(torch.equal(new[k], again[k]) for k in new)


def test_bad_policy_and_mismatched_calibration_are_refused():
    data = batches((4, 3, 16, 16), 1)
    a, b = zoo.resnet20().eval(), zoo.resnet20().eval()
    with pytest.raises(ValueError, match="unknown probes='everywhere'"):
        fxzip.merge(a, b, data=data, probes="everywhere", progress=False)
    with pytest.raises(ValueError, match="points must be 'all' or 'last'"):
        ProbePolicy(points="first")
    cal = fxzip.calibrate(a, b, data=data, progress=False, probes="last")
    with pytest.raises(ValueError, match="probes='last'"):
        fxzip.merge(a, b, data=cal, progress=False)
    merged = fxzip.merge(a, b, data=cal, progress=False, probes=ProbePolicy(points="last"))
    assert merged.meta["fxzip"].n_models == 2
