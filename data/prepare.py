"""
Tokenise a text corpus into flat token files for pretraining.

$ python -m data.prepare --source=embedded --out=data/bin/embedded
$ python -m data.prepare --source=tinystories --out=data/bin/tinystories --tokenizer=default
$ python -m data.prepare --source=path/to/shards/ --out=data/bin/mine --text_field=content
$ python -m data.prepare --source=fineweb-edu-10BT/ --out=data/bin/fineweb-edu --tokenizer=gpt2 --sharded

--sharded (local files): each input file is tokenised into its own shard under --out/shards/ and marked done
there, so a run that is interrupted and started again skips the files already done; at the end the shards
are joined into train.bin / val.bin (the same bytes as an unsharded run) and removed. A progress line
(documents, tokens, tokens/s, files done) goes to stderr.

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
import sys
import time

import numpy as np

from data.chat import BadRecord
from data.records import DataError, iter_records, local_files, read_records

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


class Progress:
    """A progress line on stderr: documents, tokens, tokens/s (and files done when sharded). Redrawn in place on
    a terminal, one line every 30 s in a log file."""

    def __init__(self, enabled=True):
        self.enabled, self.t0, self.t_draw = enabled, time.time(), 0.0
        self.tty = sys.stderr.isatty()

    def show(self, n_docs, n_tokens, where="", final=False):
        now = time.time()
        if not self.enabled or not (final or now - self.t_draw > (0.5 if self.tty else 30)):
            return
        self.t_draw = now
        line = (f"{where}{n_docs:,} docs, {n_tokens:,} tokens, {n_tokens / max(now - self.t0, 1e-9):,.0f} tokens/s, "
                f"{now - self.t0:.0f}s")
        sys.stderr.write(("\r" + line + " " * 4 + ("\n" if final else "")) if self.tty else line + "\n")
        sys.stderr.flush()


def _tokenize(records, tok, writers, n_docs, first_index, val_fraction, num_proc, batch_size, max_docs, progress,
              where=""):
    """Tokenise text records into writers["train"/"val"], each document preceded by bos and sent to val by
    is_val(its global index). n_docs (dict) counts the documents per split. Returns the next global index."""
    n = first_index

    sep = tok.bos_id if tok.bos_id is not None else tok.eot_id  # before every document (Qwen has no BOS)

    def flush(batch):
        # tiktoken releases the GIL, so threads give real parallelism here
        all_ids = tok.encode_batch([text for _, text in batch], num_threads=num_proc)
        for s in ("train", "val"):
            parts = [[sep] + ids for (doc, _), ids in zip(batch, all_ids)
                     if is_val(doc, val_fraction) == (s == "val")]
            if parts:
                writers[s].write(np.concatenate([np.asarray(p, dtype=np.int64) for p in parts]))
                n_docs[s] += len(parts)
        progress.show(n, writers["train"].n_tokens + writers["val"].n_tokens, where)

    batch = []
    for text in records:
        if max_docs is not None and n >= max_docs:
            break
        batch.append((n, text))
        n += 1
        if len(batch) == batch_size:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    return n


def prepare(source, out_dir, tokenizer="default", val_fraction=0.005, text_field="text",
            num_proc=None, max_docs=None, skip_bad=False, config=None, split="train",
            batch_size=1024, sharded=False, verbose=True):
    """Tokenise source into out_dir/train.bin, val.bin and meta.json (see the module docstring).

    sharded=True (local files only, e.g. a downloaded FineWeb-Edu): each input file is tokenised on its own
    into out_dir/shards/ and recorded as done there, so an interrupted run, started again with the same
    arguments, skips the files already done (resumable); the shards are then joined into train.bin / val.bin
    (identical to an unsharded run's) and removed."""
    from data.tokenizer import get_tokenizer

    tok = get_tokenizer(tokenizer)
    num_proc = num_proc or os.cpu_count() or 1
    if source in PRESETS and text_field == "text":
        text_field = PRESETS[source][2]
    n_docs = {"train": 0, "val": 0}
    t0 = time.time()
    progress = Progress(verbose)

    def text_of(rec):
        text = rec.get(text_field) if isinstance(rec, dict) else None
        if not isinstance(text, str):
            fields = list(rec) if isinstance(rec, dict) else type(rec).__name__
            problem = "is missing or null" if text is None else f"is {type(text).__name__}, not a string"
            raise BadRecord(f"field {text_field!r} {problem} (record fields: {fields}). "
                            f"Pick the text column with --text_field")
        return text

    counts = {}
    if sharded:
        files = local_files(source) if source != "embedded" and source not in PRESETS else None
        if files is None:
            raise DataError(f"sharded preparation reads local files, one shard per file; {source!r} is not local. "
                            f"Download the dataset first (pipeline_gpu.sh shows how), then pass its directory")
        shard_dir = os.path.join(out_dir, "shards")
        os.makedirs(shard_dir, exist_ok=True)
        n, n_skipped, done = 0, 0, []
        for k, path in enumerate(files):
            marker = os.path.join(shard_dir, f"{k:05d}.json")
            if os.path.exists(marker):
                with open(marker) as f:
                    m = json.load(f)
                if m["file"] == path and m["first_index"] == n and m["size"] == os.path.getsize(path) and \
                        m["complete"] and m["tokenizer"] == tok.name and m["val_fraction"] == val_fraction:
                    n, n_skipped = m["next_index"], n_skipped + m["skipped"]
                    done.append(m)
                    continue
            if max_docs is not None and n >= max_docs:
                break
            writers = {s: TokenWriter(os.path.join(shard_dir, f"{k:05d}.{s}.bin"), tok.vocab_size)
                       for s in ("train", "val")}
            shard_docs = {"train": 0, "val": 0}
            try:
                records = read_records(iter_records(path), text_of, skip_bad, counts,
                                       hint="pass --skip_bad to skip such records")
                nxt = _tokenize(records, tok, writers, shard_docs, n, val_fraction, num_proc, batch_size, max_docs,
                                progress, where=f"file {k + 1}/{len(files)}: ")
            except BaseException:
                for w in writers.values():
                    w.abort()
                raise
            for w in writers.values():
                w.close()
            m = dict(file=path, size=os.path.getsize(path), first_index=n, next_index=nxt, n_docs=shard_docs,
                     skipped=counts["skipped"], complete=max_docs is None or nxt < max_docs,
                     tokenizer=tok.name, val_fraction=val_fraction)
            with open(marker + ".tmp", "w") as f:
                json.dump(m, f)
            os.replace(marker + ".tmp", marker)  # the shard counts as done only once this exists
            n, n_skipped = nxt, n_skipped + m["skipped"]
            done.append(m)
        # join the shards, in file order, into the two token files pretraining reads
        writers = {s: TokenWriter(os.path.join(out_dir, f"{s}.bin"), tok.vocab_size) for s in ("train", "val")}
        for k, m in enumerate(done):
            for s in ("train", "val"):
                part = load_tokens(os.path.join(shard_dir, f"{k:05d}.{s}.bin"))
                for i in range(0, len(part), 1 << 26):
                    writers[s].write(part[i:i + (1 << 26)])
                n_docs[s] += m["n_docs"][s]
        if n_docs["train"] == 0:
            for w in writers.values():
                w.abort()
            raise DataError(f"source {source!r} gave {n} usable document(s); need at least 2 (one goes to val, "
                            f"the rest to train)")
        for w in writers.values():
            w.close()
        for name in os.listdir(shard_dir):  # train.bin / val.bin hold everything now
            os.remove(os.path.join(shard_dir, name))
        os.rmdir(shard_dir)
    else:
        writers = {s: TokenWriter(os.path.join(out_dir, f"{s}.bin"), tok.vocab_size) for s in ("train", "val")}
        try:
            records = read_records(iter_source(source, config=config, split=split), text_of, skip_bad, counts,
                                   hint="pass --skip_bad to skip such records")
            n = _tokenize(records, tok, writers, n_docs, 0, val_fraction, num_proc, batch_size, max_docs, progress)
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
    progress.show(n, writers["train"].n_tokens + writers["val"].n_tokens, final=True)

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
    parser.add_argument("--sharded", action="store_true", help="local files: one resumable shard per file (a rerun "
                        "skips the files already done), joined into train.bin / val.bin at the end")
    args = parser.parse_args()
    try:
        prepare(args.source, args.out, tokenizer=args.tokenizer, val_fraction=args.val_fraction,
                text_field=args.text_field, num_proc=args.num_proc, max_docs=args.max_docs,
                skip_bad=args.skip_bad, config=args.config, split=args.split, sharded=args.sharded)
    except (BadRecord, DataError, FileNotFoundError) as e:  # bad input: say what and where, no traceback
        raise SystemExit(f"prepare: {e}")
