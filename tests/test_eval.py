"""eval.py and data/benchmarks.py: prompts against lm-evaluation-harness's formats and its own task code, accuracies
hand-computed on a model whose logits the test controls, log-likelihood positions and bits per byte against naive
recomputation, generation against a naive greedy loop, the script end to end and under torchrun."""

import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, run_script, tiny_config

import eval as ev
from data import benchmarks as bm
from data.tokenizer import get_tokenizer


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer("default")


# -----------------------------------------------------------------------------
# a few rows in each hub dataset's real schema (never downloaded)

ARC = [dict(id="Mercury_7175875", question="Which gas do plants take in from the air to make food?",
            choices=dict(text=["oxygen", "carbon dioxide", "nitrogen", "helium"], label=["A", "B", "C", "D"]),
            answerKey="B"),
       dict(id="MCAS_2000_4_6", question="What is the boiling point of water at sea level?",
            choices=dict(text=["50 C", "100 C", "150 C"], label=["1", "2", "3"]), answerKey="2"),
       dict(id="NYSEDREGENTS_2015_8_27", question="Which of these is a mammal?",
            choices=dict(text=["shark", "whale", "trout", "eel"], label=["A", "B", "C", "D"]), answerKey="B")]
HELLASWAG = [dict(ind=4, activity_label="Food and Entertaining", ctx_a="[header] How to make tea [title] Boil water.",
                  ctx_b="then", ctx="[header] How to make tea [title] Boil water. then",
                  endings=["[step] Pour the water into a cup.", "fly to the moon.", "sing a song.", "eat the kettle."],
                  source_id="wikihow~1", split="val", split_type="indomain", label="0"),
             dict(ind=9, activity_label="Rock climbing", ctx_a="A woman climbs a wall.", ctx_b="she",
                  ctx="A woman climbs a wall. she", endings=["reaches the top.", "swims away.", "bakes bread.",
                                                             "reads a book."],
                  source_id="activitynet~v_1", split="val", split_type="zeroshot", label="0"),
             dict(ind=11, activity_label="Baking cookies", ctx_a="A man mixes dough in a bowl.", ctx_b="he",
                  ctx="A man mixes dough in a bowl. he", endings=["puts the tray in the oven.", "drives a car.",
                                                                  "paints a wall.", "climbs a tree."],
                  source_id="activitynet~v_2", split="val", split_type="indomain", label="0")]
MMLU = [dict(question="What is the largest bone in the human body? ", subject="anatomy",
             choices=["Femur", "Tibia", "Humerus", "Skull"], answer=0),
        dict(question="Which organ pumps blood?", subject="anatomy", choices=["Lung", "Heart", "Liver", "Kidney"],
             answer=1),
        dict(question="How many chambers does the human heart have?", subject="anatomy",
             choices=["Two", "Three", "Four", "Five"], answer=2)]
GSM8K = [dict(question=f"Tom has {a} apples and buys {b} more. How many apples does he have?",
              answer=f"He has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}")
         for a, b in ((3, 4), (10, 5), (7, 8), (2, 2), (1, 9), (6, 6), (12, 30))]


def write_bench(root, skip=()):
    """{root}/{name}/{split}.jsonl in the hub schemas (the few-shot splits reuse the rows)."""
    files = dict(arc_easy=dict(test=ARC, train=ARC), arc_challenge=dict(test=ARC, train=ARC),
                 hellaswag=dict(validation=HELLASWAG, train=HELLASWAG), mmlu=dict(test=MMLU, dev=MMLU),
                 gsm8k=dict(test=GSM8K[:4], train=GSM8K))
    for name, splits in files.items():
        if name in skip:
            continue
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for split, rows in splits.items():
            with open(os.path.join(root, name, f"{split}.jsonl"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(root)


# -----------------------------------------------------------------------------
# prompts


def test_prompts_are_lm_evals_formats(tmp_path):
    root = write_bench(tmp_path)
    arc = bm.load_benchmark("arc_easy", root)
    ctx, conts = bm.multiple_choice_prompts("arc_easy", arc["docs"], arc["pool"], arc["k"])[1]
    assert arc["k"] == 0 and ctx == "Question: What is the boiling point of water at sea level?\nAnswer:"
    assert conts == [" 50 C", " 100 C", " 150 C"] and arc["docs"][1]["gold"] == 1  # answerKey "2" of labels 1..3

    hs = bm.load_benchmark("hellaswag", root)
    ctx, conts = bm.multiple_choice_prompts("hellaswag", hs["docs"], hs["pool"], 0)[0]
    assert ctx == "Food and Entertaining: How to make tea. Boil water. Then"  # [title] -> ". ", [header] dropped
    assert conts == ["  Pour the water into a cup.", " fly to the moon.", " sing a song.", " eat the kettle."]

    mmlu = bm.load_benchmark("mmlu", root, num_fewshot=1)
    ctx, conts = bm.multiple_choice_prompts("mmlu", mmlu["docs"], mmlu["pool"], 1)[1]
    assert ctx == ("The following are multiple choice questions (with answers) about anatomy.\n\n"
                   "What is the largest bone in the human body?\nA. Femur\nB. Tibia\nC. Humerus\nD. Skull\nAnswer: A"
                   "\n\nWhich organ pumps blood?\nA. Lung\nB. Heart\nC. Liver\nD. Kidney\nAnswer:")
    assert conts == [" A", " B", " C", " D"] and mmlu["docs"][1]["gold"] == 1

    g = bm.load_benchmark("gsm8k", root)
    assert g["k"] == 5 and len(g["pool"]) == 7
    one_shot = bm.gsm8k_prompts(g["docs"][:1], GSM8K[6:], 1)[0]
    assert one_shot == (f"Question: {GSM8K[6]['question']}\nAnswer: {GSM8K[6]['answer']}\n\n"
                        f"Question: {GSM8K[0]['question']}\nAnswer:")


def test_bad_record_is_named_and_missing_split_says_where(tmp_path):
    root = write_bench(tmp_path)
    with open(os.path.join(root, "mmlu", "test.jsonl"), "a") as f:
        f.write(json.dumps(dict(question="q", subject="anatomy", choices=["a", "b", "c", "d"], answer="B")) + "\n")
    with pytest.raises(ValueError, match=r"test.jsonl: record 3: 'answer' must be an int"):
        bm.load_benchmark("mmlu", root)
    with pytest.raises(bm.DataError, match=r"hellaswag/validation.jsonl"):
        bm.load_benchmark("hellaswag", str(tmp_path / "nowhere"))


def test_prompts_equal_lm_evals_own_task_code(tmp_path):
    """The (context, continuation) requests lm-eval builds from its own task yaml files on the same rows,
    few-shot examples included (its seeded random sampler, MMLU's first_n), and its GSM8K filters and metric."""
    pytest.importorskip("lm_eval", reason="lm-eval is the test-time reference: pip install lm-eval")
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.filters.extraction import RegexFilter
    from lm_eval.api.metrics import exact_match_hf_evaluate
    import lm_eval
    from lm_eval.tasks._yaml_loader import load_yaml
    root = write_bench(tmp_path)
    tasks_dir = os.path.join(os.path.dirname(lm_eval.__file__), "tasks")
    cases = [("arc_easy", "arc/arc_easy.yaml", dict(train="train", test="test"), 2),
             ("arc_challenge", "arc/arc_challenge.yaml", dict(train="train", test="test"), 1),
             ("hellaswag", "hellaswag/hellaswag.yaml", dict(train="train", validation="validation"), 2),
             ("mmlu", "mmlu/default/mmlu_anatomy.yaml", dict(dev="dev", test="test"), 2),
             ("gsm8k", "gsm8k/gsm8k.yaml", dict(train="train", test="test"), 5)]
    for name, yaml_path, splits, k in cases:
        cfg = load_yaml(os.path.join(tasks_dir, yaml_path))
        cfg.update(dataset_path="json", dataset_name=None, num_fewshot=k, dataset_kwargs=dict(
            data_files={s: os.path.join(root, name, f"{f}.jsonl") for s, f in splits.items()},
            cache_dir=str(tmp_path / "hf_cache")))
        cfg.pop("tag", None)
        task = ConfigurableTask(config=cfg)
        task.set_fewshot_seed(1234)  # what lm_eval.simple_evaluate does (fewshot_random_seed)
        task.build_all_requests(rank=0, world_size=1)
        d = bm.load_benchmark(name, root, num_fewshot=k)
        if name == "gsm8k":
            theirs = [inst.args for inst in task.instances]
            ours = bm.gsm8k_prompts(d["docs"], d["pool"], d["k"])
            assert [c for c, _ in theirs] == ours
            assert tuple(theirs[0][1]["until"]) == bm.GSM8K_STOP
            filters = {f["name"]: f["filter"][0] for f in cfg["filter_list"]}
            assert filters["strict-match"]["regex_pattern"] == bm.STRICT.pattern
            assert filters["flexible-extract"]["regex_pattern"] == bm.FLEXIBLE.pattern
            metric = cfg["metric_list"][0]
            assert tuple(metric["regexes_to_ignore"]) == bm.IGNORE and metric["ignore_case"]
            strict = RegexFilter(bm.STRICT.pattern)
            flexible = RegexFilter(bm.FLEXIBLE.pattern, group_select=-1)
            ref = GSM8K[1]["answer"]
            for text in ["He has 15 apples.\n#### 15", "So $1,5 and then 15.", "#### 1,5.", "no number", "-3 or 15"]:
                want = {n: bool(exact_match_hf_evaluate([f.apply([[text]], None)[0][0]], [ref], ignore_case=True,
                                                        regexes_to_ignore=metric["regexes_to_ignore"])["exact_match"])
                        for n, f in (("strict", strict), ("flexible", flexible))}
                got = bm.gsm8k_score(text, ref)
                assert (got["strict"], got["flexible"]) == (want["strict"], want["flexible"]), text
        else:
            theirs = [inst.args for inst in task.instances]
            ours = [(c, cont) for c, conts in bm.multiple_choice_prompts(name, d["docs"], d["pool"], d["k"])
                    for cont in conts]
            assert theirs == ours, name


def test_gsm8k_filters_by_hand():
    ref = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nShe sold 48+24 = <<48+24=72>>72 clips.\n#### 72"
    cases = {"She sold 72 clips.\n#### 72": (True, True),
             "#### 72.": (True, True),                       # strict takes "72." and the trailing "." is ignored
             "In all $72.": (False, True),                   # no "####": flexible's last number "$72." -> "72"
             "72 clips, then 5 more": (False, False),        # flexible takes the last number, 5
             "#### 7,2": (True, True),                       # commas are ignored on both sides
             "#### -72": (False, False),
             "nothing": (False, False)}
    for text, want in cases.items():
        got = bm.gsm8k_score(text, ref)
        assert (got["strict"], got["flexible"]) == want, (text, got)
    assert bm.gsm8k_score("nothing", ref)["strict_answer"] == "[invalid]"


def test_encode_choices_moves_the_trailing_space(tok):
    ctx, conts = ev.encode_choices(tok, "Question: Which?\nAnswer: ", ["carbon dioxide", "oxygen"], bos_id=None)
    assert ctx == tok.encode("Question: Which?\nAnswer:")
    for c, text in zip(conts, ["carbon dioxide", "oxygen"]):
        assert ctx + c == tok.encode("Question: Which?\nAnswer: " + text)
        assert tok.decode(c) == " " + text
    ctx, conts = ev.encode_choices(tok, "Answer:", [" dog"], bos_id=tok.bos_id)
    assert ctx == [tok.bos_id] + tok.encode("Answer:") and conts == [tok.encode(" dog")]
    assert ev.encode_choices(tok, "", [" dog"], bos_id=tok.bos_id) == ([tok.bos_id], [tok.encode(" dog")])


# -----------------------------------------------------------------------------
# scoring, on a model whose logits the test sets


class StubLM(torch.nn.Module):
    """The logits at a position are table[input token % R]: a closed form for every log-likelihood. It has the
    interface eval.py uses: config, forward(idx, return_hidden=True) -> (hidden, None), lm_head."""

    def __init__(self, table, max_seq_len=256):
        super().__init__()
        R, V = table.shape
        self.config = SimpleNamespace(max_seq_len=max_seq_len, vocab_size=V, logit_softcap=None)
        self.lm_head = torch.nn.Linear(R, V, bias=False)
        self.lm_head.weight.data = table.t().contiguous()
        self.rows = 0

    def forward(self, idx, targets=None, return_hidden=False, **kw):
        self.rows += idx.shape[0]
        h = F.one_hot(idx % self.lm_head.in_features, self.lm_head.in_features).float()
        return (h, None) if return_hidden else (self.lm_head(h), None)


def test_multiple_choice_accuracy_hand_computed(tok):
    V = tok.vocab_size
    lnV = math.log(V)
    u = torch.zeros(1, V)  # the same logits everywhere: uniform, except " dog" (tokens 626, 103) made likely
    u[0, tok.encode(" dog")] = 5.0
    model = StubLM(u)
    logp = F.log_softmax(u[0], -1)
    docs = [dict(query="Question: Which animal barks?\nAnswer:", choices=["cat", "dog"], gold=1),
            dict(query="Question: Which animal meows?\nAnswer:", choices=["cat", "dog", "bird"], gold=0),
            # uniform tokens: " a" is 1 token (acc picks it), " a longer ending" 3 tokens over 15 characters
            # (acc_norm picks it: -3 lnV / 15 > -lnV / 1)
            dict(query="A man", choices=["a", "a longer ending"], gold=1)]
    prompts = [(d["query"], [" " + c for c in d["choices"]]) for d in docs]
    got = ev.score_multiple_choice(model, tok, prompts, [d["choices"] for d in docs], bos=True, batch_size=2)
    assert [g["pred"] for g in got] == [1, 1, 0] and [g["pred_norm"] for g in got] == [1, 1, 1]
    want_ll = sum(logp[t].item() for t in tok.encode(" dog"))
    assert got[0]["lls"][1] == pytest.approx(want_ll, abs=1e-5)
    assert got[2]["lls"] == pytest.approx([logp[270].item(), 3 * logp[270].item()], abs=1e-5)
    assert logp[270].item() == pytest.approx(-lnV - math.log1p(2 * (math.exp(5) - 1) / V), abs=1e-6)
    acc = sum(g["pred"] == d["gold"] for g, d in zip(got, docs)) / 3
    acc_norm = sum(g["pred_norm"] == d["gold"] for g, d in zip(got, docs)) / 3
    assert (acc, acc_norm) == (1 / 3, 2 / 3)


def test_loglikelihoods_score_the_continuation_positions(tok):
    torch.manual_seed(0)
    R = 61
    table = torch.randn(R, tok.vocab_size) * 3
    logp = F.log_softmax(table, -1)
    model = StubLM(table, max_seq_len=24)
    requests = []
    for ctx, conts in [("Question: Which gas do plants take in?\nAnswer:", [" oxygen", " carbon dioxide"]),
                       ("x " * 40, [" a b c", " d"]),  # longer than max_seq_len: left-truncated, as lm-eval
                       ("Answer: ", ["yes", "no"])]:
        c, cs = ev.encode_choices(tok, ctx, conts, tok.bos_id)
        requests += [(c, x) for x in cs]

    def naive(ctx, cont):  # position t predicts token t+1 from the token at t
        full = ctx + cont
        return sum(logp[full[len(ctx) + j - 1] % R, cont[j]].item() for j in range(len(cont)))

    want = [naive(c, x) for c, x in requests]
    for bs in (1, 3, 64):
        got = ev.loglikelihoods(model, requests, batch_size=bs)
        assert [g for g, _ in got] == pytest.approx(want, abs=1e-4)
    # MMLU-style: four one-token choices after one context are one row, one forward
    model.rows = 0
    c, cs = ev.encode_choices(tok, "Q?\nAnswer:", [" A", " B", " C", " D"], tok.bos_id)
    top = int(logp[c[-1] % R].argmax())  # the greedy next token, as a fifth one-token choice
    cs.append([top])
    got = ev.loglikelihoods(model, [(c, x) for x in cs], batch_size=8)
    assert model.rows == 1 and [g for g, _ in got] == pytest.approx([naive(c, x) for x in cs], abs=1e-5)
    assert [g for _, g in got] == [x == [top] for x in cs]


# -----------------------------------------------------------------------------
# generation and bits per byte, on a tiny random transformer


@pytest.fixture(scope="module")
def tiny_model():
    from model import Transformer
    torch.manual_seed(1)
    model = Transformer(tiny_config(max_seq_len=64)).eval()
    with torch.no_grad():  # larger weights than the init: greedy text that does not just repeat one token
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def test_generate_until_matches_naive_greedy_and_stops_early(tiny_model, tok):
    prompts = [tok.encode("def main():\n    return"), [tok.bos_id] + tok.encode("import os")]
    n = 24
    specials = {tok.token_id(s) for s in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>")}

    def naive(p):  # greedy by full recomputation, no cache
        ids = list(p)
        for _ in range(n):
            logits, _ = tiny_model(torch.tensor([ids]))
            ids.append(int(logits[0, -1].argmax()))
        return ids[len(p):]

    def text(ids):  # HF's decode(skip_special_tokens=True)
        return tok.decode([t for t in ids if t not in specials])

    full = [naive(p) for p in prompts]
    # a stop string from the middle of each row's greedy text: both rows stop early
    stops = [next(w for t in f[6:12] if t not in specials and (w := tok.decode([t]).strip()) and w.isascii())
             for f in full]
    calls = []
    orig = tiny_model.forward_cached
    tiny_model.forward_cached = lambda *a, **k: calls.append(1) or orig(*a, **k)
    try:
        got = ev.generate_until(tiny_model, tok, prompts, n, stop_strings=stops, batch_size=2)
    finally:
        del tiny_model.forward_cached
    want = [text(f).split(stops[0])[0].split(stops[1])[0] for f in full]
    assert got == want and all(len(g) < len(text(f)) for g, f in zip(got, full))
    assert len(calls) < n  # the batch stopped once both rows had hit a stop string
    # a stop token ends a row and is not part of the text
    first = full[1][5]
    got = ev.generate_until(tiny_model, tok, prompts[1:], n, stop_ids=[first])
    assert got == [text(full[1][:full[1].index(first)])]


def test_bits_per_byte_matches_naive(tiny_model, tok):
    import numpy as np
    docs = ["def f(x):\n    return x * 2\n", "Ünïcödé text: naïve café, 日本語.", "print('hello world')\n" * 3]
    ids = []
    for d in docs:
        ids += [tok.bos_id] + tok.encode(d)
    tokens = np.asarray(ids, dtype=np.int64)
    L = 16
    r = ev.loss_and_bpb(tiny_model, tokens, L, ev.token_byte_lengths(tok, tiny_model.config.vocab_size), batch_size=2)
    nats, n, text_nats, text_ids = 0.0, 0, 0.0, []
    for w in range((len(ids) - 1) // L):
        x = torch.tensor([ids[w * L:w * L + L + 1]])
        logits, _ = tiny_model(x[:, :-1])
        nll = -F.log_softmax(logits.double(), -1)[0].gather(1, x[0, 1:, None]).squeeze(1)
        for t, v in zip(x[0, 1:].tolist(), nll.tolist()):
            nats, n = nats + v, n + 1
            if t != tok.bos_id:
                text_nats += v
                text_ids.append(t)
    n_bytes = len(tok.decode_bytes(text_ids))
    assert r["tokens"] == n and r["bytes"] == n_bytes
    assert r["loss"] == pytest.approx(nats / n, rel=1e-5)
    assert r["bpb"] == pytest.approx(text_nats / math.log(2) / n_bytes, rel=1e-5)


# -----------------------------------------------------------------------------
# the script


def eval_args(tiny_ckpt, tmp_path, bench, **kw):
    corpus = tmp_path / "val.jsonl"
    corpus.write_text("".join(json.dumps(dict(text=f"def f{i}(x):\n    return x + {i}\n")) + "\n" for i in range(30)))
    args = dict(ckpt=tiny_ckpt, evals="val,tasks,arc_easy,arc_challenge,hellaswag,mmlu,gsm8k,gsm8k_chat",
                bench_data=bench, val_data=str(corpus), seq_len=32, tasks_size=10, max_new_tokens=8,
                out=str(tmp_path / "results.json"), report_dir=str(tmp_path / "report"), num_fewshot=1)
    args.update(kw)
    return ["eval.py"] + [f"--{k}={v}" for k, v in args.items()]


def test_eval_script_end_to_end(tiny_ckpt, tmp_path):
    bench = write_bench(tmp_path / "bench", skip=("hellaswag",))
    # a benchmark without data stops the run before any work, naming the file it looked for
    p = subprocess.run([sys.executable] + eval_args(tiny_ckpt, tmp_path, bench), cwd=ROOT, capture_output=True,
                       text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode != 0 and "hellaswag/validation.jsonl" in p.stderr and "Traceback" not in p.stderr
    # missing_ok: reported unmeasured; everything else evaluated, written and put in the report
    out = run_script(eval_args(tiny_ckpt, tmp_path, bench, missing_ok=True, stage="eval_tiny"))
    assert "hellaswag: unmeasured" in out
    res = json.load(open(tmp_path / "results.json"))
    r = res["results"]
    assert "unmeasured" in r["hellaswag"]
    assert r["val"]["tokens"] > 0 and r["val"]["bpb"] > 0 and r["tasks"]["n"] == 10
    for name, n in (("arc_easy", 3), ("arc_challenge", 3), ("mmlu", 3)):
        rows = res["examples"][name]
        assert r[name]["n"] == n == len(rows) and r[name]["num_fewshot"] == 1
        assert r[name]["acc"] == pytest.approx(sum(e["pred"] == e["gold"] for e in rows) / n)
    assert r["gsm8k"]["n"] == 4 and r["gsm8k_chat"]["num_fewshot"] == 0
    report = open(tmp_path / "report" / "report.md").read()
    assert "## eval_tiny" in report and "| hellaswag | unmeasured |" in report and "mmlu acc" in report
    summary = json.load(open(tmp_path / "report" / "eval_tiny.json"))
    assert summary["after"]["arc_easy acc"] == r["arc_easy"]["acc"]


def test_eval_under_torchrun_equals_one_process(tiny_ckpt, tmp_path):
    bench = write_bench(tmp_path / "bench")
    evals = "val,arc_easy,hellaswag,mmlu,gsm8k"
    run_script(eval_args(tiny_ckpt, tmp_path, bench, evals=evals, out=str(tmp_path / "one.json"), report_dir=""))
    run_script(["torchrun", "--standalone", "--nproc_per_node=2"]
               + eval_args(tiny_ckpt, tmp_path, bench, evals=evals, out=str(tmp_path / "two.json"), report_dir=""))
    one, two = (json.load(open(tmp_path / f)) for f in ("one.json", "two.json"))
    assert two["setup"]["world_size"] == 2
    for name in ("arc_easy", "hellaswag", "mmlu"):
        assert [(e["index"], e["pred"], e["pred_norm"]) for e in two["examples"][name]] == \
               [(e["index"], e["pred"], e["pred_norm"]) for e in one["examples"][name]]
        assert two["results"][name]["acc"] == one["results"][name]["acc"]
    assert [e["completion"] for e in two["examples"]["gsm8k"]] == [e["completion"] for e in one["examples"]["gsm8k"]]
    assert two["results"]["val"]["tokens"] == one["results"]["val"]["tokens"]
    assert two["results"]["val"]["bpb"] == pytest.approx(one["results"]["val"]["bpb"], rel=1e-6)


# -----------------------------------------------------------------------------
# parity with lm_eval itself (--model hf on the exported checkpoint)


def test_parity_with_lm_eval_hf_model(tmp_path):
    """lm_eval's HFLM on a checkpoint exported to an HF directory, through custom tasks whose dataset_path is json
    on the same local rows, offline: every document's chosen answer (ARC, HellaSwag, MMLU, 1-shot), every GSM8K
    completion (5-shot) and the accuracies must equal ours."""
    lm_eval = pytest.importorskip("lm_eval", reason="the test-time reference: pip install lm-eval accelerate")
    try:
        import hf
    except ImportError:
        pytest.skip("needs the HF model export, hf.py's export_hf(ckpt, out_dir) (branch wt-hf, not merged yet)")
    import lm_eval.evaluator
    from lm_eval.tasks._yaml_loader import load_yaml
    from checkpoint import checkpoint_dict, load_model, save_checkpoint
    from model import Transformer
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    torch.manual_seed(0)
    model = Transformer(tiny_config())
    with torch.no_grad():  # every weight random, norms too; large enough that choices are far from ties
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0, 0.3)
    ckpt = str(tmp_path / "ckpt.pt")
    save_checkpoint(ckpt, checkpoint_dict(model, "default", step=0))
    hf_dir = str(tmp_path / "hf")
    hf.export_hf(ckpt, hf_dir)
    root = write_bench(tmp_path / "bench")
    tasks_dir = os.path.join(os.path.dirname(lm_eval.__file__), "tasks")
    configs = {}
    for name, yaml_path, splits, k in [
            ("arc_easy", "arc/arc_easy.yaml", dict(train="train", test="test"), 1),
            ("hellaswag", "hellaswag/hellaswag.yaml", dict(train="train", validation="validation"), 1),
            ("mmlu", "mmlu/default/mmlu_anatomy.yaml", dict(dev="dev", test="test"), 1),
            ("gsm8k", "gsm8k/gsm8k.yaml", dict(train="train", test="test"), 5)]:
        cfg = load_yaml(os.path.join(tasks_dir, yaml_path))
        cfg.pop("tag", None)
        cfg.update(task=f"parity_{name}", dataset_path="json", dataset_name=None, num_fewshot=k,
                   dataset_kwargs=dict(cache_dir=str(tmp_path / "hf_cache"), data_files={
                       s: os.path.join(root, name, f"{f}.jsonl") for s, f in splits.items()}))
        if name == "gsm8k":
            cfg["generation_kwargs"] = dict(cfg["generation_kwargs"], max_gen_toks=16)
        configs[name] = (cfg, k)
    out = lm_eval.evaluator.simple_evaluate(model="hf", model_args=f"pretrained={hf_dir},dtype=float32",
                                            tasks=[c for c, _ in configs.values()], device="cpu", batch_size=4,
                                            log_samples=True, fewshot_random_seed=1234)
    model, meta = load_model(ckpt)
    tok = get_tokenizer(meta["tokenizer"])
    for name, (_, k) in configs.items():
        d = bm.load_benchmark(name, root, num_fewshot=k)
        samples = sorted(out["samples"][f"parity_{name}"], key=lambda s: s["doc_id"])
        results = out["results"][f"parity_{name}"]
        if name == "gsm8k":  # HF's tokenizer adds no BOS (bos=False), its eos is <|im_end|>
            ids = [tok.encode(p) for p in bm.gsm8k_prompts(d["docs"], d["pool"], d["k"])]
            ours = ev.generate_until(model, tok, ids, 16, bm.GSM8K_STOP, stop_ids=(tok.im_end_id,))
            theirs = {s["doc_id"]: s["resps"][0][0] for s in samples}
            assert ours == [theirs[i] for i in range(len(ours))]
            for key, flt in (("strict", "strict-match"), ("flexible", "flexible-extract")):
                acc = sum(bm.gsm8k_score(c, x["answer"])[key] for c, x in zip(ours, d["docs"])) / len(ours)
                assert results[f"exact_match,{flt}"] == pytest.approx(acc)
            continue
        ours = ev.score_multiple_choice(model, tok, bm.multiple_choice_prompts(name, d["docs"], d["pool"], d["k"]),
                                        [x["choices"] for x in d["docs"]], bos=False)
        theirs = [max(range(len(s["filtered_resps"])), key=lambda i: s["filtered_resps"][i][0]) for s in samples]
        assert [o["pred"] for o in ours] == theirs, name
        assert [ll for o in ours for ll in o["lls"]] == pytest.approx(
            [r[0] for s in samples for r in s["filtered_resps"]], abs=1e-4)
        assert results["acc,none"] == pytest.approx(sum(o["pred"] == x["gold"] for o, x in zip(ours, d["docs"]))
                                                    / len(ours))
        if name != "mmlu":
            assert results["acc_norm,none"] == pytest.approx(
                sum(o["pred_norm"] == x["gold"] for o, x in zip(ours, d["docs"])) / len(ours))
