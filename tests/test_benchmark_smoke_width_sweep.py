"""CI smoke test of benchmarks/width_sweep.py (random-init tiny ViT, synthetic images), run as a user runs it
(``python benchmarks/width_sweep.py --smoke ...``): the plain and refit rows, a partial zip with and without
refit, the resumable cache (seeded from a results JSON), the JSON, the markdown and the plot."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _sweep(argv: list[str]) -> dict:
    """Run the sweep with ``argv`` from the repository root; returns the JSON it wrote (--out)."""
    proc = subprocess.run([sys.executable, "benchmarks/width_sweep.py", *argv], capture_output=True, text=True,
                          cwd=str(ROOT), timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(Path(argv[argv.index("--out") + 1] + ".json").read_text())


def test_width_sweep_smoke(tmp_path):
    out, cache = str(tmp_path / "ws"), tmp_path / "cache.json"
    argv = ["--smoke", "--archs", "vit", "--pairs", "0", "--methods", "zipit", "permute", "--widths", "1.0", "1.4",
            "--stops", "5", "--refit-methods", "zipit", "--refit-widths", "1.2", "--refit-stops", "5",
            "--threads", "1", "--cache", str(cache), "--commit", "abc1234",
            "--out", out, "--quiet"]
    res = _sweep(argv)
    s = res["summary"]["vit"]
    cells = {(c["curve"], c["merged_width"]): c for c in s["cells"]}
    assert set(cells) == {("ZipIt", 1.0), ("ZipIt", 1.4), ("Permute", 1.0), ("Permute", 1.4), ("ZipIt + refit", 1.2),
                          ("ZipIt partial", 1.0), ("Permute partial", 1.0), ("ZipIt partial + refit", 1.0)}
    part = cells[("ZipIt partial + refit", 1.0)]
    assert part["stop_at"] == 5 and part["cut"]["k"] == 5 and part["refit_passes"] and part["commits"] == ["abc1234"]
    # the ViT's residual stream is a gather cut: with the refit the heads read it through least-squares maps,
    # whose C x C multiply-adds per token per head the MACs count
    assert 1.0 < cells[("ZipIt partial", 1.0)]["macs_ratio"] < part["macs_ratio"] < 2.0
    assert cells[("ZipIt", 1.0)]["macs_ratio"] == 1.0
    assert 1.0 < cells[("ZipIt + refit", 1.2)]["macs_ratio"] < cells[("ZipIt", 1.4)]["macs_ratio"] <= 2.0
    assert not s["missing"] and not s["errors"] and s["goal"]["best"]["macs_ratio"] <= 1.3
    rows = res["rows"]
    assert rows["vit|pair0|zipit|w1.2|refit1"]["refit"] is True and "vit|pair0|Ensemble" in rows
    md = Path(out + ".md").read_text()
    assert "| ZipIt + refit | 1.2 |" in md and "| Ensemble |" in md and "Reading:" in md
    assert "| ZipIt partial + refit | 5 | 5/10 |" in md and "abc1234: " in md
    assert Path(out + ".png").stat().st_size > 0
    again = _sweep(argv[:-1] + ["--quiet", "--refit-widths", "1.2", "1.3", "--only-cached"])  # resumes
    assert again["summary"]["vit"]["missing"] == ["vit|pair0|zipit|w1.3|refit1"]
    assert "ZipIt + refit merged_width 1.3: pairs 0 not run" in Path(out + ".md").read_text()
    # a results JSON seeds a new cache: no row is recomputed, each keeps its commit
    seeded = _sweep(argv[:argv.index("--cache")] + ["--cache", str(tmp_path / "new.json"), "--read-cache",
                                                    out + ".json", "--commit", "def5678",
                                                    "--out", str(tmp_path / "ws2"), "--quiet"])
    assert seeded["rows"]["vit|pair0|zipit|stop5|refit1"] == rows["vit|pair0|zipit|stop5|refit1"]
    assert {r["commit"] for r in seeded["rows"].values() if isinstance(r, dict)} == {"abc1234"}
