"""The command line end to end: ``fxzip merge`` on checkpoints and an image folder
written here, ``fxzip inspect``, and the errors that must come before any work.

Two timm resnet18 checkpoints with random weights re-drawn at O(1) scale (a
fresh timm model hides wrong folds: zero-initialised last norms), 32 images of
40 px merged at 32 px.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import batches, max_rel_diff, prepared

import fxzip
from fxzip.cli import main

timm = pytest.importorskip("timm")
Image = pytest.importorskip("PIL.Image")

SIZE = 32
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for these small convs


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data = batches((8, 3, SIZE, SIZE), 2)
    a = prepared(timm.create_model("resnet18", num_classes=10), data, 0)
    b = prepared(timm.create_model("resnet18", num_classes=10), data, 1)
    torch.save({"state_dict": a.state_dict(), "epoch": 3}, root / "a.pth")  # a training checkpoint
    torch.save(a.state_dict(), root / "a_copy.pt")  # a plain state_dict
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in b.state_dict().items()}, str(root / "b.safetensors"))
    rng = np.random.default_rng(0)
    for i in range(32):  # ImageFolder layout, two classes (labels are ignored)
        folder = root / "images" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return root, a, b


def fxzip_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "fxzip", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def calibration_loader(model, root: Path):
    """The CLI's preprocessing, written out with torchvision and timm."""
    from timm.data import create_transform, resolve_data_config
    from torchvision.datasets import ImageFolder

    config = resolve_data_config({"input_size": (3, SIZE, SIZE)}, model=model)
    dataset = ImageFolder(str(root / "images"), transform=create_transform(**config, is_training=False))
    return torch.utils.data.DataLoader(dataset, batch_size=8)


def test_self_merge_without_bn_reset_is_the_original(files):
    root, a, _ = files
    proc = fxzip_cli("merge", "a.pth", "a_copy.pt", "--model", "resnet18", "--data", "images", "--out", "self",
                     "--img-size", str(SIZE), "--batch-size", "8", "--no-reset-bn", cwd=root)
    assert "'state_dict' entry" in proc.stderr  # says which entry of the training checkpoint it used
    assert sorted(p.name for p in (root / "self").iterdir()) == [
        "correlation.png", "cuts.png", "model.safetensors", "report.json", "report.md"]
    plain = timm.create_model("resnet18", num_classes=10,
                              checkpoint_path=str(root / "self" / "model.safetensors")).eval()
    x = torch.randn(4, 3, SIZE, SIZE)
    with torch.no_grad():
        assert max_rel_diff(a(x), plain(x)) < 1e-5


def test_merge_saves_what_python_merge_returns(files):
    root, a, b = files
    fxzip_cli("merge", "a.pth", "b.safetensors", "--model", "resnet18", "--data", "images", "--out", "ab",
              "--img-size", str(SIZE), "--batch-size", "8", "--quiet", cwd=root)
    merged = fxzip.merge(a, b, data=calibration_loader(a, root), progress=False)
    from safetensors.torch import load_file

    saved = load_file(str(root / "ab" / "model.safetensors"))
    want = merged.state_dict()
    assert set(saved) == set(want)
    for key, tensor in want.items():
        err = (saved[key].double() - tensor.double()).abs().max() / tensor.double().abs().max().clamp_min(1e-12)
        assert err <= 1e-6, f"{key}: relative difference {float(err):.3g}"
    report = json.loads((root / "ab" / "report.json").read_text(), parse_constant=lambda c: 1 / 0)
    rows = merged.meta["fxzip"].to_dict()["spaces"]
    assert len(report["spaces"]) == len(rows)
    for got, expected in zip(report["spaces"], rows):
        corr, corr_want = got.pop("mean_corr"), expected.pop("mean_corr")
        assert got == expected
        assert (corr is None and corr_want is None) or abs(corr - corr_want) <= 1e-6
    assert report["assignment"] == merged.meta["fxzip"].to_dict()["assignment"]  # every unit's merged unit
    assert report["settings"]["alpha"] == 0.3 and report["settings"]["checkpoints"] == ["a.pth", "b.safetensors"]
    assert report["calibration"] == {"batches": 4, "samples": 32}


BLOCKED = """\
import sys
import torch
try:
    import fxzip
except ImportError:
    pass
else:
    raise SystemExit("fxzip was importable")
program = torch.export.load(sys.argv[1]).module()
x = torch.load(sys.argv[2])
torch.save(tuple(program(x)), sys.argv[3])
"""


def test_partial_zip_program_runs_without_fxzip(files, tmp_path):
    root, a, _ = files
    assert main(["merge", str(root / "a.pth"), str(root / "a_copy.pt"), "--model", "resnet18",
                 "--data", str(root / "images"), "--out", str(tmp_path / "partial"), "--img-size", str(SIZE),
                 "--batch-size", "8", "--stop-at", "9", "--no-reset-bn", "--quiet"]) == 0
    assert sorted(p.name for p in (tmp_path / "partial").iterdir()) == [
        "correlation.png", "cuts.png", "model.pt2", "report.json", "report.md"]
    blocker = tmp_path / "blocker" / "fxzip"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('fxzip is not installed here')\n")
    (tmp_path / "run.py").write_text(BLOCKED)
    x = torch.randn(5, 3, SIZE, SIZE)  # exported with a batch of 2
    torch.save(x, tmp_path / "x.pt")
    env = {**ENV, "PYTHONPATH": str(tmp_path / "blocker")}
    proc = subprocess.run([sys.executable, str(tmp_path / "run.py"), str(tmp_path / "partial" / "model.pt2"),
                           str(tmp_path / "x.pt"), str(tmp_path / "y.pt")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    heads = [h.detach() for h in torch.load(tmp_path / "y.pt")]
    with torch.no_grad():
        want = a(x)
    assert len(heads) == 2 and all(max_rel_diff(want, h) < 1e-5 for h in heads)
    report = json.loads((tmp_path / "partial" / "report.json").read_text())
    assert report["zip"] == "partial" and report["cut"]["k"] == 9 and report["export"]["dynamic_batch"]


def test_checkpoints_with_different_classifiers_give_a_partial_zip(files, tmp_path, capsys):
    root, a, _ = files
    five = prepared(timm.create_model("resnet18", num_classes=5), batches((8, 3, SIZE, SIZE), 2), 2)
    torch.save(five.state_dict(), tmp_path / "five.pth")
    assert main(["merge", str(root / "a.pth"), str(tmp_path / "five.pth"), "--model", "resnet18",
                 "--data", str(root / "images"), "--out", str(tmp_path / "out"), "--img-size", str(SIZE),
                 "--batch-size", "16", "--max-batches", "1"]) == 0
    out = capsys.readouterr()
    assert "5 classes (the size of its fc.weight" in out.err and "model.pt2" in out.out
    program = torch.export.load(str(tmp_path / "out" / "model.pt2")).module()
    ya, yb = program(torch.randn(3, 3, SIZE, SIZE))
    assert ya.shape == (3, 10) and yb.shape == (3, 5)
    assert json.loads((tmp_path / "out" / "report.json").read_text())["settings"]["num_classes"] == [10, 5]


def test_inspect_lists_the_cut_points_of_fxzip_cut_points(capsys):
    assert main(["inspect", "--model", "resnet18", "--img-size", str(SIZE), "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    ks = [c["k"] for c in found["cuts"]]
    model = timm.create_model("resnet18")
    assert ks == [c.k for c in fxzip.cut_points(model, torch.randn(2, 3, SIZE, SIZE))]
    assert ks == [0, 1, 3, 5, 7, 9, 11, 13, 15, 17, 18]
    assert all(c["trunk_macs"] + c["head_macs"] == found["macs"] for c in found["cuts"])
    stream = found["spaces"][0]
    assert stream["size"] == 64 and stream["mergeable"] and "layer1.0.conv2" in stream["producers"]
    assert found["spaces"][-1]["fixed"] == "model output"
    assert main(["inspect", "--model", "resnet18", "--img-size", str(SIZE)]) == 0
    text = capsys.readouterr().out
    assert "cut points" in text and "layer2_1_act2" in text


def test_inspect_names_the_node_fxzip_cannot_merge(tmp_path, monkeypatch, capsys):
    (tmp_path / "rolled.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Rolled(nn.Module):
            def __init__(self):
                super().__init__()
                self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3)

            def forward(self, x):
                return self.b(torch.roll(self.a(x), 1, dims=1))  # rolls channels: no rule for that

        def make(num_classes=4):
            return Rolled()
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["inspect", "--model", "rolled:make", "--img-size", "16"]) == 1
    out = capsys.readouterr().out
    assert "fxzip cannot merge this model" in out and "roll" in out


@pytest.mark.parametrize("args, message", [
    (["only.pth"], "at least two checkpoints"),
    (["a.pth", "missing.pth"], "missing.pth: no such file"),
    (["a.pth", "images"], "no such file"),
    (["a.pth", "a_copy.pt", "--num-classes", "10", "10", "10"], "one value for all 2 checkpoints or one per"),
    (["a.pth", "a_copy.pt", "--method", "zipper"], "choose one of"),
    (["a.pth", "a_copy.pt", "--alpha", "2"], "--alpha must be in [0, 1]"),
    (["a.pth", "a_copy.pt", "--data", "nowhere"], "--data nowhere: no such file or directory"),
    (["a.pth", "a_copy.pt", "--model", "resnet_18"], "is not a timm model name"),
    (["a.pth", "a_copy.pt", "--model", "nomodule_xyz:make"], "cannot import module"),
    (["a.pth", "a_copy.pt", "--out", "a.pth"], "exists and is not a directory"),
    (["a.pth", "a_copy.pt", "--batch-size", "0"], "--batch-size must be at least 1"),
])
def test_merge_refuses_bad_arguments_before_any_work(files, monkeypatch, capsys, args, message):
    root, _, _ = files
    monkeypatch.chdir(root)
    defaults = {"--model": "resnet18", "--data": "images", "--out": "never"}
    for key, value in defaults.items():
        if key not in args:
            args = args + [key, value]
    assert main(["merge", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (root / "never").exists()


def test_merge_says_when_a_checkpoint_does_not_fit(files, tmp_path, capsys):
    root, _, _ = files
    assert main(["merge", str(root / "a.pth"), str(root / "a_copy.pt"), "--model", "resnet34", "--data",
                 str(root / "images"), "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert "does not fit the model" in capsys.readouterr().err


def test_sweep_calibrates_once_and_scores_every_merge(files, tmp_path, capsys):
    root, a, _ = files
    rng = np.random.default_rng(2)
    for task in ("evalA", "evalB"):
        for i in range(12):
            folder = tmp_path / task / f"c{i % 3}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    assert main(["sweep", str(root / "a.pth"), str(root / "a_copy.pt"), "--model", "resnet18",
                 "--data", str(root / "images"), "--eval", str(tmp_path / "evalA"), str(tmp_path / "evalB"),
                 "--img-size", str(SIZE), "--batch-size", "16", "--methods", "zipit", "weight_average",
                 "--stop-at", "9", "full", "--no-reset-bn", "--out", str(tmp_path / "sweep"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "layer2_1_act2" in out and "* best average" in out
    result = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    rows = result["rows"]
    assert [(r["method"], r["k"]) for r in rows] == [("original", 0), ("zipit", 9), ("zipit", 18),
                                                     ("weight_average", 9), ("weight_average", 18)]
    # the reference, computed here: model a on the first 3 logits of each folder's labels
    from timm.data import create_transform, resolve_data_config
    from torchvision.datasets import ImageFolder

    config = resolve_data_config({"input_size": (3, SIZE, SIZE)}, model=a)
    want = []
    for task in ("evalA", "evalB"):
        dataset = ImageFolder(str(tmp_path / task), transform=create_transform(**config, is_training=False))
        x = torch.stack([x for x, _ in dataset])
        y = torch.tensor([y for _, y in dataset])
        with torch.no_grad():
            want.append(float((a(x)[:, :3].argmax(1) == y).float().mean()))
    assert rows[0]["accuracy"] == pytest.approx(want)
    # a checkpoint merged with its copy, norms kept: every merge is the original function
    assert all(r["accuracy"] == pytest.approx(want) for r in rows)
    assert (tmp_path / "sweep" / "sweep.csv").read_text().count("\n") == 6


def test_sweep_wants_one_eval_folder_per_checkpoint(files, capsys, monkeypatch):
    root, _, _ = files
    monkeypatch.chdir(root)
    assert main(["sweep", "a.pth", "a_copy.pt", "--model", "resnet18", "--data", "images",
                 "--eval", "images"]) == 2
    assert "one labelled folder per checkpoint (2), got 1" in capsys.readouterr().err
    assert main(["sweep", "a.pth", "a_copy.pt", "--model", "resnet18", "--data", "images", "--eval", "images",
                 "images", "--stop-at", "nowhere", "--img-size", str(SIZE)]) == 2
    assert "is not a cut point" in capsys.readouterr().err


def test_inspect_a_checkpoint_reads_its_classifier(files, capsys):
    root, _, _ = files
    assert main(["inspect", "--model", "resnet18", "--img-size", str(SIZE), "--checkpoint", str(root / "a.pth"),
                 "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["spaces"][-1]["size"] == 10 and found["spaces"][-1]["label"] == "output (fc)"
    assert main(["inspect", "--model", "resnet34", "--checkpoint", str(root / "a.pth")]) == 2
    assert "does not fit the model" in capsys.readouterr().err


def test_merge_a_model_from_a_factory_and_tensor_data(tmp_path, monkeypatch, capsys):
    (tmp_path / "mynets.py").write_text(textwrap.dedent("""
        from fxzip.zoo import small_cnn

        def make(num_classes=10):
            return small_cnn(out_dim=num_classes, in_channels=3, width=8)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    data = batches((8, 3, 16, 16), 2)
    sys.modules.pop("mynets", None)  # another test's mynets may be cached in this worker
    import mynets

    monkeypatch.setitem(sys.modules, "mynets", mynets)  # and this one is gone after the test

    models = [prepared(mynets.make(num_classes=4), data, seed) for seed in (0, 1)]
    for seed, model in enumerate(models):
        torch.save(model.state_dict(), tmp_path / f"m{seed}.pt")
    torch.save(torch.cat(data), tmp_path / "x.pt")  # float tensors: model inputs as they are
    assert main(["merge", "m0.pt", "m1.pt", "--model", "mynets:make", "--num-classes", "4", "--data", "x.pt",
                 "--out", "out", "--batch-size", "8", "--quiet"]) == 0
    assert "model.safetensors" in capsys.readouterr().out
    with pytest.raises(ValueError, match="never imports or calls code named in a result folder"):
        fxzip.load(tmp_path / "out")  # the recorded factory is code: a folder from elsewhere could name any
    loaded = fxzip.load(tmp_path / "out", model="mynets:make")  # the caller's own code, the record's numbers
    merged = fxzip.merge(*models, data=torch.split(torch.cat(data), 8), progress=False)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert max_rel_diff(merged(x), loaded(x)) < 1e-5
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["model"] == {"name": "mynets:make", "num_classes": 4, "img_size": None, "kwargs": {},
                               "library": None}
    assert report["calibration"] == {"batches": 2, "samples": 16}


def test_sweep_runs_each_distinct_merge_once():
    """``--stop-at all``: nothing zipped (k = 0) is one ensemble row whatever the
    method, and the cut that zips every layer is the full zip, run once; ``*``
    marks the best merge at each depth, never the unmerged models."""
    from fxzip.cli.sweep import ENSEMBLE, SweepRow, best_per_depth, distinct_merges, expand_stops, grid
    from fxzip.cuts import INPUT, CutPoint

    cuts = [CutPoint(INPUT, 0, 4, None, None, False), CutPoint("mid", 2, 4, 0, 1, False),
            CutPoint("fc", 4, 4, 1, 1, False)]
    points = grid(["zipit", "permute"], [0.3, 0.5], [0.125])
    merges = distinct_merges(points, expand_stops(["all"], cuts), cuts)
    assert merges == [(points[0], INPUT), (points[0], "mid"), (points[0], None), (points[1], "mid"),
                      (points[1], None), (points[2], "mid"), (points[2], None)]
    assert distinct_merges(points[:1], ["fc"], cuts) == [(points[0], "fc")]  # alone, the k = m cut runs
    rows = [SweepRow("original", None, None, None, "original", 0, 4, [1.0, 1.0]),
            SweepRow(ENSEMBLE, None, None, INPUT, INPUT, 0, 4, [1.0, 1.0]),
            SweepRow("zipit", 0.3, 0.125, "mid", "mid", 2, 4, [0.8, 0.9]),
            SweepRow("permute", None, None, "mid", "mid", 2, 4, [0.9, 0.9]),
            SweepRow("permute", None, None, None, "full", 4, 4, [0.5, 0.6])]
    assert best_per_depth(rows) == [rows[3], rows[4]]
