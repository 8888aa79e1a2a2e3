"""Smoke test of benchmarks/check_permute.py's hand-written Permute core (no CIFAR data, no checkpoints),
run as a user runs it: ``python benchmarks/check_permute.py --self-check``.

The self-check builds a random-init ResNet-20x1 A and a copy B of A with a known random channel permutation
in every feature space (with the script's own hand-written space map and fold) and checks that B computes
what A computes, that matching recovers the known permutation in every space for every probe set, that the
50/50 self-merge equals A (and a wrong permutation breaks it), that the hand-written BN reset equals fxzip's,
and that fxzip's own permute finds the same permutations. It exits non-zero on the first failed check.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_hand_permute_recovers_known_permutation_and_self_merge_is_identity():
    proc = subprocess.run([sys.executable, "benchmarks/check_permute.py", "--self-check"], capture_output=True,
                          text=True, cwd=str(ROOT), timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert "self-check: 12 spaces" in lines
    assert "self-check: the permuted copy computes A's function" in lines
    for mode in ("brief", "fxzip_probes", "zipit_repo"):
        assert f"self-check: {mode}: known permutation recovered in every space; self-merge equals A" in lines
    assert "self-check: a wrong permutation breaks the identity" in lines
    assert "self-check: hand-written BN reset equals fxzip's reset" in lines
    assert "self-check: fxzip's permute recovers the same permutations" in lines
    assert lines[-1] == "self-check passed"
