"""Smoke test of benchmarks/check_permute.py's hand-written Permute core (no CIFAR data, no checkpoints).

A random-init ResNet-20x1 A and a copy B of A with a known random channel permutation in
every feature space (built with the script's own hand-written space map and fold):

* B computes exactly what A computes (the space map is complete and consistent);
* matching A with B recovers the inverse of the known permutation in every space, for
  every probe set;
* the 50/50 merge of A and the aligned B equals A (self-merge identity), before and after
  the hand-written BN reset (which must also equal fxzip's reset of the same model);
* fxzip's own permute recovers the same permutations (the comparison the script makes).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "check_permute.py"


def _load():
    spec = importlib.util.spec_from_file_location("check_permute_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _random_model(seed: int):
    from fxzip.zoo import resnet20
    torch.manual_seed(seed)
    m = resnet20(1, out_dim=16)
    with torch.no_grad():  # non-trivial BN affine params and running stats, so a wrong fold is visible
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(0.0, 0.5)
    return m.eval()


def test_hand_permute_recovers_known_permutation_and_self_merge_is_identity():
    cp = _load()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 32, 32, generator=gen)
    batches = [x[:4], x[4:]]
    # BN statistics of the data itself: no channel is dead on these 8 images (dead ones tie at correlation 0)
    a = cp.reset_bn(_random_model(0), batches)
    spaces = cp.resnet20_spaces(a)
    names = {sp.name for sp in spaces}
    assert {"stream1", "stream2", "stream3"} <= names and len(spaces) == 12
    assert sum(sp.size for sp in spaces) == 3 * (16 + 32 + 64) + (16 + 32 + 64)
    known = {sp.name: torch.randperm(sp.size, generator=gen).numpy() for sp in spaces}
    b = cp.build(1, cp.permute_state(a.state_dict(), spaces, known), 16)
    with torch.no_grad():
        ya = a(x)
        assert (b(x) - ya).abs().max() < 1e-4, "the permuted copy must compute what A computes"
    stats = cp.collect_stats(a, b, batches, cp.probe_names(spaces), chunk=2)
    for mode in cp.MODES:
        merged, perms = cp.hand_permute(a, b, stats, mode)
        for sp in spaces:
            np.testing.assert_array_equal(perms[sp.name], np.argsort(known[sp.name]), err_msg=f"{mode} {sp.name}")
        m = cp.build(1, merged, 16)
        with torch.no_grad():
            assert (m(x) - ya).abs().max() < 1e-4, f"self-merge ({mode}) must equal A"
    # a wrong permutation of one space must break the identity (the check can fail)
    bad = dict(perms)
    bad["stream2"] = np.roll(bad["stream2"], 1)
    m_bad = cp.build(1, cp.interpolate_states(a.state_dict(), cp.permute_state(b.state_dict(), spaces, bad), 0.5), 16)
    with torch.no_grad():
        assert (m_bad(x) - ya).abs().max() > 1e-3
    # hand-written BN reset == fxzip's reset, and keeps the self-merge identical to A reset
    import fxzip
    ra = cp.reset_bn(cp.build(1, a.state_dict(), 16), batches)
    rf = fxzip.reset_norm_stats(cp.build(1, a.state_dict(), 16), batches).eval()
    for k, v in ra.state_dict().items():
        if k.endswith(("running_mean", "running_var")):
            assert torch.allclose(v, rf.state_dict()[k], rtol=1e-4, atol=1e-5), k
    rm = cp.reset_bn(cp.build(1, merged, 16), batches)
    with torch.no_grad():
        assert (rm(x) - ra(x)).abs().max() < 1e-3
    # fxzip's permute finds the same permutations (what the benchmark compares)
    _, fx = cp.fxzip_permute([a, b], batches)
    for sp in spaces:
        np.testing.assert_array_equal(fx[cp._key(sp)]["perm"], np.argsort(known[sp.name]), err_msg=sp.name)
