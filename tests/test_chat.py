"""The ChatML template and its loss mask, the three input formats, and the errors for malformed records."""

import json

import pytest

from data.chat import BadRecord, labels_from_mask, load_conversations, render, render_prompt, to_chat_messages
from data.tokenizer import get_tokenizer

CONV = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3 + 5?"},
        {"role": "assistant", "content": "It is 8.\nDone."}]


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer("default")


def test_render_tokens_and_mask_by_hand(tok):
    ids, mask = render(CONV, tok)
    assert len(ids) == len(mask)
    # expected layout, piece by piece: (tokens, trained?)
    nl = tok.encode("\n")
    pieces = [([tok.bos_id], 0)]
    for m in CONV:
        pieces.append(([tok.im_start_id] + tok.encode(m["role"] + "\n"), 0))
        pieces.append((tok.encode(m["content"]) + [tok.im_end_id], 1 if m["role"] == "assistant" else 0))
        pieces.append((nl, 0))
    assert ids == [t for p, _ in pieces for t in p]
    assert mask == [m for p, m in pieces for _ in p]
    # the trained spans are exactly the two assistant contents + their <|im_end|>
    spans, start = [], None
    for i, m in enumerate(mask + [0]):
        if m and start is None:
            start = i
        if not m and start is not None:
            spans.append((start, i))
            start = None
    assert len(spans) == 2
    for (a, b), reply in zip(spans, ["4", "It is 8.\nDone."]):
        assert ids[a:b] == tok.encode(reply) + [tok.im_end_id]
        header = [tok.im_start_id] + tok.encode("assistant\n")
        assert ids[a - len(header):a] == header and mask[a - 1] == 0
        assert ids[b] == nl[0]  # the newline after <|im_end|> is not trained
    # the text round-trips to the documented ChatML
    text = tok.decode(ids)
    assert text == ("<|endoftext|><|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
                    "<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\nAnd 3 + 5?<|im_end|>\n"
                    "<|im_start|>assistant\nIt is 8.\nDone.<|im_end|>\n")


def test_labels_from_mask_shift(tok):
    ids, mask = render(CONV, tok)
    x, y = labels_from_mask(ids, mask)
    assert x == ids[:-1] and len(y) == len(x)
    for t in range(len(x)):
        assert y[t] == (ids[t + 1] if mask[t + 1] else -100)
    assert sum(t != -100 for t in y) == sum(mask)


def test_generation_prompt_is_prefix(tok):
    full, _ = render(CONV, tok)
    for k in (2, 4):  # after each user turn
        prompt = render_prompt(CONV[:k], tok)
        assert full[:len(prompt)] == prompt
        assert tok.decode(prompt).endswith("<|im_start|>assistant\n")
        assert render_prompt(CONV[:k + 1], tok) == prompt  # a trailing assistant reply is dropped
        ids, mask = render(CONV[:k], tok, add_generation_prompt=True)
        assert ids == prompt and not any(mask[len(render(CONV[:k], tok)[0]):])


def test_formats_normalise_to_the_same_messages():
    openai = {"messages": CONV}
    sharegpt = {"conversations": [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]],
                                   "value": m["content"]} for m in CONV]}
    alpaca = {"system": "You are terse.", "history": [["What is 2 + 2?", "4"]], "instruction": "And 3 + 5?",
              "input": "", "output": "It is 8.\nDone."}
    for rec in (openai, sharegpt, alpaca):
        assert to_chat_messages(rec) == CONV
    # alpaca input goes after the instruction, system and history are optional
    assert to_chat_messages({"instruction": "Translate", "input": "chat", "output": "cat"}) == [
        {"role": "user", "content": "Translate\n\nchat"}, {"role": "assistant", "content": "cat"}]


@pytest.mark.parametrize("record, expected", [
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}, "needs both 'role' and 'content'"),
    ({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "a"}]}, "unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q2"}]}, "'assistant' was expected"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "'user' was expected"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}, "empty content"),
    ({"messages": [{"role": "user", "content": "q"}]}, "no assistant turn"),
    ({"conversations": [{"from": "bot", "value": "x"}]}, "unknown 'from' 'bot'"),
    ({"instruction": "q"}, "needs 'output'"),
    ({"prompt": "q", "completion": "a"}, "unknown format"),
])
def test_malformed_records(record, expected):
    with pytest.raises(BadRecord, match=expected):
        to_chat_messages(record)


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_load_local_files_all_formats(tmp_path):
    import datasets
    good = [{"messages": CONV[1:3]}, {"messages": CONV}]
    jl = _write_jsonl(tmp_path / "a.jsonl", good)
    js = tmp_path / "b.json"
    js.write_text(json.dumps([{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}]))
    pq = str(tmp_path / "c.parquet")
    datasets.Dataset.from_list([{"instruction": "Say x", "input": None, "output": "x"}]).to_parquet(pq)
    convs = load_conversations(f"{jl},{js},{pq}")
    assert convs == [CONV[1:3], CONV, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
                     [{"role": "user", "content": "Say x"}, {"role": "assistant", "content": "x"}]]
    assert len(load_conversations(str(tmp_path))) == 4  # a directory: all its data files


def test_bad_record_names_file_and_index_and_skip_bad_counts(tmp_path):
    recs = [{"messages": CONV[1:3]},
            {"messages": CONV[1:3]},
            {"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "again"}]},  # record 2
            {"messages": CONV[1:3]},
            {"messages": [{"role": "user", "content": "only a question"}]}]  # record 4
    path = _write_jsonl(tmp_path / "chats.jsonl", recs)
    with pytest.raises(BadRecord) as e:
        load_conversations(path)
    msg = str(e.value)
    assert f"{path}: record 2:" in msg and "'assistant' was expected" in msg and "skip_bad" in msg
    logged = []
    convs = load_conversations(path, skip_bad=True, log=logged.append)
    assert len(convs) == 3
    assert len(logged) == 1 and "skipped 2 malformed record(s) of 5" in logged[0]


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_conversations(str(tmp_path / "nope.jsonl"))


def test_chat_script_streams_the_greedy_reply(tiny_ckpt, tok):
    import torch
    from conftest import run_script
    from checkpoint import load_model
    out = run_script(["chat.py", f"--ckpt={tiny_ckpt}", "--prompt=What is 2 + 2?", "--temperature=0",
                      "--max_new_tokens=12"], timeout=120)
    model = load_model(tiny_ckpt)[0].eval()
    prompt = render_prompt([{"role": "user", "content": "What is 2 + 2?"}], tok)
    with torch.no_grad():
        g = model.generate([prompt], 12, temperature=0, stop_tokens=(tok.im_end_id, tok.eot_id), pad_id=tok.pad_id)
    ids = [t for t in g["tokens"][0, :g["lengths"][0]].tolist() if t not in (tok.im_end_id, tok.eot_id)]
    assert out == tok.decode(ids) + "\n"
