"""Greedy text generation from any merged causal LM, including each head of a partial zip.

A full zip saved as a ``save_pretrained`` folder generates with transformers'
own ``generate``. A partial zip is a ``torch.export`` program (or the
GraphModule ``fxzip.merge`` returned) captured at one sequence length, with
one output per model and no key/value cache, so ``generate`` cannot drive it.
A causal LM's logits at position t depend on tokens 0..t only, so the program
can still generate: the tokens so far are right-padded to the captured
length, masked out by ``attention_mask``, and the next token is read at the
last real position. Each step re-runs the whole window (no cache): fine for
trying a merge, not for serving.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from .lm_eval import logits_of

__all__ = ["greedy_generate"]


def greedy_generate(model: Callable[..., Any], input_ids: torch.Tensor, max_new_tokens: int, *,
                    attention_mask: torch.Tensor | None = None, length: int | None = None, head: int | None = None,
                    pad_token_id: int = 0, eos_token_id: int | None = None) -> torch.Tensor:
    """Extend ``input_ids`` (batch, prompt) by up to ``max_new_tokens`` greedy tokens.

    ``model`` takes ``(input_ids, attention_mask)`` by position (a partial zip's
    program or GraphModule, a merged full zip) and returns logits (a tensor, a
    dict or ``ModelOutput`` with ``logits``, or one per head: pick ``head``).
    ``attention_mask``: prompts of different lengths in one batch, right-padded
    (each row's real tokens first, as a tokenizer with ``padding_side="right"``
    gives them); every row then generates after its own last real token, as
    it would alone. None: every row is a whole prompt.
    ``length``: the sequence length the model was captured at (every call is
    padded to it); None runs each step at the longest row's length (an eager model).
    Returns (batch, longest prompt + max_new_tokens) ids, each row's prompt and
    its new tokens first, then ``pad_token_id``; rows that produced
    ``eos_token_id`` are padded after it, and generation stops when all have.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    lengths = _prompt_lengths(input_ids, attention_mask)
    prompt = input_ids.shape[1]
    if length is not None and int(lengths.max()) + max_new_tokens > length:
        raise ValueError(f"the prompt ({int(lengths.max())} tokens) plus max_new_tokens ({max_new_tokens}) exceed the "
                         f"length the model was captured at ({length}); shorten one, or capture at a longer length")
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    ids = torch.full((input_ids.shape[0], prompt + max_new_tokens), pad_token_id, dtype=input_ids.dtype,
                     device=input_ids.device)
    ids[:, :prompt] = input_ids
    positions = torch.arange(ids.shape[1], device=ids.device)
    ids[positions[None, :] >= lengths[:, None]] = pad_token_id
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            width = int(lengths.max()) if length is None else length
            window = torch.full((ids.shape[0], width), pad_token_id, dtype=ids.dtype, device=ids.device)
            n = min(width, ids.shape[1])
            window[:, :n] = ids[:, :n]
            mask = (torch.arange(width, device=ids.device)[None, :] < lengths[:, None]).to(ids.dtype)
            logits = logits_of(model(window, mask), head)
            nxt = logits[rows, lengths - 1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
            ids[rows, lengths] = nxt
            lengths = lengths + 1
            if eos_token_id is not None:
                done |= nxt == eos_token_id
                if bool(done.all()):
                    break
    return ids[:, :int(lengths.max())]


def _prompt_lengths(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Each row's number of real prompt tokens; the mask must be right padding."""
    n = input_ids.shape[1]
    if attention_mask is None:
        return torch.full((input_ids.shape[0],), n, dtype=torch.long, device=input_ids.device)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids "
                         f"{tuple(input_ids.shape)}: pass one mask entry per token")
    real = attention_mask != 0
    lengths = real.sum(1)
    expected = torch.arange(n, device=real.device)[None, :] < lengths[:, None]
    if not torch.equal(real, expected):
        row = int((real != expected).any(1).nonzero()[0])
        raise ValueError(f"attention_mask row {row} is not right padding (real tokens first, then padding); "
                         "tokenize with padding_side='right'")
    if bool((lengths == 0).any()):
        raise ValueError(f"attention_mask row {int((lengths == 0).nonzero()[0])} has no real token: every prompt "
                         "needs at least one")
    return lengths.to(torch.long)
