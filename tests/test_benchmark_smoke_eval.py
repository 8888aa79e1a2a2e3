"""Smoke test of benchmarks/eval_cifar.py: the whole pipeline (grid on a held-out pair,
every row of the table, JSON / Markdown / PNG outputs) on random-init ResNet-20x1
models and synthetic images. Needs no CIFAR-10 data and no checkpoints. Also builds the
models of benchmarks/train_cifar.py (--arch resnet20, resnet20gn, vit) and
benchmarks/finetune_mobilenet.py (random init, no weights file)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "eval_cifar.py"

SCHEMA_SETTING = {"dataset", "model", "width", "loss", "pairs", "epochs", "calib_images", "device", "command",
                  "base_model_min_task_acc"}
SCHEMA_ROW = {"method", "zipped", "macs_g", "joint", "joint_std", "task_a", "task_b", "avg", "avg_std"}
METHODS = ["Model A", "Model B", "W.Avg", "Permute", "ZipIt 20/20", "ZipIt 19/20", "ZipIt 13/20", "ZipIt 7/20",
           "Ensemble"]


def _load_script():
    spec = importlib.util.spec_from_file_location("eval_cifar_under_test", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_smoke") / "cifar10_smoke"
    mod = _load_script()
    result = mod.main(["--smoke", "--pairs", "0", "--holdout-pair", "1", "--out", str(out), "--quiet"])
    return out, result


def test_smoke_writes_schema(smoke_run):
    out, result = smoke_run
    data = json.loads(Path(str(out) + ".json").read_text())
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


def _load(name: str):
    bench = str(ROOT / "benchmarks")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    return importlib.import_module(name)


@pytest.mark.parametrize("arch", ["resnet20", "resnet20gn", "vit"])
def test_train_cifar_archs_build(arch):
    """Every --arch of train_cifar.py builds a 384-d CLIP-style model; the ViT stays CPU-sized."""
    import torch

    from fxzip.evaluate import count_macs

    tc = _load("train_cifar")
    model = tc.build_model(arch, 1, 384).eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 384)
    if arch == "vit":
        assert count_macs(model, torch.zeros(1, 3, 32, 32)) <= 30e6
    assert set(tc.RECIPES[arch]) >= {"optimizer", "lr", "weight_decay", "warmup"}


def test_finetune_mobilenet_model_and_preprocess():
    """The MobileNetV2 fine-tuning model takes 32 px CIFAR batches upsampled to 64 px, 384-d output."""
    import torch

    fm = _load("finetune_mobilenet")
    model = fm.build_model(384).eval()  # no weights: random init, nothing downloaded
    x = fm.preprocess(torch.zeros(2, 3, 32, 32), 64)
    assert x.shape == (2, 3, 64, 64)
    with torch.no_grad():
        assert model(x).shape == (2, 384)


def test_train_cifar_ce_head_is_a_five_way_classifier():
    """--head ce: an ordinary 5-way classifier whose outputs are the logits (no class vectors)."""
    import torch

    tc = _load("train_cifar")
    model = tc.build_model("resnet20", 1, tc.out_dim_of("ce", torch.zeros(10, 384))).eval()
    out = model(torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, 5) and torch.equal(tc.head_logits(out, torch.zeros(5, 384), "ce"), out.float())


def test_ce_heads_smoke_writes_partial_zips_beside_the_ensemble(tmp_path):
    """benchmarks/eval_cifar_ce.py: partial zips of models whose 5-way heads differ, never a full zip."""
    ce = _load("eval_cifar_ce")
    result = ce.main(["--smoke", "--pairs", "0", "--stop-at", "13", "--out", str(tmp_path / "ce"), "--quiet"])
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == ["ZipIt 13/20", "Permute 13/20", "Ensemble"]
    assert all(SCHEMA_ROW <= set(r) for r in rows.values())
    assert rows["ZipIt 13/20"]["macs_g"] < rows["Ensemble"]["macs_g"]
    assert json.loads((tmp_path / "ce.json").read_text())["setting"]["head"] == "ce"
    assert "| Ensemble | 0/20 |" in (tmp_path / "ce.md").read_text()
