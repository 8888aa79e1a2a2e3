"""Library code logs, warns or raises; it never prints (issue 13, item 7).
The command line (fxzip/cli/parser.py, commands.py, demo.py) is the only printer."""
from __future__ import annotations

import ast
import logging
from pathlib import Path

import torch
from torch import nn

import fxzip
from fxzip.zoo import small_cnn

ROOT = Path(__file__).resolve().parents[1]
PRINTERS = {"fxzip/cli/parser.py", "fxzip/cli/commands.py", "fxzip/cli/demo.py", "fxzip/cli/pretrained.py",
            "fxzip/cli/sweep_lm.py"}  # the commands: their results go to stdout


def test_no_print_in_library_code():
    offenders = []
    for path in sorted([*ROOT.glob("fxzip/**/*.py"), *ROOT.glob("passes/**/*.py")]):
        rel = path.relative_to(ROOT).as_posix()
        if rel in PRINTERS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                offenders.append(f"{rel}:{node.lineno}")
    assert not offenders, f"print() in library code (use logging.getLogger(__name__)): {offenders}"


def test_a_quiet_merge_writes_nothing(capsys, caplog):
    torch.manual_seed(0)
    a, b = small_cnn(out_dim=4, in_channels=3, width=8).eval(), small_cnn(out_dim=4, in_channels=3, width=8).eval()
    with caplog.at_level(logging.WARNING, logger="fxzip"):
        fxzip.merge(a, b, data=[torch.randn(4, 3, 8, 8)], progress=False)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    assert not caplog.records  # nothing for the user to change here


class _BatchLoop(nn.Module):
    """Python control flow on the batch size: captured for that batch size."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return torch.stack([self.fc(x[b]) for b in range(x.shape[0])])


def test_informational_messages_are_logged(caplog):
    with caplog.at_level(logging.INFO, logger="fxzip"):
        fxzip.trace(_BatchLoop(), torch.randn(2, 4))
    (record,) = [r for r in caplog.records if r.name == "fxzip.trace"]
    assert record.levelno == logging.INFO
    assert "_BatchLoop: the batch size cannot stay symbolic" in record.getMessage()
    assert "capturing it for batches of 2" in record.getMessage()


class _Named(nn.Module):
    """small_cnn's structure under other module names."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.act, self.second = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.second(self.act(self.first(x)))


def test_an_alignment_by_structure_is_logged(caplog):
    from fxzip.trunk import analyze_models

    x = torch.randn(2, 3, 6, 6)
    plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    with caplog.at_level(logging.INFO, logger="fxzip"):
        common, _ = analyze_models([fxzip.trace(plain, x), fxzip.trace(_Named(), x)])
    assert common is not None and common.full
    assert any(r.name == "fxzip.trunk" and "aligned as one architecture" in r.getMessage() for r in caplog.records)
