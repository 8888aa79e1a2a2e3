"""Smoke test of benchmarks/reference_parity.py (issue 25 item 1) without the official repositories and
without the CIFAR-10 archive.

* The pure parts (paired differences, standard errors, the equal-cell count, the goal lines, the md/json
  writer) on a cache holding real pair-0 numbers: the official ZipIt! code's and fxzip's rows of
  /work/shared/refs/official_pair0_w1.jsonl and official_compare.py's fxzip run, copied below.
* The fxzip sides end to end, as a user runs the script: the reference pair 0 (real checkpoints from
  /work/shared/refs) merged on a tiny CIFAR-shaped npz of random images (64 calibration images, 96 test
  images), both probe settings, in subprocesses; then the same command again, which must skip both cached
  sides. Skipped where /work/shared/refs is absent (the script imports the calibration, evaluation and
  official drivers from there).
"""
from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
REFS = Path("/work/shared/refs")
sys.path.insert(0, str(ROOT / "benchmarks"))
import reference_parity as rp  # noqa: E402


def rows(*items):
    return [{"method": m, "joint": j, "avg": a, "calib_sha1": "312709f81b5a"} for m, j, a in items]


def side(items, sha="312709f81b5a"):
    return {"rows": rows(*items), "calib_sha1": sha}


# pair 0, width 1, draw 0: official ZipIt! code (official_pair0_w1.jsonl) and fxzip with default probes
# (official_compare.py fxzip, fxzip commit aad4e8a); a second cell with the same official numbers and fxzip
# numbers moved by known amounts, so that the mean and standard error have known values
OFFICIAL = [("W.Avg", 10.13, 26.65), ("Permute", 17.42, 38.75), ("ZipIt a.3 b.125", 20.85, 41.68)]
FXZIP = [("W.Avg", 10.13, 26.65), ("Permute", 17.04, 39.52), ("ZipIt a.3 b.125", 17.41, 40.01)]
FXZIP2 = [("W.Avg", 10.13, 26.65), ("Permute", 17.62, 38.75), ("ZipIt a.3 b.125", 20.85, 41.68)]


def test_paired_differences_standard_errors_and_report(tmp_path):
    mu, se = rp.mean_se([1.0, 2.0, 4.0])
    assert mu == pytest.approx(7 / 3) and se == pytest.approx(statistics.stdev([1, 2, 4]) / math.sqrt(3))
    assert rp.mean_se([0.5]) == (0.5, None)
    cache = {"cells": {"p0_w1_d0": {"official_zipit": side(OFFICIAL), "fxzip_default": side(FXZIP),
                                    "fxzip_reference": side(OFFICIAL), "fxzip_zipit_reference": side(OFFICIAL[2:])},
                       "p1_w1_d0": {"official_zipit": side(OFFICIAL), "fxzip_default": side(FXZIP2)}}}
    methods = ["W.Avg", "Permute", "ZipIt a.3 b.125"]
    summary = {(r["method"], r["fxzip"]): r for r in rp.summarize(cache, methods)}
    z = summary[("ZipIt a.3 b.125", "fxzip_default")]
    dj = [17.41 - 20.85, 0.0]
    assert z["n"] == 2 and z["equal"] == 1
    assert z["d_joint"] == pytest.approx(statistics.mean(dj), abs=1e-4)
    assert z["se_joint"] == pytest.approx(statistics.stdev(dj) / math.sqrt(2), abs=1e-4)
    p = summary[("Permute", "fxzip_default")]
    assert p["d_avg"] == pytest.approx((0.77 + 0.0) / 2, abs=1e-4) and p["equal"] == 0
    w = summary[("W.Avg", "fxzip_default")]
    assert (w["d_joint"], w["se_joint"], w["equal"]) == (0.0, 0.0, 2)
    r = summary[("ZipIt a.3 b.125", "fxzip_reference")]
    assert r["n"] == 1 and r["equal"] == 1 and r["se_joint"] is None
    goals = rp.goals(rp.summarize(cache, methods))
    assert ("ZipIt a.3 b.125, method=zipit_reference, probes=reference equals the official code on every cell: "
            "yes (1/1)") in goals
    assert "ZipIt a.3 b.125, default probes: mean paired joint difference -1.72 >= 0: NO (n=2)" in goals

    doc = rp.write_report(cache, methods, ["p0_w1_d0", "p1_w1_d0", "p2_w1_d0"], {"command": "x"}, tmp_path / "r")
    md = (tmp_path / "r.md").read_text()
    assert "| ZipIt a.3 b.125 | default | zipit | 2 | -1.72 ± 1.72 | -0.83 ± 0.83 | 1/2 |" in md
    assert "| p0_w1_d0 | Permute | 17.42 / 38.75 | 17.42 / 38.75 | 17.04 / 39.52 | — | 312709f81b5a |" in md
    assert "| W.Avg | zipit_reference |" not in md  # that side runs the ZipIt rows only
    assert doc["missing"]["p2_w1_d0"] == list(rp.SIDES)
    assert doc["missing"]["p1_w1_d0"] == ["official_mudsc", "fxzip_reference", "fxzip_zipit_reference"]
    assert json.loads((tmp_path / "r.json").read_text())["summary"] == doc["summary"]

    cache["cells"]["p1_w1_d0"]["fxzip_default"]["calib_sha1"] = "another"
    with pytest.raises(ValueError, match="different batches"):
        rp.summarize(cache, methods)


def test_a_method_added_later_is_run_alone_for_the_sides_that_make_it():
    methods = rp.methods_of([0.5])
    assert methods[-1] == "MuDSC a.3 b.125 ws.5" and "MuDSC a.5 b1 ws.5" in methods
    cache = {"cells": {"p0_w1_d0": {"official_mudsc": side([("MuDSC a.5 b1 ws.5", 24.25, 46.26)]),
                                    "official_zipit": side(OFFICIAL + [("ZipIt a1e-4 b.075", 18.17, 38.82)]),
                                    "fxzip_zipit_reference": side(OFFICIAL[2:])}}}
    missing = {s: rp.missing_methods(cache, "p0_w1_d0", s, methods) for s in rp.SIDES}
    assert missing["official_mudsc"] == ["ZipIt a.5 b1", "MuDSC a.3 b.125 ws.5"]  # added since
    assert missing["official_zipit"] == []
    assert missing["fxzip_zipit_reference"] == ["ZipIt a1e-4 b.075", "ZipIt a.5 b1"]
    assert missing["fxzip_default"] == methods  # never ran: everything
    # MuDSC minus ZipIt, each official row from the side that makes it (ZipIt a.5 b1: MuDSC's code)
    cache["cells"]["p0_w1_d0"]["official_mudsc"] = side([("MuDSC a.5 b1 ws.5", 24.25, 46.26),
                                                          ("ZipIt a.5 b1", 29.38, 46.03)])
    cache["cells"]["p1_w1_d0"] = {"official_mudsc": side([("MuDSC a.5 b1 ws.5", 30.0, 46.0),
                                                          ("ZipIt a.5 b1", 31.0, 46.0)])}
    (versus,) = rp.mudsc_minus_zipit(cache)
    assert (versus["setting"], versus["code"], versus["n"]) == ("a.5 b1", "official", 2)
    assert versus["d_joint"] == pytest.approx(((24.25 - 29.38) + (30.0 - 31.0)) / 2, abs=1e-4)


@pytest.mark.skipif(not (REFS / "official_compare.py").exists(), reason="needs /work/shared/refs")
def test_fxzip_sides_run_and_resume_from_cache(tmp_path):
    rng = np.random.RandomState(0)
    npz = tmp_path / "tiny.npz"
    np.savez(npz, x_train=rng.randint(0, 256, (128, 32, 32, 3), dtype=np.uint8),
             x_test=rng.randint(0, 256, (96, 32, 32, 3), dtype=np.uint8), y_test=np.arange(96) % 10)
    cmd = [sys.executable, "benchmarks/reference_parity.py", "--pairs", "0", "--draws", "0",
           "--sides", "fxzip_reference", "fxzip_default", "fxzip_zipit_reference", "--methods", "W.Avg", "ZipIt a.3 b.125",
           "--calib-images", "64", "--calib-bs", "32", "--data-npz", str(npz),
           "--cache", str(tmp_path / "cache.json"), "--out", str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT), timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "1 cells x 3 sides: 3 to run, 0 cached" in proc.stdout
    cache = json.loads((tmp_path / "cache.json").read_text())["cells"]["p0_w1_d0"]
    ref, dflt = ({r["method"]: r for r in cache[s]["rows"]} for s in ("fxzip_reference", "fxzip_default"))
    assert set(ref) == set(dflt) == {"W.Avg", "ZipIt a.3 b.125"}
    assert cache["fxzip_reference"]["calib_sha1"] == cache["fxzip_default"]["calib_sha1"]
    assert ref["ZipIt a.3 b.125"]["probes"] == "reference" and dflt["ZipIt a.3 b.125"]["probes"] == "all"
    exact = {r["method"]: r for r in cache["fxzip_zipit_reference"]["rows"]}
    assert set(exact) == {"ZipIt a.3 b.125"} and "method=zipit_reference" in exact["ZipIt a.3 b.125"]["config"]
    # the weight average does not depend on the probes
    assert ref["W.Avg"]["joint"] == dflt["W.Avg"]["joint"]
    for r in (*ref.values(), *dflt.values()):
        assert 0 <= r["joint"] <= 100 and r["avg"] == pytest.approx((r["task_a"] + r["task_b"]) / 2, abs=1e-3)
    md = (tmp_path / "out.md").read_text()
    assert "Missing: p0_w1_d0 (official_zipit, official_mudsc)" in md

    again = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT), timeout=120, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "1 cells x 3 sides: 0 to run, 3 cached" in again.stdout
