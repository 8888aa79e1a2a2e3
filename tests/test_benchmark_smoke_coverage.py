"""Smoke test of benchmarks/coverage.py: one tiny timm model (resnet10t at 32 px) passes
both checks, a model with an op fxzip has no rule for fails with a clear category, and
the driver (a fresh subprocess per model) records a failure and writes the json/md."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "coverage.py"


def _load():
    spec = importlib.util.spec_from_file_location("coverage_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


class _Cumsum(nn.Module):
    """A conv net with a cumulative sum over its channels: torch.cumsum has no channel rule."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.cumsum(self.conv(x).relu(), dim=1)
        return self.fc(x.mean((2, 3)))


def test_tiny_model_passes_in_process():
    cov = _load()
    # max_images caps the calibration set to keep the test short (the panel uses 4096);
    # the record then says the 2x-samples rule was not met.
    rec = cov.check_model("resnet10t", 32, max_images=64)
    assert rec["outcome"] == "pass", rec
    assert rec["stage"] is None and rec["category"] is None
    assert rec["checks"]["identity"]["max_rel_err"] <= cov.TOL
    perm = rec["checks"]["permute"]
    assert perm["permuted_check_dtype"] == "float64"
    assert perm["permuted_rel_err"] <= cov.TOL and perm["params_changed"] > 0 and perm["recovery_rel_err"] <= cov.TOL
    assert rec["samples_short"] is True and rec["images"] == 64
    assert rec["mergeable_spaces"] > 0 and rec["spaces"] >= rec["mergeable_spaces"] and rec["params"] > 0
    assert {"create", "trace", "analysis", "prepare", "identity_merge", "permute", "recovery_merge",
            "total"} <= set(rec["seconds"])


def test_unsupported_op_gets_a_clear_category():
    cov = _load()
    rec = cov.check_model("rolled", 16, factory=_Cumsum)
    assert rec["outcome"] == "error" and rec["stage"] == "analysis", rec
    assert rec["error_type"] == "AnalysisError"
    assert rec["category"] == "analysis: no channel rule for function torch.cumsum", rec["category"]
    assert "no channel rule" in rec["message"]


def test_classification_keywords():
    cov = _load()
    assert cov.classify("trace", "TraceError", "torch.fx cannot trace Foo: TraceError: symbolically traced "
                        "variables cannot be used as inputs to control flow\nfxzip needs") == \
        "trace: cannot trace (TraceError: symbolically traced variables cannot be used as inputs to control flow)"
    assert cov.classify("analysis", "AnalysisError", "node 'x' (call_function operator.getitem): indexes the "
                        "channel axis with 3") == "analysis: indexes the channel axis"
    assert cov.classify("analysis", "AnalysisError", "fxzip has no channel rule for module call_module a.b (Foo) "
                        "at node 'a_b'") == "analysis: no channel rule for module Foo"
    assert cov.classify("match", "RuntimeError", "shape '[2, 3]' is invalid for input of size 7") == \
        "match: RuntimeError: shape '…' is invalid for input of size N"


def test_driver_writes_json_and_md(tmp_path):
    """The subprocess driver on a name timm does not know: a 'create' failure, recorded and reported."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--models", "no_such_model:32", "--quiet", "--out",
                           str(tmp_path)], capture_output=True, text=True, cwd=str(ROOT), timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "coverage.json").read_text())
    (rec,) = result["records"]
    assert rec["model"] == "no_such_model" and rec["size"] == 32, rec
    assert rec["outcome"] == "error" and rec["stage"] == "create" and rec["category"].startswith("create: "), rec
    assert rec["code"]["commit"] and rec["wall_s"] > 0
    run = result["runs"][-1]
    assert "--models no_such_model:32" in run["command"] and run["code"]["commit"]
    assert {"uname", "cores", "torch", "timm"} <= set(run["machine"])
    assert len(result["panel"]) == 61
    md = (tmp_path / "coverage.md").read_text()
    assert md.startswith("# fxzip coverage benchmark") and "Self-merge identity: 0 of 61" in md \
        and "all checks (identity, permuted copy, recovery): 0 of 61" in md
    assert "| no_such_model (not in panel) | 32 |" in md


def test_merge_from_folds_later_records_and_keeps_every_run(tmp_path):
    """--merge-from: a later run's record of a model replaces the earlier one; both runs stay listed."""
    cov = _load()
    run = {"command": "python benchmarks/coverage.py", "started": "t", "models": ["m"],
           "machine": {"uname": "u", "cpu": "c", "cores": 2, "python": "3", "torch": "t", "timm": "t"},
           "code": {"commit": "c" * 40, "fxzip_dirty": False, "fxzip_digest": "d"}, "config": {}}
    rec = {"model": "resnet10t", "size": 32, "outcome": "error", "stage": "analysis", "checks": {}, "wall_s": 1.0}
    base = {"panel": [{"model": m, "size": 64} for m in cov.PANEL], "tolerance": cov.TOL, "runs": [run],
            "records": [rec]}
    (tmp_path / "coverage.json").write_text(json.dumps(base))
    later = dict(base, runs=[dict(run, command="later")],
                 records=[dict(rec, outcome="pass", stage=None, checks={"identity": {"outcome": "pass"}})])
    (tmp_path / "later.json").write_text(json.dumps(later))
    result = cov.merge_results(tmp_path, [tmp_path / "later.json"])
    assert [r["outcome"] for r in result["records"]] == ["pass"]
    assert [r["command"] for r in result["runs"]] == ["python benchmarks/coverage.py", "later"]
    assert "Command: `later`" in (tmp_path / "coverage.md").read_text()
