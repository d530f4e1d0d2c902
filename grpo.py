"""
GRPO: reinforcement learning from verifiable (rule-based) and learned rewards, without a critic.

For each prompt the policy samples G = num_generations completions (one batched, KV-cached
generate call over all prompts x G), each is scored, and its advantage is its reward relative to
its group: A = (r - mean_group) / (std_group + epsilon_std) (Dr. GRPO: no std). The loss is the
clipped importance-ratio objective of PPO on every completion token, with an optional k3 KL
penalty to a frozen reference model:

    ratio = pi(y_t) / pi_old(y_t)
    loss_t = -min(ratio * A, clip(ratio, 1 - epsilon, 1 + epsilon_high) * A) + beta * k3_t
    k3_t = pi_ref/pi - log(pi_ref/pi) - 1

aggregated per loss_type: "grpo" (mean over each completion's tokens, then over completions),
"dapo" (mean over all tokens of the step), "dr_grpo" (sum over tokens / (completions * max_new_tokens)).
Each batch of rollouts is used for num_iterations optimizer steps; pi_old is then the policy that
sampled them. With num_iterations = 1 the ratio is exactly 1 and the loss *value* is ~0 at every
step (its gradient is the REINFORCE gradient): a near-zero loss is expected, watch reward and accuracy.
DAPO options: epsilon_high > epsilon (clip-higher), dynamic_sampling (drop groups whose rewards
are all equal and sample more prompts instead), soft overlong punishment (overlong_buffer > 0).

Rewards: rule-based functions of data/rewards.py picked by name (reward_funcs, reward_weights),
and/or a learned reward model from reward.py (reward_model = PATH), summed with weights.

Logged every log_interval steps: reward mean±std and per reward function, accuracy of the samples,
KL (k3, per token), clip fraction, entropy (the mean -log pi of the sampled tokens: a free Monte
Carlo estimate of the per-token entropy at the sampling temperature; the fused training loss never
forms the logits), completion length, logp_diff (|training-forward log-prob - generate's|, ~1e-7 in
fp32), and tokens/s of training (tok/s) and of generation (gen tok/s). Held-out accuracy (greedy,
test split, per task) before training, every eval_interval steps and at the end.
Under torchrun (DDP or FSDP) each rank samples its own share of the prompts with all G completions
of each, so a group never spans ranks.

$ python grpo.py                                   # embedded default: out/sft/ckpt.pt on data/tasks.py, CPU, minutes
$ python grpo.py configs/grpo_tiny.py --init_from=ckpt.pt  # a few steps of a tiny run (the tests use it)
$ python grpo.py configs/grpo_dapo.py              # DAPO: clip-higher, dynamic sampling, token-mean, overlong shaping
$ python grpo.py --reward_model=out/reward/ckpt.pt --reward_funcs=() --beta=0.04   # learned reward only
$ torchrun --nproc_per_node=8 grpo.py configs/grpo_gsm8k.py   # GSM8K on GPUs (openai/gsm8k via `datasets`)

Writes {out_dir}/ckpt.pt (a full checkpoint; with LoRA the adapters are merged into it).
"""

import copy
import os
import time

import torch
import torch.distributed as dist

from lora import check_targets
from optim import SCHEDULES

# -----------------------------------------------------------------------------
# the algorithm, as pure functions on tensors (tests/test_grpo.py checks each against a reference)

def group_advantages(rewards, num_generations, scale_rewards=True, epsilon_std=1e-4):
    """rewards (N,) with the G completions of each prompt consecutive -> advantages (N,).
    (r - mean of its group) / (std of its group + epsilon_std), std with Bessel's correction
    (as TRL); scale_rewards=False (Dr. GRPO) leaves out the division. An all-equal group gets 0."""
    r = rewards.float().view(-1, num_generations)
    a = r - r.mean(1, keepdim=True)
    if scale_rewards:
        a = a / (r.std(1, keepdim=True) + epsilon_std)
    return a.view(-1)


def k3_kl(logp, ref_logp):
    """Per-token k3 estimator of KL(pi || pi_ref) from log-probs of tokens sampled from pi:
    rho - log(rho) - 1 with rho = pi_ref / pi. Unbiased, >= 0, and 0 where pi = pi_ref."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def clipped_objective(logp, old_logp, advantages, epsilon=0.2, epsilon_high=None):
    """PPO's clipped surrogate per token: min(ratio * A, clip(ratio, 1 - eps, 1 + eps_high) * A),
    ratio = exp(logp - old_logp), advantages (B,) broadcast over tokens (B, T). Returns the objective
    (to maximise) and where the clipped side is the one taken (no gradient flows there)."""
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    ratio = torch.exp(logp - old_logp)
    a = advantages[:, None]
    unclipped = ratio * a
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high) * a
    return torch.minimum(unclipped, clipped), clipped < unclipped


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
    mask is all zero (dropped by dynamic sampling) do not count."""
    n_seq = (mask.sum(1) > 0).sum()
    if loss_type == "grpo":
        return n_seq
    if loss_type == "dapo":
        return mask.sum()
    assert loss_type == "dr_grpo", f"unknown loss_type {loss_type!r}: use grpo, dapo or dr_grpo"
    return n_seq * max_new_tokens


def aggregate_loss(per_token_loss, mask, loss_type, max_new_tokens):
    """The loss of one batch by itself (what the training loop computes over a whole step)."""
    return loss_numerator(per_token_loss, mask, loss_type) / loss_denominator(mask, loss_type, max_new_tokens)


def grpo_token_loss(logp, old_logp, advantages, ref_logp=None, beta=0.0, epsilon=0.2, epsilon_high=None):
    """Per-token loss (B, T): -clipped objective + beta * k3 KL. old_logp None: on-policy (the ratio is
    exp(logp - logp.detach()) = 1, with the gradient of logp). Returns (loss, is_clipped, kl or None)."""
    old_logp = logp.detach() if old_logp is None else old_logp
    objective, is_clipped = clipped_objective(logp, old_logp, advantages, epsilon, epsilon_high)
    loss = -objective
    kl = None
    if ref_logp is not None and beta > 0:
        kl = k3_kl(logp, ref_logp)
        loss = loss + beta * kl
    return loss, is_clipped, kl


def soft_overlong_penalty(lengths, max_new_tokens, buffer, penalty=1.0):
    """DAPO's soft overlong punishment: 0 up to max_new_tokens - buffer tokens, then falling linearly
    to -penalty at max_new_tokens (a completion cut off there scores -penalty)."""
    start = max_new_tokens - buffer
    return -penalty * ((lengths.float() - start) / buffer).clamp(0, 1)


def completion_logprobs(model, prompts, completions, lengths, temperature=1.0):
    """Log-probs (B, N) of completions[b, :lengths[b]] after prompts[b] (lists of ids) under
    softmax(logits / temperature), from a training forward through model (the DDP/FSDP wrapper,
    so that gradients synchronise); 0 past each length. Rows are prompt + completion, right-padded:
    causal attention never looks right, so the pads need no mask, and positions count from each
    row's first token just as in generate (which left-pads, with per-row positions)."""
    B, N = completions.shape
    device = completions.device
    comp, lens = completions.tolist(), lengths.tolist()
    rows = [p + c[:n] for p, c, n in zip(prompts, comp, lens)]
    T = max(map(len, rows))
    idx = torch.zeros(B, T, dtype=torch.long)  # pad id 0: only ever read by positions nothing attends from
    targets = torch.full((B, T), -100, dtype=torch.long)
    for b, (p, row) in enumerate(zip(prompts, rows)):
        idx[b, :len(row)] = torch.tensor(row)
        targets[b, len(p) - 1:len(row) - 1] = torch.tensor(row[len(p):])  # position t predicts token t + 1
    idx, targets = idx.to(device), targets.to(device)
    _, nll = model(idx[:, :-1], targets[:, :-1], reduction="none", temperature=temperature)
    start = torch.tensor([len(p) - 1 for p in prompts], device=device)
    j = torch.arange(N, device=device)
    cols = (start[:, None] + j[None]).clamp(max=T - 2)
    valid = j[None] < lengths[:, None].to(device)
    return torch.where(valid, -nll.gather(1, cols), torch.zeros((), device=device))


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
# rollouts
num_generations = 16         # G completions per prompt (>= 2)
prompts_per_step = 8         # prompts per rollout batch, over all ranks (each rank samples its share)
max_new_tokens = 16
temperature = 1.0            # sampling temperature; the training log-probs use the same one
top_p = 1.0
top_k = 0                    # 0 = off
# GRPO / DAPO / Dr. GRPO
beta = 0.0                   # KL coefficient (k3 estimator); 0 = no reference model is kept
epsilon = 0.2                # clip range below 1
epsilon_high = 0.2           # clip range above 1 (DAPO clip-higher: 0.28)
epsilon_std = 1e-4           # added to the group std before dividing
scale_rewards = True         # False: A = r - mean (Dr. GRPO)
num_iterations = 1           # mu: optimizer steps per rollout batch
loss_type = "grpo"           # "grpo" | "dapo" | "dr_grpo"
dynamic_sampling = True      # DAPO: drop groups with all-equal rewards, sample more prompts to fill the batch
max_sampling_rounds = 3      # dynamic sampling: at most this many rollout rounds per step
overlong_buffer = 0          # DAPO soft overlong punishment over the last overlong_buffer tokens (0 = off)
overlong_penalty = 1.0       # its largest penalty (at max_new_tokens)
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
compile = False
wandb_log = False
wandb_project = "grpo"
wandb_run_name = "grpo"


# what the configurator accepts (checked before any work is done)
_choices = dict(dataset=("tasks", "gsm8k"), reward_funcs=("exact", "format", "gsm8k"),
                loss_type=("grpo", "dapo", "dr_grpo"), lr_schedule=SCHEDULES, parallel=("ddp", "fsdp"),
                device=("auto", "cpu", "cuda"), kernels=("auto", "triton", "torch"),
                lora_targets=check_targets)
_ranges = dict(n_train="[1, inf)", num_generations="[2, inf)", prompts_per_step="[1, inf)",
               max_new_tokens="[1, inf)", temperature="(0, inf)", top_p="(0, 1]", top_k="[0, inf)", beta="[0, inf)",
               epsilon="[0, 1)", epsilon_high="[0, inf)", epsilon_std="[0, inf)", num_iterations="[1, inf)",
               max_sampling_rounds="[1, inf)", overlong_buffer="[0, inf)", overlong_penalty="[0, inf)",
               max_steps="[1, inf)", micro_batch_size="[1, inf)", lr="(0, inf)", min_lr="[0, inf)",
               warmup_steps="[0, inf)", weight_decay="[0, inf)", beta1="[0, 1)", beta2="[0, 1)", adam_eps="(0, inf)",
               grad_clip="[0, inf)", lora_r="[0, inf)", lora_alpha="(0, inf)", lora_dropout="[0, 1)",
               eval_interval="[0, inf)", eval_size="[1, inf)", eval_batch_size="[1, inf)", eval_samples="[0, inf)",
               log_interval="[1, inf)", ckpt_interval="[0, inf)", halt_at_step="[1, inf) or -1")
# init_from="resume" continues with the checkpoint's policy, reference and data: these must not change on resume
_resume_fixed = ("dataset", "data_path", "eval_data_path", "n_train", "task_subset", "system_prompt", "seed",
                 "num_generations", "prompts_per_step", "max_new_tokens", "lora_r", "lora_alpha", "lora_targets",
                 "lora_rslora", "lora_dropout", "eval_size", "reward_model")
_resume_schedule = ("reward_funcs", "reward_weights", "reward_model_weight", "temperature", "top_p", "top_k", "beta",
                    "epsilon", "epsilon_high", "scale_rewards", "num_iterations", "loss_type", "dynamic_sampling",
                    "max_sampling_rounds", "max_steps", "micro_batch_size", "lr", "min_lr", "warmup_steps",
                    "lr_schedule", "world_size")


# -----------------------------------------------------------------------------
# the run (`import grpo` stops above: the tests import the functions)
if __name__ == "__main__":
    from configs import configure
    config = configure(globals())

    from checkpoint import (check_vocab, check_writable, fingerprint, load_model, load_optimizer_state,
                            optimizer_state_dict, restore_rng_states, rng_states, save_checkpoint, training_checkpoint)
    from data import tasks
    from data.chat import BadRecord, render_prompt
    from data.records import DataError
    from data.rewards import get_reward_funcs, is_correct, load_gsm8k
    from data.tokenizer import get_tokenizer
    from distributed import (check_replicas_identical, fsdp_gathered, grad_sync, parallelize, setup_distributed,
                             teardown_distributed, unwrap)
    from lora import apply_lora, lora_disabled, lora_modules, merge_lora
    from model import Transformer
    from optim import configure_optimizer, lr_at, mark_nonfinite, stop_if_nonfinite
    from reward import score_conversations

    def fail(msg):
        raise SystemExit(f"grpo: {msg}")

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

    ddp, rank, world_size, device, autocast = setup_distributed(device)
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    if prompts_per_step % world_size:
        fail(f"prompts_per_step={prompts_per_step} must be divisible by the number of ranks ({world_size})")
    local_prompts = prompts_per_step // world_size
    G = num_generations

    # -------------------------------------------------------------------------
    # policy, reference, reward model
    resume = init_from == "resume"
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    source = ckpt_path if resume else init_from
    if not os.path.exists(source):
        hint = "python sft.py" if init_from == "out/sft/ckpt.pt" else "the stage that writes it"
        fail(f"init checkpoint {source} not found. Run `{hint}` first, or pass --init_from=PATH.")
    # no dropout: the importance ratio and the sampled log-probs assume one deterministic policy
    try:
        model, ckpt = load_model(source, "cpu", kernels=kernels, dropout=0.0)
        tok = get_tokenizer(ckpt["tokenizer"])
        check_vocab(model, tok, source)
    except ValueError as e:  # e.g. a reward model where a language model is needed, a corrupt file
        fail(f"init_from: {e}")
    lora = dict(targets=lora_targets, r=lora_r, alpha=lora_alpha, dropout=lora_dropout, rslora=lora_rslora) \
        if lora_r > 0 else None
    ref_model = None
    if resume:  # the checkpoint's policy (LoRA: with its adapters, unmerged); the reference is the initial policy
        from configs import check_resume
        check_resume(ckpt, {**config, "world_size": world_size}, _resume_fixed, _resume_schedule, ckpt_path)
        base_init, start_step, ev0, ev = ckpt["init_from"], ckpt["step"], ckpt["ev0"], ckpt["ev"]
        if beta > 0 and not lora:
            if ckpt["init_fingerprint"] != fingerprint(base_init):
                fail(f"cannot resume {ckpt_path}: its reference, the initial policy {base_init}, has changed since "
                     f"the run started (fingerprint mismatch); restore it")
            ref_model, _ = load_model(base_init, "cpu", kernels=kernels, dropout=0.0)
            ref_model.eval().requires_grad_(False)
    else:
        base_init, start_step = os.path.abspath(init_from), 0
        if lora_modules(model):
            merge_lora(model)  # an adapter checkpoint from sft.py: start from the merged model
        if lora:
            torch.manual_seed(seed)  # the same adapter init on every rank (FSDP does not broadcast parameters)
            apply_lora(model, **lora)  # the reference is then free: the same model with its adapters off
        elif beta > 0:
            ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    if master:
        check_writable(out_dir, protect=(base_init,))
    init_fingerprint = fingerprint(base_init)
    cfg = model.config
    torch.manual_seed(seed + rank)
    model.to(device)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"init from {init_from}: {model.num_params() / 1e6:.2f}M params, {n_trainable / 1e6:.3f}M trainable"
        f"{f' (LoRA r={lora_r})' if lora else ''}, reference: "
        f"{'none (beta=0)' if beta == 0 else 'base with adapters off' if lora else 'frozen copy'}, "
        f"device {device}, world {world_size}")
    rm = None
    if reward_model:
        # reward.py trains from the SFT checkpoint, so it shares the policy's tokenizer
        rm, _ = load_model(reward_model, device, kind="reward", kernels=kernels)
        rm.eval().requires_grad_(False)
        log(f"reward model {reward_model}: {sum(p.numel() for p in rm.parameters()) / 1e6:.2f}M params, "
            f"weight {reward_model_weight}")

    # -------------------------------------------------------------------------
    # data: examples are dicts with "prompt" and "answer" (plus "task")
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

    def next_prompts(n):
        global cursor
        out = [train_examples[my_order[(cursor + i) % len(my_order)]] for i in range(n)]
        cursor += n
        return out

    # -------------------------------------------------------------------------
    # training setup
    model = parallelize(model, parallel if ddp else "none", device)
    # after parallelize: FSDP2 replaces the parameters with sharded ones
    optimizer = configure_optimizer(model, lr, weight_decay, (beta1, beta2), adam_eps, device.type)
    if ref_model is not None:
        ref_model.to(device)
        if ddp and parallel == "fsdp":
            parallelize(ref_model, "fsdp", device)  # sharded like the policy, forward-only
    if compile:
        model = torch.compile(model)
    raw_model = unwrap(model)
    sample_gen = torch.Generator(device=device).manual_seed(seed + rank)
    if resume:
        load_optimizer_state(model, optimizer, ckpt["optimizer"])
        restore_rng_states(ckpt["rng"], rank, device, generators=(sample_gen,))
        cursor = ckpt["cursors"][rank % len(ckpt["cursors"])]
    del ckpt
    stop = tok.stop_ids  # the end-of-turn token of the checkpoint's chat template (and its eos tokens)

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
        if wandb_log and master:
            wandb.log({"step": step, "val/accuracy": ev[0], **{f"val/accuracy_{t}": a for t, a in ev[1].items()}})

    @torch.no_grad()
    def rollout(examples):
        """G sampled completions of each example (one generate call), their rewards and correctness."""
        prompts = [prompt_ids(ex) for ex in examples for _ in range(G)]
        exs = [ex for ex in examples for _ in range(G)]
        with autocast:
            g = raw_model.generate(prompts, max_new_tokens, temperature=temperature, top_k=top_k or None,
                                   top_p=top_p, stop_tokens=stop, pad_id=tok.pad_id, generator=sample_gen)
        B, N = g["tokens"].shape
        tokens = torch.full((B, max_new_tokens), tok.pad_id, dtype=torch.long, device=device)
        logprobs = torch.zeros(B, max_new_tokens, device=device)
        tokens[:, :N], logprobs[:, :N] = g["tokens"], g["logprobs"]
        texts = decode(g["tokens"], g["lengths"])
        rewards, per_func = score_completions(exs, texts, funcs, weights)
        if rm is not None:
            convs = [tasks.to_messages(dict(prompt=ex["prompt"], answer=t), system_prompt or None)
                     for ex, t in zip(exs, texts)]
            with autocast:
                rm_scores = score_conversations(rm, convs, tok).float().cpu()
            rewards = rewards + reward_model_weight * rm_scores
            per_func = torch.cat([per_func, rm_scores[None]])
        if overlong_buffer:
            rewards = rewards + soft_overlong_penalty(g["lengths"].cpu(), max_new_tokens, overlong_buffer,
                                                      overlong_penalty)
        return dict(prompts=prompts, tokens=tokens, lengths=g["lengths"], logprobs=logprobs, rewards=rewards,
                    per_func=per_func.T, correct=torch.tensor([float(is_correct(e, t)) for e, t in zip(exs, texts)]),
                    texts=texts, examples=exs)

    def select(batch, rows):
        return {k: [v[i] for i in rows] if isinstance(v, list) else v[torch.tensor(rows, device=v.device)]
                for k, v in batch.items()}

    def concat(parts):
        return {k: sum((p[k] for p in parts), []) if isinstance(parts[0][k], list) else torch.cat([p[k] for p in parts])
                for k in parts[0]}

    def sample_groups():
        """This rank's rollout batch of local_prompts groups. With dynamic sampling (DAPO), groups whose
        rewards are all equal (zero advantage: no signal) are dropped and more prompts sampled, for at most
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

    def policy_update(batch, adv, mask, denom, micro, ref_logp, step):
        """num_iterations optimizer steps on one rollout batch. Returns (sums over the passes and tokens of
        loss, kl, clipped tokens, tokens and |logp - generate's logp| (first pass), grad_norm, passes made)."""
        global first_bad
        opt_step = step * num_iterations
        stats = dict(loss=0.0, kl=0.0, clipped=0.0, tokens=0.0, logp_diff=0.0)
        grad_norm, passes = torch.zeros(()), 0
        tokens, gen_logp, lengths = batch["tokens"], batch["logprobs"], batch["lengths"]
        for it in range(num_iterations):
            if denom == 0:
                break  # every group on every rank was dropped: nothing to learn from this batch
            for g in optimizer.param_groups:
                g["lr"] = lr_at(opt_step + it, max_steps * num_iterations, lr, warmup_steps, min_lr, lr_schedule)
            pass_loss = torch.zeros((), device=device)
            for i, s in enumerate(micro):
                with grad_sync(model, i == len(micro) - 1), autocast:
                    logp = completion_logprobs(model, batch["prompts"][s], tokens[s], lengths[s], temperature)
                    # mu = 1: on-policy, the ratio is exactly 1. mu > 1: pi_old is the sampling policy, whose
                    # log-probs generate recorded (they equal a training forward's; tests/test_grpo.py checks)
                    old = None if num_iterations == 1 else gen_logp[s]
                    per_tok, is_clipped, kl = grpo_token_loss(logp, old, adv[s], ref_logp[i], beta, epsilon,
                                                              epsilon_high)
                    num = loss_numerator(per_tok, mask[s], loss_type)
                    # DDP and FSDP average gradients over ranks: times world_size gives grad(sum of numerators) / denom
                    loss = num * (world_size / denom)
                    aux = raw_model.moe_aux_loss()  # the per-token log-probs carry no balancing loss: add it here
                    if aux is not None and cfg.moe_aux_loss_coef > 0:
                        loss = loss + cfg.moe_aux_loss_coef * aux / len(micro)  # the mean over the micro-batches
                loss.backward()
                pass_loss += num.detach() / denom
                m = mask[s]
                stats["loss"] += num.item() / denom
                stats["kl"] += (kl * m).sum().item() if kl is not None else 0.0
                stats["clipped"] += (is_clipped.float() * m).sum().item()
                stats["tokens"] += m.sum().item()
                if it == 0:
                    stats["logp_diff"] += ((logp.detach().float() - gen_logp[s]).abs() * m).sum().item()
            grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                       grad_clip if grad_clip > 0 else float("inf"))
            first_bad = mark_nonfinite(first_bad, step, pass_loss, grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cfg.n_experts:
                raw_model.update_moe_bias()
            passes += 1
        if ddp:
            t = torch.tensor(list(stats.values()), device=device, dtype=torch.float64)
            dist.all_reduce(t)
            stats = dict(zip(stats, t.tolist()))
        return stats, grad_norm, passes

    def log_step(step, stats, grad_norm, passes, allgen, n_kept, n_rounds, train_tokens, t_train, t_gen):
        """One log line (rank 0's share of the rollouts for the reward statistics; losses over all ranks)."""
        n_tok, p = max(stats["tokens"], 1.0), max(passes, 1)
        loss = stats["loss"] / p  # the mean of the passes' step losses
        gen_tokens = int(allgen["lengths"].sum())
        r = allgen["rewards"]
        parts = [f"step {step}/{max_steps}", f"loss {loss:.4f}", f"lr {optimizer.param_groups[0]['lr']:.2e}",
                 f"grad_norm {float(getattr(grad_norm, 'full_tensor', lambda: grad_norm)()):.2f}",
                 f"tok/s {train_tokens / max(t_train, 1e-9):,.0f}", f"gen tok/s {gen_tokens / max(t_gen, 1e-9):,.0f}",
                 f"reward {r.mean():.3f}±{r.std():.3f}"]
        names = list(reward_funcs) + (["rm"] if rm is not None else [])
        parts += [f"{n} {v:.3f}" for n, v in zip(names, allgen["per_func"].mean(0).tolist())]
        # entropy: the mean -log pi of the sampled tokens (at the sampling temperature), a Monte Carlo
        # estimate of the per-token entropy that costs nothing (the fused training loss has no logits)
        gen_mask = torch.arange(max_new_tokens, device=device)[None] < allgen["lengths"][:, None]
        entropy = (-(allgen["logprobs"] * gen_mask).sum() / gen_mask.sum()).item()
        length = allgen["lengths"].float().mean().item()
        parts += [f"acc {allgen['correct'].mean():.3f}", f"kl {stats['kl'] / n_tok:.4f}",
                  f"clip {stats['clipped'] / n_tok:.3f}", f"entropy {entropy:.3f}", f"len {length:.1f}",
                  f"logp_diff {stats['logp_diff'] / n_tok * p:.1e}"]
        if dynamic_sampling:
            parts.append(f"kept {n_kept}/{local_prompts} groups in {n_rounds} rounds")
        if passes == 0:
            parts.append("no update: every group's rewards were all equal")
        eta = (time.time() - t_start) / (step - start_step) * (last_step - step)
        parts.append(f"eta {int(eta // 60)}m{int(eta % 60):02d}s")
        log(" | ".join(parts))
        for ex, text in list(zip(allgen["examples"], allgen["texts"]))[:eval_samples]:
            log(f"  {ex['prompt'][:80]!r} -> {text[:120]!r} (answer {ex['answer']!r})")
        if wandb_log and master:
            wandb.log({"step": step, "train/loss": loss, "train/reward": r.mean().item(),
                       "train/reward_std": r.std().item(),
                       **{f"train/reward_{n}": v for n, v in zip(names, allgen["per_func"].mean(0).tolist())},
                       "train/accuracy": allgen["correct"].mean().item(), "train/kl": stats["kl"] / n_tok,
                       "train/clip_frac": stats["clipped"] / n_tok, "train/entropy": entropy,
                       "train/completion_len": length, "lr": optimizer.param_groups[0]["lr"],
                       "gen_tok/s": gen_tokens / max(t_gen, 1e-9), "train_tok/s": train_tokens / max(t_train, 1e-9)})

    if wandb_log and master:
        import wandb
        wandb.init(project=wandb_project, name=wandb_run_name, config=config)

    # -------------------------------------------------------------------------
    def save(step):
        """A checkpoint to resume from (policy, optimizer, every rank's RNG, sampling generator and place in its
        prompt stream); at the end the result: a plain language model (LoRA merged). Every rank calls this."""
        stop_if_nonfinite(first_bad, model, ckpt_path)  # never write NaN weights over the last good checkpoint
        finished = step == max_steps
        cursors = [None] * world_size
        if ddp:
            dist.all_gather_object(cursors, cursor)
        else:
            cursors = [cursor]
        extra = dict(step=step, config=config, init_from=base_init, init_fingerprint=init_fingerprint, ev0=ev0, ev=ev,
                     accuracy=ev[0], accuracy_before=ev0[0], rng=rng_states(device, ddp, (sample_gen,)),
                     cursors=cursors)
        if not finished:
            extra["optimizer"] = optimizer_state_dict(model, optimizer)
        state = training_checkpoint(model, tok.name, lora, finished, lambda: Transformer(cfg), **extra)
        if master:
            save_checkpoint(ckpt_path, state, protect=(base_init,))
            log(f"saved {ckpt_path} at step {step}")

    # training loop: evaluate and save at the top of an iteration, so step 0, every interval and the last step
    # take the same path; then one rollout batch and num_iterations optimizer steps on it
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
        t_gen = time.time() - t0

        # ---- advantages (per group, on this rank), loss mask, normaliser over the whole step
        t1 = time.time()
        adv = group_advantages(batch["rewards"], G, scale_rewards, epsilon_std).to(device)
        N = int(batch["lengths"].max())
        batch["tokens"], batch["logprobs"] = batch["tokens"][:, :N], batch["logprobs"][:, :N]
        mask = (torch.arange(N, device=device)[None] < batch["lengths"][:, None]).float() * weight[:, None]
        denom = loss_denominator(mask, loss_type, max_new_tokens).to(torch.float64)
        if ddp:
            dist.all_reduce(denom)
        denom = denom.item()
        B = batch["tokens"].shape[0]
        micro = [slice(i, min(i + micro_batch_size, B)) for i in range(0, B, micro_batch_size)]
        ref_logp = [None] * len(micro)
        if beta > 0:  # the reference's log-probs, in eval mode (no dropout; MoE loads not counted)
            with torch.no_grad(), autocast:
                args = [(batch["prompts"][s], batch["tokens"][s], batch["lengths"][s], temperature) for s in micro]
                if lora is not None:
                    raw_model.eval()
                    with lora_disabled(raw_model):
                        ref_logp = [completion_logprobs(model, *a) for a in args]
                    raw_model.train()
                else:
                    ref_logp = [completion_logprobs(ref_model, *a) for a in args]

        # ---- num_iterations optimizer steps on this rollout batch
        stats, grad_norm, passes = policy_update(batch, adv, mask, denom, micro, ref_logp, step)
        t_train = time.time() - t1
        # tokens through the training forward/backward this step (all passes)
        train_tokens = (sum(len(p) for p in batch["prompts"]) + int(batch["lengths"].sum())) * passes
        if (step + 1) % log_interval == 0 or step + 1 == last_step:
            stop_if_nonfinite(first_bad, ckpt_path=ckpt_path)
            log_step(step + 1, stats, grad_norm, passes, allgen, n_kept, n_rounds, train_tokens, t_train, t_gen)

    if ddp and parallel == "ddp":
        log(f"parameters identical on all {check_replicas_identical(model)} ranks")
    if last_step < max_steps:
        log(f"halted at step {last_step} (halt_at_step); continue with --init_from=resume --out_dir={out_dir}")
    else:
        log(f"held-out accuracy: {ev0[0]:.1%} before GRPO -> {ev[0]:.1%} after ({time.time() - t_start:.0f}s)")
        for t in task_names if len(task_names) > 1 else []:
            log(f"  {t:8s} {ev0[1][t]:6.1%} -> {ev[1][t]:6.1%}")
    teardown_distributed(ddp)
