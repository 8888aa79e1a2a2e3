"""How fxzip reads ``data``: batches in, model inputs out.

Every floating input tensor is checked for NaN and Inf as it is read (its sum
is finite exactly when every element is, unless it overflows, which the exact
``torch.isfinite`` check then settles; about 0.3% of a resnet18 forward):
such a batch would fill the statistics with NaN and fail far away (the
matcher), so it is an error naming the batch. Under ``torch.distributed`` the
rank that met it finishes its pass and every rank raises at the pass's end
(no rank is left waiting in a collective).
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from . import distributed as _dist
from .keyword_inputs import forward_parameters, padding_mask, padding_mask_index
from .trace import example_from_data

__all__ = ["Batches"]


class Batches:
    """A re-iterable view of the user's ``data`` (a DataLoader, a list of tensors,
    of (x, y) tuples or of dicts of keyword inputs, or a one-shot iterator, which
    is materialised once), capped at ``max_batches``, yielding model inputs as
    tuples. Dicts are laid out along the forward of ``model``
    (``fxzip.keyword_inputs``)."""

    def __init__(self, data: Iterable[Any], max_batches: int | None = None,
                 inputs: Callable[[Any], Any] | None = None, model: nn.Module | None = None):
        if data is None:
            raise ValueError("data is None: fxzip needs unlabeled inputs to calibrate (a few hundred "
                             "images suffice), e.g. a DataLoader over the training set.")
        if isinstance(data, torch.Tensor):
            raise TypeError("data is a single tensor; pass an iterable of batches, e.g. [x] or "
                            "torch.split(x, 64)")
        if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
            raise TypeError(f"data is a Dataset ({type(data).__name__}), which yields single samples, not "
                            "batches: wrap it in a DataLoader, e.g. torch.utils.data.DataLoader(dataset, "
                            "batch_size=64)")
        if max_batches is not None and max_batches < 1:
            raise ValueError(f"max_batches must be >= 1, got {max_batches}")
        try:
            one_shot = iter(data) is data
        except TypeError as exc:
            raise TypeError(f"data must be iterable (a DataLoader or a list of batches), got "
                            f"{type(data).__name__}") from exc
        if one_shot:
            data = list(itertools.islice(data, max_batches))
        self.data, self.max_batches, self.inputs = data, max_batches, inputs
        # dict batches are laid out along the forward of ``model`` (fxzip.keyword_inputs)
        self.parameters = forward_parameters(model) if model is not None else None
        self.mask_index = padding_mask_index(self.parameters) if self.parameters else None
        first = next(iter(self), None)
        if first is None:
            raise ValueError("data is empty: fxzip needs at least one batch of inputs to calibrate.")
        self.example = first

    def __iter__(self) -> Iterator[tuple]:
        several = _dist.active()
        problem = None
        for index, batch in enumerate(itertools.islice(self.data, self.max_batches)):
            x = example_from_data(batch, self.inputs, self.parameters)
            inputs = tuple(x) if isinstance(x, (tuple, list)) else (x,)
            if problem is None:
                where = f"rank {_dist.rank()}'s shard" if several else "the data"
                problem = non_finite_inputs(inputs, index, where) or self._shape_problem(inputs, index, where)
                if problem is not None and not several:
                    raise ValueError(problem)
            yield inputs
        if several:  # the end of a full pass, on every rank: all raise if any met a bad batch
            with _dist.ranks_agree("reading its data"):
                if problem is not None:
                    raise ValueError(problem)

    def _shape_problem(self, inputs: tuple, index: int, where: str) -> str | None:
        """A batch of token ids or masks whose shape differs from the first
        batch's in more than the batch size: the graph is captured at the first
        batch's sequence length (position ids, masks), so it would fail deep
        inside. Floating inputs are not checked: a graph over features often
        runs at other sizes (a sequence-first tensor with a smaller last
        batch), and one that does not fails naming its op."""
        example = getattr(self, "example", None)
        if example is None:
            return None
        for j, (x, first) in enumerate(zip(inputs, example)):
            if not (isinstance(x, torch.Tensor) and isinstance(first, torch.Tensor)):
                continue
            if x.is_floating_point() or first.is_floating_point():
                continue  # features (images, sequence-first tensors) may run at other sizes; token ids and masks not
            if x.dim() == first.dim() and x.shape[1:] == first.shape[1:]:
                continue
            names = [p.name for p in self.parameters or ()]
            which = f"input {names[j]!r}" if j < len(names) else f"input {j}"
            fix = ("pad every batch to one length (tokenizer(..., padding='max_length', max_length=N, "
                   "truncation=True))" if x.dim() == 2 and not x.is_floating_point()
                   else "resize every batch to one size")
            return (f"batch {index} of {where} has {which} of shape {tuple(x.shape)}, the first batch "
                    f"{tuple(first.shape)}: batches may differ in the batch size only (the model is captured "
                    f"at the first batch's other sizes); {fix}")
        return None

    def padding_mask(self, inputs: tuple) -> torch.Tensor | None:
        """The (batch, sequence) mask of real tokens of one batch of inputs
        this yielded, or None (no padding mask, or no padding in it)."""
        return padding_mask(inputs, self.mask_index)

    def __len__(self) -> int:
        try:
            n = len(self.data)  # type: ignore[arg-type]
        except TypeError:
            n = self.max_batches or 0
        return min(n, self.max_batches) if self.max_batches else n


def non_finite_inputs(inputs: tuple, index: int, where: str = "the data") -> str | None:
    """What is wrong with batch ``index`` when a floating input holds NaN or Inf, else None."""
    for j, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.numel() == 0:
            continue
        total = x.sum(dtype=torch.float32) if x.element_size() < 4 else x.sum()  # NaN and Inf propagate
        if not bool(torch.isfinite(total)) and not bool(torch.isfinite(x).all()):
            nan = int(torch.isnan(x).sum())
            inf = int(torch.isinf(x).sum())
            what = " and ".join(f"{n} {kind}" for n, kind in ((nan, "NaN"), (inf, "Inf")) if n)
            which = f" (input {j})" if len(inputs) > 1 else ""
            return (f"batch {index} of {where} holds {what} value{'s' if nan + inf > 1 else ''}{which} in a "
                    f"{tuple(x.shape)} input: check the preprocessing (a division by a zero std, a log of 0, "
                    "a corrupt file) and pass finite inputs")
    return None
