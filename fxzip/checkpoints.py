"""Models from names and weights from files, for the command line and ``fxzip.load``.

A model is named the way the CLI takes it (``--model``): a timm model name
(``resnet18``), or ``module.path:factory`` for the user's own code. A
``ModelSpec`` records that name with ``num_classes`` and ``img_size`` so that
``fxzip.load`` can rebuild the plain architecture of a saved full zip.

Checkpoints are ``state_dict`` files: ``.safetensors``, or ``.pt``/``.pth``/
``.bin``/``.ckpt`` read with ``torch.load(weights_only=True)`` (no pickled code
runs). A training checkpoint (a dict with a ``state_dict_ema``, ``model_ema``,
``state_dict`` or ``model`` entry) is unwrapped as timm's ``load_checkpoint``
does (EMA weights first). A prefix that a wrapper put on every key
(``module.`` of DataParallel/DDP, ``model.`` of Lightning, ``_orig_mod.`` of
``torch.compile``) is removed when the model's own keys do not carry it
(``--strip-prefix`` names another).
"""
from __future__ import annotations

import importlib
import inspect
import logging
import os
import pickle
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["ModelSpec", "spec_from_record", "recorded_numbers", "build_model", "read_state_dict", "strip_prefix",
           "wrapper_prefix", "load_into", "classifier_classes", "CHECKPOINT_SUFFIXES"]

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")

ENTRIES = ("state_dict_ema", "model_ema", "state_dict", "model")
"""Entries of a training checkpoint that hold the weights, in timm's order of preference."""


LIBRARIES = ("timm", "torchvision")
"""Model registries an architecture may be named from. A name in one of them
builds a model from library code the user installed; nothing is imported by
name (see ``spec_from_record``)."""

UNSAFE_KWARGS = frozenset({"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "pretrained_strict",
                           "checkpoint_path", "cache_dir", "weights", "weights_backbone", "progress",
                           "features_only", "scriptable", "exportable"})
"""Builder arguments a result folder may not set: they read files or the
network (weights, caches), or change what is built beyond the architecture."""


@dataclass
class ModelSpec:
    """How to build an architecture: ``name`` (a timm or torchvision name, or
    ``module:factory`` for the user's own code), ``num_classes`` and ``img_size``
    (passed only where the model takes them), and ``library``: ``"timm"``,
    ``"torchvision"`` or None (a timm name, or a factory)."""

    name: str
    num_classes: int | None = None
    img_size: int | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    library: str | None = None

    @property
    def is_factory(self) -> bool:
        return ":" in self.name

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelSpec":
        """A spec from the caller's own dict (trusted: a factory is imported when
        built). For a record read from a file use ``spec_from_record``."""
        return cls(data["name"], data.get("num_classes"), data.get("img_size"), dict(data.get("kwargs") or {}),
                   data.get("library"))


def spec_from_record(data: Any, source: str) -> ModelSpec:
    """A ``ModelSpec`` from a record in a file someone else may have written
    (``report.json`` of a shared result folder).

    Such a record only names an architecture of a registry (``LIBRARIES``) with
    plain numbers and strings as arguments: a ``module:factory`` would import and
    call any function (``os:system``), and builder arguments such as
    ``checkpoint_path`` or ``pretrained_cfg_overlay`` read other files or the
    network, so both are refused, with the way to pass the model instead.
    """
    fix = ("pass the architecture yourself: fxzip.load(DIR, model=...) with the module (e.g. "
           "timm.create_model(NAME, num_classes=N)), a registry name, or a ModelSpec")
    if not isinstance(data, Mapping) or not isinstance(data.get("name"), str) or not data["name"]:
        raise ValueError(f"{source}: the recorded architecture is not a name ({data!r:.80}); {fix}")
    name, library = data["name"], data.get("library")
    if ":" in name:
        raise ValueError(f"{source} names the architecture {name!r} as module:factory code; fxzip.load never "
                         "imports or calls code named in a result folder (a folder from elsewhere could name any "
                         f"function). If you trust that code, {fix}, e.g. model={name!r}.")
    if library is not None and library not in LIBRARIES:
        raise ValueError(f"{source}: library {library!r} is not one fxzip builds from ({', '.join(LIBRARIES)}); "
                         f"{fix}")
    num_classes, img_size = recorded_numbers(data, source)
    kwargs = data.get("kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"{source}: kwargs must be a dict, got {type(kwargs).__name__}; {fix}")
    for key, value in kwargs.items():
        if not isinstance(key, str) or not key.isidentifier() or key.startswith("_") or key in UNSAFE_KWARGS:
            raise ValueError(f"{source}: the builder argument {key!r} may not come from a result folder (it reads "
                             f"files or changes what is built); {fix}")
        if not _plain(value):
            raise ValueError(f"{source}: the builder argument {key!r} holds {type(value).__name__} data; only "
                             f"numbers, strings, booleans and lists of them are read from a result folder; {fix}")
    spec = ModelSpec(name, num_classes, img_size, dict(kwargs), library)
    if library is None:  # records before the library was written down: the name decides
        spec.library = _library_of(name)
        if spec.library is None:
            raise ValueError(f"{source}: {name!r} is neither a timm nor a torchvision model name; {fix}")
    return spec


def recorded_numbers(data: Mapping[str, Any], source: str) -> tuple[int | None, int | None]:
    """``num_classes`` and ``img_size`` of a record, each None or a non-negative int."""
    values = []
    for key in ("num_classes", "img_size"):
        value = data.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{source}: {key} must be a non-negative integer, got {value!r}; pass model= "
                             "(the architecture as a module or a ModelSpec) to fxzip.load")
        values.append(value)
    return values[0], values[1]


def _plain(value: Any, depth: int = 0) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    return depth < 2 and isinstance(value, (list, tuple)) and all(_plain(v, depth + 1) for v in value)


def _library_of(name: str) -> str | None:
    """The registry that knows ``name`` (timm first: the CLI's names are timm's)."""
    import timm

    if timm.is_model(name):
        return "timm"
    import torchvision

    return "torchvision" if name in torchvision.models.list_models() else None


def resolve_factory(name: str) -> Callable[..., nn.Module]:
    """``module.path:factory`` -> the callable (the current directory is importable,
    as for ``python -m``)."""
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--model {name!r}: a factory is written module.path:function, e.g. mypkg.models:make_net")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"--model {name!r}: cannot import module {module_name!r} ({exc}). Run fxzip from the "
                         "directory that contains it, or add that directory to PYTHONPATH.") from exc
    factory = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise ValueError(f"--model {name!r}: module {module_name!r} has no attribute {attr!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ValueError(f"--model {name!r}: {attr!r} in {module_name!r} is not callable")
    return factory


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


def _accepts(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def build_model(spec: ModelSpec) -> nn.Module:
    """A fresh, randomly initialised model (never downloads weights), in eval mode.

    timm: ``timm.create_model(name, num_classes=..., pretrained=False)`` with
    ``img_size`` when the model takes it (ViTs and other models whose position
    tables depend on it). torchvision (``library="torchvision"``):
    ``get_model(name, weights=None)``, ``img_size`` as ``image_size``. A factory gets ``num_classes``/``img_size`` only when its
    signature accepts them. ``spec.img_size`` is set to None when the model does
    not take it (CNNs run at any size), so the spec rebuilds the model as built.
    """
    kwargs = dict(spec.kwargs)
    if spec.is_factory:
        factory = resolve_factory(spec.name)
        for key in ("num_classes", "img_size"):
            value = getattr(spec, key)
            if value is not None and _accepts(factory, key):
                kwargs[key] = value
            elif key == "img_size":
                spec.img_size = None
        model = factory(**kwargs)
        if not isinstance(model, nn.Module):
            raise TypeError(f"--model {spec.name!r} returned a {type(model).__name__}, not an nn.Module")
        return model.eval()
    if spec.library == "torchvision":
        return _build_torchvision(spec, kwargs)
    if spec.library not in (None, "timm"):
        raise ValueError(f"model library {spec.library!r} is not one fxzip builds from ({', '.join(LIBRARIES)})")
    import timm

    if spec.num_classes is not None:
        kwargs["num_classes"] = spec.num_classes
    if spec.img_size is not None:
        try:
            return timm.create_model(spec.name, pretrained=False, img_size=spec.img_size, **kwargs).eval()
        except TypeError as exc:
            if "img_size" not in str(exc):
                raise
            spec.img_size = None  # the model takes no img_size: the data's size is all it needs
    return timm.create_model(spec.name, pretrained=False, **kwargs).eval()


def _build_torchvision(spec: ModelSpec, kwargs: dict[str, Any]) -> nn.Module:
    """``torchvision.models.get_model(name, weights=None)``: random weights, nothing
    downloaded; ``img_size`` as ``image_size`` for the models that take it (ViTs)."""
    import torchvision

    if spec.name not in torchvision.models.list_models():
        raise ValueError(f"{spec.name!r} is not a torchvision model name (torchvision.models.list_models())")
    if spec.num_classes is not None:
        kwargs["num_classes"] = spec.num_classes
    if spec.img_size is not None:
        try:
            return torchvision.models.get_model(spec.name, weights=None, image_size=spec.img_size, **kwargs).eval()
        except TypeError as exc:
            if "image_size" not in str(exc):
                raise
            spec.img_size = None
    return torchvision.models.get_model(spec.name, weights=None, **kwargs).eval()


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


WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.")
"""Prefixes that wrappers add to every key: DataParallel / DDP (``module.``),
Lightning (``model.``: the attribute the LightningModule keeps the net in) and
``torch.compile`` (``_orig_mod.``)."""


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str, source: str) -> dict[str, torch.Tensor]:
    """``state`` with ``prefix`` removed from every key; keys without it are an
    error (a prefix names one wrapper; a partial match means another layout)."""
    without = [k for k in state if not k.startswith(prefix)]
    if without:
        raise ValueError(f"--strip-prefix {prefix!r}: {len(without)} keys of {source} do not start with it (e.g. "
                         f"{without[0]!r}); pass the prefix that every key carries")
    return {k[len(prefix):]: v for k, v in state.items()}


def wrapper_prefix(state: Mapping[str, Any], own: Mapping[str, Any]) -> str | None:
    """The wrapper prefix to remove: every checkpoint key carries it, and none of
    the model's own keys do (a Hugging Face model's keys start with ``model.`` on
    purpose, and then nothing is removed)."""
    for prefix in WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in own):
            return prefix
    return None


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


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> nn.Module:
    """``model.load_state_dict(state, strict=True)`` with an error that says what
    differs (missing/unexpected keys, shapes) and what to change. A wrapper's
    prefix (``WRAPPER_PREFIXES``) carried by every key of ``state`` and by none
    of the model's is removed first, and the log says so."""
    own = model.state_dict()
    prefix = wrapper_prefix(state, own)
    if prefix is not None:
        logger.info("%s: every key starts with %r and the model's do not: removing it (a wrapper's prefix)",
                    source, prefix)
        state = {k[len(prefix):]: v for k, v in state.items()}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append("shapes differ: " + "; ".join(shapes[:4]) + (" ..." if len(shapes) > 4 else ""))
        if missing:
            parts.append(f"{len(missing)} missing keys ({', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({', '.join(unexpected[:4])}"
                         f"{' ...' if len(unexpected) > 4 else ''})")
        raise ValueError(f"{source} does not fit the model: " + "; ".join(parts) + ". Check --model, "
                         "--num-classes and --img-size (they must build the architecture the checkpoint was "
                         "trained with).")
    model.load_state_dict(dict(state), strict=True)
    return model
