"""
The on-policy RL stage: GRPO, RLOO, REINFORCE++ and PPO (with a critic) in one loop, from verifiable
(rule-based) and/or learned rewards.

Every step the policy samples num_generations completions for each of prompts_per_step prompts (one batched,
KV-cached generate call), each is scored (rule-based functions of data/rewards.py and/or a reward model from
reward.py), and advantage_estimator turns the scores into advantages (the design of verl and OpenRLHF):

    grpo         A = (r - mean of its group) / (std of its group + epsilon_std)      (Dr. GRPO: no std)
    rloo         A = r - mean of the other G - 1 rewards of its prompt               (Ahmadian et al. 2024)
    reinforce++  A_t = sum_{s >= t} gamma^(s-t) r_s, normalised over the whole global batch   (Hu 2025)
    gae          PPO (Ouyang et al. 2022, TRL's PPOTrainer): a critic V (a value model, from the reward model or
                 the policy) and GAE(gamma, lam) advantages, whitened; the critic learns the returns A + V

r is the score minus the KL to the frozen reference (the initial policy) in the reward, per token for the
token-level estimators, summed for the sequence-level ones: r_t = -kl_coef * KL_t, plus the score at the last
token (KL_t by kl_estimator k1 = log pi/pi_ref, or k3). kl_coef is fixed, or adapted to a target (kl_target
> 0, Ziegler et al. 2019). Every estimator shares the policy loss, PPO's clipped surrogate per token,

    ratio = pi(y_t) / pi_old(y_t)      (importance_sampling_level="sequence": GSPO's (pi(y) / pi_old(y))^(1/|y|))
    loss_t = -min(ratio * A, clip(ratio, 1 - epsilon, 1 + epsilon_high) * A) + beta * k3_t,
    k3_t = pi_ref/pi - log(pi_ref/pi) - 1      (beta: the KL in the loss; kl_coef: the KL in the reward)

aggregated per loss_type: "grpo" (mean over each completion's tokens, then over completions), "dapo" (mean
over all tokens: TRL's PPO), "dr_grpo" (sum over tokens / (completions * max_new_tokens)); PPO adds vf_coef
times the clipped value loss 0.5 * max((V - R)^2, (clip(V, V_old +- cliprange_value) - R)^2), and ptx_coef >
0 mixes in the SFT NLL of gold answers (InstructGPT's PPO-ptx). Each rollout batch is used for
num_ppo_epochs passes of num_mini_batches optimizer steps each; pi_old is the policy that sampled it. With
one of each the ratio is exactly 1 and the loss *value* is ~0 for the critic-free estimators (its gradient is
the REINFORCE gradient): a near-zero loss is expected, watch reward and accuracy.
DAPO options: epsilon_high > epsilon (clip-higher), dynamic_sampling (drop groups whose scores are all equal
and sample more prompts instead), soft overlong punishment (overlong_buffer > 0), overlong filtering
(mask_truncated_completions). missing_eos_penalty is subtracted from the score of a completion cut off at
max_new_tokens (a learned reward would otherwise score it as if it had ended).

Logged every log_interval steps: score mean±std and per reward function, accuracy of the samples, KL to the
reference (kl: per token, k3; seq_kl: per completion, kl_estimator, what kl_target steers), kl_coef,
advantages (as in the loss) and returns (mean±std), clip fraction, entropy (the mean -log pi of the sampled
tokens: a free Monte Carlo estimate at the sampling temperature; the fused training loss never forms the
logits), completion length, logp_diff (|training-forward log-prob - generate's|, ~1e-7 in fp32), tokens/s of
training and of generation; PPO also the value loss, its clip fraction and the critic's explained variance.
Held-out accuracy (greedy, test split, per task) before training, every eval_interval steps and at the end;
at the end also KL(pi || initial policy) per completion on the held-out prompts and the generated tokens.
Under torchrun (DDP or FSDP) each rank samples its own share of the prompts with all G completions of each,
so a group never spans ranks; the policy and the critic train through their wrappers.

$ python grpo.py                                   # embedded default: GRPO, exact-answer reward, from out/sft/ckpt.pt
$ python grpo.py configs/grpo_ppo.py               # PPO with the learned reward (out/reward/ckpt.pt) and a critic
$ python grpo.py configs/grpo_rloo.py              # RLOO; configs/grpo_reinforce_pp.py: REINFORCE++
$ python grpo.py configs/grpo_dapo.py              # DAPO: clip-higher, dynamic sampling, token-mean, overlong shaping
$ python grpo.py configs/grpo_tiny.py --init_from=ckpt.pt  # a few steps of a tiny run (the tests use it)
$ torchrun --nproc_per_node=8 grpo.py configs/grpo_gsm8k.py   # GSM8K on GPUs (openai/gsm8k via `datasets`)

Writes {out_dir}/ckpt.pt (the policy as a full checkpoint; with LoRA the adapters are merged into it).
"""

import copy
import os
import time
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch.distributed as dist

from lora import check_targets
from optim import SCHEDULES

# -----------------------------------------------------------------------------
# the algorithm, as pure functions on tensors (tests/test_grpo.py and tests/test_ppo.py check each against a
# reference). Rollout tensors are (B, T): B completions, T completion tokens, 0 past each one's length.

def group_advantages(rewards, num_generations, scale_rewards=True, epsilon_std=1e-4):
    """rewards (N,) with the G completions of each prompt consecutive -> advantages (N,).
    (r - mean of its group) / (std of its group + epsilon_std), std with Bessel's correction
    (as TRL); scale_rewards=False (Dr. GRPO) leaves out the division. An all-equal group gets 0."""
    r = rewards.float().view(-1, num_generations)
    a = r - r.mean(1, keepdim=True)
    if scale_rewards:
        a = a / (r.std(1, keepdim=True) + epsilon_std)
    return a.view(-1)


def rloo_advantages(rewards, num_generations):
    """RLOO: each reward minus the mean of the other G - 1 rewards of its prompt (the leave-one-out baseline,
    which does not depend on the completion it is subtracted from, so the gradient stays unbiased)."""
    r = rewards.float().view(-1, num_generations)
    return (r - (r.sum(1, keepdim=True) - r) / (num_generations - 1)).view(-1)


def k3_kl(logp, ref_logp):
    """Per-token k3 estimator of KL(pi || pi_ref) from log-probs of tokens sampled from pi:
    rho - log(rho) - 1 with rho = pi_ref / pi. Unbiased, >= 0, and 0 where pi = pi_ref."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def kl_penalty(logp, ref_logp, estimator="k1"):
    """Per-token KL(pi || pi_ref) estimate for the reward: k1 = log pi - log pi_ref (unbiased, can be < 0), or k3."""
    return logp - ref_logp if estimator == "k1" else k3_kl(logp, ref_logp)


def kl_shaped_rewards(scores, kl, lengths, kl_coef):
    """RLHF's per-token rewards (B, T): -kl_coef * KL_t at every completion token, plus the completion's
    score (B,) at its last token; 0 past each length."""
    B, T = kl.shape
    valid = torch.arange(T, device=kl.device)[None] < lengths[:, None]
    r = torch.where(valid, -kl_coef * kl, torch.zeros((), device=kl.device))
    r[torch.arange(B, device=kl.device), lengths - 1] += scores
    return r


def discounted_returns(rewards, gamma=1.0):
    """G_t = sum_{s >= t} gamma^(s - t) r_s per row of (B, T) rewards (REINFORCE++'s advantage, unnormalised)."""
    out, running = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        out[:, t] = running
    return out


def gae(rewards, values, lengths, gamma=1.0, lam=0.95):
    """Generalized advantage estimation (Schulman et al. 2016): delta_t = r_t + gamma V_{t+1} - V_t,
    A_t = delta_t + gamma lam A_{t+1}, with V = 0 after the last token (the episode ends there).
    Returns (advantages, returns = A + V), both 0 past each length."""
    T = rewards.shape[1]
    valid = (torch.arange(T, device=rewards.device)[None] < lengths[:, None]).to(rewards.dtype)
    values = values * valid
    adv, last = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else 0.0
        last = rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * last
        adv[:, t] = last
    adv = adv * valid
    return adv, adv + values


def moments(x, mask):
    """(sum, sum of squares, count) of x where mask is set, float64: summed over ranks, they give global stats."""
    m = mask.to(torch.float64)
    x = x.to(torch.float64) * m
    return torch.stack([x.sum(), (x * x).sum(), m.sum()])


def whiten(x, mask, stats=None):
    """(x - mean) / sqrt(var + 1e-8) where mask is set, 0 elsewhere; mean and (unbiased) variance from stats =
    moments(...) of the whole global batch, or of (x, mask) itself."""
    s, s2, n = (moments(x, mask) if stats is None else stats).tolist()
    mean = s / max(n, 1)
    var = (s2 - n * mean * mean) / max(n - 1, 1)
    return torch.where(mask.bool(), (x - mean) / (var + 1e-8) ** 0.5, torch.zeros((), device=x.device))


def adaptive_kl_coef(kl_coef, kl, target, n_steps, horizon=10000):
    """Ziegler et al. 2019's adaptive KL controller (as TRL): the proportional error e = clip(kl / target - 1,
    -0.2, 0.2) moves kl_coef by the factor 1 + e * n_steps / horizon. kl: the batch's mean per-completion KL
    (summed over its tokens); n_steps: the number of rollouts in the batch."""
    e = min(max(kl / target - 1, -0.2), 0.2)
    return kl_coef * (1 + e * n_steps / horizon)


def clipped_objective(logp, old_logp, advantages, epsilon=0.2, epsilon_high=None, mask=None, level="token"):
    """PPO's clipped surrogate per token: min(ratio * A, clip(ratio, 1 - eps, 1 + eps_high) * A), ratio =
    exp(logp - old_logp); advantages (B,) per completion or (B, T) per token. level "sequence" (GSPO): every token
    of a completion takes its ratio exp(mean over its tokens (mask) of logp - old_logp), whose gradient is the
    mean of the tokens' grad log pi. Returns the objective (to maximise) and where the clipped side is taken
    (no gradient flows there)."""
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    log_ratio = logp - old_logp
    if level == "sequence":
        m = mask.to(logp.dtype)
        log_ratio = ((log_ratio * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1)).expand_as(logp)
    ratio = torch.exp(log_ratio)
    a = advantages if advantages.dim() == 2 else advantages[:, None]
    unclipped = ratio * a
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high) * a
    return torch.minimum(unclipped, clipped), clipped < unclipped


def value_loss(values, old_values, returns, cliprange_value=0.2):
    """PPO's clipped value loss per token, 0.5 * max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2), and where
    the clipped term is the larger (TRL's vf_clipfrac)."""
    clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    unclipped_loss, clipped_loss = (values - returns) ** 2, (clipped - returns) ** 2
    return 0.5 * torch.maximum(unclipped_loss, clipped_loss), clipped_loss > unclipped_loss


def loss_numerator(per_token_loss, mask, loss_type):
    """The step loss is loss_numerator summed over micro-batches / loss_denominator of the whole step
    (so it does not depend on how the step is cut into micro-batches and ranks).
    grpo: sum over completions of their token mean; dapo, dr_grpo: sum over all tokens."""
    m = mask.to(per_token_loss.dtype)
    if loss_type == "grpo":
        return ((per_token_loss * m).sum(1) / m.sum(1).clamp(min=1)).sum()
    assert loss_type in ("dapo", "dr_grpo"), f"unknown loss_type {loss_type!r}: use grpo, dapo or dr_grpo"
    return (per_token_loss * m).sum()


def loss_denominator(mask, loss_type, max_new_tokens):
    """grpo: number of completions; dapo: number of tokens; dr_grpo: completions * max_new_tokens
    (a constant per completion, so long and short answers are not re-weighted). Completions whose
    mask is all zero (dropped by dynamic sampling or overlong filtering) do not count."""
    n_seq = (mask.sum(1) > 0).sum()
    if loss_type == "grpo":
        return n_seq
    if loss_type == "dapo":
        return mask.sum()
    assert loss_type == "dr_grpo", f"unknown loss_type {loss_type!r}: use grpo, dapo or dr_grpo"
    return n_seq * max_new_tokens


def aggregate_loss(per_token_loss, mask, loss_type, max_new_tokens):
    """The loss of one batch by itself (what the training loop computes over a whole optimizer step)."""
    return loss_numerator(per_token_loss, mask, loss_type) / loss_denominator(mask, loss_type, max_new_tokens)


def grpo_token_loss(logp, old_logp, advantages, ref_logp=None, beta=0.0, epsilon=0.2, epsilon_high=None,
                    mask=None, level="token"):
    """Per-token policy loss (B, T): -clipped objective + beta * k3 KL. old_logp None: on-policy (the ratio is
    exp(logp - logp.detach()) = 1, with the gradient of logp). Returns (loss, is_clipped)."""
    old_logp = logp.detach() if old_logp is None else old_logp
    objective, is_clipped = clipped_objective(logp, old_logp, advantages, epsilon, epsilon_high, mask, level)
    loss = -objective
    if ref_logp is not None and beta > 0:
        loss = loss + beta * k3_kl(logp, ref_logp)
    return loss, is_clipped


def soft_overlong_penalty(lengths, max_new_tokens, buffer, penalty=1.0):
    """DAPO's soft overlong punishment: 0 up to max_new_tokens - buffer tokens, then falling linearly
    to -penalty at max_new_tokens (a completion cut off there scores -penalty)."""
    start = max_new_tokens - buffer
    return -penalty * ((lengths.float() - start) / buffer).clamp(0, 1)


def _rows(prompts, completions, lengths):
    """Rows prompt + completion (right-padded), their next-token targets, and per completion token the column of
    the position that predicts it (and whether the token exists). Causal attention never looks right, so the pads
    need no mask, and positions count from each row's first token just as in generate (which left-pads)."""
    B, N = completions.shape
    device = completions.device
    rows = [p + c[:n] for p, c, n in zip(prompts, completions.tolist(), lengths.tolist())]
    T = max(map(len, rows))
    idx = torch.zeros(B, T, dtype=torch.long)  # pad id 0: only ever read by positions nothing attends from
    targets = torch.full((B, T), -100, dtype=torch.long)
    for b, (p, row) in enumerate(zip(prompts, rows)):
        idx[b, :len(row)] = torch.tensor(row)
        targets[b, len(p) - 1:len(row) - 1] = torch.tensor(row[len(p):])  # position t predicts token t + 1
    start = torch.tensor([len(p) - 1 for p in prompts], device=device)
    j = torch.arange(N, device=device)
    cols = (start[:, None] + j[None]).clamp(max=T - 2)
    return idx.to(device)[:, :-1], targets.to(device)[:, :-1], cols, j[None] < lengths[:, None].to(device)


def completion_logprobs(model, prompts, completions, lengths, temperature=1.0):
    """Log-probs (B, N) of completions[b, :lengths[b]] after prompts[b] (lists of ids) under
    softmax(logits / temperature), from a training forward through model (the DDP/FSDP wrapper,
    so that gradients synchronise); 0 past each length."""
    idx, targets, cols, valid = _rows(prompts, completions, lengths)
    _, nll = model(idx, targets, reduction="none", temperature=temperature)
    return torch.where(valid, -nll.gather(1, cols), torch.zeros((), device=idx.device))


def completion_values(critic, prompts, completions, lengths):
    """The critic's V(s_t) (B, N) for each completion token: its head at the position that predicts the token
    (the state is the prompt and the completion before it), through critic (its DDP/FSDP wrapper); 0 past each
    length."""
    idx, _, cols, valid = _rows(prompts, completions, lengths)
    return torch.where(valid, critic(idx).gather(1, cols), torch.zeros((), device=idx.device))


def score_completions(examples, completions, funcs, weights):
    """Rule-based rewards: examples and completion texts (N each), reward functions and weights ->
    (total (N,), per function (K, N)) as float tensors on the CPU."""
    per = torch.tensor([[float(f(ex, c)) for ex, c in zip(examples, completions)] for f in funcs],
                       dtype=torch.float32).view(len(funcs), len(completions))  # K = 0: a learned reward only
    w = torch.tensor(weights, dtype=torch.float32).view(-1, 1)
    return (per * w).sum(0) if funcs else torch.zeros(len(completions)), per


# -----------------------------------------------------------------------------
# config
# I/O
init_from = "out/sft/ckpt.pt"  # the policy (and reference) starts here; "resume": from out_dir/ckpt.pt
out_dir = "out/grpo"
# data
dataset = "tasks"            # "tasks" (data/tasks.py) | "gsm8k" (openai/gsm8k "main" via `datasets`)
data_path = ""               # gsm8k: a local .jsonl/.json/.parquet train file with the openai/gsm8k schema
eval_data_path = ""          # gsm8k: the same for the test split
skip_bad = False             # gsm8k: skip (and count) malformed records instead of stopping at the first
n_train = 20000              # tasks: number of training questions
task_subset = "add,count,max"  # tasks: comma-separated subset of data.tasks.TASKS to train and test on ("" = all);
                             # the default leaves out reverse and sort, which SFT already solves (~100%): no signal
system_prompt = ""           # a system message before every question ("" = none)
# rewards: rule-based functions from data/rewards.py, and/or a learned reward model (reward.py)
reward_funcs = ("exact",)    # names in data.rewards.REWARD_FUNCS: exact | format | gsm8k
reward_weights = ()          # one per reward function; () = all 1.0
reward_model = ""            # path of a reward.py checkpoint ("" = none)
reward_model_weight = 1.0
missing_eos_penalty = 0.0    # subtracted from the score of a completion cut off at max_new_tokens (TRL; 0 = off)
overlong_buffer = 0          # DAPO soft overlong punishment over the last overlong_buffer tokens (0 = off)
overlong_penalty = 1.0       # its largest penalty (at max_new_tokens)
reward_norm = False          # standardise the scores over the global rollout batch
reward_clip = 0.0            # then clip them to [-reward_clip, reward_clip] (0 = off)
# rollouts
num_generations = 16         # G completions per prompt (>= 2 for grpo, rloo and dynamic sampling)
prompts_per_step = 8         # prompts per rollout batch, over all ranks (each rank samples its share)
max_new_tokens = 16
temperature = 1.0            # sampling temperature; the training log-probs use the same one
top_p = 1.0
top_k = 0                    # 0 = off
dynamic_sampling = True      # DAPO: drop groups with all-equal scores, sample more prompts to fill the batch
max_sampling_rounds = 3      # dynamic sampling: at most this many rollout rounds per step
# advantages
advantage_estimator = "grpo"  # "grpo" | "rloo" | "reinforce++" | "gae" (PPO: a critic and GAE)
epsilon_std = 1e-4           # grpo: added to the group std before dividing
scale_rewards = True         # grpo: False: A = r - mean (Dr. GRPO)
gamma = 1.0                  # reinforce++, gae: discount
lam = 0.95                   # gae: lambda
# KL to the reference (the initial policy): in the reward (kl_coef) and/or in the loss (beta)
kl_coef = 0.0                # r_t -= kl_coef * KL_t (summed over the completion for grpo and rloo); 0 = off
kl_estimator = "k1"          # the KL_t in the reward: "k1" (log pi/pi_ref) | "k3"
kl_target = 0.0              # > 0: adaptive KL controller steering the per-completion KL to this (0 = fixed kl_coef)
kl_horizon = 10000           # the controller's horizon, in rollouts
beta = 0.0                   # k3 KL in the loss; with kl_coef = 0 too, no reference model is kept
# policy loss
epsilon = 0.2                # clip range below 1 (GSPO: ~3e-4)
epsilon_high = 0.2           # clip range above 1 (DAPO clip-higher: 0.28; GSPO: ~4e-4)
importance_sampling_level = "token"  # "token" | "sequence" (GSPO: one length-normalised ratio per completion)
loss_type = "grpo"           # "grpo" | "dapo" | "dr_grpo"
mask_truncated_completions = False  # DAPO overlong filtering: no loss on completions cut off at max_new_tokens
num_ppo_epochs = 1           # passes over each rollout batch (GRPO's mu)
num_mini_batches = 1         # optimizer steps per pass (each on a random 1/num_mini_batches of the batch)
ptx_coef = 0.0               # PPO-ptx: + ptx_coef * the SFT NLL of gold answers to training questions (0 = off)
ptx_batch_size = 8           # questions per optimizer step for the ptx term, over all ranks
# critic (advantage_estimator = "gae")
value_model = "reward"       # the critic starts from "reward" (the reward model) | "policy" (a fresh zero head)
critic_lr = 1e-4             # the critic's own AdamW (same schedule, betas, weight decay as the policy's)
vf_coef = 0.1                # the value loss's weight in the loss (one gradient clip covers policy and critic)
cliprange_value = 0.2        # value clipping around the rollout-time values
# optimisation
max_steps = 300              # rollout batches
micro_batch_size = 64        # completions per forward/backward
lr = 3e-5                    # ~1e-6 full fine-tuning at scale; 5e-4 already collapses the default model
min_lr = 3e-5
warmup_steps = 0
lr_schedule = "constant"     # cosine | wsd | constant
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.99
adam_eps = 1e-8
grad_clip = 1.0              # 0 = off
# LoRA (lora_r = 0: full fine-tuning); the reference model is then the base with adapters off
lora_r = 0
lora_alpha = 16.0
lora_dropout = 0.0           # dropout would make the policy stochastic: ratio and sampled log-probs disagree
lora_targets = "all"
lora_rslora = False
# eval: greedy exact-answer accuracy on held-out (test split) questions
eval_interval = 50           # 0 = only before and after training
eval_size = 500
eval_batch_size = 250
eval_samples = 2             # sampled completions printed at each log line (0 = none)
log_interval = 1
ckpt_interval = 50           # save (with optimizer and sampling state, for init_from="resume"); 0 = at the end
halt_at_step = -1            # stop early at this step, keeping the schedule (a planned interruption)
# system
seed = 1337
parallel = "ddp"             # under torchrun: ddp | fsdp
device = "auto"              # auto | cpu | cuda
kernels = "auto"             # auto | triton | torch
dtype = "auto"               # weights: auto (as stored, fp32 on the CPU: HF bf16 stays bf16 on CUDA) | float32 |
                             # bfloat16
compile = False
peak_flops = None          # dense bf16 FLOP/s of one device for MFU; None: looked up from the device name
report_dir = ""              # the summary goes into report_dir/<stage>.json and report.md ("": beside out_dir)
wandb_log = False
wandb_project = "grpo"
wandb_run_name = "grpo"


# what the configurator accepts (checked before any work is done)
_choices = dict(dataset=("tasks", "gsm8k"), reward_funcs=("exact", "format", "gsm8k"),
                advantage_estimator=("grpo", "rloo", "reinforce++", "gae"), kl_estimator=("k1", "k3"),
                importance_sampling_level=("token", "sequence"), value_model=("reward", "policy"),
                loss_type=("grpo", "dapo", "dr_grpo"), lr_schedule=SCHEDULES, parallel=("ddp", "fsdp"),
                device=("auto", "cpu", "cuda"), kernels=("auto", "triton", "torch"), lora_targets=check_targets,
                dtype=("auto", "float32", "bfloat16"))
_ranges = dict(n_train="[1, inf)", missing_eos_penalty="[0, inf)", overlong_buffer="[0, inf)",
               overlong_penalty="[0, inf)", reward_clip="[0, inf)", num_generations="[1, inf)",
               prompts_per_step="[1, inf)", max_new_tokens="[1, inf)", temperature="(0, inf)", top_p="(0, 1]",
               top_k="[0, inf)", max_sampling_rounds="[1, inf)", epsilon_std="[0, inf)", gamma="[0, 1]",
               lam="[0, 1]", kl_coef="[0, inf)", kl_target="[0, inf)", kl_horizon="[1, inf)", beta="[0, inf)",
               epsilon="[0, 1)", epsilon_high="[0, inf)", num_ppo_epochs="[1, inf)", num_mini_batches="[1, inf)",
               ptx_coef="[0, inf)", ptx_batch_size="[1, inf)", critic_lr="(0, inf)", vf_coef="[0, inf)",
               cliprange_value="(0, inf)", max_steps="[1, inf)", micro_batch_size="[1, inf)", lr="(0, inf)",
               min_lr="[0, inf)", warmup_steps="[0, inf)", weight_decay="[0, inf)", beta1="[0, 1)", beta2="[0, 1)",
               adam_eps="(0, inf)", grad_clip="[0, inf)", lora_r="[0, inf)", lora_alpha="(0, inf)",
               lora_dropout="[0, 1)", eval_interval="[0, inf)", eval_size="[1, inf)", eval_batch_size="[1, inf)",
               eval_samples="[0, inf)", log_interval="[1, inf)", ckpt_interval="[0, inf)",
               halt_at_step="[1, inf) or -1", peak_flops="(0, inf)")
# init_from="resume" continues with the checkpoint's policy, critic, reference and data: these must not change
_resume_fixed = ("dataset", "data_path", "eval_data_path", "n_train", "task_subset", "system_prompt", "seed",
                 "num_generations", "prompts_per_step", "max_new_tokens", "lora_r", "lora_alpha", "lora_targets",
                 "lora_rslora", "lora_dropout", "eval_size", "reward_model", "advantage_estimator", "value_model",
                 "ptx_batch_size", "dtype")
_resume_schedule = ("reward_funcs", "reward_weights", "reward_model_weight", "missing_eos_penalty", "overlong_buffer",
                    "overlong_penalty", "reward_norm", "reward_clip", "temperature", "top_p", "top_k",
                    "dynamic_sampling", "max_sampling_rounds", "epsilon_std", "scale_rewards", "gamma", "lam",
                    "kl_coef", "kl_estimator", "kl_target", "kl_horizon", "beta", "epsilon", "epsilon_high",
                    "importance_sampling_level", "loss_type", "mask_truncated_completions", "num_ppo_epochs",
                    "num_mini_batches", "ptx_coef", "critic_lr", "vf_coef", "cliprange_value", "max_steps",
                    "micro_batch_size", "lr", "min_lr", "warmup_steps", "lr_schedule", "world_size")


# -----------------------------------------------------------------------------
# the run (`import grpo` stops above: the tests import the functions)
if __name__ == "__main__":
    from configs import configure
    config = configure(globals())

    from checkpoint import (check_vocab, check_writable, fingerprint, load_model, load_optimizer_state,
                            model_state_dict, optimizer_state_dict, restore_rng_states, rng_states, save_checkpoint,
                            training_checkpoint)
    from data import tasks
    from data.chat import BadRecord, render, render_prompt
    from data.records import DataError
    from data.rewards import get_reward_funcs, is_correct, load_gsm8k
    from data.tokenizer import get_tokenizer
    from distributed import (check_replicas_identical, device_peak_flops, fsdp_gathered, grad_sync, mfu, parallelize,
                             setup_distributed, teardown_distributed, unwrap)
    from lora import apply_lora, lora_disabled, lora_modules, merge_lora
    from model import RewardModel, Transformer
    from optim import configure_optimizer, lr_at, mark_nonfinite, stop_if_nonfinite
    from report import MetricsLogger, run_setup, write_summary
    from reward import score_conversations

    def fail(msg):
        raise SystemExit(f"grpo: {msg}")

    G, ppo = num_generations, advantage_estimator == "gae"
    if dataset != "gsm8k" and (data_path or eval_data_path):
        fail(f"data_path / eval_data_path are GSM8K files, but dataset={dataset!r}: add --dataset=gsm8k "
             f"(or drop the paths to train on the built-in tasks)")
    if not reward_funcs and not reward_model:
        fail("no reward: set reward_funcs (e.g. ('exact',)) and/or reward_model=PATH")
    weights = tuple(reward_weights) or (1.0,) * len(reward_funcs)
    if len(weights) != len(reward_funcs):
        fail(f"reward_weights {tuple(reward_weights)} must have one weight per reward function {tuple(reward_funcs)}")
    funcs = get_reward_funcs(reward_funcs)
    if overlong_buffer and not 0 < overlong_buffer <= max_new_tokens:
        fail(f"overlong_buffer={overlong_buffer} must be in 1..max_new_tokens ({max_new_tokens})")
    if advantage_estimator in ("grpo", "rloo") and G < 2:
        fail(f"advantage_estimator={advantage_estimator!r} compares the completions of a prompt: it needs "
             f"num_generations >= 2 (got {G}); with one completion per prompt use reinforce++ or gae")
    if dynamic_sampling and G < 2:
        fail(f"dynamic_sampling drops prompts whose completions all score the same, which needs num_generations "
             f">= 2 (got {G}): add --dynamic_sampling=False")
    if ppo and value_model == "reward" and not reward_model:
        fail("the critic starts from the reward model (value_model='reward'), but reward_model is not set: give "
             "--reward_model=PATH, or --value_model=policy")
    if kl_target and not kl_coef:
        fail(f"kl_target={kl_target} adapts kl_coef, which is 0: set a starting --kl_coef (e.g. 0.05)")

    ddp, rank, world_size, device, autocast = setup_distributed(device)
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    if prompts_per_step % world_size or ptx_batch_size % world_size:
        fail(f"prompts_per_step={prompts_per_step} and ptx_batch_size={ptx_batch_size} must be divisible by the "
             f"number of ranks ({world_size})")
    local_prompts = prompts_per_step // world_size
    if local_prompts * G < num_mini_batches:
        fail(f"num_mini_batches={num_mini_batches} is more than the {local_prompts * G} completions each rank "
             f"samples per step (prompts_per_step / ranks x num_generations)")
    use_ref = beta > 0 or kl_coef > 0

    # -------------------------------------------------------------------------
    # policy, reference, reward model, critic
    resume = init_from == "resume"
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    source = ckpt_path if resume else init_from
    if not os.path.exists(source):
        hint = "python sft.py" if init_from == "out/sft/ckpt.pt" else "the stage that writes it"
        fail(f"init checkpoint {source} not found. Run `{hint}` first, or pass --init_from=PATH.")
    weights_dtype = None if dtype == "auto" else getattr(torch, dtype)
    # no dropout: the importance ratio and the sampled log-probs assume one deterministic policy
    try:
        model, ckpt = load_model(source, "cpu", kernels=kernels, dropout=0.0, dtype=weights_dtype)
        tok = get_tokenizer(ckpt["tokenizer"])
        check_vocab(model, tok, source)
    except ValueError as e:  # e.g. a reward model where a language model is needed, a corrupt file
        fail(f"init_from: {e}")
    lora = dict(targets=lora_targets, r=lora_r, alpha=lora_alpha, dropout=lora_dropout, rslora=lora_rslora) \
        if lora_r > 0 else None
    ref_model = critic = None
    if resume:  # the checkpoint's policy (LoRA: with its adapters, unmerged); the reference is the initial policy
        from configs import check_resume
        check_resume(ckpt, {**config, "world_size": world_size}, _resume_fixed, _resume_schedule, ckpt_path)
        base_init, start_step, ev0, ev = ckpt["init_from"], ckpt["step"], ckpt["ev0"], ckpt["ev"]
        if use_ref and not lora:
            if ckpt["init_fingerprint"] != fingerprint(base_init):
                fail(f"cannot resume {ckpt_path}: its reference, the initial policy {base_init}, has changed since "
                     f"the run started (fingerprint mismatch); restore it")
            ref_model, _ = load_model(base_init, "cpu", kernels=kernels, dropout=0.0, dtype=weights_dtype)
        if ppo:
            critic, _ = load_model(dict(model_config=ckpt["critic_config"], model=ckpt["critic"]), "cpu", "reward",
                                   kernels=kernels, dropout=0.0, dtype=weights_dtype)
        if kl_target:  # the adaptive controller's state; a fixed kl_coef may be changed on resume (with a warning)
            kl_coef = ckpt["kl_coef"]
    else:
        base_init, start_step = os.path.abspath(init_from), 0
        if lora_modules(model):
            merge_lora(model)  # an adapter checkpoint from sft.py: start from the merged model
        if ppo and value_model == "policy":
            critic = RewardModel(copy.deepcopy(model))  # the policy's weights, a zero head: every value starts at 0
        if lora:
            torch.manual_seed(seed)  # the same adapter init on every rank (FSDP does not broadcast parameters)
            apply_lora(model, **lora)  # the reference is then free: the same model with its adapters off
        elif use_ref:
            ref_model = copy.deepcopy(model)
    if master:
        check_writable(out_dir, protect=(base_init,))
    init_fingerprint = fingerprint(base_init)
    cfg = model.config
    torch.manual_seed(seed + rank)
    model.to(device)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"init from {init_from}: {model.num_params() / 1e6:.2f}M params, {n_trainable / 1e6:.3f}M trainable"
        f"{f' (LoRA r={lora_r})' if lora else ''}, reference: "
        f"{'none' if not use_ref else 'base with adapters off' if lora else 'frozen copy'}, "
        f"device {device}, world {world_size}, advantages {advantage_estimator}")
    rm = None
    if reward_model:
        # reward.py trains from the SFT checkpoint, so it shares the policy's tokenizer
        try:
            rm, _ = load_model(reward_model, device, kind="reward", kernels=kernels, dtype=weights_dtype)
            if ppo and critic is None:  # the critic starts as a copy of the reward model (TRL, InstructGPT)
                critic, _ = load_model(reward_model, "cpu", kind="reward", kernels=kernels, dropout=0.0,
                                       dtype=weights_dtype)
            check_vocab(rm, tok, reward_model)
        except ValueError as e:
            fail(f"reward_model: {e}")
        rm.eval().requires_grad_(False)
        log(f"reward model {reward_model}: {sum(p.numel() for p in rm.parameters()) / 1e6:.2f}M params, "
            f"weight {reward_model_weight}")
    if critic is not None:
        log(f"critic: {sum(p.numel() for p in critic.parameters()) / 1e6:.2f}M params, from "
            f"{'the checkpoint' if resume else 'the policy' if value_model == 'policy' else reward_model}")

    # -------------------------------------------------------------------------
    # data: examples are dicts with "prompt" and "answer" (plus "task"; GSM8K also "solution")
    if dataset == "tasks":
        names = tuple(t.strip() for t in task_subset.split(",")) if task_subset else tasks.TASKS
        if set(names) - set(tasks.TASKS):
            fail(f"unknown task(s) {sorted(set(names) - set(tasks.TASKS))} in task_subset: "
                 f"choose from {', '.join(tasks.TASKS)}")
        train_examples = tasks.generate(n_train, "train", seed=seed, tasks=names)
        test_examples = tasks.generate(eval_size, "test", seed=0, tasks=names)
    else:
        try:
            train_examples = load_gsm8k("train", data_path or None, skip_bad, log)
            test_examples = load_gsm8k("test", eval_data_path or None, skip_bad, log)
        except (BadRecord, DataError, FileNotFoundError) as e:
            fail(str(e))
        if len(test_examples) > eval_size:
            log(f"evaluating on the first {eval_size} of {len(test_examples)} test questions (eval_size)")
            test_examples = test_examples[:eval_size]

    def prompt_ids(ex):
        return render_prompt(tasks.to_messages(ex, system_prompt or None), tok)

    budget = cfg.max_seq_len - max_new_tokens
    n_before = len(train_examples)
    train_examples = [ex for ex in train_examples if len(prompt_ids(ex)) <= budget]
    if not train_examples:
        fail(f"every prompt is longer than max_seq_len - max_new_tokens = {budget} tokens; lower --max_new_tokens")
    n_test_before = len(test_examples)
    test_examples = [ex for ex in test_examples if len(prompt_ids(ex)) <= budget]
    task_names = list(dict.fromkeys(ex["task"] for ex in test_examples))
    log(f"data {dataset}: {len(train_examples)} train prompts ({n_before - len(train_examples)} dropped as too long), "
        f"{len(test_examples)} test ({n_test_before - len(test_examples)} dropped as too long); "
        f"rewards {dict(zip(reward_funcs, weights))}"
        f"{f' + reward model x{reward_model_weight}' if rm else ''}")
    # Rollouts are sharded by prompt: each rank owns a disjoint stream of prompts and samples all G
    # completions of each of them itself, so every group lives on one rank and its advantages (which
    # need only that group's rewards) are computed there, with no communication.
    order = torch.randperm(len(train_examples), generator=torch.Generator().manual_seed(seed)).tolist()
    my_order, cursor = order[rank::world_size], 0  # this rank's place in its stream (saved for an exact resume)
    ptx_order = torch.randperm(len(train_examples), generator=torch.Generator().manual_seed(seed + 1)).tolist()

    def next_prompts(n):
        global cursor
        out = [train_examples[my_order[(cursor + i) % len(my_order)]] for i in range(n)]
        cursor += n
        return out

    def ptx_batch(opt_step):
        """PPO-ptx: this rank's gold (prompt, answer) ids for an optimizer step, a function of the step alone."""
        n = ptx_batch_size // world_size
        exs = [train_examples[ptx_order[(opt_step * ptx_batch_size + rank * n + i) % len(ptx_order)]]
               for i in range(n)]
        prompts, answers = [], []
        for ex in exs:
            p = prompt_ids(ex)
            full = render(tasks.to_messages(dict(ex, answer=ex.get("solution", ex["answer"])),
                                            system_prompt or None), tok)[0]
            answers.append(full[len(p):len(full) - full[::-1].index(tok.end_of_turn_id)][:max_new_tokens])
            prompts.append(p)
        lengths = torch.tensor([len(a) for a in answers], device=device)
        ids = torch.zeros(n, int(lengths.max()), dtype=torch.long, device=device)
        for i, a in enumerate(answers):
            ids[i, :len(a)] = torch.tensor(a)
        return prompts, ids, lengths

    # -------------------------------------------------------------------------
    # training setup
    model = parallelize(model, parallel if ddp else "none", device)
    # after parallelize: FSDP2 replaces the parameters with sharded ones
    optimizer = configure_optimizer(model, lr, weight_decay, (beta1, beta2), adam_eps, device.type)
    if ref_model is not None:
        ref_model.to(device).eval().requires_grad_(False)
        if ddp and parallel == "fsdp":
            parallelize(ref_model, "fsdp", device)  # sharded like the policy, forward-only
    critic_optimizer = None
    if critic is not None:
        critic = parallelize(critic.to(device).train(), parallel if ddp else "none", device)
        critic_optimizer = configure_optimizer(critic, critic_lr, weight_decay, (beta1, beta2), adam_eps, device.type)
    if compile:
        model = torch.compile(model)
    raw_model = unwrap(model)
    trained = [raw_model] + ([unwrap(critic)] if critic is not None else [])  # the modules the optimizers step
    peak_flops = peak_flops or device_peak_flops(device)  # for MFU; None on a CPU
    sample_gen = torch.Generator(device=device).manual_seed(seed + rank)
    gen_tokens = 0  # completion tokens this rank generated (all rounds), for comparisons at equal sampling budgets
    if resume:
        load_optimizer_state(model, optimizer, ckpt["optimizer"])
        if critic is not None:
            load_optimizer_state(critic, critic_optimizer, ckpt["critic_optimizer"])
        restore_rng_states(ckpt["rng"], rank, device, generators=(sample_gen,))
        cursor = ckpt["cursors"][rank % len(ckpt["cursors"])]
        gen_tokens = ckpt["gen_tokens"][rank % len(ckpt["gen_tokens"])]
    del ckpt
    stop = tok.stop_ids  # the end-of-turn token of the checkpoint's chat template (and its eos tokens)
    stop_t = torch.tensor(stop, device=device)

    def decode(tokens, lengths):
        return [tok.decode_reply(row[:n]) for row, n in zip(tokens.tolist(), lengths.tolist())]

    def evaluate():
        """Greedy exact-answer accuracy on the held-out questions, overall and per task, split over ranks."""
        with autocast:
            return tasks.exact_match(raw_model, tok, test_examples, max_new_tokens, eval_batch_size,
                                     system_prompt or None, rank=rank, world_size=world_size, score=is_correct)

    def report(step, ev):
        per_task = " ".join(f"{t} {a:.0%}" for t, a in ev[1].items()) if len(ev[1]) > 1 else ""
        log(f"eval step {step} | held-out accuracy {ev[0]:.1%}" + (f" ({per_task})" if per_task else ""))
        metrics.log(step, accuracy=ev[0], **{f"accuracy_{t}": a for t, a in ev[1].items()})

    def all_sum(t):
        if ddp:
            dist.all_reduce(t)
        return t

    def mean_std(x, m):
        s, s2, n = moments(x, m).tolist()
        mean = s / max(n, 1)
        return mean, max(s2 / max(n, 1) - mean * mean, 0.0) ** 0.5

    @torch.no_grad()
    def rollout(examples):
        """G sampled completions of each example (one generate call), their scores and correctness."""
        prompts = [prompt_ids(ex) for ex in examples for _ in range(G)]
        exs = [ex for ex in examples for _ in range(G)]
        with autocast:
            g = raw_model.generate(prompts, max_new_tokens, temperature=temperature, top_k=top_k or None,
                                   top_p=top_p, stop_tokens=stop, pad_id=tok.pad_id, generator=sample_gen)
        B, N = g["tokens"].shape
        tokens = torch.full((B, max_new_tokens), tok.pad_id, dtype=torch.long, device=device)
        logprobs = torch.zeros(B, max_new_tokens, device=device)
        tokens[:, :N], logprobs[:, :N] = g["tokens"], g["logprobs"]
        lengths = g["lengths"]
        ended = torch.isin(tokens[torch.arange(B, device=device), lengths - 1], stop_t)  # not cut off
        texts = decode(g["tokens"], lengths)
        rewards, per_func = score_completions(exs, texts, funcs, weights)
        if rm is not None:
            convs = [tasks.to_messages(dict(prompt=ex["prompt"], answer=t), system_prompt or None)
                     for ex, t in zip(exs, texts)]
            with autocast:
                rm_scores = score_conversations(rm, convs, tok).float().cpu()
            rewards = rewards + reward_model_weight * rm_scores
            per_func = torch.cat([per_func, rm_scores[None]])
        if overlong_buffer:
            rewards = rewards + soft_overlong_penalty(lengths.cpu(), max_new_tokens, overlong_buffer, overlong_penalty)
        rewards = rewards - missing_eos_penalty * (~ended).float().cpu()
        return dict(prompts=prompts, tokens=tokens, lengths=lengths, logprobs=logprobs, rewards=rewards,
                    ended=ended, per_func=per_func.T, texts=texts, examples=exs,
                    correct=torch.tensor([float(is_correct(e, t)) for e, t in zip(exs, texts)]))

    def select(batch, rows):
        return {k: [v[i] for i in rows] if isinstance(v, list) else v[torch.tensor(rows, device=v.device)]
                for k, v in batch.items()}

    def concat(parts):
        return {k: sum((p[k] for p in parts), []) if isinstance(parts[0][k], list) else torch.cat([p[k] for p in parts])
                for k in parts[0]}

    def sample_groups():
        """This rank's rollout batch of local_prompts groups. With dynamic sampling (DAPO), groups whose
        scores are all equal (zero advantage: no signal) are dropped and more prompts sampled, for at most
        max_sampling_rounds rounds; if too few survive, dropped groups fill the batch at weight 0, so every
        rank runs the same number of micro-batches (DDP). Returns (batch, its row weights, every rollout
        generated this step (for logging), the number of groups kept, the number of rounds)."""
        kept, dropped, generated = [], [], []
        raw_model.eval()
        with fsdp_gathered(raw_model):  # one gather for all sampling rounds (ranks may do different numbers)
            for _ in range(max_sampling_rounds if dynamic_sampling else 1):
                batch = rollout(next_prompts(local_prompts))
                generated.append(batch)
                alive = (batch["rewards"].view(-1, G).std(1) > 0 if dynamic_sampling
                         else torch.ones(local_prompts, dtype=torch.bool))
                for g_i in range(local_prompts):
                    (kept if alive[g_i] else dropped).append(select(batch, list(range(g_i * G, (g_i + 1) * G))))
                if len(kept) >= local_prompts:
                    break
        raw_model.train()
        groups = kept[:local_prompts] + dropped[:max(0, local_prompts - len(kept))]
        n_kept = min(len(kept), local_prompts)
        weight = torch.tensor([1.0] * (n_kept * G) + [0.0] * ((len(groups) - n_kept) * G), device=device)
        return concat(groups), weight, concat(generated), n_kept, len(generated)

    @torch.no_grad()
    def forward_all(fn, net, batch, micro, *args):
        """fn(net, ...) over the rollout batch in micro-batches, in eval mode: (B, N)."""
        was = unwrap(net).training
        unwrap(net).eval()
        with autocast:
            out = torch.cat([fn(net, batch["prompts"][s], batch["tokens"][s], batch["lengths"][s], *args).float()
                             for s in micro])
        unwrap(net).train(was)
        return out

    def advantages(batch, mask, valid, ref_logp, values):
        """Scores -> (advantages (B,) or (B, N), returns (B, N), per-token KL (B, N) or None), over this rank's
        batch, with the normalisations over the global batch (all ranks)."""
        scores, lengths = batch["rewards"].to(device), batch["lengths"]
        rows = (mask.sum(1) > 0).float()
        if reward_norm:
            scores = whiten(scores, rows, all_sum(moments(scores, rows)))
        if reward_clip:
            scores = scores.clamp(-reward_clip, reward_clip)
        kl = kl_penalty(batch["logprobs"], ref_logp, kl_estimator) * valid if ref_logp is not None else None
        r = kl_shaped_rewards(scores, kl if kl_coef else torch.zeros_like(valid), lengths, kl_coef)
        if advantage_estimator in ("grpo", "rloo"):
            seq = r.sum(1)
            adv = group_advantages(seq, G, scale_rewards, epsilon_std) if advantage_estimator == "grpo" \
                else rloo_advantages(seq, G)
            return adv, seq[:, None] * valid, kl
        if advantage_estimator == "reinforce++":
            returns = discounted_returns(r, gamma)
            return whiten(returns, mask, all_sum(moments(returns, mask))), returns, kl
        adv, returns = gae(r, values, lengths, gamma, lam)
        return whiten(adv, mask, all_sum(moments(adv, mask))), returns, kl

    def policy_update(batch, adv, mask, ref_logp, old_values, returns, step):
        """num_ppo_epochs passes over one rollout batch of num_mini_batches optimizer steps each (policy and
        critic). Returns (sums over the steps and tokens of loss, clipped tokens, tokens, value loss, clipped
        values, ptx NLL, and |logp - generate's logp| before the first step, the last grad_norm, optimizer steps)."""
        global first_bad
        B, M = mask.shape[0], num_mini_batches
        stats = dict(loss=0.0, clipped=0.0, tokens=0.0, vf_loss=0.0, vf_clipped=0.0, ptx=0.0, logp_diff=0.0,
                     diff_tokens=0.0)
        grad_norm, n_opt = torch.zeros(()), 0
        tokens, gen_logp, lengths = batch["tokens"], batch["logprobs"], batch["lengths"]
        params = [p for net in (model, critic) if net is not None for p in net.parameters() if p.requires_grad]
        on_policy = num_ppo_epochs == 1 and M == 1
        for epoch in range(num_ppo_epochs):
            perm = torch.randperm(B).tolist() if M > 1 else list(range(B))  # the CPU RNG: resumed exactly
            for mb in range(M):
                rows = perm[B * mb // M:B * (mb + 1) // M]
                mb_mask = mask[torch.tensor(rows, device=device)]
                denom = all_sum(loss_denominator(mb_mask, loss_type, max_new_tokens).to(torch.float64)).item()
                n_tok = all_sum(mb_mask.sum().to(torch.float64)).item()
                if denom == 0:
                    continue  # every completion on every rank was dropped: nothing to learn from this minibatch
                opt_step = (step * num_ppo_epochs + epoch) * M + mb
                total = max_steps * num_ppo_epochs * M
                for opt, peak in ((optimizer, lr), (critic_optimizer, critic_lr)):
                    for g in opt.param_groups if opt is not None else []:
                        g["lr"] = lr_at(opt_step, total, peak, warmup_steps, min_lr * peak / lr, lr_schedule)
                step_loss = torch.zeros((), device=device)
                if ptx_coef > 0:  # first, so that the policy's last micro-batch below is the one that syncs
                    p_prompts, p_ids, p_len = ptx_batch(opt_step)
                    n_ptx = all_sum(p_len.sum().to(torch.float64)).item()
                    with grad_sync(model, False), autocast:
                        nll = -completion_logprobs(model, p_prompts, p_ids, p_len).sum()
                    (ptx_coef * nll * (world_size / n_ptx)).backward()
                    step_loss += ptx_coef * nll.detach() / n_ptx
                    stats["ptx"] += nll.item() / n_ptx
                micro = [rows[i:i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]
                for i, r in enumerate(micro):
                    s = torch.tensor(r, device=device)
                    m = mask[s]
                    last = i == len(micro) - 1
                    prompts = [batch["prompts"][j] for j in r]
                    with grad_sync(model, last), grad_sync(critic, last) if ppo else nullcontext(), autocast:
                        logp = completion_logprobs(model, prompts, tokens[s], lengths[s], temperature)
                        # on-policy: the ratio is exactly 1. Otherwise pi_old is the sampling policy, whose
                        # log-probs generate recorded (they equal a training forward's; tests/test_grpo.py checks)
                        per_tok, is_clipped = grpo_token_loss(
                            logp, None if on_policy else gen_logp[s], adv[s], ref_logp[s] if beta > 0 else None,
                            beta, epsilon, epsilon_high, m, importance_sampling_level)
                        num = loss_numerator(per_tok, m, loss_type)
                        # DDP and FSDP average gradients over ranks: times world_size gives grad(sum of numerators)
                        loss = num * (world_size / denom)
                        step_loss += num.detach() / denom
                        if ppo:
                            values = completion_values(critic, prompts, tokens[s], lengths[s])
                            vf, vf_clipped = value_loss(values, old_values[s], returns[s], cliprange_value)
                            vnum = (vf * m).sum()
                            loss = loss + vf_coef * vnum * (world_size / n_tok)
                            step_loss += vf_coef * vnum.detach() / n_tok
                            stats["vf_loss"] += vnum.item() / n_tok
                            stats["vf_clipped"] += (vf_clipped.float() * m).sum().item()
                        for net in trained:  # the log-probs and values carry no MoE balancing loss: add it
                            aux = net.moe_aux_loss()
                            if aux is not None and net.config.moe_aux_loss_coef > 0:
                                loss = loss + net.config.moe_aux_loss_coef * aux / len(micro)  # mean over micro
                    loss.backward()
                    stats["loss"] += num.item() / denom
                    stats["clipped"] += (is_clipped.float() * m).sum().item()
                    stats["tokens"] += m.sum().item()
                    if n_opt == 0:  # before the first update the policy is the sampler: the log-probs must agree
                        stats["logp_diff"] += ((logp.detach().float() - gen_logp[s]).abs() * m).sum().item()
                        stats["diff_tokens"] += m.sum().item()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
                first_bad = mark_nonfinite(first_bad, step, step_loss, grad_norm)
                for opt, net in zip((optimizer, critic_optimizer), trained):
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    if net.moe_layers():
                        net.update_moe_bias()
                n_opt += 1
        stats = dict(zip(stats, all_sum(torch.tensor(list(stats.values()), device=device, dtype=torch.float64))
                         .tolist()))
        return stats, grad_norm, n_opt

    def log_step(step, stats, grad_norm, n_opt, allgen, roll, n_kept, n_rounds, train_tokens, train_flops, t_train,
                 t_gen):
        """One log line: rank 0's share of the rollouts for the score and rollout statistics (roll: KL, advantages,
        returns, explained variance), the losses over all ranks."""
        n_tok, n = max(stats["tokens"], 1.0), max(n_opt, 1)
        r, gen = allgen["rewards"], int(allgen["lengths"].sum())
        # entropy: the mean -log pi of the sampled tokens (at the sampling temperature), a Monte Carlo
        # estimate of the per-token entropy that costs nothing (the fused training loss has no logits)
        gen_mask = torch.arange(max_new_tokens, device=device)[None] < allgen["lengths"][:, None]
        names = list(reward_funcs) + (["rm"] if rm is not None else [])
        m = {"loss": (stats["loss"] / n, ".4f"), "lr": (optimizer.param_groups[0]["lr"], ".2e"),  # name: (value, fmt)
             "grad_norm": (float(getattr(grad_norm, "full_tensor", lambda: grad_norm)()), ".2f"),
             "tok/s": (train_tokens / max(t_train, 1e-9), ",.0f"),
             "mfu": (mfu(train_flops, max(t_train, 1e-9), world_size, peak_flops), "s"),
             "gen tok/s": (gen / max(t_gen, 1e-9), ",.0f"),
             "reward": (r.mean().item(), ".3f"), "reward_std": (r.std().item(), ".3f"),
             **{k: (v, ".3f") for k, v in zip(names, allgen["per_func"].mean(0).tolist())},
             "acc": (allgen["correct"].mean().item(), ".3f")}
        if use_ref:
            m.update(kl=(roll["kl"], ".4f"), seq_kl=(roll["seq_kl"], ".4f"))
        if kl_coef:
            m["kl_coef"] = (roll["kl_coef"], ".4f")
        m.update(adv=(roll["adv"][0], ".3f"), adv_std=(roll["adv"][1], ".3f"), ret=(roll["ret"][0], ".3f"),
                 ret_std=(roll["ret"][1], ".3f"))
        if ppo:
            m.update(vf_loss=(stats["vf_loss"] / n, ".4f"), vf_clip=(stats["vf_clipped"] / n_tok, ".3f"),
                     ev=(roll["ev"], ".3f"))
        if ptx_coef:
            m["ptx"] = (stats["ptx"] / n, ".4f")
        m.update(clip=(stats["clipped"] / n_tok, ".3f"), len=(allgen["lengths"].float().mean().item(), ".1f"),
                 entropy=((-(allgen["logprobs"] * gen_mask).sum() / gen_mask.sum()).item(), ".3f"),
                 logp_diff=(stats["logp_diff"] / max(stats["diff_tokens"], 1.0), ".1e"))
        parts = [f"step {step}/{max_steps}"] + [f"{k} {v:{f}}" + (f"±{m[k + '_std'][0]:{f}}" if k + "_std" in m else "")
                                               for k, (v, f) in m.items() if not k.endswith("_std")]
        if dynamic_sampling:
            parts.append(f"kept {n_kept}/{local_prompts} groups in {n_rounds} rounds")
        if n_opt == 0:
            parts.append("no update: every completion was dropped")
        eta = (time.time() - t_start) / (step - start_step) * (last_step - step)
        parts.append(f"eta {int(eta // 60)}m{int(eta % 60):02d}s")
        log(" | ".join(parts))
        for ex, text in list(zip(allgen["examples"], allgen["texts"]))[:eval_samples]:
            log(f"  {ex['prompt'][:80]!r} -> {text[:120]!r} (answer {ex['answer']!r})")
        metrics.log(step, **{k.replace(" ", "_").replace("/", "_per_"): v for k, (v, _) in m.items()
                             if not isinstance(v, str)})

    wandb = dict(project=wandb_project, name=wandb_run_name, config=config) if wandb_log else None
    metrics = MetricsLogger(out_dir, start_step if resume else None, enabled=master, wandb=wandb)

    # -------------------------------------------------------------------------
    def save(step):
        """A checkpoint to resume from (policy, critic, both optimizers, kl_coef, every rank's RNG, sampling generator
        and place in its prompt stream); at the end the result: the policy as a plain language model (LoRA merged).
        Every rank calls this."""
        stop_if_nonfinite(first_bad, model, ckpt_path)  # never write NaN weights over the last good checkpoint
        finished = step == max_steps
        per_rank = [None] * world_size
        if ddp:
            dist.all_gather_object(per_rank, (cursor, gen_tokens))
        else:
            per_rank = [(cursor, gen_tokens)]
        extra = dict(step=step, config=config, init_from=base_init, init_fingerprint=init_fingerprint, ev0=ev0, ev=ev,
                     accuracy=ev[0], accuracy_before=ev0[0], rng=rng_states(device, ddp, (sample_gen,)),
                     cursors=[c for c, _ in per_rank], gen_tokens=[n for _, n in per_rank], kl_coef=kl_coef)
        if not finished:
            extra["optimizer"] = optimizer_state_dict(model, optimizer)
            if critic is not None:
                extra.update(critic=model_state_dict(critic), critic_config=ckpt_critic_config,
                             critic_optimizer=optimizer_state_dict(critic, critic_optimizer))
        state = training_checkpoint(model, tok.name, lora, finished, lambda: Transformer(cfg), **extra)
        if master:
            save_checkpoint(ckpt_path, state, protect=(base_init,))
            log(f"saved {ckpt_path} at step {step}")

    @torch.no_grad()
    def held_out_kl():
        """KL(pi || initial policy) per completion on the held-out prompts, one completion each, sampled as in
        training: k3 summed over its tokens (unbiased for the sequence KL, and >= 0). How far the run moved the
        policy, whatever the estimator."""
        n = len(test_examples) // world_size  # the same on every rank: FSDP forwards are collectives
        prompts = [prompt_ids(ex) for ex in test_examples[rank * n:(rank + 1) * n]]
        if n == 0:
            return float("nan")
        raw_model.eval()
        with autocast:
            g = raw_model.generate(prompts, max_new_tokens, temperature=temperature, top_k=top_k or None, top_p=top_p,
                                   stop_tokens=stop, pad_id=tok.pad_id,
                                   generator=torch.Generator(device=device).manual_seed(seed + 7919 + rank))
        ref = model if lora else ref_model or load_model(base_init, device, kernels=kernels, dropout=0.0,
                                                         fsdp=ddp and parallel == "fsdp", dtype=weights_dtype)[0]
        micro = [slice(i, min(i + micro_batch_size, n)) for i in range(0, n, micro_batch_size)]
        with lora_disabled(raw_model) if lora else nullcontext():
            ref_logp = forward_all(completion_logprobs, ref, dict(prompts=prompts, **g), micro, temperature)
        raw_model.train()
        valid = torch.arange(g["tokens"].shape[1], device=device)[None] < g["lengths"][:, None]
        kl = all_sum(torch.stack([(k3_kl(g["logprobs"], ref_logp) * valid).sum().double(),
                                  torch.tensor(float(n), device=device, dtype=torch.float64)]))
        return (kl[0] / kl[1]).item()

    # training loop: evaluate and save at the top of an iteration, so step 0, every interval and the last step
    # take the same path; then one rollout batch and its optimizer steps
    ckpt_critic_config = None if critic is None else asdict(unwrap(critic).config)
    log(f"evaluating on {len(test_examples)} held-out questions (greedy, max_new_tokens={max_new_tokens})")
    last_step = max_steps if halt_at_step < 0 else min(halt_at_step, max_steps)
    first_bad = torch.tensor(-1, device=device)  # the first non-finite step (optim.mark_nonfinite)
    t_start = time.time()
    for step in range(start_step, last_step + 1):
        final = step == last_step
        at_eval = step == 0 or (eval_interval and step % eval_interval == 0) or final
        if at_eval and not (resume and step == start_step):  # the checkpoint was saved right after that eval
            stop_if_nonfinite(first_bad, ckpt_path=ckpt_path)
            ev = evaluate()
            report(step, ev)
            if step == 0:
                ev0 = ev
        if step > start_step and ((ckpt_interval and step % ckpt_interval == 0) or final):
            save(step)
        if final:
            break

        # ---- rollouts: this rank's prompts x G completions, scored
        t0 = time.time()
        batch, weight, allgen, n_kept, n_rounds = sample_groups()
        gen_tokens += int(allgen["lengths"].sum())
        t_gen = time.time() - t0

        # ---- reference log-probs and old values, loss mask, advantages (normalised over all ranks)
        t1 = time.time()
        N = int(batch["lengths"].max())
        batch["tokens"], batch["logprobs"] = batch["tokens"][:, :N], batch["logprobs"][:, :N]
        valid = (torch.arange(N, device=device)[None] < batch["lengths"][:, None]).float()
        mask = valid * weight[:, None] * (batch["ended"][:, None].float() if mask_truncated_completions else 1.0)
        B = batch["tokens"].shape[0]
        micro = [slice(i, min(i + micro_batch_size, B)) for i in range(0, B, micro_batch_size)]
        ref_logp = old_values = None
        if use_ref:  # the reference's log-probs, in eval mode (no dropout; MoE loads not counted)
            with lora_disabled(raw_model) if lora else nullcontext():
                ref_logp = forward_all(completion_logprobs, model if lora else ref_model, batch, micro, temperature)
        if ppo:
            old_values = forward_all(completion_values, critic, batch, micro)
        adv, returns, kl = advantages(batch, mask, valid, ref_logp, old_values)

        # ---- rollout statistics (rank 0's batch), and the KL controller (on the global batch: the same on all ranks)
        rows = (mask.sum(1) > 0).float()
        roll = dict(kl_coef=kl_coef, ret=mean_std(returns, mask),
                    adv=mean_std(adv, mask) if adv.dim() == 2 else mean_std(adv, rows))  # per token / per completion
        if use_ref:
            k3 = k3_kl(batch["logprobs"], ref_logp)
            seq_kl = all_sum(torch.stack([(kl.sum(1) * rows).sum(), rows.sum()]).double())
            roll.update(kl=((k3 * valid).sum() / valid.sum()).item(),
                        seq_kl=(seq_kl[0] / seq_kl[1].clamp(min=1)).item())
            if kl_target:
                kl_coef = adaptive_kl_coef(kl_coef, roll["seq_kl"], kl_target, seq_kl[1].item(), kl_horizon)
        if ppo:  # the critic's explained variance of the returns, 1 - Var(R - V) / Var(R)
            roll["ev"] = 1 - mean_std(returns - old_values, mask)[1] ** 2 / max(mean_std(returns, mask)[1] ** 2, 1e-8)

        # ---- num_ppo_epochs x num_mini_batches optimizer steps on this rollout batch
        stats, grad_norm, n_opt = policy_update(batch, adv, mask, ref_logp, old_values, returns, step)
        t_train = time.time() - t1
        # tokens through the training forward/backward this step (all passes)
        train_tokens = (sum(len(p) for p in batch["prompts"]) + int(batch["lengths"].sum())) * n_opt // num_mini_batches
        # model FLOPs of that phase on all ranks: the reference's and old values' forwards, then every pass of the
        # update through the policy (and critic); the ptx batches are not counted
        seqs = torch.tensor([len(p) for p in batch["prompts"]]) + batch["lengths"].cpu()
        train_flops = float(raw_model.flops(seqs)) * n_opt / num_mini_batches
        train_flops += float(raw_model.flops(seqs, backward=False)) if use_ref else 0.0
        if ppo:
            train_flops += float(unwrap(critic).flops(seqs, backward=False))
            train_flops += float(unwrap(critic).flops(seqs)) * n_opt / num_mini_batches
        train_flops *= world_size
        if (step + 1) % log_interval == 0 or step + 1 == last_step:
            stop_if_nonfinite(first_bad, ckpt_path=ckpt_path)
            log_step(step + 1, stats, grad_norm, n_opt, allgen, roll, n_kept, n_rounds, train_tokens, train_flops,
                     t_train, t_gen)

    if ddp and parallel == "ddp":
        log(f"parameters identical on all {check_replicas_identical(model)} ranks"
            + (f"; critic identical on all {check_replicas_identical(critic)} ranks" if critic is not None else ""))
    if last_step < max_steps:
        log(f"halted at step {last_step} (halt_at_step); continue with --init_from=resume --out_dir={out_dir}")
    else:
        kl_end = held_out_kl()
        total_gen = all_sum(torch.tensor(gen_tokens, device=device, dtype=torch.float64)).item()
        log(f"held-out accuracy: {ev0[0]:.1%} before {advantage_estimator} -> {ev[0]:.1%} after "
            f"({time.time() - t_start:.0f}s); KL(pi || initial policy) {kl_end:.3f} nats per held-out completion; "
            f"{total_gen:,.0f} completion tokens generated")
        for t in task_names if len(task_names) > 1 else []:
            log(f"  {t:8s} {ev0[1][t]:6.1%} -> {ev[1][t]:6.1%}")
        if master:
            write_summary(report_dir, "grpo", out_dir=out_dir, summary=dict(
                setup=run_setup(device, world_size), params=raw_model.num_params(), trainable=n_trainable,
                tokens=total_gen, wall_time=time.time() - t_start, steps=last_step, init_from=base_init,
                ckpt=ckpt_path, advantage_estimator=advantage_estimator, before=dict(accuracy=ev0[0]),
                after=dict(accuracy=ev[0], kl_to_initial=kl_end),
                accuracy_per_task=dict(before=ev0[1], after=ev[1]), metrics=metrics.path))
    teardown_distributed(ddp)
