"""
Records from local files or a hub dataset — the one reader behind corpus preparation (prepare.py),
conversations (chat.py), preference pairs (preference.py) and GSM8K (rewards.py).

A source is a local file, a directory (searched recursively), a glob, or a comma-separated list of
these (.json, .jsonl, .parquet, .txt), else a hub dataset name (read through `datasets`). Records come
one at a time as (where, index, record): `where` is the file (or dataset) and `index` the record's
0-based position in it (its line in a jsonl file without blank lines), so every error about a record
can say exactly which one it is.

JSON and text files are read here, line by line, not through arrow: a line that is not JSON or not
UTF-8 is then one bad record (named by file and line, skippable with skip_bad) instead of an error
about the whole file, and records whose fields change type from one to the next (a string here, a
list there) are fine. Parquet and hub datasets go through `datasets`.

Two kinds of errors, both ValueErrors whose text names the file and says how to fix it:
  BadRecord (data/chat.py)  one record is unusable; skip_bad=True skips and counts it instead
  DataError                 the data as a whole is unusable: an empty or unreadable file, no usable
                            records, nothing left to train on
"""

import glob
import json
import os

from data.chat import BadRecord

# local file extensions -> how they are read
BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}


class DataError(ValueError):
    """The data cannot be used as given (a file that is empty or cannot be read, no usable records,
    nothing left for training); str() names the file and says how to fix it."""


def local_files(source):
    """The local data files named by source, or None when it names no local path (a hub dataset)."""
    files = []
    for part in [s.strip() for s in source.split(",") if s.strip()]:
        if os.path.isdir(part):
            files += sorted(os.path.join(d, f) for d, _, fs in os.walk(part) for f in fs
                            if os.path.splitext(f)[1] in BUILDERS)
        elif any(c in part for c in "*?["):
            files += sorted(glob.glob(part))
        elif os.path.isfile(part):
            files.append(part)
        elif part.startswith((".", "/", "~")) or os.path.splitext(part)[1] in BUILDERS:
            raise FileNotFoundError(f"data source {part!r} does not exist (it looks like a local path)")
        else:
            return None  # e.g. "HuggingFaceH4/no_robots": a hub dataset
    if not files:
        raise FileNotFoundError(f"no data files ({', '.join(sorted(BUILDERS))}) found for {source!r}")
    for f in files:
        if os.path.splitext(f)[1] not in BUILDERS:
            raise DataError(f"{f}: unsupported file type; use one of {', '.join(sorted(BUILDERS))} "
                            f"(.txt files are read as one document per file)")
    return files


def _not_utf8(e, line_no=1):
    """Where a UnicodeDecodeError is, for a human (its bytes start at line line_no of their file)."""
    raw = e.object
    line = line_no + raw.count(b"\n", 0, e.start)
    col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
    return (f"line {line} is not UTF-8 (byte 0x{raw[e.start]:02x} at column {col}); "
            f"re-encode the file as UTF-8 (e.g. `iconv -f <its encoding> -t utf-8`)")


def _json_lines(lines):
    """(index, record) for each non-blank line of JSON-lines bytes; a line that is not UTF-8 or not JSON
    gives a BadRecord in place of its record."""
    i = 0
    for n, line in enumerate(lines):
        if n == 0 and line.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark, as some editors write
            line = line[3:]
        if not line.strip():
            continue
        try:
            rec = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            rec = BadRecord(_not_utf8(e, n + 1))
        except json.JSONDecodeError as e:
            rec = BadRecord(f"line {n + 1} is not valid JSON ({e.msg} at column {e.colno})")
        yield i, rec
        i += 1


def _read_json(path):
    """(index, record) of a .jsonl file (streamed line by line) or a .json file: one array of records,
    one record, or JSON lines."""
    if path.endswith(".jsonl"):
        with open(path, "rb") as f:
            yield from _json_lines(f)
        return
    with open(path, "rb") as f:
        raw = f.read()
    first = raw.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    try:
        rows = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        if first == b"[":
            raise DataError(f"{path}: {_not_utf8(e)}") from None
        rows = None  # perhaps one record a line: read it as JSON lines, each line on its own
    except json.JSONDecodeError as e:
        if first == b"[":  # one broken array: no record can be told from the next
            raise DataError(f"{path}: not valid JSON at line {e.lineno}, column {e.colno} ({e.msg}); a .json "
                            f"file holds one array of records (or use .jsonl, one record a line, where a bad "
                            f"line can be skipped with skip_bad)") from None
        rows = None
    if rows is None:
        yield from _json_lines(raw.split(b"\n"))
    else:
        yield from enumerate(rows if isinstance(rows, list) else [rows])


def _read_file(path):
    """(index, record) of one local file."""
    builder = BUILDERS[os.path.splitext(path)[1]]
    if builder == "json":
        yield from _read_json(path)
    elif builder == "text":  # the whole file is one document
        with open(path, "rb") as f:
            raw = f.read()
        try:
            rec = {"text": raw.decode("utf-8")}
        except UnicodeDecodeError as e:
            rec = BadRecord(_not_utf8(e))
        yield 0, rec
    else:
        import datasets  # slow to import, and only needed here
        datasets.disable_progress_bars()
        try:
            yield from enumerate(datasets.load_dataset("parquet", data_files=[path], split="train", streaming=True))
        except Exception as e:  # noqa: BLE001 — arrow could not read it
            raise DataError(f"{path}: cannot be read as parquet ({str(e)[:300]}); the file is corrupt, "
                            f"truncated or not parquet") from None


def iter_records(source, split="train", config=None):
    """Yield (where, index, record) from local files, each read on its own so errors can name the file
    and index, or from a hub dataset (streamed: nothing is downloaded up front). A record that could not
    be read (a line that is not JSON or not UTF-8) comes as a BadRecord instance in place of the record,
    for the caller to raise or count (read_records does). An empty file raises DataError."""
    files = local_files(source)
    if files is None:
        import datasets
        datasets.disable_progress_bars()
        try:
            it = iter(datasets.load_dataset(source, name=config, split=split, streaming=True))
        except Exception as e:  # noqa: BLE001
            raise DataError(f"could not open dataset {source!r} (config {config!r}, split {split!r}): {e}\n"
                            f"It is neither a local file/directory nor reachable on the Hugging Face hub "
                            f"(are you offline?). For local data give .json/.jsonl/.parquet/.txt files.") from e
        for i, rec in enumerate(it):
            yield source, i, rec
        return
    for f in files:
        if os.path.getsize(f) == 0:
            raise DataError(f"{f}: the file is empty (0 bytes); remove it from the data source, or regenerate it")
        n = 0
        for i, rec in _read_file(f):
            yield f, i, rec
            n += 1
        if n == 0:
            raise DataError(f"{f}: the file has no records (only blank lines, an empty array or no rows)")


def read_records(rows, parse, skip_bad=False, counts=None, hint="set skip_bad=True to skip malformed records"):
    """parse(record) for each (where, index, record) of rows (iter_records' stream). A record that could not
    be read, or that parse rejects with BadRecord, stops with a BadRecord naming the file and the record;
    with skip_bad it is skipped instead. counts, a dict if given, gets "read" (records seen, bad ones too)
    and "skipped" (the bad ones skipped), for the caller to log."""
    counts = {} if counts is None else counts
    counts.update(read=0, skipped=0)
    for where, i, rec in rows:
        counts["read"] += 1
        try:
            if isinstance(rec, BadRecord):
                raise rec
            value = parse(rec)
        except BadRecord as e:
            if not skip_bad:
                raise BadRecord(f"{where}: record {i}: {e}. Fix or remove the record, or {hint}") from None
            counts["skipped"] += 1
            continue
        yield value
