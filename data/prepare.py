"""
Tokenise a text corpus into flat token files for pretraining.

$ python -m data.prepare --source=embedded --out=data/bin/embedded
$ python -m data.prepare --source=tinystories --out=data/bin/tinystories --tokenizer=default
$ python -m data.prepare --source=path/to/shards/ --out=data/bin/mine --text_field=content

Output in --out: train.bin, val.bin (format below) and meta.json. Every document
is PRECEDED by the <|endoftext|> (= bos) token, then all are concatenated, so a
training window that starts anywhere sees document boundaries as bos tokens.

Token file format: a 1024-byte header of little-endian int64s
    [MAGIC, VERSION, itemsize, vocab_size, n_tokens, 0, 0, ...]
followed by n_tokens tokens as little-endian uint16 (itemsize 2, vocab <= 65536)
or uint32 (itemsize 4). load_tokens() memory-maps it.
"""

import argparse
import json
import os
import time

import numpy as np

from data.chat import BadRecord
from data.records import DataError, iter_records, read_records

MAGIC = 20241201
VERSION = 1
HEADER_BYTES = 1024
HEADER_INTS = HEADER_BYTES // 8

# named presets: (hub dataset path, config name, text field)
PRESETS = {
    "fineweb-edu": ("HuggingFaceFW/fineweb-edu", "sample-10BT", "text"),
    "tinystories": ("roneneldan/TinyStories", None, "text"),
}

# -----------------------------------------------------------------------------
# token files


def token_dtype(vocab_size):
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


class TokenWriter:
    """
    Append tokens to a token file without holding them in memory. Writes to
    path.tmp and renames on close(), so a reader never sees a half-written file.
    """

    def __init__(self, path, vocab_size):
        self.path, self.vocab_size = path, vocab_size
        self.dtype = token_dtype(vocab_size)
        self.n_tokens = 0
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.tmp = path + ".tmp"
        self.f = open(self.tmp, "wb")
        self.f.write(b"\0" * HEADER_BYTES)  # placeholder until we know n_tokens

    def write(self, tokens):
        tokens = np.asarray(tokens)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"{self.path}: token ids must be in [0, {self.vocab_size}), "
                             f"got range [{tokens.min()}, {tokens.max()}]; wrong vocab_size?")
        self.f.write(tokens.astype(self.dtype, copy=False).tobytes())
        self.n_tokens += tokens.size

    def close(self):
        header = np.zeros(HEADER_INTS, dtype="<i8")
        header[:5] = [MAGIC, VERSION, self.dtype.itemsize, self.vocab_size, self.n_tokens]
        self.f.seek(0)
        self.f.write(header.tobytes())
        self.f.close()
        os.replace(self.tmp, self.path)

    def abort(self):
        self.f.close()
        os.remove(self.tmp)


def write_tokens(path, tokens, vocab_size):
    w = TokenWriter(path, vocab_size)
    try:
        w.write(tokens)
    except BaseException:
        w.abort()
        raise
    w.close()


def read_header(path):
    """Returns (itemsize, vocab_size, n_tokens), checking the header against the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"token file {path!r} does not exist; create it with `python -m data.prepare`")
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        raise ValueError(f"{path}: file is {size} bytes, smaller than the {HEADER_BYTES}-byte header; "
                         f"it is truncated or not a token file; regenerate it with `python -m data.prepare`")
    header = np.fromfile(path, dtype="<i8", count=HEADER_INTS)
    magic, version, itemsize, vocab_size, n_tokens = (int(x) for x in header[:5])
    if magic != MAGIC:
        raise ValueError(f"{path}: bad magic number {magic} (expected {MAGIC}); this is not a token file "
                         f"written by data/prepare.py (a raw nanoGPT .bin has no header); regenerate it")
    if version != VERSION:
        raise ValueError(f"{path}: token file version {version}, but this code reads version {VERSION}; "
                         f"regenerate it with `python -m data.prepare`")
    if itemsize not in (2, 4) or itemsize != token_dtype(vocab_size).itemsize:
        raise ValueError(f"{path}: header says itemsize {itemsize} for vocab_size {vocab_size}, "
                         f"which is inconsistent; the header is corrupt, regenerate the file")
    expected = HEADER_BYTES + n_tokens * itemsize
    if n_tokens < 0 or size != expected:
        raise ValueError(f"{path}: header says {n_tokens} tokens ({expected} bytes in all) but the file is "
                         f"{size} bytes; it is truncated or corrupt, regenerate it")
    return itemsize, vocab_size, n_tokens


def load_tokens(path):
    """Memory-map a token file as a 1-D numpy array (uint16 or uint32)."""
    itemsize, vocab_size, n_tokens = read_header(path)
    dtype = np.dtype("<u2") if itemsize == 2 else np.dtype("<u4")
    if n_tokens == 0:
        return np.zeros(0, dtype=dtype)  # mmap cannot map zero bytes
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(n_tokens,))


# -----------------------------------------------------------------------------
# sources -> stream of (where, index, record)


def iter_source(source, config=None, split="train"):
    """(where, index, record) from "embedded", a named preset, local files or a hub dataset."""
    if source == "embedded":
        from data.corpus import embedded_documents
        for i, doc in enumerate(embedded_documents()):
            yield "embedded", i, {"text": doc}
        return
    path, name = PRESETS[source][:2] if source in PRESETS else (source, config)
    yield from iter_records(path, split=split, config=name)


def is_val(index, val_fraction):
    """
    Deterministic train/val split by document index: the fractional part of
    index * golden ratio is spread evenly over [0, 1), so a fraction val_fraction
    of documents land in val. Document 0 always does (frac = 0), so val is never empty.
    """
    return index == 0 or (index * 0.6180339887498949) % 1.0 < val_fraction


# -----------------------------------------------------------------------------


def prepare(source, out_dir, tokenizer="default", val_fraction=0.005, text_field="text",
            num_proc=None, max_docs=None, skip_bad=False, config=None, split="train",
            batch_size=1024, verbose=True):
    from data.tokenizer import get_tokenizer

    tok = get_tokenizer(tokenizer)
    num_proc = num_proc or os.cpu_count() or 1
    if source in PRESETS and text_field == "text":
        text_field = PRESETS[source][2]
    writers = {s: TokenWriter(os.path.join(out_dir, f"{s}.bin"), tok.vocab_size) for s in ("train", "val")}
    sep = tok.bos_id if tok.bos_id is not None else tok.eot_id  # before every document (Qwen has no BOS)
    n_docs = {"train": 0, "val": 0}
    t0 = time.time()

    def flush(batch):
        # tiktoken releases the GIL, so threads give real parallelism here
        all_ids = tok.encode_batch([text for _, text in batch], num_threads=num_proc)
        for s in ("train", "val"):
            parts = [[sep] + ids for (doc, _), ids in zip(batch, all_ids)
                     if is_val(doc, val_fraction) == (s == "val")]
            if parts:
                writers[s].write(np.concatenate([np.asarray(p, dtype=np.int64) for p in parts]))
                n_docs[s] += len(parts)

    def text_of(rec):
        text = rec.get(text_field) if isinstance(rec, dict) else None
        if not isinstance(text, str):
            fields = list(rec) if isinstance(rec, dict) else type(rec).__name__
            problem = "is missing or null" if text is None else f"is {type(text).__name__}, not a string"
            raise BadRecord(f"field {text_field!r} {problem} (record fields: {fields}). "
                            f"Pick the text column with --text_field")
        return text

    counts = {}
    try:
        batch = []
        n = 0  # documents accepted so far; the split is by this index
        for text in read_records(iter_source(source, config=config, split=split), text_of, skip_bad, counts,
                                 hint="pass --skip_bad to skip such records"):
            batch.append((n, text))
            n += 1
            if len(batch) == batch_size:
                flush(batch)
                batch = []
                if verbose and n % (batch_size * 100) == 0:
                    ntok = writers["train"].n_tokens + writers["val"].n_tokens
                    print(f"{n:,} docs, {ntok:,} tokens, {ntok / (time.time() - t0):,.0f} tokens/s")
            if max_docs is not None and n >= max_docs:
                break
        if batch:
            flush(batch)
        if n_docs["train"] == 0:
            raise DataError(f"source {source!r} gave {n} usable document(s) ({counts['read']} record(s) read, "
                            f"{counts['skipped']} skipped); need at least 2 (one goes to val, the rest to train)")
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    n_skipped = counts["skipped"]
    for w in writers.values():
        w.close()

    meta = {
        "tokenizer": tok.name, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
        "dtype": str(token_dtype(tok.vocab_size)), "source": source, "config": config, "split": split,
        "text_field": text_field, "val_fraction": val_fraction, "max_docs": max_docs,
        "n_docs": n_docs, "n_tokens": {s: w.n_tokens for s, w in writers.items()}, "n_skipped": n_skipped,
    }
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    if verbose:
        print(f"wrote {out_dir}: train {n_docs['train']:,} docs / {meta['n_tokens']['train']:,} tokens, "
              f"val {n_docs['val']:,} docs / {meta['n_tokens']['val']:,} tokens"
              + (f", skipped {n_skipped} bad records" if n_skipped else "")
              + f" in {time.time() - t0:.1f}s")
    return meta


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="tokenise a corpus into train.bin / val.bin / meta.json")
    parser.add_argument("--source", type=str, default="embedded",
                        help="'embedded', 'fineweb-edu', 'tinystories', a local file/dir, or a hub dataset")
    parser.add_argument("--out", type=str, required=True, help="output directory")
    parser.add_argument("--tokenizer", type=str, default="default")
    parser.add_argument("--val_fraction", type=float, default=0.005)
    parser.add_argument("--text_field", type=str, default="text")
    parser.add_argument("--num_proc", type=int, default=None, help="tokeniser threads (default: all cores)")
    parser.add_argument("--max_docs", type=int, default=None)
    parser.add_argument("--skip_bad", action="store_true", help="skip (and count) bad records: no string text field, "
                        "a line that is not JSON or not UTF-8")
    parser.add_argument("--config", type=str, default=None, help="hub dataset config name")
    parser.add_argument("--split", type=str, default="train", help="hub dataset split")
    args = parser.parse_args()
    try:
        prepare(args.source, args.out, tokenizer=args.tokenizer, val_fraction=args.val_fraction,
                text_field=args.text_field, num_proc=args.num_proc, max_docs=args.max_docs,
                skip_bad=args.skip_bad, config=args.config, split=args.split)
    except (BadRecord, DataError, FileNotFoundError) as e:  # bad input: say what and where, no traceback
        raise SystemExit(f"prepare: {e}")
