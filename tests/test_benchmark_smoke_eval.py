"""Smoke test of benchmarks/eval_cifar.py and eval_cifar_ce.py, run as a user runs them
(``python benchmarks/eval_cifar.py --smoke ...``): the whole pipeline (grid on a held-out pair, every row
of the table, JSON / Markdown / PNG outputs) on random-init ResNet-20x1 models and synthetic images. Needs
no CIFAR-10 data and no checkpoints. Also builds the models that benchmarks/train_cifar.py trains (--arch
resnet20, resnet20gn, vit: fxzip.zoo models with a 384-d output)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCHEMA_SETTING = {"dataset", "model", "width", "loss", "pairs", "epochs", "calib_images", "device", "command",
                  "base_model_min_task_acc"}
SCHEMA_ROW = {"method", "zipped", "macs_g", "joint", "joint_std", "task_a", "task_b", "avg", "avg_std"}
METHODS = ["Model A", "Model B", "W.Avg", "Permute", "ZipIt 20/20", "ZipIt 19/20", "ZipIt 13/20", "ZipIt 7/20",
           "Ensemble"]


def _run(script: str, *args: str) -> None:
    proc = subprocess.run([sys.executable, f"benchmarks/{script}", *args], capture_output=True, text=True,
                          cwd=str(ROOT), timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_smoke") / "cifar10_smoke"
    _run("eval_cifar.py", "--smoke", "--pairs", "0", "--holdout-pair", "1", "--out", str(out), "--quiet")
    return out, json.loads(Path(str(out) + ".json").read_text())


def test_smoke_writes_schema(smoke_run):
    out, data = smoke_run
    assert SCHEMA_SETTING <= set(data["setting"])
    assert data["setting"]["smoke"] is True
    assert data["setting"]["pairs"] == [0]
    assert [r["method"] for r in data["rows"]] == METHODS
    for r in data["rows"]:
        assert SCHEMA_ROW <= set(r)
        for col in ("joint", "task_a", "task_b", "avg"):
            assert 0.0 <= r[col] <= 100.0
        assert set(r["per_pair"]) == {"0"}
    assert data["grid"]["pair"] == 1 and data["grid"]["results"]
    assert data["setting"]["alpha"] == data["grid"]["alpha"]
    md = Path(str(out) + ".md").read_text()
    assert "SMOKE" in md and "| Ensemble |" in md and "Verdict" in md
    if importlib.util.find_spec("matplotlib") is not None:
        assert Path(str(out) + ".png").stat().st_size > 0


def test_smoke_costs_are_consistent(smoke_run):
    _, result = smoke_run
    macs = {r["method"]: r["macs_g"] for r in result["rows"]}
    single = macs["Model A"]
    assert macs["Model B"] == pytest.approx(single)
    assert macs["ZipIt 20/20"] == pytest.approx(single)
    assert macs["W.Avg"] == pytest.approx(single)
    assert macs["Ensemble"] == pytest.approx(2 * single)
    # partial zips cost between one model and the ensemble, more the earlier they cut
    assert single <= macs["ZipIt 19/20"] < macs["ZipIt 13/20"] < macs["ZipIt 7/20"] < macs["Ensemble"]


@pytest.mark.parametrize("arch", ["resnet20", "resnet20gn", "vit"])
def test_train_cifar_archs_build(arch):
    """Every --arch of train_cifar.py (``build_model``: the fxzip.zoo model below) is a 384-d CLIP-style
    model; the ViT stays CPU-sized."""
    import torch

    from fxzip.evaluate import count_macs
    from fxzip.zoo import cifar_vit, resnet20

    model = {"resnet20": lambda: resnet20(width=1, out_dim=384),
             "resnet20gn": lambda: resnet20(width=1, out_dim=384, norm="group"),
             "vit": lambda: cifar_vit(width=1, out_dim=384)}[arch]().eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 384)
    if arch == "vit":
        assert count_macs(model, torch.zeros(1, 3, 32, 32)) <= 30e6


def test_ce_heads_smoke_writes_partial_zips_beside_the_ensemble(tmp_path):
    """benchmarks/eval_cifar_ce.py: partial zips of models whose 5-way heads differ, never a full zip."""
    _run("eval_cifar_ce.py", "--smoke", "--pairs", "0", "--stop-at", "13", "--out", str(tmp_path / "ce"), "--quiet")
    result = json.loads((tmp_path / "ce.json").read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == ["ZipIt 13/20", "Permute 13/20", "Ensemble"]
    assert all(SCHEMA_ROW <= set(r) for r in rows.values())
    assert rows["ZipIt 13/20"]["macs_g"] < rows["Ensemble"]["macs_g"]
    assert result["setting"]["head"] == "ce"
    assert "| Ensemble | 0/20 |" in (tmp_path / "ce.md").read_text()
