"""The task family (data/tasks.py): its held-out split shares no question with training, by content."""

import re
from collections import Counter

from data import tasks


def content(task, prompt):
    """What a question asks, read back from its text: equal for the same question in another order."""
    if task == "add":
        return Counter(map(int, re.fullmatch(r"What is (\d+) \+ (\d+)\?", prompt).groups()))
    if task == "reverse":
        return set(prompt.split(": ", 1)[1].split(" "))
    if task == "sort":
        return Counter(prompt.split(": ", 1)[1].split(" "))
    if task == "count":
        target, letters = re.fullmatch(r"How many times does (\w) appear in: (.*)", prompt).groups()
        return target, Counter(letters.split(" "))
    assert task == "max"
    return set(map(int, re.fullmatch(r"Which is largest: (.*)\?", prompt).group(1).split(", ")))


def test_task_split_is_disjoint_by_content():
    test = tasks.generate(250, "test", seed=0)
    train = tasks.generate(3000, "train", seed=0) + tasks.generate(3000, "train", seed=1)
    train_by_task = {}
    for ex in train:
        train_by_task.setdefault(ex["task"], []).append(content(ex["task"], ex["prompt"]))
    # naive: compare every test question with every training question of its task
    leaks = [ex["prompt"] for ex in test
             if any(content(ex["task"], ex["prompt"]) == c for c in train_by_task[ex["task"]])]
    assert leaks == []
    # no two test questions are the same question either, and every task is there
    seen = [(ex["task"], content(ex["task"], ex["prompt"])) for ex in test]
    assert all(seen[i] != seen[j] for i in range(len(seen)) for j in range(i))
    assert Counter(ex["task"] for ex in test) == {t: 50 for t in tasks.TASKS}  # round-robin
    # the check can fail: the same question in another order is found
    ex = next(ex for ex in test if ex["task"] == "add")
    a, b = re.findall(r"\d+", ex["prompt"])
    assert content("add", f"What is {b} + {a}?") == content("add", ex["prompt"])
    assert content("sort", "Sort the digits: 3 1 3") == content("sort", "Sort the digits: 1 3 3")
    question = "How many times does {} appear in: a b a c"
    assert content("count", question.format("a")) != content("count", question.format("b"))


def test_answers():
    """Each answer recomputed from the question text."""
    for ex in tasks.generate(100, "train", seed=2) + tasks.generate(100, "test", seed=2):
        items = ex["prompt"].split(": ", 1)[-1].rstrip("?").replace(",", "").split(" ")
        if ex["task"] == "add":
            want = str(sum(map(int, re.findall(r"\d+", ex["prompt"]))))
        elif ex["task"] == "reverse":
            want = " ".join(items[::-1])
        elif ex["task"] == "sort":
            want = " ".join(sorted(items))
        elif ex["task"] == "count":
            want = str(items.count(re.match(r"How many times does (\w)", ex["prompt"]).group(1)))
        else:
            want = str(max(map(int, items)))
        assert ex["answer"] == want, ex
