"""How fxzip reads ``data``: batches in, model inputs out."""
from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable, Iterator

import torch

from .trace import example_from_data

__all__ = ["Batches"]


class Batches:
    """A re-iterable view of the user's ``data`` (a DataLoader, a list of tensors or
    of (x, y) tuples, or a one-shot iterator, which is materialised once), capped
    at ``max_batches``, yielding model inputs as tuples."""

    def __init__(self, data: Iterable[Any], max_batches: int | None = None,
                 inputs: Callable[[Any], Any] | None = None):
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
        first = next(iter(self), None)
        if first is None:
            raise ValueError("data is empty: fxzip needs at least one batch of inputs to calibrate.")
        self.example = first

    def __iter__(self) -> Iterator[tuple]:
        for batch in itertools.islice(self.data, self.max_batches):
            x = example_from_data(batch, self.inputs)
            yield tuple(x) if isinstance(x, (tuple, list)) else (x,)

    def __len__(self) -> int:
        try:
            n = len(self.data)  # type: ignore[arg-type]
        except TypeError:
            n = self.max_batches or 0
        return min(n, self.max_batches) if self.max_batches else n
