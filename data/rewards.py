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
Face hub through `datasets`, or from a local .jsonl/.json/.parquet file with that schema.
"""

import json
import os
import re
from decimal import Decimal

from data import tasks

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


def gsm8k_example(record, where="record"):
    """One GSM8K record {"question", "answer"} -> dict(task="gsm8k", prompt, answer=final number, solution)."""
    if not isinstance(record, dict) or "question" not in record or "answer" not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"GSM8K {where}: expected keys 'question' and 'answer' (openai/gsm8k schema), got {keys}")
    final = extract_hash_answer(record["answer"])
    if final is None:
        raise ValueError(f"GSM8K {where}: the answer has no '#### <number>' final line: {record['answer'][-80:]!r}")
    return dict(task="gsm8k", prompt=record["question"].strip(), answer=final, solution=record["answer"])


def load_gsm8k(split="train", path=None):
    """GSM8K examples. path: a local .jsonl / .json / .parquet file with the openai/gsm8k schema;
    None: openai/gsm8k "main" from the hub via `datasets` (needs network or a warm HF cache)."""
    if path:
        if not os.path.exists(path):
            raise FileNotFoundError(f"GSM8K file {path} not found")
        if path.endswith(".jsonl"):
            with open(path) as f:
                rows = []
                for i, line in enumerate(f):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise ValueError(f"{path} line {i + 1}: not valid JSON ({e.msg})") from None
        else:
            import datasets
            kind = "parquet" if path.endswith(".parquet") else "json"
            rows = list(datasets.load_dataset(kind, data_files=path, split="train"))
        where = lambda i: f"{path} record {i}"
    else:
        import datasets
        rows = list(datasets.load_dataset("openai/gsm8k", "main", split=split))
        where = lambda i: f"openai/gsm8k[{split}] record {i}"
    return [gsm8k_example(r, where(i)) for i, r in enumerate(rows)]


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
