"""
Preference data for reward.py and dpo.py: loading, normalising, tokenising, batching.

Every layout is normalised to one record

    dict(prompt=[{"role", "content"}, ...], responses=[best, ..., worst], scores=None | [s_best, ...])

`responses` are assistant replies (strings), ranked best first: two responses is a
(chosen, rejected) pair, K > 2 a ranking (the reward model trains on all C(K, 2) pairs).
Layouts read (field names as published):

  TRL, standard        {"prompt": str, "chosen": str, "rejected": str}
  TRL, conversational  {"prompt": [msgs], "chosen": [assistant msg], "rejected": [assistant msg]}
  implicit prompt      {"chosen": [msgs ..., assistant], "rejected": [msgs ..., assistant]} (shared context)
  UltraFeedback-binarized  {"prompt": str, "chosen": [user, assistant], "rejected": [user, assistant],
                            "score_chosen": float, "score_rejected": float}
  HH-RLHF              {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}: full
                       transcripts that differ only in the last assistant turn, split there
  ranked               {"prompt": str | [msgs], "responses": [str | assistant msg, ...],
                        "scores": [float, ...] (optional; without it the list is taken as best first)}
"messages" is accepted in place of "prompt".

KTO (dpo.py --loss_type=kto) learns from unpaired examples instead, one completion with a binary label,
normalised to dict(prompt=[msgs], completion=str, label=bool) (TRL's unpaired preference layout):

  TRL, standard        {"prompt": str, "completion": str, "label": bool}
  TRL, conversational  {"prompt": [msgs], "completion": [assistant msg], "label": bool}

label true is a desirable completion, false an undesirable one. load_unpaired also reads every paired
layout above and unpairs it as TRL's unpair_preference_dataset does: chosen desirable, rejected undesirable.
Sources: a local .json / .jsonl / .parquet file or a
dataset directory, or a Hugging Face hub name (needs the network), all read by data/records.py;
"tasks" is the bundled default, pairs generated from data/tasks.py.

A record that fits no layout (or a line that is not JSON or not UTF-8) stops the load with a BadRecord
naming the file and record index; skip_bad=True skips such records instead and reports how many.
Scores that tie are no preference: a tied pair never trains as a strict one (drop_ties), and the number
dropped is logged.
"""

import math
import random
import re

from data import tasks
from data.chat import BadRecord, labels_from_mask, render, validate_messages
from data.records import DataError, iter_records, read_records


def _messages(x, what):
    """A list of {"role", "content"} dicts (a bare string is one user message); checked as a whole
    conversation by validate_messages once the response is appended."""
    if isinstance(x, str):
        return [{"role": "user", "content": x}]
    if not isinstance(x, list) or not x:
        raise BadRecord(f"{what} must be a string or a non-empty list of messages, got {type(x).__name__}")
    for i, m in enumerate(x):
        if not isinstance(m, dict) or m.get("role") is None or m.get("content") is None:
            raise BadRecord(f"{what}[{i}] needs both 'role' and 'content', got {m!r:.200}")
    return [{"role": m["role"], "content": m["content"]} for m in x]


def _split_response(x, what):
    """A response given as text, as one assistant message, or as a conversation ending in one:
    returns (context messages before it, reply text)."""
    if isinstance(x, str):
        return [], x
    if isinstance(x, dict):
        x = [x]
    msgs = _messages(x, what)
    if msgs[-1]["role"] != "assistant":
        raise BadRecord(f"{what} must end with an assistant message, ends with role {msgs[-1]['role']!r}")
    return msgs[:-1], msgs[-1]["content"]


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


def parse_hh(text, what="transcript"):
    """An HH-RLHF transcript "\\n\\nHuman: q\\n\\nAssistant: a ..." -> (prompt messages, last assistant reply)."""
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 5 or parts[-2] != "Assistant":
        raise BadRecord(f"{what} is not an HH-RLHF transcript ('\\n\\nHuman: ...\\n\\nAssistant: ...' "
                                    f"ending with an Assistant turn): {text[:120]!r}")
    roles = {"Human": "user", "Assistant": "assistant"}
    msgs = [{"role": roles[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]
    return msgs[:-1], msgs[-1]["content"]


def _is_score(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def normalize_record(rec):
    """One raw record (any layout above) -> dict(prompt, responses, scores). Raises BadRecord."""
    if not isinstance(rec, dict):
        raise BadRecord(f"expected a JSON object, got {type(rec).__name__}")
    prompt = rec.get("prompt") if rec.get("prompt") is not None else rec.get("messages")
    scores = None
    if rec.get("chosen") is not None or rec.get("rejected") is not None:
        if rec.get("chosen") is None or rec.get("rejected") is None:
            raise BadRecord("has only one of 'chosen' / 'rejected'")
        raw = [rec["chosen"], rec["rejected"]]
        names = ["chosen", "rejected"]
        if rec.get("score_chosen") is not None and rec.get("score_rejected") is not None:
            scores = [rec["score_chosen"], rec["score_rejected"]]
            if not all(_is_score(v) for v in scores):
                raise BadRecord(f"'score_chosen' and 'score_rejected' must be finite numbers, got {scores!r:.100}")
            scores = [float(v) for v in scores]
            if scores[0] < scores[1]:
                raise BadRecord(f"'chosen' is scored lower than 'rejected' ({scores[0]:g} < {scores[1]:g}); "
                                f"swap them or fix the scores")
    elif rec.get("responses") is not None:
        raw = rec["responses"]
        if not isinstance(raw, list) or len(raw) < 2:
            raise BadRecord("'responses' must be a list of at least 2 responses")
        names = [f"responses[{i}]" for i in range(len(raw))]
        if rec.get("scores") is not None:
            s = rec["scores"]
            if not isinstance(s, list) or len(s) != len(raw) or not all(_is_score(v) for v in s):
                raise BadRecord(f"'scores' must be a list of {len(raw)} finite numbers, one per response")
            order = sorted(range(len(raw)), key=lambda i: -s[i])
            raw, names, scores = [raw[i] for i in order], [names[i] for i in order], [float(s[i]) for i in order]
    else:
        raise BadRecord(f"has none of the fields 'chosen'/'rejected' or 'responses' "
                        f"(keys: {sorted(k for k, v in rec.items() if v is not None)})")

    if prompt is None and all(isinstance(r, str) for r in raw):  # HH-RLHF: split full transcripts
        split = [parse_hh(r, n) for r, n in zip(raw, names)]
    else:
        split = [_split_response(r, n) for r, n in zip(raw, names)]
    contexts = [c for c, _ in split]
    if prompt is not None:
        prompt = _messages(prompt, "prompt")
        for ctx, n in zip(contexts, names):
            # UltraFeedback repeats the prompt inside chosen/rejected: it must be the same conversation
            if ctx and ctx != prompt:
                raise BadRecord(f"the conversation in '{n}' does not start with the prompt")
    else:
        prompt = contexts[0]
        if any(c != prompt for c in contexts[1:]):
            raise BadRecord(f"'{names[0]}' and the other responses continue different conversations")
    if not prompt:
        raise BadRecord("has no prompt (no 'prompt'/'messages' field and no context before the responses)")
    responses = [r for _, r in split]
    for r, n in zip(responses, names):
        try:
            validate_messages(prompt + [{"role": "assistant", "content": r}])
        except BadRecord as e:
            raise BadRecord(f"prompt + '{n}' is not a valid conversation: {e}") from None
    if len(set(responses)) < len(responses):
        raise BadRecord("two of the responses are identical: no preference to learn")
    return dict(prompt=prompt, responses=responses, scores=scores)


# -----------------------------------------------------------------------------
# loading

def drop_ties(record):
    """(records, n_tied): a record whose scores tie, as untied records. Equal scores are no preference, so a
    tied pair must not train as a strict one. Without a tie: ([record], 0). With one, every strict pair
    (s_i > s_j) becomes a two-response record of its own and the tied pairs are dropped and counted: a
    ranked group cannot lose just its tied pairs, the reward model trains each group on all C(K, 2) pairs.
    [5, 5, 1] -> [a, c] and [b, c], 1 tied pair; a (chosen, rejected) pair scored [5, 5] -> nothing, 1."""
    s = record["scores"]
    if s is None or len(set(s)) == len(s):
        return [record], 0
    k = len(s)
    strict = [(i, j) for i in range(k) for j in range(i + 1, k) if s[i] > s[j]]  # scores are sorted, best first
    out = [{**record, "responses": [record["responses"][i], record["responses"][j]], "scores": [s[i], s[j]]}
           for i, j in strict]
    return out, k * (k - 1) // 2 - len(strict)


def load_preferences(source, split="train", skip_bad=False, max_records=None, log=print, return_counts=False):
    """Normalised records (see the module docstring) from local files or a hub dataset, tied pairs dropped
    (drop_ties). A malformed record stops the load with a BadRecord naming the file and the record's 0-based
    index (its line in a jsonl file); with skip_bad it is skipped. Skipped records and dropped ties are counted
    and logged; return_counts=True also returns the counts: (records, dict(read, skipped, tied, records))."""
    counts = {}
    out, n_tied = [], 0
    for rec in read_records(iter_records(source, split=split), normalize_record, skip_bad, counts):
        untied, tied = drop_ties(rec)
        out += untied
        n_tied += tied
        if max_records is not None and len(out) >= max_records:
            out = out[:max_records]
            break
    counts.update(tied=n_tied, records=len(out))
    if counts["skipped"]:
        log(f"skipped {counts['skipped']} malformed record(s) of {counts['read']} in {source} (skip_bad=True)")
    if n_tied:
        log(f"dropped {n_tied} tied pair(s) in {source}: responses with equal scores are no preference")
    if not out:
        raise DataError(f"{source}: no usable preference records ({counts['read']} read, {counts['skipped']} "
                        f"malformed and skipped, {n_tied} tied pair(s) dropped)")
    return (out, counts) if return_counts else out


def task_pairs(n, split="train", seed=0):
    """The embedded default: (correct answer, plausible wrong answer) pairs on data/tasks.py questions."""
    rng = random.Random(f"pairs-{split}-{seed}")
    out = []
    for ex in tasks.generate(n + n // 10 + 10, split, seed):
        try:
            wrong = tasks.wrong_answer(ex, rng)
        except ValueError:  # e.g. sorting "5 5 5": every permutation is the answer
            continue
        out.append(dict(prompt=tasks.to_messages(ex)[:-1], responses=[ex["answer"], wrong], scores=None, example=ex))
        if len(out) == n:
            break
    return out


def sampled_task_pairs(model, tokenizer, examples, num_samples=4, temperature=1.0, max_new_tokens=24,
                       batch_size=128, seed=0):
    """On-policy pairs: for each task question, the model's greedy answer plus num_samples sampled ones;
    when any is wrong, pair the mistake (the greedy one first: that is what greedy decoding would say)
    with a correct answer (a sampled one if any, else the reference). Questions the model always gets
    right give no pair."""
    import torch
    from data.chat import render_prompt
    gen = torch.Generator(model.tok_emb.weight.device).manual_seed(seed)
    rng = random.Random(seed)
    out = []
    for b in range(0, len(examples), batch_size):
        exs = examples[b:b + batch_size]
        prompts = [tasks.to_messages(ex)[:-1] for ex in exs]
        ids = [render_prompt(p, tokenizer) for p in prompts]
        budget = min(max_new_tokens, model.config.max_seq_len - max(map(len, ids)))
        runs = [model.generate(ids, budget, temperature=0.0, stop_tokens=tokenizer.stop_ids,
                               pad_id=tokenizer.pad_id)]
        if num_samples:
            runs.append(model.generate([p for p in ids for _ in range(num_samples)], budget, temperature=temperature,
                                       stop_tokens=tokenizer.stop_ids, pad_id=tokenizer.pad_id, generator=gen))
        texts = [[tokenizer.decode_reply(row[:n]).strip()
                  for row, n in zip(r["tokens"].tolist(), r["lengths"].tolist())] for r in runs]
        for j, (ex, prompt) in enumerate(zip(exs, prompts)):
            samples = [texts[0][j]] + (texts[1][j * num_samples:(j + 1) * num_samples] if num_samples else [])
            right = [s for s in samples if tasks.is_correct(ex, s)]
            wrong = [s for s in samples if s and not tasks.is_correct(ex, s)]
            if wrong:
                chosen = rng.choice(right) if right else ex["answer"]
                rejected = wrong[0] if wrong[0] == samples[0] else rng.choice(wrong)
                if chosen != rejected:
                    out.append(dict(prompt=prompt, responses=[chosen, rejected], scores=None, example=ex))
    return out


def split_off(records, fraction, seed=0):
    """(train, val): a seeded random `fraction` of the records held out (at least one)."""
    n_val = max(1, int(len(records) * fraction))
    if n_val >= len(records):
        raise DataError(f"{len(records)} preference record(s): holding out val_fraction={fraction} of them for "
                        f"validation (at least 1) takes {n_val}, which leaves nothing for training; give more records"
                        f"{', a smaller val_fraction' if n_val > 1 else ''} or a separate validation file with "
                        f"val_data=PATH")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    return [records[i] for i in order[n_val:]], [records[i] for i in order[:n_val]]


def as_pairs(records):
    """Ranked records -> (chosen, rejected) records, one per ordered pair of the ranking."""
    out = []
    for r in records:
        k = len(r["responses"])
        for i in range(k):
            for j in range(i + 1, k):
                s = r["scores"]
                out.append({**r, "responses": [r["responses"][i], r["responses"][j]],
                            "scores": None if s is None else [s[i], s[j]]})
    return out


# -----------------------------------------------------------------------------
# unpaired examples (KTO)

def normalize_unpaired(rec):
    """One record in TRL's unpaired layout -> dict(prompt, completion, label). Raises BadRecord. The completion
    may be text, one assistant message, or a conversation ending in one that starts with the prompt (or, without
    a prompt field, that carries the prompt: its messages before the reply)."""
    if not isinstance(rec, dict):
        raise BadRecord(f"expected a JSON object, got {type(rec).__name__}")
    if rec.get("completion") is None:
        raise BadRecord(f"an unpaired example needs 'completion' (and 'prompt', 'label'); "
                        f"keys: {sorted(k for k, v in rec.items() if v is not None)}")
    label = rec.get("label")
    if not isinstance(label, bool):  # 0/1 or "yes" could be a score or a typo: say which convention is meant
        raise BadRecord(f"'label' must be true (a desirable completion) or false (an undesirable one), got "
                        f"{label!r:.50}")
    context, completion = _split_response(rec["completion"], "completion")
    prompt = rec.get("prompt") if rec.get("prompt") is not None else rec.get("messages")
    if prompt is not None:
        prompt = _messages(prompt, "prompt")
        if context and context != prompt:
            raise BadRecord("the conversation in 'completion' does not start with the prompt")
    else:
        prompt = context
    if not prompt:
        raise BadRecord("has no prompt (no 'prompt'/'messages' field and no context before the completion)")
    try:
        validate_messages(prompt + [{"role": "assistant", "content": completion}])
    except BadRecord as e:
        raise BadRecord(f"prompt + 'completion' is not a valid conversation: {e}") from None
    return dict(prompt=prompt, completion=completion, label=label)


def unpair(records):
    """Preference records (normalize_record's) -> unpaired examples, as TRL's unpair_preference_dataset: the
    chosen (best) response desirable, the rejected (worst) one undesirable. A ranking's middle responses are
    neither, and are left out; records keep their other keys (the task example of the embedded default)."""
    out = []
    for r in records:
        extra = {k: v for k, v in r.items() if k not in ("prompt", "responses", "scores", "tokens")}
        out.append({**extra, "prompt": r["prompt"], "completion": r["responses"][0], "label": True})
        out.append({**extra, "prompt": r["prompt"], "completion": r["responses"][-1], "label": False})
    return out


def _parse_unpaired(rec):
    """A record of either kind -> (unpaired examples, 1 if it is a preference record whose best and worst
    responses tie (no preference: nothing to unpair), else 0)."""
    if isinstance(rec, dict) and (rec.get("completion") is not None or rec.get("label") is not None):
        return [normalize_unpaired(rec)], 0
    r = normalize_record(rec)
    if r["scores"] is not None and r["scores"][0] == r["scores"][-1]:
        return [], 1
    return unpair([r]), 0


def load_unpaired(source, split="train", skip_bad=False, max_records=None, log=print, return_counts=False):
    """Unpaired examples (dict(prompt, completion, label)) from local files or a hub dataset: records in TRL's
    unpaired layout, and preference records of any layout above, unpaired (unpair; a record whose responses all
    tie is no preference, and is dropped and counted). Errors and skip_bad as load_preferences; max_records
    counts examples. return_counts=True also returns dict(read, skipped, tied, records, desirable, undesirable)."""
    counts = {}
    out, n_tied = [], 0
    for examples, tied in read_records(iter_records(source, split=split), _parse_unpaired, skip_bad, counts):
        out += examples
        n_tied += tied
        if max_records is not None and len(out) >= max_records:
            out = out[:max_records]
            break
    n_desirable = sum(e["label"] for e in out)
    counts.update(tied=n_tied, records=len(out), desirable=n_desirable, undesirable=len(out) - n_desirable)
    if counts["skipped"]:
        log(f"skipped {counts['skipped']} malformed record(s) of {counts['read']} in {source} (skip_bad=True)")
    if n_tied:
        log(f"dropped {n_tied} preference record(s) in {source} whose responses all have equal scores: "
            f"no preference, so neither desirable nor undesirable")
    if not out:
        raise DataError(f"{source}: no usable unpaired examples ({counts['read']} read, {counts['skipped']} "
                        f"malformed and skipped, {n_tied} tied record(s) dropped)")
    return (out, counts) if return_counts else out


def encode_unpaired(examples, tokenizer, max_len, verbose=True, what="unpaired data"):
    """Tokenise each unpaired example: adds "tokens" = (ids, mask) of prompt + completion (as encode_response)
    and "n_prompt", where the completion starts (the prompt with its generation prompt; mismatched splices
    there). Examples longer than max_len are dropped and counted."""
    if not examples:
        raise DataError(f"{what}: no unpaired examples to encode")
    out, dropped = [], 0
    for e in examples:
        ids, mask, _ = encode_response(e["prompt"], e["completion"], tokenizer)
        if len(ids) > max_len:
            dropped += 1
            continue
        n_prompt = len(render(e["prompt"], tokenizer, add_generation_prompt=True)[0])
        out.append({**e, "tokens": (ids, mask), "n_prompt": n_prompt})
    if dropped and verbose:
        print(f"{what}: dropped {dropped} of {len(examples)} examples longer than {max_len} tokens")
    if not out:
        raise DataError(f"{what}: all {len(examples)} example(s) are longer than max_len={max_len} tokens; raise "
                        f"max_len (up to the model's max_seq_len) or shorten the data")
    return out


def mismatched(examples, max_len):
    """KTO's mismatched (prompt, completion) pairs, made as TRL makes them: the completions of a batch shifted by
    one, so example i's prompt meets example i-1's completion (x_1 y_n, x_2 y_1, ..., x_n y_{n-1}); the
    completions are the batch's own, with other prompts. Spliced token-wise (prompt ids + completion ids, both
    from encode_unpaired) and cut at max_len tokens. Returns [(ids, mask)] for pad_batch. One example is its
    own mismatched pair (dpo.py needs batches of 2 or more)."""
    out = []
    for i, e in enumerate(examples):
        other = examples[i - 1]
        (ids, _), n = e["tokens"], e["n_prompt"]
        (ids_c, mask_c), m = other["tokens"], other["n_prompt"]
        out.append(((ids[:n] + ids_c[m:])[:max_len], ([0] * n + mask_c[m:])[:max_len]))
    return out


# -----------------------------------------------------------------------------
# tokenising and batching

def encode_response(prompt, response, tokenizer):
    """Chat-template ids of prompt + the assistant reply, the 0/1 mask of the reply's tokens (its content and
    end of turn, not earlier assistant turns of the prompt), and the index of that end-of-turn token."""
    ids, mask = render(prompt + [{"role": "assistant", "content": response}], tokenizer)
    n_prompt = len(render(prompt, tokenizer, add_generation_prompt=True)[0])  # a token-exact prefix
    mask = [0] * n_prompt + mask[n_prompt:]
    end = max(i for i, m in enumerate(mask) if m)
    assert ids[end] == tokenizer.end_of_turn_id
    return ids[:end + 1], mask[:end + 1], end  # nothing after the end of turn is read or trained


def encode_records(records, tokenizer, max_len, verbose=True, what="preference data"):
    """Tokenise every response of every record: adds "tokens" = [(ids, mask), ...] (ranked as responses).
    Records with any sequence longer than max_len are dropped (and counted): cutting one would cut its
    end-of-turn token, where the reward is read."""
    out, dropped = [], 0
    for r in records:
        seqs = [encode_response(r["prompt"], resp, tokenizer)[:2] for resp in r["responses"]]
        if max(len(ids) for ids, _ in seqs) > max_len:
            dropped += 1
            continue
        out.append({**r, "tokens": seqs})
    if not records:
        raise DataError(f"{what}: no preference records to encode")
    if dropped and verbose:
        print(f"{what}: dropped {dropped} of {len(records)} records longer than {max_len} tokens")
    if not out:
        raise DataError(f"{what}: all {len(records)} record(s) are longer than max_len={max_len} tokens; raise "
                        f"max_len (up to the model's max_seq_len) or shorten the data")
    return out


def pad_batch(seqs, pad_id, device=None):
    """[(ids, mask)] -> right-padded idx (N, T), next-token targets (N, T) with -100 outside the masked
    reply, end_idx (N,) = position of each reply's end-of-turn token (its last token)."""
    import torch
    T = max(len(ids) for ids, _ in seqs)
    idx = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    targets = torch.full((len(seqs), T), -100, dtype=torch.long)
    for i, (ids, mask) in enumerate(seqs):
        n = len(ids)
        idx[i, :n] = torch.tensor(ids)
        targets[i, :n - 1] = torch.tensor(labels_from_mask(ids, mask)[1], dtype=torch.long)
    end_idx = torch.tensor([len(ids) - 1 for ids, _ in seqs])
    return idx.to(device), targets.to(device), end_idx.to(device)
