"""Two text domains that every machine with Python has, split into train /
calibration / held-out evaluation by document, and a byte-level BPE
tokenizer trained once on both training splits.

* ``code``: the Python standard library's top-level modules (``Lib/*.py``
  of the running interpreter), one document per file;
* ``prose``: the language reference's topics as English text
  (``pydoc_data.topics.topics``), one document per topic.

Why these: nothing is downloaded, they ship with the interpreter, and they
are as different as two domains of one tokenizer can be (indentation and
identifiers against sentences). The split is by document, every
``EVAL_EVERY``-th document held out for evaluation and every
``CALIB_EVERY``-th of the rest for calibration, so no sentence of the
evaluation text is seen in training or calibration. The interpreter's
version decides the text: it is recorded with every result.
"""
from __future__ import annotations

import json
import platform
import sysconfig
from pathlib import Path

DOMAINS = ("code", "prose")
EVAL_EVERY = 10     # every 10th document: held-out evaluation text
CALIB_EVERY = 10    # every 10th of the others: calibration text (never trained on)
VOCAB = 3072


def documents(domain: str) -> list[tuple[str, str]]:
    """(name, text) of every document of ``domain``, in a fixed order."""
    if domain == "code":
        lib = Path(sysconfig.get_paths()["stdlib"])
        return [(p.name, p.read_text(encoding="utf-8", errors="replace")) for p in sorted(lib.glob("*.py"))]
    if domain == "prose":
        from pydoc_data.topics import topics

        return [(name, topics[name]) for name in sorted(topics)]
    raise ValueError(f"unknown domain {domain!r}; one of {DOMAINS}")


def split(domain: str) -> dict[str, list[str]]:
    """The domain's documents as {'train', 'calib', 'eval'} lists of texts."""
    parts: dict[str, list[str]] = {"train": [], "calib": [], "eval": []}
    rest = 0
    for i, (_, text) in enumerate(documents(domain)):
        if i % EVAL_EVERY == EVAL_EVERY - 1:
            parts["eval"].append(text)
            continue
        parts["calib" if rest % CALIB_EVERY == CALIB_EVERY - 1 else "train"].append(text)
        rest += 1
    return parts


def write_texts(out: Path) -> dict[str, dict[str, str]]:
    """Each domain's splits as ``out/{domain}_{split}.jsonl`` (one ``{"text": ...}``
    per document: the form ``fxzip merge --data`` reads); returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, dict[str, str]] = {}
    for domain in DOMAINS:
        paths[domain] = {}
        for name, texts in split(domain).items():
            path = out / f"{domain}_{name}.jsonl"
            path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
            paths[domain][name] = str(path)
    return paths


def train_tokenizer(folder: Path, vocab_size: int = VOCAB):
    """A byte-level BPE tokenizer (``<pad>`` 0, ``<eos>`` 1) on both domains'
    training splits, saved to ``folder`` (or loaded from it when already there)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if (folder / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(folder)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = [t for d in DOMAINS for t in split(d)["train"]]
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    return fast


def provenance() -> dict[str, str]:
    """What decides the text: the interpreter it was read from."""
    return {"python": platform.python_version(), "stdlib": sysconfig.get_paths()["stdlib"]}
