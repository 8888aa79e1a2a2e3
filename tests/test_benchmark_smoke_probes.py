"""CI smoke tests of benchmarks/probe_policy.py, zipit_owner.py and refit_passes.py (random-init models,
synthetic images): every code path, the JSON and the markdown."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import probe_policy  # noqa: E402
import zipit_owner  # noqa: E402


def test_probe_policy_smoke(tmp_path):
    out = tmp_path / "pp"
    res = probe_policy.main(["--smoke", "--archs", "resnet20gn", "--pairs", "0", "1", "--policies", "last",
                             "--repair", "all", "--threads", "1", "--out", str(out), "--quiet"])
    assert set(res["table"]) == {"all", "last", "all + repair"}
    cell = res["table"]["all"]["resnet20gn|zipit"]
    assert len(cell["per_pair"]) == 2 and cell["diff_vs_all"] == 0.0
    assert res["best_policy"] in ("all", "last")
    assert json.loads(Path(str(out) + ".json").read_text())["setting"]["archs"] == ["resnet20gn"]
    assert "| all + repair |" in Path(str(out) + ".md").read_text()


def test_zipit_owner_smoke(tmp_path):
    out = tmp_path / "zo"
    res = zipit_owner.main(["--smoke", "--archs", "vit", "--pairs", "0", "--threads", "1", "--out", str(out)])
    assert {(s["alpha"], s["beta"]) for s in res["summary"]} == {(0.3, 0.125)}
    assert "owner=first" in Path(str(out) + ".md").read_text()


def test_refit_passes_smoke(tmp_path):
    import refit_passes

    out = tmp_path / "rp"
    res = refit_passes.main(["--smoke", "--archs", "resnet20x1", "--pairs", "0", "--threads", "1",
                             "--out", str(out)])
    row = res["rows"][0]
    assert row["sequential"]["passes"] > row["one_pass"]["passes"] == 1
    assert "one-pass joint" in Path(str(out) + ".md").read_text()
