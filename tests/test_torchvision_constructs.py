"""The torchvision constructs the analysis used to refuse, each in a tiny
module written as torchvision writes it, merged exactly: a self-merge is the
identity, a permuted copy computes the same function and merges back.

MViT's pooling attention (``torchvision.models.video.mvit.Pool``): the class
token of every head is split off, the other tokens of all heads are pooled as
one batch (heads folded into the batch axis, a depthwise conv over head_dim),
then the class token is put back in front on the token axis. The pooled keys
(and values, and in MViT-v2 the queries) have one within-head basis shared by
every head, so the queries they meet must too.
"""
from __future__ import annotations

import pytest
import torch
from helpers import assert_same_function, prepared
from torch import nn
from torchvision.models.video.mvit import Pool

import fxzip

pytestmark = pytest.mark.usefixtures("one_thread")


def _merges_exactly(model: nn.Module, data: list[torch.Tensor]) -> None:
    assert_same_function(model, fxzip.merge(model, model, data=data, progress=False), data)
    permuted = fxzip.permute_channels(model, seed=1, example_inputs=data[0])
    assert_same_function(model, permuted, data)
    assert_same_function(model, fxzip.merge(model, permuted, data=data, method="permute", progress=False), data)
    assert_same_function(model, fxzip.merge(model, permuted, data=data, progress=False), data)


class PooledAttention(nn.Module):
    """MViT's multiscale attention: keys and values pooled (MViT-v1), queries
    too (MViT-v2), each through torchvision's ``Pool`` with its class token."""

    def __init__(self, dim: int = 16, heads: int = 2, thw: tuple[int, int, int] = (2, 4, 4),
                 pool_q: bool = False) -> None:
        super().__init__()
        self.heads, self.head_dim, self.thw = heads, dim // heads, thw
        self.embed = nn.Linear(6, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        d = self.head_dim

        def pool() -> Pool:
            return Pool(nn.Conv3d(d, d, 3, stride=(1, 2, 2), padding=1, groups=d, bias=False), nn.LayerNorm(d))

        self.pool_k, self.pool_v = pool(), pool()
        self.pool_q = pool() if pool_q else None
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).transpose(1, 3).unbind(dim=2)
        k = self.pool_k(k, self.thw)[0]
        v = self.pool_v(v, self.thw)[0]
        if self.pool_q is not None:
            q = self.pool_q(q, self.thw)[0]
        attn = (self.head_dim ** -0.5 * q) @ k.transpose(2, 3)
        x = attn.softmax(dim=-1) @ v
        x = self.proj(x.transpose(1, 2).reshape(b, -1, c))
        return self.head(x.mean(1))


@pytest.mark.parametrize("pool_q", [False, True], ids=["mvit_v1_keys_pooled", "mvit_v2_queries_pooled_too"])
def test_mvit_pooling_attention_merges_exactly(pool_q):
    data = [torch.randn(4, 1 + 2 * 4 * 4, 6, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    model = prepared(PooledAttention(pool_q=pool_q).eval(), data)
    analysis = fxzip.analyze(fxzip.trace(model, data[0]))
    qk = next(sp for sp in analysis.spaces if "qkv" in sp.producers and sp.bilinear)
    # heads folded into the batch: one within-head basis (head_dim units) shared by every head
    assert qk.size == 8 and qk.mergeable
    _merges_exactly(model, data)
