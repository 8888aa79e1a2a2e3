"""Checkpoint files from the paths a user gives the command line, and ``--model``
names checked before any work.

Checkpoints are ``state_dict`` files: ``.safetensors``, or ``.pt``/``.pth``/
``.bin``/``.ckpt`` read with ``torch.load(weights_only=True)`` (no pickled code
runs). A training checkpoint (a dict with a ``state_dict_ema``, ``model_ema``,
``state_dict`` or ``model`` entry) is unwrapped as timm's ``load_checkpoint``
does (EMA weights first). ``--strip-prefix`` removes a prefix the model's keys
do not carry; the wrappers' own prefixes are removed by
``fxzip.model_spec.load_into`` when it loads the weights.
"""
from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ..model_spec import resolve_factory, wrapper_prefix

logger = logging.getLogger(__name__)

__all__ = ["check_model_name", "read_state_dict", "strip_prefix", "classifier_classes", "CHECKPOINT_SUFFIXES"]

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")

ENTRIES = ("state_dict_ema", "model_ema", "state_dict", "model")
"""Entries of a training checkpoint that hold the weights, in timm's order of preference."""


def check_model_name(name: str) -> None:
    """Fail fast (before loading any data) on a model name that cannot be built."""
    if ":" in name:
        resolve_factory(name)
        return
    import timm

    if not timm.is_model(name):
        import difflib

        close = difflib.get_close_matches(name.lower().replace("-", "_"), timm.list_models(), n=5, cutoff=0.75)
        close += [n for n in timm.list_models(f"*{name}*") if n not in close][:8 - len(close)]
        hint = f" Similar timm names: {', '.join(close)}." if close else ""
        raise ValueError(f"--model {name!r} is not a timm model name.{hint} For your own model code pass "
                         "module.path:factory (a function returning the nn.Module).")


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str | None]:
    """The weights in ``path`` and the checkpoint entry they came from (None: the
    file is a plain state_dict). Keys are as stored: prefixes left by wrappers
    (``module.``, ``model.``) are handled by ``load_into``, which knows the model's
    own keys. Every way the file can be unreadable ends in one ``ValueError``
    that names the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path}: no such file")
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint {path} is empty (0 bytes): the save or the copy did not finish; write it again")
    if path.name.lower().endswith(".safetensors"):
        return _read_safetensors(path), None
    if _is_safetensors(path):
        raise ValueError(f"checkpoint {path} is a safetensors file under another suffix; rename it to "
                         f"{path.stem}.safetensors")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        what = str(exc).split("\n")
        culprit = next((line.strip() for line in what if "GLOBAL" in line or "Unsupported" in line), "")
        raise ValueError(f"checkpoint {path} pickles Python objects, not only tensors{f' ({culprit})' if culprit else ''}; "
                         "fxzip never unpickles code from a checkpoint. Save the weights alone where the model was "
                         "trained: torch.save(model.state_dict(), path) or safetensors.torch.save_file("
                         "model.state_dict(), path).") from None
    except (EOFError, RuntimeError, OSError, ValueError) as exc:
        raise ValueError(f"checkpoint {path} cannot be read ({type(exc).__name__}"
                         f"{': ' + _first_line(exc) if _first_line(exc) else ''}): it is truncated or not a "
                         "PyTorch file. Copy or save it again.") from None
    entry = None
    if isinstance(checkpoint, nn.Module):
        raise ValueError(f"{path} holds a whole pickled model; save its weights instead: "
                         "torch.save(model.state_dict(), path)")
    if isinstance(checkpoint, Mapping):
        for key in ENTRIES:
            if isinstance(checkpoint.get(key), Mapping) and checkpoint[key]:
                entry, checkpoint = key, checkpoint[key]
                break
    if not isinstance(checkpoint, Mapping) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        found = type(checkpoint).__name__ if not isinstance(checkpoint, Mapping) else \
            "a dict with entries " + ", ".join(map(repr, list(checkpoint)[:8]))
        raise ValueError(f"{path} is not a state_dict: found {found}. Expected a dict of tensors, or a training "
                         f"checkpoint with one of the entries {', '.join(ENTRIES)}.")
    if entry is not None:
        logger.info("%s: using the checkpoint's %r entry", path, entry)
    return dict(checkpoint), entry


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"checkpoint {path} is not a readable safetensors file ({_first_line(exc)}): it is "
                         "truncated or corrupt. Copy or save it again.") from None


def _is_safetensors(path: Path) -> bool:
    """A safetensors file starts with an 8-byte little-endian header length and a
    JSON header ``{"...``; torch files are zip archives or pickles."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 30)


def _first_line(exc: BaseException) -> str:
    """The first sentence of a library's message (the rest is often advice that
    does not apply here)."""
    lines = str(exc).strip().splitlines()
    return lines[0].split(". ")[0].rstrip(".") if lines else ""


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str, source: str) -> dict[str, torch.Tensor]:
    """``state`` with ``prefix`` removed from every key; keys without it are an
    error (a prefix names one wrapper; a partial match means another layout)."""
    without = [k for k in state if not k.startswith(prefix)]
    if without:
        raise ValueError(f"--strip-prefix {prefix!r}: {len(without)} keys of {source} do not start with it (e.g. "
                         f"{without[0]!r}); pass the prefix that every key carries")
    return {k[len(prefix):]: v for k, v in state.items()}


def classifier_classes(model: nn.Module, state: Mapping[str, torch.Tensor]) -> int | None:
    """The number of classes of the checkpoint's classifier (timm models name it in
    their ``pretrained_cfg``), or None when it cannot be told."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    classifier = cfg.get("classifier") if isinstance(cfg, dict) else None
    names = [classifier] if isinstance(classifier, str) else list(classifier or ())
    prefix = wrapper_prefix(state, model.state_dict()) or ""
    for name in names:
        weight = state.get(f"{prefix}{name}.weight")
        if weight is not None and weight.dim() >= 1:
            return int(weight.shape[0])
    return None
