"""
Direct preference optimisation and its relatives: learn from (chosen, rejected) pairs, or with KTO
from unpaired desirable/undesirable examples, without a reward model or sampling.

$ python dpo.py                                    # task pairs from data/tasks.py, from out/sft/ckpt.pt, CPU, minutes
$ python dpo.py --loss_type=ipo --beta=0.5          # another loss
$ python dpo.py --data=prefs.jsonl --lora_r=16      # your own pairs (any layout of data/preference.py), LoRA
$ python dpo.py --loss_type=kto                     # KTO on the task pairs, unpaired
$ python dpo.py configs/dpo_kto.py                  # KTO on trl-lib/kto-mix-14k (prompt, completion, label)
$ python dpo.py configs/dpo_ultrafeedback.py        # UltraFeedback-binarized from the hub, one GPU
$ torchrun --standalone --nproc_per_node=8 dpo.py configs/dpo_ultrafeedback.py

With h = (log pi(y_c) - log pi_ref(y_c)) - (log pi(y_r) - log pi_ref(y_r)), log-probs summed over
the response tokens only (not the prompt, not padding):
  sigmoid  -log sigmoid(beta h)                                        DPO (Rafailov et al. 2023)
           with label_smoothing = eps > 0: (1 - eps) * -log sigmoid(beta h) + eps * -log sigmoid(-beta h),
           conservative DPO (cDPO, Mitchell 2023): a label-smoothed loss for labels wrong with probability eps
  robust   ((1 - eps) * -log sigmoid(beta h) - eps * -log sigmoid(-beta h)) / (1 - 2 eps)
           robust DPO (rDPO, Chowdhury et al. 2024): unbiased under label flips with probability eps
  ipo      (h - 1 / (2 beta))^2                                        IPO (Azar et al. 2023)
  hinge    max(0, 1 - beta h)                                          SLiC (Zhao et al. 2023)
reference-free, with length-normalised log-probs lp = log pi(y) / |y|:
  simpo    -log sigmoid(beta lp_c - beta lp_r - simpo_gamma)           SimPO (Meng et al. 2024; beta ~2)
  orpo     -lp_c - orpo_lambda * log sigmoid(log odds_c - log odds_r), odds = e^lp / (1 - e^lp)  (Hong et al. 2024)
rpo_alpha > 0 adds rpo_alpha * (-lp_c), an NLL term on chosen that keeps its likelihood from falling
(RPO; the usual fix when logps/chosen fall steadily, which this script warns about). The default is
1.0 for the pair losses because the embedded task pairs differ in a token or two, where plain DPO
lowers both; the hub configs set 0.
unpaired, one completion y with a label, r = log pi(y) - log pi_ref(y) (Ethayarajh et al. 2024):
  kto      lambda_D - lambda_D sigmoid(beta (r - z0))   for a desirable y
           lambda_U - lambda_U sigmoid(beta (z0 - r))   for an undesirable y
           z0, the reference point: a detached estimate of KL(pi || pi_ref) from mismatched pairs, the
           batch's completions shifted by one against its prompts (as TRL), averaged over ranks,
           clamped at 0. lambda_D, lambda_U = desirable_weight, undesirable_weight (TRL's names);
           lambda_D n_D / lambda_U n_U should lie in [1, 4/3] (warned otherwise). Data in TRL's
           layout (prompt, completion, label), or pairs unpaired: chosen desirable, rejected
           undesirable (the embedded task pairs too). Logs kl (z0) and the rewards beta r of
           desirable (rewards/chosen) and undesirable (rewards/rejected) examples, as TRL.

The embedded default trains on (correct, wrong) pairs of data/tasks.py questions: generated wrong
answers plus the initial policy's own mistakes (greedy and sampled), and reports greedy exact-match
on held-out questions before and after.

The reference is a frozen second copy of the initial model, or, with LoRA, the same model with
its adapters disabled (no second copy). precompute_ref_logprobs=True scores every pair under
the reference once before training, so training holds one model (KTO: also each training batch's
mismatched pairs, fixed by the seed). Chosen and rejected go through the model in one concatenated
batch. Output: out/dpo/ckpt.pt, a plain language model (LoRA merged).
"""

import copy
import math
import os
import time

import torch
import torch.nn.functional as F

from lora import check_targets
from optim import SCHEDULES
from report import MetricsLogger, run_setup, write_summary

# -----------------------------------------------------------------------------
# the objectives: pure functions of per-sequence log-prob tensors (B,)

_REFERENCE_FREE = ("simpo", "orpo")
_LOSS_TYPES = ("sigmoid", "robust", "ipo", "hinge") + _REFERENCE_FREE + ("kto",)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1, loss_type="sigmoid",
             label_smoothing=0.0):
    """Per-pair losses of the reference-based losses from summed response log-probs, and the implicit
    rewards beta * (log pi - log pi_ref) of chosen and rejected (detached). label_smoothing (0 <= eps < 0.5)
    makes sigmoid the conservative cDPO; robust is rDPO (TRL's names and definitions)."""
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        raise ValueError(f"dpo_loss: unknown loss_type {loss_type!r}; "
                         f"reference-based types are sigmoid, robust, ipo, hinge")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def simpo_loss(policy_chosen, policy_rejected, len_chosen, len_rejected, beta=2.0, gamma=0.5):
    """SimPO per-pair losses and its rewards beta * log pi / |y| (detached)."""
    r_c, r_r = beta * policy_chosen / len_chosen, beta * policy_rejected / len_rejected
    return -F.logsigmoid(r_c - r_r - gamma), r_c.detach(), r_r.detach()


def _log1mexp(x):
    """log(1 - e^x) for x < 0, accurate at both ends (Maechler 2012)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(policy_chosen, policy_rejected, len_chosen, len_rejected, orpo_lambda=0.1):
    """ORPO per-pair losses, NLL(chosen) - lambda * log sigmoid(log odds ratio), on length-normalised
    log-probs; rewards lambda * log pi / |y| (detached)."""
    lp_c, lp_r = policy_chosen / len_chosen, policy_rejected / len_rejected
    eps = torch.finfo(lp_c.dtype).eps  # a length-normalised log-prob of exactly 0 has infinite odds
    lp_c, lp_r = lp_c.clamp(max=-eps), lp_r.clamp(max=-eps)
    log_odds = (lp_c - _log1mexp(lp_c)) - (lp_r - _log1mexp(lp_r))
    losses = -lp_c - orpo_lambda * F.logsigmoid(log_odds)
    return losses, orpo_lambda * lp_c.detach(), orpo_lambda * lp_r.detach()


def preference_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, len_chosen, len_rejected,
                    loss_type="sigmoid", beta=0.1, label_smoothing=0.0, simpo_gamma=0.5, orpo_lambda=0.1,
                    rpo_alpha=0.0):
    """Dispatch on loss_type; adds rpo_alpha * NLL per token of chosen. Returns (per-pair losses, chosen
    rewards, rejected rewards). ref_* are ignored (may be None) for the reference-free types."""
    if loss_type == "simpo":
        out = simpo_loss(policy_chosen, policy_rejected, len_chosen, len_rejected, beta, simpo_gamma)
    elif loss_type == "orpo":
        out = orpo_loss(policy_chosen, policy_rejected, len_chosen, len_rejected, orpo_lambda)
    else:
        out = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, loss_type, label_smoothing)
    losses, r_c, r_r = out
    if rpo_alpha:
        losses = losses + rpo_alpha * (-policy_chosen / len_chosen)
    return losses, r_c, r_r


def kto_loss(policy_logps, ref_logps, desirable, kl, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0):
    """KTO per-example losses (Ethayarajh et al. 2024, eq. 7; TRL's loss_type="kto") from summed completion
    log-probs, with r = log pi(y|x) - log pi_ref(y|x) and the reference point z0 = kl (kto_reference_point):
      desirable    lambda_D - lambda_D * sigmoid(beta (r - z0))
      undesirable  lambda_U - lambda_U * sigmoid(beta (z0 - r))
    desirable: (B,) bool. Returns (losses, the implicit rewards beta * r, detached)."""
    r = policy_logps - ref_logps
    lam = torch.where(desirable, desirable_weight, undesirable_weight).to(r.dtype)
    v = lam * torch.sigmoid(torch.where(desirable, beta * (r - kl), beta * (kl - r)))
    return lam - v, beta * r.detach()


def kto_reference_point(policy_kl_logps, ref_kl_logps, all_reduce=None):
    """z0, KTO's reference point: a detached estimate of KL(pi || pi_ref) = E[log pi(y'|x) - log pi_ref(y'|x)]
    over mismatched pairs (x, y') (data/preference.mismatched), the mean over every rank's pairs (all_reduce
    sums a tensor in place across ranks; TRL averages the ranks' means, the same for equal batches), clamped
    at 0: a KL is never negative, its estimate from a batch can be."""
    d = (policy_kl_logps - ref_kl_logps).detach().float()
    total = torch.stack([d.sum(), torch.tensor(float(d.numel()), device=d.device)])
    if all_reduce is not None:
        all_reduce(total)
    return (total[0] / total[1]).clamp(min=0)


def kto_weight_warning(n_desirable, n_undesirable, desirable_weight=1.0, undesirable_weight=1.0):
    """None, or a warning when lambda_D n_D / (lambda_U n_U) lies outside [1, 4/3], the range the KTO paper
    recommends (TRL warns the same), saying which weights would bring it back."""
    if not n_desirable or not n_undesirable:
        return (f"the training data has {n_desirable} desirable and {n_undesirable} undesirable examples: KTO only "
                f"pushes the policy one way (and z0 has nothing to balance); give examples of both labels")
    ratio = desirable_weight * n_desirable / (undesirable_weight * n_undesirable)
    if 1 - 1e-9 <= ratio <= 4 / 3 + 1e-9:
        return None
    d_lo = undesirable_weight * n_undesirable / n_desirable
    u_hi = desirable_weight * n_desirable / n_undesirable
    return (f"desirable_weight * n_desirable / (undesirable_weight * n_undesirable) = {desirable_weight:g} * "
            f"{n_desirable} / ({undesirable_weight:g} * {n_undesirable}) = {ratio:.3f} is outside [1, 4/3], the "
            f"range the KTO paper recommends; set desirable_weight in [{d_lo:.3g}, {4 / 3 * d_lo:.3g}] or "
            f"undesirable_weight in [{u_hi * 3 / 4:.3g}, {u_hi:.3g}]")


def sequence_logps(model, idx, targets):
    """Summed log-prob of each row's target tokens (targets -100 elsewhere: prompt, padding) and their
    count, from the fused per-token loss (the (B, T, vocab) logits are never materialised)."""
    _, nll = model(idx, targets, reduction="none")
    return -nll.float().sum(-1), (targets != -100).sum(-1)


def falling_streak(values, window):
    """True when the last `window` values each fell below the one before."""
    return len(values) >= window and all(b < a for a, b in zip(values[-window:], values[-window + 1:]))


# -----------------------------------------------------------------------------
# config: every global below can be set from a config file or --key=value
out_dir = "out/dpo"
init_from = "out/sft/ckpt.pt"   # the policy starts here; the reference is this model, frozen ("resume": out_dir)
seed = 1337
# data (as reward.py)
data = "tasks"             # "tasks" (pairs from data/tasks.py) | .json/.jsonl/.parquet file(s) | hub dataset name
train_split = "train"
val_data = ""              # "": hold out val_fraction of data ("tasks": its test split)
val_split = "test"
val_fraction = 0.05
skip_bad = False
max_records = -1
max_val_records = 1000
max_len = -1               # longest prompt + response in tokens (-1: the model's max_seq_len); longer pairs are dropped
task_pairs = 1000          # "tasks": (correct, wrong) training pairs (kto: each gives a desirable and an
                           # undesirable example)
task_val_pairs = 200
sampled_pairs = 1000       # "tasks": also ask the initial policy this many questions, pair its mistakes with
                           # correct answers
num_samples = 2            # sampled answers per question, besides the greedy one
sample_temperature = 1.0
# objective
loss_type = "sigmoid"      # sigmoid | robust | ipo | hinge | simpo | orpo (pairs) | kto (unpaired examples)
beta = 0.1
label_smoothing = 0.0      # eps: sigmoid -> cDPO, and the flip rate of loss_type="robust" (0 <= eps < 0.5)
simpo_gamma = 0.5
orpo_lambda = 0.1
rpo_alpha = -1.0           # -1: 1.0 for the pair losses, as the task pairs differ in a token or two, where plain DPO
                           # lowers chosen too (DPOP/RPO); 0 for kto (it has no chosen of a pair). 0: pure DPO
desirable_weight = 1.0     # kto: lambda_D and lambda_U, the weights of desirable and undesirable examples (TRL's
undesirable_weight = 1.0   # names); lambda_D n_D / (lambda_U n_U) should be in [1, 4/3]
precompute_ref_logprobs = False
# LoRA (lora_r = 0: full fine-tune and a reference copy)
lora_r = 0
lora_alpha = 16
lora_dropout = 0.0
lora_targets = "all"
# optimisation
batch_size = 16            # pairs (kto: examples, at least 2) per micro-batch per rank
grad_accum = 1
num_epochs = 1.0
max_steps = -1             # -1: num_epochs over the training pairs
lr = 1e-4                  # for the tiny default model; ~5e-7 for a full fine-tune of a real one (Zephyr)
min_lr = 1e-5
warmup_steps = 10
lr_schedule = "cosine"
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
# system
parallel = "ddp"           # under torchrun: "ddp" or "fsdp"
compile = False
peak_flops = None          # dense bf16 FLOP/s of one device for MFU; None: looked up from the device name
activation_checkpointing = False
device = "auto"
kernels = "auto"
dtype = "auto"             # weights: auto (as stored, fp32 on the CPU: HF bf16 stays bf16 on CUDA) | float32 |
                           # bfloat16
# logging, eval
log_interval = 10
eval_interval = 100
eval_tasks = 500           # greedy exact-match on this many held-out data/tasks.py questions, before and after (0: off)
eval_max_new_tokens = 24
logp_warn_window = 5       # warn when logps/chosen fell at this many consecutive logs
ckpt_interval = 100        # save (with optimizer state, for init_from="resume") every this many steps; 0 = at the end
halt_at_step = -1          # stop early at this step, keeping the schedule (a planned interruption)
report_dir = ""             # the summary goes into report_dir/<stage>.json and report.md ("": beside out_dir)
wandb_log = False
wandb_project = "dpo"
wandb_run_name = "run"


# what the configurator accepts (checked before any work is done)
_choices = dict(loss_type=_LOSS_TYPES, lr_schedule=SCHEDULES, parallel=("ddp", "fsdp"), device=("auto", "cpu", "cuda"),
                kernels=("auto", "triton", "torch"), dtype=("auto", "float32", "bfloat16"),
                lora_targets=check_targets)
_ranges = dict(val_fraction="(0, 1)", max_records="[1, inf) or -1", max_val_records="[1, inf)",
               max_len="[1, inf) or -1", task_pairs="[1, inf)", task_val_pairs="[1, inf)", sampled_pairs="[0, inf)",
               num_samples="[1, inf)", sample_temperature="(0, inf)", beta="(0, inf)", label_smoothing="[0, 0.5)",
               simpo_gamma="[0, inf)", orpo_lambda="[0, inf)", rpo_alpha="[0, inf) or -1", desirable_weight="(0, inf)",
               undesirable_weight="(0, inf)", lora_r="[0, inf)",
               lora_alpha="(0, inf)", lora_dropout="[0, 1)", batch_size="[1, inf)", grad_accum="[1, inf)",
               num_epochs="(0, inf)", max_steps="[1, inf) or -1", lr="(0, inf)", min_lr="[0, inf)",
               warmup_steps="[0, inf)", weight_decay="[0, inf)", beta1="[0, 1)", beta2="[0, 1)", grad_clip="[0, inf)",
               log_interval="[1, inf)", eval_interval="[1, inf)", eval_tasks="[0, inf)",
               eval_max_new_tokens="[1, inf)", logp_warn_window="[2, inf)", ckpt_interval="[0, inf)",
               halt_at_step="[1, inf) or -1", peak_flops="(0, inf)")
# init_from="resume" continues with the checkpoint's model, reference and data: these must not change on resume
_resume_fixed = ("data", "train_split", "val_data", "val_split", "val_fraction", "max_records", "max_val_records",
                 "max_len", "task_pairs", "task_val_pairs", "sampled_pairs", "num_samples", "sample_temperature",
                 "seed", "loss_type", "precompute_ref_logprobs", "lora_r", "lora_alpha", "lora_dropout",
                 "lora_targets", "eval_tasks")
_resume_schedule = ("batch_size", "grad_accum", "num_epochs", "max_steps", "lr", "min_lr", "warmup_steps",
                    "lr_schedule", "beta", "label_smoothing", "simpo_gamma", "orpo_lambda", "rpo_alpha", "world_size",
                    "desirable_weight", "undesirable_weight")

if __name__ == "__main__":
    from configs import configure
    config = configure(globals())

    import torch.distributed as dist

    from checkpoint import (check_vocab, check_writable, fingerprint, load_model, load_optimizer_state,
                            optimizer_state_dict, restore_rng_states, rng_states, save_checkpoint, training_checkpoint)
    from data import tasks
    from data.chat import BadRecord
    from data.records import DataError
    from data.order import EpochOrder
    from data.preference import (as_pairs, encode_records, encode_unpaired, load_preferences, load_unpaired,
                                 mismatched, pad_batch, sampled_task_pairs, split_off, task_pairs as make_task_pairs,
                                 unpair)
    from data.tokenizer import get_tokenizer
    from distributed import (check_replicas_identical, device_peak_flops, grad_sync, mfu, parallelize,
                             setup_distributed, teardown_distributed)
    from lora import apply_lora, lora_disabled, lora_modules, merge_lora
    from model import Transformer
    from optim import configure_optimizer, lr_at, mark_nonfinite, stop_if_nonfinite

    if label_smoothing and loss_type not in ("sigmoid", "robust"):
        raise SystemExit(f"config error: label_smoothing={label_smoothing} applies to loss_type 'sigmoid' (cDPO) and "
                         f"'robust' (rDPO) only, not {loss_type!r}")
    kto = loss_type == "kto"
    if rpo_alpha < 0:
        rpo_alpha = 0.0 if kto else 1.0
    if kto and rpo_alpha:
        raise SystemExit(f"config error: rpo_alpha={rpo_alpha} is an NLL term on the chosen response of a pair; "
                         f"loss_type 'kto' has no pairs (its desirable term raises desirable completions itself): "
                         f"leave rpo_alpha unset, or 0")
    if kto and batch_size < 2:
        raise SystemExit(f"config error: loss_type 'kto' needs batch_size >= 2 (got {batch_size}): its reference "
                         f"point z0 comes from mismatched pairs within a micro-batch, and one example's only "
                         f"'mismatched' pair is its own")
    if not kto and (desirable_weight != 1.0 or undesirable_weight != 1.0):
        raise SystemExit(f"config error: desirable_weight / undesirable_weight ({desirable_weight:g} / "
                         f"{undesirable_weight:g}) apply to loss_type 'kto' only, not {loss_type!r}")
    ddp, rank, world_size, device, autocast = setup_distributed(device)
    master = rank == 0
    torch.manual_seed(seed)
    log = print if master else (lambda *a, **k: None)
    fsdp = ddp and parallel == "fsdp"

    # model ----------------------------------------------------------------------------------
    # Dropout off in policy and reference (as TRL): with it, policy == reference would not give log 2 at step 0.
    resume = init_from == "resume"
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    source = ckpt_path if resume else init_from
    if not os.path.exists(source):
        raise SystemExit(f"init_from={source} not found: run `python sft.py` first, "
                         f"or point --init_from at a language-model checkpoint")
    try:
        wdtype = None if dtype == "auto" else getattr(torch, dtype)
        policy, ckpt = load_model(source, kernels=kernels, dropout=0.0, dtype=wdtype)
        tok_name = ckpt["tokenizer"]
        tok = get_tokenizer(tok_name)
        check_vocab(policy, tok, source)
        if resume:
            from configs import check_resume
            check_resume(ckpt, {**config, "world_size": world_size}, _resume_fixed, _resume_schedule, ckpt_path)
            base_init, start_step, sampled = ckpt["init_from"], ckpt["step"], ckpt["sampled_records"]
            acc_before, v = ckpt["task_accuracy_before"], ckpt["val_metrics"]
            # the reference is the initial policy: reload it, and make sure it is the file the run started from
            if ckpt["init_fingerprint"] != fingerprint(base_init):
                raise SystemExit(f"dpo: cannot resume {ckpt_path}: its reference, the initial policy {base_init}, "
                                 f"has changed since the run started (fingerprint mismatch); restore it")
            reference, _ = (load_model(base_init, kernels=kernels, dropout=0.0, dtype=wdtype) if lora_r == 0
                            else (None, None))
        else:
            base_init, start_step, sampled, reference = os.path.abspath(init_from), 0, None, policy
    except ValueError as e:  # e.g. a reward model where a language model is needed, a corrupt file
        raise SystemExit(f"dpo: init_from: {e}")
    if master:
        check_writable(out_dir, protect=(base_init,))
    init_fingerprint = fingerprint(base_init)
    if lora_modules(policy) and not resume:
        merge_lora(policy)  # an adapter checkpoint from sft.py: start from (and refer to) the merged model
    cfg = policy.config
    policy.to(device)
    seq_cap = cfg.max_seq_len if max_len < 0 else min(max_len, cfg.max_seq_len)
    needs_ref = loss_type not in _REFERENCE_FREE
    ref_model = None  # a frozen copy of the initial policy (full fine-tuning; precomputing on resume needs it too)
    if needs_ref and lora_r == 0 and (not precompute_ref_logprobs or resume):
        ref_model = copy.deepcopy(policy) if reference is policy else reference
        ref_model.to(device).eval().requires_grad_(False)
        if fsdp:
            ref_model = parallelize(ref_model, "fsdp", device)

    # data -----------------------------------------------------------------------------------
    test_examples = tasks.generate(eval_tasks, "test", seed=0) if eval_tasks else []
    if data == "tasks":
        train_records = make_task_pairs(task_pairs, "train", seed)
        val_records = make_task_pairs(task_val_pairs, "test", seed)
        if sampled_pairs and sampled is None:  # on-policy pairs: the initial policy's own mistakes as rejected
            policy.eval()                      # (a resumed run reuses the ones it sampled, saved with it)
            with autocast:
                sampled = sampled_task_pairs(policy, tok, tasks.generate(sampled_pairs, "train", seed + 1),
                                             num_samples, sample_temperature, seed=seed + rank)
            policy.train()
            log(f"sampled {len(sampled)} on-policy pairs from {sampled_pairs} questions x {num_samples} samples")
            if ddp:  # each rank sampled its own pairs: train on rank 0's everywhere
                obj = [sampled]
                dist.broadcast_object_list(obj, src=0)
                sampled = obj[0]
        train_records += sampled or []
        if kto:  # each (correct, wrong) pair: a desirable and an undesirable example
            train_records, val_records = unpair(train_records), unpair(val_records)
    else:
        load = load_unpaired if kto else load_preferences  # kto: TRL's unpaired layout, or pairs unpaired
        try:
            train_records = load(data, train_split, skip_bad, None if max_records < 0 else max_records, log=log)
            if val_data:
                val_records = load(val_data, val_split, skip_bad, max_val_records, log=log)
            else:
                train_records, val_records = split_off(train_records, val_fraction, seed)
        except (BadRecord, DataError, FileNotFoundError) as e:
            raise SystemExit(f"dpo: {e}")
    try:
        if kto:
            train_set = encode_unpaired(train_records, tok, seq_cap, verbose=master, what="train")
            val_set = encode_unpaired(val_records[:max_val_records], tok, seq_cap, verbose=master, what="val")
        else:  # K ranked responses -> all C(K, 2) pairs
            train_set = encode_records(as_pairs(train_records), tok, seq_cap, verbose=master, what="train")
            val_set = encode_records(as_pairs(val_records)[:max_val_records], tok, seq_cap, verbose=master,
                                     what="val")
    except DataError as e:  # nothing left to train on, and why
        raise SystemExit(f"dpo: {e}")
    unit = "examples" if kto else "pairs"
    per_step = batch_size * grad_accum * world_size
    steps = max_steps if max_steps > 0 else max(1, math.ceil(num_epochs * len(train_set) / per_step))
    n_desirable = sum(r["label"] for r in train_set) if kto else 0
    warning = kto_weight_warning(n_desirable, len(train_set) - n_desirable, desirable_weight,
                                 undesirable_weight) if kto else None
    if warning:
        log(f"warning: {warning}")

    lora = dict(targets=lora_targets, r=lora_r, alpha=lora_alpha, dropout=lora_dropout) if lora_r > 0 else None
    if lora and not resume:  # (a resumed LoRA policy comes back with its adapters)
        apply_lora(policy, **lora)
        policy.to(device)
    policy.activation_checkpointing = activation_checkpointing
    raw_model = policy
    n_train = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
    model = parallelize(policy, parallel if ddp else "none", device)
    optimizer = configure_optimizer(model, lr, weight_decay, (beta1, beta2), device_type=device.type)
    if resume:
        load_optimizer_state(model, optimizer, ckpt["optimizer"])
        restore_rng_states(ckpt["rng"], rank, device)
    del ckpt, reference
    if compile:
        model = torch.compile(model)
    ref_kind = ("none (reference-free)" if not needs_ref else "precomputed log-probs" if precompute_ref_logprobs
                else "adapters off" if lora_r else "frozen copy")
    balance = (f" ({n_desirable} desirable, {len(train_set) - n_desirable} undesirable; weights "
               f"{desirable_weight:g} / {undesirable_weight:g})" if kto else "")
    log(f"policy from {init_from}: {raw_model.num_params() / 1e6:.2f}M params, {n_train / 1e6:.2f}M trained"
        f"{f' (LoRA r={lora_r})' if lora_r else ''} | loss {loss_type}, beta {beta} | reference: {ref_kind} | "
        f"data {data}: {len(train_set)} train / {len(val_set)} val {unit}{balance} | {steps} steps x "
        f"{per_step} {unit} = {steps * per_step / len(train_set):.2f} "
        f"epochs | device {device} x {world_size}")
    wandb = dict(project=wandb_project, name=wandb_run_name, config=config) if wandb_log else None
    metrics = MetricsLogger(out_dir, start_step if resume else None, enabled=master, wandb=wandb)

    def pair_batch(records):
        """Chosen rows then rejected rows, padded together: one forward for both (kto: one row per example)."""
        if kto:
            return pad_batch([r["tokens"] for r in records], tok.pad_id, device)
        return pad_batch([r["tokens"][0] for r in records] + [r["tokens"][1] for r in records], tok.pad_id, device)

    def kl_batch(records):
        """kto: the batch's mismatched pairs, each prompt with the completion before it (data/preference.py)."""
        return pad_batch(mismatched(records, seq_cap), tok.pad_id, device)

    @torch.no_grad()
    def reference_logps(idx, targets):
        if ref_model is not None:
            return sequence_logps(ref_model, idx, targets)[0]
        was_training = raw_model.training
        raw_model.eval()  # no dropout in the reference
        with lora_disabled(raw_model):  # the base model is the reference
            out = sequence_logps(model, idx, targets)[0]
        raw_model.train(was_training)
        return out

    order = EpochOrder(len(train_set), seed)  # the examples of each (step, micro, rank): a function of the step

    def train_ids_at(step, micro):
        return order.batch(step, micro, rank, world_size, grad_accum, batch_size)

    def val_ids(it):
        """This rank's validation records at evaluation iteration it (every rank runs the same iterations)."""
        lo = it * batch_size * world_size + rank * batch_size
        return list(range(lo, min(lo + batch_size, len(val_set))))

    def precompute(records):
        """(N, 2) reference log-probs of chosen and rejected (kto: (N, 1)), split across ranks, summed back."""
        k = 1 if kto else 2
        out = torch.zeros(len(records), k, device=device)
        raw_model.eval()
        per_iter = batch_size * world_size
        for it in range(math.ceil(len(records) / per_iter)):  # the same count on every rank (FSDP needs it)
            lo = it * per_iter + rank * batch_size
            recs = records[lo:lo + batch_size]
            idx, targets, _ = pair_batch(recs or records[:1])
            with autocast:
                lp = reference_logps(idx, targets)
            if recs:
                out[lo:lo + len(recs)] = lp.view(k, -1).t()[:len(recs)]
        if ddp:
            dist.all_reduce(out)
        raw_model.train()
        return out

    def precompute_kl(batches):
        """kto: the reference log-probs of each batch's mismatched pairs, which depend on the whole batch (fixed
        by the seed): one forward per batch this rank will see."""
        raw_model.eval()
        with autocast:
            out = {key: reference_logps(*kl_batch(recs)[:2]) for key, recs in batches}
        raw_model.train()
        return out

    train_kl_ref = val_kl_ref = None
    if needs_ref and precompute_ref_logprobs:
        t0 = time.time()
        train_ref, val_ref = precompute(train_set), precompute(val_set)
        if kto:
            train_kl_ref = precompute_kl(((st, m), [train_set[i] for i in train_ids_at(st, m)])
                                         for st in range(start_step, steps) for m in range(grad_accum))
            val_kl_ref = precompute_kl((it, [val_set[i] for i in val_ids(it) or [0]])
                                       for it in range(math.ceil(len(val_set) / (batch_size * world_size))))
        ref_model = None  # (held on resume, to precompute from the initial policy)
        log(f"precomputed reference log-probs of {len(train_set) + len(val_set)} {unit}"
            f"{' and of every batch of mismatched pairs' if kto else ''} in {time.time() - t0:.0f}s")

    def pass_flops(idx, backward):  # model FLOPs of one pass over a padded batch (model.flops)
        return raw_model.flops((idx != tok.pad_id).sum(1), backward=backward)

    def forward_pairs(records, ids, ref_table, kl_ref=None, n_real=None):
        """Per-pair losses and stats for a batch of records (ids: their positions, for precomputed refs), its
        tokens and the model FLOPs spent on it (the policy's forward and backward, the reference's forward)."""
        idx, targets, _ = pair_batch(records)
        B = len(records)
        if not needs_ref:
            ref_c = ref_r = None
        elif ref_table is not None:
            ref_c, ref_r = ref_table[ids, 0], ref_table[ids, 1]
        else:
            ref = reference_logps(idx, targets)
            ref_c, ref_r = ref[:B], ref[B:]
        logps, lengths = sequence_logps(model, idx, targets)
        lengths = lengths.float()
        losses, r_c, r_r = preference_loss(logps[:B], logps[B:], ref_c, ref_r, lengths[:B], lengths[B:], loss_type,
                                           beta, label_smoothing, simpo_gamma, orpo_lambda, rpo_alpha)
        stats = torch.stack([losses.detach().sum(), r_c.sum(), r_r.sum(), (r_c - r_r).sum(),
                             (r_c > r_r).float().sum(), logps[:B].detach().sum(), logps[B:].detach().sum(),
                             torch.tensor(float(B), device=device)])
        flops = pass_flops(idx, True) + (pass_flops(idx, False) if needs_ref and ref_table is None else 0)
        return losses, stats, (idx != tok.pad_id).sum(), flops

    def forward_examples(records, ids, ref_table, kl_ref=None, n_real=None):
        """kto: per-example losses and stats for a batch of records. kl_ref: precomputed reference log-probs of
        the batch's mismatched pairs; n_real: how many records are real (a rank with no validation records left
        runs a stand-in batch, which must not count in z0)."""
        idx, targets, _ = pair_batch(records)
        kl_idx, kl_targets, _ = kl_batch(records)
        B = len(records)
        n_real = B if n_real is None else n_real
        ref = ref_table[ids, 0] if ref_table is not None else reference_logps(idx, targets)
        ref_kl = kl_ref if kl_ref is not None else reference_logps(kl_idx, kl_targets)
        # z0 is detached: the mismatched pairs go through the policy without a graph (as TRL), and before the matched
        # ones, as the MoE balancing loss is read from the last forward
        with torch.no_grad():
            policy_kl = sequence_logps(model, kl_idx, kl_targets)[0]
        z0 = kto_reference_point(policy_kl[:n_real], ref_kl[:n_real], dist.all_reduce if ddp else None)
        logps, _ = sequence_logps(model, idx, targets)
        desirable = torch.tensor([r["label"] for r in records], device=device)
        losses, rewards = kto_loss(logps, ref, desirable, z0, beta, desirable_weight, undesirable_weight)
        d, u, lp = desirable.float(), (~desirable).float(), logps.detach()
        stats = torch.stack([losses.detach().sum(), z0 * B, (rewards * d).sum(), (rewards * u).sum(), (lp * d).sum(),
                             (lp * u).sum(), d.sum(), u.sum(), torch.tensor(float(B), device=device)])
        flops = pass_flops(idx, True) + pass_flops(kl_idx, False)  # the policy: matched pairs, mismatched ones
        flops = flops + (pass_flops(idx, False) if ref_table is None else 0)  # the reference on both
        flops = flops + (pass_flops(kl_idx, False) if kl_ref is None else 0)
        return losses, stats, (idx != tok.pad_id).sum(), flops

    forward = forward_examples if kto else forward_pairs
    n_stats = 9 if kto else 8
    STAT_NAMES = ("loss", "rewards/chosen", "rewards/rejected", "margins", "accuracy", "logps/chosen", "logps/rejected")

    def summarise(stats):
        if not kto:
            return {k: (stats[i] / stats[-1]).item() for i, k in enumerate(STAT_NAMES)}
        # kto: TRL's names, chosen = desirable and rejected = undesirable, each averaged over its own examples
        loss, kl, r_d, r_u, lp_d, lp_u, n_d, n_u, n = stats.tolist()
        n_d, n_u = n_d or float("nan"), n_u or float("nan")  # no example of a label since the last log: nan
        return {"loss": loss / n, "kl": kl / n, "rewards/chosen": r_d / n_d, "rewards/rejected": r_u / n_u,
                "margins": r_d / n_d - r_u / n_u, "logps/chosen": lp_d / n_d, "logps/rejected": lp_u / n_u}

    @torch.no_grad()
    def evaluate_pairs():
        model.eval()
        total = torch.zeros(n_stats, device=device)
        for it in range(math.ceil(len(val_set) / (batch_size * world_size))):
            ids = val_ids(it)
            with autocast:
                _, stats, _, _ = forward([val_set[i] for i in ids or [0]], torch.tensor(ids or [0], device=device),
                                      val_ref if needs_ref and precompute_ref_logprobs else None,
                                      val_kl_ref[it] if val_kl_ref is not None else None, n_real=len(ids))
            total += stats * (1.0 if ids else 0.0)
        if ddp:
            dist.all_reduce(total)
        model.train()
        return summarise(total)

    def task_accuracy():
        """Greedy exact match on held-out task questions, split over ranks."""
        if not test_examples:
            return None
        with autocast:
            return tasks.exact_match(raw_model, tok, test_examples, eval_max_new_tokens, rank=rank,
                                     world_size=world_size)

    def fmt_acc(a):
        return f"{a[0]:.3f} ({', '.join(f'{t} {v:.2f}' for t, v in a[1].items())})"

    def fmt_stats(s):
        return " | ".join(f"{k} {v:.4f}" for k, v in s.items())

    def save(step):
        """A checkpoint to resume from; at the end the result: a plain language model (LoRA merged).
        Every rank calls this (collectives under DDP/FSDP)."""
        stop_if_nonfinite(first_bad, model, ckpt_path)  # never write NaN weights over the last good checkpoint
        finished = step == steps
        extra = dict(step=step, config=config, init_from=base_init, init_fingerprint=init_fingerprint, val_metrics=v,
                     task_accuracy_before=acc_before, sampled_records=sampled, rng=rng_states(device, ddp))
        if finished and acc_before:
            extra["task_accuracy_after"] = acc_after
        if not finished:
            extra["optimizer"] = optimizer_state_dict(model, optimizer)
        state = training_checkpoint(model, tok_name, lora, finished, lambda: Transformer(cfg), **extra)
        if master:
            save_checkpoint(ckpt_path, state, protect=(base_init,))
            log(f"saved {ckpt_path} at step {step}")

    # training: evaluate and save at the top of an iteration, so step 0, every interval and the last step take
    # the same path (the task accuracy, which generates, only before and after training) -------------------
    model.train()
    last_step = steps if halt_at_step < 0 else min(halt_at_step, steps)
    first_bad = torch.tensor(-1, device=device)  # the first non-finite step (optim.mark_nonfinite)
    t_start = t_log = time.time()
    n_train_tokens = 0
    peak_flops = peak_flops or device_peak_flops(device)  # for MFU; None on a CPU
    tokens, flops, window = torch.zeros((), device=device), 0, torch.zeros(n_stats, device=device)
    chosen_history, warned = [], False
    acc_after = None
    for step in range(start_step, last_step + 1):
        final = step == last_step
        if (step == 0 or final) and not (resume and step == start_step):
            acc = task_accuracy()
            if acc:
                log(f"step {step}: task exact-match {fmt_acc(acc)}"
                    + (f" on {len(test_examples)} held-out questions" if step == 0 else ""))
            if step == 0:
                acc_before = acc
            else:
                acc_after = acc
        if (step % eval_interval == 0 or final) and not (resume and step == start_step):
            stop_if_nonfinite(first_bad, ckpt_path=ckpt_path)
            v = evaluate_pairs()
            log(f"step {step}: val {fmt_stats(v)}")
            metrics.log(step, **{f"val_{k.replace('/', '_')}": x for k, x in v.items()},
                        **({"val_task_accuracy": acc[0]} if (step == 0 or final) and acc else {}))
            t_log = time.time()  # evaluation time is not training throughput
        if step > start_step and ((ckpt_interval and step % ckpt_interval == 0) or final):
            save(step)
        if final:
            break

        cur_lr = lr_at(step, steps, lr, warmup_steps, min_lr, lr_schedule)
        for group in optimizer.param_groups:
            group["lr"] = cur_lr
        step_loss = torch.zeros((), device=device)
        for micro in range(grad_accum):
            ids = train_ids_at(step, micro)
            with grad_sync(model, micro == grad_accum - 1), autocast:
                losses, stats, n_tok, n_flops = forward([train_set[i] for i in ids], torch.tensor(ids, device=device),
                                               train_ref if needs_ref and precompute_ref_logprobs else None,
                                               train_kl_ref[step, micro] if train_kl_ref is not None else None)
                loss = losses.mean()
                aux = raw_model.moe_aux_loss()  # the per-token log-probs carry no balancing loss: add it here
                if aux is not None and cfg.moe_aux_loss_coef > 0:
                    loss = loss + cfg.moe_aux_loss_coef * aux
            (loss / grad_accum).backward()
            step_loss += loss.detach() / grad_accum
            window += stats.detach()
            tokens += n_tok
            flops = flops + n_flops
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
        first_bad = mark_nonfinite(first_bad, step, step_loss, grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        raw_model.update_moe_bias()
        done = step + 1
        if done % log_interval == 0 or done == last_step:
            if ddp:
                dist.all_reduce(window)
            stop_if_nonfinite(first_bad, ckpt_path=ckpt_path)
            s = summarise(window)
            dt = time.time() - t_log
            eta = (last_step - done) * (time.time() - t_start) / (done - start_step)
            # logged loss: the mean over the pairs (examples) of every rank since the last log
            log(f"step {done}/{steps} | loss {s['loss']:.4f} | lr {cur_lr:.2e} | grad_norm {grad_norm.item():.2f} | "
                f"tok/s {tokens.item() * world_size / dt:,.0f} | "
                f"mfu {mfu(float(flops) * world_size, dt, world_size, peak_flops)} | " +
                (f"kl {s['kl']:.4f} | " if kto else "") +
                f"rewards/chosen {s['rewards/chosen']:.3f} | rewards/rejected {s['rewards/rejected']:.3f} | "
                f"margins {s['margins']:.3f} | " + ("" if kto else f"accuracy {s['accuracy']:.3f} | ") +
                f"logps/chosen {s['logps/chosen']:.2f} | logps/rejected {s['logps/rejected']:.2f} | "
                f"eta {int(eta // 60)}m{int(eta % 60):02d}s", flush=True)
            chosen_history.append(s["logps/chosen"])
            if falling_streak(chosen_history, logp_warn_window):
                if not warned:
                    log(f"warning: logps/chosen fell at {logp_warn_window} consecutive logs "
                        f"({chosen_history[-logp_warn_window]:.2f} -> {chosen_history[-1]:.2f}): the policy is "
                        f"pushing chosen responses down along with rejected ones. Consider "
                        + ("" if kto else "rpo_alpha=1.0 (an NLL term on chosen), ") + "a lower lr or a larger beta.")
                warned = True
            else:
                warned = False
            metrics.log(done, lr=cur_lr, grad_norm=grad_norm.item(), tokens_per_sec=tokens.item() * world_size / dt,
                        **{k.replace("/", "_"): v for k, v in s.items()})
            n_train_tokens += tokens.item() * world_size
            t_log, tokens, window = time.time(), torch.zeros((), device=device), torch.zeros(n_stats, device=device)
            flops = 0

    if ddp and parallel == "ddp":
        log(f"parameters identical on all {check_replicas_identical(model)} ranks")
    if last_step < steps:
        log(f"halted at step {last_step} (halt_at_step); continue with --init_from=resume --out_dir={out_dir}")
    elif acc_before and acc_after:
        log(f"task exact-match {acc_before[0]:.3f} -> {acc_after[0]:.3f} ({time.time() - t_start:.0f}s)")
    if master:
        pair_metric = "accuracy" if "accuracy" in v else "margins"
        write_summary(report_dir, "dpo", out_dir=out_dir, summary=dict(
            setup=run_setup(device, world_size), params=raw_model.num_params(), trainable=n_train,
            tokens=int(n_train_tokens), wall_time=time.time() - t_start, steps=last_step, init_from=base_init,
            ckpt=ckpt_path, loss_type=loss_type,
            before=dict(task_accuracy=acc_before[0] if acc_before else None),
            after={"task_accuracy": acc_after[0] if acc_after else None, f"val_{pair_metric}": v[pair_metric]},
            metrics=metrics.path))
    teardown_distributed(ddp)
