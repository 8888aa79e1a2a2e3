"""The torchvision constructs the analysis used to refuse, each in a tiny
module written as torchvision writes it, merged exactly: a self-merge is the
identity, a permuted copy computes the same function and merges back.

MViT's pooling attention (``torchvision.models.video.mvit.Pool``): the class
token of every head is split off, the other tokens of all heads are pooled as
one batch (heads folded into the batch axis, a depthwise conv over head_dim),
then the class token is put back in front on the token axis. The pooled keys
(and values, and in MViT-v2 the queries) have one within-head basis shared by
every head, so the queries they meet must too.

ShuffleNet-v2's blocks (``torchvision.models.shufflenetv2.InvertedResidual``):
``x1, x2 = x.chunk(2, 1)``, ``cat(x1, branch(x2))``, then a channel shuffle
of 2 groups. x1 is half of the previous shuffle's output, whose units span 2
elements (unit k of both branches of the previous block), so the shuffle of
``[x1; b]`` reads unit k of x1 with units 2k and 2k + 1 of b: they move
together, b's pair in its order (tied groups, b rigid inside its pairs). A
chunk that cuts such a unit apart (20 channels: 10 elements = 2.5 units of 4)
keeps that unit in place.

RAFT's convex upsampling (``torchvision.models.optical_flow._utils.upsample_flow``):
a conv predicts 9 x f x f weights per pixel, viewed as (9, f, f) and
softmaxed over the 9 neighbours, each weight paired with the neighbour of the
unfolded flow field it weighs, and the f x f sub-pixels spread into the output
pixels. Those channels are read by position (neighbour k, sub-pixel (i, j)),
so their space stays fixed; the flow field is fixed too (it is added to a
coordinate grid). The layers before them merge.
"""
from __future__ import annotations

import pytest
import torch
from helpers import assert_merges_exactly, prepared
from torch import nn
from torchvision.models.optical_flow._utils import make_coords_grid, upsample_flow
from torchvision.models.shufflenetv2 import ShuffleNetV2
from torchvision.models.video.mvit import Pool

import fxzip

pytestmark = pytest.mark.usefixtures("one_thread")


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
def test_mvit_pooling_attentionassert_merges_exactly(pool_q):
    data = [torch.randn(4, 1 + 2 * 4 * 4, 6, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    model = prepared(PooledAttention(pool_q=pool_q).eval(), data)
    analysis = fxzip.analyze(fxzip.trace(model, data[0]))
    qk = next(sp for sp in analysis.spaces if "qkv" in sp.producers and sp.bilinear)
    # heads folded into the batch: one within-head basis (head_dim units) shared by every head
    assert qk.size == 8 and qk.mergeable
    assert_merges_exactly(model, data)


def test_shufflenet_v2_shuffle_of_a_concatenationassert_merges_exactly():
    # stage widths 20, 24, 28: units of 2, 4, 8 elements, and 20 channels cut a unit apart in the third block
    data = [torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    model = prepared(ShuffleNetV2([4, 3, 2], [8, 20, 24, 28, 32], num_classes=5).eval(), data)
    analysis = fxzip.analyze(fxzip.trace(model, data[0]))
    # stage 3's third block: unit k of x1 with units 2k, 2k + 1 of its branch (rigid pairs), groups tied
    branch = next(sp for sp in analysis.spaces if sp.producers == ["stage3_2_branch2_5"])
    assert branch.rigid and branch.groups == 3 and branch.mergeable
    tied = [analysis.spaces[i] for i in branch.tie]
    assert {sp.group_size for sp in tied} >= {1, 4} and all(sp.mergeable for sp in tied)
    assert any(sp.fixed and "cuts one unit of 4 elements apart" in sp.fixed[0] for sp in analysis.spaces)
    assert_merges_exactly(model, data)


class ConvexUpsampling(nn.Module):
    """A flow head and a mask head on one hidden map, the flow upsampled by the
    mask as RAFT does it (coordinates grid, flow = coords1 - coords0)."""

    def __init__(self, factor: int = 2) -> None:
        super().__init__()
        self.factor = factor
        self.encoder, self.hidden = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 12, 3, padding=1)
        self.flow_head = nn.Conv2d(12, 2, 3, padding=1)
        self.mask = nn.Conv2d(12, 9 * factor * factor, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.hidden(torch.relu(self.encoder(x))))
        coords0 = make_coords_grid(x.shape[0], x.shape[2], x.shape[3]).to(x.device)
        coords1 = coords0 + self.flow_head(h)
        return upsample_flow(coords1 - coords0, up_mask=0.25 * self.mask(h), factor=self.factor)


def test_raft_convex_upsampling_keeps_the_weights_in_place_and_merges_the_rest():
    data = [torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    model = prepared(ConvexUpsampling().eval(), data)
    analysis = fxzip.analyze(fxzip.trace(model, data[0]))
    by_producer = {sp.producers[0]: sp for sp in analysis.spaces if sp.producers}
    assert not by_producer["mask"].mergeable, "the upsampling weights are read by position"
    assert not by_producer["flow_head"].mergeable
    assert by_producer["hidden"].mergeable and by_producer["encoder"].mergeable
    assert_merges_exactly(model, data)
