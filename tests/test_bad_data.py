"""Bad data (issue 21): every input below ends in a result or in one line that
names the problem and the fix.

* image files that cannot be decoded (a truncated JPEG, a text file named
  ``x.jpg``): skipped with a warning naming each, counted in the report;
  ``--strict-data`` fails on the first one instead;
* a truncated ``.tar.gz`` for ``--data``;
* a batch of one sample at a norm that then sees one value per channel (a
  ``BatchNorm1d`` on pooled features, a 1x1 map): joined with its neighbour
  batch, the statistics those of the joined batches;
* NaN / Inf in a weight, a norm's statistics or an input batch (a mask buffer
  of -Inf is fine);
* a full zip that averages the models' output layers: the report, ``fxzip
  merge`` and ``fxzip sweep`` say so and name the partial zip to use;
* ``--crop-pct`` / ``--crop-mode`` / ``--interpolation``;
* the batch of one and a NaN batch under torch.distributed (two gloo ranks).

Real models (a small CNN with a BatchNorm1d after global pooling, fxzip.zoo's
small_cnn, timm's resnet18 at 32 px), real files written here, the command
line through ``fxzip.cli.main``.
"""
from __future__ import annotations

import copy
import json
import tarfile
import textwrap
import time
import warnings

import numpy as np
import pytest
import torch
from helpers import assert_same_function, batches, prepared
from torch import nn

import fxzip
from fxzip import zoo
from fxzip.cli import main
from fxzip.cli.images import DataSource, check_data_path, data_config, open_data
from fxzip.report import OUTPUTS_AVERAGED

timm = pytest.importorskip("timm")
Image = pytest.importorskip("PIL.Image")

SIZE = 16

NETS = textwrap.dedent('''
    import torch
    from torch import nn


    class PooledBN(nn.Module):
        """conv-BN-ReLU, global average pooling, Linear-BatchNorm1d-ReLU, Linear: the
        BatchNorm1d sees one value per channel in a batch of one sample."""

        def __init__(self, num_classes=4, width=8):
            super().__init__()
            self.conv = nn.Conv2d(3, width, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(width)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc1 = nn.Linear(width, 2 * width, bias=False)
            self.bn1 = nn.BatchNorm1d(2 * width)
            self.fc = nn.Linear(2 * width, num_classes)

        def forward(self, x):
            h = torch.relu(self.bn(self.conv(x)))
            h = torch.relu(self.bn1(self.fc1(self.pool(h).flatten(1))))
            return self.fc(h)


    def make(num_classes=4):
        return PooledBN(num_classes)
''')


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for these small convs


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """The module ``bad_data_nets`` (importable: the CLI builds ``bad_data_nets:make``)."""
    import importlib
    import sys

    root = tmp_path_factory.mktemp("nets")
    (root / "bad_data_nets.py").write_text(NETS)
    sys.path.insert(0, str(root))
    try:
        yield importlib.import_module("bad_data_nets")
    finally:
        sys.path.remove(str(root))
        sys.modules.pop("bad_data_nets", None)


def _image(path, seed: int, size: int = 20) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


def _truncated_jpeg(path, seed: int) -> None:
    """A JPEG cut in half: ``Image.open`` reads its header, decoding fails."""
    _image(path, seed)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


@pytest.fixture(scope="module")
def files(tmp_path_factory, nets):
    """Two checkpoints of PooledBN, and a folder of 9 images of which two cannot
    be decoded (7 readable: with --batch-size 2 the last batch holds one sample)."""
    root = tmp_path_factory.mktemp("bad_data")
    data = batches((8, 3, SIZE, SIZE), 2)
    for k in range(2):
        torch.manual_seed(k)
        torch.save(prepared(nets.make(), data, seed=k).state_dict(), root / f"m{k}.pt")
    for i in range(9):
        _image(root / "images" / f"c{i % 2}" / f"{i}.jpg", i)
    _truncated_jpeg(root / "images" / "c0" / "2.jpg", 2)
    (root / "images" / "c1" / "5.jpg").write_text("not an image, whatever the suffix says")
    return root


def _cli(root, *args: str, data=None) -> list[str]:
    return ["merge", str(root / "m0.pt"), str(root / "m1.pt"), "--model", "bad_data_nets:make", "--num-classes",
            "4", "--data", str(data or root / "images"), "--img-size", str(SIZE), "--batch-size", "2", "--quiet",
            *args]


def _one_line_error(capsys, *parts: str) -> str:
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if ": error: " in x]
    assert len(line) == 1 and "Traceback" not in err, err
    for part in parts:
        assert part in line[0], line[0]
    return line[0]


# ----------------------------------------------------------------------------- image files


def test_unreadable_images_are_skipped_with_a_warning_naming_each(files):
    """The readable images come out exactly as ImageFolder + timm's transform give
    them, in order; each unreadable file is warned about once (not once per pass)."""
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder

    model = timm.create_model("resnet18")
    config = data_config(model, SIZE)
    bad = {str(files / "images" / "c0" / "2.jpg"), str(files / "images" / "c1" / "5.jpg")}
    reference = ImageFolder(str(files / "images"), transform=create_transform(**config, is_training=False),
                            is_valid_file=lambda p: p not in bad)
    want = torch.stack([x for x, _ in reference])
    with pytest.warns(UserWarning) as caught:
        with open_data(files / "images", model, SIZE, batch_size=3) as source:
            first = list(source.loader())
            second = list(source.loader())
    messages = [str(w.message) for w in caught if "cannot be decoded" in str(w.message)]
    assert len(messages) == 2
    assert any("c0/2.jpg" in m and "OSError" in m for m in messages)  # truncated: fails at decode, not open
    assert any("c1/5.jpg" in m and "UnidentifiedImageError" in m for m in messages)
    assert [len(b) for b in first] == [2, 3, 2]  # batches of 3 files, the unreadable ones left out
    assert torch.equal(torch.cat(first), want) and torch.equal(torch.cat(second), want)
    assert source.skipped_summary()["skipped_files"] == 2
    assert set(source.skipped) == bad


def test_a_batch_of_only_unreadable_files_is_skipped_and_none_readable_is_an_error(tmp_path):
    model = timm.create_model("resnet18")
    for i in range(4):
        _image(tmp_path / "mixed" / f"{i}.png", i)
    for i in range(4, 6):
        (tmp_path / "mixed" / f"{i}.jpg").write_bytes(b"\x00" * 64)
    with pytest.warns(UserWarning, match="cannot be decoded"):
        got = list(open_data(tmp_path / "mixed", model, SIZE, batch_size=2).loader())
    assert [len(b) for b in got] == [2, 2]  # 0.png 1.png | 2.png 3.png | (4.jpg 5.jpg: skipped)
    for i in range(3):
        (tmp_path / "none" / f"{i}.jpg").parent.mkdir(exist_ok=True)
        (tmp_path / "none" / f"{i}.jpg").write_text("text")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="none of its images could be decoded"):
        list(open_data(tmp_path / "none", model, SIZE, batch_size=2).loader())


def test_many_unreadable_files_warn_a_few_times_then_once(tmp_path):
    model = timm.create_model("resnet18")
    _image(tmp_path / "many" / "00.png", 0)
    for i in range(1, 10):
        (tmp_path / "many" / f"{i:02d}.jpg").write_text("text")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        source = open_data(tmp_path / "many", model, SIZE, batch_size=4)
        assert sum(len(b) for b in source.loader()) == 1
    assert len(caught) == 6 and "more than 5 files are skipped" in str(caught[-1].message)
    assert source.skipped_summary()["skipped_files"] == 9
    assert len(source.skipped_summary()["skipped_examples"]) == 5


def test_strict_data_fails_on_the_first_unreadable_file(files):
    model = timm.create_model("resnet18")
    source = open_data(files / "images", model, SIZE, batch_size=4, strict=True)
    with pytest.raises(ValueError, match=r"c0/2\.jpg cannot be decoded as an image .*--strict-data"):
        list(source.loader())


def test_merge_skips_unreadable_files_and_reports_the_count(files, tmp_path, capsys):
    """9 files, 2 unreadable, batches of 2: three batches hold one readable image,
    which reaches the BatchNorm1d after pooling alone: the merge succeeds."""
    with pytest.warns(UserWarning, match="cannot be decoded"):
        assert main(_cli(files, "--out", str(tmp_path / "out"))) == 0
    err = capsys.readouterr().err
    assert "2 files of --data could not be decoded and were skipped" in err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["settings"]["skipped_files"] == 2 and report["settings"]["strict_data"] is False
    assert any("2.jpg (OSError" in e for e in report["settings"]["skipped_examples"])
    assert report["calibration"]["samples"] == 7
    assert "skipped_files | 2" in (tmp_path / "out" / "report.md").read_text()


def test_merge_strict_data_is_a_one_line_error_naming_the_file(files, tmp_path, capsys):
    assert main(_cli(files, "--out", str(tmp_path / "out"), "--strict-data")) == 2
    _one_line_error(capsys, "2.jpg cannot be decoded as an image", "Truncated", "remove or replace the file",
                    "--strict-data")


# ----------------------------------------------------------------------------- archives


def test_truncated_archive_is_a_one_line_error(files, tmp_path, capsys):
    with tarfile.open(tmp_path / "calib.tar.gz", "w:gz") as tar:
        tar.add(files / "images", arcname="images")
    whole = (tmp_path / "calib.tar.gz").read_bytes()
    (tmp_path / "half.tar.gz").write_bytes(whole[:len(whole) // 2])
    (tmp_path / "head.tar.gz").write_bytes(whole[:20])
    with pytest.raises(ValueError, match=r"head\.tar\.gz: the archive is truncated or corrupt .*re-create it"):
        check_data_path(tmp_path / "head.tar.gz")  # caught by the early check
    assert check_data_path(tmp_path / "half.tar.gz") == "archive"  # its first header reads: found on extraction
    model = timm.create_model("resnet18")
    with pytest.raises(ValueError, match=r"half\.tar\.gz: the archive is truncated or corrupt \(EOFError"):
        open_data(tmp_path / "half.tar.gz", model, SIZE)
    for name in ("head.tar.gz", "half.tar.gz"):
        assert main(_cli(files, "--out", str(tmp_path / "never"), data=tmp_path / name)) == 2
        _one_line_error(capsys, name, "truncated or corrupt", "re-create it")
    assert not (tmp_path / "never").exists()
    # names in an archive are reported as archive:member
    with pytest.warns(UserWarning) as caught:
        with open_data(tmp_path / "calib.tar.gz", model, SIZE, batch_size=4) as source:
            assert sum(len(b) for b in source.loader()) == 7
    assert sorted(source.skipped) == [f"{tmp_path / 'calib.tar.gz'}:images/c0/2.jpg",
                                      f"{tmp_path / 'calib.tar.gz'}:images/c1/5.jpg"]
    assert all("fxzip-data-" not in str(w.message) for w in caught)  # no temporary path


# ----------------------------------------------------------------------------- one value per channel


def _reference_stats(model: nn.Module, data: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """nn.BatchNorm's own cumulative average (train mode, momentum=None) in float64."""
    ref = copy.deepcopy(model).double()
    for m in ref.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
            m.train()
    with torch.no_grad():
        for x in data:
            ref(x.double())
    return {k: v for k, v in ref.state_dict().items() if "running" in k}


def _running(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k}


def test_last_batch_of_one_is_joined_with_the_batch_before(nets):
    model = prepared(nets.make(), batches((8, 3, SIZE, SIZE), 2))
    x = batches((8, 3, SIZE, SIZE), 2, seed=3) + batches((1, 3, SIZE, SIZE), 1, seed=4)
    joined = [x[0], torch.cat([x[1], x[2]])]
    got = _running(fxzip.reset_norm_stats(copy.deepcopy(model), x))
    want = _running(fxzip.reset_norm_stats(copy.deepcopy(model), joined))
    assert all(torch.equal(got[k], want[k]) for k in want)  # exactly the joined batches' statistics
    for k, v in _reference_stats(model, joined).items():
        torch.testing.assert_close(got[k].double(), v, rtol=1e-5, atol=1e-6, msg=k)


def test_batches_of_one_are_joined_with_the_next(nets):
    """Batch size 1 throughout: pairs, the odd last one with the pair before it."""
    model = prepared(nets.make(), batches((8, 3, SIZE, SIZE), 2))
    x = batches((1, 3, SIZE, SIZE), 5, seed=5)
    got = _running(fxzip.reset_norm_stats(copy.deepcopy(model), x))
    want = _running(fxzip.reset_norm_stats(copy.deepcopy(model), [torch.cat(x[:2]), torch.cat(x[2:])]))
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_data_without_such_batches_gives_the_same_statistics_as_before(nets):
    """Batches of one sample where every norm sees more than one value (a 4x4
    map, no BatchNorm1d) are not joined: each counts, as nn.BatchNorm counts it."""
    model = prepared(zoo.small_cnn(out_dim=4, in_channels=3, width=8), batches((8, 3, 4, 4), 2))
    x = batches((8, 3, 4, 4), 1, seed=6) + batches((1, 3, 4, 4), 1, seed=7)
    got = _running(fxzip.reset_norm_stats(copy.deepcopy(model), x))
    for k, v in _reference_stats(model, x).items():
        torch.testing.assert_close(got[k].double(), v, rtol=1e-5, atol=1e-6, msg=k)


def test_merge_with_a_last_batch_of_one(nets):
    """The issue's crash (BatchNorm1d after pooling, last batch of one) in
    fxzip.merge: it succeeds, and equals the merge on the joined batches. A model
    whose statistics are those of the data merged with itself is its own function."""
    x = batches((8, 3, SIZE, SIZE), 2, seed=8) + batches((1, 3, SIZE, SIZE), 1, seed=9)
    joined = [x[0], torch.cat([x[1], x[2]])]
    a = prepared(nets.make(), joined, seed=0)
    b = prepared(nets.make(), joined, seed=1)
    merged = fxzip.merge(a, b, data=x, progress=False)
    want = fxzip.merge(a, b, data=joined, progress=False)
    assert all(torch.equal(v, want.state_dict()[k]) for k, v in merged.state_dict().items())
    self_merge = fxzip.merge(a, copy.deepcopy(a), data=x, progress=False)
    assert_same_function(a, self_merge, x[:2])


def test_resnet18_at_32_px_with_a_last_batch_of_one():
    """timm's resnet18 at 32 px: layer4 runs at 1x1, so a batch of one gives its
    norms one value per channel (the issue's torch.Size([1, 512, 1, 1]))."""
    model = timm.create_model("resnet18", num_classes=4).eval()
    x = batches((3, 3, 32, 32), 1, seed=10) + batches((1, 3, 32, 32), 1, seed=11)
    got = _running(fxzip.reset_norm_stats(copy.deepcopy(model), x))
    want = _running(fxzip.reset_norm_stats(copy.deepcopy(model), [torch.cat(x)]))
    assert all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(ValueError, match=r"at least two values per channel.*'layer4_0_bn1'.*\(1, 512, 1, 1\)"
                                         r".*pass at least two samples, or reset_bn=False"):
        fxzip.reset_norm_stats(copy.deepcopy(model), x[1:])


# ----------------------------------------------------------------------------- NaN and Inf


class _NotIterated:
    """Data that fails the test if any pass reads it."""

    def __iter__(self):
        raise AssertionError("the data was read before the models were checked")


def test_nan_or_inf_in_a_model_is_named_before_any_work():
    data = batches((8, 3, 8, 8), 2)
    a = prepared(zoo.small_cnn(out_dim=4, in_channels=3, width=8), data)
    b = copy.deepcopy(a)
    with torch.no_grad():
        b.conv2.weight[0, 0, 0, 0] = float("nan")
        b.conv2.weight[1, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"model 1's parameter 'conv2.weight' holds 1 NaN, 1 \+Inf \(of 576 "
                                         r"values\): the model diverged in training.*re-export it"):
        fxzip.merge(a, b, data=_NotIterated(), progress=False)
    b = copy.deepcopy(a)
    with torch.no_grad():
        b.bn1.running_var[3] = float("-inf")
    with pytest.raises(ValueError, match=r"model 1's buffer 'bn1.running_var' holds 1 -Inf"):
        fxzip.merge(a, b, data=_NotIterated(), progress=False)
    with pytest.raises(ValueError, match=r"model 0's buffer 'bn1.running_var'"):
        fxzip.calibrate(b, a, data=_NotIterated(), progress=False)


def test_a_mask_buffer_of_minus_inf_is_not_an_error():
    """-Inf in a buffer that is not a norm statistic is a mask, on purpose."""

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = zoo.small_cnn(out_dim=4, in_channels=3, width=8)
            self.register_buffer("mask", torch.tensor([0.0, float("-inf"), 0.0, 0.0]))

        def forward(self, x):
            return self.net(x) + self.mask

    data = batches((8, 3, 8, 8), 2)
    a = prepared(Masked(), data)
    fxzip.merge(a, copy.deepcopy(a), data=data, progress=False)
    b = copy.deepcopy(a)
    b.mask[0] = float("nan")
    with pytest.raises(ValueError, match="model 1's buffer 'mask' holds 1 NaN"):
        fxzip.merge(a, b, data=data, progress=False)


def test_nan_in_an_input_batch_names_the_batch():
    data = batches((8, 3, 8, 8), 4)
    a = prepared(zoo.small_cnn(out_dim=4, in_channels=3, width=8), data)
    bad = [x.clone() for x in data]
    bad[2][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"batch 2 of the data holds 1 NaN value in a \(8, 3, 8, 8\) input: "
                                         r"check the preprocessing"):
        fxzip.merge(a, copy.deepcopy(a), data=bad, progress=False)
    bad[0][1, 1, 1, 1] = float("-inf")  # the first batch is read (and checked) before tracing
    with pytest.raises(ValueError, match=r"batch 0 of the data holds 1 Inf value"):
        fxzip.merge(a, copy.deepcopy(a), data=[(x, 0) for x in bad], progress=False)
    # large finite values whose sum overflows are finite inputs; half precision is summed in float32
    from fxzip.data import non_finite_inputs

    assert non_finite_inputs((torch.full((8, 3, 8, 8), 3e38),), 0) is None
    assert non_finite_inputs((torch.full((8, 3, 8, 8), 6e4, dtype=torch.float16),), 0) is None
    assert "1 Inf" in non_finite_inputs((torch.tensor([1.0, float("inf")], dtype=torch.float16),), 0)


def test_nan_in_a_checkpoint_names_the_file_and_tensor(files, tmp_path, capsys, nets):
    state = torch.load(files / "m1.pt", weights_only=True)
    state["fc1.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    args = _cli(files, "--out", str(tmp_path / "never"))
    args[2] = str(tmp_path / "nan.pt")
    assert main(args) == 2
    _one_line_error(capsys, "nan.pt's parameter 'fc1.weight' holds 1 NaN", "use a checkpoint from before the "
                    "divergence, or re-export it")
    assert not (tmp_path / "never").exists()


# ----------------------------------------------------------------------------- averaged heads


def test_full_zip_says_the_outputs_are_averaged_and_names_the_cut(nets):
    data = batches((8, 3, SIZE, SIZE), 2)
    a, b = prepared(nets.make(), data, seed=0), prepared(nets.make(), data, seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = fxzip.merge(a, b, data=data, progress=False).meta["fxzip"]
    assert not [w for w in caught if OUTPUTS_AVERAGED in str(w.message)]  # a report note, not a Python warning
    note = report.outputs_averaged
    assert note is not None and note.startswith(OUTPUTS_AVERAGED) and "as if their outputs meant the same" in note
    cut = fxzip.cut_points(a, data[0])[-2]  # the last cut before the classifier
    assert cut.k == cut.m - 1 and f"stop_at={cut.name!r}" in note and f"--stop-at {cut.name}" in note
    assert "outputs averaged" in report.table() and OUTPUTS_AVERAGED in report.to_markdown()
    partial = fxzip.merge(a, b, data=data, stop_at=cut.name, progress=False)  # the suggestion works
    assert partial.meta["fxzip"].outputs_averaged is None and len(partial(data[0])) == 2


def test_fxzip_merge_and_sweep_say_the_outputs_are_averaged(files, tmp_path, capsys):
    with pytest.warns(UserWarning, match="cannot be decoded"):
        assert main(_cli(files, "--out", str(tmp_path / "full"))) == 0
    err = capsys.readouterr().err
    assert "note: outputs averaged" in err and "--stop-at relu_1" in err
    report = json.loads((tmp_path / "full" / "report.json").read_text())
    assert any(w.startswith(OUTPUTS_AVERAGED) for w in report["warnings"])
    for task in ("evalA", "evalB"):
        for i in range(4):
            _image(tmp_path / task / f"c{i % 2}" / f"{i}.png", 20 + i)
    with pytest.warns(UserWarning, match="cannot be decoded"):
        assert main(["sweep", str(files / "m0.pt"), str(files / "m1.pt"), "--model", "bad_data_nets:make",
                     "--num-classes", "4", "--data", str(files / "images"), "--eval", str(tmp_path / "evalA"),
                     str(tmp_path / "evalB"), "--img-size", str(SIZE), "--batch-size", "2", "--stop-at", "relu_1",
                     "full", "--out", str(tmp_path / "sweep"), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "outputs averaged (1)" in captured.out and "(1) outputs averaged: " in captured.out
    assert "2 files of --data could not be decoded" in captured.err
    result = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    notes = {r["cut"]: r["note"] for r in result["rows"]}
    assert notes["full"].startswith(OUTPUTS_AVERAGED) and notes["relu_1"] == "" and notes["original"] == ""
    assert result["settings"]["skipped_files"] == 2
    assert result["settings"]["interpolation"] == "bicubic"


# ----------------------------------------------------------------------------- crop options


def test_crop_options_are_timms(files):
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder

    model = timm.create_model("resnet18")
    config = data_config(model, SIZE, crop_pct=1.0, crop_mode="squash", interpolation="bilinear")
    assert (config["crop_pct"], config["crop_mode"], config["interpolation"]) == (1.0, "squash", "bilinear")
    default = data_config(model, SIZE)
    assert (default["crop_pct"], default["crop_mode"]) == (0.95, "center")  # resnet18's own
    transform = create_transform(**config, is_training=False)
    reference = ImageFolder(str(files / "images"), transform=transform,
                            is_valid_file=lambda p: not p.endswith(("2.jpg", "5.jpg")))
    with pytest.warns(UserWarning):
        source = open_data(files / "images", model, SIZE, batch_size=4, crop_pct=1.0, crop_mode="squash",
                           interpolation="bilinear")
        got = torch.cat(list(source.loader()))
    assert torch.equal(got, torch.stack([x for x, _ in reference]))
    assert "squash crop 1.0, bilinear" in source.description


@pytest.mark.parametrize("args, message", [
    (["--crop-pct", "0"], "--crop-pct must be in (0, 1]"),
    (["--crop-pct", "1.2"], "--crop-pct must be in (0, 1]"),
    (["--crop-mode", "middle"], "--crop-mode 'middle' is not one of timm's crop modes: center, squash, border"),
    (["--interpolation", "cubic"], "--interpolation 'cubic' is not one of timm's interpolations: nearest,"),
])
def test_bad_crop_options_are_refused_before_any_work(files, tmp_path, capsys, args, message):
    assert main(_cli(files, "--out", str(tmp_path / "never"), *args)) == 2
    _one_line_error(capsys, message)
    assert not (tmp_path / "never").exists()


def test_crop_options_are_recorded_in_the_report(files, tmp_path):
    with pytest.warns(UserWarning):
        assert main(_cli(files, "--out", str(tmp_path / "out"), "--crop-pct", "1", "--crop-mode", "border",
                         "--interpolation", "nearest")) == 0
    settings = json.loads((tmp_path / "out" / "report.json").read_text())["settings"]
    assert (settings["crop_pct"], settings["crop_mode"], settings["interpolation"]) == (1.0, "border", "nearest")


def test_datasource_is_still_constructible_directly(files):
    config = data_config(timm.create_model("resnet18"), SIZE)
    with pytest.warns(UserWarning):
        with DataSource(files / "images", config, batch_size=8) as source:
            assert [len(b) for b in source.loader()] == [6, 1]


# ----------------------------------------------------------------------------- several processes


def _dist_data():
    """small_cnn on 1x1 inputs (every norm sees one value per channel in a batch
    of one) and 4 batches, the last of one sample; the same in every process."""
    data = batches((8, 3, 1, 1), 3, seed=1) + batches((1, 3, 1, 1), 1, seed=2)
    torch.manual_seed(0)
    return prepared(zoo.small_cnn(out_dim=4, in_channels=3, width=8), data[:2]), data


def _running_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k}


def _dist_worker(rank: int, world: int, port: int, out: str) -> None:
    import os
    import traceback

    import torch.distributed as dist

    result: dict = {}
    try:
        torch.set_num_threads(1)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        from fxzip import distributed as fd

        with fd.local():
            model, data = _dist_data()
        shard = data[rank::world]  # rank 0: batches 0, 2; rank 1: batch 1 and the batch of one
        result["reset"] = _running_stats(fxzip.reset_norm_stats(copy.deepcopy(model), shard))
        lone = shard if rank == 0 else shard[1:]  # rank 1 holds one sample only: left out, with a warning
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result["lone"] = _running_stats(fxzip.reset_norm_stats(copy.deepcopy(model), lone))
        result["lone_warnings"] = [str(w.message) for w in caught if "left out" in str(w.message)]
        bad = [x.clone() for x in shard]
        if rank == 1:
            bad[0][0, 0, 0, 0] = float("nan")
        start = time.perf_counter()
        try:
            fxzip.merge(model, copy.deepcopy(model), data=bad, progress=False)
            result["nan"] = "no error"
        except Exception as exc:  # noqa: BLE001 - compared by the parent
            result["nan"] = f"{type(exc).__name__}: {exc}"
        result["nan_seconds"] = time.perf_counter() - start
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - the parent reports it
        result["crash"] = traceback.format_exc()
    torch.save(result, f"{out}/rank{rank}.pt")


def test_two_processes_join_the_batch_of_one_and_agree_on_a_nan_batch(tmp_path):
    """Under torch.distributed: a rank whose shard ends in a batch of one joins
    it with its previous batch (the result is one process's on the same batches);
    a rank holding one sample only leaves it out with a warning while the other
    rank's batches give the statistics; a NaN batch on one rank makes every rank
    raise at the end of that pass, none left waiting."""
    import socket
    import sys
    from pathlib import Path

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = str(Path(__file__).resolve().parents[1])  # the children import this module (see test_distributed)
    sys.path.append(root)
    try:
        ctx = mp.start_processes(_dist_worker, args=(2, port, str(tmp_path)), nprocs=2, join=False,
                                 start_method="spawn")
    finally:
        sys.path.remove(root)
    deadline = time.monotonic() + 180
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail("the 2 ranks did not finish within 180 s (a hang)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for r, res in enumerate(got):
        assert "crash" not in res, f"rank {r}:\n{res['crash']}"
    model, data = _dist_data()
    one = _running_stats(fxzip.reset_norm_stats(copy.deepcopy(model), [data[0], data[2],
                                                                        torch.cat([data[1], data[3]])]))
    alone = _running_stats(fxzip.reset_norm_stats(copy.deepcopy(model), [data[0], data[2]]))
    for k, v in one.items():
        assert torch.equal(got[0]["reset"][k], got[1]["reset"][k]), k
        torch.testing.assert_close(got[0]["reset"][k], v, rtol=1e-6, atol=1e-7, msg=k)
        if "num_batches" not in k:
            torch.testing.assert_close(got[1]["lone"][k], alone[k], rtol=1e-6, atol=1e-7, msg=k)
    assert got[1]["lone_warnings"] and not got[0]["lone_warnings"]
    assert got[1]["nan"].startswith("ValueError: batch 0 of rank 1's shard holds 1 NaN")
    assert got[0]["nan"].startswith("DistributedError: rank 1 failed while reading its data")
    assert all(res["nan_seconds"] < 30 for res in got)
