"""The LM command-line cost benchmark runs end to end on a few rows of the committed LM pair."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_lm_cli_cost_smoke_writes_schema(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "lm_cli_cost.py"), "--rows", "6",
                           "--batch-size", "3", "--no-refit-row", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=str(ROOT), timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "lm_cli_cost.json").read_text())
    assert result["rows"] == 6 and sum(result["rows_per_domain"].values()) == 6
    (run,) = result["runs"]
    assert run["options"] == [] and run["floor_s"] > 0 and run["wall_s"] > 0 and run["ratio_cli"] > 0
    assert {"trace", "calibration", "matching", "folding"} <= set(run["seconds"])
    assert run["command"].startswith("fxzip merge") and "--seq-len 256" in run["command"]
    assert "| (papers merge) |" in (tmp_path / "lm_cli_cost.md").read_text()
