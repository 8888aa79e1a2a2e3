"""CI smoke tests of benchmarks/probe_policy.py, zipit_owner.py and refit_passes.py (random-init models,
synthetic images), each run as a user runs it (``python benchmarks/NAME.py --smoke ...``): every code path,
the JSON and the markdown."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> dict:
    """Run benchmarks/<script> with ``args`` from the repository root; returns the JSON it wrote (--out)."""
    proc = subprocess.run([sys.executable, f"benchmarks/{script}", *args], capture_output=True, text=True,
                          cwd=str(ROOT), timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = args[args.index("--out") + 1]
    return json.loads(Path(out + ".json").read_text())


def test_probe_policy_smoke(tmp_path):
    out = str(tmp_path / "pp")
    res = _run("probe_policy.py", "--smoke", "--archs", "resnet20gn", "--pairs", "0", "1", "--policies", "last",
               "--repair", "all", "--threads", "1", "--out", out, "--quiet")
    assert set(res["table"]) == {"all", "last", "all + repair"}
    cell = res["table"]["all"]["resnet20gn|zipit"]
    assert len(cell["per_pair"]) == 2 and cell["diff_vs_all"] == 0.0
    assert res["best_policy"] in ("all", "last")
    assert res["setting"]["archs"] == ["resnet20gn"]
    assert "| all + repair |" in Path(out + ".md").read_text()


def test_zipit_owner_smoke(tmp_path):
    out = str(tmp_path / "zo")
    res = _run("zipit_owner.py", "--smoke", "--archs", "vit", "--pairs", "0", "--threads", "1", "--out", out)
    assert {(s["alpha"], s["beta"]) for s in res["summary"]} == {(0.3, 0.125)}
    assert "owner=reference" in Path(out + ".md").read_text()


def test_refit_passes_smoke(tmp_path):
    out = str(tmp_path / "rp")
    res = _run("refit_passes.py", "--smoke", "--archs", "resnet20x1", "--pairs", "0", "--threads", "1",
               "--out", out)
    row = res["rows"][0]
    # the exact refit reads the data once, like the one-pass approximation; the waves once per layer depth
    assert row["sequential"]["passes"] == row["one_pass"]["passes"] < row["waves"]["passes"]
    assert row["sequential"]["data_reads"] == 1 < row["waves"]["data_reads"]
    assert row["max_rel_weight_diff"] <= 1e-6 and row["spill_bit_identical"]
    assert "one-pass joint" in Path(out + ".md").read_text()
