"""
Chat templates: the format each family's chat models were trained with, rendered by the repo's own code (the
HF jinja text only picks the family: it is never executed), with the assistant-only loss mask. Every
post-training stage and the chat script share it, through render(messages, tokenizer) and
render_prompt(messages, tokenizer), which dispatch on tokenizer.chat_template.

The repo's own tokenizer renders ChatML with a leading BOS:

    <|endoftext|><|im_start|>system\n{content}<|im_end|>\n<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n{content}<|im_end|>\n

The leading <|endoftext|> is the BOS that pretraining put before every document: we train and infer with it the
same way. Each piece is tokenised on its own, so the rendering of a conversation's first n messages is always a
token-exact prefix of the whole rendering, and the generation prompt (which ends with "<|im_start|>assistant\n")
is a prefix of the rendering with the reply.

An HF checkpoint's template is recognised from its text (tokenizer_config.json's chat_template or
chat_template.jinja) among the published ones below; any other template is refused, not guessed:

    qwen2.5   Qwen2.5-Instruct: ChatML, with "You are Qwen, created by Alibaba Cloud. You are a helpful
              assistant." as the system message when the conversation has none
    qwen3     Qwen3: ChatML; the last assistant turn after the last user message is rendered
              "<think>\n{reasoning}\n</think>\n\n{answer}" (reasoning from a "reasoning_content" key or from
              <think>...</think> in the content), earlier assistant turns lose their reasoning. Option
              enable_thinking (default True); False appends an empty "<think>\n\n</think>\n\n" to the generation
              prompt (and that empty block is then not trained)
    llama3    Llama 3.1/3.3-Instruct: <|begin_of_text|>, a system header "Cutting Knowledge Date: December
              2023\nToday Date: {date_string}\n\n{system}" always, then
              <|start_header_id|>{role}<|end_header_id|>\n\n{content, stripped}<|eot_id|>. Option date_string
              (default the template's own "26 Jul 2024", so renderings are reproducible)
    mistral   Mistral-7B-Instruct-v0.3: <s>[INST] {user}[/INST] {assistant, stripped}</s>...; a system message is
              put (by the published template) only into the last user message when that message is the last one,
              so a conversation that ends with an assistant reply loses its system message

The text is tokenised as transformers' apply_chat_template does: the rendered string is split at the special
tokens and each text run between them is encoded whole, so the ids equal tokenizer.apply_chat_template's (tested
per family). Exceptions, where HF's tokenizer(rendered string) differs on purpose: a special token's text inside a
message ("<|im_end|>" typed by a user) stays text with us and becomes the control token with HF.

Loss mask: mask[i] = 1 when token i is trained on (the model is asked to predict it from the tokens before it):
exactly the assistant's content and its end-of-turn token (<|im_end|>, <|eot_id|>, </s>), for every assistant
turn. Not the role header, not the newline after <|im_end|> (the next <|im_start|> follows anyway), nothing of
system or user turns. A token that straddles the header and the reply (a reply starting with a newline, after
ChatML's "assistant\n") counts as the reply's.

The generation prompt is a token-exact prefix of the rendering with the reply, except where the published
template itself breaks it: Mistral with a system message (it moves into the last user message only when that is
last), a ChatML reply that starts with a newline (it merges with the header's "\n"), and, across turns, Qwen3
(an assistant turn keeps its <think> block only while it is the last one, so history renders differently from
how it was generated).
"""

import hashlib

ROLES = ("system", "user", "assistant")


class ChatTemplate:
    """A chat format: name (the family), jinja (the template text, what export writes to tokenizer_config.json),
    end_of_turn (the token that closes an assistant turn) and options (family settings, e.g. enable_thinking)."""

    def __init__(self, name, jinja, end_of_turn, options=None):
        self.name, self.jinja, self.end_of_turn = name, jinja, end_of_turn
        self.options = dict(options or {})

    def with_options(self, **options):
        """A copy with some options changed:
        tok.chat_template = tok.chat_template.with_options(enable_thinking=False)."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise ValueError(f"chat template {self.name!r} has no option(s) {unknown}; it has {sorted(self.options)}")
        return ChatTemplate(self.name, self.jinja, self.end_of_turn, {**self.options, **options})

    def __repr__(self):
        return f"ChatTemplate({self.name!r}, options={self.options})"


# the repo's own ChatML with the leading BOS, as jinja for HF (render() below is what we run)
CHATML_JINJA = ("{{- '<|endoftext|>' }}{%- for message in messages %}"
                "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
                "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
CHATML = ChatTemplate("chatml", CHATML_JINJA, "<|im_end|>")

QWEN25_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
FAMILIES = {  # name -> (end-of-turn token, default options)
    "chatml": ("<|im_end|>", {}),
    "qwen2.5": ("<|im_end|>", {}),
    "qwen3": ("<|im_end|>", {"enable_thinking": True}),
    "llama3": ("<|eot_id|>", {"date_string": "26 Jul 2024"}),
    "mistral": ("</s>", {}),
}


def _template_key(text):
    return hashlib.sha256(text.replace("\r\n", "\n").strip().encode("utf-8")).hexdigest()


# sha256 of each published template's text (tests/fixtures/chat_templates/ holds the texts; a test checks these)
KNOWN_TEMPLATES = {
    _template_key(CHATML_JINJA): "chatml",
    "55b2f4a26ac9ee719330a61a0c39d9e538b0e9322212f048326318cff4f8674a": "qwen2.5",  # Qwen2.5-*-Instruct
    "87a2728cb8dc9fe424d624542f6060ec05a1d285ebbec578bb078900e33396b5": "qwen3",  # Qwen3 (hybrid thinking)
    "93c0e9aa3629bbd77e68dbc0f5621f6e6b23aa8d74b932595cdb8d64684526d7": "llama3",  # Llama-3.1/3.3-*-Instruct
    "cafb64e0e9e5fd2503054b3479593fae39cbdfd52338ce8af9bb4664a8eb05bd": "mistral",  # Mistral-7B-Instruct-v0.3
}


def template_from_text(text, where="the chat template"):
    """The ChatTemplate of a checkpoint's jinja text; an unknown text is refused (ValueError), never guessed."""
    family = KNOWN_TEMPLATES.get(_template_key(text))
    if family is None:
        markers = (("qwen3", "<think>"), ("qwen2.5", "<|im_start|>"), ("llama3", "<|start_header_id|>"),
                   ("mistral", "[INST]"))
        hints = [n for n, marker in markers if marker in text]
        like = f"; it looks like {hints[0]} but differs from it" if hints else ""
        raise ValueError(f"{where}: this chat template is not one the repo renders (known: the published Qwen2.5-"
                         f"Instruct, Qwen3, Llama-3.1-Instruct and Mistral-7B-Instruct-v0.3 templates, and the "
                         f"repo's own ChatML){like}. "
                         f"A guessed format would silently train the wrong one: if it renders exactly like a known "
                         f"family, add its sha256 ({_template_key(text)}) to KNOWN_TEMPLATES in data/chat.py "
                         f"together with a test against transformers' apply_chat_template")
    end_of_turn, options = FAMILIES[family]
    return ChatTemplate(family, text, end_of_turn, options)


# -----------------------------------------------------------------------------
# rendering: each family turns messages into parts (kind, text, trained): "special" parts are special tokens
# (by name), "text" parts are tokenised in runs between them


def _s(name, trained=0):
    return ("special", name, trained)


def _t(text, trained=0):
    return ("text", text, trained)


def _qwen25_parts(messages, add_generation_prompt, bos, eos):
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else QWEN25_SYSTEM
    parts = [_s("<|im_start|>"), _t("system\n" + system), _s("<|im_end|>"), _t("\n")]
    for i, m in enumerate(messages):
        if m["role"] == "system" and i == 0:
            continue
        a = int(m["role"] == "assistant")
        parts += [_s("<|im_start|>"), _t(m["role"] + "\n"), _t(m["content"], a), _s("<|im_end|>", a), _t("\n")]
    if add_generation_prompt:
        parts += [_s("<|im_start|>"), _t("assistant\n")]
    return parts


def _qwen3_parts(messages, add_generation_prompt, bos, eos, enable_thinking=True):
    parts = []
    if messages and messages[0]["role"] == "system":
        parts += [_s("<|im_start|>"), _t("system\n" + messages[0]["content"]), _s("<|im_end|>"), _t("\n")]
    last_query = len(messages) - 1  # the last user message that is not a tool response
    for i in range(len(messages) - 1, -1, -1):
        c = messages[i]["content"]
        if messages[i]["role"] == "user" and not (c.startswith("<tool_response>") and c.endswith("</tool_response>")):
            last_query = i
            break
    for i, m in enumerate(messages):
        if m["role"] == "user" or (m["role"] == "system" and i > 0):
            parts += [_s("<|im_start|>"), _t(m["role"] + "\n" + m["content"]), _s("<|im_end|>"), _t("\n")]
        elif m["role"] == "assistant":
            content, reasoning = m["content"], ""
            if m.get("reasoning_content") is not None:
                reasoning = m["reasoning_content"]
            elif "</think>" in content:
                content = m["content"].split("</think>")[-1].lstrip("\n")
                reasoning = m["content"].split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
            parts += [_s("<|im_start|>"), _t("assistant\n")]
            if i > last_query and (i == len(messages) - 1 or reasoning):
                # with thinking off, an empty think block is part of the generation prompt, so not trained
                think_trained = int(not (enable_thinking is False and not reasoning.strip("\n")))
                parts += [_t("<think>\n" + reasoning.strip("\n") + "\n</think>\n\n", think_trained),
                          _t(content.lstrip("\n"), 1)]
            else:
                parts += [_t(content, 1)]
            parts += [_s("<|im_end|>", 1), _t("\n")]
    if add_generation_prompt:
        parts += [_s("<|im_start|>"), _t("assistant\n")]
        if enable_thinking is False:
            parts += [_t("<think>\n\n</think>\n\n")]
    return parts


def _llama3_parts(messages, add_generation_prompt, bos, eos, date_string="26 Jul 2024"):
    system = ""
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"].strip(), messages[1:]
    parts = [_s(bos)] if bos else []
    parts += [_s("<|start_header_id|>"), _t("system"), _s("<|end_header_id|>"),
              _t("\n\nCutting Knowledge Date: December 2023\nToday Date: " + date_string + "\n\n" + system),
              _s("<|eot_id|>")]
    for m in messages:
        a = int(m["role"] == "assistant")
        parts += [_s("<|start_header_id|>"), _t(m["role"]), _s("<|end_header_id|>"), _t("\n\n"),
                  _t(m["content"].strip(), a), _s("<|eot_id|>", a)]
    if add_generation_prompt:
        parts += [_s("<|start_header_id|>"), _t("assistant"), _s("<|end_header_id|>"), _t("\n\n")]
    return parts


def _mistral_parts(messages, add_generation_prompt, bos, eos):
    system = None
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    for i, m in enumerate(messages):
        if (m["role"] == "user") != (i % 2 == 0):
            raise ValueError("After the optional system message, conversation roles must alternate "
                             "user/assistant/user/assistant/... (the Mistral template's own check)")
    parts = [_s(bos)] if bos else []
    for i, m in enumerate(messages):
        if m["role"] == "user":
            text = m["content"]
            if i == len(messages) - 1 and system is not None:
                text = system + "\n\n" + text
            parts += [_s("[INST]"), _t(" " + text), _s("[/INST]")]
        elif m["role"] == "assistant":
            parts += [_t(" " + m["content"].strip(), 1), _s(eos, 1)]
        else:
            raise ValueError("Only user and assistant roles are supported, with the exception of an initial optional "
                             "system message! (the Mistral template's own check)")
    return parts  # the template has no generation prompt: the prompt ends with [/INST]


PARTS = {"qwen2.5": _qwen25_parts, "qwen3": _qwen3_parts, "llama3": _llama3_parts, "mistral": _mistral_parts}


def _template(tokenizer):
    t = getattr(tokenizer, "chat_template", None)
    if t is None:
        raise ValueError(getattr(tokenizer, "chat_template_error", None) or
                         f"tokenizer {tokenizer.name!r} has no chat template (the checkpoint's tokenizer_config.json "
                         f"has no chat_template), so conversations cannot be rendered; use an instruct/chat model or "
                         f"a directory whose tokenizer_config.json holds one of the supported templates")
    return t


def _parts(messages, tokenizer, add_generation_prompt, options):
    t = _template(tokenizer)
    opts = {**t.options, **options}
    unknown = sorted(set(options) - set(t.options))
    if unknown:
        raise ValueError(f"chat template {t.name!r} has no option(s) {unknown}; it has {sorted(t.options)}")
    name = (lambda i: None if i is None else tokenizer.decode_token(i))
    eos = name(tokenizer.end_of_turn_id)
    return PARTS[t.name](messages, add_generation_prompt, name(tokenizer.bos_id), eos, **opts)


def _tokenize_parts(parts, tokenizer):
    """ids and mask of rendered parts, the way HF tokenises the rendered string: split at special tokens, each
    text run encoded whole. A part's tokens are found by encoding the run up to the part's end: the tokens that
    agree with the whole run's encoding belong to the parts so far (a straddling token goes to the later part)."""
    specials = tokenizer.enc.special_tokens_set
    ids, mask, run = [], [], []

    def flush():
        if not run:
            return
        at_start = not ids
        full = tokenizer.encode_run("".join(t for t, _ in run), at_start)
        bounds, acc = [0], ""
        for text, _ in run[:-1]:
            acc += text
            pre = tokenizer.encode_run(acc, at_start)
            k = 0
            while k < len(pre) and k < len(full) and pre[k] == full[k]:
                k += 1
            bounds.append(max(k, bounds[-1]))
        bounds.append(len(full))
        for j, (_, trained) in enumerate(run):
            mask.extend([trained] * (bounds[j + 1] - bounds[j]))
        ids.extend(full)
        run.clear()

    for kind, value, trained in parts:
        if kind == "special" and value in specials:
            flush()
            ids.append(tokenizer.token_id(value))
            mask.append(trained)
        else:  # text, or a special token this tokenizer lacks (HF would tokenise its name as text too)
            run.append((value, trained))
    flush()
    return ids, mask


def render(messages, tokenizer, add_generation_prompt=False, **options):
    """messages: list of {"role", "content"}. Returns (ids, mask), two lists of equal length.
    options: the template's settings for this call (Qwen3 enable_thinking, Llama 3 date_string)."""
    if _template(tokenizer).name != "chatml":
        return _tokenize_parts(_parts(messages, tokenizer, add_generation_prompt, options), tokenizer)
    if options:
        raise ValueError(f"the ChatML template has no options, got {sorted(options)}")
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


def render_text(messages, tokenizer, add_generation_prompt=False, **options):
    """The rendered conversation as a string (what transformers' apply_chat_template(tokenize=False) returns)."""
    if _template(tokenizer).name == "chatml":
        return tokenizer.decode(render(messages, tokenizer, add_generation_prompt, **options)[0])
    return "".join(p[1] for p in _parts(messages, tokenizer, add_generation_prompt, options))


def render_prompt(messages, tokenizer, **options):
    """Token ids of the conversation so far followed by the assistant header: what generation starts from.
    A trailing assistant message, if any, is dropped (it is what the model should produce)."""
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return render(messages, tokenizer, add_generation_prompt=True, **options)[0]


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
