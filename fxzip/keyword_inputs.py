"""Batches given as dicts of keyword inputs (``{"input_ids": ..., "attention_mask": ...}``,
what a Hugging Face tokenizer or collator yields).

fxzip runs models on positional inputs (a captured graph has one placeholder
per positional parameter), so a dict batch is laid out along the model's
``forward`` signature: each key goes to the parameter of its name, a
parameter before the last given one that the batch leaves out gets its
default (``None`` for the optional inputs of transformers' models). A key the
signature does not name is an error, not silently dropped: a misspelled
``attention_mask`` would otherwise calibrate on padding.

The padding mask: a ``(batch, sequence)`` tensor given for a parameter named
``attention_mask`` (the Hugging Face convention, 1 = a real token, 0 =
padding) tells the observers which positions are real tokens, so a feature's
statistics are over real tokens only (``fxzip.stats``).
"""
from __future__ import annotations

import inspect
from typing import Any, Mapping, Sequence

import torch
from torch import nn

__all__ = ["forward_parameters", "positional_from_dict", "padding_mask_index", "PADDING_MASK", "MASKED_INPUTS"]

PADDING_MASK = "attention_mask"
"""The parameter name whose (batch, sequence) 0/1 tensor marks the real tokens."""

MASKED_INPUTS = frozenset({PADDING_MASK, "input_ids", "inputs_embeds", "token_type_ids", "position_ids"})
"""The inputs the padding mask belongs to (Hugging Face's convention). A feature
computed from any other input as well (an encoder-decoder's
``decoder_input_ids``, whose positions the mask does not describe) is not masked."""

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def forward_parameters(model: nn.Module) -> list[inspect.Parameter]:
    """The parameters of ``model.forward`` that can be passed by position, in order."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):  # a builtin or C++ forward: no signature to read
        return []
    return [p for p in params if p.kind in _POSITIONAL]


def positional_from_dict(batch: Mapping[str, Any], params: Sequence[inspect.Parameter],
                         where: str = "the data") -> tuple:
    """``batch``'s values in the order of ``params``, up to the last one given;
    the ones left out in between take their defaults."""
    names = [p.name for p in params]
    unknown = [k for k in batch if k not in names]
    if not params:
        raise TypeError(f"{where} yields dicts (keys {list(batch)}) but the model's forward has no parameters "
                        "fxzip can read by name; pass inputs=lambda batch: (batch['<key>'], ...) to order them")
    if unknown:
        raise TypeError(f"{where} yields dicts with key{'s' if len(unknown) > 1 else ''} {unknown} that the "
                        f"model's forward does not take (its parameters: {names}); rename or drop "
                        f"{'them' if len(unknown) > 1 else 'it'}, or pass inputs= to pick the model inputs")
    last = max(names.index(k) for k in batch) if batch else -1
    out = []
    for p in params[:last + 1]:
        if p.name in batch:
            out.append(batch[p.name])
        elif p.default is not inspect.Parameter.empty:
            out.append(p.default)
        else:
            raise TypeError(f"{where} yields dicts without {p.name!r}, which the model's forward requires "
                            f"before {names[last]!r} (given: {list(batch)}); add it to every batch")
    return tuple(out)


def padding_mask_index(params: Sequence[inspect.Parameter]) -> int | None:
    """Where the padding mask sits among the positional inputs, if the forward takes one."""
    names = [p.name for p in params]
    return names.index(PADDING_MASK) if PADDING_MASK in names else None


def padding_mask(inputs: tuple, index: int | None) -> torch.Tensor | None:
    """The (batch, sequence) boolean mask of real tokens of one batch of positional
    inputs, or None when there is none or it marks every position real (then the
    statistics need no selection)."""
    if index is None or index >= len(inputs):
        return None
    mask = inputs[index]
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.is_floating_point():
        return None  # an additive float mask or a 4-D one: not a padding mask fxzip can read
    real = mask != 0
    return None if bool(real.all()) else real
