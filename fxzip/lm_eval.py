"""Language models scored on held-out text: perplexity, the sequence-level
mixture of several models, and multiply-adds per token.

Every function here is pure: the models run in eval mode under ``no_grad``
(each submodule's train flag is put back afterwards), nothing is drawn at
random, and the same batches give the same numbers.

**What is counted.** A causal LM's logits at position ``t`` predict the token at
``t + 1``. A target is counted where both ``t`` and ``t + 1`` are real tokens
(``attention_mask`` 1): the first token of a row has no prediction, and a
padded position is neither predicted nor used as context. What padded positions
hold never enters a score.

**Precision.** The log-softmax is taken in float64, a few rows of logits at a
time (at most ``CHUNK_ELEMENTS`` numbers at once: a bound on the extra memory
with vocabularies of 10^5 tokens), then the log-probabilities of the targets
are gathered and summed in float64. Sums over thousands of tokens in float32
would lose about 1e-4 of a sequence's log-likelihood; the mixture needs each
sequence's log-likelihood whole (it combines models per sequence, not per
token), so the sums are float64 from the start. The logits themselves are
whatever the model computes (float32, or bfloat16 on an accelerator).

**Outputs.** A model's forward may return a ``ModelOutput`` (``.logits``), a dict
with ``"logits"``, a tensor of logits, or a tuple of those, one per model (a
partial zip, an ensemble): ``head=k`` picks output ``k``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

__all__ = ["SequenceScores", "PerplexityResult", "logits_of", "target_log_probs", "sequence_log_likelihoods",
           "perplexity", "perplexity_of", "mixture_perplexity", "mixture_of", "macs_per_token", "CHUNK_ELEMENTS"]

CHUNK_ELEMENTS = 1 << 24
"""The float64 log-softmax runs on at most this many logits at once (128 MiB)."""


@dataclass(frozen=True)
class SequenceScores:
    """Per sequence (row), in the order of the batches: the sum of log p(next
    token) over the row's targets (float64) and how many targets it has (int64)."""

    log_likelihood: Tensor
    tokens: Tensor

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True)
class PerplexityResult:
    """``nll``: negative log-likelihood per target token (nats); ``perplexity``:
    ``exp(nll)``; ``tokens``: targets counted; ``sequences``: rows scored."""

    nll: float
    perplexity: float
    tokens: int
    sequences: int


def logits_of(output: Any, head: int | None = None) -> Tensor:
    """The logits in a forward's ``output``: a ``ModelOutput`` (``.logits``), a
    dict with ``"logits"``, a tensor, or a tuple / list of those (``head`` picks
    one; a tuple of one needs none)."""
    if isinstance(output, (tuple, list)):
        if head is None:
            if len(output) != 1:
                raise ValueError(f"the model returns {len(output)} outputs (one per model: a partial zip or an "
                                 "ensemble); pass head=k to score output k")
            head = 0
        if not -len(output) <= head < len(output):
            raise ValueError(f"head={head}, but the model returns {len(output)} outputs")
        return logits_of(output[head])
    if head is not None:
        raise ValueError(f"head={head}, but the model returns one output ({type(output).__name__}), not one per "
                         "model; leave head out")
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise TypeError(f"cannot find logits in the model's output ({type(output).__name__}); expected a ModelOutput "
                    "with .logits, a dict with 'logits', a tensor, or a tuple of those")


def target_log_probs(logits: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None
                     ) -> tuple[Tensor, Tensor]:
    """Per row of one batch: the float64 sum of log p(input_ids[t + 1]) from
    ``logits[:, t]`` over the targets (both t and t + 1 real tokens), and the
    number of targets (int64)."""
    if logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
        raise ValueError(f"logits of shape {tuple(logits.shape)} do not fit input_ids of shape "
                         f"{tuple(input_ids.shape)}; expected (batch, sequence, vocabulary) logits of a causal LM")
    ids = input_ids.to(logits.device)
    real = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.to(ids.device) != 0
    counted = real[:, :-1] & real[:, 1:]
    targets = torch.where(counted, ids[:, 1:], 0)  # whatever a padded position holds, it is never read
    rows, length, vocab = logits.shape
    length -= 1
    step = max(1, CHUNK_ELEMENTS // max(1, length * vocab))
    picked = []
    for start in range(0, rows, step):
        chunk = logits[start:start + step, :-1].to(torch.float64).log_softmax(-1)
        picked.append(chunk.gather(-1, targets[start:start + step, :, None]).squeeze(-1))
    logp = torch.cat(picked) if picked else torch.zeros(0, length, dtype=torch.float64, device=logits.device)
    logp = torch.where(counted, logp, torch.zeros((), dtype=torch.float64, device=logp.device))
    return logp.sum(1).cpu(), counted.sum(1).to(torch.int64).cpu()


def _device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _split(batch: Any) -> tuple[Tensor, Tensor | None]:
    """(input_ids, attention_mask or None) of a batch: a dict (a tokenizer's), a
    tuple / list (ids, mask), or a tensor of ids."""
    if isinstance(batch, Mapping):
        if "input_ids" not in batch:
            raise ValueError(f"a batch without input_ids (keys: {', '.join(map(str, batch))})")
        return batch["input_ids"], batch.get("attention_mask")
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0], batch[1] if len(batch) > 1 else None
    raise TypeError(f"a batch is a {type(batch).__name__}; expected a dict of input_ids and attention_mask, a "
                    "tuple (input_ids, attention_mask) or a tensor of ids")


def _inputs(model: nn.Module, ids: Tensor, mask: Tensor | None) -> tuple:
    """The positional inputs of ``model`` for one batch: laid out by name where
    its forward takes input_ids (and attention_mask) by those names (a
    transformers model), else ``(input_ids, attention_mask)`` (a merged graph,
    an exported program)."""
    from .keyword_inputs import forward_parameters, positional_from_dict

    batch = {"input_ids": ids} if mask is None else {"input_ids": ids, "attention_mask": mask}
    params = forward_parameters(model)
    if set(batch) <= {p.name for p in params}:
        return positional_from_dict(batch, params)
    return tuple(batch.values())


def _forward(model: nn.Module, ids: Tensor, mask: Tensor | None) -> Any:
    device = _device(model)
    return model(*_inputs(model, ids.to(device), None if mask is None else mask.to(device)))


@torch.no_grad()
def sequence_log_likelihoods(model: nn.Module, batches: Iterable[Any], head: int | None = None) -> SequenceScores:
    """Each row's log-likelihood under ``model`` (output ``head`` of a model with
    one output per model) and its number of targets; see the module docstring."""
    from .evaluate import _eval_mode

    lls, counts = [], []
    with _eval_mode(model):
        for batch in batches:
            ids, mask = _split(batch)
            ll, n = target_log_probs(logits_of(_forward(model, ids, mask), head), ids, mask)
            lls.append(ll)
            counts.append(n)
    if not lls:
        raise ValueError("no batches to score")
    return SequenceScores(torch.cat(lls), torch.cat(counts))


def perplexity_of(scores: SequenceScores) -> PerplexityResult:
    """Perplexity from per-sequence scores: exp(total negative log-likelihood /
    total targets), every token weighing the same (not every sequence)."""
    tokens = int(scores.tokens.sum())
    if tokens == 0:
        raise ValueError("no targets to score: every row has fewer than two real tokens")
    nll = float(-scores.log_likelihood.sum() / tokens)
    return PerplexityResult(nll, math.exp(nll), tokens, len(scores))


def perplexity(model: nn.Module, batches: Iterable[Any], head: int | None = None) -> PerplexityResult:
    """The perplexity of ``model`` (output ``head``) on ``batches`` (lower is better)."""
    return perplexity_of(sequence_log_likelihoods(model, batches, head))


def mixture_of(scores: Sequence[SequenceScores]) -> PerplexityResult:
    """The perplexity of the sequence-level mixture p(x) = (p_1(x) + ... + p_N(x)) / N
    of models whose scores on the same rows are ``scores``: per row
    logsumexp_k(log p_k(x)) - log N, summed over rows and divided by the targets.
    It is the ensemble that does not know the domain, scored per token. Per
    row its negative log-likelihood lies between the best model's and the best
    model's + log N; in total it is never above the models' mean."""
    if not scores:
        raise ValueError("a mixture of no models")
    first = scores[0]
    for k, s in enumerate(scores[1:], start=1):
        if len(s) != len(first) or not torch.equal(s.tokens, first.tokens):
            raise ValueError(f"the scores of model {k} are not on the same rows as model 0's ({len(s)} rows, "
                             f"{int(s.tokens.sum())} targets; model 0: {len(first)} rows, {int(first.tokens.sum())})")
    ll = torch.stack([s.log_likelihood for s in scores]).logsumexp(0) - math.log(len(scores))
    return perplexity_of(SequenceScores(ll, first.tokens))


def mixture_perplexity(models: Sequence[nn.Module], batches: Iterable[Any],
                       heads: Sequence[int | None] | None = None) -> PerplexityResult:
    """``mixture_of`` the models' scores on ``batches`` (iterated once per model:
    pass a re-iterable, e.g. a list or ``TextSource.loader()``). ``heads``: the
    output of each model to score (None: its only output)."""
    heads = [None] * len(models) if heads is None else list(heads)
    if len(heads) != len(models):
        raise ValueError(f"{len(heads)} heads for {len(models)} models")
    return mixture_of([sequence_log_likelihoods(m, batches, hd) for m, hd in zip(models, heads)])


def macs_per_token(model: nn.Module, example_batch: Any) -> float:
    """Multiply-adds of one forward pass on ``example_batch`` (``fxzip.evaluate.count_macs``)
    divided by its B x L positions: a forward spends them on every position,
    padded or not, so this is the cost per position at the batch's sequence
    length (attention grows with it). Pass rows of the evaluation's length."""
    from .evaluate import count_macs

    ids, mask = _split(example_batch)
    return count_macs(model, _inputs(model, ids, mask)) / ids.numel()
