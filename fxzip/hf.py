"""Hugging Face checkpoints in and out: ``save_pretrained`` folders.

A folder is read as data, never as code: its ``config.json`` must name a
model class that ``transformers`` itself ships (``auto_map``, which points
at Python files inside the folder, is refused: ``trust_remote_code`` stays
off), and the weights are read by ``from_pretrained`` from safetensors.

Merged models share the input and output vocabulary, so the models must share
the tokenizer: same vocabulary, same merges, same special tokens. A
difference is named (the first token whose id differs), since merging two
embedding tables indexed by different vocabularies gives a model that reads
neither.

A full zip is written back as a ``save_pretrained`` folder of the first
model's class and config, so ``AutoModelForCausalLM.from_pretrained(OUT)``
loads it without fxzip; the tokenizer is saved beside it. Tied input and
output embeddings stay tied only where the tie holds in the merged weights
(``passes.ties``); otherwise both tensors are written and the saved config
says ``tie_word_embeddings: false``, so loading cannot overwrite one with the
other.

``transformers`` is an optional dependency (``pip install -e ".[hf]"``);
nothing here imports it until a Hugging Face folder or model is met.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .passes.ties import keep_or_untie, tied_names
from .result_dir import PRETRAINED_FILES

__all__ = ["CONFIG", "PRETRAINED_FILES", "is_pretrained_dir", "is_pretrained_model", "check_pretrained_dir",
           "load_pretrained", "load_tokenizer", "tokenizer_difference", "write_pretrained", "require_transformers"]

CONFIG = "config.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def require_transformers(what: str) -> Any:
    """``transformers``, or an ImportError saying how to install it."""
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(f"{what} needs the Hugging Face transformers package: pip install -e \".[hf]\" "
                          "(or pip install transformers)") from exc
    return transformers


def is_pretrained_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` looks like a ``save_pretrained`` folder (it holds ``config.json``)."""
    return Path(path).is_dir() and (Path(path) / CONFIG).is_file()


def is_pretrained_model(module: Any) -> bool:
    """Whether ``module`` is a transformers ``PreTrainedModel`` (without importing transformers)."""
    return isinstance(module, nn.Module) and any(
        cls.__module__.startswith("transformers.") and cls.__name__ == "PreTrainedModel"
        for cls in type(module).__mro__)


def check_pretrained_dir(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``path/config.json`` before anything is loaded; returns it."""
    root = Path(path)
    try:
        config = json.loads((root / CONFIG).read_text())
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{root}/{CONFIG} cannot be read as JSON ({exc}); pass a folder written by "
                         "save_pretrained") from None
    if not isinstance(config, dict):
        raise ValueError(f"{root}/{CONFIG} holds a {type(config).__name__}, not a model config")
    if config.get("auto_map"):
        raise ValueError(f"{root}/{CONFIG} names code inside the folder (auto_map: {config['auto_map']}): fxzip "
                         "never runs code from a checkpoint (trust_remote_code is off). Use a model class that "
                         "transformers ships, or load the model yourself and call fxzip.merge from Python")
    if not any((root / name).is_file() for name in WEIGHT_FILES):
        raise ValueError(f"{root} holds no weights ({', '.join(WEIGHT_FILES)}); save the model with "
                         "model.save_pretrained(folder)")
    return config


def _model_class(transformers: Any, config: dict[str, Any], root: Path) -> Any:
    """The class ``config.json`` names (``architectures``), if transformers ships it;
    else the causal-LM auto class."""
    names = config.get("architectures") or []
    for name in names:
        cls = getattr(transformers, str(name), None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    if names:
        raise ValueError(f"{root}/{CONFIG} names the architecture {names[0]!r}, which transformers "
                         f"{transformers.__version__} does not ship; upgrade transformers or load the model "
                         "yourself and call fxzip.merge from Python")
    return transformers.AutoModelForCausalLM


def load_pretrained(path: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """The model of a ``save_pretrained`` folder, in eval mode, caches off
    (calibration runs whole sequences; a cache would only cost memory).
    ``dtype``: compute in this dtype (default: the checkpoint's, as
    ``from_pretrained`` loads it; float32 gives exact statistics of a float16 /
    bfloat16 checkpoint at twice its memory)."""
    root = Path(path)
    config = check_pretrained_dir(root)
    transformers = require_transformers(f"loading {root}")
    cls = _model_class(transformers, config, root)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = cls.from_pretrained(str(root), trust_remote_code=False, **kwargs)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return model.eval()


def load_tokenizer(path: str | os.PathLike) -> Any | None:
    """The tokenizer saved in ``path``, or None when the folder holds none."""
    root = Path(path)
    if not any((root / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json",
                                                      "tokenizer.model", "vocab.txt")):
        return None
    transformers = require_transformers(f"reading the tokenizer of {root}")
    return transformers.AutoTokenizer.from_pretrained(str(root), trust_remote_code=False)


def _backend(tokenizer: Any) -> dict[str, Any]:
    """The fast tokenizer's pipeline as JSON (empty for a slow tokenizer)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return json.loads(backend.to_str()) if backend is not None else {}


def _merges(tokenizer: Any) -> list[Any] | None:
    return _backend(tokenizer).get("model", {}).get("merges")


_PIPELINE = ("normalizer", "pre_tokenizer", "decoder")


def tokenizer_difference(tokenizers: list[Any], names: list[str]) -> str | None:
    """The first difference between the tokenizers (vocabulary, merges, special
    tokens), in words, or None when they are the same."""
    first, first_name = tokenizers[0], names[0]
    vocab = first.get_vocab()
    for tok, name in zip(tokenizers[1:], names[1:]):
        other = tok.get_vocab()
        if len(other) != len(vocab):
            return f"{name}'s vocabulary has {len(other)} tokens, {first_name}'s {len(vocab)}"
        for token, index in sorted(vocab.items(), key=lambda kv: kv[1]):
            if other.get(token) != index:
                theirs = other.get(token)
                return (f"token {token!r} is id {index} in {first_name} and "
                        f"{'missing' if theirs is None else f'id {theirs}'} in {name}")
        m0, m1 = _merges(first), _merges(tok)
        if m0 != m1:
            if m0 is None or m1 is None:
                return f"one of {first_name} and {name} is a BPE tokenizer with merges and the other is not"
            k = next((i for i, (a, b) in enumerate(zip(m0, m1)) if a != b), min(len(m0), len(m1)))
            return (f"their BPE merges differ from merge {k} on ({m0[k] if k < len(m0) else 'none'} in "
                    f"{first_name}, {m1[k] if k < len(m1) else 'none'} in {name})")
        b0, b1 = _backend(first), _backend(tok)
        for part in _PIPELINE:  # the same vocabulary split differently is another tokenizer
            if b0.get(part) != b1.get(part):
                return f"their {part.replace('_', '-')}s differ ({first_name}: {b0.get(part)}, {name}: {b1.get(part)})"
        m0k, m1k = b0.get("model", {}), b1.get("model", {})
        if m0k.get("type") != m1k.get("type") or (m0k.get("type") == "Unigram" and m0k.get("vocab") != m1k.get("vocab")):
            return f"their models differ ({m0k.get('type')} in {first_name}, {m1k.get('type')} in {name})"
        for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
            if getattr(first, attr, None) != getattr(tok, attr, None):
                return (f"{attr} is {getattr(first, attr, None)} in {first_name} and {getattr(tok, attr, None)} "
                        f"in {name}")
    return None


def write_pretrained(result: nn.Module, like: nn.Module, folder: str | os.PathLike,
                     tokenizer: Any | None = None) -> list[str]:
    """Write a full zip ``result`` into ``folder`` as a ``save_pretrained`` folder
    of ``like``'s class and config (``like``: one of the merged models, not
    changed); the tokenizer beside it. Returns the names of the files written."""
    folder = Path(folder)
    state = result.state_dict()
    target = copy.deepcopy(like).cpu()
    own = target.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise ValueError(f"the merged model lacks {missing[:3]} of {type(like).__name__}'s weights: it is not a full "
                         "zip of this architecture (a partial zip or a merged width is saved as a program)")
    ties_before = tied_names(target)
    keep_or_untie(target, state)  # a tie whose two roles now hold different tensors is broken, never averaged
    untied = [names for names in ties_before if names not in tied_names(target)]
    with torch.no_grad():
        for name, tensor in target.state_dict(keep_vars=True).items():
            tensor.copy_(state[name])
    if untied:
        for config in {id(c): c for c in (target.config, _text_config(target.config))}.values():
            if hasattr(config, "tie_word_embeddings"):
                config.tie_word_embeddings = False
    before = set(os.listdir(folder)) if folder.exists() else set()
    target.save_pretrained(str(folder), safe_serialization=True, max_shard_size="1000GB")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return sorted(set(os.listdir(folder)) - before)


def _text_config(config: Any) -> Any:
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config
