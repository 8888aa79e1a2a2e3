"""fxzip.load treats a result folder as untrusted data: no name it carries is
imported or called, and a tampered ``model.pt2`` is refused before
``torch.export.load`` (which would run code from it) reads it.

Every tamper below is checked twice: fxzip refuses it with a message naming the
problem, and a marker file that the injected code would create stays absent.
For the ``model.pt2`` tampers the same archive is also shown to run the code
under a plain ``torch.export.load`` where that is how torch behaves, so the
test would fail if the check were removed."""
from __future__ import annotations

import io
import json
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import batches, prepared
from torch import nn

import fxzip
from fxzip.model_spec import ModelSpec
from fxzip.program_check import UnsafeProgramError, check_program

timm = pytest.importorskip("timm")


class _Touch:
    """A pickle that creates ``path`` when unpickled (what an attacker would ship)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """A full zip (timm resnet18, architecture recorded) and a partial zip."""
    torch.manual_seed(0)
    data = batches((4, 3, 32, 32), 2)
    a = prepared(timm.create_model("resnet18", num_classes=4), data, 0)
    b = prepared(timm.create_model("resnet18", num_classes=4), data, 1)
    root = tmp_path_factory.mktemp("results")
    full = fxzip.save(fxzip.merge(a, b, data=data, progress=False), root / "full",
                      model=ModelSpec("resnet18", num_classes=4, library="timm"))
    partial = fxzip.save(fxzip.merge(a, b, data=data, progress=False, stop_at=9), root / "partial")
    return full, partial


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_report(folder: Path, **model) -> None:
    path = folder / "report.json"
    data = json.loads(path.read_text())
    data["model"] = model
    path.write_text(json.dumps(data))


def test_untampered_results_load(results):
    full, partial = results
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert fxzip.load(full)(x).shape == (2, 4)
        assert len(fxzip.load(partial)(x)) == 2


@pytest.mark.parametrize("name", ["os:system", "subprocess:getoutput", "builtins:exec"])
def test_report_naming_code_is_refused(results, tmp_path, name):
    folder = _copy(results[0], tmp_path / "r")
    marker = tmp_path / "marker"
    _edit_report(folder, name=name, kwargs={"command": f"touch {marker}", "cmd": f"touch {marker}"})
    with pytest.raises(ValueError, match="never imports or calls code named in a result folder"):
        fxzip.load(folder)
    assert not marker.exists()


@pytest.mark.parametrize("kwargs", [{"checkpoint_path": "/etc/passwd"}, {"pretrained": True},
                                    {"pretrained_cfg_overlay": {"file": "x"}}, {"__class__": 1},
                                    {"act_layer": {"nested": "dict"}}])
def test_report_kwargs_that_reach_files_are_refused(results, tmp_path, kwargs):
    folder = _copy(results[0], tmp_path / "r")
    _edit_report(folder, name="resnet18", num_classes=4, library="timm", kwargs=kwargs)
    with pytest.raises(ValueError, match="may not come from a result folder|only numbers, strings"):
        fxzip.load(folder)


def test_report_with_unknown_library_or_name_is_refused(results, tmp_path):
    folder = _copy(results[0], tmp_path / "r")
    _edit_report(folder, name="resnet18", num_classes=4, library="mypkg")
    with pytest.raises(ValueError, match="not one fxzip builds from"):
        fxzip.load(folder)
    _edit_report(folder, name="no_such_net_anywhere", num_classes=4)
    with pytest.raises(ValueError, match="neither a timm nor a torchvision model name"):
        fxzip.load(folder)


def test_caller_names_the_architecture(results, tmp_path):
    """A folder whose report names code still loads when the caller says what to
    build: a module, a registry name (the record's numbers are used), a spec."""
    folder = _copy(results[0], tmp_path / "r")
    _edit_report(folder, name="os:system", num_classes=4)
    x = torch.randn(1, 3, 32, 32)
    want = fxzip.load(results[0])(x)
    assert torch.equal(fxzip.load(folder, model="resnet18")(x), want)
    assert torch.equal(fxzip.load(folder, model=ModelSpec("resnet18", 4, library="timm"))(x), want)
    assert torch.equal(fxzip.load(folder, model=timm.create_model("resnet18", num_classes=4))(x), want)


def test_torchvision_names_are_a_registry(tmp_path):
    import torchvision

    net = torchvision.models.get_model("resnet18", weights=None, num_classes=3).eval()
    copy = torchvision.models.get_model("resnet18", weights=None, num_classes=3).eval()
    copy.load_state_dict(net.state_dict())
    data = batches((2, 3, 32, 32), 1)
    merged = fxzip.merge(net, copy, data=data, progress=False)
    out = fxzip.save(merged, tmp_path / "tv", model=ModelSpec("resnet18", 3, library="torchvision"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fxzip.load(out)(x), merged(x))


def _rewrite(src: Path, dst: Path, change) -> Path:
    """Copy the archive ``src`` to ``dst``, passing each member through
    ``change(name, bytes) -> bytes | None`` (None drops it); ``change`` may add
    members by returning a dict."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            out = change(info.filename, zin.read(info.filename))
            if isinstance(out, dict):
                for name, data in out.items():
                    zout.writestr(name, data)
            elif out is not None:
                zout.writestr(info, out)
    return dst


def _tampered(results, tmp_path, change) -> Path:
    folder = _copy(results[1], tmp_path / "r")
    program = folder / "model.pt2"
    _rewrite(results[1] / "model.pt2", program, change)
    return folder


def _sympy_payload(marker: Path):
    def change(name, data):
        if "/models/" not in name:
            return data
        text = data.decode()
        i = text.index('"expr_str": "') + len('"expr_str": "')
        return (text[:i] + f"__import__('os').system('touch {marker}') or " + text[i:]).encode()
    return change


def test_shape_expression_code_is_refused(results, tmp_path):
    marker = tmp_path / "marker"
    folder = _tampered(results, tmp_path, _sympy_payload(marker))
    with pytest.raises(UnsafeProgramError, match="shape expression"):
        fxzip.load(folder)
    assert not marker.exists()
    # the check is what protects: torch.export.load evaluates the expression
    try:
        torch.export.load(str(folder / "model.pt2"))
    except Exception:  # noqa: BLE001 - the archive is broken after the payload ran
        pass
    assert marker.exists(), "torch.export.load no longer evaluates shape expressions; revisit program_check"


def test_pickled_sample_inputs_are_refused(results, tmp_path):
    marker = tmp_path / "marker"

    def change(name, data):
        if "/data/sample_inputs/" in name:
            buffer = io.BytesIO()
            torch.save(_Touch(marker), buffer)
            return buffer.getvalue()
        return data

    folder = _tampered(results, tmp_path, change)
    with pytest.raises(UnsafeProgramError, match="not plain tensors"):
        fxzip.load(folder)
    assert not marker.exists()


def test_pickled_weight_payload_is_refused(results, tmp_path):
    marker = tmp_path / "marker"

    def change(name, data):
        if name.endswith("_weights_config.json"):
            config = json.loads(data)
            fqn = next(iter(config["config"]))
            config["config"][fqn]["use_pickle"] = True
            return json.dumps(config).encode()
        if name.endswith("/data/weights/weight_0"):
            return pickle.dumps(_Touch(marker))
        return data

    folder = _tampered(results, tmp_path, change)
    with pytest.raises(UnsafeProgramError, match="as a pickle"):
        fxzip.load(folder)
    assert not marker.exists()


def test_guards_code_and_foreign_targets_are_refused(results, tmp_path):
    def guards(name, data):
        if "/models/" not in name:
            return data
        program = json.loads(data)
        program["guards_code"] = ["__import__('os').system('true')"]
        return json.dumps(program).encode()

    with pytest.raises(UnsafeProgramError, match="guards_code"):
        fxzip.load(_tampered(results, tmp_path / "g", guards))
    # guards may compare input sizes only (a batch dimension shared by several inputs); anything else is refused
    sizes = "(2*L['x'].size()[0]) % 2 == 0 and L['x'].size()[0] >= 1"
    check_program(_tampered(results, tmp_path / "ok", _guarded(sizes)) / "model.pt2")
    for bad in ("L['x'].size()[0] == __import__('os').getpid()", "L['x'].numpy()[0] == 1",
                "L['x'].size().__class__ == 1", "L.get('x') == 1", "L['x'].size()['a'] == 1", "'a' == 'a'",
                "[c for c in ()] == []", "L['x'].size()[0] == (lambda: 1)()",
                # a key that closes the string literal torch pastes the guard into (found in review)
                "L['x'].size()[0] > 0 or L['a\"+str(__import__(\"os\").getpid())+\"'].size()[0] == 0",
                "L['a b'].size()[0] == 1"):
        with pytest.raises(UnsafeProgramError, match="guards_code"):
            check_program(_tampered(results, tmp_path / f"bad{abs(hash(bad))}", _guarded(bad)) / "model.pt2")

    def target(name, data):
        if "/models/" not in name:
            return data
        return data.replace(b'"torch.ops.aten.relu_.default"', b'"torch.os.system"', 1)

    with pytest.raises(UnsafeProgramError, match="'torch.os.system', which is not an ATen operation"):
        fxzip.load(_tampered(results, tmp_path / "t", target))


def _guarded(code: str):
    def edit(name, data):
        if "/models/" not in name:
            return data
        program = json.loads(data)
        program["guards_code"] = [code]
        return json.dumps(program).encode()
    return edit


def test_extra_members_are_refused(results, tmp_path):
    def extra(name, data):
        if name.endswith("archive_format"):
            top = name.split("/", 1)[0]
            return {name: data, f"{top}/data/aotinductor/model/model.so": b"\x7fELF"}
        return data

    with pytest.raises(UnsafeProgramError, match="aotinductor"):
        check_program(_tampered(results, tmp_path, extra) / "model.pt2")


def test_a_user_model_is_never_built_from_a_record(results, tmp_path):
    """A partial zip needs no architecture: its program is checked and loaded,
    and the report's model record is never read for it."""
    folder = _copy(results[1], tmp_path / "r")
    marker = tmp_path / "marker"
    _edit_report(folder, name="os:system", kwargs={"command": f"touch {marker}"})
    out = fxzip.load(folder)
    assert isinstance(out, nn.Module) and not marker.exists()
