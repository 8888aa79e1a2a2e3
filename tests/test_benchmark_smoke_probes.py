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


def test_probe_decision_pairs_cells_and_switches_only_beyond_two_standard_errors(tmp_path):
    """probe_decision.py on the real output of probe_policy.py --smoke --zipit (two settings) and a parity
    result made by hand: every (arch, method, pair) cell is paired with 'all', the parity cells add to
    'reference' only, W.Avg is left out; the default moves only for a mean beyond two standard errors."""
    pp = str(tmp_path / "pp")
    _run("probe_policy.py", "--smoke", "--archs", "resnet20x1", "--pairs", "0", "1", "--policies", "reference",
         "--zipit", "0.3/0.125", "1/1", "--threads", "1", "--out", pp, "--quiet")

    def rows(**joint):
        return {"rows": [{"method": m, "joint": j, "probes": p} for m, (j, p) in joint.items()]}

    parity = {"command": "x", "per_cell": {
        f"p{i}_w1_d0": {"fxzip_reference": rows(**{"W.Avg": (10.0, "reference"), "ZipIt": (20.0 + i, "reference")}),
                        "fxzip_default": rows(**{"W.Avg": (50.0, "all"), "ZipIt": (18.0 + i, "all")})}
        for i in range(3)}}
    (tmp_path / "parity.json").write_text(json.dumps(parity))
    out = str(tmp_path / "decision")
    res = _run("probe_decision.py", "--policy-json", pp + ".json", "--parity-json", str(tmp_path / "parity.json"),
               "--out", out)
    (row,) = res["table"]
    assert row["policy"] == "reference"
    assert row["cifar_tables"]["n"] == 2 * 3  # pairs x (permute, two zipit settings)
    assert row["reference_pairs"] == {"mean": 2.0, "se": 0.0, "n": 3}  # W.Avg's +40 is not a cell
    policy = json.loads(Path(pp + ".json").read_text())["rows"]
    diffs = [policy[f"resnet20x1|pair{p}|reference|{m}"]["joint"] - policy[f"resnet20x1|pair{p}|all|{m}"]["joint"]
             for p in (0, 1) for m in ("permute", "zipit a0.3 b0.125", "zipit")] + [2.0] * 3
    mean = sum(diffs) / len(diffs)
    assert abs(row["pooled"]["mean"] - mean) < 1e-9 and row["pooled"]["n"] == 9
    se = row["pooled"]["se"]
    assert res["switch"] == (mean > 2 * se > 0) and res["default"] == ("reference" if res["switch"] else "all")
    assert "Decision: the default is" in Path(out + ".md").read_text()


def test_mudsc_objective_smoke(tmp_path):
    """Both rules on every pair and setting, paired in the summary; the rule reached the merge (its
    sweep counts are recorded per row)."""
    out = str(tmp_path / "mo")
    res = _run("mudsc_objective.py", "--smoke", "--archs", "resnet20gn", "--pairs", "0", "1", "--threads", "1",
               "--out", out)
    assert {(r["alpha"], r["beta"]) for r in res["summary"]} == {(0.5, 1.0), (0.3, 0.125)}
    assert all(r["n"] == 2 for r in res["summary"]) and res["pooled"]["n"] == 4
    rows = res["rows"]
    assert len(rows) == 8 and all(r["best_sweep"] <= r["sweeps"] for r in rows.values())
    assert "merge_value (reference)" in Path(out + ".md").read_text()
