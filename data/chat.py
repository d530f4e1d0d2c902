"""
The chat template (ChatML) every post-training stage and the chat script share.

    <|endoftext|><|im_start|>system\n{content}<|im_end|>\n<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n{content}<|im_end|>\n

The leading <|endoftext|> is the BOS that pretraining put before every document: we train
and infer with it the same way. Each piece is tokenised on its own, so the rendering of a
conversation's first n messages is always a token-exact prefix of the whole rendering, and
the generation prompt (which ends with "<|im_start|>assistant\n") is a prefix of the
rendering with the reply.

Loss mask: mask[i] = 1 when token i is trained on (the model is asked to predict it from the
tokens before it): exactly the assistant's content and its <|im_end|>, for every assistant
turn. Not the role header, not the newline after <|im_end|> (the next <|im_start|> follows
anyway), nothing of system or user turns.
"""

ROLES = ("system", "user", "assistant")


def render(messages, tokenizer, add_generation_prompt=False):
    """messages: list of {"role", "content"}. Returns (ids, mask), two lists of equal length."""
    ids, mask = [tokenizer.bos_id], [0]
    for m in messages:
        header = [tokenizer.im_start_id] + tokenizer.encode(m["role"] + "\n")
        body = tokenizer.encode(m["content"]) + [tokenizer.im_end_id]
        trained = 1 if m["role"] == "assistant" else 0
        tail = tokenizer.encode("\n")
        ids += header + body + tail
        mask += [0] * len(header) + [trained] * len(body) + [0] * len(tail)
    if add_generation_prompt:
        header = [tokenizer.im_start_id] + tokenizer.encode("assistant\n")
        ids += header
        mask += [0] * len(header)
    return ids, mask


def render_prompt(messages, tokenizer):
    """Token ids of the conversation so far followed by the assistant header: what generation starts from.
    A trailing assistant message, if any, is dropped (it is what the model should produce)."""
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return render(messages, tokenizer, add_generation_prompt=True)[0]


def labels_from_mask(ids, mask, ignore_index=-100):
    """Next-token targets for a rendered sequence: targets[t] = ids[t+1] where mask[t+1], else ignore.
    Returns (inputs, targets), each one shorter than ids."""
    targets = [tok if m else ignore_index for tok, m in zip(ids[1:], mask[1:])]
    return ids[:-1], targets


# -----------------------------------------------------------------------------
# conversation formats -> messages, and loading them from files or the hub
#
# Every record becomes a list of {"role", "content"} messages (OpenAI style):
#   OpenAI    {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}
#   ShareGPT  {"conversations": [{"from": "system"|"human"|"gpt", "value": ...}, ...]}
#   Alpaca    {"instruction", "input" (optional), "output", "system" (optional),
#              "history" (optional): [[earlier question, earlier answer], ...]}
# and must be a valid conversation: an optional leading system message, then user and
# assistant strictly alternating starting with user, no empty content, at least one
# assistant turn.

SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}
FORMATS_HELP = ("expected one of: {'messages': [{'role', 'content'}, ...]} (OpenAI), "
                "{'conversations': [{'from': human|gpt|system, 'value'}, ...]} (ShareGPT), "
                "{'instruction', 'input', 'output', 'system', 'history'} (Alpaca)")


class BadRecord(ValueError):
    """A record that is not a valid conversation; str() says what was expected."""


def _present(record, key):
    return record.get(key) is not None  # a column another record has reads as None in this one


def to_chat_messages(record):
    """One record in any of the three formats -> validated list of {"role", "content"}. Raises BadRecord."""
    if not isinstance(record, dict):
        raise BadRecord(f"a record must be an object, got {type(record).__name__}; {FORMATS_HELP}")
    if _present(record, "messages"):
        msgs = record["messages"]
        if not isinstance(msgs, (list, tuple)):
            raise BadRecord(f"'messages' must be a list of {{'role', 'content'}}, got {type(msgs).__name__}")
        out = []
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") is None or m.get("content") is None:
                raise BadRecord(f"message {j} needs both 'role' and 'content', got {m!r}")
            out.append({"role": m["role"], "content": m["content"]})
    elif _present(record, "conversations"):
        turns = record["conversations"]
        if not isinstance(turns, (list, tuple)):
            raise BadRecord(f"'conversations' must be a list of {{'from', 'value'}}, got {type(turns).__name__}")
        out = []
        for j, m in enumerate(turns):
            if not isinstance(m, dict) or m.get("from") is None or m.get("value") is None:
                raise BadRecord(f"turn {j} needs both 'from' and 'value', got {m!r}")
            if not isinstance(m["from"], str) or m["from"] not in SHAREGPT_ROLES:
                raise BadRecord(f"turn {j} has unknown 'from' {m['from']!r}; expected one of {', '.join(SHAREGPT_ROLES)}")
            out.append({"role": SHAREGPT_ROLES[m["from"]], "content": m["value"]})
    elif _present(record, "instruction"):
        if not _present(record, "output"):
            raise BadRecord("an Alpaca record needs 'output' (the answer to train on) next to 'instruction'")
        for key in ("instruction", "input", "output", "system"):
            if _present(record, key) and not isinstance(record[key], str):
                raise BadRecord(f"Alpaca field {key!r} must be a string, got {type(record[key]).__name__}")
        history = record.get("history") or []
        if not isinstance(history, (list, tuple)):
            raise BadRecord(f"'history' must be a list of [question, answer] pairs, got {type(history).__name__}")
        out = [{"role": "system", "content": record["system"]}] if record.get("system") else []
        for j, pair in enumerate(history):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise BadRecord(f"history entry {j} must be a [question, answer] pair, got {pair!r}")
            out += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
        user = record["instruction"]
        if record.get("input"):
            user = f"{user}\n\n{record['input']}"
        out += [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
    else:
        keys = sorted(k for k in record if _present(record, k))
        raise BadRecord(f"unknown format (keys {keys}); {FORMATS_HELP}")
    validate_messages(out)
    return out


def validate_messages(messages):
    """Raise BadRecord unless messages is [system?] user, assistant, user, assistant, ... with
    non-empty string contents and at least one assistant turn."""
    if not messages:
        raise BadRecord("the conversation is empty")
    for j, m in enumerate(messages):
        if m["role"] not in ROLES:
            raise BadRecord(f"message {j} has unknown role {m['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise BadRecord(f"message {j} ({m['role']}) content must be a string, got {type(m['content']).__name__}")
        if not m["content"].strip():
            raise BadRecord(f"message {j} ({m['role']}) has empty content")
    start = 1 if messages[0]["role"] == "system" else 0
    for j in range(start, len(messages)):
        want = "user" if (j - start) % 2 == 0 else "assistant"
        if messages[j]["role"] != want:
            raise BadRecord(f"message {j} is {messages[j]['role']!r} but {want!r} was expected: after an optional "
                            f"leading system message, user and assistant must alternate, starting with user")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord("the conversation has no assistant turn, so nothing to train on")


def load_conversations(source, split="train", skip_bad=False, log=print):
    """Conversations (lists of messages) from local json/jsonl/parquet files or a hub dataset (data/records.py).
    A malformed record, or a line that is not JSON or not UTF-8, stops with a BadRecord naming the file and the
    record's 0-based index (its line in a jsonl file); with skip_bad it is skipped and the number skipped is
    logged. An empty or unreadable file raises data.records.DataError."""
    from data.records import iter_records, read_records
    counts = {}
    convs = list(read_records(iter_records(source, split=split), to_chat_messages, skip_bad, counts))
    if counts["skipped"]:
        log(f"skipped {counts['skipped']} malformed record(s) of {counts['read']} in {source} (skip_bad=True)")
    if not convs:  # a BadRecord, not a DataError, so that callers catching BadRecord see it
        raise BadRecord(f"{source}: no valid conversations ({counts['read']} record(s) read, "
                        f"{counts['skipped']} malformed and skipped)")
    return convs
