"""Bad data files give errors that name the file and the line or record (never a traceback from deep inside
a reader), and skip_bad skips and counts every kind of bad record, in every loader: conversations, preference
pairs, GSM8K, corpus preparation. Also: tied preference scores never become strict pairs, and a split that leaves
nothing to train on says so. Every file here is written by the test, in the real schema; nothing touches the
network."""

import json
import os
import re
import subprocess
import sys

import pytest

from data.chat import BadRecord, load_conversations, to_chat_messages
from data.preference import as_pairs, drop_ties, encode_records, load_preferences, normalize_record, split_off
from data.prepare import prepare
from data.records import DataError
from data.rewards import gsm8k_example, load_gsm8k
from data.tokenizer import get_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# one good record of each schema
OPENAI = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"},
                       {"role": "assistant", "content": "4"}]}
SHAREGPT = {"conversations": [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Blue."}]}
ALPACA = {"instruction": "Translate to French.", "input": "cat", "output": "chat", "system": "",
          "history": [["Hi", "Hello!"]]}
TRL = {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"}
TRL_CONV = {"prompt": [{"role": "user", "content": "What is 2 + 2?"}],
            "chosen": [{"role": "assistant", "content": "4"}], "rejected": [{"role": "assistant", "content": "5"}]}
ULTRAFEEDBACK = {"prompt": "What is 2 + 2?", "prompt_id": "ab12",
                 "chosen": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}],
                 "rejected": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "22"}],
                 "messages": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}],
                 "score_chosen": 9.0, "score_rejected": 2.5}
HH = {"chosen": "\n\nHuman: Name a colour.\n\nAssistant: Blue.",
      "rejected": "\n\nHuman: Name a colour.\n\nAssistant: No."}
GSM8K = {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                     "How many clips did Natalia sell altogether in April and May?",
         "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
                   "altogether in April and May.\n#### 72"}
FINEWEB = {"text": "The mitochondria is the powerhouse of the cell.", "id": "<urn:uuid:0>", "dump": "CC-MAIN-2024-10",
           "url": "https://example.com/0", "language": "en", "language_score": 0.97, "token_count": 9}


def write_lines(path, lines):
    """A .jsonl file from records (dicts) and raw lines (bytes, written as they are)."""
    with open(path, "wb") as f:
        for x in lines:
            f.write((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n")
    return str(path)


# the two unreadable lines every loader meets below: line 3 is cut-off JSON, line 5 is Latin-1, not UTF-8
BROKEN_JSON = b'{"messages": [{"role": "user", "content": "cut off'
LATIN1 = '{"text": "caf\u00e9 cr\u00e8me"}'.encode("latin-1")


def broken_file(tmp_path, good, name="data.jsonl"):
    """good, good, <not JSON>, good, <not UTF-8>, good: six records, two unreadable."""
    return write_lines(tmp_path / name, [good, good, BROKEN_JSON, good, LATIN1, good])


def check_unreadable_lines(load, path, n_good=4):
    """load(skip_bad, log) stops at line 3 naming file, record and line; with skip_bad it keeps the good
    records and logs one count of the two skipped."""
    with pytest.raises(BadRecord) as e:
        load(False, print)
    msg = str(e.value)
    assert msg.startswith(f"{path}: record 2: line 3 is not valid JSON") and "skip_bad" in msg, msg
    # the non-UTF-8 line, once the JSON one is fixed
    lines = open(path, "rb").read().split(b"\n")
    with open(path, "wb") as f:
        f.write(b"\n".join(lines[:2] + lines[3:]))
    with pytest.raises(BadRecord) as e:
        load(False, print)
    msg = str(e.value)
    assert msg.startswith(f"{path}: record 3: line 4 is not UTF-8 (byte 0xe9 at column 14)") and "UTF-8" in msg, msg
    with open(path, "wb") as f:
        f.write(b"\n".join(lines))
    logged = []
    out = load(True, logged.append)
    assert len(out) == n_good
    skipped = [m for m in logged if "skipped" in m]
    assert len(skipped) == 1 and "skipped 2 malformed" in skipped[0] and "of 6" in skipped[0], logged
    return out


# -----------------------------------------------------------------------------
# unreadable lines: every loader, every schema


@pytest.mark.parametrize("good", [OPENAI, SHAREGPT, ALPACA])
def test_conversations_unreadable_lines(tmp_path, good):
    path = broken_file(tmp_path, good)
    convs = check_unreadable_lines(lambda skip, log: load_conversations(path, skip_bad=skip, log=log), path)
    assert convs == [to_chat_messages(good)] * 4


@pytest.mark.parametrize("good", [TRL, TRL_CONV, ULTRAFEEDBACK, HH])
def test_preferences_unreadable_lines(tmp_path, good):
    path = broken_file(tmp_path, good)
    recs = check_unreadable_lines(lambda skip, log: load_preferences(path, skip_bad=skip, log=log), path)
    assert recs == [normalize_record(good)] * 4


def test_gsm8k_unreadable_lines(tmp_path):
    path = broken_file(tmp_path, GSM8K)
    exs = check_unreadable_lines(lambda skip, log: load_gsm8k("train", path, skip_bad=skip, log=log), path)
    assert [e["answer"] for e in exs] == ["72"] * 4


def test_prepare_unreadable_lines(tmp_path):
    path = broken_file(tmp_path, FINEWEB)
    runs = iter(range(100))

    def load(skip, log):
        meta = prepare(path, str(tmp_path / f"out{next(runs)}"), skip_bad=skip, verbose=False)
        if meta["n_skipped"]:
            log(f"skipped {meta['n_skipped']} malformed records of 6")
        return [None] * sum(meta["n_docs"].values())

    with pytest.raises(BadRecord, match="pass --skip_bad"):
        load(False, print)
    check_unreadable_lines(load, path)


def test_json_array_files(tmp_path):
    # a .json file is one array: a broken one names line and column; one that is JSON lines is read as such
    path = tmp_path / "chats.json"
    path.write_text('[\n  {"messages": []},\n  {"messages": [}\n]\n')
    with pytest.raises(DataError, match=r"chats\.json: not valid JSON at line 3, column 17"):
        load_conversations(str(path))
    path.write_bytes(b'[\n' + json.dumps(OPENAI).encode() + b',\n{"text": "caf\xe9"}]')
    with pytest.raises(DataError, match=r"chats\.json: line 3 is not UTF-8 \(byte 0xe9 at column 14\)"):
        load_conversations(str(path))
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([OPENAI, SHAREGPT]).encode())  # with a byte-order mark
    assert len(load_conversations(str(path))) == 2
    path.write_text(json.dumps(OPENAI) + "\nnot json\n" + json.dumps(SHAREGPT) + "\n")
    with pytest.raises(BadRecord, match=r"chats\.json: record 1: line 2 is not valid JSON"):
        load_conversations(str(path))
    assert len(load_conversations(str(path), skip_bad=True, log=lambda m: None)) == 2


# -----------------------------------------------------------------------------
# empty and unreadable files


@pytest.mark.parametrize("contents, words", [(b"", "is empty (0 bytes)"), (b"\n\n  \n", "has no records"),
                                             (b"[]", "has no records")])
def test_empty_files(tmp_path, contents, words):
    ext = ".json" if contents == b"[]" else ".jsonl"
    path = tmp_path / f"empty{ext}"
    path.write_bytes(contents)
    loaders = [lambda: load_conversations(str(path)), lambda: load_preferences(str(path)),
               lambda: load_gsm8k("test", str(path)), lambda: prepare(str(path), str(tmp_path / "out"), verbose=False)]
    for load in loaders:
        with pytest.raises(DataError) as e:
            load()
        assert str(e.value).startswith(f"{path}: the file {words}"), str(e.value)
    # one empty shard among good ones is still named
    d = tmp_path / "shards"
    d.mkdir()
    write_lines(d / "a.jsonl", [GSM8K])
    (d / f"b{ext}").write_bytes(contents)
    with pytest.raises(DataError, match=re.escape(f"{d / f'b{ext}'}: the file {words}")):
        load_gsm8k("train", str(d))


def test_corrupt_parquet_and_unsupported_file(tmp_path):
    path = tmp_path / "train.parquet"
    path.write_bytes(b"PAR1" + os.urandom(200))
    with pytest.raises(DataError, match=r"train\.parquet: cannot be read as parquet"):
        load_preferences(str(path))
    other = tmp_path / "train.csv"
    other.write_text("a,b\n")
    with pytest.raises(DataError, match=r"train\.csv: unsupported file type"):
        load_conversations(f"{other}")


def test_txt_not_utf8_in_prepare(tmp_path):
    d = tmp_path / "txt"
    d.mkdir()
    for i in range(3):
        (d / f"{i}.txt").write_text(f"document {i}\nsecond line\n")
    (d / "3.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(BadRecord, match=r"3\.txt: record 0: line 1 is not UTF-8 \(byte 0xe9 at column 4\)"):
        prepare(str(d), str(tmp_path / "out"), verbose=False)
    meta = prepare(str(d), str(tmp_path / "out"), skip_bad=True, verbose=False)
    assert meta["n_skipped"] == 1 and sum(meta["n_docs"].values()) == 3


def test_prepare_command_line_errors_are_one_line(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    p = subprocess.run([sys.executable, "-m", "data.prepare", f"--source={empty}", f"--out={tmp_path / 'out'}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip() == (f"prepare: {empty}: the file is empty (0 bytes); remove it from the data source, "
                                f"or regenerate it")


# -----------------------------------------------------------------------------
# GSM8K: wrong types, directories, counts


def test_gsm8k_wrong_types_directory_and_counts(tmp_path):
    import datasets
    bad = [{"question": GSM8K["question"], "answer": 72},                # a number, not the worked solution
           {"question": ["a", "list"], "answer": GSM8K["answer"]},
           {"question": "   ", "answer": GSM8K["answer"]},
           {"question": "q", "answer": None},
           [GSM8K["question"], GSM8K["answer"]]]
    words = ["'answer' must be a string, got int", "'question' must be a string, got list", "the question is empty",
             "expected keys 'question' and 'answer'", "expected keys 'question' and 'answer'"]
    for rec, w in zip(bad, words):
        path = write_lines(tmp_path / "one.jsonl", [GSM8K, rec])
        with pytest.raises(BadRecord) as e:
            load_gsm8k("train", path)
        assert str(e.value).startswith(f"{path}: record 1: {w}"), str(e.value)
    # a directory of the three file types, as downloaded shards would be; bad records skipped and counted
    d = tmp_path / "gsm8k"
    (d / "sub").mkdir(parents=True)
    write_lines(d / "a.jsonl", [GSM8K, bad[0], GSM8K])
    (d / "b.json").write_text(json.dumps([GSM8K, bad[1]]))
    datasets.Dataset.from_list([GSM8K, {"question": "Half of 1,200?", "answer": "600\n#### 600"}]).to_parquet(
        str(d / "sub" / "c.parquet"))
    with pytest.raises(BadRecord, match=r"a\.jsonl: record 1: 'answer' must be a string"):
        load_gsm8k("train", str(d))
    logged = []
    exs, counts = load_gsm8k("test", str(d), skip_bad=True, log=logged.append, return_counts=True)
    assert [e["answer"] for e in exs] == ["72", "72", "72", "72", "600"]
    assert counts == dict(read=7, skipped=2, examples=5)
    assert logged == [f"skipped 2 malformed GSM8K record(s) of 7 in {d} (skip_bad=True)"]
    with pytest.raises(FileNotFoundError, match="GSM8K data path 'no_such_dir' does not exist"):
        load_gsm8k("train", "no_such_dir")  # not taken for a hub dataset name


# -----------------------------------------------------------------------------
# every kind of bad record is a BadRecord (so skip_bad can skip it), never a TypeError or AttributeError

WRONG_VALUES = [None, 0, 1.5, True, "", "text", [], ["x"], [1, 2], {}, {"role": "user"}, [{"a": 1}], [["q", 1]]]


def variants(record):
    """record with each value anywhere inside it (top-level fields, list items, message fields) replaced by
    each wrong value in turn."""
    if isinstance(record, dict):
        for k, v in record.items():
            for w in WRONG_VALUES:
                yield {**record, k: w}
            for sub in variants(v):
                yield {**record, k: sub}
    elif isinstance(record, list):
        for i, v in enumerate(record):
            for w in WRONG_VALUES:
                yield record[:i] + [w] + record[i + 1:]
            for sub in variants(v):
                yield record[:i] + [sub] + record[i + 1:]


def is_conversation(msgs):
    """A naive check of what every loader promises: [system?] user/assistant alternating, non-empty strings."""
    roles = [m["role"] for m in msgs]
    if roles and roles[0] == "system":
        roles = roles[1:]
    return (all(isinstance(m["content"], str) and m["content"].strip() for m in msgs) and len(roles) >= 2
            and roles == ["user", "assistant"] * (len(roles) // 2))


def test_every_bad_record_is_a_bad_record():
    n = 0
    for good in (OPENAI, SHAREGPT, ALPACA):
        for rec in variants(good):
            try:
                assert is_conversation(to_chat_messages(rec)), rec
            except BadRecord:
                n += 1
    for good in (TRL, TRL_CONV, ULTRAFEEDBACK, HH, {"prompt": "q", "responses": ["a", "b", "c"], "scores": [3, 2, 1]}):
        for rec in variants(good):
            try:
                r = normalize_record(rec)
                assert all(is_conversation(r["prompt"] + [{"role": "assistant", "content": x}]) for x in r["responses"])
            except BadRecord:
                n += 1
    for rec in variants(GSM8K):
        try:
            ex = gsm8k_example(rec)
            assert isinstance(ex["prompt"], str) and ex["prompt"] and re.fullmatch(r"-?[\d.]+", ex["answer"])
        except BadRecord:
            n += 1
    assert n > 500  # the variants were mostly bad


# -----------------------------------------------------------------------------
# preference data: ties, and a split that leaves nothing to train on


def test_tied_scores_are_no_preference(tmp_path):
    tie_uf = {**ULTRAFEEDBACK, "score_chosen": 7.0, "score_rejected": 7.0}
    ranked = {"prompt": "Name a colour.", "responses": ["Blue.", "Red.", "No."], "scores": [5, 5, 1]}  # 1-5 ratings
    ranked4 = {"prompt": "Name a fruit.", "responses": ["Apple.", "Pear.", "Plum.", "No."], "scores": [3, 9, 3, 3]}
    untied = {"prompt": "Name a day.", "responses": ["Monday.", "Never.", "Blue."], "scores": [8, 1, 4]}
    path = write_lines(tmp_path / "prefs.jsonl", [ULTRAFEEDBACK, tie_uf, ranked, ranked4, untied, TRL])
    logged = []
    recs, counts = load_preferences(path, log=logged.append, return_counts=True)
    # the naive reference: every ordered pair of the raw records with strictly different scores
    want = [("What is 2 + 2?", "4", "22")]
    for r in (ranked, ranked4):
        for i, a in enumerate(r["responses"]):
            for j, b in enumerate(r["responses"]):
                if r["scores"][i] > r["scores"][j]:
                    want.append((r["prompt"], a, b))
    want += [("Name a day.", "Monday.", "Blue."), ("Name a day.", "Monday.", "Never."),
             ("Name a day.", "Blue.", "Never."), ("What is 2 + 2?", "4", "5")]
    got = [(p["prompt"][-1]["content"], *p["responses"]) for p in as_pairs(recs)]
    assert sorted(got) == sorted(want)
    assert all(p["scores"] is None or p["scores"][0] > p["scores"][1] for p in as_pairs(recs))
    assert counts == dict(read=6, skipped=0, tied=1 + 1 + 3, records=len(recs))  # [7,7]: 1; [5,5,1]: 1; three 3s: 3
    assert logged == [f"dropped 5 tied pair(s) in {path}: responses with equal scores are no preference"]
    # an untied ranking stays one group (the reward model averages its pairs per prompt)
    assert drop_ties(normalize_record(untied)) == ([normalize_record(untied)], 0)
    # all tied: nothing usable, and the message says why
    only_ties = write_lines(tmp_path / "ties.jsonl", [tie_uf])
    with pytest.raises(DataError, match=r"no usable preference records \(1 read, 0 malformed and skipped, 1 tied"):
        load_preferences(only_ties)
    # chosen scored below rejected is contradictory, not a preference
    with pytest.raises(BadRecord, match=r"'chosen' is scored lower than 'rejected' \(2.5 < 9\)"):
        normalize_record({**ULTRAFEEDBACK, "score_chosen": 2.5, "score_rejected": 9.0})


def test_split_leaving_no_training_data_says_so():
    recs = [normalize_record(TRL)]
    with pytest.raises(DataError) as e:
        split_off(recs, 0.05)
    msg = str(e.value)
    assert "leaves nothing for training" in msg and "1 preference record" in msg
    assert "val_fraction" in msg and "val_data" in msg
    train, val = split_off(recs * 3, 0.05)
    assert len(train) == 2 and len(val) == 1
    tok = get_tokenizer("default")
    with pytest.raises(DataError, match="train: no preference records"):
        encode_records([], tok, 256, what="train")
    with pytest.raises(DataError, match=r"train: all 1 record\(s\) are longer than max_len=5"):
        encode_records(recs, tok, 5, what="train")
