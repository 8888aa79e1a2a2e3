"""Architectures from names, and weights loaded into them: what ``fxzip.save``
records of a full zip and ``fxzip.load`` rebuilds it from.

A model is named the way the CLI takes it (``--model``): a timm model name
(``resnet18``), or ``module.path:factory`` for the user's own code. A
``ModelSpec`` records that name with ``num_classes`` and ``img_size`` so that
``fxzip.load`` can rebuild the plain architecture of a saved full zip
(``build_model``); a record read from someone else's result folder only names
a registry's architecture (``spec_from_record``). ``load_into`` loads a
``state_dict`` strictly, with an error that says what differs; a prefix that a
wrapper put on every key (``module.`` of DataParallel/DDP, ``model.`` of
Lightning, ``_orig_mod.`` of ``torch.compile``) is removed when the model's own
keys do not carry it.

Reading checkpoint files from user paths is the command line's
(``fxzip.cli.checkpoints``); this module is the library's, and imports nothing
of ``fxzip.cli``.
"""
from __future__ import annotations

import importlib
import inspect
import logging
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["ModelSpec", "spec_from_record", "recorded_numbers", "build_model", "resolve_factory", "wrapper_prefix",
           "load_into", "LIBRARIES", "WRAPPER_PREFIXES"]

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


WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.")
"""Prefixes that wrappers add to every key: DataParallel / DDP (``module.``),
Lightning (``model.``: the attribute the LightningModule keeps the net in) and
``torch.compile`` (``_orig_mod.``)."""


def wrapper_prefix(state: Mapping[str, Any], own: Mapping[str, Any]) -> str | None:
    """The wrapper prefix to remove: every checkpoint key carries it, and none of
    the model's own keys do (a Hugging Face model's keys start with ``model.`` on
    purpose, and then nothing is removed)."""
    for prefix in WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in own):
            return prefix
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
