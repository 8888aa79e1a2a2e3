"""Smoke test of benchmarks/coverage.py, run as a user runs it (``python benchmarks/coverage.py --models ...``):
one driver run (a fresh subprocess per model) on one tiny timm model (resnet10t at 32 px), which passes every
check, and a name timm does not know, recorded as a 'create' failure; the json and md it writes; and
``--merge-from``, which folds a later run's records into a results folder."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5  # coverage.TOL, the tolerance the benchmark checks against (recorded in coverage.json)


def _coverage(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "benchmarks/coverage.py", *args], capture_output=True, text=True,
                          cwd=str(ROOT), timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_driver_checks_a_tiny_model_and_records_a_failure(tmp_path):
    # --max-images caps the calibration set to keep the test short (the panel uses 4096);
    # the record then says the 2x-samples rule was not met.
    _coverage("--models", "resnet10t:32", "no_such_model:32", "--max-images", "64", "--quiet", "--out", str(tmp_path))
    result = json.loads((tmp_path / "coverage.json").read_text())
    tol = result["tolerance"]
    assert tol == TOL
    rec, missing = sorted(result["records"], key=lambda r: r["model"] != "resnet10t")
    # the tiny model passes both checks
    assert rec["model"] == "resnet10t" and rec["size"] == 32
    assert rec["outcome"] == "pass", rec
    assert rec["stage"] is None and rec["category"] is None
    assert rec["checks"]["identity"]["max_rel_err"] <= tol
    perm = rec["checks"]["permute"]
    assert perm["permuted_check_dtype"] == "float64"
    assert perm["permuted_rel_err"] <= tol and perm["params_changed"] > 0 and perm["recovery_rel_err"] <= tol
    assert rec["samples_short"] is True and rec["images"] == 64
    assert rec["mergeable_spaces"] > 0 and rec["spaces"] >= rec["mergeable_spaces"] and rec["params"] > 0
    assert {"create", "trace", "analysis", "prepare", "identity_merge", "permute", "recovery_merge",
            "total"} <= set(rec["seconds"])
    # a name timm does not know: a 'create' failure, recorded and reported
    assert missing["model"] == "no_such_model" and missing["size"] == 32, missing
    assert missing["outcome"] == "error" and missing["stage"] == "create" \
        and missing["category"].startswith("create: "), missing
    assert missing["code"]["commit"] and missing["wall_s"] > 0
    run = result["runs"][-1]
    assert "--models resnet10t:32 no_such_model:32" in run["command"] and run["code"]["commit"]
    assert {"uname", "cores", "torch", "timm"} <= set(run["machine"])
    assert len(result["panel"]) == 61
    md = (tmp_path / "coverage.md").read_text()
    # neither model is in the panel: the summary counts none, the table lists both
    assert md.startswith("# fxzip coverage benchmark") and "Self-merge identity: 0 of 61" in md \
        and "all checks (identity, permuted copy, recovery): 0 of 61" in md
    assert "| no_such_model (not in panel) | 32 |" in md and "| resnet10t (not in panel) | 32 |" in md


def test_merge_from_folds_later_records_and_keeps_every_run(tmp_path):
    """--merge-from: a later run's record of a model replaces the earlier one; both runs stay listed, each
    once (a run resumed from another's output carries that run too)."""
    run = {"command": "python benchmarks/coverage.py", "started": "t", "models": ["m"],
           "machine": {"uname": "u", "cpu": "c", "cores": 2, "python": "3", "torch": "t", "timm": "t"},
           "code": {"commit": "c" * 40, "fxzip_dirty": False, "fxzip_digest": "d"}, "config": {}}
    rec = {"model": "resnet10t", "size": 32, "outcome": "error", "stage": "analysis", "checks": {}, "wall_s": 1.0}
    panel = json.loads((ROOT / "benchmarks" / "results" / "coverage.json").read_text())["panel"]
    base = {"panel": panel, "tolerance": TOL, "runs": [run], "records": [rec]}
    (tmp_path / "coverage.json").write_text(json.dumps(base))
    later = dict(base, runs=[run, dict(run, command="later")],  # resumed from the first: lists it again
                 records=[dict(rec, outcome="pass", stage=None, checks={"identity": {"outcome": "pass"}})])
    (tmp_path / "later.json").write_text(json.dumps(later))
    _coverage("--out", str(tmp_path), "--merge-from", str(tmp_path / "later.json"))
    result = json.loads((tmp_path / "coverage.json").read_text())
    assert [r["outcome"] for r in result["records"]] == ["pass"]
    assert [r["command"] for r in result["runs"]] == ["python benchmarks/coverage.py", "later"]
    assert "Command: `later`" in (tmp_path / "coverage.md").read_text()


def test_torchvision_panel_one_small_model(tmp_path):
    """--library torchvision: one small torchvision model (mobilenet_v3_small at 32 px) passes every check and is
    recorded with its family and input spec in coverage_torchvision.{json,md} (the timm files are not written);
    the analysis-only script records it in coverage_analysis_torchvision.{json,md}."""
    _coverage("--library", "torchvision", "--models", "mobilenet_v3_small:32", "--max-images", "64", "--quiet",
              "--out", str(tmp_path))
    assert not (tmp_path / "coverage.json").exists() and not (tmp_path / "coverage.md").exists()
    result = json.loads((tmp_path / "coverage_torchvision.json").read_text())
    assert result["library"] == "torchvision" and result["tolerance"] == TOL
    families = {p["family"] for p in result["panel"]}
    assert families == {"classification", "segmentation", "video", "optical_flow"}
    panel = {p["model"]: p for p in result["panel"]}
    assert panel["raft_small"]["input"].startswith("image1: (B, 3, 128, 128), image2:")
    assert panel["r3d_18"]["family"] == "video" and panel["fcn_resnet50"]["family"] == "segmentation"
    (rec,) = result["records"]
    assert rec["model"] == "mobilenet_v3_small" and rec["size"] == 32 and rec["outcome"] == "pass", rec
    assert rec["family"] == "classification" and rec["input_spec"]["inputs"] == [[3, 32, 32]]
    assert rec["create_kwargs"] == {"weights": None, "num_classes": 10}
    assert rec["checks"]["identity"]["max_rel_err"] <= TOL and rec["checks"]["permute"]["recovery_rel_err"] <= TOL
    run = result["runs"][-1]
    assert run["config"]["library"] == "torchvision" and run["machine"]["torchvision"] and run["code"]["commit"]
    md = (tmp_path / "coverage_torchvision.md").read_text()
    assert md.startswith("# fxzip coverage benchmark: torchvision")
    assert f"Self-merge identity: 1 of {len(panel)}" in md and "| classification | 80 | 1 | 1 | 1 | 1 |" in md
    assert "| mobilenet_v3_small | classification | x: (B, 3, 32, 32) |" in md

    proc = subprocess.run([sys.executable, "benchmarks/coverage_analysis.py", "--library", "torchvision", "--models",
                           "squeezenet1_1:32", "--out", str(tmp_path)], capture_output=True, text=True,
                          cwd=str(ROOT), timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    analysis = json.loads((tmp_path / "coverage_analysis_torchvision.json").read_text())
    (arec,) = analysis["records"]
    assert arec["model"] == "squeezenet1_1" and arec["outcome"] == "accepted" and arec["family"] == "classification"
    assert arec["input"] == "x: (B, 3, 32, 32)" and arec["mergeable"] > 0
    assert "torchvision" in analysis["machine"] and analysis["commit"]

