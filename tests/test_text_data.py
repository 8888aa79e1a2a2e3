"""fxzip.text_data: calibration text for language models from a path (text file,
folder, jsonl, .pt of token ids), packed into rows of seq_len with eos between
documents, batched as dicts a Hugging Face causal LM takes."""
import lm_helpers  # noqa: F401, I001 - first: skips the module when transformers is missing

import json
import warnings

import pytest
import torch

from fxzip.text_data import TextSource, check_text_path, open_text
from lm_helpers import CORPUS_A, CORPUS_B, tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def packed(tok, docs):
    """What packing must give: each document's own ids, eos between them."""
    stream = []
    for d in docs:
        if stream:
            stream.append(tok.eos_token_id)
        stream += encode(tok, d)
    return stream


def check_rows(src, stream, seq_len, pad_id):
    """``src`` holds ``stream`` in rows of ``seq_len``, the last padded with ``pad_id`` (mask 0)."""
    n = len(stream)
    rows = -(-n // seq_len)
    assert src.ids.shape == src.mask.shape == (rows, seq_len)
    assert src.ids.dtype == src.mask.dtype == torch.long
    flat, mask = src.ids.flatten(), src.mask.flatten()
    assert flat[:n].tolist() == stream
    assert mask[:n].eq(1).all() and mask[n:].eq(0).all()
    assert flat[n:].eq(pad_id).all()


def write_folder(root, docs):
    files = {"b.txt": docs[1], "a.txt": docs[0], "sub/c.md": docs[2], "z": docs[3]}
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
    (root / ".hidden").write_text("never read", encoding="utf-8")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("never read either", encoding="utf-8")
    return [docs[0], docs[1], docs[2], docs[3]]  # a.txt, b.txt, sub/c.md, z


def test_text_file_rows_padding_and_mask(tok, tmp_path):
    text = "\n".join(CORPUS_A + CORPUS_B)
    f = tmp_path / "notes.txt"
    f.write_text(text, encoding="utf-8")
    src = TextSource(f, tok, seq_len=16, batch_size=4)  # progress on: the tqdm bar must not get in the way
    stream = encode(tok, text)
    assert len(stream) % 16 != 0  # so the last row is padded
    check_rows(src, stream, 16, tok.pad_token_id)
    pad = src.mask.numel() - len(stream)
    assert src.description == (f"{len(src.ids)} sequences of 16 tokens ({len(stream)} tokens, {pad} padding) "
                               "from notes.txt")
    assert check_text_path(f) == "text"


def test_folder_packs_documents_with_eos_between(tok, tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    order = write_folder(root, CORPUS_A)
    assert check_text_path(root) == "folder"
    src = open_text(root, tok, seq_len=8, batch_size=3, progress=False)
    stream = packed(tok, order)  # sorted by relative path, hidden files left out
    assert stream.count(tok.eos_token_id) == 3
    check_rows(src, stream, 8, tok.pad_token_id)
    assert src.description.endswith("from 4 files in corpus/")
    assert src.skipped == {}


def test_jsonl_documents_and_blank_lines(tok, tmp_path):
    f = tmp_path / "calib.jsonl"
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(CORPUS_B)]
    f.write_text(lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n   \n", encoding="utf-8")
    assert check_text_path(f) == "jsonl"
    src = TextSource(f, tok, seq_len=10, progress=False)
    check_rows(src, packed(tok, CORPUS_B), 10, tok.pad_token_id)
    assert "from 4 documents in calib.jsonl" in src.description


@pytest.mark.parametrize("line, words", [
    ("{not json", "line 3 is not JSON"),
    ('{"content": "x"}', 'line 3 is an object without a string "text" (keys: content)'),
    ('{"text": 5}', "line 3 is an object without a string"),
    ('["text"]', "line 3 is a JSON list"),
])
def test_jsonl_bad_line_names_its_number(tok, tmp_path, line, words):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"text": "a"}) + "\n\n" + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.jsonl") as err:
        TextSource(f, tok, progress=False)
    assert words in str(err.value)
    assert str(err.value).startswith("--data ")


def test_non_utf8_file_in_folder_skipped_with_warning_or_error_under_strict(tok, tmp_path):
    root = tmp_path / "mixed"
    root.mkdir()
    (root / "a.txt").write_text(CORPUS_B[0], encoding="utf-8")
    (root / "b.bin").write_bytes(b"abc\xff\xfe\x00")
    (root / "c.txt").write_text(CORPUS_B[1], encoding="utf-8")
    with pytest.warns(UserWarning, match=r"b\.bin is not UTF-8 text \(byte 3 is 0xff"):
        src = TextSource(root, tok, seq_len=8, progress=False)
    check_rows(src, packed(tok, CORPUS_B[:2]), 8, tok.pad_token_id)
    assert list(src.skipped) == [str(root / "b.bin")]
    assert src.skipped_summary()["skipped_files"] == 1
    assert "from 2 files in mixed/; 1 file skipped (not UTF-8)" in src.description
    with pytest.raises(ValueError, match=r"b\.bin: not UTF-8 text \(byte 3 .*--strict-data"):
        TextSource(root, tok, strict=True, progress=False)


def test_non_utf8_text_file_names_byte_offset(tok, tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt: not UTF-8 text \(byte 3 is 0xe9"):
        TextSource(f, tok, progress=False)


def test_pt_two_dim_rows_taken_as_they_are(tok, tmp_path):
    ids = torch.randint(0, len(tok), (5, 12), dtype=torch.int32)
    f = tmp_path / "ids.pt"
    torch.save(ids, f)
    src = TextSource(f, tok, seq_len=256, batch_size=2, progress=False)
    assert src.seq_len == 12
    assert torch.equal(src.ids, ids.long()) and src.mask.eq(1).all()
    assert src.description.startswith("5 sequences of 12 tokens (60 tokens, 0 padding) from ids.pt")
    assert [len(b["input_ids"]) for b in src.loader()] == [2, 2, 1]


def test_pt_one_dim_stream_cut_into_rows(tok, tmp_path):
    stream = torch.randint(2, len(tok), (23,))
    f = tmp_path / "stream.pt"
    torch.save(stream, f)
    src = TextSource(f, tok, seq_len=10, progress=False)
    check_rows(src, stream.tolist(), 10, tok.pad_token_id)


def test_pt_dict_with_attention_mask(tok, tmp_path):
    ids = torch.randint(2, len(tok), (3, 6))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, 4:] = 0
    ids[1, 4:] = tok.pad_token_id
    f = tmp_path / "batch.pt"
    torch.save({"input_ids": ids, "attention_mask": mask.bool()}, f)
    src = TextSource(f, tok, progress=False)
    assert torch.equal(src.ids, ids) and torch.equal(src.mask, mask) and src.mask.dtype == torch.long
    assert "(16 tokens, 2 padding)" in src.description
    torch.save({"input_ids": ids}, f)
    assert TextSource(f, tok, progress=False).mask.eq(1).all()
    torch.save({"input_ids": ids, "attention_mask": mask[:, :5]}, f)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(3, 5\), input_ids \(3, 6\)"):
        TextSource(f, tok, progress=False)
    torch.save({"ids": ids}, f)
    with pytest.raises(ValueError, match="the dict has no 'input_ids' \\(keys: ids\\)"):
        TextSource(f, tok, progress=False)


def test_pt_bad_ids(tok, tmp_path):
    f = tmp_path / "ids.pt"
    vocab = len(tok)
    torch.save(torch.tensor([[1, 2, vocab + 7]]), f)
    with pytest.raises(ValueError, match=rf"out of range: the largest is {vocab + 7}, .*vocabulary has {vocab} "):
        TextSource(f, tok, progress=False)
    torch.save(torch.tensor([[1, -1, 3]]), f)
    with pytest.raises(ValueError, match=rf"the largest is 3, the smallest -1, .*vocabulary has {vocab} "):
        TextSource(f, tok, progress=False)
    torch.save(torch.rand(2, 4), f)
    with pytest.raises(ValueError, match="token ids are float32; token ids are integers"):
        TextSource(f, tok, progress=False)
    torch.save(torch.zeros(2, 3, 4, dtype=torch.long), f)
    with pytest.raises(ValueError, match=r"has shape \(2, 3, 4\); expected N x L"):
        TextSource(f, tok, progress=False)
    torch.save(tmp_path, f)  # a pickled object: weights_only refuses it, nothing runs
    with pytest.raises(ValueError, match=r"cannot read it with torch.load\(weights_only=True\)"):
        TextSource(f, tok, progress=False)


def test_path_and_size_errors(tok, tmp_path):
    with pytest.raises(ValueError, match="--data .*nope.txt: no such file or directory"):
        TextSource(tmp_path / "nope.txt", tok)
    with pytest.raises(ValueError, match="--seq-len must be at least 2 .*got 1"):
        TextSource(tmp_path, tok, seq_len=1)
    with pytest.raises(ValueError, match="--batch-size must be at least 1, got 0"):
        TextSource(tmp_path, tok, batch_size=0)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".only_hidden").write_text("x")
    with pytest.raises(ValueError, match="no files under it"):
        TextSource(empty, tok)
    blank = tmp_path / "blank.txt"
    blank.write_text("")
    with pytest.raises(ValueError, match=r"blank\.txt: no tokens in it \(the text is empty\)"):
        TextSource(blank, tok, progress=False)
    torch.save({"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.zeros(2, 3)},
               tmp_path / "masked.pt")
    with pytest.raises(ValueError, match="every attention mask is 0"):
        TextSource(tmp_path / "masked.pt", tok, progress=False)


def test_spread_keeps_evenly_spaced_rows(tok, tmp_path):
    f = tmp_path / "rows.pt"
    torch.save(torch.arange(20).repeat_interleave(4).view(20, 4), f)  # row i holds i
    src = TextSource(f, tok, batch_size=2, progress=False)
    assert src.spread(None) is None and src.spread(10) is None and len(src) == 20
    said = src.spread(2)
    assert said == ("--max-batches 2: 4 of the 20 sequences, evenly spaced over the data (one in every 5), "
                    "so every part of it is seen")
    assert src.ids[:, 0].tolist() == [0, 5, 10, 15] and len(src.dataset) == 4
    assert [b["input_ids"][:, 0].tolist() for b in src.loader()] == [[0, 5], [10, 15]]


def test_loader_reiterable_deterministic_and_drives_a_model(tok, tmp_path):
    f = tmp_path / "calib.jsonl"
    f.write_text("\n".join(json.dumps({"text": t}) for t in CORPUS_A + CORPUS_B), encoding="utf-8")
    src = TextSource(f, tok, seq_len=12, batch_size=4, progress=False)
    batches = src.loader()
    first, second = list(batches), list(batches)
    assert len(batches) == len(first) == -(-len(src) // 4) >= 2
    for a, b in zip(first, second):
        assert a.keys() == {"input_ids", "attention_mask"}
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["attention_mask"], b["attention_mask"])
        assert a["input_ids"].dtype == torch.long and a["input_ids"].shape[1] == 12
    assert torch.equal(torch.cat([b["input_ids"] for b in first]), src.ids)
    sharded = list(src.loader(batch_sampler=[[0, 2], [1]]))
    assert torch.equal(sharded[0]["input_ids"], src.ids[[0, 2]]) and len(sharded[1]["input_ids"]) == 1
    model = tiny_llama(len(tok))
    with torch.no_grad():
        for batch in (first[0], first[-1]):  # the last holds the padded row
            logits = model(**batch).logits
            assert logits.shape == (*batch["input_ids"].shape, len(tok)) and torch.isfinite(logits).all()


class CharTokenizer:
    """A duck-typed tokenizer: one str at a time (a list is refused), no eos, no pad."""

    eos_token_id = pad_token_id = None

    def __call__(self, text, add_special_tokens=True):
        if not isinstance(text, str):
            raise TypeError("one text at a time")
        return {"input_ids": [ord(c) % 40 + 1 for c in text]}

    def __len__(self):
        return 41


def test_duck_typed_tokenizer_without_eos_or_pad(tmp_path):
    root = tmp_path / "docs"
    root.mkdir()
    (root / "1.txt").write_text("hello")
    (root / "2.txt").write_text("world!")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        src = TextSource(root, CharTokenizer(), seq_len=4, progress=False)
    stream = [ord(c) % 40 + 1 for c in "helloworld!"]  # no separator without an eos id
    check_rows(src, stream, 4, 0)
