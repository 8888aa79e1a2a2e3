"""fxzip.save / fxzip.load: a full zip is a plain timm checkpoint, a partial zip
an exported program; report.json round-trips the report."""
from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import batches, max_rel_diff, prepared

import fxzip
from fxzip.io import load_report
from fxzip.model_spec import ModelSpec
from fxzip.report import MergeReport

timm = pytest.importorskip("timm")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for these small convs


@pytest.fixture(scope="module")
def pair():
    data = batches((8, 3, 32, 32), 2)
    a = prepared(timm.create_model("resnet18", num_classes=10), data, 0)
    b = prepared(timm.create_model("resnet18", num_classes=10), data, 1)
    return a, b, data


def _strict_json(text: str):
    def refuse(token):
        raise ValueError(f"report.json holds {token}, which is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_full_zip_is_a_plain_timm_checkpoint(pair, tmp_path):
    a, b, data = pair
    merged = fxzip.merge(a, b, data=data, progress=False)
    out = fxzip.save(merged, tmp_path / "full", model=ModelSpec("resnet18", num_classes=10))
    assert sorted(p.name for p in out.iterdir()) == ["correlation.png", "model.safetensors", "report.json", "report.md"]
    x = torch.randn(3, 3, 32, 32)
    plain = timm.create_model("resnet18", num_classes=10, checkpoint_path=str(out / "model.safetensors")).eval()
    with torch.no_grad():
        want = merged(x)
        assert max_rel_diff(want, plain(x)) == 0.0
        assert max_rel_diff(want, fxzip.load(out)(x)) == 0.0  # architecture from report.json
        fresh = timm.create_model("resnet18", num_classes=10)
        assert fxzip.load(out, model=fresh) is fresh and not fresh.training
        assert max_rel_diff(want, fresh(x)) == 0.0
    data_json = _strict_json((out / "report.json").read_text())
    assert data_json["zip"] == "full" and data_json["model"]["name"] == "resnet18"
    assert data_json["spaces"] == merged.meta["fxzip"].to_dict()["spaces"]
    assert "| space | size |" in (out / "report.md").read_text()


def test_partial_zip_is_an_exported_program(pair, tmp_path):
    a, b, data = pair
    partial = fxzip.merge(a, b, data=data, progress=False, stop_at=9)
    assert not partial.training  # like a full zip, ready for inference
    out = fxzip.save(partial, tmp_path / "partial")
    assert sorted(p.name for p in out.iterdir()) == ["correlation.png", "model.pt2", "report.json",
                                                     "report.md"]  # the weights once, in the program
    loaded = fxzip.load(out)
    x = torch.randn(5, 3, 32, 32)  # exported with a batch of 2: the batch dimension is dynamic
    with torch.no_grad():
        want, got = partial(x), loaded(x)
    assert len(got) == 2 and max_rel_diff(want, got) == 0.0
    report = loaded.meta["fxzip"]
    assert report.cut.name == partial.meta["fxzip"].cut.name and report.cut.k == partial.meta["fxzip"].cut.k
    info = _strict_json((out / "report.json").read_text())
    assert info["export"]["dynamic_batch"] is True and info["zip"] == "partial"
    # the weights also load into a GraphModule of the same structure
    again = fxzip.merge(a, b, data=data, progress=False, stop_at=9, method="weight_average")
    fxzip.load(out, model=again)
    with torch.no_grad():
        assert max_rel_diff(want, again(x)) == 0.0


def test_report_round_trips_through_json(pair):
    a, b, data = pair
    report = fxzip.merge(a, b, data=data, progress=False, stop_at=9).meta["fxzip"]
    text = report.to_json()
    back = MergeReport.from_dict(_strict_json(text))
    assert str(back) == str(report)
    assert back.to_dict()["spaces"] == report.to_dict()["spaces"]
    fc = next(row for row in _strict_json(text)["spaces"] if row["name"] == "fc")
    assert fc["mean_corr"] is None and math.isnan(next(s for s in back.spaces if s.name == "fc").mean_corr)
    assert set(_strict_json(text)["versions"]) >= {"fxzip", "torch", "timm"}
    assignment = _strict_json(text)["assignment"]
    for row in report.spaces:  # every unit of every model goes to a merged unit of the space
        units = assignment[str(row.index)]
        assert len(units) == 2 and all(len(u) == row.size and 0 <= min(u) and max(u) < row.size for u in units)
    assert [s.assignment for s in back.spaces] == [s.assignment for s in report.spaces]


def test_load_errors_name_the_fix(pair, tmp_path):
    a, b, data = pair
    with pytest.raises(FileNotFoundError, match="not a directory written by fxzip"):
        fxzip.load(tmp_path / "nothing")
    out = fxzip.save(fxzip.merge(a, b, data=data, progress=False, method="weight_average"), tmp_path / "bare")
    with pytest.raises(ValueError, match="pass model="):
        fxzip.load(out)
    with pytest.raises(ValueError, match="does not fit the model.*--num-classes"):
        fxzip.load(out, model=timm.create_model("resnet18", num_classes=7))
    assert load_report(out).method == "weight_average"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        fxzip.save(a, tmp_path / "file")


def test_report_names_spaces_and_marks_the_heads(pair, tmp_path):
    a, b, data = pair
    partial = fxzip.merge(a, b, data=data, progress=False, stop_at=9)
    report = partial.meta["fxzip"]
    labels = [s.label for s in report.spaces]
    assert labels[0] == "layer1 stream (conv1, layer1.0.conv2, layer1.1.conv2)"
    assert "layer2.0 hidden (conv1)" in labels and labels[-1] == "output (fc)"
    fxzip.save(partial, tmp_path / "p")
    head_only = [s.name for s in report.spaces if s.head_only]  # marked by save, from the result's graph
    assert head_only == ["layer3_0_conv1", "layer3_0_conv2", "layer3_1_conv1", "layer4_0_conv1", "layer4_0_conv2",
                         "layer4_1_conv1", "fc"]
    text = report.table()
    assert "head only" in text and "columns:" in text and "layer2 stream (layer2.0.conv2" in text
    saved = load_report(tmp_path / "p")
    assert [s.head_only for s in saved.spaces] == [s.head_only for s in report.spaces]
    assert (tmp_path / "p" / "correlation.png").stat().st_size > 1000
