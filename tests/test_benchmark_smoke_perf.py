"""The cost benchmark's smoke configuration runs end to end and writes the documented schema."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_perf_smoke_writes_schema(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "perf.py"), "--smoke",  # not quiet: the
                           # per-row progress lines are code too
                           "--out", str(tmp_path)], capture_output=True, text=True, cwd=str(ROOT), timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "perf.json").read_text())
    assert (tmp_path / "perf.md").read_text().startswith("# fxzip cost benchmark")
    assert result["dropped"] == [], result["dropped"]
    assert {"merge", "matching", "inference", "machine", "command"} <= set(result)
    assert isinstance(result["command"], str) and "--smoke" in result["command"]

    assert len(result["merge"]) >= 1
    for row in result["merge"]:
        assert {"model", "n_models", "calib_images", "seconds", "floor_seconds", "ratio_to_floor",
                "extra_rss_mb"} <= set(row)
        assert set(row["seconds"]) >= {"trace", "analysis", "calibration", "matching", "folding", "reset", "total"}
        assert row["floor_seconds"] > 0 and row["ratio_to_floor"] > 0 and row["extra_rss_mb"] >= 0
        parts = sum(v for k, v in row["seconds"].items() if k != "total")
        assert abs(parts - row["seconds"]["total"]) < 1e-6 * max(1.0, parts)
        # load-independent cross-check and the floor measured around the merge
        assert row["ratio_to_floor_cpu"] > 0 and len(row["floor_seconds_before_after"]) == 2
        assert row["gram_gmacs_per_image"] > 0 and row["forward_gmacs_per_image"] > 0
        assert set(row["load_avg_1m_at"]) == {"floor_before", "merge", "floor_after", "end"}

    combos = {(r["matcher"], r["alpha"]) for r in result["matching"]}
    assert combos == {("zipit", 0.0), ("zipit", 0.3), ("permute", None)}
    for row in result["matching"]:
        assert {"features_per_model", "n_models", "matcher", "alpha", "beta", "seconds", "extra_rss_mb"} <= set(row)
        assert row["n_models"] == 2 and row["seconds"] >= 0 and row["extra_rss_mb"] >= 0

    zipped = [r["zipped"] for r in result["inference"]]
    assert "ensemble" in zipped and "full zip" in zipped and any(z.startswith("partial") for z in zipped)
    for row in result["inference"]:
        assert {"model", "zipped", "macs_g", "latency_ms"} <= set(row)
        assert row["macs_g"] > 0 and row["latency_ms"] > 0
    macs = {r["zipped"]: r["macs_g"] for r in result["inference"]}
    partial = next(v for k, v in macs.items() if k.startswith("partial"))
    assert macs["full zip"] < partial < macs["ensemble"]

    assert len(result["refit"]) == 2  # issue 24: refit and repair against the floor and the bound
    row, large = result["refit"]
    # the large-model row (resnet50 at 224 px in the full run): the refit merge alone against its bound
    assert large["light"] and set(large["merges"]) == {"plain", "refit"}
    assert large["bound_seconds"] > large["floor_seconds"] > 0 and large["refit_over_bound"] > 0
    assert large["merges"]["refit"]["refit"]["passes"] == large["n_models"] + 1
    assert "Large models, the merge with refit alone" in (tmp_path / "perf.md").read_text()
    assert row["bound_seconds"] > row["floor_seconds"] > 0 and row["refit_over_bound"] > 0
    assert {"plain", "refit", "repair", "partial_plain", "partial_refit"} == set(row["merges"])
    assert "refit" in row["merges"]["refit"]["seconds"] and row["partial_refit_over_bound"] > 0
    partial = row["merges"]["partial_refit"]["refit"]  # a partial zip's refit: one read, N + 1 model passes
    assert partial["data_reads"] == 1 and partial["passes"] == row["n_models"] + 1
    assert row["merges"]["refit"]["refit"]["memory"]["peak_bytes"] > 0
    refit_seq, refit_waves = row["passes"]["refit_sequential"], row["passes"]["refit_waves"]
    assert refit_seq["data_reads"] == 1 < refit_waves["data_reads"] and refit_seq["units"] > 0
    assert row["max_rel_weight_diff_waves_vs_sequential"]["refit"] <= 1e-6  # the schedules fit the same weights
    assert row["refit_float32_chunks"]["per_layer_max_rel"] and "## Refit and repair" in (tmp_path / "perf.md").read_text()
