"""CI smoke test of benchmarks/eval_methods.py: random-init tiny models, synthetic images, every code path.

ResNet-20 GroupNorm and the ViT run every row (W.Avg, Permute, ZipIt, MuDSC-zip, MuDSC-permute,
data-free MuDSC, partial zips, Ensemble); the (width 0.25) MobileNetV2 runs the rows that only a
BatchNorm model has (data-free MuDSC + norm reset) plus the originals, W.Avg, a partial zip and the
ensemble, to keep the test short. Each runs as a user runs it: ``python benchmarks/eval_methods.py --smoke ...``.
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("timm")
pytest.importorskip("torchvision")

SCHEMA = {"method", "zipped", "macs_g", "joint", "joint_std", "task_a", "task_b", "avg", "avg_std"}


def _run(*args: str) -> None:
    proc = subprocess.run([sys.executable, "benchmarks/eval_methods.py", *args], capture_output=True, text=True,
                          cwd=str(ROOT), timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def _check(out: Path, expect: set[str]) -> dict:
    res = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".md").exists()
    s = res["setting"]
    for k in ("dataset", "model", "width", "loss", "pairs", "epochs", "calib_images", "device", "command",
              "base_model_min_task_acc"):
        assert k in s
    methods = {r["method"] for r in res["rows"]}
    assert expect <= methods, methods - expect
    for r in res["rows"]:
        assert SCHEMA <= set(r), r
        assert "errors" not in r, r["errors"]
        assert 0.0 <= r["joint"] <= 100.0 and not math.isnan(r["avg"])
        assert r["macs_g"] > 0
    return res


@pytest.mark.parametrize("arch,m,partial", [("resnet20gn", 20, "7"), ("vit", 10, "5")])
def test_all_rows(tmp_path, arch, m, partial):
    out = tmp_path / f"smoke_{arch}"
    _run("--arch", arch, "--smoke", "--partial", partial, "--out", str(out), "--quiet")
    res = _check(out, {"Model A", "Model B", "W.Avg", "Permute", f"ZipIt {m}/{m}", "MuDSC-zip", "MuDSC-permute",
                       "MuDSC data-free", "Permute + repair", "ZipIt + repair", f"ZipIt {partial}/{m}", "Ensemble"})
    by = {r["method"]: r for r in res["rows"]}
    # a partial zip and the ensemble cost more than the full zip; the full merges cost one model
    assert by["Ensemble"]["macs_g"] > by[f"ZipIt {partial}/{m}"]["macs_g"] >= by[f"ZipIt {m}/{m}"]["macs_g"]
    assert by["MuDSC-zip"]["macs_g"] == pytest.approx(by["Model A"]["macs_g"])
    assert "MuDSC data-free + reset" not in by  # no BatchNorm: no reset variant
    assert by["ZipIt + repair"]["per_pair"]  # repair rows (issue 11) run for norms without statistics


def test_batchnorm_rows(tmp_path):
    out = tmp_path / "smoke_mobilenetv2"
    _run("--arch", "mobilenetv2", "--smoke", "--partial", "48", "--out", str(out), "--quiet",
         "--rows", "Model A", "Model B", "W.Avg", "MuDSC data-free + reset", "partial", "Ensemble")
    _check(out, {"Model A", "Model B", "W.Avg", "MuDSC data-free + reset", "ZipIt 48/53", "Ensemble"})
