"""data/prepare.py --sharded: one resumable shard per input file, joined into the same bytes as an unsharded run."""

import json
import os

import pytest

import data.prepare as prep
from data.chat import BadRecord


def write_files(d, n_files=3, docs=40, broken=None):
    os.makedirs(d, exist_ok=True)
    for k in range(n_files):
        with open(os.path.join(d, f"part-{k:03d}.jsonl"), "w") as f:
            for i in range(docs):
                f.write(json.dumps(dict(text=f"document {k}-{i}: " + "words and more words " * (i % 7 + 1))) + "\n")
            if k == broken:
                f.write("{not json\n")
    return str(d)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def test_sharded_run_resumes_and_equals_the_unsharded_one(tmp_path, monkeypatch):
    src = write_files(tmp_path / "in", broken=1)
    out = str(tmp_path / "sharded")
    seen = []
    real = prep._tokenize
    monkeypatch.setattr(prep, "_tokenize", lambda *a, **k: seen.append(k.get("where")) or real(*a, **k))
    with pytest.raises(BadRecord, match="part-001.jsonl: record 40"):  # interrupted at the second file
        prep.prepare(src, out, val_fraction=0.1, sharded=True, verbose=False)
    assert sorted(os.listdir(os.path.join(out, "shards"))) == ["00000.json", "00000.train.bin", "00000.val.bin"]
    assert not os.path.exists(os.path.join(out, "train.bin"))
    write_files(tmp_path / "in")  # fixed: the run again skips the first file, already done
    seen.clear()
    meta = prep.prepare(src, out, val_fraction=0.1, sharded=True, verbose=False)
    assert seen == ["file 2/3: ", "file 3/3: "]
    assert not os.path.exists(os.path.join(out, "shards"))
    ref = str(tmp_path / "plain")
    ref_meta = prep.prepare(src, ref, val_fraction=0.1, verbose=False)
    for split in ("train", "val"):
        assert read(os.path.join(out, f"{split}.bin")) == read(os.path.join(ref, f"{split}.bin"))
    assert meta["n_docs"] == ref_meta["n_docs"] and meta["n_tokens"] == ref_meta["n_tokens"]


def test_sharded_needs_local_files(tmp_path):
    with pytest.raises(prep.DataError, match="not local"):
        prep.prepare("fineweb-edu", str(tmp_path / "out"), sharded=True, verbose=False)
