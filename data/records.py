"""
Records from local files or a hub dataset, through `datasets` — the one reader behind corpus
preparation (prepare.py), conversations (chat.py) and preference pairs (preference.py).

A source is a local file, a directory (searched recursively), a glob, or a comma-separated list of
these (.json, .jsonl, .parquet, .txt), else a hub dataset name. Records come one at a time as
(where, index, record): `where` is the file (or dataset) and `index` the record's 0-based position
in it (its line in a jsonl file), so every error about a record can say exactly which one it is.
"""

import glob
import json
import os

# local file extensions -> datasets' packaged builder
BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}


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
            raise ValueError(f"{f}: unsupported file type; use one of {', '.join(sorted(BUILDERS))} "
                             f"(.txt files are read as one document per file)")
    return files


def _plain_json(path, err):
    """Records of a .json/.jsonl file read without arrow; a line that is not JSON is named."""
    with open(path) as f:
        text = f.read()
    try:
        rows = json.loads(text)
        yield from rows if isinstance(rows, list) else [rows]
        return
    except json.JSONDecodeError:
        pass
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {i + 1} is not valid JSON ({e.msg}); fix or remove it "
                             f"(datasets said: {str(err)[:200]})") from None


def iter_records(source, split="train", config=None):
    """Yield (where, index, record dict) from local files (each streamed on its own, so errors can name
    the file and index) or a hub dataset (streamed: nothing is downloaded up front)."""
    import datasets  # slow to import, and only needed here
    datasets.disable_progress_bars()
    files = local_files(source)
    if files is None:
        try:
            it = iter(datasets.load_dataset(source, name=config, split=split, streaming=True))
        except Exception as e:
            raise RuntimeError(f"could not open dataset {source!r} (config {config!r}, split {split!r}): {e}\n"
                               f"It is neither a local file/directory nor reachable on the Hugging Face hub "
                               f"(are you offline?). For local data give .json/.jsonl/.parquet/.txt files.") from e
        for i, rec in enumerate(it):
            yield source, i, rec
        return
    for f in files:
        builder = BUILDERS[os.path.splitext(f)[1]]
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        n = 0
        try:
            for rec in datasets.load_dataset(builder, data_files=[f], split="train", streaming=True, **kwargs):
                yield f, n, rec
                n += 1
        except Exception as e:  # noqa: BLE001 — arrow could not read it
            if builder != "json":
                raise ValueError(f"{f}: cannot be read as {builder}: {e}") from e
            # e.g. a field that is a string in one record and a list in another: one arrow table can't
            # hold both, plain JSON can. Continue after the records already given.
            for i, rec in enumerate(_plain_json(f, e)):
                if i >= n:
                    yield f, i, rec
