"""Rule-based rewards and the GSM8K loader, on hand-written completions and a small local file."""

import json

import pytest

from data import tasks
from data.rewards import (REWARD_FUNCS, exact_reward, extract_hash_answer, format_reward, get_reward_funcs,
                          gsm8k_reward, is_correct, load_gsm8k, parse_number)


def test_exact_reward_on_task_examples():
    ex = dict(task="add", prompt="What is 37 + 58?", answer="95")
    assert exact_reward(ex, "95") == 1.0
    assert exact_reward(ex, "  95 \nsomething else") == 1.0     # first line, whitespace collapsed
    assert exact_reward(ex, "<think>30+50=80, 7+8=15</think> 95") == 1.0
    assert exact_reward(ex, "96") == 0.0
    assert exact_reward(ex, "950") == 0.0
    assert exact_reward(ex, "") == 0.0
    rev = dict(task="reverse", prompt="Reverse the letters: q w e r", answer="r e w q")
    assert exact_reward(rev, "r  e w q") == 1.0
    assert exact_reward(rev, "rewq") == 0.0
    # the same checker data/tasks.py defines, on generated examples
    for ex in tasks.generate(20, "test", seed=3):
        assert exact_reward(ex, ex["answer"]) == 1.0
        assert exact_reward(ex, tasks.wrong_answer(ex, __import__("random").Random(0))) == 0.0


def test_format_reward():
    assert format_reward({}, "<think>37 + 58 is 95</think> 95") == 1.0
    assert format_reward({}, "\n<think>\nmulti\nline\n</think>\n\n95") == 1.0
    assert format_reward({}, "<think>no answer after</think>") == 0.0
    assert format_reward({}, "<think>no answer after</think>   \n") == 0.0
    assert format_reward({}, "95") == 0.0
    assert format_reward({}, "answer first <think>x</think> 95") == 0.0
    assert format_reward({}, "<think>unclosed 95") == 0.0
    assert format_reward({}, "<think>a</think> 1 <think>b</think> 2") == 0.0
    assert format_reward({}, "<think>a<think>b</think> 2") == 0.0


def test_gsm8k_answers():
    assert parse_number("1,234.50") == "1234.5"
    assert parse_number("$72.00.") == "72"
    assert parse_number(" -3 apples") == "-3"
    assert parse_number("0.50") == "0.5"
    assert parse_number("no digits") is None
    assert extract_hash_answer("so 6*12 = 72\n#### 72") == "72"
    assert extract_hash_answer("#### 1 then again #### 1,000") == "1000"   # the last marker counts
    assert extract_hash_answer("the answer is 72") is None
    ex = dict(task="gsm8k", prompt="q", answer="72")
    assert gsm8k_reward(ex, "48 + 24 = 72\n#### 72") == 1.0
    assert gsm8k_reward(ex, "#### $72.00") == 1.0
    assert gsm8k_reward(ex, "####72 clips") == 1.0
    assert gsm8k_reward(ex, "#### 73") == 0.0
    assert gsm8k_reward(ex, "the answer is 72") == 0.0            # no marker, no reward
    assert gsm8k_reward(ex, "#### seventy-two") == 0.0
    # "exact" on a GSM8K example is the #### match
    assert is_correct(ex, "#### 72") and exact_reward(ex, "#### 72") == 1.0
    assert exact_reward(ex, "72") == 0.0


def test_load_gsm8k_local_jsonl(tmp_path):
    rows = [{"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many "
                         "clips in May. How many clips did Natalia sell altogether in April and May?",
             "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 "
                       "clips altogether in April and May.\n#### 72"},
            {"question": "A shirt costs $1,200. What is half?", "answer": "1200/2=600\n#### 600"}]
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    exs = load_gsm8k("train", str(path))
    assert [e["answer"] for e in exs] == ["72", "600"]
    assert exs[0]["task"] == "gsm8k" and exs[0]["prompt"].startswith("Natalia sold clips")
    assert exact_reward(exs[0], "48 + 24 = 72\n#### 72") == 1.0
    assert tasks.to_messages(exs[0])[0]["content"] == exs[0]["prompt"]   # the chat form grpo.py renders

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"question": "q", "answer": "no marker"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl: record 1: .*####"):
        load_gsm8k("train", str(bad))
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"prompt": "q", "completion": "a"}) + "\n")
    with pytest.raises(ValueError, match="record 0: expected keys 'question' and 'answer'"):
        load_gsm8k("train", str(wrong))


def test_registry():
    assert set(REWARD_FUNCS) == {"exact", "format", "gsm8k"}
    assert get_reward_funcs(("exact", "format")) == [exact_reward, format_reward]
    with pytest.raises(ValueError, match="unknown reward function.*'exakt'"):
        get_reward_funcs(("exakt",))
