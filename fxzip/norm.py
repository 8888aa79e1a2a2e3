"""``fxzip.reset_norm_stats``: the public face of the norm-reset pass."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch.fx as fx
from torch import nn

from .data import Batches
from .distributed import check_ranks, ranks_agree
from .passes.reset_norm import reset_batch_norm
from .trace import trace

__all__ = ["reset_norm_stats"]


def reset_norm_stats(model: nn.Module, data: Iterable[Any], max_batches: int | None = None,
                     inputs: Callable[[Any], Any] | None = None) -> nn.Module:
    """Recompute every batch norm's running statistics on ``data``, in place.

    Merging changes what each norm layer sees, so its old statistics are wrong
    (the papers reset them for every method, the original models included).
    Works on any traceable model, including functional ``F.batch_norm`` calls.
    Under ``torch.distributed`` ``data`` is this rank's shard and the
    statistics are combined across ranks (``fxzip.distributed``): every rank
    gets the average over all ranks' batches. Returns ``model``.
    """
    data = check_ranks([model], data, {}, "fxzip.reset_norm_stats")
    with ranks_agree("reading the data and tracing the model"):
        batches = Batches(data, max_batches, inputs, model)
        gm = model if isinstance(model, fx.GraphModule) else trace(model, batches.example)
    reset_batch_norm(gm, batches, lambda m, b: m(*b))
    if gm is model:
        return model
    own = dict(model.named_buffers())
    for name, buf in gm.named_buffers():
        if name in own and (name.endswith("running_mean") or name.endswith("running_var")
                            or name.endswith("num_batches_tracked")):
            own[name].data.copy_(buf)
    return model
