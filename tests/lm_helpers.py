"""Tiny language-model fixtures: a byte-level BPE tokenizer trained in the test
on a few sentences (the ``tokenizers`` package; nothing downloaded) and a
Llama-style causal LM from its config class (grouped-query attention,
RMSNorm, SwiGLU, rotary), small enough to train or merge in seconds.

Why a real tokenizer and a real ``transformers`` model rather than hand-made
modules: the Hugging Face path (``save_pretrained`` in and out, tokenizer
files, dict batches with an attention mask) is what these tests exercise.
"""
from __future__ import annotations

from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

CORPUS_A = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * i)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n",
    "import os\nprint(os.path.join('a', 'b'))\n",
]
CORPUS_B = [
    "The quick brown fox jumps over the lazy dog.",
    "A merge of two models keeps what both have learned.",
    "Every sentence here is plain English prose about nothing much.",
    "Statistics are gathered over real tokens only, never over padding.",
]


def tiny_tokenizer(texts: list[str] | None = None, vocab_size: int = 320):
    """A ``PreTrainedTokenizerFast`` (byte-level BPE, ``<pad>`` and ``<eos>``
    special tokens) trained on ``texts`` (both corpora by default)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts if texts is not None else CORPUS_A + CORPUS_B, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def tiny_llama(vocab_size: int, seed: int = 0, *, hidden: int = 32, layers: int = 2, heads: int = 4,
               kv_heads: int = 2, tie: bool = False):
    """``LlamaForCausalLM`` with random weights drawn from ``seed`` (caches off, eval mode)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=128, use_cache=False, tie_word_embeddings=tie,
                         pad_token_id=0, eos_token_id=1, bos_token_id=1)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # O(1) weights: a wrong fold must show in the outputs
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, p.shape[-1] ** -0.5 if p.dim() > 1 else 1.0)
    return model


def save_pair(tmp: Path, tokenizer, models) -> list[Path]:
    """Each model ``save_pretrained`` into ``tmp/m<k>`` with the tokenizer beside it."""
    dirs = []
    for k, model in enumerate(models):
        d = tmp / f"m{k}"
        model.save_pretrained(d)
        tokenizer.save_pretrained(d)
        dirs.append(d)
    return dirs


def padded_batches(tok, texts: list[str], seq: int, n_rep: int = 1) -> list[dict]:
    """Dict batches of 4 texts right-padded to ``seq`` tokens (what a tokenizer yields), repeated ``n_rep`` times."""
    out = []
    for i in range(0, len(texts), 4):
        enc = tok(texts[i:i + 4], padding="max_length", max_length=seq, truncation=True, return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out * n_rep


def noisy_padding(data: list[dict], vocab: int, seed: int) -> list[dict]:
    """The same batches with random token ids at the padded positions: whatever
    counts only real tokens gives the same result on both."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    noisy = []
    for d in data:
        ids = d["input_ids"].clone()
        pad = d["attention_mask"] == 0
        ids[pad] = torch.randint(2, vocab, (int(pad.sum()),), generator=gen)
        noisy.append({"input_ids": ids, "attention_mask": d["attention_mask"]})
    return noisy
