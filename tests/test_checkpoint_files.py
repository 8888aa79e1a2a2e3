"""Checkpoint files as users have them: every unreadable one ends in one line
that names the file and the fix (``fxzip merge`` exits 2 before any model is
merged), and the prefixes wrappers put on keys are removed only when they are a
wrapper's."""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from fxzip.cli import main
from fxzip.cli.checkpoints import check_model_name, read_state_dict, strip_prefix
from fxzip.model_spec import load_into

timm = pytest.importorskip("timm")


class _Payload:
    """A pickled object that is not a tensor (what weights_only refuses)."""


@pytest.fixture
def state():
    torch.manual_seed(0)
    return {"0.weight": torch.randn(4, 3, 3, 3), "0.bias": torch.randn(4)}


def _write_bad(kind: str, path, state):
    from safetensors.torch import save_file

    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated_pth":
        torch.save(state, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "truncated_safetensors":
        save_file(state, str(path))
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "pickled_object":
        torch.save({"0.weight": _Payload()}, path)
    elif kind == "safetensors_as_pth":
        save_file(state, str(path))
    elif kind == "not_a_state_dict":
        torch.save([1, 2, 3], path)


@pytest.mark.parametrize("kind,suffix,message", [
    ("empty", ".pth", "is empty \\(0 bytes\\)"),
    ("truncated_pth", ".pth", "cannot be read .* truncated or not a PyTorch file"),
    ("truncated_safetensors", ".safetensors", "not a readable safetensors file .* truncated or corrupt"),
    ("pickled_object", ".pth", "pickles Python objects, not only tensors.*torch.save\\(model.state_dict"),
    ("safetensors_as_pth", ".pth", "safetensors file under another suffix; rename it"),
    ("not_a_state_dict", ".pt", "is not a state_dict: found list"),
])
def test_unreadable_checkpoints_say_what_and_how(tmp_path, state, kind, suffix, message):
    path = tmp_path / f"ckpt{suffix}"
    _write_bad(kind, path, state)
    with pytest.raises(ValueError, match=message) as err:
        read_state_dict(path)
    text = str(err.value)
    assert str(path) in text and "\n" not in text
    assert "weights_only=False" not in text  # never repeat torch's advice to unpickle code


def test_cli_turns_a_bad_checkpoint_into_one_line(tmp_path, state, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save(timm.create_model("resnet18", num_classes=3).state_dict(), tmp_path / "good.pth")
    _write_bad("empty", tmp_path / "bad.pth", state)
    torch.save(torch.zeros(4, 3, 8, 8), tmp_path / "x.pt")
    assert main(["merge", "good.pth", "bad.pth", "--model", "resnet18", "--data", "x.pt", "--out", "o",
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.pth is empty (0 bytes)" in err[0]


def test_upper_case_suffix_is_read_as_safetensors(tmp_path, state):
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "B.SAFETENSORS"))
    read, entry = read_state_dict(tmp_path / "B.SAFETENSORS")
    assert entry is None and all(torch.equal(read[k], state[k]) for k in state)


@pytest.mark.parametrize("prefix", ["module.", "model.", "_orig_mod."])
def test_wrapper_prefixes_are_removed_when_every_key_has_them(state, prefix, caplog):
    net = nn.Sequential(nn.Conv2d(3, 4, 3))
    with caplog.at_level(logging.INFO, logger="fxzip"):
        load_into(net, {prefix + k: v for k, v in state.items()}, "ckpt.pth")
    assert torch.equal(net[0].weight, state["0.weight"])
    assert any(prefix in r.getMessage() and "removing" in r.getMessage() for r in caplog.records)


def test_a_prefix_the_model_itself_has_is_kept():
    """A model whose own keys start with ``model.`` (a Hugging Face model) loads
    its checkpoint as it is: nothing is removed."""

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = nn.Linear(2, 2)

    src, dst = Wrapped(), Wrapped()
    load_into(dst, src.state_dict(), "ckpt.pth")
    assert torch.equal(dst.model.weight, src.model.weight)


def test_a_prefix_on_some_keys_only_is_not_removed(state):
    mixed = {"module.0.weight": state["0.weight"], "0.bias": state["0.bias"]}
    with pytest.raises(ValueError, match="missing keys .*unexpected keys"):
        load_into(nn.Sequential(nn.Conv2d(3, 4, 3)), mixed, "ckpt.pth")


def test_strip_prefix_names_a_key_without_it(state):
    prefixed = {"net." + k: v for k, v in state.items()}
    assert set(strip_prefix(prefixed, "net.", "c.pth")) == set(state)
    with pytest.raises(ValueError, match="do not start with it .*'0.weight'"):
        strip_prefix(state, "net.", "c.pth")


def test_cli_reads_a_lightning_checkpoint(tmp_path, capsys, monkeypatch):
    """Keys ``model.*`` inside a ``state_dict`` entry (Lightning): the classes are
    read through the prefix and the prefix is removed, said on stderr."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    for k in range(2):
        net = timm.create_model("resnet18", num_classes=3)
        torch.save({"state_dict": {"model." + key: v for key, v in net.state_dict().items()}, "epoch": 1},
                   tmp_path / f"m{k}.ckpt")
    torch.save(torch.randn(4, 3, 32, 32), tmp_path / "x.pt")
    assert main(["merge", "m0.ckpt", "m1.ckpt", "--model", "resnet18", "--data", "x.pt", "--out", "o",
                 "--batch-size", "4", "--stop-at", "0"]) == 0
    err = capsys.readouterr().err
    assert "3 classes" in err and "every key starts with 'model.'" in err


def test_cli_strip_prefix(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    net = timm.create_model("resnet18", num_classes=3)
    for k in range(2):
        torch.save({"net." + key: v for key, v in net.state_dict().items()}, tmp_path / f"m{k}.pth")
    torch.save(torch.randn(4, 3, 32, 32), tmp_path / "x.pt")
    args = ["merge", "m0.pth", "m1.pth", "--model", "resnet18", "--data", "x.pt", "--out", "o", "--batch-size", "4",
            "--stop-at", "0", "--quiet"]
    assert main(args) == 2
    assert "unexpected keys" in capsys.readouterr().err
    assert main(args + ["--strip-prefix", "net."]) == 0


@pytest.mark.parametrize("name,close", [("resnet_18", "resnet18"), ("ResNet18", "resnet18"),
                                        ("efficientnet-b0", "efficientnet_b0")])
def test_misspelt_model_names_suggest_the_close_one(name, close):
    with pytest.raises(ValueError, match=f"Similar timm names: {close}"):
        check_model_name(name)
