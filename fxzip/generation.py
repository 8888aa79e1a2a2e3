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
                    length: int | None = None, head: int | None = None, pad_token_id: int = 0,
                    eos_token_id: int | None = None) -> torch.Tensor:
    """Extend ``input_ids`` (batch, prompt) by up to ``max_new_tokens`` greedy tokens.

    ``model`` takes ``(input_ids, attention_mask)`` by position (a partial zip's
    program or GraphModule, a merged full zip) and returns logits (a tensor, a
    dict or ``ModelOutput`` with ``logits``, or one per head: pick ``head``).
    ``length``: the sequence length the model was captured at (every call is
    padded to it); None runs each step at its own length (an eager model).
    Rows that produced ``eos_token_id`` are padded with ``pad_token_id`` after it.
    Every row of ``input_ids`` is a whole prompt of real tokens (no padding):
    generate prompts of different lengths one call each.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    prompt = input_ids.shape[1]
    if length is not None and prompt + max_new_tokens > length:
        raise ValueError(f"the prompt ({prompt} tokens) plus max_new_tokens ({max_new_tokens}) exceed the length "
                         f"the model was captured at ({length}); shorten one, or capture at a longer length")
    ids = input_ids.clone()
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            n = ids.shape[1]
            width = n if length is None else length
            window = torch.full((ids.shape[0], width), pad_token_id, dtype=ids.dtype, device=ids.device)
            window[:, :n] = ids
            mask = torch.zeros_like(window)
            mask[:, :n] = 1
            logits = logits_of(model(window, mask), head)
            nxt = logits[:, n - 1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
            ids = torch.cat([ids, nxt[:, None]], 1)
            if eos_token_id is not None:
                done |= nxt == eos_token_id
                if bool(done.all()):
                    break
    return ids
