"""The constructs of Llama-style language models, written as transformers
writes them, each merged exactly: a self-merge is the identity, a permuted copy
computes the same function and merges back.

RMSNorm (a per-channel weight on the residual stream), a SwiGLU feed-forward
(``down(silu(gate(x)) * up(x))``), rotary embeddings in the ``rotate_half``
form (``q * cos + rotate_half(q) * sin``: channel ``i`` of a head rotates with
channel ``i + d/2``, so positions inside a head are fixed while whole heads
move), grouped-query attention (``repeat_kv``: key/value head g serves query
heads g*r .. g*r + r - 1, so a key/value head and the query heads it serves move
as one) and a causal mask.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_merges_exactly, assert_same_function, prepared
from torch import nn

import fxzip

pytestmark = pytest.mark.usefixtures("one_thread")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps))


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, kv_heads, N, D) -> (B, kv_heads * n_rep, N, D), as transformers writes it."""
    if n_rep == 1:
        return x
    b, kv_heads, n, d = x.shape
    return x[:, :, None, :, :].expand(b, kv_heads, n_rep, n, d).reshape(b, kv_heads * n_rep, n, d)


class LlamaBlock(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4, kv_heads: int = 4, seq: int = 8, hidden: int = 48) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.embed = nn.Linear(6, dim)
        self.norm1, self.norm2, self.final_norm = RMSNorm(dim), RMSNorm(dim), RMSNorm(dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.k, self.v = (nn.Linear(dim, kv_heads * self.head_dim, bias=False) for _ in range(2))
        self.o = nn.Linear(dim, dim, bias=False)
        self.gate, self.up = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)
        inv = 1.0 / (10000 ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim))
        freqs = torch.outer(torch.arange(seq).float(), inv)
        angles = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)
        self.lm_head = nn.Linear(dim, 11, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        b, n, _ = x.shape
        h = self.norm1(x)
        q = self.q(h).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k, v = (proj(h).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2) for proj in (self.k, self.v))
        cos, sin = self.cos[None, None], self.sin[None, None]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k, v = repeat_kv(k, self.heads // self.kv_heads), repeat_kv(v, self.heads // self.kv_heads)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(attn.transpose(1, 2).reshape(b, n, -1))
        h = self.norm2(x)
        x = x + self.down(F.silu(self.gate(h)) * self.up(h))
        return self.lm_head(self.final_norm(x))


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["multi-head", "grouped-query"])
def test_llama_block_merges_exactly(kv_heads):
    data = [torch.randn(8, 8, 6, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    model = prepared(LlamaBlock(kv_heads=kv_heads).eval(), data)
    analysis = fxzip.analyze(fxzip.trace(model, data[0]))
    qk = next(sp for sp in analysis.spaces if "q" in sp.producers)
    values = next(sp for sp in analysis.spaces if "v" in sp.producers)
    assert qk.groups == kv_heads and qk.rigid, "rotary q/k: whole (key/value) heads move, positions inside stay"
    # values repeated for grouped-query attention keep their positions too (every copy in one order)
    assert values.groups == kv_heads and values.rigid == (kv_heads < 4)
    assert_merges_exactly(model, data)


class Conv1D(nn.Module):
    """GPT-2's linear layer: the weight stored (in, out), applied with ``torch.addmm``."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) * 0.2)
        self.bias = nn.Parameter(torch.randn(n_out) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = x.size()[:-1] + (self.weight.shape[1],)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class GPT2Mlp(nn.Module):
    def __init__(self, dim: int = 16, hidden: int = 40) -> None:
        super().__init__()
        self.embed = nn.Linear(6, dim)
        self.ln = nn.LayerNorm(dim)
        self.c_fc, self.c_proj = Conv1D(dim, hidden), Conv1D(hidden, dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        x = x + self.c_proj(F.gelu(self.c_fc(self.ln(x)), approximate="tanh"))
        return self.head(x)


def test_gpt2_conv1d_addmm_is_a_linear_layer_with_its_weight_transposed():
    data = [torch.randn(4, 8, 6, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    model = prepared(GPT2Mlp().eval(), data)
    analysis = fxzip.analyze(fxzip.trace(model, data[0]))
    hidden = next(sp for sp in analysis.spaces if sp.size == 40)
    assert {("c_fc.weight", 1), ("c_proj.weight", 0)} <= {(p, axis) for p, axis, _ in hidden.params}
    assert_same_function(model, fxzip.merge(model, model, data=data, progress=False), data)
    permuted = fxzip.permute_channels(model, seed=1, example_inputs=data[0])
    assert not torch.equal(permuted.state_dict()["c_fc.weight"], model.state_dict()["c_fc.weight"])
    assert_same_function(model, permuted, data)
    assert_same_function(model, fxzip.merge(model, permuted, data=data, method="permute", progress=False), data)


class TiedLM(nn.Module):
    """Input and output embeddings tied (one tensor), as language models tie them."""

    def __init__(self, vocab: int = 20, dim: int = 12, tie: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 24), nn.Linear(24, dim)
        self.norm = RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        h = h + self.fc2(F.gelu(self.fc1(h)))
        return self.lm_head(self.norm(h))


def _untied_copy(model: TiedLM) -> TiedLM:
    copy = TiedLM(tie=False).eval()
    copy.load_state_dict(model.state_dict())  # both names, the same values, two tensors
    return copy


def test_tied_embeddings_stay_tied_where_the_tie_holds_and_are_untied_where_it_does_not():
    ids = [torch.randint(0, 20, (4, 8), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    a, b = (prepared(TiedLM().eval(), ids, seed) for seed in (0, 1))
    a.lm_head.weight = a.embed.weight  # redrawing gave each name its own tensor: tie again
    b.lm_head.weight = b.embed.weight
    permuted = fxzip.permute_channels(a, seed=1, example_inputs=ids[0])
    assert permuted.lm_head.weight is permuted.embed.weight  # a permutation keeps the tie
    assert_same_function(a, permuted, ids)
    recovered = fxzip.merge(a, permuted, data=ids, method="permute", progress=False)
    assert recovered.lm_head.weight is recovered.embed.weight and "untied" not in recovered.meta["fxzip"].details
    assert_same_function(a, recovered, ids)
    # whatever the merge, the result is the merge of the same models with the tie broken beforehand;
    # a refit fits the output layer alone, so the roles differ and the tie is broken, and said so
    for kwargs in ({"alpha": 0.3, "beta": 0.0}, {"refit": True}):
        tied = fxzip.merge(a, b, data=ids, progress=False, **kwargs)
        untied = fxzip.merge(_untied_copy(a), _untied_copy(b), data=ids, progress=False, **kwargs)
        assert_same_function(untied, tied, ids)
    assert tied.lm_head.weight is not tied.embed.weight
    assert tied.meta["fxzip"].details["untied"] == [["embed.weight", "lm_head.weight"]]
    assert any("untied" in w for w in tied.meta["fxzip"].warnings)


class T5Attention(nn.Module):
    """T5's relative-position bias: an embedding of position buckets with one
    column per head, put under the mask with ``torch.where``."""

    def __init__(self, dim: int = 16, heads: int = 4, seq: int = 8, buckets: int = 6) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.embed = nn.Linear(6, dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.relative_attention_bias = nn.Embedding(buckets, heads)
        rel = torch.arange(seq)[None, :] - torch.arange(seq)[:, None]
        self.register_buffer("buckets", rel.clamp(-(buckets // 2), buckets // 2 - 1) + buckets // 2, persistent=False)
        self.register_buffer("causal", torch.ones(seq, seq, dtype=torch.bool).tril(), persistent=False)
        self.head = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, self.heads, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        bias = self.relative_attention_bias(self.buckets).permute(2, 0, 1)[None]  # (1, heads, n, n)
        bias = torch.where(self.causal, bias, torch.finfo(bias.dtype).min)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.head(x + self.o(attn.transpose(1, 2).reshape(b, n, -1)))


def test_t5_position_bias_under_a_mask_follows_the_heads():
    data = [torch.randn(4, 8, 6, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    model = prepared(T5Attention().eval(), data)
    permuted = fxzip.permute_channels(model, seed=2, example_inputs=data[0])
    table = "relative_attention_bias.weight"
    assert not torch.equal(permuted.state_dict()[table], model.state_dict()[table])  # the heads' columns moved
    assert_same_function(model, permuted, data)
    assert_same_function(model, fxzip.merge(model, model, data=data, progress=False), data)
    assert_same_function(model, fxzip.merge(model, permuted, data=data, method="permute", progress=False), data)


class PartialRotary(LlamaBlock):
    """GPT-NeoX / Phi: the rotary embedding on the first positions of every head
    only, the rest passed through and concatenated back."""

    def __init__(self, rotary: int = 4, **kwargs) -> None:
        super().__init__(**kwargs)
        self.rotary = rotary
        self.cos, self.sin = self.cos[:, :rotary].clone(), self.sin[:, :rotary].clone()

    def rope(self, t: torch.Tensor) -> torch.Tensor:
        rot, rest = t[..., :self.rotary], t[..., self.rotary:]
        cos, sin = self.cos[None, None], self.sin[None, None]
        return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        b, n, _ = x.shape
        h = self.norm1(x)
        q = self.rope(self.q(h).view(b, n, self.heads, self.head_dim).transpose(1, 2))
        k = self.rope(self.k(h).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2))
        v = self.v(h).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(attn.transpose(1, 2).reshape(b, n, -1))
        return self.lm_head(self.final_norm(x))


def test_partial_rotary_rejoins_the_heads_with_positions_fixed():
    data = [torch.randn(8, 8, 6, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    model = prepared(PartialRotary().eval(), data)
    analysis = fxzip.analyze(fxzip.trace(model, data[0]))
    qk = next(sp for sp in analysis.spaces if "q" in sp.producers)
    assert qk.groups == 4 and qk.rigid and qk.mergeable
    assert_same_function(model, fxzip.merge(model, model, data=data, progress=False), data)
    permuted = fxzip.permute_channels(model, seed=1, example_inputs=data[0])
    assert not torch.equal(permuted.state_dict()["q.weight"], model.state_dict()["q.weight"])
    assert_same_function(model, permuted, data)
    assert_same_function(model, fxzip.merge(model, permuted, data=data, method="permute", progress=False), data)
