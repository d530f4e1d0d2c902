"""GRPO: the pure pieces against hand-computed values and closed forms, the training log-probs against
the ones generate records, the policy gradient against REINFORCE, and grpo.py end to end on a tiny model."""

import math
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import run_script, tiny_config

import grpo
from checkpoint import checkpoint_dict, load_checkpoint, load_model, save_checkpoint
from model import RewardModel, Transformer


def test_group_advantages_hand_example():
    # group 1 (G=3): rewards 1, 2, 6 -> mean 3, deviations -2, -1, 3, sample std sqrt((4 + 1 + 9) / 2) = sqrt(7)
    # group 2: all equal -> 0 (no signal, no division by zero)
    r = torch.tensor([1.0, 2.0, 6.0, 0.5, 0.5, 0.5])
    a = grpo.group_advantages(r, 3, scale_rewards=True, epsilon_std=1e-4)
    s = math.sqrt(7) + 1e-4
    torch.testing.assert_close(a, torch.tensor([-2 / s, -1 / s, 3 / s, 0.0, 0.0, 0.0]))
    # Dr. GRPO: no division by the std
    a = grpo.group_advantages(r, 3, scale_rewards=False)
    torch.testing.assert_close(a, torch.tensor([-2.0, -1.0, 3.0, 0.0, 0.0, 0.0]))
    # binary rewards, G=4: 1, 0, 0, 1 -> +-0.5 / sqrt(1/3)
    a = grpo.group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4, epsilon_std=0.0)
    torch.testing.assert_close(a, torch.tensor([1.0, -1.0, -1.0, 1.0]) * 0.5 / math.sqrt(1 / 3))


def test_k3_kl():
    logp = torch.log(torch.tensor([0.5, 0.1, 0.9]))
    assert torch.equal(grpo.k3_kl(logp, logp), torch.zeros(3))
    ref = torch.log(torch.tensor([0.25, 0.3, 0.9]))
    rho = torch.tensor([0.25 / 0.5, 0.3 / 0.1, 1.0])
    expected = rho - torch.log(rho) - 1           # 0.5 + ln 2 - 1 = 0.1931...
    torch.testing.assert_close(grpo.k3_kl(logp, ref), expected)
    assert (grpo.k3_kl(logp, ref)[:2] > 0).all()
    assert abs(grpo.k3_kl(logp, ref)[0].item() - (0.5 + math.log(2) - 1)) < 1e-6
    # unbiased: its expectation over tokens drawn from pi is exactly KL(pi || pi_ref)
    torch.manual_seed(0)
    pi, pref = F.softmax(torch.randn(50), 0), F.softmax(torch.randn(50), 0)
    k3 = grpo.k3_kl(pi.log(), pref.log())
    kl = (pi * (pi.log() - pref.log())).sum()
    torch.testing.assert_close((pi * k3).sum(), kl)


def test_clipped_objective_both_sides():
    ratio = torch.tensor([[0.5, 1.0, 1.5], [0.5, 1.0, 1.5]])
    adv = torch.tensor([1.0, -1.0])
    old = torch.zeros(2, 3)
    logp = torch.log(ratio).requires_grad_(True)
    obj, clipped = grpo.clipped_objective(logp, old, adv, epsilon=0.2, epsilon_high=0.28)
    # A > 0: min(r, clip(r, 0.8, 1.28)) -> 0.5 (not clipped: the pessimistic side), 1, 1.28 (clipped above)
    # A < 0: min(-r, -clip(r)) -> -0.8 (clipped below), -1, -1.5 (not clipped)
    torch.testing.assert_close(obj, torch.tensor([[0.5, 1.0, 1.28], [-0.8, -1.0, -1.5]]))
    assert clipped.tolist() == [[False, False, True], [True, False, False]]
    # gradient w.r.t. log pi: r * A where unclipped, 0 where clipped
    obj.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.5, 1.0, 0.0], [0.0, -1.0, -1.5]]))
    # symmetric clipping by default
    obj, _ = grpo.clipped_objective(torch.log(ratio), old, adv, epsilon=0.2)
    torch.testing.assert_close(obj, torch.tensor([[0.5, 1.0, 1.2], [-0.8, -1.0, -1.5]]))


def test_loss_aggregation():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0], [7.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])  # row 3 dropped (dynamic sampling)
    # grpo: mean of the sequence means (2 and 4); dapo: mean of the 4 tokens; dr_grpo: sum / (2 seqs * 5)
    assert grpo.aggregate_loss(loss, mask, "grpo", 5).item() == pytest.approx(3.0)
    assert grpo.aggregate_loss(loss, mask, "dapo", 5).item() == pytest.approx(10 / 4)
    assert grpo.aggregate_loss(loss, mask, "dr_grpo", 5).item() == pytest.approx(10 / 10)
    # splitting the batch into micro-batches (numerators summed, one denominator) changes nothing
    for lt in ("grpo", "dapo", "dr_grpo"):
        num = grpo.loss_numerator(loss[:1], mask[:1], lt) + grpo.loss_numerator(loss[1:], mask[1:], lt)
        whole = grpo.aggregate_loss(loss, mask, lt, 5).item()
        assert (num / grpo.loss_denominator(mask, lt, 5)).item() == pytest.approx(whole)


def test_soft_overlong_penalty():
    # max 10 tokens, buffer 4: free up to 6, then -1/4 per token down to -1 at 10
    p = grpo.soft_overlong_penalty(torch.tensor([3, 6, 7, 8, 10]), 10, 4)
    torch.testing.assert_close(p, torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0]))


def test_score_completions():
    from data.rewards import get_reward_funcs
    exs = [dict(task="add", prompt="What is 1 + 2?", answer="3")] * 3
    texts = ["3", "<think>1+2</think> 3", "<think>x</think> 4"]
    total, per = grpo.score_completions(exs, texts, get_reward_funcs(("exact", "format")), (1.0, 0.5))
    torch.testing.assert_close(per, torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]]))
    torch.testing.assert_close(total, torch.tensor([1.0, 1.5, 0.5]))


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    return Transformer(tiny_config()).eval()


def _rollout(model, temperature, G=4, max_new_tokens=12, seed=0):
    prompts = [[5, 17, 300, 42, 9], [7, 8], [1000, 2000, 3000]]
    rows = [p for p in prompts for _ in range(G)]
    gen = torch.Generator().manual_seed(seed)
    # a stop set of every 16th id: completions end at different lengths, some at max_new_tokens
    out = model.generate(rows, max_new_tokens, temperature=temperature, top_k=200, top_p=0.9,
                         stop_tokens=list(range(3, 8192, 16)), pad_id=0, generator=gen)
    return rows, out


def test_training_logprobs_match_generate():
    model = _tiny_model()
    for temperature in (1.0, 0.7):
        rows, out = _rollout(model, temperature)
        assert len(set(out["lengths"].tolist())) > 1, "want completions of different lengths"
        lp = grpo.completion_logprobs(model, rows, out["tokens"], out["lengths"], temperature)
        mask = torch.arange(out["tokens"].shape[1])[None] < out["lengths"][:, None]
        torch.testing.assert_close(lp[mask], out["logprobs"][mask], atol=1e-4, rtol=1e-4)
        assert (lp[~mask] == 0).all()


def test_first_step_is_reinforce():
    """mu = 1, beta = 0: the loss value is 0 (the ratio is 1 and each group's advantages sum to 0) and
    its gradient is the REINFORCE gradient -mean_i A_i * mean_t grad log pi(y_it), computed here by a
    plain forward and log_softmax per completion."""
    temperature, G = 0.8, 4
    model = _tiny_model(1)
    rows, out = _rollout(model, temperature, G=G, seed=1)
    tokens, lengths = out["tokens"], out["lengths"]
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.3, 0.9, 0.2, 0.5, 1.0, 1.0, 0.0, 1.0])
    adv = grpo.group_advantages(rewards, G)
    mask = (torch.arange(tokens.shape[1])[None] < lengths[:, None]).float()

    model.train()
    logp = grpo.completion_logprobs(model, rows, tokens, lengths, temperature)
    per_tok, clipped = grpo.grpo_token_loss(logp, None, adv, None, 0.0, 0.2, 0.28)
    loss = grpo.aggregate_loss(per_tok, mask, "grpo", tokens.shape[1])
    assert abs(loss.item()) < 1e-6 and not clipped.any()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    reinforce = 0.0
    for i, (p, row, n) in enumerate(zip(rows, tokens.tolist(), lengths.tolist())):
        seq = torch.tensor(p + row[:n])[None]
        logits, _ = model(seq)                                  # (1, T, V), temperature 1
        logprobs = F.log_softmax(logits[0] / temperature, -1)
        lp = torch.stack([logprobs[len(p) - 1 + t, row[t]] for t in range(n)])
        reinforce = reinforce - adv[i] * lp.mean()
    (reinforce / len(rows)).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-6, rtol=1e-4, msg=f"gradient of {n}")
    assert sum(g.abs().sum() for g in grads.values()) > 0


def test_grpo_script_tiny(tiny_ckpt, tmp_path):
    out = run_script(["grpo.py", "configs/grpo_tiny.py", f"--init_from={tiny_ckpt}", f"--out_dir={tmp_path / 'run'}"],
                     timeout=300)
    tmp_path = tmp_path / "run"
    assert "step 2/2 | loss" in out and "gen tok/s" in out and "held-out accuracy" in out
    assert "| mfu n/a |" in out  # no peak FLOP/s known for a CPU
    ckpt = load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert ckpt["step"] == 2 and ckpt["tokenizer"] == "default" and ckpt["config"]["num_generations"] == 4
    load_model(ckpt)
    # the report card: the logged curve (evals at steps 0 and 2, train lines at 1 and 2) and the stage summary
    import json
    entries = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [e["step"] for e in entries if "accuracy" in e] == [0, 2]
    assert [e["step"] for e in entries if "loss" in e] == [1, 2] and all("reward" in e for e in entries if "loss" in e)
    summary = json.load(open(tmp_path.parent / "report" / "grpo.json"))  # report_dir "": beside out_dir
    assert summary["steps"] == 2 and summary["after"]["accuracy"] == ckpt["accuracy"]
    assert "## grpo" in open(tmp_path.parent / "report" / "report.md").read()


def test_grpo_script_variants(tiny_ckpt, tmp_path):
    """LoRA with the adapters-off reference, k3 KL, mu = 2 with clip-higher, token-mean loss, dynamic
    sampling, overlong shaping, and a learned reward (a tiny reward model) summed with a rule-based one."""
    torch.manual_seed(0)
    rm_path = str(tmp_path / "rm.pt")
    rm = RewardModel(Transformer(tiny_config()))
    torch.nn.init.normal_(rm.score_head.weight, std=1.0)  # rewards that differ between completions
    save_checkpoint(rm_path, checkpoint_dict(rm, "default", step=0))
    out = run_script(["grpo.py", "configs/grpo_tiny.py", f"--init_from={tiny_ckpt}", f"--out_dir={tmp_path}",
                      "--lora_r=4", "--beta=0.1", "--num_ppo_epochs=2", "--epsilon_high=0.28", "--loss_type=dapo",
                      "--dynamic_sampling=True", "--overlong_buffer=4", f"--reward_model={rm_path}",
                      "--reward_funcs=('exact','format')", "--reward_weights=(1.0,0.5)", "--lr=1e-2"], timeout=300)
    assert "reference: base with adapters off" in out and "rm " in out and "kept " in out
    kl = [float(line.split("| kl ")[1].split()[0]) for line in out.splitlines() if line.startswith("step ")]
    assert kl and all(k >= 0 for k in kl)
    ckpt = load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert ckpt["merged_lora"]["r"] == 4 and not any("lora_" in k for k in ckpt["model"])
    load_model(ckpt)


def test_grpo_missing_init_message(tmp_path):
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "grpo.py", f"--init_from={tmp_path}/nope.pt"], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert p.returncode != 0 and "not found" in p.stderr and "--init_from" in p.stderr


def test_grpo_ddp_keeps_replicas_identical(tiny_ckpt, tmp_path):
    # each rank samples its own prompts (groups stay within a rank); gradients must still be synchronised
    out = run_script(["torchrun", "--standalone", "--nproc_per_node=2", "grpo.py", "configs/grpo_tiny.py",
                      f"--init_from={tiny_ckpt}", f"--out_dir={tmp_path}"], timeout=300)
    assert "parameters identical on all 2 ranks" in out
