"""Every merge option of the Python API on the command line: ``fxzip merge
--refit [RIDGE] --repair --merged-width W|NAME=W --probes POLICY`` and the
same as axes of ``fxzip sweep``.

Real runs on a tiny residual CNN (``fxzip.zoo.small_cnn``, width 8, 16 px)
from a factory module written here, two checkpoints re-drawn at O(1) scale,
16 calibration inputs in two batches: the options must reach ``fxzip.merge``
(the saved result equals the Python API's with the same options; the report
records them), and a bad combination must fail with the library's message
before any calibration pass.
"""
from __future__ import annotations

import csv
import functools
import json
import sys
import textwrap

import numpy as np
import pytest
import torch
from helpers import batches, max_rel_diff, prepared

import fxzip
import fxzip.calibration
from fxzip.cli import main
from fxzip.passes.refit import DEFAULT_RIDGE
from fxzip.probes import DEFAULT_PROBES

Image = pytest.importorskip("PIL.Image")
pytest.importorskip("timm")

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for these small convs

FACTORY = "cli_option_nets"  # a name no other test uses: a worker's sys.modules holds one module per name
COMMON = ["m0.pt", "m1.pt", "--model", f"{FACTORY}:make", "--batch-size", "8", "--quiet"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Two checkpoints of the factory's net, float inputs (x.pt), images for
    calibration (calib/) and one labelled folder per task (evalA/, evalB/)."""
    root = tmp_path_factory.mktemp("cli_options")
    (root / f"{FACTORY}.py").write_text(textwrap.dedent("""
        from fxzip.zoo import small_cnn

        def make(num_classes=4):
            return small_cnn(out_dim=num_classes, in_channels=3, width=8)
    """))
    sys.path.insert(0, str(root))
    sys.modules.pop(FACTORY, None)
    nets = __import__(FACTORY)
    data = batches((8, 3, 16, 16), 2)
    models = [prepared(nets.make(), data, seed) for seed in (0, 1)]
    for seed, model in enumerate(models):
        torch.save(model.state_dict(), root / f"m{seed}.pt")
    torch.save(torch.cat(data), root / "x.pt")
    rng = np.random.default_rng(0)
    for folder in ("calib", "evalA", "evalB"):
        for i in range(8):
            sub = root / folder / f"c{i % 2}"
            sub.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(sub / f"{i}.png")
    yield root, models, data
    sys.path.remove(str(root))
    sys.modules.pop(FACTORY, None)


@pytest.fixture
def no_calibration(monkeypatch):
    """Fail the test if a calibration pass starts (an AssertionError is not
    one of the errors the command line reports)."""
    def observe(*args, **kwargs):
        raise AssertionError("a calibration pass ran before the error")

    monkeypatch.setattr(fxzip.calibration, "observe", observe)


@pytest.fixture
def merges(monkeypatch):
    """Every ``fxzip.merge`` and ``fxzip.calibrate`` call the sweep makes, with
    its keywords and the report it returned."""
    module = sys.modules["fxzip.merge"]
    calls: dict[str, list] = {"merge": [], "calibrate": []}
    real_merge, real_calibrate = module.merge, module.calibrate

    @functools.wraps(real_merge)  # the command line reads merge's defaults from its signature
    def merge(*models, **kwargs):
        result = real_merge(*models, **kwargs)
        calls["merge"].append((kwargs, result.meta["fxzip"]))
        return result

    @functools.wraps(real_calibrate)
    def calibrate(*models, **kwargs):
        calls["calibrate"].append(kwargs)
        return real_calibrate(*models, **kwargs)

    monkeypatch.setattr(module, "merge", merge)
    monkeypatch.setattr(module, "calibrate", calibrate)
    return calls


def test_merge_options_reach_the_merge_and_the_report(root, monkeypatch):
    folder, models, data = root
    monkeypatch.chdir(folder)
    assert main(["merge", *COMMON, "--data", "x.pt", "--out", "opts", "--refit", "0.01", "--repair",
                 "--merged-width", "1.5", "--probes", "last"]) == 0
    report = json.loads((folder / "opts" / "report.json").read_text())
    assert {k: report["settings"][k] for k in ("refit", "repair", "merged_width", "probes")} == {
        "refit": 0.01, "repair": True, "merged_width": 1.5, "probes": "last"}
    details = report["details"]
    assert details["probes"] == "last"
    assert details["refit"]["layers"] > 0 and details["refit"]["passes"] > 0
    assert "sites" in details["repair"] and details["repair"]["norm_reset_passes"] == 2
    assert report["macs"]["merged"] > report["macs"]["original"]  # wider than one model
    assert (folder / "opts" / "model.pt2").exists()  # a widened model no longer fits the class
    # the same merge from Python: the options reached fxzip.merge as given
    want = fxzip.merge(*models, data=data, refit=0.01, repair=True, merged_width=1.5, probes="last", progress=False)
    got = fxzip.load(folder / "opts")
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        assert max_rel_diff(want(x), got(x)) < 1e-4


def test_merged_width_per_space_and_the_defaults(root, monkeypatch):
    folder, _, _ = root
    monkeypatch.chdir(folder)
    assert main(["merge", *COMMON, "--data", "x.pt", "--out", "named", "--merged-width", "hidden (conv2)=2",
                 "--merged-width", "conv1=1.5"]) == 0
    report = json.loads((folder / "named" / "report.json").read_text())
    assert report["settings"]["merged_width"] == {"hidden (conv2)": 2.0, "conv1": 1.5}
    merged = {row["label"]: row["merged"] for row in report["spaces"]}
    assert merged == {"stream (conv1, conv3)": 12, "hidden (conv2)": 16, "output (fc)": 0}, merged
    assert "refit" not in report["details"] and "repair" not in report["details"]
    assert report["details"]["probes"] == DEFAULT_PROBES


def test_the_parser_reads_the_options():
    from fxzip.cli.commands import merged_width_arg
    from fxzip.cli.parser import _build_parser

    parse = lambda *extra: _build_parser().parse_args(["merge", "a.pt", "b.pt", "--model", "m", "--data", "d",
                                                         "--out", "o", *extra])
    plain = parse()
    assert (plain.refit, plain.repair, plain.merged_width, plain.probes) == (False, False, None, "all")
    assert merged_width_arg(plain.merged_width) == 1.0
    assert parse("--refit").refit is True and parse("--refit", "--repair").refit is True
    assert parse("--refit", "0.5").refit == 0.5
    assert merged_width_arg(parse("--merged-width", "2").merged_width) == 2.0
    assert merged_width_arg(parse("--merged-width", "a=2", "--merged-width", "b c=1.25").merged_width) == {
        "a": 2.0, "b c": 1.25}
    sweep = _build_parser().parse_args(["sweep", "a.pt", "b.pt", "--model", "m", "--data", "d", "--eval", "e", "f",
                                        "--refit", "both", "0.1", "--repair", "both", "--probes", "all", "last",
                                        "--merged-width", "1", "1.5"])
    assert sweep.refit == [(False, True), (0.1,)] and sweep.repair == "both"
    assert sweep.probes == ["all", "last"] and sweep.merged_widths == [1.0, 1.5]


@pytest.mark.parametrize("extra, message", [
    (["--merged-width", "3"], "merged_width must be a number from 1.0 (one model's width) to 2"),
    (["--method", "weight_average", "--merged-width", "1.5"], "weight_average has no similarity"),
    (["--refit", "0"], "refit must be True or a positive ridge factor"),
    (["--merged-width", "1.5", "--merged-width", "conv1=2"], "or NAME=W entries"),
    (["--merged-width", "nowhere=1.5"], "merged_width names a space 'nowhere' the model does not have"),
])
def test_merge_refuses_a_bad_combination_before_calibrating(root, monkeypatch, capsys, no_calibration, extra,
                                                            message):
    folder, _, _ = root
    monkeypatch.chdir(folder)
    assert main(["merge", *COMMON, "--data", "x.pt", "--out", "never", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (folder / "never").exists()


@pytest.mark.parametrize("extra, message", [
    (["--probes", "everywhere"], "argument --probes: invalid choice: 'everywhere'"),
    (["--refit", "lots"], "'lots' is not a ridge factor"),
    (["--merged-width", "wide"], "--merged-width takes a factor W"),
])
def test_merge_refuses_a_bad_value_when_parsing(root, monkeypatch, capsys, extra, message):
    folder, _, _ = root
    monkeypatch.chdir(folder)
    with pytest.raises(SystemExit) as exit_:
        main(["merge", *COMMON, "--data", "x.pt", "--out", "never", *extra])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_help_explains_the_options(capsys):
    for command in ("merge", "sweep"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        for flag in ("--refit", "--repair", "--merged-width", "--probes", "multiplies MACs", "pass over the data",
                     "last_before_reduce"):
            assert flag in text, (command, flag)


def _sweep(*extra: str) -> list[str]:
    return ["sweep", *COMMON, "--data", "calib", "--eval", "evalA", "evalB", "--img-size", "16", *extra]


def test_sweep_refit_both_runs_every_point_with_and_without(root, monkeypatch, capsys, merges):
    folder, _, _ = root
    monkeypatch.chdir(folder)
    assert main(_sweep("--refit", "both", "--repair", "both", "--stop-at", "1", "full", "--out", "rb")) == 0
    rows = json.loads((folder / "rb" / "sweep.json").read_text())["rows"]
    settings = [(r["method"], r["k"], r["refit"], r["repair"]) for r in rows]
    ridge = DEFAULT_RIDGE
    assert settings == [("original", 0, None, False),
                        ("zipit", 1, None, False), ("zipit", 4, None, False), ("zipit", 4, None, True),
                        ("zipit", 1, ridge, False), ("zipit", 4, ridge, False), ("zipit", 4, ridge, True)]
    # each row is the merge it says: the options reached fxzip.merge, its report shows the passes
    assert len(merges["calibrate"]) == 1 and len(merges["merge"]) == 6
    for row, (kwargs, report) in zip(rows[1:], merges["merge"]):
        assert kwargs["refit"] == (row["refit"] or False) and kwargs["repair"] == row["repair"]
        assert ("refit" in report.details) == (row["refit"] is not None)
        assert ("repair" in report.details) == row["repair"]
        assert (report.cut is None) == (row["k"] == 4)
    with open(folder / "rb" / "sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert [(t["refit"], t["repair"]) for t in table[1:3]] == [("", "False"), ("", "False")]
    assert table[4]["refit"] == str(ridge) and table[6]["repair"] == "True"
    out = capsys.readouterr().out
    head = out.splitlines()[0].split()
    assert "refit" in head and "repair" in head and "width" not in head and "probes" not in head
    assert (folder / "rb" / "sweep.png").stat().st_size > 0


def test_sweep_widths_and_probes_are_axes(root, monkeypatch, capsys, merges):
    folder, _, _ = root
    monkeypatch.chdir(folder)
    assert main(_sweep("--methods", "zipit", "weight_average", "--merged-width", "1", "1.5", "--probes", "all",
                       "last", "--out", "wp")) == 0
    assert [c["probes"] for c in merges["calibrate"]] == ["all", "last"]  # one calibration per policy
    rows = json.loads((folder / "wp" / "sweep.json").read_text())["rows"][1:]
    assert [(r["method"], r["merged_width"], r["probes"]) for r in rows] == [
        ("zipit", 1.0, "all"), ("zipit", 1.5, "all"), ("weight_average", 1.0, None),
        ("zipit", 1.0, "last"), ("zipit", 1.5, "last")]
    for row, (kwargs, report) in zip(rows, merges["merge"]):
        assert kwargs["merged_width"] == row["merged_width"] and kwargs["probes"] == (row["probes"] or "all")
        assert report.details.get("probes") == row["probes"]
    macs = {(r["merged_width"], r["probes"]): r["macs"] for r in rows if r["method"] == "zipit"}
    assert macs[1.5, "all"] > macs[1.0, "all"] and macs[1.5, "last"] == macs[1.5, "all"]
    head = capsys.readouterr().out.splitlines()[0].split()
    assert "width" in head and "probes" in head and "refit" not in head


@pytest.mark.parametrize("extra, message", [
    (["--methods", "weight_average", "--merged-width", "1.5"], "weight_average has no similarity"),
    (["--refit", "on", "-1"], "refit must be True or a positive ridge factor, got -1.0"),
    (["--merged-width", "1", "2.5"], "merged_width must be a number from 1.0"),
])
def test_sweep_refuses_a_bad_point_before_calibrating(root, monkeypatch, capsys, no_calibration, extra, message):
    folder, _, _ = root
    monkeypatch.chdir(folder)
    assert main(_sweep(*extra)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_max_memory_bounds_the_cache_and_keeps_the_result(root, monkeypatch):
    """``--max-memory 0`` spills every activation the refit caches to disk and
    reads it back bit for bit: the same weights as without a bound, the bound
    and the spill in the report. (The repair's cache is bounded the same way;
    this BatchNorm net has no repair site: tests/test_pipeline.py.)"""
    folder, _, _ = root
    monkeypatch.chdir(folder)
    for out, extra in (("free", []), ("bounded", ["--max-memory", "0"])):
        assert main(["merge", *COMMON, "--data", "x.pt", "--out", out, "--refit", *extra]) == 0
    free, bounded = (json.loads((folder / d / "report.json").read_text()) for d in ("free", "bounded"))
    assert free["settings"]["max_memory"] is None and bounded["settings"]["max_memory"] == 0
    memory = bounded["details"]["refit"]["memory"]
    assert memory["max_memory"] == 0 and memory["spilled_bytes"] > 0
    assert free["details"]["refit"]["memory"]["spilled_bytes"] == 0
    from safetensors.torch import load_file

    want, got = (load_file(folder / d / "model.safetensors") for d in ("free", "bounded"))
    assert want.keys() == got.keys()
    for name, x in want.items():
        assert torch.equal(x, got[name]), name


def test_max_memory_reads_byte_suffixes():
    from fxzip.cli.parser import _build_parser

    def parse(*extra):
        return _build_parser().parse_args(["merge", "a.pt", "b.pt", "--model", "m", "--data", "d", "--out", "o",
                                           *extra]).max_memory

    assert parse() is None
    assert [parse("--max-memory", v) for v in ("0", "1000", "512M", "4G", "4gib", "1.5G", "64K", "2TB")] == [
        0, 1000, 512 * 2 ** 20, 4 * 2 ** 30, 4 * 2 ** 30, 3 * 2 ** 29, 64 * 2 ** 10, 2 * 2 ** 40]
    sweep = _build_parser().parse_args(["sweep", "a.pt", "b.pt", "--model", "m", "--data", "d", "--eval", "e", "f",
                                        "--max-memory", "256M"])
    assert sweep.max_memory == 256 * 2 ** 20


@pytest.mark.parametrize("command", ["merge", "sweep"])
@pytest.mark.parametrize("value", ["-1", "4X", "lots", "G", "1e9", ""])
def test_max_memory_refuses_a_bad_value_before_any_work(root, monkeypatch, capsys, no_calibration, command, value):
    folder, _, _ = root
    monkeypatch.chdir(folder)
    argv = (["merge", *COMMON, "--data", "x.pt", "--out", "never"] if command == "merge"
            else _sweep("--out", "never"))
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--max-memory", value])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"argument --max-memory: {value!r} is not a number of bytes" in err, err
    assert "suffix K, M, G or T" in err and not (folder / "never").exists()


def test_sweep_passes_max_memory_to_every_merge(root, monkeypatch, merges):
    folder, _, _ = root
    monkeypatch.chdir(folder)
    assert main(_sweep("--refit", "on", "--max-memory", "0", "--out", "mm")) == 0
    assert json.loads((folder / "mm" / "sweep.json").read_text())["settings"]["max_memory"] == 0
    assert len(merges["merge"]) == 1
    kwargs, report = merges["merge"][0]
    assert kwargs["max_memory"] == 0 and report.details["refit"]["memory"]["spilled_bytes"] > 0


def test_cache_dtype_reaches_the_merge_and_its_rounding_the_report(root, monkeypatch, merges):
    """``--cache-dtype float16`` on merge and sweep: the refit's cache is kept in
    float16, the setting and the rounding measured are in the reports."""
    folder, _, _ = root
    monkeypatch.chdir(folder)
    assert main(["merge", *COMMON, "--data", "x.pt", "--out", "half", "--refit", "--cache-dtype", "float16"]) == 0
    report = json.loads((folder / "half" / "report.json").read_text())
    assert report["settings"]["cache_dtype"] == "float16"
    memory = report["details"]["refit"]["memory"]
    assert memory["cache_dtype"] == "float16" and 0 < memory["rounding_rel_bound"] <= 2.0 ** -11
    assert main(_sweep("--refit", "on", "--cache-dtype", "bfloat16", "--out", "bf")) == 0
    assert json.loads((folder / "bf" / "sweep.json").read_text())["settings"]["cache_dtype"] == "bfloat16"
    kwargs, swept = merges["merge"][-1]
    assert kwargs["cache_dtype"] == "bfloat16"
    assert swept.details["refit"]["memory"]["cache_dtype"] == "bfloat16"
