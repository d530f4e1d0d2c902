"""
Standard benchmarks in lm-evaluation-harness's conventions: loaders and prompt builders (eval.py scores them).

    name           hub dataset (config)              eval split   few-shot split   default shots   metrics
    arc_easy       allenai/ai2_arc (ARC-Easy)        test         train            0               acc, acc_norm
    arc_challenge  allenai/ai2_arc (ARC-Challenge)   test         train            0               acc, acc_norm
    hellaswag      Rowan/hellaswag                   validation   train            0               acc, acc_norm
    mmlu           cais/mmlu (all)                   test         dev              5               acc
    gsm8k          openai/gsm8k (main)               test         train            5               exact match
    gsm8k_chat     openai/gsm8k (main)               test         -                0 (chat)        exact match

The prompts are lm-eval's (lm_eval/tasks/*/ yaml and utils.py, v0.4), so scores compare with published ones:
  ARC        "Question: {question}\nAnswer:" -> " {choice text}", gold = choices.label.index(answerKey)
  HellaSwag  preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()) -> " " + preprocess(ending);
             preprocess strips, turns " [title]" into ". ", drops any other [bracketed] WikiHow artifact and
             collapses double spaces
  MMLU       "The following are multiple choice questions (with answers) about {subject with spaces}.\n\n"
             then "{question.strip()}\nA. {c0}\nB. {c1}\nC. {c2}\nD. {c3}\nAnswer:" -> " A" / " B" / " C" / " D"
  GSM8K      "Question: {question}\nAnswer:", generated greedily until "Question:", "</s>" or "<|im_end|>"
A k-shot context puts k solved examples before the question, each "{prompt} {answer}\n\n" (lm-eval's target
delimiter " " and few-shot delimiter "\n\n"). Which examples: MMLU takes the first k of its subject's dev split
(lm-eval's first_n sampler); the others draw k at random from the few-shot split with one random.Random(1234)
consumed in document order (lm-eval's default sampler and seed; for HellaSwag, whose lm-eval task has no test
split, it draws k + 1 and drops the document itself), so the same documents in the same order get the same
examples as lm-eval's. acc_norm divides each choice's log-likelihood by the length in characters of
the choice text (without the leading space), as lm-eval's process_results does.

GSM8K answers are scored with lm-eval's two filters: strict-match takes the first "#### N" (regex
"#### (\\-?[0-9\\.\\,]+)"), flexible-extract the last number-like run (regex "(-?[$0-9.,]{2,})|(-?[0-9]+)"); both
then go through exact_match with its regexes_to_ignore (",", "\\$", "(?s).*#### ", "\\.$") and ignore_case, applied
to the answer and to the reference solution alike. gsm8k_chat is the zero-shot chat form for chat models: the
question as the user turn of the checkpoint's chat template, the reply scored the same way. Model text is only
matched against regexes, never executed.

Data: hub datasets through data/records.py (`datasets`, streamed), or local files in the hub's schema, one
directory per benchmark: {data_dir}/{name}/{split}.jsonl (or .json / .parquet, or a {split}/ directory of them);
gsm8k_chat reads gsm8k's. A record that does not fit the schema stops with a BadRecord naming file and record.
"""

import os
import random
import re

from data.chat import BadRecord
from data.records import BUILDERS, DataError, iter_records, read_records

FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed

# name -> (hub path, hub config, eval split, few-shot split, default number of shots)
BENCHMARKS = {
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "test", "train", 0),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", "test", "train", 0),
    "hellaswag": ("Rowan/hellaswag", None, "validation", "train", 0),
    "mmlu": ("cais/mmlu", "all", "test", "dev", 5),
    "gsm8k": ("openai/gsm8k", "main", "test", "train", 5),
    "gsm8k_chat": ("openai/gsm8k", "main", "test", None, 0),
}
MULTIPLE_CHOICE = ("arc_easy", "arc_challenge", "hellaswag", "mmlu")
GSM8K_STOP = ("Question:", "</s>", "<|im_end|>")  # lm-eval's gsm8k generation_kwargs.until

# -----------------------------------------------------------------------------
# records -> documents: dict(query, choices, gold) for multiple choice, dict(question, answer) for GSM8K


def _need(rec, fields):
    if not isinstance(rec, dict):
        raise BadRecord(f"a record must be an object with fields {fields}, got {type(rec).__name__}")
    missing = [k for k in fields if rec.get(k) is None]
    if missing:
        raise BadRecord(f"missing field(s) {missing} (record has {sorted(k for k, v in rec.items() if v is not None)}; "
                        f"expected the hub schema's {fields})")


def _strings(value, what, n=None):
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise BadRecord(f"{what} must be a list of strings, got {value!r:.100}")
    if n is not None and len(value) != n:
        raise BadRecord(f"{what} must have {n} entries, got {len(value)}")
    return list(value)


def arc_doc(rec):
    """allenai/ai2_arc: {id, question, choices: {text: [...], label: [...]}, answerKey}."""
    _need(rec, ["question", "choices", "answerKey"])
    choices = rec["choices"]
    if not isinstance(choices, dict):
        raise BadRecord(f"'choices' must be an object {{text: [...], label: [...]}}, got {choices!r:.100}")
    text = _strings(choices.get("text"), "choices.text")
    labels = _strings(choices.get("label"), "choices.label", len(text))
    if rec["answerKey"] not in labels:
        raise BadRecord(f"answerKey {rec['answerKey']!r} is not one of the choice labels {labels}")
    return dict(query=f"Question: {rec['question']}\nAnswer:", choices=text, gold=labels.index(rec["answerKey"]))


def hellaswag_preprocess(text):
    """lm-eval's hellaswag utils.preprocess (the brackets are WikiHow artifacts)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_doc(rec):
    """Rowan/hellaswag: {ctx_a, ctx_b, ctx, activity_label, endings: [4], label: "0".."3"}."""
    _need(rec, ["ctx_a", "ctx_b", "activity_label", "endings", "label"])
    endings = _strings(rec["endings"], "endings")
    for k in ("ctx_a", "ctx_b", "activity_label"):
        if not isinstance(rec[k], str):
            raise BadRecord(f"{k!r} must be a string, got {type(rec[k]).__name__}")
    label = str(rec["label"])
    if not label.isdigit() or int(label) >= len(endings):  # the test split has label "": no answer to score
        raise BadRecord(f"label {rec['label']!r} is not the index of one of the {len(endings)} endings "
                        f"(the hub's test split is unlabelled: evaluate on validation)")
    ctx = rec["ctx_a"] + " " + rec["ctx_b"].capitalize()
    return dict(query=hellaswag_preprocess(rec["activity_label"] + ": " + ctx),
                choices=[hellaswag_preprocess(e) for e in endings], gold=int(label),
                record=rec)  # the few-shot sampler leaves out a document equal to this one (whole record)


def mmlu_doc(rec):
    """cais/mmlu: {question, subject, choices: [4], answer: 0..3}."""
    _need(rec, ["question", "subject", "choices", "answer"])
    c = _strings(rec["choices"], "choices", 4)
    if not isinstance(rec["answer"], int) or isinstance(rec["answer"], bool) or not 0 <= rec["answer"] < 4:
        raise BadRecord(f"'answer' must be an int in 0..3 (the index of the right choice), got {rec['answer']!r}")
    query = f"{rec['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"
    return dict(query=query, choices=["A", "B", "C", "D"], gold=rec["answer"], subject=rec["subject"])


def gsm8k_doc(rec):
    """openai/gsm8k: {question, answer}; the answer is a worked solution ending in "#### N"."""
    _need(rec, ["question", "answer"])
    for k in ("question", "answer"):
        if not isinstance(rec[k], str):
            raise BadRecord(f"{k!r} must be a string, got {type(rec[k]).__name__}")
    if "####" not in rec["answer"]:
        raise BadRecord(f"the answer has no '#### <number>' final line: {rec['answer'][-80:]!r}")
    return dict(question=rec["question"], answer=rec["answer"])


PARSERS = {"arc_easy": arc_doc, "arc_challenge": arc_doc, "hellaswag": hellaswag_doc, "mmlu": mmlu_doc,
           "gsm8k": gsm8k_doc, "gsm8k_chat": gsm8k_doc}


def local_source(data_dir, name, split):
    """The local file (or directory) holding split of benchmark name under data_dir, or None."""
    base = os.path.join(data_dir, "gsm8k" if name == "gsm8k_chat" else name, split)
    if os.path.isdir(base):
        return base
    return next((base + ext for ext in BUILDERS if ext != ".txt" and os.path.isfile(base + ext)), None)


def load_split(name, split, data_dir="", limit=None):
    """The documents of one split of a benchmark, from local files under data_dir ("" = the hub dataset).
    limit keeps the first limit documents. Raises DataError if the data cannot be found or opened, BadRecord
    for a record outside the schema."""
    hub, config = BENCHMARKS[name][:2]
    if data_dir:
        source = local_source(data_dir, name, split)
        if source is None:
            raise DataError(f"{name}: no local {split} split under {data_dir}: expected "
                            f"{os.path.join(data_dir, 'gsm8k' if name == 'gsm8k_chat' else name, split)}.jsonl "
                            f"(or .json/.parquet, or a directory of them) in {hub}'s schema")
        rows = iter_records(source)
    else:
        rows = iter_records(hub, split=split, config=config)
    docs = []
    for doc in read_records(rows, PARSERS[name]):
        docs.append(doc)
        if limit is not None and len(docs) >= limit:
            break
    if not docs:
        raise DataError(f"{name}: the {split} split has no documents")
    return docs


def load_benchmark(name, data_dir="", num_fewshot=None, limit=None):
    """dict(docs, pool, k): the evaluation documents of a benchmark (the first limit of them; MMLU: the first
    limit of each subject, as lm-eval's --limit does, each subject being a task there), the few-shot pool
    (empty for 0-shot) and the number of shots (None: the benchmark's default)."""
    split, fewshot_split, default_k = BENCHMARKS[name][2:]
    k = default_k if num_fewshot is None or fewshot_split is None else num_fewshot
    if name == "mmlu":
        docs, per_subject = [], {}
        for d in load_split(name, split, data_dir):
            per_subject[d["subject"]] = per_subject.get(d["subject"], 0) + 1
            if limit is None or per_subject[d["subject"]] <= limit:
                docs.append(d)
    else:
        docs = load_split(name, split, data_dir, limit)
    pool = load_split(name, fewshot_split, data_dir) if k > 0 else []
    return dict(docs=docs, pool=pool, k=k)


# -----------------------------------------------------------------------------
# prompts


def fewshot_examples(docs, pool, k, exclude_self=False, seed=FEWSHOT_SEED):
    """For each doc (in order), the k few-shot documents lm-eval's default sampler gives it: drawn from pool with
    one random.Random(seed) consumed over the docs in order. exclude_self (lm-eval does it for HellaSwag, whose
    task has no test split, so its few-shot split "equals" it): draw k + 1, drop the doc itself, keep k."""
    if k == 0:
        return [[] for _ in docs]
    if len(pool) < k + exclude_self:
        raise DataError(f"{k}-shot needs at least {k + exclude_self} few-shot documents, the few-shot split has "
                        f"{len(pool)}")
    rnd = random.Random(seed)
    out = []
    for d in docs:
        if not exclude_self:
            out.append(rnd.sample(pool, k))
            continue
        shots = [s for s in rnd.sample(pool, k + 1) if s != d][:k]
        if len(shots) < k:  # the doc occurs more than once in the pool: draw from the pool without it
            shots = rnd.sample([s for s in pool if s != d], k)
        out.append(shots)
    return out


def mmlu_description(subject):
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def multiple_choice_context(doc, shots, description=""):
    """The context string of a multiple-choice doc after its few-shot docs; the continuations are
    [" " + choice for choice in doc["choices"]]."""
    solved = "".join(f"{s['query']} {s['choices'][s['gold']]}\n\n" for s in shots)
    return description + solved + doc["query"]


def multiple_choice_prompts(name, docs, fewshot_pool=(), k=0):
    """(context, continuations) per doc of a multiple-choice benchmark, k-shot from fewshot_pool. MMLU: per
    subject, its description and the first k dev docs of that subject."""
    if name == "mmlu":
        by_subject = {}
        for d in fewshot_pool:
            by_subject.setdefault(d["subject"], []).append(d)
        out = []
        for d in docs:
            pool = by_subject.get(d["subject"], [])
            if len(pool) < k:
                raise DataError(f"mmlu: {k}-shot needs {k} dev documents of subject {d['subject']!r}, the dev split "
                                f"has {len(pool)}; lower num_fewshot or give the whole dev split")
            shots = pool[:k]  # lm-eval's first_n sampler
            out.append((multiple_choice_context(d, shots, mmlu_description(d["subject"])),
                        [" " + c for c in d["choices"]]))
        return out
    shots = fewshot_examples(docs, list(fewshot_pool), k, exclude_self=name == "hellaswag")
    return [(multiple_choice_context(d, s), [" " + c for c in d["choices"]]) for d, s in zip(docs, shots)]


def gsm8k_prompts(docs, fewshot_pool=(), k=5):
    """lm-eval gsm8k's k-shot prompts: solved "Question: ...\nAnswer: <reference solution>" examples, then
    the question."""
    shots = fewshot_examples(docs, list(fewshot_pool), k)
    return ["".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in ex)
            + f"Question: {d['question']}\nAnswer:" for d, ex in zip(docs, shots)]


def gsm8k_chat_messages(doc, system=""):
    """gsm8k_chat: the question as the user turn (after an optional system message)."""
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": doc["question"]}]


# -----------------------------------------------------------------------------
# GSM8K answers: lm-eval's filters and exact_match

STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
IGNORE = (",", "\\$", "(?s).*#### ", "\\.$")  # exact_match's regexes_to_ignore, applied in this order
FALLBACK = "[invalid]"


def regex_filter(text, pattern, group_select=0):
    """lm-eval's RegexFilter: the group_select-th match of pattern (for several groups, the first non-empty
    one), stripped; "[invalid]" when nothing matches."""
    matches = pattern.findall(text)
    if not matches:
        return FALLBACK
    m = matches[group_select]
    if isinstance(m, tuple):
        m = next((g for g in m if g), FALLBACK)
    return m.strip()


def normalise_answer(text):
    """exact_match's preparation of both sides: drop the ignored regexes, lower-case."""
    for pattern in IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower()


def gsm8k_score(completion, reference):
    """dict(strict, flexible): whether each filter's answer equals the reference solution's, and the answers."""
    ref = normalise_answer(reference)
    strict = regex_filter(completion, STRICT)
    flexible = regex_filter(completion, FLEXIBLE, group_select=-1)
    return dict(strict=normalise_answer(strict) == ref, flexible=normalise_answer(flexible) == ref,
                strict_answer=strict, flexible_answer=flexible)
