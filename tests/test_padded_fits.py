"""The passes that fit or measure on the merged model's own features count real tokens only.

Right padding under a causal mask: a real token's features do not depend on
what the padded positions hold. So the refit (both schedules), a partial
zip's cut maps and head refit, and REPAIR give the same weights whether the
padding holds the pad id or random ids, and each fit counts exactly the real
tokens. Counted over every position, the padded features would be samples
and the weights would differ (checked: each assertion below fails with the
passes' masking removed).
"""
from __future__ import annotations

import lm_helpers as h
import pytest
import torch

import fxzip
from fxzip.passes.refit import SCHEDULES, refit
from fxzip.passes.repair import repair
from fxzip.passes.side_by_side import side_by_side

SEQ = 40


@pytest.fixture(scope="module")
def tok():
    return h.tiny_tokenizer()


@pytest.fixture(scope="module")
def data(tok):
    batches = h.padded_batches(tok, h.CORPUS_A + h.CORPUS_B, SEQ)
    assert any(bool((d["attention_mask"] == 0).any()) for d in batches)  # the tests need padding
    return batches


@pytest.fixture(scope="module")
def noisy(tok, data):
    out = h.noisy_padding(data, len(tok), seed=3)
    assert not all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(data, out))
    return out


def _real_tokens(data) -> int:
    return sum(int(d["attention_mask"].sum()) for d in data)


def _same_weights(one: torch.nn.Module, two: torch.nn.Module) -> None:
    s1, s2 = one.state_dict(), two.state_dict()
    assert s1.keys() == s2.keys()
    for name in s1:
        torch.testing.assert_close(s1[name], s2[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def _folded(a, b, data):
    """The papers' merge of ``a`` and ``b`` (no refit, no norm reset) and what
    the refit and repair passes take with it."""
    cal = fxzip.calibrate(a, b, data=data, progress=False)
    folded = fxzip.merge(a, b, data=cal, reset_bn=False, progress=False)
    assign = {s.index: torch.tensor(s.assignment) for s in folded.meta["fxzip"].spaces}
    joint, node_maps = side_by_side(cal.models, cal.common)
    return cal, folded, assign, joint, node_maps


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_refit_fits_real_tokens_only(tok, data, noisy, schedule):
    a, b = h.tiny_llama(len(tok), 0), h.tiny_llama(len(tok), 1)
    fitted = []
    for batches in (data, noisy):
        cal, folded, assign, joint, node_maps = _folded(a, b, batches)
        result = refit(folded, cal.analysis, joint, node_maps, assign, cal.batches, schedule=schedule)
        assert result.layers and {l.samples for l in result.layers} == {_real_tokens(data)}
        fitted.append(folded)
    _same_weights(*fitted)


def test_partial_zip_cut_maps_and_head_refit_fit_real_tokens_only(tok, data, noisy):
    a, b = h.tiny_llama(len(tok), 0), h.tiny_llama(len(tok), 1)
    cuts = fxzip.cut_points(a, (data[0]["input_ids"], data[0]["attention_mask"]))
    cut = min((c for c in cuts if 0 < c.k < c.m), key=lambda c: abs(c.k - c.m / 2))
    one = fxzip.merge(a, b, data=data, refit=True, stop_at=cut.name, progress=False)
    two = fxzip.merge(a, b, data=noisy, refit=True, stop_at=cut.name, progress=False)
    details = one.meta["fxzip"].details["refit"]
    fitted = {**details["cut_maps"]["per_layer"], **details["heads"]["per_layer"]}
    assert details["cut_maps"]["layers"] == 2 and fitted
    assert {row["samples"] for row in fitted.values()} == {_real_tokens(data)}
    _same_weights(one, two)


def _gpt2(vocab: int, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64, use_cache=False,
                        pad_token_id=0)
    return GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_repair_measures_real_tokens_only(tok, data, noisy, schedule):
    """GPT-2's LayerNorms (affine, with a bias) are REPAIR sites, and its Conv1D
    features are flattened to (batch * sequence, channels)."""
    a, b = _gpt2(len(tok), 0), _gpt2(len(tok), 1)
    repaired = []
    for batches in (data, noisy):
        cal, folded, assign, joint, node_maps = _folded(a, b, batches)
        mergeable = {sp.index for sp in cal.analysis.spaces if sp.mergeable}
        result = repair(folded, cal.analysis, mergeable, joint, node_maps, assign, cal.batches, schedule=schedule)
        assert result.sites
        repaired.append(folded)
    _same_weights(*repaired)
