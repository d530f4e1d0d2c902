"""data/preference.py: every layout normalises to (prompt messages, ranked responses), and TRL's unpaired layout
to (prompt, completion, label); malformed records are reported with file and index; tokenisation masks exactly
the final reply; KTO's mismatched pairs are the conversations the chat template renders."""

import json

import pytest

from data import tasks
from data.chat import BadRecord
from data.preference import (as_pairs, encode_response, encode_unpaired, load_preferences, load_unpaired, mismatched,
                             normalize_record, normalize_unpaired, pad_batch, parse_hh, task_pairs, unpair)
from data.records import DataError
from data.tokenizer import get_tokenizer

USER = {"role": "user", "content": "What is 2 + 2?"}


def test_trl_standard_and_conversational():
    r = normalize_record({"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"})
    assert r["prompt"] == [USER] and r["responses"] == ["4", "5"]
    sys_msg = {"role": "system", "content": "Be brief."}
    r = normalize_record({"prompt": [sys_msg, USER], "chosen": [{"role": "assistant", "content": "4"}],
                          "rejected": [{"role": "assistant", "content": "5"}]})
    assert r["prompt"] == [sys_msg, USER] and r["responses"] == ["4", "5"]
    r = normalize_record({"messages": [USER], "chosen": "4", "rejected": "5"})  # "messages" as the prompt
    assert r["prompt"] == [USER]


def test_implicit_prompt_and_ultrafeedback():
    r = normalize_record({"chosen": [USER, {"role": "assistant", "content": "4"}],
                          "rejected": [USER, {"role": "assistant", "content": "5"}]})
    assert r["prompt"] == [USER] and r["responses"] == ["4", "5"]
    uf = {"prompt": "What is 2 + 2?", "prompt_id": "x",
          "chosen": [USER, {"role": "assistant", "content": "4"}],
          "rejected": [USER, {"role": "assistant", "content": "22"}],
          "messages": [USER, {"role": "assistant", "content": "4"}], "score_chosen": 9.0, "score_rejected": 2.5}
    r = normalize_record(uf)
    assert r["prompt"] == [USER] and r["responses"] == ["4", "22"] and r["scores"] == [9.0, 2.5]


def test_hh_rlhf_split_at_last_assistant_turn():
    ctx = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Name a colour."
    r = normalize_record({"chosen": ctx + "\n\nAssistant: Blue.", "rejected": ctx + "\n\nAssistant: No."})
    assert r["prompt"] == [{"role": "user", "content": "Hi there"},
                           {"role": "assistant", "content": "Hello! How can I help?"},
                           {"role": "user", "content": "Name a colour."}]
    assert r["responses"] == ["Blue.", "No."]
    with pytest.raises(BadRecord, match="different conversations"):
        normalize_record({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"})
    with pytest.raises(BadRecord, match="HH-RLHF"):
        parse_hh("Human: no leading blank lines\n\nAssistant: x")


def test_ranked_responses_sorted_by_score_and_expanded_to_pairs():
    r = normalize_record({"prompt": "q", "responses": ["ok", "best", "worst"], "scores": [5, 9, 1]})
    assert r["responses"] == ["best", "ok", "worst"] and r["scores"] == [9.0, 5.0, 1.0]
    pairs = as_pairs([r])
    assert [p["responses"] for p in pairs] == [["best", "ok"], ["best", "worst"], ["ok", "worst"]]


@pytest.mark.parametrize("rec, msg", [
    ({"prompt": "q", "chosen": "a"}, "only one of"),
    ({"prompt": "q", "chosen": "a", "rejected": "a"}, "identical"),
    ({"prompt": "q", "chosen": "a", "rejected": "  "}, "empty"),
    ({"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}, "role' and 'content"),
    ({"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "end with an assistant"),
    ({"prompt": "q", "chosen": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "a"}],
      "rejected": "b"}, "does not start with the prompt"),
    ({"text": "hello"}, "none of the fields"),
])
def test_malformed_records(rec, msg):
    with pytest.raises(BadRecord, match=msg):
        normalize_record(rec)


def test_load_jsonl_names_file_and_index(tmp_path):
    path = tmp_path / "prefs.jsonl"
    rows = [{"prompt": "q1", "chosen": "a", "rejected": "b"},
            {"prompt": "q2", "chosen": "c", "rejected": "d"},
            {"prompt": "q3", "chosen": "e"},                    # record 2: no rejected
            {"prompt": "q4", "chosen": "g", "rejected": "h"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(BadRecord) as e:
        load_preferences(str(path))
    assert str(path) in str(e.value) and "record 2" in str(e.value) and "skip_bad" in str(e.value)
    logged = []
    recs = load_preferences(str(path), skip_bad=True, log=logged.append)
    assert [r["prompt"][0]["content"] for r in recs] == ["q1", "q2", "q4"]
    assert "skipped 1" in logged[0]


def test_load_parquet_and_json(tmp_path):
    import datasets
    rows = [{"prompt": f"q{i}", "chosen": [{"role": "assistant", "content": f"good {i}"}],
             "rejected": [{"role": "assistant", "content": f"bad {i}"}]} for i in range(3)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "p.parquet"))
    (tmp_path / "p.json").write_text(json.dumps(rows))
    for name in ("p.parquet", "p.json"):
        recs = load_preferences(str(tmp_path / name))
        assert [r["responses"] for r in recs] == [[f"good {i}", f"bad {i}"] for i in range(3)]


def test_encode_masks_exactly_the_final_reply():
    tok = get_tokenizer("default")
    prompt = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Earlier reply"},
              {"role": "user", "content": "Again?"}]
    ids, mask, end = encode_response(prompt, "Final reply", tok)
    assert end == len(ids) - 1 and ids[end] == tok.im_end_id
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == "Final reply<|im_end|>"
    # the prompt part is exactly the generation prompt
    assert tok.decode(ids[:mask.index(1)]).endswith("<|im_start|>assistant\n")
    idx, targets, end_idx = pad_batch([(ids, mask), (ids[:5], [0] * 5)], tok.pad_id)
    assert idx.shape == (2, len(ids)) and end_idx.tolist() == [len(ids) - 1, 4]
    assert (idx[1, 5:] == tok.pad_id).all() and (targets[1] == -100).all()
    want = [ids[t + 1] if mask[t + 1] else -100 for t in range(len(ids) - 1)] + [-100]
    assert targets[0].tolist() == want


def test_task_pairs_prefer_the_correct_answer():
    for r in task_pairs(50, "test", seed=3):
        ex = r["example"]
        assert r["prompt"] == tasks.to_messages(ex)[:-1]
        assert tasks.is_correct(ex, r["responses"][0]) and not tasks.is_correct(ex, r["responses"][1])


# -----------------------------------------------------------------------------
# unpaired examples (KTO), TRL's layout: prompt, completion, label

def test_unpaired_trl_standard_and_conversational():
    r = normalize_unpaired({"prompt": "What is 2 + 2?", "completion": "4", "label": True})
    assert r == {"prompt": [USER], "completion": "4", "label": True}
    sys_msg = {"role": "system", "content": "Be brief."}
    r = normalize_unpaired({"prompt": [sys_msg, USER], "completion": [{"role": "assistant", "content": "5"}],
                            "label": False})
    assert r == {"prompt": [sys_msg, USER], "completion": "5", "label": False}
    # the completion may carry the conversation (no prompt field), as implicit-prompt pairs do
    r = normalize_unpaired({"completion": [USER, {"role": "assistant", "content": "4"}], "label": True})
    assert r["prompt"] == [USER] and r["completion"] == "4"


@pytest.mark.parametrize("rec, msg", [
    ({"prompt": "q", "label": True}, "needs 'completion'"),
    ({"prompt": "q", "completion": "a"}, "'label' must be true"),
    ({"prompt": "q", "completion": "a", "label": 1}, "'label' must be true"),  # 1 could be a score: not guessed
    ({"prompt": "q", "completion": "a", "label": "true"}, "'label' must be true"),
    ({"prompt": "q", "completion": "  ", "label": True}, "empty"),
    ({"prompt": "q", "completion": [{"role": "user", "content": "a"}], "label": True}, "end with an assistant"),
    ({"prompt": "q", "completion": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "a"}],
      "label": True}, "does not start with the prompt"),
    ({"completion": "a", "label": False}, "has no prompt"),
])
def test_malformed_unpaired_records(rec, msg):
    with pytest.raises(BadRecord, match=msg):
        normalize_unpaired(rec)


def test_unpair_chosen_desirable_rejected_undesirable():
    # as TRL's unpair_preference_dataset: one (prompt, chosen, rejected) row -> (chosen, True), (rejected, False)
    pair = normalize_record({"prompt": "q", "chosen": "good", "rejected": "bad"})
    ranked = normalize_record({"prompt": "r", "responses": ["ok", "best", "worst"], "scores": [5, 9, 1]})
    got = [(e["prompt"][0]["content"], e["completion"], e["label"]) for e in unpair([pair, ranked])]
    assert got == [("q", "good", True), ("q", "bad", False), ("r", "best", True), ("r", "worst", False)]


def test_load_unpaired_jsonl_names_file_and_record_and_reads_pairs_too(tmp_path):
    path = tmp_path / "kto.jsonl"
    rows = [{"prompt": "q1", "completion": "a", "label": True},
            {"prompt": "q2", "completion": "b", "label": False},
            {"prompt": "q3", "completion": "c", "label": "no"},            # record 2: a label that is not a bool
            {"prompt": "q4", "chosen": "good", "rejected": "bad"},         # a pair: unpaired
            {"prompt": "q5", "chosen": "x", "rejected": "y", "score_chosen": 3.0, "score_rejected": 3.0}]  # a tie
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(BadRecord) as e:
        load_unpaired(str(path))
    assert str(path) in str(e.value) and "record 2" in str(e.value) and "skip_bad" in str(e.value)
    logged = []
    examples, counts = load_unpaired(str(path), skip_bad=True, log=logged.append, return_counts=True)
    assert [(x["prompt"][0]["content"], x["completion"], x["label"]) for x in examples] == [
        ("q1", "a", True), ("q2", "b", False), ("q4", "good", True), ("q4", "bad", False)]
    assert counts == dict(read=5, skipped=1, tied=1, records=4, desirable=2, undesirable=2)
    assert "skipped 1" in logged[0] and "equal scores" in logged[1]
    (tmp_path / "empty.jsonl").write_text(json.dumps(rows[4]) + "\n")
    with pytest.raises(DataError, match="no usable unpaired examples"):
        load_unpaired(str(tmp_path / "empty.jsonl"))


def test_load_unpaired_parquet_conversational(tmp_path):
    # the column layout of trl-lib/kto-mix-14k: prompt and completion as message lists, label a bool
    import datasets
    rows = [{"prompt": [{"role": "user", "content": f"q{i}"}],
             "completion": [{"role": "assistant", "content": f"a{i}"}], "label": i % 3 != 0} for i in range(5)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "kto.parquet"))
    examples = load_unpaired(str(tmp_path / "kto.parquet"), max_records=4)
    assert [(x["prompt"], x["completion"], x["label"]) for x in examples] == [
        ([{"role": "user", "content": f"q{i}"}], f"a{i}", i % 3 != 0) for i in range(4)]


def test_encode_unpaired_and_mismatched_pairs_equal_rendered_conversations():
    tok = get_tokenizer("default")
    examples = [dict(prompt=[{"role": "user", "content": q}], completion=a, label=lab)
                for q, a, lab in [("Sort: 3 1 2", "1 2 3", True), ("Reverse: abc", "cba please", False),
                                  ("What is 2 + 2?", "5", False)]]
    enc = encode_unpaired(examples, tok, max_len=256)
    for e in enc:
        ids, mask = e["tokens"]
        assert tok.decode(ids[:e["n_prompt"]]).endswith("<|im_start|>assistant\n")
        assert tok.decode([t for t, m in zip(ids, mask) if m]) == e["completion"] + "<|im_end|>"
    # the mismatched pairs are x_1 y_3, x_2 y_1, x_3 y_2, exactly as the chat template renders those conversations
    got = mismatched(enc, max_len=256)
    for i, (ids, mask) in enumerate(got):
        want_ids, want_mask, _ = encode_response(examples[i]["prompt"], examples[i - 1]["completion"], tok)
        assert ids == want_ids and mask == want_mask
    cut = mismatched(enc, max_len=12)  # cut at max_len
    assert all(len(ids) == len(mask) <= 12 for ids, mask in cut)
    with pytest.raises(DataError, match="longer than max_len=5"):
        encode_unpaired(examples, tok, max_len=5)
