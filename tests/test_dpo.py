"""DPO family: each loss against its closed form on hand-written log-probs, log 2 at step 0, the
gradient's sign, sequence log-probs against a naive gather, and dpo.py end to end. KTO: its loss against
the paper's formula and numbers by hand, z0 from mismatched pairs against naive log-probs, lambda / 2 at
step 0, the weight-ratio warning, and precomputed against live reference log-probs."""

import math
import re

import pytest
import torch
import torch.nn.functional as F

from conftest import run_script, tiny_config
from data.chat import render, render_prompt
from data.preference import encode_response, encode_unpaired, mismatched, pad_batch
from data.tokenizer import get_tokenizer
from dpo import (dpo_loss, falling_streak, kto_loss, kto_reference_point, kto_weight_warning, orpo_loss,
                 preference_loss, sequence_logps, simpo_loss)
from lora import apply_lora, lora_disabled
from model import Transformer

# hand-written summed log-probs of two pairs
PC, PR = torch.tensor([-5.0, -12.0]), torch.tensor([-9.0, -10.0])
RC, RR = torch.tensor([-6.0, -11.0]), torch.tensor([-8.0, -10.5])
LC, LR = torch.tensor([5.0, 4.0]), torch.tensor([6.0, 2.0])
H = [(-5 + 6) - (-9 + 8), (-12 + 11) - (-10 + 10.5)]  # = [2.0, -1.5]


def nls(x):  # -log sigmoid(x)
    return math.log1p(math.exp(-x))


@pytest.mark.parametrize("loss_type, beta, eps, want", [
    ("sigmoid", 0.1, 0.0, [nls(0.1 * h) for h in H]),
    ("sigmoid", 0.5, 0.2, [0.8 * nls(0.5 * h) + 0.2 * nls(-0.5 * h) for h in H]),  # cDPO (label smoothing)
    ("robust", 0.5, 0.2, [(0.8 * nls(0.5 * h) - 0.2 * nls(-0.5 * h)) / 0.6 for h in H]),  # rDPO
    ("ipo", 0.25, 0.0, [(h - 1 / (2 * 0.25)) ** 2 for h in H]),
    ("hinge", 0.4, 0.0, [max(0.0, 1 - 0.4 * h) for h in H]),
])
def test_reference_losses_match_closed_form(loss_type, beta, eps, want):
    losses, r_c, r_r = dpo_loss(PC, PR, RC, RR, beta, loss_type, eps)
    assert torch.allclose(losses, torch.tensor(want), atol=1e-6)
    assert torch.allclose(r_c, beta * torch.tensor([1.0, -1.0])) and torch.allclose(r_r, beta * torch.tensor([-1.0, 0.5]))


def test_robust_dpo_hand_value_and_unbiasedness():
    # h = 2, beta = 0.5, eps = 0.2: ((0.8 * 0.3132617) - 0.2 * 1.3132617) / 0.6 = -0.0200716 (by hand)
    one = lambda t: torch.tensor([t])
    loss, _, _ = dpo_loss(one(2.0), one(0.0), one(0.0), one(0.0), 0.5, "robust", 0.2)
    assert loss.item() == pytest.approx(-0.0200716, abs=1e-6)
    # rDPO is unbiased: averaged over a label that flips with probability eps it is the clean DPO loss
    h = torch.tensor([2.0, -1.5, 0.3])
    z = torch.zeros(3)
    flip_avg = 0.8 * dpo_loss(h, z, z, z, 0.5, "robust", 0.2)[0] + 0.2 * dpo_loss(-h, z, z, z, 0.5, "robust", 0.2)[0]
    assert torch.allclose(flip_avg, dpo_loss(h, z, z, z, 0.5, "sigmoid", 0.0)[0], atol=1e-6)


def test_simpo_and_orpo_match_closed_form():
    beta, gamma = 2.0, 0.5
    losses, r_c, _ = simpo_loss(PC, PR, LC, LR, beta, gamma)
    want = [nls(beta * -5 / 5 - beta * -9 / 6 - gamma), nls(beta * -12 / 4 - beta * -10 / 2 - gamma)]
    assert torch.allclose(losses, torch.tensor(want), atol=1e-6) and torch.allclose(r_c, torch.tensor([-2.0, -6.0]))
    lam = 0.3
    losses, _, _ = orpo_loss(PC, PR, LC, LR, lam)
    want = []
    for pc, pr, lc, lr in [(-5, -9, 5, 6), (-12, -10, 4, 2)]:
        pbar_c, pbar_r = math.exp(pc / lc), math.exp(pr / lr)
        log_odds_ratio = math.log(pbar_c / (1 - pbar_c)) - math.log(pbar_r / (1 - pbar_r))
        want.append(-pc / lc + lam * nls(log_odds_ratio))
    assert torch.allclose(losses, torch.tensor(want), atol=1e-5)
    # the log-odds survive probabilities near 1 and near 0 (tiny and huge per-token log-probs)
    extreme, _, _ = orpo_loss(torch.tensor([-1e-4, -300.0]), torch.tensor([-50.0, -1e-3]), torch.ones(2), torch.ones(2))
    assert torch.isfinite(extreme).all()


def test_rpo_adds_nll_on_chosen_per_token():
    base, _, _ = preference_loss(PC, PR, RC, RR, LC, LR, "sigmoid", beta=0.1)
    with_rpo, _, _ = preference_loss(PC, PR, RC, RR, LC, LR, "sigmoid", beta=0.1, rpo_alpha=0.5)
    assert torch.allclose(with_rpo - base, 0.5 * torch.tensor([5 / 5, 12 / 4]))


def test_sigmoid_gradient_raises_chosen_and_lowers_rejected():
    pc, pr = PC.clone().requires_grad_(), PR.clone().requires_grad_()
    losses, _, _ = dpo_loss(pc, pr, RC, RR, beta=0.1)
    losses.sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()  # descent increases log pi(chosen), decreases log pi(rejected)
    # magnitude: d/dh -log sigmoid(beta h) = -beta sigmoid(-beta h)
    assert torch.allclose(pc.grad, torch.tensor([-0.1 / (1 + math.exp(0.1 * h)) for h in H]), atol=1e-6)


def batch_of_pairs(tok):
    prompt = [{"role": "user", "content": "Sort the digits: 3 1 2"}]
    seqs = [encode_response(prompt, r, tok)[:2] for r in ("1 2 3", "3 2 1 and then some more words")]
    return seqs, pad_batch(seqs, tok.pad_id)


def test_sequence_logps_equal_naive_gather_over_response_tokens():
    tok = get_tokenizer("default")
    torch.manual_seed(0)
    model = Transformer(tiny_config()).eval()
    seqs, (idx, targets, _) = batch_of_pairs(tok)
    with torch.no_grad():
        got, n = sequence_logps(model, idx, targets)
        logp = F.log_softmax(model(idx)[0].double(), -1)
    # the reply starts after the generation prompt (same prompt in both rows)
    prompt_len = len(render_prompt([{"role": "user", "content": "Sort the digits: 3 1 2"}], tok))
    for b, (ids, mask) in enumerate(seqs):
        want = sum(logp[b, t - 1, ids[t]].item() for t in range(prompt_len, len(ids)))  # reply + <|im_end|>, no pads
        assert got[b].item() == pytest.approx(want, abs=1e-4)
        assert n[b].item() == len(ids) - prompt_len


def test_step_zero_loss_is_log2_for_a_frozen_copy_and_for_disabled_adapters():
    tok = get_tokenizer("default")
    torch.manual_seed(0)
    policy = Transformer(tiny_config())
    ref = Transformer(tiny_config())
    ref.load_state_dict(policy.state_dict())
    _, (idx, targets, _) = batch_of_pairs(tok)
    lp = sequence_logps(policy, idx, targets)[0]
    with torch.no_grad():
        rlp = sequence_logps(ref, idx, targets)[0]
    loss, _, _ = dpo_loss(lp[:1], lp[1:], rlp[:1], rlp[1:], beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    apply_lora(policy, r=4)
    for m in policy.modules():  # move the adapters off zero: the policy now differs from its base
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B, std=0.5)
    lp = sequence_logps(policy, idx, targets)[0]
    with torch.no_grad(), lora_disabled(policy):
        blp = sequence_logps(policy, idx, targets)[0]
    assert torch.allclose(blp, rlp, atol=1e-5) and not torch.allclose(lp, rlp, atol=1e-3)


def test_falling_streak():
    assert falling_streak([-1.0, -1.5, -2.0, -3.0], 4)
    assert not falling_streak([-1.0, -1.5, -1.4, -3.0], 4)
    assert not falling_streak([-1.0, -2.0], 4)


def test_dpo_script_runs(tiny_ckpt, tmp_path):
    out = run_script(["dpo.py", f"--init_from={tiny_ckpt}", f"--out_dir={tmp_path / 'dpo'}", "--task_pairs=32",
                      "--task_val_pairs=8", "--sampled_pairs=8", "--num_samples=2", "--eval_tasks=10",
                      "--batch_size=8", "--max_steps=3", "--log_interval=1", "--eval_interval=3", "--rpo_alpha=0.0",
                      "--kernels=torch", "--peak_flops=1e9"],
                     timeout=300)
    assert "step 0: val loss 0.6931" in out  # policy == reference at step 0
    for key in ("rewards/chosen", "rewards/rejected", "margins", "accuracy", "logps/chosen", "logps/rejected"):
        assert key in out
    assert "task exact-match" in out and "saved" in out
    assert len(re.findall(r"^step \d+/3 \|.* mfu \d+\.\d% \|", out, re.M)) == 3  # with a given peak FLOP/s
    from checkpoint import load_model
    load_model(str(tmp_path / "dpo" / "ckpt.pt"))  # a plain language model


def test_dpo_script_lora_with_precomputed_reference(tiny_ckpt, tmp_path):
    common = [f"--init_from={tiny_ckpt}", f"--out_dir={tmp_path / 'dpo'}", "--task_pairs=24", "--task_val_pairs=8",
              "--sampled_pairs=0", "--eval_tasks=0", "--batch_size=8", "--max_steps=2", "--log_interval=1",
              "--kernels=torch"]
    out = run_script(["dpo.py", *common, "--lora_r=4", "--precompute_ref_logprobs=True", "--loss_type=ipo"], timeout=300)
    assert "reference: precomputed log-probs" in out and "(LoRA r=4)" in out and "saved" in out


def test_dpo_ddp_keeps_replicas_identical(tiny_ckpt, tmp_path):
    # two gloo ranks: every training forward must go through the DDP wrapper or the replicas drift apart
    out = run_script(["torchrun", "--standalone", "--nproc_per_node=2", "dpo.py", f"--init_from={tiny_ckpt}",
                      f"--out_dir={tmp_path / 'dpo'}", "--task_pairs=32", "--task_val_pairs=8", "--sampled_pairs=0",
                      "--eval_tasks=0", "--batch_size=4", "--max_steps=3", "--log_interval=1", "--kernels=torch"],
                     timeout=300)
    assert "parameters identical on all 2 ranks" in out


# -----------------------------------------------------------------------------
# KTO (Ethayarajh et al. 2024)

def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_kto_loss_by_hand_and_paper_formula():
    # one desirable example, r = 1, z0 = 0, beta = 1, lambda_D = 1: 1 - sigmoid(1) = 0.2689414 (by hand)
    loss, reward = kto_loss(torch.tensor([-2.0]), torch.tensor([-3.0]), torch.tensor([True]), torch.tensor(0.0), 1.0)
    assert loss.item() == pytest.approx(0.2689414, abs=1e-6) and reward.item() == pytest.approx(1.0)
    # the paper's eq. 7, transcribed: v = lambda_D s(beta (r - z0)) if desirable else lambda_U s(beta (z0 - r)),
    # loss = lambda_y - v, on a mixed batch with unequal weights
    pol, ref = torch.tensor([-5.0, -12.0, -7.5, -3.0]), torch.tensor([-6.0, -10.0, -8.0, -6.0])
    lab, z0, beta, lam_d, lam_u = [True, False, True, False], 0.4, 0.5, 1.0, 1.5
    want = []
    for p, q, d in zip(pol.tolist(), ref.tolist(), lab):
        r = p - q
        want.append(lam_d - lam_d * sigmoid(beta * (r - z0)) if d else lam_u - lam_u * sigmoid(beta * (z0 - r)))
    losses, rewards = kto_loss(pol, ref, torch.tensor(lab), torch.tensor(z0), beta, lam_d, lam_u)
    assert torch.allclose(losses, torch.tensor(want), atol=1e-6)
    assert torch.allclose(rewards, beta * (pol - ref))


def test_kto_gradient_raises_desirable_and_lowers_undesirable():
    pol = torch.tensor([-5.0, -12.0]).requires_grad_()
    losses, _ = kto_loss(pol, torch.tensor([-6.0, -10.0]), torch.tensor([True, False]), torch.tensor(0.3), 0.1)
    losses.sum().backward()
    assert pol.grad[0] < 0 and pol.grad[1] > 0
    # magnitude: d/dr [lambda - lambda s(beta (r - z0))] = -lambda beta s(x)(1 - s(x)), x = beta (r - z0)
    x = 0.1 * (1.0 - 0.3)
    assert pol.grad[0].item() == pytest.approx(-0.1 * sigmoid(x) * (1 - sigmoid(x)), abs=1e-7)


def test_kto_reference_point_mean_clamp_and_all_reduce():
    # hand-made: log pi - log pi_ref of the mismatched pairs = [1, -1, 2] -> z0 = 2/3
    z0 = kto_reference_point(torch.tensor([-3.0, -5.0, -2.0], requires_grad=True), torch.tensor([-4.0, -4.0, -4.0]))
    assert z0.item() == pytest.approx(2 / 3) and not z0.requires_grad  # detached: a constant in the loss
    assert kto_reference_point(torch.tensor([-5.0, -6.0]), torch.tensor([-4.0, -4.0])).item() == 0.0  # clamped
    # over ranks: the mean over every rank's pairs (this rank [1, -1, 2], another rank [-0.5]): 1.5 / 4
    def all_reduce(t):
        t += torch.tensor([-0.5, 1.0])
    z0 = kto_reference_point(torch.tensor([-3.0, -5.0, -2.0]), torch.tensor([-4.0, -4.0, -4.0]), all_reduce)
    assert z0.item() == pytest.approx(0.375)


def test_kto_reference_point_on_a_batch_against_naive_mismatched_log_probs():
    tok = get_tokenizer("default")
    torch.manual_seed(0)
    policy, ref = Transformer(tiny_config()).eval(), Transformer(tiny_config()).eval()
    examples = [dict(prompt=[{"role": "user", "content": q}], completion=a, label=True)
                for q, a in [("Sort: 3 1 2", "1 2 3"), ("Reverse: abc", "cba"), ("What is 2 + 2?", "4, surely")]]
    enc = encode_unpaired(examples, tok, max_len=256)
    idx, targets, _ = pad_batch(mismatched(enc, 256), tok.pad_id)
    with torch.no_grad():
        got = kto_reference_point(sequence_logps(policy, idx, targets)[0], sequence_logps(ref, idx, targets)[0])
    # naive: render x_i with y_{i-1}, sum log-softmax over the completion's tokens under each model, average
    diffs = []
    for i in range(3):
        prompt, completion = examples[i]["prompt"], examples[i - 1]["completion"]
        ids = render(prompt + [{"role": "assistant", "content": completion}], tok)[0]
        ids = ids[:ids.index(tok.im_end_id, len(render(prompt, tok)[0])) + 1]  # up to the reply's end of turn
        start = len(render(prompt, tok, add_generation_prompt=True)[0])
        x = torch.tensor([ids])
        lp = []
        for m in (policy, ref):
            with torch.no_grad():
                logp = F.log_softmax(m(x)[0].double(), -1)[0]
            lp.append(sum(logp[t - 1, ids[t]].item() for t in range(start, len(ids))))
        diffs.append(lp[0] - lp[1])
    assert sum(diffs) / 3 > 0.05  # (positive: the clamp does not hide the estimate)
    assert got.item() == pytest.approx(sum(diffs) / 3, abs=1e-4)


def test_kto_step_zero_loss_is_lambda_half_with_policy_equal_to_reference():
    tok = get_tokenizer("default")
    torch.manual_seed(0)
    policy, ref = Transformer(tiny_config()), Transformer(tiny_config())
    ref.load_state_dict(policy.state_dict())
    examples = [dict(prompt=[{"role": "user", "content": q}], completion=a, label=lab)
                for q, a, lab in [("Sort: 3 1 2", "1 2 3", True), ("Reverse: abc", "bca", False),
                                  ("Sort: 9 8", "8 9", True)]]
    enc = encode_unpaired(examples, tok, max_len=256)
    idx, targets, _ = pad_batch([e["tokens"] for e in enc], tok.pad_id)
    kl_idx, kl_targets, _ = pad_batch(mismatched(enc, 256), tok.pad_id)
    with torch.no_grad():
        z0 = kto_reference_point(sequence_logps(policy, kl_idx, kl_targets)[0],
                                 sequence_logps(ref, kl_idx, kl_targets)[0])
        rlp = sequence_logps(ref, idx, targets)[0]
    losses, rewards = kto_loss(sequence_logps(policy, idx, targets)[0], rlp, torch.tensor([True, False, True]), z0,
                               0.1, desirable_weight=1.0, undesirable_weight=0.6)
    # r = 0, z0 = 0: lambda - lambda sigmoid(0) = lambda / 2 per example
    assert z0.item() == 0.0 and torch.allclose(rewards, torch.zeros(3), atol=1e-6)
    assert torch.allclose(losses, torch.tensor([0.5, 0.3, 0.5]), atol=1e-6)


def test_kto_weight_warning():
    assert kto_weight_warning(100, 100) is None
    assert kto_weight_warning(100, 75, 1.0, 1.0) is None  # 100 / 75 = 4/3: the edge of the range
    w = kto_weight_warning(100, 300)  # lambda_D n_D / lambda_U n_U = 1/3: desirable_weight in [3, 4]
    assert "0.333" in w and "desirable_weight in [3, 4]" in w and "undesirable_weight in [0.25, 0.333]" in w
    assert kto_weight_warning(100, 300, desirable_weight=3.5) is None
    assert kto_weight_warning(300, 100, undesirable_weight=2.5) is None  # 300 / 250 = 1.2
    assert "0 undesirable" in kto_weight_warning(10, 0)


def test_kto_script_precomputed_reference_trains_as_the_live_one(tiny_ckpt, tmp_path):
    # the embedded task pairs, unpaired; step 0 has policy == reference: loss lambda / 2 = 0.5, kl 0. Precomputing
    # the reference (the mismatched pairs of every batch too) must train exactly as the live reference does.
    args = [f"--init_from={tiny_ckpt}", "--loss_type=kto", "--task_pairs=16", "--task_val_pairs=4",
            "--sampled_pairs=0", "--eval_tasks=0", "--batch_size=4", "--grad_accum=2",
            "--max_steps=3", "--log_interval=1", "--eval_interval=3", "--lr=1e-3", "--warmup_steps=0",
            "--kernels=torch"]
    live = run_script(["dpo.py", *args, f"--out_dir={tmp_path / 'live'}"], timeout=300)
    assert "step 0: val loss 0.5000 | kl 0.0000" in live and "desirable" in live
    pre = run_script(["dpo.py", *args, f"--out_dir={tmp_path / 'pre'}", "--precompute_ref_logprobs=True"], timeout=300)
    assert "reference: precomputed log-probs" in pre

    def numbers(log):
        lines = [ln for ln in log.splitlines() if ln.startswith("step ") and "|" in ln]
        pattern = r"(?:loss|kl|rewards/\w+|margins|logps/\w+) (-?[\d.]+)"
        return [float(x) for ln in lines for x in re.findall(pattern, ln)]
    a, b = numbers(live), numbers(pre)
    assert len(a) == len(b) == 5 * 7 and max(abs(x - y) for x, y in zip(a, b)) < 2e-3
    assert max(numbers(live)[7 * 2 + 1::7]) > 0  # kl (z0) moves off 0 once the policy trains
