"""CI smoke test of benchmarks/width_sweep.py (random-init tiny ViT, synthetic images): the plain and
refit rows, the resumable cache, the JSON, the markdown and the plot."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import width_sweep  # noqa: E402


def test_width_sweep_smoke(tmp_path):
    out, cache = tmp_path / "ws", tmp_path / "cache.json"
    argv = ["--smoke", "--archs", "vit", "--pairs", "0", "--methods", "zipit", "permute", "--widths", "1.0", "1.4",
            "--refit-methods", "zipit", "--refit-widths", "1.2", "--threads", "1", "--cache", str(cache),
            "--out", str(out), "--quiet"]
    res = width_sweep.main(argv)
    s = res["summary"]["vit"]
    cells = {(c["curve"], c["merged_width"]): c for c in s["cells"]}
    assert set(cells) == {("ZipIt", 1.0), ("ZipIt", 1.4), ("Permute", 1.0), ("Permute", 1.4), ("ZipIt + refit", 1.2)}
    assert cells[("ZipIt", 1.0)]["macs_ratio"] == 1.0
    assert 1.0 < cells[("ZipIt + refit", 1.2)]["macs_ratio"] < cells[("ZipIt", 1.4)]["macs_ratio"] <= 2.0
    assert not s["missing"] and not s["errors"] and s["goal"]["best"]["macs_ratio"] <= 1.3
    rows = json.loads(Path(str(out) + ".json").read_text())["rows"]
    assert rows["vit|pair0|zipit|w1.2|refit1"]["refit"] is True and "vit|pair0|Ensemble" in rows
    md = Path(str(out) + ".md").read_text()
    assert "| ZipIt + refit | 1.2 |" in md and "| Ensemble |" in md and "Reading:" in md
    assert res["plot"] and Path(str(out) + ".png").stat().st_size > 0
    again = width_sweep.main(argv[:-1] + ["--quiet", "--refit-widths", "1.2", "1.3", "--only-cached"])  # resumes
    assert again["summary"]["vit"]["missing"] == ["vit|pair0|zipit|w1.3|refit1"]
    assert "ZipIt + refit merged_width 1.3: pairs 0 not run" in Path(str(out) + ".md").read_text()
