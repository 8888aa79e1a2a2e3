"""Calibration text for language models from a path: the text counterpart of
``fxzip.cli.images.DataSource`` (``--data PATH`` for a causal LM).

Four kinds of ``PATH``:

* a text file (any suffix but ``.jsonl`` / ``.pt`` / ``.pth``), read as UTF-8: a
  file that does not decode is an error naming the byte offset (a binary file
  passed by mistake would otherwise calibrate the model on noise);
* a folder of text files: every regular file under it, recursively, in the order
  of their relative paths (sorted, so the same folder gives the same batches on
  every machine); hidden files and folders (``.git``, ``.DS_Store``) are left
  out. A file that is not UTF-8 is skipped with a warning naming it
  (``TextSource.skipped`` lists them), as ``DataSource`` skips an image it
  cannot decode; with ``strict=True`` (``--strict-data``) it is an error;
* a ``.jsonl`` file, one JSON object per line with a string ``text`` field (the
  usual layout of Hugging Face / GPTQ calibration dumps); blank lines are ignored;
* a ``.pt`` / ``.pth`` file of token ids already made: an integer tensor N x L
  (N sequences taken as they are, every token attended), a 1-D integer tensor (one
  token stream, cut into rows of ``seq_len``), or a dict with ``input_ids`` and
  optionally ``attention_mask`` of the same shape. It is read with
  ``torch.load(weights_only=True)``: tensors only, no pickled code runs.

Text is tokenized document by document (a file, or a jsonl line) without special
tokens, and the documents are *packed*: concatenated into one token stream with
the tokenizer's end-of-sequence token between documents, then cut into rows of
exactly ``seq_len`` tokens. Packing wastes no compute on padding (every position
of every row is a real token whose activations enter the statistics), which is
how GPTQ-style calibration sets are built; one document per row would pad short
documents to the longest and truncate long ones. Only the last row is short: it
is padded on the right and its attention mask is 0 there. The mask still matters
there, and for masks given in a ``.pt`` file: statistics must be gathered over
real tokens only.

The tokenizer is duck-typed (a Hugging Face tokenizer fits): called as
``tokenizer(text, add_special_tokens=False)["input_ids"]``, ``len(tokenizer)`` is
its vocabulary size, and ``pad_token_id`` / ``eos_token_id`` may be None. This
module does not import ``transformers``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch.utils.data import Dataset

__all__ = ["TextSource", "TextBatches", "open_text", "check_text_path", "TENSOR_SUFFIXES", "JSONL_SUFFIXES"]

TENSOR_SUFFIXES = (".pt", ".pth")
"""Token ids saved with ``torch.save``."""
JSONL_SUFFIXES = (".jsonl",)
"""JSON lines, one document per line in its ``text`` field."""
WARNED_FILES = 5
"""Files that are not UTF-8 are warned about one by one up to this many; then once for the rest."""
_CHUNK_CHARS = 1 << 20
"""Documents are handed to the tokenizer in lists of about this many characters (a
fast tokenizer encodes a list in parallel; one call per document is slower)."""
_ACCEPTED = ("a UTF-8 text file, a folder of them, a .jsonl file with a \"text\" field per line, or a .pt file of "
             "token ids (N x L, or a dict with input_ids and attention_mask)")


def check_text_path(path: str | os.PathLike) -> str:
    """The kind of ``path`` ("text", "folder", "jsonl" or "tensor"), or a
    ValueError that says what is wrong and what fxzip accepts. Cheap: runs
    before any file is read in full."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"--data {p}: no such file or directory. Pass {_ACCEPTED}.")
    if p.is_dir():
        if next(iter(_text_files(p)), None) is None:
            raise ValueError(f"--data {p}: no files under it (hidden files and folders are left out). "
                             f"Pass {_ACCEPTED}.")
        return "folder"
    if not p.is_file():
        raise ValueError(f"--data {p}: not a regular file or a folder. Pass {_ACCEPTED}.")
    name = p.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(TENSOR_SUFFIXES):
        return "tensor"
    return "text"


class _Rows(Dataset):
    """The rows of a ``TextSource`` one by one (a dict per row), for code that
    wants a map-style ``Dataset`` (``len(source.dataset)``, a ``DataLoader``)."""

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor):
        self.ids, self.mask = ids, mask

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i]}


class TextBatches:
    """The batches of a ``TextSource``, re-iterable and deterministic: the same
    dicts ``{"input_ids", "attention_mask"}`` (int64, B x seq_len), in order, on
    every pass. Consecutive rows are slices of the source's tensors (no copy);
    a ``batch_sampler`` picks the rows of each batch instead."""

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor, batch_size: int,
                 batch_sampler: Iterable[Sequence[int]] | None = None):
        self.ids, self.mask, self.batch_size = ids, mask, batch_size
        self.batch_sampler = None if batch_sampler is None else [list(b) for b in batch_sampler]

    def __len__(self) -> int:
        if self.batch_sampler is not None:
            return len(self.batch_sampler)
        return -(-len(self.ids) // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.batch_sampler is not None:
            for rows in self.batch_sampler:
                index = torch.as_tensor(rows, dtype=torch.long)
                yield {"input_ids": self.ids[index], "attention_mask": self.mask[index]}
            return
        for start in range(0, len(self.ids), self.batch_size):
            stop = start + self.batch_size
            yield {"input_ids": self.ids[start:stop], "attention_mask": self.mask[start:stop]}


class TextSource:
    """Rows of token ids from ``path`` (see the module docstring) for a causal
    LM: ``ids`` and ``mask`` are int64 tensors N x ``seq_len``, ``loader()`` cuts
    them into batches of ``batch_size`` rows, ``description`` says in one line
    what was read.

    ``strict``: a file of a folder that is not UTF-8 is an error instead of
    skipped with a warning. ``progress``: a tqdm bar while text is tokenized.
    For a ``.pt`` file of N x L ids, ``seq_len`` becomes L (its rows are taken
    as they are)."""

    def __init__(self, path: str | os.PathLike, tokenizer: Any, seq_len: int = 256, batch_size: int = 8,
                 strict: bool = False, progress: bool = True):
        if seq_len < 2:
            raise ValueError(f"--seq-len must be at least 2 (a causal LM predicts each token from the ones "
                             f"before it), got {seq_len}")
        if batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
        if not callable(tokenizer):
            raise TypeError(f"tokenizer is a {type(tokenizer).__name__}, which cannot be called; pass a tokenizer "
                            "such as transformers.AutoTokenizer.from_pretrained(model_dir)")
        self.path, self.tokenizer, self.seq_len, self.batch_size = Path(path), tokenizer, seq_len, batch_size
        self.strict, self.progress = strict, progress
        self._takes_lists = True  # whether the tokenizer encodes a list of texts in one call (see _encode)
        self.skipped: dict[str, str] = {}
        """Files that are not UTF-8 (as the user names them) and why, in the order found."""
        self.vocab_size = len(tokenizer)
        eos, pad = getattr(tokenizer, "eos_token_id", None), getattr(tokenizer, "pad_token_id", None)
        self.eos_id: int | None = eos
        self.pad_id: int = pad if pad is not None else eos if eos is not None else 0
        kind = check_text_path(self.path)
        shown = self.path.name or str(self.path)
        if kind == "tensor":
            ids, mask, how = self._read_ids()
            where = shown
        else:
            if kind == "text":
                texts, where = [_decode_file(self.path, str(self.path))], shown
            elif kind == "jsonl":
                texts = _read_jsonl(self.path)
                where = f"{len(texts)} document{'s' * (len(texts) != 1)} in {shown}"
            else:
                texts = self._read_folder()
                where = f"{len(texts)} file{'s' * (len(texts) != 1)} in {shown}/"
            ids, mask = _cut(self._pack(texts), seq_len, self.pad_id)
            how = ""
        self.ids, self.mask = ids, mask
        tokens = int(mask.sum())
        if tokens == 0:
            why = ("every attention mask is 0" if kind == "tensor" else
                   "the text is empty" if kind == "text" else "every document is empty")
            raise ValueError(f"--data {self.path}: no tokens in it ({why}); pass some text")
        padding = mask.numel() - tokens
        skipped = (f"; {len(self.skipped)} file{'s' * (len(self.skipped) != 1)} skipped (not UTF-8)"
                   if self.skipped else "")
        self.description = (f"{len(ids)} sequences of {self.seq_len} tokens ({tokens} tokens, {padding} padding) "
                            f"from {where}{how}{skipped}")

    # reading

    def _read_folder(self) -> list[str]:
        texts = []
        files = list(_text_files(self.path))
        for f in files:
            name = str(f)
            try:
                texts.append(_decode_file(f, name))
            except _NotUTF8 as exc:
                if self.strict:
                    raise ValueError(f"{exc}, or leave out --strict-data to skip such files with a warning") \
                        from None
                self._skip(name, exc.reason)
                continue
        if not texts:
            example = next(iter(self.skipped.items()))
            raise ValueError(f"--data {self.path}: none of its {len(files)} files is UTF-8 text (e.g. "
                             f"{example[0]}: {example[1]}); pass a folder of text files")
        return texts

    def _skip(self, name: str, reason: str) -> None:
        self.skipped[name] = reason
        n = len(self.skipped)
        if n <= WARNED_FILES:
            _warn(f"--data: {name} is not UTF-8 text ({reason}); it is skipped (--strict-data, or "
                  "TextSource(strict=True), fails instead)")
        elif n == WARNED_FILES + 1:
            _warn(f"--data: {name} is not UTF-8 text either ({reason}); more than {WARNED_FILES} files are "
                  "skipped, the rest without a warning each (the count is in the description)")

    def _read_ids(self) -> tuple[torch.Tensor, torch.Tensor, str]:
        p = self.path
        try:
            x = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"--data {p}: cannot read it with torch.load(weights_only=True) ({type(exc).__name__}). "
                             "Save token ids as a tensor or a dict of tensors: torch.save({'input_ids': ids, "
                             "'attention_mask': mask}, path)") from exc
        if isinstance(x, dict):
            if "input_ids" not in x:
                raise ValueError(f"--data {p}: the dict has no 'input_ids' (keys: {', '.join(map(str, x))}); save "
                                 "{'input_ids': ids, 'attention_mask': mask}")
            ids = _check_tensor(p, x["input_ids"], "input_ids")
            mask = x.get("attention_mask")
            if mask is not None:
                mask = _check_tensor(p, mask, "attention_mask")
                if mask.shape != ids.shape:
                    raise ValueError(f"--data {p}: attention_mask has shape {tuple(mask.shape)}, input_ids "
                                     f"{tuple(ids.shape)}; they must be equal")
                if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
                    raise ValueError(f"--data {p}: attention_mask holds values other than 0 and 1 (e.g. "
                                     f"{int(mask[(mask != 0) & (mask != 1)][0])}); 1 marks a real token, 0 padding")
            what = "a dict of input_ids " + ("and attention_mask" if mask is not None else "(no attention_mask)")
        elif isinstance(x, torch.Tensor):
            ids, mask = _check_tensor(p, x, "the tensor"), None
            what = "a tensor of token ids"
        else:
            raise ValueError(f"--data {p} holds a {type(x).__name__}; expected a tensor of token ids (N x L, or "
                             "one stream) or a dict with input_ids and attention_mask")
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"--data {p}: the token ids are {str(ids.dtype).replace('torch.', '')}; token ids are "
                             "integers: save them as torch.long (ids.long())")
        if ids.numel() == 0:
            raise ValueError(f"--data {p} holds no token ids (shape {tuple(ids.shape)}); pass some data")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.vocab_size:
            low = f", the smallest {lo}" if lo < 0 else ""
            raise ValueError(f"--data {p}: token ids out of range: the largest is {hi}{low}, and the tokenizer's "
                             f"vocabulary has {self.vocab_size} tokens (ids 0..{self.vocab_size - 1}); were they "
                             "made with another tokenizer?")
        ids = ids.long()
        mask = torch.ones_like(ids) if mask is None else mask.long()
        if ids.dim() == 2:
            self.seq_len = ids.shape[1]
            return ids.contiguous(), mask.contiguous(), f" ({what}, {len(ids)} x {ids.shape[1]}, rows as they are)"
        ids, mask = _cut_masked(ids, mask, self.seq_len, self.pad_id)
        return ids, mask, f" ({what}, one stream cut into rows of {self.seq_len})"

    # tokenizing

    def _pack(self, texts: list[str]) -> torch.Tensor:
        """The documents' tokens in one int64 stream, the eos id between documents
        (an empty document adds nothing, not even a separator)."""
        from tqdm.auto import tqdm

        pieces: list[torch.Tensor] = []
        sep = None if self.eos_id is None else torch.tensor([self.eos_id], dtype=torch.long)
        total = sum(len(t) for t in texts)
        with _quiet_length_warning(self.tokenizer), \
                tqdm(total=total, unit="char", unit_scale=True, desc="tokenizing", leave=False,
                     disable=not self.progress) as bar:
            for chunk in _chunks(texts, _CHUNK_CHARS):
                for ids in self._encode(chunk):
                    if not ids:
                        continue
                    if pieces and sep is not None:
                        pieces.append(sep)
                    pieces.append(torch.as_tensor(ids, dtype=torch.long))
                bar.update(sum(len(t) for t in chunk))
        return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)

    def _encode(self, texts: list[str]) -> list[list[int]]:
        """Each text's ids: one call on the list where the tokenizer takes lists
        (a Hugging Face tokenizer does, and encodes them in parallel), one call
        per text otherwise."""
        if len(texts) > 1 and self._takes_lists:
            try:
                out = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
                if len(out) == len(texts) and all(isinstance(ids, (list, tuple)) for ids in out):
                    return [list(ids) for ids in out]
            except (TypeError, ValueError, KeyError, AttributeError):
                pass
            self._takes_lists = False
        return [list(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]

    # the calibration interface (as DataSource's)

    @property
    def dataset(self) -> _Rows:
        """The rows one by one (``len(source.dataset)`` is the number of rows)."""
        return _Rows(self.ids, self.mask)

    def __len__(self) -> int:
        return len(self.ids)

    def spread(self, max_batches: int | None, processes: int = 1) -> str | None:
        """Keep ``max_batches`` batches per process of rows evenly spaced over the
        whole data instead of its first rows: the rows follow the files (or
        lines) in order, so the first batches would hold the first documents
        only, and the statistics of the rest would be missing. Deterministic
        (every ``len / kept``-th row). Returns what was done, for the user, or
        None when every row is kept."""
        if max_batches is None:
            return None
        if max_batches < 1:
            raise ValueError(f"--max-batches must be at least 1, got {max_batches}")
        n, kept = len(self.ids), max_batches * self.batch_size * processes
        if kept >= n:
            return None
        index = torch.tensor([i * n // kept for i in range(kept)], dtype=torch.long)
        self.ids, self.mask = self.ids[index], self.mask[index]
        return (f"--max-batches {max_batches}: {kept} of the {n} sequences, evenly spaced over the data "
                f"(one in every {n / kept:.2g}), so every part of it is seen")

    def loader(self, batch_sampler: Iterable[Sequence[int]] | None = None) -> TextBatches:
        """The batches, deterministic (no shuffling; calibration order does not
        matter): dicts of ``input_ids`` and ``attention_mask``, int64 B x
        ``seq_len``, to call a Hugging Face causal LM with (``model(**batch)``).
        ``batch_sampler``: which rows form each batch (e.g. this rank's shard,
        ``fxzip.distributed.shard_batches``) instead of ``batch_size`` in order."""
        return TextBatches(self.ids, self.mask, self.batch_size, batch_sampler)

    def skipped_summary(self, first: int = 5) -> dict[str, Any]:
        """For a report: how many files were skipped and the first few, with why."""
        return {"skipped_files": len(self.skipped),
                "skipped_examples": [f"{name} ({why})" for name, why in list(self.skipped.items())[:first]]}

    def close(self) -> None:
        """Nothing to release (kept so a ``TextSource`` is used like a ``DataSource``)."""

    def __enter__(self) -> "TextSource":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_text(path: str | os.PathLike, tokenizer: Any, seq_len: int = 256, batch_size: int = 8,
              strict: bool = False, progress: bool = True) -> TextSource:
    """``TextSource`` of ``path`` tokenized with ``tokenizer`` into rows of
    ``seq_len`` tokens, ``batch_size`` rows a batch. ``strict``: a file of a
    folder that is not UTF-8 is an error instead of skipped with a warning."""
    return TextSource(path, tokenizer, seq_len, batch_size, strict=strict, progress=progress)


# helpers

def _warn(message: str) -> None:
    from .warn import warn_caller

    warn_caller(message)


def _text_files(root: Path) -> Iterator[Path]:
    """The regular files under ``root``, hidden files and folders left out, in the
    order of their relative paths. Linked folders are followed once each (a link
    cycle does not loop)."""
    found: list[tuple[str, Path]] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            f = Path(dirpath) / name
            if not name.startswith(".") and f.is_file():
                found.append((f.relative_to(root).as_posix(), f))
    for _, f in sorted(found):
        yield f


class _NotUTF8(ValueError):
    """A file that does not decode as UTF-8; ``reason`` says where and why."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def _decode_file(path: Path, name: str) -> str:
    """The file's text (UTF-8; a leading byte-order mark dropped), or a ValueError
    naming the byte offset where it stops being UTF-8."""
    data = path.read_bytes()
    bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as exc:
        at = exc.start + bom
        reason = f"byte {at} is 0x{data[at:at + 1].hex()}: {exc.reason}"
        raise _NotUTF8(f"--data {name}: not UTF-8 text ({reason}); convert it to UTF-8 (e.g. iconv -t UTF-8) "
                       "or remove it", reason) from None


def _read_jsonl(path: Path) -> list[str]:
    """The ``text`` of each JSON line (blank lines ignored), or a ValueError naming
    the first bad line."""
    texts = []
    for number, line in enumerate(_decode_file(path, str(path)).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--data {path}: line {number} is not JSON ({exc.msg}, column {exc.colno}); each "
                             "line must be an object like {\"text\": \"...\"}") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            got = (f"an object without a string \"text\" (keys: {', '.join(record) or 'none'})"
                   if isinstance(record, dict) else f"a JSON {type(record).__name__}")
            raise ValueError(f"--data {path}: line {number} is {got}; each line must be an object like "
                             "{\"text\": \"...\"}")
        texts.append(record["text"])
    return texts


def _check_tensor(path: Path, x: Any, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"--data {path}: {what} is a {type(x).__name__}, not a tensor; save torch tensors")
    if x.dim() not in (1, 2):
        raise ValueError(f"--data {path}: {what} has shape {tuple(x.shape)}; expected N x L (N sequences of L "
                         "tokens) or one stream of tokens (1-D)")
    return x


def _cut(stream: torch.Tensor, seq_len: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``stream`` in rows of ``seq_len``, the last padded with ``pad_id`` (mask 0)."""
    return _cut_masked(stream, torch.ones_like(stream), seq_len, pad_id)


def _cut_masked(ids: torch.Tensor, mask: torch.Tensor, seq_len: int,
                pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = -(-len(ids) // seq_len)
    out_ids = torch.full((rows * seq_len,), pad_id, dtype=torch.long)
    out_mask = torch.zeros(rows * seq_len, dtype=torch.long)
    out_ids[:len(ids)], out_mask[:len(ids)] = ids, mask
    return out_ids.view(rows, seq_len), out_mask.view(rows, seq_len)


def _chunks(texts: list[str], chars: int) -> Iterator[list[str]]:
    chunk, size = [], 0
    for t in texts:
        chunk.append(t)
        size += len(t)
        if size >= chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


class _quiet_length_warning:
    """Silences a Hugging Face tokenizer's "sequence length is longer than the
    maximum" warning while documents are tokenized: packing cuts the stream
    into rows of ``seq_len``, so a long document is never fed to the model
    whole. The tokenizer's own flag is restored afterwards."""

    KEY = "sequence-length-is-longer-than-the-specified-maximum"

    def __init__(self, tokenizer: Any):
        flags = getattr(tokenizer, "deprecation_warnings", None)
        self.flags = flags if isinstance(flags, dict) else None

    def __enter__(self) -> None:
        if self.flags is not None:
            self.had, self.old = self.KEY in self.flags, self.flags.get(self.KEY)
            self.flags[self.KEY] = True

    def __exit__(self, *exc: Any) -> None:
        if self.flags is not None:
            if self.had:
                self.flags[self.KEY] = self.old
            else:
                self.flags.pop(self.KEY, None)

