"""The ChatML template and its loss mask, the HF families' templates against transformers, the three input formats,
and the errors for malformed records."""

import json

import pytest

from data.chat import (BadRecord, labels_from_mask, load_conversations, render, render_prompt, render_text,
                       to_chat_messages)
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


# -----------------------------------------------------------------------------
# HF checkpoints' chat templates: rendered by data/chat.py, checked against transformers' apply_chat_template
# running each family's published jinja (tests/fixtures/chat_templates/) on tiny tokenizers built in the test

FAMILIES = ["qwen2.5", "qwen3", "llama3", "mistral", "mistral-sp"]  # mistral-sp: on a SentencePiece-style BPE
OPTIONS = {"qwen3": [{}, {"enable_thinking": False}], "llama3": [{}, {"date_string": "01 Jan 2025"}]}
REASONING = "<think>\nFirst add 3 and 5.\nThat is 8.\n</think>\n\nIt is 8.\nDone."
HF_CONVS = [
    [{"role": "system", "content": "  You are terse. 日本語 "},
     {"role": "user", "content": "What is 2 + 2?\n"},
     {"role": "assistant", "content": "  4  "},
     {"role": "user", "content": "And 3 + 5? café"},
     {"role": "assistant", "content": REASONING}],
    [{"role": "user", "content": "def f(x):\n    return x  # explain\n\n"},
     {"role": "assistant", "content": "It returns x.\n\t(unchanged)"},
     {"role": "user", "content": "Sure? 😀"},
     {"role": "assistant", "content": "\nYes: 12345 digits, é\u0301 and   spaces."}],  # starts with a newline
]


@pytest.fixture(scope="module")
def family_tokenizers(tmp_path_factory):
    from transformers import AutoTokenizer

    from hf_tokenizers import family_dir
    root = tmp_path_factory.mktemp("families")
    out = {}
    for f in FAMILIES:
        d = family_dir(root / f, f)
        out[f] = (get_tokenizer(d), AutoTokenizer.from_pretrained(d))
    return out


def test_published_templates_are_recognised():
    import hashlib
    import os

    from data.chat import CHATML_JINJA, KNOWN_TEMPLATES, template_from_text
    from hf_tokenizers import TEMPLATES
    expected = {"qwen2.5-instruct.jinja": "qwen2.5", "qwen3.jinja": "qwen3", "llama-3.1-instruct.jinja": "llama3",
                "mistral-v0.3-instruct.jinja": "mistral"}
    assert sorted(os.listdir(TEMPLATES)) == sorted(expected)
    for fname, family in expected.items():
        text = open(os.path.join(TEMPLATES, fname), encoding="utf-8").read()
        assert hashlib.sha256(text.strip().encode()).hexdigest() in KNOWN_TEMPLATES
        assert template_from_text(text).name == family
        assert template_from_text(text.replace("\n", "\r\n") + "\n").name == family  # line endings, final newline
        with pytest.raises(ValueError, match="not one the repo renders"):
            template_from_text(text.replace("\\n", "\\n ", 1))
    assert template_from_text(CHATML_JINJA).name == "chatml"


@pytest.mark.parametrize("family", FAMILIES)
def test_render_equals_transformers_apply_chat_template(family_tokenizers, family):
    ours, hf = family_tokenizers[family]
    for options in OPTIONS.get(family, [{}]):
        for conv in HF_CONVS:
            for n in range(2, len(conv) + 1):  # every prefix ending with a user or an assistant turn
                msgs = conv[:n]
                if family.startswith("mistral") and msgs[0]["role"] == "system":
                    msgs = msgs[1:] if n % 2 == 1 else msgs  # also without the system message
                for gen in (False, True):
                    want_text = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen, **options)
                    want_ids = hf.apply_chat_template(msgs, add_generation_prompt=gen, **options)["input_ids"]
                    assert render_text(msgs, ours, add_generation_prompt=gen, **options) == want_text, (n, gen)
                    ids, mask = render(msgs, ours, add_generation_prompt=gen, **options)
                    assert ids == want_ids and len(mask) == len(ids), (options, n, gen)
    if family == "qwen2.5":  # the default system prompt when there is none
        assert "You are Qwen, created by Alibaba Cloud. You are a helpful assistant." in \
            render_text(HF_CONVS[1][:2], ours)


def _trained_spans(tok, ids, mask):
    spans, cur = [], []
    for i, m in zip(ids + [None], mask + [0]):
        if m:
            cur.append(i)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    return spans


@pytest.mark.parametrize("family", ["qwen2.5", "qwen3", "llama3", "mistral"])
def test_loss_mask_is_exactly_the_assistant_turns(family_tokenizers, family):
    ours, _ = family_tokenizers[family]
    conv = HF_CONVS[0]
    answer = "It is 8.\nDone."
    end = {"qwen2.5": "<|im_end|>", "qwen3": "<|im_end|>", "llama3": "<|eot_id|>", "mistral": "</s>"}[family]
    expected = {  # by hand, from each published template
        "qwen2.5": ["  4  " + end, REASONING + end],
        "qwen3": ["  4  " + end, "<think>\nFirst add 3 and 5.\nThat is 8.\n</think>\n\n" + answer + end],
        "llama3": ["4" + end, REASONING + end],
        "mistral": [" 4" + end, " " + REASONING + end],
    }[family]
    ids, mask = render(conv, ours)
    assert _trained_spans(ours, ids, mask) == expected
    if family == "qwen3":  # thinking off: the empty think block is part of the prompt, so not trained
        plain = conv[:4] + [{"role": "assistant", "content": answer}]
        ids, mask = render(plain, ours, enable_thinking=False)
        assert _trained_spans(ours, ids, mask) == ["  4  " + end, answer + end]
        assert ours.decode(ids).endswith("<think>\n\n</think>\n\n" + answer + end + "\n")


def test_loss_mask_sentencepiece(family_tokenizers):
    ours, _ = family_tokenizers["mistral-sp"]
    conv = HF_CONVS[1]
    ids, mask = render(conv, ours)
    trained = [i for i, m in zip(ids, mask) if m]
    eos = ours.end_of_turn_id
    want = []
    for m in conv:
        if m["role"] == "assistant":
            want += ours.encode_run(" " + m["content"].strip(), at_start=False) + [eos]
    assert trained == want and eos == ours.token_id("</s>")


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_prompt_is_a_prefix(family_tokenizers, family):
    ours, _ = family_tokenizers[family]
    for options in OPTIONS.get(family, [{}]):
        conv = HF_CONVS[0] if not family.startswith("mistral") else HF_CONVS[0][1:]
        if options.get("enable_thinking") is False:  # a reply without reasoning, as thinking off generates
            conv = conv[:-1] + [{"role": "assistant", "content": "It is 8."}]
        for k in [i for i, m in enumerate(conv) if m["role"] == "assistant"]:  # the reply at conv[k]
            full, mask = render(conv[:k + 1], ours, **options)
            prompt = render_prompt(conv[:k + 1], ours, **options)
            assert full[:len(prompt)] == prompt, (options, k)
            # after the prompt: the reply and its end-of-turn token, all trained (ChatML's "\n" after it is not)
            rest = mask[len(prompt):]
            assert rest == [1] * (len(rest) - 1) + [0 if family.startswith("qwen") else 1], (options, k)
    if family.startswith("mistral"):  # the published template breaks it with a system message (it moves)
        full, _ = render(HF_CONVS[0][:3], ours)
        assert full[:len(render_prompt(HF_CONVS[0][:3], ours))] != render_prompt(HF_CONVS[0][:3], ours)


def test_qwen3_reasoning_in_history_is_dropped(family_tokenizers):
    ours, hf = family_tokenizers["qwen3"]
    conv = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "<think>\nr1\n</think>\n\na1"},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2", "reasoning_content": "r2"}]
    text = render_text(conv, ours)
    assert "r1" not in text and "<|im_start|>assistant\na1<|im_end|>" in text  # history loses its reasoning
    assert "<|im_start|>assistant\n<think>\nr2\n</think>\n\na2<|im_end|>" in text  # the last turn keeps it
    assert text == hf.apply_chat_template(conv, tokenize=False)


def test_template_options_are_checked(family_tokenizers):
    ours, _ = family_tokenizers["qwen3"]
    with pytest.raises(ValueError, match="no option"):
        render(HF_CONVS[1][:2], ours, date_string="x")
    off = ours.chat_template.with_options(enable_thinking=False)
    assert off.options == {"enable_thinking": False} and ours.chat_template.options == {"enable_thinking": True}
    with pytest.raises(ValueError, match="no option"):
        render(CONV[:2], get_tokenizer("default"), enable_thinking=False)
