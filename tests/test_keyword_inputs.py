"""Dict batches of keyword inputs (what a tokenizer yields) and the padding mask.

The invariants: a dict batch merges exactly like the same inputs by position;
a causal LM's statistics do not depend on what the padded positions hold (the
observers count real tokens only), and the counts are the real tokens.
"""
from __future__ import annotations

import lm_helpers as h
import pytest
import torch

import fxzip

SEQ = 40


@pytest.fixture(scope="module")
def tok():
    return h.tiny_tokenizer()


def _batches(tok, texts, n_rep: int = 2) -> list[dict]:
    return h.padded_batches(tok, texts, SEQ, n_rep)


_noisy_padding = h.noisy_padding


def _logits(model, batch):
    with torch.no_grad():
        out = model(**batch)
    return out["logits"] if isinstance(out, dict) else out.logits


def test_dict_batches_self_merge_exactly_and_merge_like_positional_inputs(tok):
    a = h.tiny_llama(len(tok), 0)
    b = h.tiny_llama(len(tok), 1)
    data = _batches(tok, h.CORPUS_A + h.CORPUS_B)
    merged = fxzip.merge(a, a, data=data, progress=False)
    for batch in data[:2]:
        want, got = _logits(a, batch), _logits(merged, batch)
        assert float((want - got).abs().max() / want.abs().max()) < 1e-5
    by_dict = fxzip.merge(a, b, data=data, progress=False)
    by_position = fxzip.merge(a, b, data=[(d["input_ids"], d["attention_mask"]) for d in data], progress=False,
                              inputs=lambda batch: batch)
    sd, sp = by_dict.state_dict(), by_position.state_dict()
    assert sd.keys() == sp.keys()
    assert all(torch.equal(sd[k], sp[k]) for k in sd)


def test_statistics_count_real_tokens_only(tok):
    """Right padding under a causal mask: real tokens' features do not depend on
    the padded positions, so statistics over real tokens are the same whatever
    the padding holds; counted over every position they would differ."""
    a, b = h.tiny_llama(len(tok), 0), h.tiny_llama(len(tok), 1)
    data = _batches(tok, h.CORPUS_A + h.CORPUS_B, n_rep=1)
    noisy = _noisy_padding(data, len(tok), seed=0)
    assert any(bool((d["attention_mask"] == 0).any()) for d in data)  # the test needs padding
    real = sum(int(d["attention_mask"].sum()) for d in data)
    one = fxzip.calibrate(a, b, data=data, progress=False, probes="reference").run()
    two = fxzip.calibrate(a, b, data=noisy, progress=False, probes="reference").run()
    assert one.stats
    for index, s1 in one.stats.items():
        s2 = two.stats[index]
        assert s1.count == s2.count
        torch.testing.assert_close(s1.mean, s2.mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(s1.covariance(), s2.covariance(), rtol=1e-5, atol=1e-6)
    counts = {s.count for s in one.stats.values()}
    assert real in counts  # the residual stream: one sample per real token
    full = [{"input_ids": d["input_ids"], "attention_mask": torch.ones_like(d["attention_mask"])} for d in data]
    unmasked = fxzip.calibrate(a, b, data=full, progress=False, probes="reference").run()
    assert sum(d["input_ids"].numel() for d in data) in {s.count for s in unmasked.stats.values()}


def test_dict_batch_errors_name_the_key_and_the_fix(tok):
    a = h.tiny_llama(len(tok), 0)
    data = _batches(tok, h.CORPUS_A, n_rep=1)
    bad = [{"input_ids": d["input_ids"], "atention_mask": d["attention_mask"]} for d in data]
    with pytest.raises(TypeError, match=r"\['atention_mask'\].*does not take.*'attention_mask'"):
        fxzip.merge(a, a, data=bad, progress=False)
    short = tok(h.CORPUS_B[:4], padding="max_length", max_length=SEQ - 8, truncation=True, return_tensors="pt")
    mixed = data + [{"input_ids": short["input_ids"], "attention_mask": short["attention_mask"]}]
    with pytest.raises(ValueError, match=r"batch 1 .*'input_ids' of shape \(4, 32\).*\(4, 40\).*pad every batch"):
        fxzip.merge(a, a, data=mixed, progress=False)


def test_a_causal_lm_has_a_cut_after_every_block_and_each_partial_zip_is_exact(tok):
    """The attention mask and rotary tables reach every block from the inputs
    without any weight, so they are no paths around a cut: the residual stream
    after every attention and MLP is one, and a self-merge cut there gives heads
    that compute the model exactly (each reads the mask from the trunk)."""
    a = h.tiny_llama(len(tok), 0, layers=2)
    data = _batches(tok, h.CORPUS_A + h.CORPUS_B, n_rep=1)
    cuts = fxzip.cut_points(a, (data[0]["input_ids"], data[0]["attention_mask"]))
    inner = [c for c in cuts if 0 < c.k < c.m]
    assert len(inner) >= 2 * 2  # after each block's attention and MLP (2 blocks)
    cal = fxzip.calibrate(a, a, data=data, progress=False)
    for cut in inner:
        partial = fxzip.merge(a, a, data=cal, stop_at=cut.name, progress=False)
        for batch in data:
            want = _logits(a, batch)
            with torch.no_grad():
                heads = partial(batch["input_ids"], batch["attention_mask"])
            for head in heads:
                assert float((want - head["logits"]).abs().max() / want.abs().max()) < 1e-5


def _gpt2(vocab: int, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64, use_cache=False,
                        pad_token_id=0)
    return GPT2LMHeadModel(config).eval()


def test_gpt2_flattened_features_count_real_tokens_only(tok):
    """GPT-2's Conv1D computes on (batch * sequence, channels): the mask applies
    to the flattened axis too (statistics do not depend on the padded ids)."""
    a, b = _gpt2(len(tok), 0), _gpt2(len(tok), 1)
    data = _batches(tok, h.CORPUS_A + h.CORPUS_B, n_rep=1)
    noisy = _noisy_padding(data, len(tok), seed=1)
    one = fxzip.calibrate(a, b, data=data, progress=False, probes="reference").run()
    two = fxzip.calibrate(a, b, data=noisy, progress=False, probes="reference").run()
    real = sum(int(d["attention_mask"].sum()) for d in data)
    assert {s.count for s in one.stats.values()} == {real}
    for index, s1 in one.stats.items():
        torch.testing.assert_close(s1.mean, two.stats[index].mean, rtol=1e-6, atol=1e-6)


def test_an_encoder_padding_mask_is_not_applied_to_decoder_features(tok):
    """T5: ``attention_mask`` describes the encoder's tokens; decoder features
    (from ``decoder_input_ids``) are all samples, even at the same length."""
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                      use_cache=False, pad_token_id=0, decoder_start_token_id=0)
    torch.manual_seed(0)
    a = T5ForConditionalGeneration(config).eval()
    torch.manual_seed(1)
    b = T5ForConditionalGeneration(config).eval()
    enc = tok(["The fox.", "A merge", "Plain English prose here.", "x"], padding="max_length", max_length=12,
              truncation=True, return_tensors="pt")
    dec = torch.randint(2, len(tok), (4, 12), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "decoder_input_ids": dec}] * 2
    real = 2 * int(enc["attention_mask"].sum())
    assert real < 2 * 4 * 12  # the encoder input is padded
    cal = fxzip.calibrate(a, b, data=data, progress=False, probes="reference").run()
    counts = {s.count for s in cal.stats.values()}
    assert real in counts and 2 * 4 * 12 in counts  # encoder spaces: real tokens; decoder spaces: every position


def test_floating_inputs_may_change_size_beyond_the_first_axis():
    """A sequence-first (T, B, C) input with a smaller last batch: only token ids
    and masks are held to the first batch's shape (a regression found in review)."""
    from torch import nn

    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(5, 6, 8, generator=gen), torch.randn(5, 6, 8, generator=gen), torch.randn(5, 3, 8, generator=gen)]
    a, b = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), nn.Sequential(nn.Linear(8, 16), nn.ReLU(),
                                                                                    nn.Linear(16, 4))
    merged = fxzip.merge(a, b, data=data, progress=False)
    assert merged(data[2]).shape == (5, 3, 4)
