"""
Token files, prepare() on small local files with the real dataset schemas, and the
embedded corpus. Nothing here touches the network.
"""

import json
import os
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.chat import BadRecord
from data.corpus import embedded_documents
from data.prepare import HEADER_BYTES, MAGIC, load_tokens, prepare, write_tokens
from data.tokenizer import get_tokenizer

# a FineWeb-Edu-like record set: the real columns, awkward texts
DOCS = [
    "The mitochondria is the powerhouse of the cell.",
    "Ünïcödé, 日本語, emoji 🤖👩‍🔬 and combining e\u0301.",
    "Code:\n    def f(x):\n        return x ** 2\n",
    "A literal <|endoftext|> in user text must stay text.",
    "",
    "Numbers 12345 and 3.14159.",
] + [f"Document number {i}: once upon a time there was a little robot." for i in range(14)]


def fineweb_rows(docs):
    return [{"text": t, "id": f"<urn:uuid:{i:08d}>", "dump": "CC-MAIN-2024-10",
             "url": f"https://example.com/{i}", "file_path": "s3://bucket/file.warc.gz",
             "language": "en", "language_score": 0.97, "token_count": len(t.split()),
             "score": 3.1, "int_score": 3} for i, t in enumerate(docs)]


def split_docs(path, tok):
    """Cut a token file at bos tokens and decode each document (bos only ever
    appears as the separator: ordinary encoding never produces it)."""
    ids = np.asarray(load_tokens(path)).tolist()
    assert ids and ids[0] == tok.bos_id, "every document must be preceded by bos"
    docs, cur = [], None
    for i in ids:
        if i == tok.bos_id:
            if cur is not None:
                docs.append(tok.decode(cur))
            cur = []
        else:
            cur.append(i)
    docs.append(tok.decode(cur))
    return docs


def check_split(out_dir, docs, tok):
    train = split_docs(os.path.join(out_dir, "train.bin"), tok)
    val = split_docs(os.path.join(out_dir, "val.bin"), tok)
    assert len(val) >= 1 and len(train) >= 1
    assert sorted(train + val) == sorted(docs)
    # each split keeps the original document order
    for part in (train, val):
        positions = [docs.index(d) for d in part]
        assert positions == sorted(positions)
    meta = json.load(open(os.path.join(out_dir, "meta.json")))
    assert meta["n_docs"] == {"train": len(train), "val": len(val)}
    assert meta["vocab_size"] == tok.vocab_size and meta["tokenizer"] == "default"
    # tokens equal bos + tiktoken's own ordinary encoding of each train document
    expected = []
    for d in train:
        expected += [tok.bos_id] + tok.enc.encode_ordinary(d)
    assert np.asarray(load_tokens(os.path.join(out_dir, "train.bin"))).tolist() == expected
    assert meta["n_tokens"]["train"] == len(expected)
    return train, val


# -----------------------------------------------------------------------------
# token files


def test_token_file_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    for vocab_size, dtype in [(8192, np.uint16), (65536, np.uint16), (100277, np.uint32)]:
        tokens = rng.integers(0, vocab_size, size=1000)
        path = str(tmp_path / f"t{vocab_size}.bin")
        write_tokens(path, tokens, vocab_size)
        # the header, read independently with struct
        with open(path, "rb") as f:
            header = f.read(HEADER_BYTES)
        assert struct.unpack("<5q", header[:40]) == (MAGIC, 1, np.dtype(dtype).itemsize, vocab_size, 1000)
        assert header[40:] == b"\0" * (HEADER_BYTES - 40)
        assert os.path.getsize(path) == HEADER_BYTES + 1000 * np.dtype(dtype).itemsize
        loaded = load_tokens(path)
        assert loaded.dtype == dtype and np.array_equal(loaded, tokens)
        assert not os.path.exists(path + ".tmp")
    write_tokens(str(tmp_path / "empty.bin"), np.zeros(0, dtype=np.int64), 8192)
    assert len(load_tokens(str(tmp_path / "empty.bin"))) == 0


def test_token_file_validation(tmp_path):
    path = str(tmp_path / "x.bin")
    write_tokens(path, np.arange(100), 8192)
    good = open(path, "rb").read()

    def corrupt(data):
        with open(path, "wb") as f:
            f.write(data)

    corrupt(struct.pack("<q", 12345) + good[8:])
    with pytest.raises(ValueError, match=r"x\.bin: bad magic"):
        load_tokens(path)
    corrupt(good[:8] + struct.pack("<q", 99) + good[16:])
    with pytest.raises(ValueError, match=r"x\.bin: token file version 99"):
        load_tokens(path)
    corrupt(good[:-10])
    with pytest.raises(ValueError, match=r"x\.bin: header says 100 tokens.*truncated"):
        load_tokens(path)
    corrupt(good[:100])
    with pytest.raises(ValueError, match="smaller than the 1024-byte header"):
        load_tokens(path)
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        load_tokens(str(tmp_path / "nope.bin"))
    # out-of-range ids are refused and leave no file behind
    with pytest.raises(ValueError, match=r"must be in \[0, 8192\)"):
        write_tokens(str(tmp_path / "bad.bin"), np.array([1, 8192]), 8192)
    assert not os.path.exists(tmp_path / "bad.bin") and not os.path.exists(tmp_path / "bad.bin.tmp")


# -----------------------------------------------------------------------------
# prepare


def test_prepare_jsonl_fineweb_schema(tmp_path):
    src = tmp_path / "fineweb.jsonl"
    with open(src, "w") as f:
        for row in fineweb_rows(DOCS):
            f.write(json.dumps(row) + "\n")
    tok = get_tokenizer("default")
    prepare(str(src), str(tmp_path / "out"), val_fraction=0.2, num_proc=2, verbose=False)
    train, val = check_split(str(tmp_path / "out"), DOCS, tok)
    assert 2 <= len(val) <= 7  # ~20% of 20 documents


def test_prepare_parquet_dir_tinystories_schema(tmp_path):
    # a directory of parquet shards with TinyStories' single `text` column,
    # plus a jsonl shard: files are read in sorted order
    d = tmp_path / "shards"
    d.mkdir()
    pq.write_table(pa.table({"text": DOCS[:8]}), d / "a-00000.parquet")
    pq.write_table(pa.table({"text": DOCS[8:15]}), d / "b-00001.parquet")
    with open(d / "c.jsonl", "w") as f:
        for t in DOCS[15:]:
            f.write(json.dumps({"text": t}) + "\n")
    tok = get_tokenizer("default")
    prepare(str(d), str(tmp_path / "out"), batch_size=3, verbose=False)  # batches smaller than a file
    check_split(str(tmp_path / "out"), DOCS, tok)
    # max_docs truncates the stream
    meta = prepare(str(d), str(tmp_path / "out2"), max_docs=5, verbose=False)
    assert sum(meta["n_docs"].values()) == 5


def test_prepare_text_field_and_txt(tmp_path):
    src = tmp_path / "code.parquet"
    pq.write_table(pa.table({"content": DOCS[:4], "lang": ["en"] * 4}), src)
    prepare(str(src), str(tmp_path / "out"), text_field="content", verbose=False)
    check_split(str(tmp_path / "out"), DOCS[:4], get_tokenizer("default"))
    # .txt files are one document each
    d = tmp_path / "txt"
    d.mkdir()
    for i, t in enumerate(DOCS[:3]):
        (d / f"{i}.txt").write_text(t + "\nsecond line\n")
    prepare(str(d), str(tmp_path / "out_txt"), verbose=False)
    check_split(str(tmp_path / "out_txt"), [t + "\nsecond line\n" for t in DOCS[:3]], get_tokenizer("default"))


def test_prepare_malformed_record(tmp_path):
    src = tmp_path / "bad.jsonl"
    rows = fineweb_rows(DOCS[:6])
    rows[3]["text"] = 123
    del rows[4]["text"]
    with open(src, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    with pytest.raises(BadRecord, match=r"bad\.jsonl: record 3: field 'text' is int") as e:
        prepare(str(src), str(tmp_path / "out"), verbose=False)
    assert "--text_field" in str(e.value) and "--skip_bad" in str(e.value)
    # a failed run leaves no outputs (not even temporary files) behind
    assert not os.path.exists(tmp_path / "out") or os.listdir(tmp_path / "out") == []
    meta = prepare(str(src), str(tmp_path / "out"), skip_bad=True, verbose=False)
    assert meta["n_skipped"] == 2
    check_split(str(tmp_path / "out"), [r["text"] for r in rows if isinstance(r.get("text"), str)],
                get_tokenizer("default"))
    with pytest.raises(ValueError, match="field 'body' is missing"):
        prepare(str(src), str(tmp_path / "out3"), text_field="body", verbose=False)


def test_prepare_missing_local_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare(str(tmp_path / "missing.jsonl"), str(tmp_path / "out"), verbose=False)


def test_prepare_embedded(tmp_path):
    meta = prepare("embedded", str(tmp_path / "out"), max_docs=6, verbose=False)
    assert meta["n_docs"]["train"] + meta["n_docs"]["val"] == 6
    docs = embedded_documents()[:6]
    check_split(str(tmp_path / "out"), docs, get_tokenizer("default"))


def test_embedded_documents():
    a = embedded_documents(max_bytes=300_000)
    b = embedded_documents(max_bytes=300_000)
    assert a == b and len(a) > 5
    assert all(isinstance(d, str) and d for d in a)
    assert sum(len(d.encode("utf-8")) for d in a) <= 300_000
    # a bigger cap extends the same sequence
    c = embedded_documents(max_bytes=600_000)
    assert c[:len(a)] == a and len(c) > len(a)
    assert any("def " in d for d in a) and any('"""' in d for d in a)


def test_records_mixed_schema_bad_line_and_hub_names(tmp_path):
    from data.records import iter_records, local_files
    # a field that is a string in one record and a list in another: arrow can't hold it, plain JSON can
    rows = [{"prompt": "q0", "chosen": "a"}, {"prompt": [{"role": "user", "content": "q1"}], "chosen": "b"},
            {"prompt": "q2", "chosen": "c"}]
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [(w, i, r) for w, i, r in iter_records(str(mixed))] == [(str(mixed), i, r) for i, r in enumerate(rows)]
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{"text": [1]}\n{"text": oops}\n')
    # a line that is not JSON comes as a BadRecord in its place, for the loader to raise or count
    got = list(iter_records(str(broken)))
    assert [r for _, _, r in got[:2]] == [{"text": "ok"}, {"text": [1]}]
    assert isinstance(got[2][2], BadRecord) and "line 3 is not valid JSON" in str(got[2][2])
    # comma-separated lists, globs and directories are local; a bare name is a hub dataset
    assert local_files(f"{mixed},{broken}") == [str(mixed), str(broken)]
    assert local_files(str(tmp_path / "*.jsonl")) == sorted([str(broken), str(mixed)])
    assert local_files(str(tmp_path)) == sorted([str(broken), str(mixed)])
    assert local_files("HuggingFaceH4/no_robots") is None
    with pytest.raises(FileNotFoundError, match="does not exist"):
        local_files("missing.parquet")
