"""Hugging Face checkpoints in and out: ``fxzip merge DIR_A DIR_B --data TEXT``,
``fxzip.save(..., pretrained=)``, ``fxzip.load`` of a save_pretrained folder.

Invariants: a model merged with itself through the command line comes back
from ``from_pretrained`` computing the same logits; the saved folder computes
what ``fxzip.merge`` returned; a tie of input and output embeddings is kept
exactly where it holds and otherwise untied in the saved config too.
"""
from __future__ import annotations

import copy
import json

import lm_helpers as h
import pytest
import torch

import fxzip
from fxzip.cli import main

SEQ = 32


@pytest.fixture(scope="module")
def tok():
    return h.tiny_tokenizer()


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("hf")
    dirs = h.save_pair(root, tok, [h.tiny_llama(len(tok), 0), h.tiny_llama(len(tok), 1)])
    text = root / "text.txt"
    text.write_text("\n\n".join(h.CORPUS_A + h.CORPUS_B) * 4)
    return root, dirs, text


def _ids(tok, n: int = 4):
    enc = tok((h.CORPUS_A + h.CORPUS_B)[:n], padding="max_length", max_length=SEQ, truncation=True,
              return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _logits(model, batch):
    with torch.no_grad():
        out = model(**batch)
    return out["logits"] if isinstance(out, dict) else out.logits


def _rel(a, b) -> float:
    return float((a - b).abs().max() / a.abs().max())


def test_cli_self_merge_of_a_folder_loads_back_with_from_pretrained(folders, tok, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, dirs, text = folders
    out = root / "self"
    assert main(["merge", str(dirs[0]), str(dirs[0]), "--data", str(text), "--seq-len", str(SEQ), "--batch-size",
                 "4", "--out", str(out), "--quiet", "--dtype", "float32"]) == 0
    assert "from_pretrained" in capsys.readouterr().out
    original = AutoModelForCausalLM.from_pretrained(dirs[0]).eval()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    batch = _ids(tok)
    assert _rel(_logits(original, batch), _logits(merged, batch)) < 1e-5
    assert AutoTokenizer.from_pretrained(out).get_vocab() == tok.get_vocab()
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["seq_len"] == SEQ and report["model"] == {"transformers": "LlamaForCausalLM"}
    assert report["settings"]["dtype"] == "float32"
    loaded = fxzip.load(out)  # a save_pretrained folder: transformers builds it
    assert type(loaded).__name__ == "LlamaForCausalLM"


def test_cli_merge_of_two_folders_equals_the_python_merge(folders, tok):
    from transformers import AutoModelForCausalLM

    from fxzip.text_data import open_text

    root, dirs, text = folders
    out = root / "pair"
    assert main(["merge", str(dirs[0]), str(dirs[1]), "--data", str(text), "--seq-len", str(SEQ), "--batch-size",
                 "4", "--out", str(out), "--quiet"]) == 0
    models = [AutoModelForCausalLM.from_pretrained(d).eval() for d in dirs]
    with open_text(text, tok, SEQ, 4, progress=False) as source:
        want = fxzip.merge(*models, data=source.loader(), progress=False)
    got = AutoModelForCausalLM.from_pretrained(out).eval()
    batch = _ids(tok)
    assert _rel(_logits(want, batch), _logits(got, batch)) < 1e-6


def test_cli_partial_zip_of_folders_is_a_program_with_one_output_per_model(folders, tok):
    root, dirs, text = folders
    out = root / "partial"
    assert main(["merge", str(dirs[0]), str(dirs[1]), "--data", str(text), "--seq-len", str(SEQ), "--batch-size",
                 "4", "--out", str(out), "--stop-at", "4", "--quiet"]) == 0
    assert (out / "model.pt2").exists() and (out / "tokenizer.json").exists() and not (out / "config.json").exists()
    program = torch.export.load(str(out / "model.pt2")).module()
    batch = _ids(tok)
    heads = program(batch["input_ids"], batch["attention_mask"])
    assert len(heads) == 2 and heads[0]["logits"].shape == (4, SEQ, len(tok))


@pytest.mark.parametrize("options,kept", [({"method": "permute"}, True), ({"refit": True}, False)])
def test_tied_embeddings_saved_tied_only_where_the_tie_holds(tmp_path, tok, options, kept):
    from transformers import AutoModelForCausalLM

    a, b = (h.tiny_llama(len(tok), seed, tie=True) for seed in (0, 1))
    assert a.lm_head.weight is a.model.embed_tokens.weight
    data = [_ids(tok, 8)] * 3
    merged = fxzip.merge(a, b, data=data, progress=False, **options)
    fxzip.save(merged, tmp_path / "out", pretrained=a, tokenizer=tok)
    assert a.lm_head.weight is a.model.embed_tokens.weight  # the template is not changed
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["tie_word_embeddings"] is kept
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert (back.lm_head.weight is back.model.embed_tokens.weight) is kept
    assert _rel(_logits(merged, data[0]), _logits(back, data[0])) < 1e-6


def test_cli_refuses_remote_code_other_tokenizers_and_image_options(folders, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    root, dirs, text = folders
    remote = tmp_path / "remote"
    AutoModelForCausalLM.from_pretrained(dirs[1]).save_pretrained(remote)
    config = json.loads((remote / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilLM"}
    (remote / "config.json").write_text(json.dumps(config))
    args = ["--data", str(text), "--out", str(tmp_path / "o")]
    assert main(["merge", str(dirs[0]), str(remote), *args]) == 2
    assert "auto_map" in capsys.readouterr().err
    other = tmp_path / "other"
    AutoModelForCausalLM.from_pretrained(dirs[1]).save_pretrained(other)
    h.tiny_tokenizer(h.CORPUS_A).save_pretrained(other)
    assert main(["merge", str(dirs[0]), str(other), *args]) == 2
    err = capsys.readouterr().err
    assert "do not share a tokenizer" in err and "token" in err
    assert main(["merge", str(dirs[0]), str(dirs[1]), "--model", "resnet18", *args]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["merge", str(dirs[0]), str(text), *args]) == 2
    assert "not a save_pretrained folder" in capsys.readouterr().err
    ckpt = tmp_path / "a.pt"
    torch.save({}, ckpt)
    assert main(["merge", str(ckpt), str(ckpt), "--model", "resnet18", "--dtype", "float32", *args]) == 2
    assert "--dtype is for Hugging Face" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_greedy_generation_from_each_head_of_a_saved_partial_zip_equals_generate(folders, tok):
    """A partial zip's program is captured at one length and has no cache; padded
    to that length it generates what transformers' generate does with the model
    (a self-merge: each head is the model)."""
    from transformers import AutoModelForCausalLM

    from fxzip.generation import greedy_generate

    root, dirs, text = folders
    out = root / "partial_self"
    assert main(["merge", str(dirs[0]), str(dirs[0]), "--data", str(text), "--seq-len", str(SEQ), "--batch-size",
                 "4", "--out", str(out), "--stop-at", "6", "--quiet"]) == 0
    program = fxzip.load(out)  # two inputs sharing the batch dimension: guards that compare their sizes pass
    model = AutoModelForCausalLM.from_pretrained(dirs[0]).eval()
    prompt = tok(["def add(a, b):"], return_tensors="pt")["input_ids"]
    want = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False,
                          pad_token_id=tok.pad_token_id)
    eager = greedy_generate(model, prompt, 10)
    assert torch.equal(eager, want)
    for head in range(2):
        got = greedy_generate(program, prompt, 10, length=SEQ, head=head, pad_token_id=tok.pad_token_id)
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="exceed the length"):
        greedy_generate(program, prompt, SEQ, length=SEQ, head=0)
    # prompts of different lengths in one right-padded batch: each row as if alone
    texts = ["def add(a, b):", "The quick brown fox jumps over", "x ="]
    alone = [greedy_generate(model, tok([t], return_tensors="pt")["input_ids"], 6) for t in texts]
    batch = tok(texts, padding="longest", return_tensors="pt")
    assert not bool(batch["attention_mask"].all())  # the batch is padded
    for runner, kwargs in ((model, {}), (program, {"length": SEQ, "head": 1})):
        got = greedy_generate(runner, batch["input_ids"], 6, attention_mask=batch["attention_mask"],
                              pad_token_id=tok.pad_token_id, **kwargs)
        for row, want_row in zip(got, alone):
            assert torch.equal(row[:want_row.shape[1]], want_row[0])
            assert bool((row[want_row.shape[1]:] == tok.pad_token_id).all())
    left = batch["attention_mask"].flip(1)
    with pytest.raises(ValueError, match="not right padding"):
        greedy_generate(model, batch["input_ids"], 2, attention_mask=left)


def test_a_tokenizer_that_normalises_differently_is_another_tokenizer(tok):
    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast

    from fxzip.hf import tokenizer_difference

    backend = copy.deepcopy(tok.backend_tokenizer)
    backend.normalizer = normalizers.Lowercase()
    lower = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")
    assert tokenizer_difference([tok, tok], ["a", "b"]) is None
    assert "normalizer" in tokenizer_difference([tok, lower], ["a", "b"])


def test_load_into_a_given_module_restores_a_kept_tie(tmp_path, tok):
    a, b = (h.tiny_llama(len(tok), seed, tie=True) for seed in (0, 1))
    data = [_ids(tok, 8)] * 2
    merged = fxzip.merge(a, b, data=data, progress=False, method="permute")
    fxzip.save(merged, tmp_path / "out", pretrained=a, tokenizer=tok)
    target = h.tiny_llama(len(tok), 7, tie=True)
    loaded = fxzip.load(tmp_path / "out", model=target)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert _rel(_logits(merged, data[0]), _logits(loaded, data[0])) < 1e-6
