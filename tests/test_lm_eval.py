"""Language models scored on held-out text (``fxzip.lm_eval``) and ``fxzip sweep``
of Hugging Face folders (``fxzip.cli.sweep_lm``).

Invariants, not golden numbers: a model's perplexity is exp of a float64
cross-entropy computed by hand; a mixture of a model with itself is the model;
the mixture lies within log N of the best model per sequence and below the
models' mean; padding content changes nothing; uniform logits give the
vocabulary size. The command: the oracle row is each model on its own domain,
a self-merge scores as the model, a bad --eval fails before any model loads.
"""
from __future__ import annotations

import json
import math

import lm_helpers as h
import pytest
import torch
from torch import nn

from fxzip.cli import main
from fxzip.lm_eval import (
    SequenceScores,
    macs_per_token,
    mixture_of,
    mixture_perplexity,
    perplexity,
    sequence_log_likelihoods,
)

SEQ = 32


@pytest.fixture(scope="module")
def tok():
    return h.tiny_tokenizer()


@pytest.fixture(scope="module")
def models(tok):
    return [h.tiny_llama(len(tok), 0), h.tiny_llama(len(tok), 1)]


@pytest.fixture(scope="module")
def batches(tok):
    """Two batches, rows of different lengths (right padding, mask 0 there)."""
    texts = h.CORPUS_A + h.CORPUS_B
    out = []
    for part in (texts[:5], texts[5:]):
        enc = tok(part, padding="max_length", max_length=SEQ, truncation=True, return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    assert any((b["attention_mask"] == 0).any() for b in out)
    return out


def _reference_nll(model, batches) -> tuple[float, int]:
    """Mean negative log-likelihood per target, by hand: float64 cross-entropy,
    padding ignored (a target counts where it and the token before are real)."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    for b in batches:
        with torch.no_grad():
            logits = model(**b).logits.double()
        target = b["input_ids"][:, 1:].clone()
        target[(b["attention_mask"][:, 1:] == 0) | (b["attention_mask"][:, :-1] == 0)] = -100
        total += torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), target.flatten(),
                                                   ignore_index=-100, reduction="sum")
        count += int((target != -100).sum())
    return float(total / count), count


def test_perplexity_is_exp_of_the_float64_cross_entropy(models, batches):
    model = models[0]
    model.train()  # the flag is put back
    got = perplexity(model, batches)
    assert model.training
    model.eval()
    nll, count = _reference_nll(model, batches)
    assert got.tokens == count and got.sequences == sum(len(b["input_ids"]) for b in batches)
    assert got.nll == pytest.approx(nll, rel=1e-12)
    assert got.perplexity == pytest.approx(math.exp(nll), rel=1e-12)
    assert perplexity(model, batches) == got  # deterministic


def test_outputs_as_dict_tensor_or_tuple_give_the_same_scores(models, batches):
    class Wrap(nn.Module):
        def __init__(self, how):
            super().__init__()
            self.inner, self.how = models[0], how

        def forward(self, input_ids, attention_mask):
            logits = self.inner(input_ids=input_ids, attention_mask=attention_mask).logits
            return {"dict": {"logits": logits}, "tensor": logits, "tuple": (logits * 0, {"logits": logits})}[self.how]

    want = perplexity(models[0], batches)
    assert perplexity(Wrap("dict"), batches) == want
    assert perplexity(Wrap("tensor"), batches) == want
    assert perplexity(Wrap("tuple"), batches, head=1) == want
    with pytest.raises(ValueError, match="head"):
        perplexity(Wrap("tuple"), batches)


def test_padding_content_does_not_change_the_result(models, batches):
    noisy = h.noisy_padding(batches, 300, seed=0)
    assert not all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, noisy))
    a = sequence_log_likelihoods(models[0], batches)
    b = sequence_log_likelihoods(models[0], noisy)
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.log_likelihood, b.log_likelihood, rtol=1e-9, atol=1e-9)


def test_uniform_logits_give_the_vocabulary_size(batches):
    class Uniform(nn.Module):
        def forward(self, input_ids, attention_mask):
            return torch.zeros(*input_ids.shape, 320)

    assert perplexity(Uniform(), batches).perplexity == pytest.approx(320, rel=1e-12)
    assert mixture_perplexity([Uniform(), Uniform()], batches).perplexity == pytest.approx(320, rel=1e-12)


def test_mixture_bounds(models, batches):
    a, b = (sequence_log_likelihoods(m, batches) for m in models)
    assert mixture_of([a, a]).nll == pytest.approx(perplexity(models[0], batches).nll, rel=1e-12)
    mix = mixture_of([a, b])
    assert mix == mixture_perplexity(models, batches)
    best = torch.maximum(a.log_likelihood, b.log_likelihood)  # per sequence, the better model
    tokens = int(a.tokens.sum())
    low, high = float(-best.sum()) / tokens, float(-(best - math.log(2)).sum()) / tokens
    assert low - 1e-12 <= mix.nll <= high + 1e-12
    nll_a, nll_b = (float(-s.log_likelihood.sum()) / tokens for s in (a, b))
    assert mix.nll <= (nll_a + nll_b) / 2 + 1e-12  # never above the models' mean, so below the worse
    assert mix.perplexity <= max(math.exp(nll_a), math.exp(nll_b))
    with pytest.raises(ValueError, match="same rows"):
        mixture_of([a, SequenceScores(a.log_likelihood[:-1], a.tokens[:-1])])


def test_macs_per_token_divides_by_every_position(models, batches):
    from fxzip.evaluate import count_macs

    b = batches[0]
    want = count_macs(models[0], (b["input_ids"], b["attention_mask"])) / b["input_ids"].numel()
    assert macs_per_token(models[0], b) == want > 0


# the command

@pytest.fixture(scope="module")
def folders(tmp_path_factory, tok, models):
    root = tmp_path_factory.mktemp("lm_sweep")
    dirs = h.save_pair(root, tok, models)
    data = root / "data.txt"
    data.write_text("\n\n".join(h.CORPUS_A + h.CORPUS_B) * 2)
    evals = [root / "eval_a.txt", root / "eval_b.txt"]
    evals[0].write_text("\n\n".join(h.CORPUS_A[::-1]) * 2)
    evals[1].write_text("\n\n".join(h.CORPUS_B[::-1]) * 2)
    return root, dirs, data, evals


def _sweep(dirs, data, evals, out, *extra):
    return main(["sweep", *map(str, dirs), "--data", str(data), "--eval", *map(str, evals), "--seq-len", str(SEQ),
                 "--batch-size", "4", "--eval-max", "6", "--out", str(out), "--quiet", *extra])


def _eval_batches(tok, path):
    from fxzip.text_data import open_text

    with open_text(path, tok, SEQ, 4, progress=False) as source:
        n = len(source.ids)
        index = torch.tensor([i * n // 6 for i in range(6)]) if n > 6 else torch.arange(n)
        source.ids, source.mask = source.ids[index], source.mask[index]
        return list(source.loader())


def test_cli_sweep_of_folders_writes_reference_and_merge_rows(folders, tok, models, capsys):
    root, dirs, data, evals = folders
    out = root / "sweep"
    assert _sweep(dirs, data, evals, out, "--stop-at", "6", "full") == 0
    printed = capsys.readouterr().out
    assert "mean log ppl" in printed and "oracle" in printed and "mixture" in printed
    result = json.loads((out / "sweep.json").read_text())
    assert {"sweep.json", "sweep.csv", "sweep.png"} <= {p.name for p in out.iterdir()}
    assert result["settings"]["command"] == "fxzip sweep" and result["settings"]["seq_len"] == SEQ
    rows = {(r["method"], r["cut"]): r for r in result["rows"]}
    assert [r["method"] for r in result["rows"][:4]] == ["model0", "model1", "oracle", "mixture"]
    full, partial = rows[("zipit", "full")], next(r for r in result["rows"] if r["method"] == "zipit"
                                                   and r["cut"] != "full")
    assert 0 < partial["k"] < partial["m"] and full["k"] == full["m"]
    own = [perplexity(m, _eval_batches(tok, e)) for m, e in zip(models, evals)]
    oracle = rows[("oracle", "-")]
    assert oracle["perplexity"] == pytest.approx([r.perplexity for r in own], rel=1e-9)
    assert [rows[("model0", "-")]["perplexity"][0], rows[("model1", "-")]["perplexity"][1]] == oracle["perplexity"]
    mixture = rows[("mixture", "-")]
    assert all(m <= max(a, b) for m, a, b in zip(mixture["perplexity"], rows[("model0", "-")]["perplexity"],
                                                   rows[("model1", "-")]["perplexity"]))
    one = rows[("model0", "-")]["macs_per_token"]
    assert one > 0 and oracle["macs_per_token"] == 2 * one and full["macs_per_token"] == pytest.approx(one)
    assert one < partial["macs_per_token"] < 2 * one
    assert (out / "sweep.csv").read_text().count("\n") == len(result["rows"]) + 1


def test_cli_sweep_of_a_folder_with_itself_scores_as_the_model(folders, tok, models):
    root, dirs, data, evals = folders
    out = root / "self"
    assert _sweep([dirs[0], dirs[0]], data, evals, out, "--stop-at", "6", "full", "--dtype", "float32") == 0
    result = json.loads((out / "sweep.json").read_text())
    rows = result["rows"]
    assert result["settings"]["dtype"] == "float32"
    own = [perplexity(models[0], _eval_batches(tok, e)).perplexity for e in evals]
    full = next(r for r in rows if r["method"] == "zipit" and r["cut"] == "full")
    partial = next(r for r in rows if r["method"] == "zipit" and r["cut"] != "full")
    for got in (full["perplexity"], partial["perplexity"], next(r for r in rows if r["method"] == "mixture")[
            "perplexity"]):
        assert got == pytest.approx(own, rel=1e-6)


def test_cli_sweep_bad_eval_fails_before_any_model_loads(folders, monkeypatch, capsys):
    import fxzip.hf

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(fxzip.hf, "load_pretrained", refuse)
    root, dirs, data, evals = folders
    out = root / "bad"
    assert _sweep(dirs, data, [evals[0], root / "missing.txt"], out) == 2
    assert "--eval" in capsys.readouterr().err and not out.exists()
    assert _sweep(dirs, data, evals[:1], out) == 2
    assert "one held-out text per checkpoint" in capsys.readouterr().err
