"""
Reward model: the transformer with a scalar head, trained on preference pairs with the
Bradley-Terry loss -log sigmoid(r_chosen - r_rejected).

$ python reward.py                                   # task pairs from data/tasks.py, from out/sft/ckpt.pt, CPU, minutes
$ python reward.py --data=prefs.jsonl --lora_r=16    # your own pairs (any layout of data/preference.py), LoRA
$ python reward.py configs/reward_ultrafeedback.py    # UltraFeedback-binarized from the hub, one GPU
$ torchrun --standalone --nproc_per_node=8 reward.py configs/reward_ultrafeedback.py

The reward is read at the final token of each response (its <|im_end|>); chosen and rejected
go through the model in one batch. K ranked responses per prompt train on all C(K, 2) pairs,
averaged per prompt (InstructGPT). Options: a margin, -log sigmoid(r_c - r_r - m) with m a
constant plus score_margin * (score_c - score_r) where the data has scores; reward centering,
center_coef * (r_c + r_r)^2, which keeps rewards near 0 so they can be compared across prompts.
Validation reports pairwise accuracy (ties count half), mean margin, reward mean/std.

The output, out/reward/ckpt.pt, loads with checkpoint.load_model(path, kind="reward"), and
score_conversations(reward_model, messages_list, tokenizer) below scores conversations with it
(grpo.py's learned reward).
"""

import math
import os
import time

import torch
import torch.nn.functional as F

from lora import check_targets
from optim import SCHEDULES
from report import MetricsLogger, run_setup, write_summary

# -----------------------------------------------------------------------------
# the objective: pure functions of reward tensors


def ranked_pairs(group_sizes):
    """Pairs of a batch of ranked groups laid out one after another (each best first):
    (better index, worse index, weight) with weight 1 / C(K, 2), so each prompt counts once."""
    better, worse, weight, start = [], [], [], 0
    for k in group_sizes:
        n = k * (k - 1) // 2
        for i in range(k):
            for j in range(i + 1, k):
                better.append(start + i)
                worse.append(start + j)
                weight.append(1.0 / n)
        start += k
    return torch.tensor(better), torch.tensor(worse), torch.tensor(weight)


def bradley_terry_loss(r_better, r_worse, margin=0.0):
    """Per-pair -log sigmoid(r_better - r_worse - margin) (margin: a number or a per-pair tensor)."""
    return -F.logsigmoid(r_better - r_worse - margin)


def reward_loss(rewards, group_sizes, margins=None, center_coef=0.0):
    """The batch loss from the rewards of ranked groups: per prompt, the mean Bradley-Terry loss over
    its C(K, 2) pairs (plus center_coef * mean (r_i + r_j)^2), averaged over prompts. Also returns
    the per-pair reward differences (for accuracy and margin metrics)."""
    better, worse, weight = (t.to(rewards.device) for t in ranked_pairs(group_sizes))
    diff = rewards[better] - rewards[worse]
    losses = bradley_terry_loss(rewards[better], rewards[worse], 0.0 if margins is None else margins)
    if center_coef:
        losses = losses + center_coef * (rewards[better] + rewards[worse]) ** 2
    return (weight * losses).sum() / len(group_sizes), diff


@torch.no_grad()
def score_conversations(reward_model, messages_list, tokenizer, batch_size=32):
    """Rewards (N,) fp32, on the model's device, of conversations (lists of {"role", "content"}) that end with
    the assistant reply to score, rendered with the chat template (data/chat.py) and read at that reply's
    end-of-turn token. A conversation longer than max_seq_len loses its start, not its end."""
    from data.chat import render
    device, was_training = reward_model.score_head.weight.device, reward_model.training
    reward_model.eval()
    seqs = []
    for i, msgs in enumerate(messages_list):
        if not msgs or msgs[-1]["role"] != "assistant":
            raise ValueError(f"conversation {i}: scoring needs conversations ending with the assistant reply to score")
        ids = render(msgs, tokenizer)[0]
        end = len(ids) - 1 - ids[::-1].index(tokenizer.end_of_turn_id)
        seqs.append(ids[:end + 1][-reward_model.config.max_seq_len:])
    out = []
    for b in range(0, len(seqs), batch_size):
        chunk = seqs[b:b + batch_size]
        idx = torch.full((len(chunk), max(map(len, chunk))), tokenizer.pad_id, dtype=torch.long)
        for j, s in enumerate(chunk):
            idx[j, :len(s)] = torch.tensor(s)
        out.append(reward_model(idx.to(device), torch.tensor([len(s) - 1 for s in chunk], device=device)))
    reward_model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, device=device)


# -----------------------------------------------------------------------------
# config: every global below can be set from a config file or --key=value
out_dir = "out/reward"
init_from = "out/sft/ckpt.pt"   # an SFT (or pretrained) language model (a fresh score head goes on top), or "resume"
seed = 1337
# data
data = "tasks"             # "tasks" (pairs from data/tasks.py) | .json/.jsonl/.parquet file(s) | hub dataset name
train_split = "train"      # hub split names (ignored for local files)
val_data = ""              # "": hold out val_fraction of data ("tasks": its test split)
val_split = "test"
val_fraction = 0.05
skip_bad = False           # skip (and count) malformed records instead of stopping
max_records = -1           # use at most this many training records (-1: all)
max_val_records = 2000
max_len = -1               # longest prompt + response in tokens (-1: the model's max_seq_len); longer ones dropped
task_pairs = 8000          # "tasks": number of (correct, wrong) training pairs (fresh pairs beat a second epoch)
task_val_pairs = 500
sampled_pairs = 0          # "tasks": also sample this many questions from the init model, pair its mistakes with
                           # correct answers
num_samples = 4            # samples per question for sampled_pairs
sample_temperature = 1.0
# objective
margin = 0.0
score_margin = 0.0         # margin += score_margin * (score_chosen - score_rejected) where records have scores
center_coef = 0.0          # reward centering (TRL's center_rewards_coefficient, e.g. 0.01)
# LoRA (lora_r = 0: full fine-tune)
lora_r = 0
lora_alpha = 16
lora_dropout = 0.0
lora_targets = "all"       # "all" or a comma-separated subset of q,k,v,o,gate,up,down
# optimisation
batch_size = 16            # prompts (pairs) per micro-batch per rank
grad_accum = 1
num_epochs = 1.0           # reward models overfit after about one epoch
max_steps = -1             # -1: num_epochs over the training records
lr = 3e-4                  # for the tiny default model; ~5e-6 for a full fine-tune of a real one
min_lr = 3e-5
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
device = "auto"            # "auto" | "cpu" | "cuda"
kernels = "auto"
dtype = "auto"             # weights: auto (as stored, fp32 on the CPU: HF bf16 stays bf16 on CUDA) | float32 |
                           # bfloat16
# logging, checkpoints
log_interval = 10
eval_interval = 100
ckpt_interval = 100        # save (with optimizer state, for init_from="resume") every this many steps; 0 = at the end
halt_at_step = -1          # stop early at this step, keeping the schedule (a planned interruption)
report_dir = ""             # the summary goes into report_dir/<stage>.json and report.md ("": beside out_dir)
wandb_log = False
wandb_project = "reward"
wandb_run_name = "run"


# what the configurator accepts (checked before any work is done)
_choices = dict(lr_schedule=SCHEDULES, parallel=("ddp", "fsdp"), device=("auto", "cpu", "cuda"),
                kernels=("auto", "triton", "torch"), dtype=("auto", "float32", "bfloat16"),
                lora_targets=check_targets)
_ranges = dict(val_fraction="(0, 1)", max_records="[1, inf) or -1", max_val_records="[1, inf)",
               max_len="[1, inf) or -1", task_pairs="[1, inf)", task_val_pairs="[1, inf)", sampled_pairs="[0, inf)",
               num_samples="[1, inf)", sample_temperature="(0, inf)", score_margin="[0, inf)",
               center_coef="[0, inf)", lora_r="[0, inf)", lora_alpha="(0, inf)", lora_dropout="[0, 1)",
               batch_size="[1, inf)", grad_accum="[1, inf)", num_epochs="(0, inf)", max_steps="[1, inf) or -1",
               lr="(0, inf)", min_lr="[0, inf)", warmup_steps="[0, inf)", weight_decay="[0, inf)", beta1="[0, 1)",
               beta2="[0, 1)", grad_clip="[0, inf)", log_interval="[1, inf)", eval_interval="[1, inf)",
               ckpt_interval="[0, inf)", halt_at_step="[1, inf) or -1",
               peak_flops="(0, inf)")
# init_from="resume" continues with the checkpoint's model and data: these must not change on resume
_resume_fixed = ("data", "train_split", "val_data", "val_split", "val_fraction", "max_records", "max_val_records",
                 "max_len", "task_pairs", "task_val_pairs", "sampled_pairs", "num_samples", "sample_temperature",
                 "seed", "lora_r", "lora_alpha", "lora_dropout", "lora_targets")
_resume_schedule = ("batch_size", "grad_accum", "num_epochs", "max_steps", "lr", "min_lr", "warmup_steps",
                    "lr_schedule", "margin", "score_margin", "center_coef", "world_size")

if __name__ == "__main__":
    from configs import configure
    config = configure(globals())

    import torch.distributed as dist

    from checkpoint import (check_vocab, check_writable, load_model, load_optimizer_state, optimizer_state_dict,
                            restore_rng_states, rng_states, save_checkpoint, training_checkpoint)
    from data import tasks
    from data.chat import BadRecord
    from data.records import DataError
    from data.order import EpochOrder
    from data.preference import (encode_records, load_preferences, pad_batch, sampled_task_pairs, split_off,
                                 task_pairs as make_task_pairs)
    from data.tokenizer import get_tokenizer
    from distributed import (check_replicas_identical, device_peak_flops, grad_sync, mfu, parallelize,
                             setup_distributed, teardown_distributed)
    from lora import apply_lora
    from model import RewardModel, Transformer
    from optim import configure_optimizer, lr_at, mark_nonfinite, stop_if_nonfinite

    ddp, rank, world_size, device, autocast = setup_distributed(device)
    master = rank == 0
    torch.manual_seed(seed)
    log = print if master else (lambda *a, **k: None)

    # model ----------------------------------------------------------------------------------
    resume = init_from == "resume"
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    source = ckpt_path if resume else init_from
    if not os.path.exists(source):
        raise SystemExit(f"init_from={source} not found: run `python pretrain.py` then `python sft.py` first, "
                         f"or point --init_from at a language-model checkpoint")
    try:  # resuming: the reward model itself (LoRA adapters unmerged); else the language model it starts from
        lm, ckpt = load_model(source, kind="reward" if resume else "lm", kernels=kernels,
                              dtype=None if dtype == "auto" else getattr(torch, dtype))
        tok_name = ckpt["tokenizer"]
        tok = get_tokenizer(tok_name)
        check_vocab(lm, tok, source)
    except ValueError as e:  # e.g. a reward model where a language model is needed, a corrupt file
        raise SystemExit(f"reward: init_from: {e}")
    if resume:
        from configs import check_resume
        check_resume(ckpt, {**config, "world_size": world_size}, _resume_fixed, _resume_schedule, ckpt_path)
        base_init, start_step, m0, sampled = ckpt["init_from"], ckpt["step"], ckpt["m0"], ckpt["sampled_records"]
        m = ckpt["val_metrics"]  # the last evaluation before it
    else:
        base_init, start_step, m0, sampled = os.path.abspath(init_from), 0, None, None
    if master:
        check_writable(out_dir, protect=(base_init,))
    seq_cap = lm.config.max_seq_len if max_len < 0 else min(max_len, lm.config.max_seq_len)

    # data -----------------------------------------------------------------------------------
    if data == "tasks":
        train_records = make_task_pairs(task_pairs, "train", seed)
        val_records = make_task_pairs(task_val_pairs, "test", seed)
        if sampled_pairs and sampled is None:  # (a resumed run reuses the pairs it sampled, saved with it)
            lm.to(device).eval()
            with autocast:
                sampled = sampled_task_pairs(lm, tok, tasks.generate(sampled_pairs, "train", seed + 1), num_samples,
                                             sample_temperature, seed=seed)
            lm.cpu().train()
            log(f"sampled {len(sampled)} on-policy pairs from {sampled_pairs} questions")
        train_records += sampled or []
    else:
        try:
            train_records = load_preferences(data, train_split, skip_bad, None if max_records < 0 else max_records,
                                             log=log)
            if val_data:
                val_records = load_preferences(val_data, val_split, skip_bad, max_val_records, log=log)
            else:
                train_records, val_records = split_off(train_records, val_fraction, seed)
        except (BadRecord, DataError, FileNotFoundError) as e:
            raise SystemExit(f"reward: {e}")
    try:
        train_set = encode_records(train_records, tok, seq_cap, verbose=master, what="train")
        val_set = encode_records(val_records[:max_val_records], tok, seq_cap, verbose=master, what="val")
    except DataError as e:  # nothing left to train on, and why
        raise SystemExit(f"reward: {e}")
    n_resp = sum(len(r["responses"]) for r in train_set) / len(train_set)
    prompts_per_step = batch_size * grad_accum * world_size
    steps = max_steps if max_steps > 0 else max(1, math.ceil(num_epochs * len(train_set) / prompts_per_step))

    lora = dict(targets=lora_targets, r=lora_r, alpha=lora_alpha, dropout=lora_dropout) if lora_r > 0 else None
    model = lm if resume else RewardModel(lm)
    if lora and not resume:
        apply_lora(model.transformer, **lora)
    if lora:
        model.score_head.requires_grad_(True)  # the head is new: always trained
    model.transformer.activation_checkpointing = activation_checkpointing
    model.to(device)
    raw_model = model
    n_train = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
    model = parallelize(model, parallel if ddp else "none", device)
    optimizer = configure_optimizer(model, lr, weight_decay, (beta1, beta2), device_type=device.type)
    if resume:
        load_optimizer_state(model, optimizer, ckpt["optimizer"])
        restore_rng_states(ckpt["rng"], rank, device)
    del ckpt
    if compile:
        model = torch.compile(model)
    log(f"reward model from {init_from}: {sum(p.numel() for p in raw_model.parameters()) / 1e6:.2f}M params, "
        f"{n_train / 1e6:.2f}M trained{f' (LoRA r={lora_r})' if lora_r else ''} | "
        f"data {data}: {len(train_set)} train / "
        f"{len(val_set)} val records, {n_resp:.1f} responses each | {steps} steps x {prompts_per_step} "
        f"prompts = {steps * prompts_per_step / len(train_set):.2f} epochs | device {device} x {world_size}")
    wandb = dict(project=wandb_project, name=wandb_run_name, config=config) if wandb_log else None
    metrics = MetricsLogger(out_dir, start_step if resume else None, enabled=master, wandb=wandb)

    def batch_tensors(records):
        """All responses of the records in one batch (best first per record), their group sizes, margins."""
        seqs = [s for r in records for s in r["tokens"]]
        idx, _, end_idx = pad_batch(seqs, tok.pad_id, device)
        sizes = [len(r["tokens"]) for r in records]
        m = []
        for r in records:
            k, s = len(r["responses"]), r.get("scores")
            m += [margin + (score_margin * (s[i] - s[j]) if s else 0.0) for i in range(k) for j in range(i + 1, k)]
        return idx, end_idx, sizes, torch.tensor(m, device=device)

    order = EpochOrder(len(train_set), seed)  # the records of each (step, micro, rank): a function of the step

    def train_records_at(step, micro):
        return [train_set[i] for i in order.batch(step, micro, rank, world_size, grad_accum, batch_size)]

    @torch.no_grad()
    def evaluate():
        """Pairwise accuracy (ties half), mean margin, reward mean/std over the val set, split across ranks."""
        model.eval()
        stats = torch.zeros(6, device=device, dtype=torch.float64)
        per_iter = batch_size * world_size
        for it in range(math.ceil(len(val_set) / per_iter)):  # the same count on every rank (FSDP needs it)
            recs = val_set[it * per_iter + rank * batch_size:][:batch_size]
            w = 1.0 if recs else 0.0
            idx, end_idx, sizes, _ = batch_tensors(recs or val_set[:1])
            with autocast:
                r = model(idx, end_idx).double()
            _, diff = reward_loss(r, sizes)
            stats += w * torch.stack([((diff > 0).double() + 0.5 * (diff == 0).double()).sum(),
                                      torch.tensor(float(diff.numel()), device=device, dtype=torch.float64),
                                      diff.sum(), r.sum(), (r * r).sum(),
                                      torch.tensor(float(r.numel()), device=device, dtype=torch.float64)])
        if ddp:
            dist.all_reduce(stats)
        model.train()
        mean = stats[3] / stats[5]
        return dict(accuracy=(stats[0] / stats[1]).item(), margin=(stats[2] / stats[1]).item(), reward_mean=mean.item(),
                    reward_std=(stats[4] / stats[5] - mean ** 2).clamp(min=0).sqrt().item())

    def fmt(m):
        return (f"accuracy {m['accuracy']:.4f} | margin {m['margin']:.3f} | reward mean {m['reward_mean']:.3f} "
                f"std {m['reward_std']:.3f}")

    def save(step, m):
        """A checkpoint to resume from; at the end the result: a plain RewardModel (LoRA merged) that
        load_model(path, kind="reward") loads. Every rank calls this (collectives under DDP/FSDP)."""
        stop_if_nonfinite(first_bad, model, ckpt_path)  # never write NaN weights over the last good checkpoint
        finished = step == steps
        extra = dict(step=step, config=config, init_from=base_init, val_metrics=m, m0=m0, sampled_records=sampled,
                     rng=rng_states(device, ddp))
        if not finished:
            extra["optimizer"] = optimizer_state_dict(model, optimizer)
        state = training_checkpoint(model, tok_name, lora, finished, lambda: RewardModel(Transformer(raw_model.config)),
                                    **extra)
        if master:
            save_checkpoint(ckpt_path, state, protect=(base_init,))
            log(f"saved {ckpt_path} at step {step}")

    # training: evaluate and save at the top of an iteration, so step 0, every interval and the last step take
    # the same path -----------------------------------------------------------------------------
    model.train()
    last_step = steps if halt_at_step < 0 else min(halt_at_step, steps)
    first_bad = torch.tensor(-1, device=device)  # the first non-finite step (optim.mark_nonfinite)
    t_start = t_log = time.time()
    n_train_tokens = 0
    peak_flops = peak_flops or device_peak_flops(device)  # for MFU; None on a CPU
    # loss, tokens, correct pairs, margin sum, pairs, model FLOPs
    window = torch.zeros(6, device=device, dtype=torch.float64)
    for step in range(start_step, last_step + 1):
        final = step == last_step
        if (step % eval_interval == 0 or final) and not (resume and step == start_step):
            stop_if_nonfinite(first_bad, ckpt_path=ckpt_path)
            m = evaluate()
            log(f"step {step}: val {fmt(m)}")
            if step == 0:
                m0 = m
            metrics.log(step, **{f"val_{k}": v for k, v in m.items()})
            t_log = time.time()  # evaluation time is not training throughput
        if step > start_step and ((ckpt_interval and step % ckpt_interval == 0) or final):
            save(step, m)
        if final:
            break

        cur_lr = lr_at(step, steps, lr, warmup_steps, min_lr, lr_schedule)
        for group in optimizer.param_groups:
            group["lr"] = cur_lr
        step_loss = torch.zeros((), device=device, dtype=torch.float64)
        for micro in range(grad_accum):
            idx, end_idx, sizes, margins = batch_tensors(train_records_at(step, micro))
            with grad_sync(model, micro == grad_accum - 1), autocast:
                rewards = model(idx, end_idx)  # chosen and rejected (all K ranked) in one forward
                loss, diff = reward_loss(rewards, sizes, margins, center_coef)
                aux = raw_model.transformer.moe_aux_loss()
                if aux is not None and raw_model.config.moe_aux_loss_coef > 0:
                    loss = loss + raw_model.config.moe_aux_loss_coef * aux
            (loss / grad_accum).backward()
            step_loss += loss.detach().double() / grad_accum
            window[1:] += torch.stack([(idx != tok.pad_id).sum().double(),
                                       ((diff > 0).double() + 0.5 * (diff == 0).double()).sum(),
                                       diff.detach().double().sum(),
                                       torch.tensor(float(diff.numel()), device=device, dtype=torch.float64),
                                       raw_model.flops(end_idx + 1)])  # each row: its tokens up to the scored one
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
        first_bad = mark_nonfinite(first_bad, step, step_loss, grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        raw_model.update_moe_bias()
        done = step + 1
        if done % log_interval == 0 or done == last_step:
            window[0] = step_loss / world_size  # the logged loss: this step's, averaged over ranks
            if ddp:  # and the window's pair stats over all ranks
                dist.all_reduce(window)
            stop_if_nonfinite(first_bad, ckpt_path=ckpt_path)
            loss_v, tokens, correct, margin_sum, n_pairs, flops = window.tolist()
            dt = time.time() - t_log
            eta = (last_step - done) * (time.time() - t_start) / (done - start_step)
            log(f"step {done}/{steps} | loss {loss_v:.4f} | lr {cur_lr:.2e} | grad_norm {grad_norm.item():.2f} | "
                f"tok/s {tokens / dt:,.0f} | mfu {mfu(flops, dt, world_size, peak_flops)} | "
                f"acc {correct / n_pairs:.3f} | margin {margin_sum / n_pairs:.3f} | "
                f"eta {int(eta // 60)}m{int(eta % 60):02d}s", flush=True)
            metrics.log(done, loss=loss_v, lr=cur_lr, grad_norm=grad_norm.item(), accuracy=correct / n_pairs,
                        margin=margin_sum / n_pairs, tokens_per_sec=tokens / dt)
            n_train_tokens += tokens
            t_log = time.time()
            window.zero_()

    if ddp and parallel == "ddp":
        log(f"parameters identical on all {check_replicas_identical(model)} ranks")
    if last_step < steps:
        log(f"halted at step {last_step} (halt_at_step); continue with --init_from=resume --out_dir={out_dir}")
    else:
        log(f"held-out pairwise accuracy {m0['accuracy']:.4f} -> {m['accuracy']:.4f} ({time.time() - t_start:.0f}s)")
    if master:
        write_summary(report_dir, "reward", out_dir=out_dir, summary=dict(
            setup=run_setup(device, world_size), params=sum(p.numel() for p in raw_model.parameters()),
            trainable=n_train, tokens=int(n_train_tokens), wall_time=time.time() - t_start, steps=last_step,
            init_from=base_init, ckpt=ckpt_path, before=dict(pair_accuracy=m0["accuracy"], margin=m0["margin"]),
            after=dict(pair_accuracy=m["accuracy"], margin=m["margin"]), metrics=metrics.path))
    teardown_distributed(ddp)
