"""
The embedded default corpus: the Python standard library's own source code.

Why this: the default tokenizer and the default pretraining run must work on any
machine with no network and no downloads. The one sizeable body of text that is
guaranteed to exist wherever this repo runs is the source of the interpreter's
standard library (~10 MB of .py files): code plus a lot of English prose in
docstrings and comments. It is not a good general-English corpus, but it is real,
varied text and good enough to train a small tokenizer and smoke-test pretraining.

Caveat: the stdlib differs slightly between Python versions (and builds), so the
corpus -- and a tokenizer trained on it -- is only reproducible for the same
Python version. The bundled data/tokenizer/default.tiktoken is a committed file,
so the default tokenizer itself is identical everywhere.
"""

import os
import sysconfig

# directories we skip: test suites are huge and repetitive, idlelib/lib2to3 are
# niche, site-packages is third-party code that varies per machine
SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__"}


def stdlib_dir():
    return sysconfig.get_paths()["stdlib"]


def embedded_documents(max_bytes=8_000_000):
    """
    Return the stdlib .py files as a list of strings, one document per file, in a
    deterministic (sorted) order, stopping before the total UTF-8 size would
    exceed max_bytes. Files that are not valid UTF-8 are skipped.
    """
    root = stdlib_dir()
    if not os.path.isdir(root):
        raise RuntimeError(f"the Python standard library directory {root!r} does not exist; "
                           f"the embedded corpus needs the stdlib sources (some minimal Python "
                           f"installs ship only .pyc files). Use a local or hub data source instead.")
    docs, total = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        # sorting in place makes os.walk visit subdirectories in a fixed order
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for fname in sorted(filenames):
            if not fname.endswith(".py"):
                continue
            try:
                with open(os.path.join(dirpath, fname), "rb") as f:
                    raw = f.read()
                text = raw.decode("utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            if total + len(raw) > max_bytes:
                return docs
            docs.append(text)
            total += len(raw)
    return docs
