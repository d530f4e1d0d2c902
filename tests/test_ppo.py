"""PPO and the critic-free estimators beside GRPO (grpo.py, advantage_estimator): each pure piece against numbers
worked out by hand or a direct transcription of the paper's formula, the critic's values against a plain forward,
and the loop end to end on a tiny model (one process and two under torchrun)."""

import math

import pytest
import torch

from conftest import run_script, tiny_config

import grpo
from checkpoint import checkpoint_dict, save_checkpoint
from model import RewardModel, Transformer


# --- GAE ------------------------------------------------------------------------------------------------

def test_gae_hand_example():
    # gamma 1, lam 0.5; rewards 0, 0, 1 (the score at the last token), values 0.5, 0.6, 0.7, V = 0 after the end:
    # deltas 0 + 0.6 - 0.5 = 0.1, 0 + 0.7 - 0.6 = 0.1, 1 + 0 - 0.7 = 0.3
    # A_2 = 0.3, A_1 = 0.1 + 0.5 * 0.3 = 0.25, A_0 = 0.1 + 0.5 * 0.25 = 0.225; returns A + V = 0.725, 0.85, 1.0
    adv, ret = grpo.gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.6, 0.7]]), torch.tensor([3]), 1.0, 0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.225, 0.25, 0.3]]))
    torch.testing.assert_close(ret, torch.tensor([[0.725, 0.85, 1.0]]))
    # gamma 0.9, lam 0.8, a completion of 2 tokens padded to 3 (the pad's value 9 must not leak in):
    # deltas 0.2 + 0.9 * 2 - 1 = 1.0 and -1 + 0 - 2 = -3; A_1 = -3, A_0 = 1 + 0.72 * -3 = -1.16
    adv, ret = grpo.gae(torch.tensor([[0.2, -1.0, 0.0]]), torch.tensor([[1.0, 2.0, 9.0]]), torch.tensor([2]), 0.9, 0.8)
    torch.testing.assert_close(adv, torch.tensor([[-1.16, -3.0, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[-0.16, -1.0, 0.0]]))


def test_gae_matches_the_closed_form_sum():
    """A_t = sum_l (gamma lam)^l delta_{t+l} over the rest of each completion, summed term by term."""
    torch.manual_seed(0)
    B, T, gamma, lam = 5, 7, 0.95, 0.9
    rewards, values = torch.randn(B, T, dtype=torch.float64), torch.randn(B, T, dtype=torch.float64)
    lengths = torch.tensor([7, 1, 4, 6, 3])
    rewards = rewards * (torch.arange(T)[None] < lengths[:, None])
    adv, ret = grpo.gae(rewards, values, lengths, gamma, lam)
    for b in range(B):
        L = int(lengths[b])
        v = values[b, :L].tolist() + [0.0]
        delta = [rewards[b, t].item() + gamma * v[t + 1] - v[t] for t in range(L)]
        for t in range(T):
            want = sum((gamma * lam) ** k * delta[t + k] for k in range(L - t)) if t < L else 0.0
            assert adv[b, t].item() == pytest.approx(want, abs=1e-12)
            assert ret[b, t].item() == pytest.approx(want + (v[t] if t < L else 0.0), abs=1e-12)
    # lam = 1: the advantage is the discounted return minus V (Monte Carlo)
    adv, _ = grpo.gae(rewards, values, lengths, gamma, 1.0)
    mc = grpo.discounted_returns(rewards, gamma)
    valid = torch.arange(T)[None] < lengths[:, None]
    torch.testing.assert_close(adv[valid], (mc - values)[valid])


# --- rewards, KL, the adaptive controller ----------------------------------------------------------------

def test_kl_shaped_rewards():
    # -kl_coef * KL_t on every token, + the score on the last one, 0 past the length
    scores, kl = torch.tensor([1.0, -0.5]), torch.tensor([[0.1, 0.2, 0.3], [0.4, -0.1, 9.0]])
    r = grpo.kl_shaped_rewards(scores, kl, torch.tensor([3, 2]), 0.5)
    torch.testing.assert_close(r, torch.tensor([[-0.05, -0.1, 0.85], [-0.2, -0.45, 0.0]]))
    logp, ref = torch.log(torch.tensor([0.5, 0.1])), torch.log(torch.tensor([0.25, 0.3]))
    torch.testing.assert_close(grpo.kl_penalty(logp, ref, "k1"), torch.tensor([math.log(2), math.log(1 / 3)]))
    torch.testing.assert_close(grpo.kl_penalty(logp, ref, "k3"), torch.tensor([0.5 - math.log(0.5) - 1,
                                                                              3 - math.log(3) - 1]))


def test_adaptive_kl_controller():
    # Ziegler et al.: e = clip(KL / target - 1, -0.2, 0.2); beta *= 1 + e * n_steps / horizon
    assert grpo.adaptive_kl_coef(0.1, 6.6, 6.0, 64, 10000) == pytest.approx(0.1 * (1 + 0.1 * 64 / 10000))
    assert grpo.adaptive_kl_coef(0.1, 9.0, 6.0, 64, 10000) == pytest.approx(0.1 * (1 + 0.2 * 64 / 10000))  # clipped
    assert grpo.adaptive_kl_coef(0.1, 0.0, 6.0, 64, 10000) == pytest.approx(0.1 * (1 - 0.2 * 64 / 10000))
    assert grpo.adaptive_kl_coef(0.1, 6.0, 6.0, 64, 10000) == 0.1
    # a KL that stays above target grows the coefficient geometrically: 10 updates of n = 1000, horizon 10000
    c = 0.05
    for _ in range(10):
        c = grpo.adaptive_kl_coef(c, 100.0, 6.0, 1000, 10000)
    assert c == pytest.approx(0.05 * 1.02 ** 10)


def test_value_loss_clipping():
    # V_old = 1, c = 0.2; returns 2, 2, 0:
    # V 1.5 -> clipped to 1.2: max(0.25, 0.64) -> 0.32, the clipped side (no gradient to V)
    # V 0.5 -> clipped to 0.8: max(2.25, 1.44) -> 1.125, unclipped (gradient V - R = -1.5)
    # V 1.05 inside the range: 0.5 * 1.05^2 = 0.55125 (gradient 1.05)
    v = torch.tensor([1.5, 0.5, 1.05], requires_grad=True)
    loss, clipped = grpo.value_loss(v, torch.ones(3), torch.tensor([2.0, 2.0, 0.0]), 0.2)
    torch.testing.assert_close(loss, torch.tensor([0.32, 1.125, 0.55125]))
    assert clipped.tolist() == [True, False, False]
    loss.sum().backward()
    torch.testing.assert_close(v.grad, torch.tensor([0.0, -1.5, 1.05]))


# --- the critic-free estimators --------------------------------------------------------------------------

def test_rloo_advantages():
    # G = 4, rewards 1, 0, 0, 1: baselines (0 + 0 + 1) / 3 and (1 + 0 + 1) / 3 -> +-2/3
    torch.testing.assert_close(grpo.rloo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4),
                               torch.tensor([2, -2, -2, 2]) / 3)
    # G = 3, rewards 3, 6, 0: baselines 3, 1.5, 4.5; an all-equal group gets 0
    torch.testing.assert_close(grpo.rloo_advantages(torch.tensor([3.0, 6.0, 0.0, 2.0, 2.0, 2.0]), 3),
                               torch.tensor([0.0, 4.5, -4.5, 0.0, 0.0, 0.0]))


def test_reinforce_pp_advantages():
    # returns: gamma 0.5, rewards 1, 2, 4 -> 4, 2 + 0.5 * 4, 1 + 0.5 * 4
    torch.testing.assert_close(grpo.discounted_returns(torch.tensor([[1.0, 2.0, 4.0]]), 0.5),
                               torch.tensor([[3.0, 4.0, 4.0]]))
    # REINFORCE++: A_t = score - kl_coef * sum_{s >= t} KL_s, normalised over every token of the global batch
    scores, kl = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.0, 0.0], [0.0, 0.1, 0.0]])
    lengths = torch.tensor([3, 1, 2])
    mask = (torch.arange(3)[None] < lengths[:, None]).float()
    ret = grpo.discounted_returns(grpo.kl_shaped_rewards(scores, kl, lengths, 1.0), 1.0)
    want = torch.tensor([[1 - 0.6, 1 - 0.5, 1 - 0.3], [-0.4, 0, 0], [2 - 0.1, 2 - 0.1, 0]])
    torch.testing.assert_close(ret, want)
    sel = want[mask.bool()]
    adv = grpo.whiten(ret, mask)
    torch.testing.assert_close(adv[mask.bool()], (sel - sel.mean()) / torch.sqrt(sel.var() + 1e-8))
    assert (adv[~mask.bool()] == 0).all()
    # over two ranks: the moments of each half, summed, whiten each half as the whole batch would
    stats = grpo.moments(ret[:1], mask[:1]) + grpo.moments(ret[1:], mask[1:])
    torch.testing.assert_close(grpo.whiten(ret[:1], mask[:1], stats), adv[:1])


def test_gspo_sequence_ratio():
    """GSPO: s_i = (pi(y_i) / pi_old(y_i))^(1/|y_i|), the same for every token of the completion; its gradient
    with respect to each log pi(y_t) is s_i * A_i / |y_i|."""
    torch.manual_seed(0)
    logp = (torch.randn(3, 4) * 0.01 - 1).requires_grad_(True)
    old = logp.detach() + torch.randn(3, 4) * 0.01
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]]).float()
    adv = torch.tensor([1.0, -2.0, 0.5])
    lengths = mask.sum(1)
    pi, pi_old = torch.exp((logp.detach() * mask).sum(1)), torch.exp((old * mask).sum(1))  # sequence probabilities
    s = (pi / pi_old) ** (1 / lengths)
    obj, clipped = grpo.clipped_objective(logp, old, adv, 0.5, 0.5, mask, "sequence")  # wide: nothing clipped
    torch.testing.assert_close(obj, (s * adv)[:, None].expand(3, 4))
    assert not clipped.any()
    ((obj * mask).sum(1) / lengths).sum().backward()  # GSPO's objective: s_i * A_i per completion
    torch.testing.assert_close(logp.grad, (s * adv / lengths)[:, None] * mask)
    # GSPO's own clip range (3e-4 / 4e-4): a sequence ratio outside [1 - 3e-4, 1 + 4e-4] is clipped
    obj, clipped = grpo.clipped_objective(logp.detach(), old, adv, 3e-4, 4e-4, mask, "sequence")
    for i in range(3):
        clip_s = min(max(s[i].item(), 1 - 3e-4), 1 + 4e-4)
        assert obj[i, 0].item() == pytest.approx(min(s[i].item() * adv[i].item(), clip_s * adv[i].item()), rel=1e-5)
        assert clipped[i, 0].item() == (clip_s * adv[i].item() < s[i].item() * adv[i].item())
    assert clipped.any()
    # on-policy (old = logp detached): every sequence ratio is exactly 1
    obj, _ = grpo.clipped_objective(logp, logp.detach(), adv, 3e-4, 4e-4, mask, "sequence")
    torch.testing.assert_close(obj.detach(), adv[:, None].expand(3, 4))


# --- the critic ------------------------------------------------------------------------------------------

def test_critic_values_are_the_head_at_the_position_before_each_token():
    torch.manual_seed(0)
    critic = RewardModel(Transformer(tiny_config()))
    for name, p in critic.named_parameters():  # norms and the head too
        with torch.no_grad():
            p.copy_(torch.rand_like(p) + 0.5 if "norm" in name else torch.randn_like(p) * 0.1)
    prompts = [[5, 17, 300, 42, 9], [7, 8], [1000, 2000, 3000]]
    tokens = torch.tensor([[11, 12, 13, 14], [21, 22, 0, 0], [31, 0, 0, 0]])
    lengths = torch.tensor([4, 2, 1])
    v = grpo.completion_values(critic, prompts, tokens, lengths)
    for b, (p, n) in enumerate(zip(prompts, lengths.tolist())):
        seq = torch.tensor(p + tokens[b, :n].tolist())[None]
        full = critic(seq)  # (1, L): a value per position
        for t in range(n):  # V(s_t): the state is the prompt and the tokens before t
            end = torch.tensor([len(p) - 1 + t])
            assert v[b, t].item() == pytest.approx(full[0, len(p) - 1 + t].item(), abs=1e-5)
            assert v[b, t].item() == pytest.approx(critic(seq[:, :len(p) + t], end).item(), abs=1e-5)
        assert (v[b, n:] == 0).all()


# --- the loop -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory):
    torch.manual_seed(1)
    rm = RewardModel(Transformer(tiny_config()))
    torch.nn.init.normal_(rm.score_head.weight, std=1.0)  # scores that differ between completions
    path = str(tmp_path_factory.mktemp("rm") / "rm.pt")
    save_checkpoint(path, checkpoint_dict(rm, "default", step=0))
    return path


PPO = ["grpo.py", "configs/grpo_tiny.py", "--advantage_estimator=gae", "--num_generations=1", "--prompts_per_step=4",
       "--dynamic_sampling=False", "--reward_funcs=()", "--kl_coef=0.05", "--num_ppo_epochs=2", "--num_mini_batches=2",
       "--ptx_coef=0.5", "--ptx_batch_size=2", "--missing_eos_penalty=1.0"]


def test_ppo_script_tiny(tiny_ckpt, tiny_rm, tmp_path):
    """PPO with the learned reward, the critic from the reward model, an adaptive KL coefficient, GSPO's
    sequence ratio, 2 epochs x 2 minibatches and the ptx term; the result is the policy, a plain LM."""
    from checkpoint import load_checkpoint, load_model
    out = run_script(PPO + [f"--init_from={tiny_ckpt}", f"--out_dir={tmp_path}", f"--reward_model={tiny_rm}",
                            "--kl_target=0.01", "--kl_horizon=100", "--importance_sampling_level=sequence",
                            "--lr=1e-3", "--max_steps=3"])
    assert "critic: " in out and f"from {tiny_rm}" in out
    lines = [ln for ln in out.splitlines() if ln.startswith("step ")]
    assert len(lines) == 3
    for key in ("vf_loss", "vf_clip", "ev", "kl", "seq_kl", "kl_coef", "adv", "ret", "ptx", "entropy", "len"):
        assert all(f"| {key} " in ln for ln in lines), key
    coefs = [float(ln.split("| kl_coef ")[1].split()[0]) for ln in lines]
    assert coefs[0] == 0.05 and coefs[1] != coefs[0]  # adapted after the first step
    assert "KL(pi || initial policy)" in out and "completion tokens generated" in out
    ckpt = load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert ckpt["step"] == 3 and "critic" not in ckpt and "optimizer" not in ckpt
    load_model(ckpt)


def test_overlong_filtering_masks_truncated_completions(tiny_ckpt, tmp_path):
    # the random tiny model never closes its turn within 8 tokens: every completion is cut off, none trains
    out = run_script(["grpo.py", "configs/grpo_tiny.py", f"--init_from={tiny_ckpt}", f"--out_dir={tmp_path}",
                      "--dynamic_sampling=False", "--mask_truncated_completions=True", "--max_steps=1"])
    assert "no update: every completion was dropped" in out


@pytest.mark.parametrize("args, words", [
    (["--num_generations=1", "--dynamic_sampling=False"], "needs num_generations >= 2"),
    (["--advantage_estimator=gae", "--num_generations=1"], "add --dynamic_sampling=False"),
    (["--advantage_estimator=gae"], "give --reward_model=PATH, or --value_model=policy"),
    (["--kl_target=6.0"], "set a starting --kl_coef"),
])
def test_inconsistent_settings_stop_before_any_work(args, words, tmp_path, monkeypatch):
    import os
    import runpy
    import sys
    from conftest import ROOT
    monkeypatch.setattr(sys, "argv", ["grpo.py", f"--out_dir={tmp_path}"] + args)
    with pytest.raises(SystemExit) as e:  # the script's own checks, in this process (nothing is loaded before them)
        runpy.run_path(os.path.join(ROOT, "grpo.py"), run_name="__main__")
    assert str(e.value).startswith("grpo: ") and words in str(e.value), e.value
    assert not os.listdir(tmp_path)


def test_ppo_ddp_keeps_policy_and_critic_identical(tiny_ckpt, tmp_path):
    # each rank samples its share; the policy (with the ptx micro-batch) and the critic sync through their wrappers
    out = run_script(["torchrun", "--standalone", "--nproc_per_node=2"] + PPO +
                     [f"--init_from={tiny_ckpt}", f"--out_dir={tmp_path}", "--reward_funcs=('exact',)",
                      "--value_model=policy", "--max_steps=2"], timeout=300)
    assert "parameters identical on all 2 ranks; critic identical on all 2 ranks" in out
