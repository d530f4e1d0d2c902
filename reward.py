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

The output, out/reward/ckpt.pt, loads with model.RewardModel.from_checkpoint(path) and
scores conversations with .score(messages_list, tokenizer) (grpo.py's learned reward).
"""

import math
import os
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

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


# -----------------------------------------------------------------------------
# config: every global below can be set from a config file or --key=value
out_dir = "out/reward"
init_from = "out/sft/ckpt.pt"   # an SFT (or pretrained) language-model checkpoint; a fresh score head goes on top
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
max_len = -1               # longest prompt + response in tokens (-1: the model's max_seq_len); longer records are dropped
task_pairs = 8000          # "tasks": number of (correct, wrong) training pairs (fresh pairs beat a second epoch)
task_val_pairs = 500
sampled_pairs = 0          # "tasks": also sample this many questions from the init model, pair its mistakes with correct answers
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
activation_checkpointing = False
device = "auto"            # "auto" | "cpu" | "cuda"
kernels = "auto"
# logging
log_interval = 10
eval_interval = 100
wandb_log = False
wandb_project = "reward"
wandb_run_name = "run"


# the run; importing this file (as the tests do) defines the objectives above and runs nothing
def main():
    from configs import configure
    config = configure(globals())

    import torch.distributed as dist

    from data import tasks
    from data.preference import (encode_records, load_preferences, pad_batch, sampled_task_pairs, split_off,
                                 task_pairs as make_task_pairs)
    from data.tokenizer import get_tokenizer
    from model import (ModelConfig, RewardModel, Transformer, apply_lora, check_replicas_identical, checkpoint_dict,
                       configure_optimizer, load_checkpoint, lr_at, merged_model, model_state_dict, parallelize,
                       save_checkpoint)

    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() and device != "cpu" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ["LOCAL_RANK"])
    else:
        rank, world, local_rank = 0, 1, 0
    master = rank == 0
    dev = torch.device(f"cuda:{local_rank}" if (device == "cuda" or (device == "auto" and torch.cuda.is_available()))
                       else "cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else nullcontext()
    torch.manual_seed(seed)
    log = print if master else (lambda *a, **k: None)

    # model ----------------------------------------------------------------------------------
    if not os.path.exists(init_from):
        raise SystemExit(f"init_from={init_from} not found: run `python pretrain.py` then `python sft.py` first, "
                         f"or point --init_from at a language-model checkpoint")
    ckpt = load_checkpoint(init_from)
    if "score_head.weight" in ckpt["model"]:
        raise SystemExit(f"{init_from} is already a reward model; init_from wants a language-model checkpoint")
    tok_name = ckpt["tokenizer"]
    tok = get_tokenizer(tok_name)
    lm = Transformer(ModelConfig.from_dict({**ckpt["model_config"], "kernels": kernels}))
    lm.load_state_dict(ckpt["model"])
    del ckpt
    seq_cap = lm.config.max_seq_len if max_len < 0 else min(max_len, lm.config.max_seq_len)

    # data -----------------------------------------------------------------------------------
    if data == "tasks":
        train_records = make_task_pairs(task_pairs, "train", seed)
        val_records = make_task_pairs(task_val_pairs, "test", seed)
        if sampled_pairs:
            lm.to(dev).eval()
            with autocast:
                extra = sampled_task_pairs(lm, tok, tasks.generate(sampled_pairs, "train", seed + 1), num_samples,
                                           sample_temperature, seed=seed)
            lm.cpu().train()
            log(f"sampled {len(extra)} on-policy pairs from {sampled_pairs} questions")
            train_records += extra
    else:
        train_records = load_preferences(data, train_split, skip_bad, None if max_records < 0 else max_records, log=log)
        if val_data:
            val_records = load_preferences(val_data, val_split, skip_bad, max_val_records, log=log)
        else:
            train_records, val_records = split_off(train_records, val_fraction, seed)
    train_set = encode_records(train_records, tok, seq_cap, verbose=master, what="train")
    val_set = encode_records(val_records[:max_val_records], tok, seq_cap, verbose=master, what="val")
    n_resp = sum(len(r["responses"]) for r in train_set) / len(train_set)
    steps = max_steps if max_steps > 0 else max(1, math.ceil(num_epochs * len(train_set) / (batch_size * grad_accum * world)))

    model = RewardModel(lm)
    if lora_r > 0:
        targets = "all" if lora_targets == "all" else tuple(t.strip() for t in lora_targets.split(","))
        apply_lora(model.transformer, targets, lora_r, lora_alpha, lora_dropout)
        model.score_head.requires_grad_(True)  # the head is new: always trained
    model.transformer.activation_checkpointing = activation_checkpointing
    model.to(dev)
    raw = model
    n_train = sum(p.numel() for p in raw.parameters() if p.requires_grad)
    model = parallelize(model, parallel if ddp else "none", dev)
    optimizer = configure_optimizer(model, lr, weight_decay, (beta1, beta2), device_type=dev.type)
    if compile:
        model = torch.compile(model)
    log(f"reward model from {init_from}: {sum(p.numel() for p in raw.parameters()) / 1e6:.2f}M params, "
        f"{n_train / 1e6:.2f}M trained{f' (LoRA r={lora_r})' if lora_r else ''} | data {data}: {len(train_set)} train / "
        f"{len(val_set)} val records, {n_resp:.1f} responses each | {steps} steps x {batch_size * grad_accum * world} "
        f"prompts = {steps * batch_size * grad_accum * world / len(train_set):.2f} epochs | device {dev} x {world}")
    if wandb_log and master:
        import wandb
        wandb.init(project=wandb_project, name=wandb_run_name, config=config)

    def batch_tensors(records):
        """All responses of the records in one batch (best first per record), their group sizes, margins."""
        seqs = [s for r in records for s in r["tokens"]]
        idx, _, end_idx = pad_batch(seqs, tok.pad_id, dev)
        sizes = [len(r["tokens"]) for r in records]
        m = []
        for r in records:
            k, s = len(r["responses"]), r.get("scores")
            m += [margin + (score_margin * (s[i] - s[j]) if s else 0.0) for i in range(k) for j in range(i + 1, k)]
        return idx, end_idx, sizes, torch.tensor(m, device=dev)

    perms = {}

    def train_records_at(step, micro):
        """This rank's records for (step, micro): consecutive slices of a seeded per-epoch permutation."""
        first = ((step * grad_accum + micro) * world + rank) * batch_size
        out = []
        for g in range(first, first + batch_size):
            epoch, i = divmod(g, len(train_set))
            if epoch not in perms:
                perms.clear()
                perms[epoch] = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed + epoch))
            out.append(train_set[int(perms[epoch][i])])
        return out

    @torch.no_grad()
    def evaluate():
        """Pairwise accuracy (ties half), mean margin, reward mean/std over the val set, split across ranks."""
        model.eval()
        stats = torch.zeros(6, device=dev, dtype=torch.float64)
        per_iter = batch_size * world
        for it in range(math.ceil(len(val_set) / per_iter)):  # the same count on every rank (FSDP needs it)
            recs = val_set[it * per_iter + rank * batch_size:][:batch_size]
            w = 1.0 if recs else 0.0
            idx, end_idx, sizes, _ = batch_tensors(recs or val_set[:1])
            with autocast:
                r = model(idx, end_idx).double()
            _, diff = reward_loss(r, sizes)
            stats += w * torch.stack([((diff > 0).double() + 0.5 * (diff == 0).double()).sum(),
                                      torch.tensor(float(diff.numel()), device=dev, dtype=torch.float64),
                                      diff.sum(), r.sum(), (r * r).sum(),
                                      torch.tensor(float(r.numel()), device=dev, dtype=torch.float64)])
        if ddp:
            dist.all_reduce(stats)
        model.train()
        mean = stats[3] / stats[5]
        return dict(accuracy=(stats[0] / stats[1]).item(), margin=(stats[2] / stats[1]).item(), reward_mean=mean.item(),
                    reward_std=(stats[4] / stats[5] - mean ** 2).clamp(min=0).sqrt().item())

    def fmt(m):
        return (f"accuracy {m['accuracy']:.4f} | margin {m['margin']:.3f} | reward mean {m['reward_mean']:.3f} "
                f"std {m['reward_std']:.3f}")

    # training -------------------------------------------------------------------------------
    m0 = evaluate()
    log(f"step 0: val {fmt(m0)}")
    model.train()
    t_start = t_log = time.time()
    tokens = 0
    acc_sum = marg_sum = n_pairs = 0.0
    for step in range(steps):
        cur_lr = lr_at(step, steps, lr, warmup_steps, min_lr, lr_schedule)
        for group in optimizer.param_groups:
            group["lr"] = cur_lr
        step_loss = 0.0
        for micro in range(grad_accum):
            idx, end_idx, sizes, margins = batch_tensors(train_records_at(step, micro))
            if ddp and parallel == "ddp":
                model.require_backward_grad_sync = micro == grad_accum - 1  # sync on the last micro-step only
            elif ddp and parallel == "fsdp":
                raw.set_requires_gradient_sync(micro == grad_accum - 1)
            with autocast:
                rewards = model(idx, end_idx)  # chosen and rejected (all K ranked) in one forward
                loss, diff = reward_loss(rewards, sizes, margins, center_coef)
                aux = raw.transformer.moe_aux_loss()
                if aux is not None and raw.config.moe_aux_loss_coef > 0:
                    loss = loss + raw.config.moe_aux_loss_coef * aux
            (loss / grad_accum).backward()
            step_loss += loss.item() / grad_accum
            tokens += (idx != tok.pad_id).sum().item()
            acc_sum += ((diff > 0).float() + 0.5 * (diff == 0).float()).sum().item()
            marg_sum += diff.sum().item()
            n_pairs += diff.numel()
        if not math.isfinite(step_loss):
            raise SystemExit(f"non-finite loss at step {step + 1}: stopping without saving. Lower lr, or check the data")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        raw.update_moe_bias()
        done = step + 1
        if done % log_interval == 0 or done == steps:
            if ddp:  # the logged step loss and the window's pair stats over all ranks
                t = torch.tensor([step_loss / world, acc_sum, marg_sum, n_pairs], device=dev, dtype=torch.float64)
                dist.all_reduce(t)
                step_loss, acc_sum, marg_sum, n_pairs = t.tolist()
            dt = time.time() - t_log
            eta = (steps - done) * (time.time() - t_start) / done
            log(f"step {done}/{steps} | loss {step_loss:.4f} | lr {cur_lr:.2e} | grad_norm {grad_norm.item():.2f} | "
                f"tok/s {tokens * world / dt:,.0f} | acc {acc_sum / n_pairs:.3f} | margin {marg_sum / n_pairs:.3f} | "
                f"eta {int(eta // 60)}m{int(eta % 60):02d}s", flush=True)
            if wandb_log and master:
                wandb.log({"loss": step_loss, "lr": cur_lr, "grad_norm": grad_norm.item(),
                           "train/accuracy": acc_sum / n_pairs, "train/margin": marg_sum / n_pairs}, step=done)
            t_log, tokens, acc_sum, marg_sum, n_pairs = time.time(), 0, 0.0, 0.0, 0.0
        if done % eval_interval == 0 or done == steps:
            m = evaluate()
            log(f"step {done}: val {fmt(m)}")
            if wandb_log and master:
                wandb.log({f"val/{k}": v for k, v in m.items()}, step=done)

    if ddp and parallel == "ddp":
        log(f"parameters identical on all {check_replicas_identical(model)} ranks")

    # save: a plain RewardModel (LoRA merged), loadable by RewardModel.from_checkpoint ---------
    state = model_state_dict(model)  # every rank joins the gather under FSDP
    if master:
        lora = dict(targets=targets, r=lora_r, alpha=lora_alpha, dropout=lora_dropout) if lora_r > 0 else None
        final = merged_model(state, RewardModel(Transformer(raw.config)), lora)
        path = os.path.join(out_dir, "ckpt.pt")
        save_checkpoint(path, checkpoint_dict(final, tok_name, step=steps, config=config, val_metrics=m,
                                              init_from=init_from))
        print(f"saved {path} | held-out pairwise accuracy {m0['accuracy']:.4f} -> {m['accuracy']:.4f} "
              f"({time.time() - t_start:.0f}s)")
    if ddp:
        dist.barrier()  # leave together: rank 0 may still be writing the checkpoint
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
