"""
Rule-based (verifiable) rewards for GRPO, registered by name, and the GSM8K loader.

A reward function takes (example, completion) -> float, where example is a dict with at
least "prompt" and "answer" (data/tasks.py examples, or GSM8K ones from load_gsm8k) and
completion is the decoded model text (without the closing <|im_end|>). grpo.py picks them
by name from its config: reward_funcs = ("exact", "format"), reward_weights = (1.0, 0.5).

  exact   1 if the answer is right: data.tasks.is_correct for the bundled tasks, the GSM8K
          "#### <number>" match for GSM8K examples (so one config key serves both datasets)
  format  1 if the completion is "<think>...</think>" followed by a non-empty answer (R1-style)
  gsm8k   1 if the number after the last "####" equals the reference number

Verifiers only parse strings: model text is never executed or evaluated.

GSM8K (openai/gsm8k, config "main") records are {"question": str, "answer": str}, where the
answer is a worked solution ending in "#### 72". load_gsm8k reads them from the Hugging
Face hub through `datasets`, or from local .jsonl/.json/.parquet files (or a directory of them) with
that schema, through data/records.py: a bad record or line is named by file and record, or skipped
and counted with skip_bad.
"""

import re
from decimal import Decimal

from data import tasks
from data.chat import BadRecord
from data.records import DataError, iter_records, local_files, read_records

# -----------------------------------------------------------------------------
# GSM8K answers

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def parse_number(text):
    """The first number in text as a canonical string ("1,234.50" -> "1234.5", "$72.00" -> "72"), or None."""
    m = _NUMBER.search(text.replace("$", ""))
    if m is None:
        return None
    d = Decimal(m.group(0).replace(",", ""))
    return "0" if d == 0 else f"{d.normalize():f}"


def extract_hash_answer(text):
    """The number after the last "####" in text (GSM8K's final-answer marker), or None if there is none."""
    if "####" not in text:
        return None
    return parse_number(text.rsplit("####", 1)[1])


def gsm8k_example(record):
    """One GSM8K record {"question", "answer"} -> dict(task="gsm8k", prompt, answer=final number, solution).
    Raises BadRecord."""
    if not isinstance(record, dict) or record.get("question") is None or record.get("answer") is None:
        keys = (sorted(k for k, v in record.items() if v is not None) if isinstance(record, dict)
                else type(record).__name__)
        raise BadRecord(f"expected keys 'question' and 'answer' (the openai/gsm8k schema), got {keys}")
    for key in ("question", "answer"):
        if not isinstance(record[key], str):
            raise BadRecord(f"{key!r} must be a string, got {type(record[key]).__name__}: {record[key]!r:.80}")
    if not record["question"].strip():
        raise BadRecord("the question is empty")
    final = extract_hash_answer(record["answer"])
    if final is None:
        raise BadRecord(f"the answer has no '#### <number>' final line: {record['answer'][-80:]!r}")
    return dict(task="gsm8k", prompt=record["question"].strip(), answer=final, solution=record["answer"])


def load_gsm8k(split="train", path=None, skip_bad=False, log=print, return_counts=False):
    """GSM8K examples. path: local .jsonl / .json / .parquet file(s) with the openai/gsm8k schema (a file, a
    directory of them, a glob or a comma-separated list; see data/records.py); None: openai/gsm8k "main"
    from the hub via `datasets` (needs network or a warm HF cache). A malformed record stops with a BadRecord
    naming the file and record; with skip_bad it is skipped, and the number skipped is logged.
    return_counts=True also returns dict(read, skipped, examples): (examples, counts)."""
    if path:
        if local_files(path) is None:  # a name that is no local path would be taken for a hub dataset
            raise FileNotFoundError(f"GSM8K data path {path!r} does not exist; give .jsonl/.json/.parquet "
                                    f"file(s) with 'question' and 'answer' fields, or a directory of them")
        rows, name = iter_records(path), path
    else:
        import datasets
        name = f"openai/gsm8k[{split}]"
        try:
            ds = datasets.load_dataset("openai/gsm8k", "main", split=split)
        except Exception as e:  # noqa: BLE001
            raise DataError(f"could not load openai/gsm8k (config 'main', split {split!r}): {e}\n"
                            f"Without network, give local files with data_path=PATH") from e
        rows = ((name, i, r) for i, r in enumerate(ds))
    counts = {}
    examples = list(read_records(rows, gsm8k_example, skip_bad, counts))
    counts["examples"] = len(examples)
    if counts["skipped"]:
        log(f"skipped {counts['skipped']} malformed GSM8K record(s) of {counts['read']} in {name} (skip_bad=True)")
    if not examples:
        raise DataError(f"{name}: no usable GSM8K records ({counts['read']} read, {counts['skipped']} malformed "
                        f"and skipped)")
    return (examples, counts) if return_counts else examples


# -----------------------------------------------------------------------------
# reward functions

def is_correct(example, completion):
    """The dataset's own exact-answer check: GSM8K's #### number, else the bundled tasks' checker."""
    if example.get("task") == "gsm8k":
        return gsm8k_reward(example, completion) == 1.0
    return tasks.is_correct(example, completion)


def exact_reward(example, completion):
    return 1.0 if is_correct(example, completion) else 0.0


_FORMAT = re.compile(r"\s*<think>(?:(?!</?think>).)*</think>\s*\S.*", re.DOTALL)


def format_reward(example, completion):
    """1 for one <think>...</think> block at the start followed by a non-empty answer, else 0."""
    return 1.0 if _FORMAT.fullmatch(completion) and completion.count("</think>") == 1 else 0.0


def gsm8k_reward(example, completion):
    got = extract_hash_answer(completion)
    return 1.0 if got is not None and got == parse_number(example["answer"]) else 0.0


REWARD_FUNCS = {"exact": exact_reward, "format": format_reward, "gsm8k": gsm8k_reward}


def get_reward_funcs(names):
    unknown = [n for n in names if n not in REWARD_FUNCS]
    if unknown:
        raise ValueError(f"unknown reward function(s) {unknown}: choose from {sorted(REWARD_FUNCS)} "
                         f"(a learned reward model is configured with reward_model=PATH instead)")
    return [REWARD_FUNCS[n] for n in names]
