"""CI smoke test of benchmarks/cache_dtype.py, run as a user runs it (random tiny models, synthetic images)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cache_dtype_smoke_writes_its_table(tmp_path):
    out = tmp_path / "cache_dtype"
    proc = subprocess.run([sys.executable, "benchmarks/cache_dtype.py", "--smoke", "--arch", "vit", "--out", str(out)],
                          capture_output=True, text=True, cwd=str(ROOT), timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["cache_dtype"] for r in rows] == ["float32", "float16", "bfloat16"]
    exact, *low = rows
    assert exact["max_rel_weight_diff_vs_float32"] == 0 and exact["rounding_rel_bound"] == 0
    for r in low:  # half the bytes, a rounding measured, weights moved by it
        assert r["peak_vs_float32"] <= 0.55 and r["rounding_rel_bound"] > 0 and r["max_rel_weight_diff_vs_float32"] > 0
    assert "| vit | 0 | float16 |" in out.with_suffix(".md").read_text()
