"""
The bundled task family: small questions with exactly checkable answers.

SFT trains on them, the reward model and DPO learn from (correct, wrong) pairs
of them, and GRPO uses `is_correct` as its verifiable reward. Everything is
generated from a seed, so no download is needed and runs are reproducible.

Tasks (answers are short, so a tiny CPU model can learn them in minutes):
  add      "What is 37 + 58?"                       -> "95"
  reverse  "Reverse the letters: q w e r"           -> "r e w q"
  sort     "Sort the digits: 5 1 8 3"               -> "1 3 5 8"
  count    "How many times does x appear in: x b x" -> "2"
  max      "Which is largest: 41, 7, 63?"           -> "63"
Letters and digits are space-separated so each one is its own token.

Train and test are disjoint by content, by construction: a question belongs to the test
split iff a hash of its content falls in the test bucket, whichever seed generated it. The
content is order-free (the two operands of add, the multiset of digits to sort or letters
to count with the letter counted, the set of letters to reverse or numbers to compare), so
"What is 58 + 37?" in training never gives away the test question "What is 37 + 58?".
Scoring parses the answer out of the model's text and compares strings; it never
executes or evaluates model output.
"""

import hashlib
import random
import re

TASKS = ("add", "reverse", "sort", "count", "max")
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _make(task, rng):
    """(prompt, answer, key): key is the question's content, the same for every question that is the same
    question in another order (37 + 58 and 58 + 37; the same digits to sort, letters to reverse, numbers
    to compare, or letters to count, in any order)."""
    if task == "add":
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return f"What is {a} + {b}?", str(a + b), f"add {min(a, b)} {max(a, b)}"
    if task == "reverse":
        s = rng.sample(LETTERS, rng.randint(3, 6))
        return f"Reverse the letters: {' '.join(s)}", " ".join(reversed(s)), "reverse " + "".join(sorted(s))
    if task == "sort":
        d = [str(rng.randint(0, 9)) for _ in range(rng.randint(3, 6))]
        return f"Sort the digits: {' '.join(d)}", " ".join(sorted(d)), "sort " + "".join(sorted(d))
    if task == "count":
        target = rng.choice(LETTERS[:6])
        s = [rng.choice(LETTERS[:6]) for _ in range(rng.randint(4, 8))]
        return (f"How many times does {target} appear in: {' '.join(s)}", str(s.count(target)),
                f"count {target} in " + "".join(sorted(s)))
    if task == "max":
        nums = [rng.randint(0, 99) for _ in range(3)]
        return (f"Which is largest: {', '.join(map(str, nums))}?", str(max(nums)),
                "max " + " ".join(map(str, sorted(set(nums)))))
    raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")


def in_test_split(key, test_fraction=0.1):
    """Whether a question, by its content key (see _make), is in the test split."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    return h % 10_000 < test_fraction * 10_000


def generate(n, split="train", seed=0, tasks=TASKS, test_fraction=0.1):
    """n examples dict(task, prompt, answer) of the given split ("train" or "test"), round-robin over tasks.
    Duplicates within a split are allowed for train (as in any sampled dataset), not for test: no two test
    questions are the same question in another order."""
    assert split in ("train", "test"), f"split must be 'train' or 'test', got {split!r}"
    rng = random.Random(f"{split}-{seed}")
    out, seen = [], set()
    i = 0
    while len(out) < n:
        task = tasks[len(out) % len(tasks)]  # the same number of questions of each task
        i += 1
        prompt, answer, key = _make(task, rng)
        if in_test_split(key, test_fraction) != (split == "test"):
            continue
        if split == "test":
            if key in seen:
                if i > 1000 * n:
                    raise ValueError(f"cannot draw {n} distinct test questions from tasks {tasks}")
                continue
            seen.add(key)
        out.append(dict(task=task, prompt=prompt, answer=answer))
    return out


def to_messages(example, system=None):
    """The chat form used by every stage: user question, assistant answer."""
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": example["prompt"]},
                   {"role": "assistant", "content": example["answer"]}]


def extract_answer(text):
    """The model's answer: the text after a closing </think> if there is one, else all of it;
    first line, whitespace collapsed."""
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    text = text.strip().split("\n")[0] if text.strip() else ""
    return re.sub(r"\s+", " ", text).strip()


def is_correct(example, completion):
    return extract_answer(completion) == example["answer"]


def wrong_answer(example, rng):
    """A plausible wrong answer of the same form (the 'rejected' side of a preference pair)."""
    task, ans = example["task"], example["answer"]
    for _ in range(100):
        if task in ("add", "max", "count"):
            cand = str(max(0, int(ans) + rng.choice([-10, -2, -1, 1, 2, 10])))
        else:
            items = ans.split(" ")
            if task == "reverse" and rng.random() < 0.5:
                items = items[::-1]  # the unreversed input: a typical mistake
            elif len(set(items)) == 1:  # "5 5 5": no swap changes it, so get one item wrong
                alphabet = "0123456789" if task == "sort" else LETTERS
                items[rng.randrange(len(items))] = rng.choice([c for c in alphabet if c != items[0]])
            else:
                i, j = rng.sample(range(len(items)), 2)
                items[i], items[j] = items[j], items[i]
            cand = " ".join(items)
        if cand != ans:
            return cand
    raise ValueError(f"could not make a wrong answer for {example}")


def exact_match(model, tokenizer, examples, max_new_tokens=32, batch_size=128, system=None, rank=0, world_size=1,
                score=None):
    """Greedy exact-match accuracy of a (unwrapped) Transformer on task examples: (overall, {task: acc}).
    The reply is generated from the chat prompt and stops at <|im_end|>. With world_size > 1 each rank
    answers examples[rank::world_size] and the counts are summed over ranks (every rank must call this).
    score(example, reply) -> bool defaults to is_correct (GSM8K passes its own #### check)."""
    import torch
    from data.chat import render_prompt
    from distributed import fsdp_gathered
    score = score or is_correct
    names = sorted({ex["task"] for ex in examples})
    device = next(model.parameters()).device
    counts = torch.zeros(2, len(names), dtype=torch.float64, device=device)  # correct, total per task
    mine = examples[rank::world_size]
    prompts = [render_prompt(to_messages(ex, system), tokenizer) for ex in mine]
    was_training = model.training
    model.eval()
    with torch.no_grad(), fsdp_gathered(model):
        for i in range(0, len(mine), batch_size):
            budget = min(max_new_tokens, model.config.max_seq_len - max(map(len, prompts[i:i + batch_size])))
            out = model.generate(prompts[i:i + batch_size], budget, temperature=0.0,
                                 stop_tokens=tokenizer.stop_ids, pad_id=tokenizer.pad_id)
            for ex, toks, n in zip(mine[i:i + batch_size], out["tokens"].tolist(), out["lengths"].tolist()):
                reply = tokenizer.decode_reply(toks[:n])
                counts[0, names.index(ex["task"])] += score(ex, reply)
                counts[1, names.index(ex["task"])] += 1
    model.train(was_training)
    if world_size > 1:
        torch.distributed.all_reduce(counts)
    per_task = {t: (counts[0, j] / counts[1, j].clamp(min=1)).item() for j, t in enumerate(names)}
    return (counts[0].sum() / counts[1].sum().clamp(min=1)).item(), per_task
