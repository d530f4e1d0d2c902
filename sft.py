"""
Supervised fine-tuning: the next-token loss on the assistant turns of chat conversations.

Starts from any checkpoint an earlier stage wrote (pretrain.py by default) and uses its tokenizer.
Conversations are rendered with the one ChatML template (data/chat.py); the loss covers every
assistant turn's content and its <|im_end|>, nothing else. Batches are either length-grouped and
padded or packed (several conversations per row, per-document positions and attention), see
data/sft_data.py. The loss is normalised per target token over the whole optimizer step, across
micro-batches, gradient accumulation and ranks. Full fine-tuning, or LoRA with lora_r > 0.

$ python sft.py                                   # embedded default: data/tasks.py questions, CPU, a few minutes
$ python sft.py --data=chats.jsonl --val_size=100 # your conversations: OpenAI / ShareGPT / Alpaca records
$ python sft.py --data=a.jsonl,b.parquet --val_data=held_out.jsonl --skip_bad=True
$ python sft.py --data=HuggingFaceH4/no_robots --data_split=train   # a hub dataset (needs the network)
$ python sft.py --lora_r=16 --lora_alpha=32 --lr=3e-3             # LoRA: writes an adapter-only checkpoint
$ python sft.py --lora_r=16 --merge_lora_on_save=True             # ... or a full checkpoint with adapters merged
$ torchrun --nproc_per_node=8 sft.py configs/sft_gpu.py           # DDP; --parallel=fsdp for FSDP2

Writes {out_dir}/ckpt.pt every ckpt_interval steps and at the end: a full checkpoint (checkpoint.load_model
loads it; reward.py, dpo.py and grpo.py start from out/sft/ckpt.pt), or with LoRA an adapter checkpoint: the
adapter weights, the LoRA settings and the absolute path and fingerprint of the base checkpoint (load_model
loads that too, and refuses a base that changed). Each holds the optimizer state, the step and every rank's
RNG state: `--init_from=resume` continues from it exactly (the data order is a function of the step), and
`--halt_at_step=N` stops early at N as if interrupted, keeping the schedule of max_steps.
"""

import os
import random
import time
from dataclasses import asdict

import torch
import torch.distributed as dist

from checkpoint import (check_vocab, check_writable, checkpoint_dict, fingerprint, git_state, is_hf_source, load_model,
                        load_optimizer_state, model_state_dict, optimizer_state_dict, restore_rng_states, rng_states,
                        save_checkpoint)
from distributed import (check_replicas_identical, device_peak_flops, fsdp_gathered, grad_sync, mfu, parallelize,
                         setup_distributed, teardown_distributed, unwrap)
from lora import apply_lora, check_targets, lora_modules, merge_lora, merged_model
from model import Transformer
from optim import SCHEDULES, configure_optimizer, lr_at, mark_nonfinite, stop_if_nonfinite
from report import MetricsLogger, run_setup, write_summary


def neftune_scale(doc_ids, alpha, dim):
    """NEFTune's noise scale alpha / sqrt(L * d) per token, (B, T, 1), where L is the length of the token's own
    conversation (the paper's L): doc_ids (B, T) say which conversation of a row each token belongs to (packing:
    several per row; padding: 0 for the conversation, 1 for the pads). Scaling by the row length instead would
    give packed conversations several times too little noise."""
    counts = torch.zeros(doc_ids.shape, device=doc_ids.device).scatter_add_(1, doc_ids, torch.ones_like(doc_ids,
                                                                                                        dtype=torch.float))
    return (alpha / torch.sqrt(counts.gather(1, doc_ids) * dim))[..., None]

# -----------------------------------------------------------------------------
# config
# I/O
init_from = "out/pretrain/ckpt.pt"  # any full or adapter checkpoint, or "resume" (from out_dir/ckpt.pt)
out_dir = "out/sft"
# data
data = "tasks"             # "tasks" (data/tasks.py) | local .json/.jsonl/.parquet files (comma-separated, dir,
                           # glob) | a hub dataset
data_split = "train"       # split of a hub dataset
n_train = 40000            # tasks: number of training questions
val_data = ""              # held-out conversations; "" = val_size conversations held out of data (tasks: test split)
val_size = 200             # held-out conversations for the validation loss
skip_bad = False           # skip malformed records (with a count) instead of stopping at the first
packing = True             # pack conversations into rows of max_seq_len (else pad length-grouped batches)
max_seq_len = 256          # 0 = the model's max_seq_len; longer conversations are truncated
# batch: global batch = batch_size * grad_accum * world_size (rows when packing, else conversations)
batch_size = 8
grad_accum = 1
max_steps = 1200
halt_at_step = -1          # stop early at this step, keeping the schedule of max_steps (a planned interruption)
# optimizer
lr = 2e-3                  # high for a tiny model; ~1e-5 to 2e-5 full fine-tuning at scale, ~10x that for LoRA
min_lr = 2e-4
warmup_steps = 15
lr_schedule = "cosine"     # cosine | wsd | constant
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
adam_eps = 1e-8
grad_clip = 1.0            # 0 = off
# LoRA (lora_r = 0: full fine-tuning)
lora_r = 0
lora_alpha = 16.0
lora_dropout = 0.05
lora_targets = "all"       # comma-separated from q,k,v,o,gate,up,down, or "all"
lora_rslora = False        # scale alpha/sqrt(r) instead of alpha/r
merge_lora_on_save = False # save a full checkpoint with the adapters merged instead of an adapter checkpoint
# NEFTune: uniform noise of scale neftune_alpha / sqrt(L * d) on the input embeddings (L: the conversation's
# length), training only (5-15 typical)
neftune_alpha = 0.0
# eval
eval_interval = 300        # 0 = only before and after training
eval_accuracy_size = 250   # tasks: held-out questions scored by exact match (greedy generation)
eval_samples = 3           # sampled replies printed at each eval
eval_max_new_tokens = 32
log_interval = 10
ckpt_interval = 300        # save (with optimizer state, for init_from="resume") every this many steps; 0 = at the end
# system
seed = 1337
parallel = "ddp"           # under torchrun: ddp | fsdp
device = "auto"            # auto | cpu | cuda
kernels = "auto"           # auto | triton | torch
dtype = "auto"             # weights: auto (as stored, fp32 on the CPU: HF bf16 stays bf16 on CUDA) | float32 |
                           # bfloat16
compile = False
peak_flops = None          # dense bf16 FLOP/s of one device for MFU; None: looked up from the device name
report_dir = ""             # the summary goes into report_dir/<stage>.json and report.md ("": beside out_dir)
wandb_log = False
wandb_project = "sft"
wandb_run_name = "sft"
# what the configurator accepts (checked before any work is done)
_choices = dict(lr_schedule=SCHEDULES, parallel=("ddp", "fsdp"), device=("auto", "cpu", "cuda"),
                kernels=("auto", "triton", "torch"), dtype=("auto", "float32", "bfloat16"),
                lora_targets=check_targets)
_ranges = dict(n_train="[1, inf)", val_size="[0, inf)", max_seq_len="[1, inf) or 0", batch_size="[1, inf)",
               grad_accum="[1, inf)", max_steps="[1, inf)", lr="(0, inf)", min_lr="[0, inf)", warmup_steps="[0, inf)",
               weight_decay="[0, inf)", beta1="[0, 1)", beta2="[0, 1)", adam_eps="(0, inf)", grad_clip="[0, inf)",
               lora_r="[0, inf)", lora_alpha="(0, inf)", lora_dropout="[0, 1)", neftune_alpha="[0, inf)",
               eval_interval="[0, inf)", eval_accuracy_size="[0, inf)", eval_samples="[0, inf)",
               eval_max_new_tokens="[1, inf)", log_interval="[1, inf)", ckpt_interval="[0, inf)",
               halt_at_step="[1, inf) or -1", peak_flops="(0, inf)")
# init_from="resume" continues with the checkpoint's model and data: these must not change on resume
_resume_fixed = ("data", "data_split", "n_train", "val_data", "val_size", "packing", "max_seq_len", "seed", "lora_r",
                 "lora_alpha", "lora_targets", "lora_rslora", "lora_dropout", "neftune_alpha")
_resume_schedule = ("batch_size", "grad_accum", "max_steps", "lr", "min_lr", "warmup_steps", "lr_schedule",
                    "weight_decay", "world_size")

if __name__ == "__main__":
    from configs import configure
    config = configure(globals())

    ddp, rank, world_size, device, autocast = setup_distributed(device)
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    from data import tasks
    from data.chat import BadRecord, load_conversations, render_prompt
    from data.records import DataError
    from data.sft_data import collate_padded, micro_batches, tokenize_conversations
    from data.tokenizer import get_tokenizer

    # -----------------------------------------------------------------------------
    # model and tokenizer
    resume = init_from == "resume"
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    source = ckpt_path if resume else init_from
    if not os.path.exists(source):
        hint = "python pretrain.py" if init_from == "out/pretrain/ckpt.pt" else "the stage that writes it"
        raise SystemExit(f"sft: init checkpoint {source} not found. Run `{hint}` first, or pass --init_from=PATH.")
    # full fine-tuning of an HF model under FSDP2: shard on the meta device and read each rank's rows only
    shard_at_load = ddp and parallel == "fsdp" and lora_r == 0 and not resume and is_hf_source(init_from)
    try:
        model, ckpt = load_model(source, device, kernels=kernels, fsdp=shard_at_load,
                                 dtype=None if dtype == "auto" else getattr(torch, dtype))
        tok = get_tokenizer(ckpt["tokenizer"])
        check_vocab(model, tok, source)
    except ValueError as e:  # a reward model, a corrupt file, adapters whose base changed, ...
        raise SystemExit(f"sft: {e}")
    lora = None
    if resume:  # the checkpoint's own weights (a LoRA run's come back with their adapters, unmerged)
        from configs import check_resume
        check_resume(ckpt, {**config, "world_size": world_size}, _resume_fixed, _resume_schedule, ckpt_path)
        base_init, start_step, ev0 = ckpt["init_from"], ckpt["step"], ckpt["ev0"]
        ev = {k: ckpt[k] for k in ("val_loss", "accuracy") if ckpt.get(k) is not None}  # the last eval before it
        lora = ckpt.get("lora")
    else:
        base_init, start_step, ev0 = os.path.abspath(init_from), 0, None
        if lora_modules(model):
            merge_lora(model)  # starting from an adapter checkpoint: fine-tune the merged model
        if lora_r > 0:
            lora = dict(targets=lora_targets, r=lora_r, alpha=lora_alpha, dropout=lora_dropout, rslora=lora_rslora)
            torch.manual_seed(seed)  # the same adapter init on every rank (FSDP does not broadcast parameters)
            apply_lora(model, **lora)
    if master:
        check_writable(out_dir, protect=(base_init,))
    base_fingerprint = fingerprint(base_init) if lora else None  # adapters refuse to load on a changed base
    cfg = model.config
    max_seq_len = min(max_seq_len or cfg.max_seq_len, cfg.max_seq_len)
    torch.manual_seed(seed + rank)

    if neftune_alpha > 0:
        def neftune(module, inputs, emb):
            # NEFTune (Jain et al. 2023): noise only while training, so eval and generation see clean embeddings.
            # The training loop sets module.noise_scale (B, T, 1) for each micro-batch (see neftune_scale).
            if not module.training:
                return emb
            return emb + torch.empty_like(emb).uniform_(-1, 1) * module.noise_scale.to(emb.dtype)
        model.tok_emb.register_forward_hook(neftune)

    model.to(device)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"init from {source}: {model.num_params() / 1e6:.2f}M params, {n_trainable / 1e6:.3f}M trainable"
        f"{f' (LoRA r={lora_r} on {lora_targets})' if lora else ''}, tokenizer {tok.name}, device {device}, "
        f"world {world_size}{f', resuming at step {start_step}' if resume else ''}")

    # -----------------------------------------------------------------------------
    # data
    test_examples = []  # tasks only: held-out questions for exact-match accuracy
    if data == "tasks":
        train_convs = [tasks.to_messages(ex) for ex in tasks.generate(n_train, "train", seed=seed)]
        test_examples = tasks.generate(max(val_size, eval_accuracy_size), "test", seed=0)
        val_convs = [tasks.to_messages(ex) for ex in test_examples[:val_size]]
        test_examples = test_examples[:eval_accuracy_size]
    else:
        try:
            train_convs = load_conversations(data, split=data_split, skip_bad=skip_bad, log=log)
            val_convs = load_conversations(val_data, split=data_split, skip_bad=skip_bad, log=log) if val_data else None
        except (BadRecord, DataError, FileNotFoundError) as e:
            raise SystemExit(f"sft: bad training data: {e}")
        if not val_data:
            if val_size >= len(train_convs):
                raise SystemExit(f"sft: val_size={val_size} leaves no training data of {len(train_convs)} "
                                 f"conversations; lower --val_size or pass --val_data")
            random.Random(seed).shuffle(train_convs)  # a held-out set that is not just the end of the file
            n_keep = len(train_convs) - val_size
            train_convs, val_convs = train_convs[:n_keep], train_convs[n_keep:]
    train, n_trunc, n_drop = tokenize_conversations(train_convs, tok, max_seq_len)
    val, _, _ = tokenize_conversations(val_convs, tok, max_seq_len)
    n_targets = sum(sum(t != -100 for t in y) for _, y in train)
    log(f"data {data}: {len(train)} train conversations ({sum(len(x) for x, _ in train):,} tokens, "
        f"{n_targets:,} trained), "
        f"{len(val)} val; {n_trunc} truncated to {max_seq_len}, {n_drop} dropped with nothing left to train")
    if not train:
        raise SystemExit("sft: no training conversations left")
    batches = micro_batches(train, batch_size, max_seq_len, tok.pad_id, packing=packing, seed=seed,
                            start=start_step * grad_accum * world_size)

    # -----------------------------------------------------------------------------
    # training setup
    if not shard_at_load:
        model = parallelize(model, parallel if ddp else "none", device)
    # after parallelize: FSDP2 replaces the parameters with sharded ones, which the optimizer must hold
    optimizer = configure_optimizer(model, lr, weight_decay, (beta1, beta2), adam_eps, device.type)
    if resume:
        load_optimizer_state(model, optimizer, ckpt["optimizer"])
        restore_rng_states(ckpt["rng"], rank, device)
    del ckpt
    if compile:
        model = torch.compile(model)
    raw_model = unwrap(model)
    peak_flops = peak_flops or device_peak_flops(device)  # for MFU; None on a CPU

    def to_device(mb):
        return {k: v.to(device, non_blocking=True) for k, v in mb.items()}

    @torch.no_grad()
    def evaluate():
        """Validation loss per target token, exact-match accuracy per task (tasks data), a few sampled replies.
        Every rank runs the same evaluation (FSDP needs all ranks in every forward); rank 0 prints."""
        model.eval()
        out = {}
        loss_sum, n = 0.0, 0
        for i in range(0, len(val), batch_size):
            mb = to_device(collate_padded(val[i:i + batch_size], tok.pad_id))
            with autocast:
                _, loss = model(mb["idx"], mb["targets"], reduction="sum")
            loss_sum, n = loss_sum + loss.item(), n + int((mb["targets"] != -100).sum())
        out["val_loss"] = loss_sum / max(n, 1)
        gen_kw = dict(stop_tokens=tok.stop_ids, pad_id=tok.pad_id)
        with fsdp_gathered(raw_model), autocast:
            if test_examples:
                out["accuracy"], out["accuracy_per_task"] = tasks.exact_match(
                    raw_model, tok, test_examples, eval_max_new_tokens, rank=rank, world_size=world_size)
            samples = []
            for msgs in val_convs[:eval_samples]:
                first = next(j for j, m in enumerate(msgs) if m["role"] == "assistant")
                prompt = render_prompt(msgs[:first], tok)
                budget = min(eval_max_new_tokens, cfg.max_seq_len - len(prompt))
                if budget <= 0:
                    continue
                gen = torch.Generator(device=device).manual_seed(seed)
                g = raw_model.generate([prompt], budget, temperature=0.7, top_p=0.9, generator=gen, **gen_kw)
                reply = tok.decode_reply(g["tokens"][0, :g["lengths"][0]].tolist())
                samples.append((msgs[first - 1]["content"], reply))
            out["samples"] = samples
        model.train()
        return out

    def report(step, ev):
        acc = ""
        if "accuracy" in ev:
            per_task = " ".join(f"{t} {a:.0%}" for t, a in ev["accuracy_per_task"].items())
            acc = f" | accuracy {ev['accuracy']:.1%} ({per_task})"
        log(f"eval step {step} | val_loss {ev['val_loss']:.4f}{acc}")
        for q, a in ev["samples"]:
            log(f"  user: {q[:120]!r}\n  assistant: {a[:200]!r}")
        metrics.log(step, val_loss=ev["val_loss"], **({"val_accuracy": ev["accuracy"]} if "accuracy" in ev else {}),
                    **{f"val_accuracy_{t}": a for t, a in ev.get("accuracy_per_task", {}).items()})

    def save(step, ev):
        """A checkpoint to resume from (optimizer, RNG, step); at the end the result (with merge_lora_on_save, the
        plain merged model). Every rank calls this (collectives under DDP/FSDP)."""
        stop_if_nonfinite(first_bad, model, ckpt_path)  # never write NaN weights over the last good checkpoint
        finished = step == max_steps  # a finished run's checkpoint is its output: no optimizer state to resume from
        merge = lora is not None and merge_lora_on_save and finished
        extra = dict(step=step, config=config, init_from=base_init, ev0=ev0, val_loss=ev["val_loss"],
                     accuracy=ev.get("accuracy"), rng=rng_states(device, ddp))
        if not finished:
            extra["optimizer"] = optimizer_state_dict(model, optimizer)
        if lora is None:
            state = checkpoint_dict(model, tok.name, **extra)
        else:
            full = model_state_dict(model)  # under FSDP only rank 0 receives the weights
            if not master:
                state = None
            elif merge:  # rebuild on the CPU (whatever the parallelism was), fold the adapters in
                state = checkpoint_dict(merged_model(full, Transformer(cfg), lora), tok.name, **extra, merged_lora=lora)
            else:
                state = dict(model_config=asdict(cfg), tokenizer=tok.name, git=git_state(), base_checkpoint=base_init,
                             base_fingerprint=base_fingerprint, lora=lora,
                             lora_state={k: v for k, v in full.items() if "lora_" in k}, **extra)
        if master:
            save_checkpoint(ckpt_path, state, protect=(base_init,))
            kind = "full" if lora is None or merge else "adapter-only"
            log(f"saved {kind} checkpoint {ckpt_path} at step {step}")

    wandb = dict(project=wandb_project, name=wandb_run_name, config=config) if wandb_log else None
    metrics = MetricsLogger(out_dir, start_step if resume else None, enabled=master, wandb=wandb)

    # -----------------------------------------------------------------------------
    # training loop: evaluate and save at the top of an iteration, so step 0, every interval and the last step
    # take the same path
    model.train()
    last_step = max_steps if halt_at_step < 0 else min(halt_at_step, max_steps)
    first_bad = torch.tensor(-1, device=device)  # the first non-finite step (optim.mark_nonfinite)
    t0 = t_log = time.time()
    tokens_since_log = n_train_tokens = flops_since_log = 0
    for step in range(start_step, last_step + 1):
        final = step == last_step
        at_eval = step == 0 or (eval_interval and step % eval_interval == 0) or final
        if at_eval and not (resume and step == start_step):  # the checkpoint was saved right after that eval
            stop_if_nonfinite(first_bad, ckpt_path=ckpt_path)
            ev = evaluate()
            report(step, ev)
            if step == 0:
                ev0 = {k: v for k, v in ev.items() if k != "samples"}
            t_log = time.time()  # eval time is not training throughput
        if step > start_step and ((ckpt_interval and step % ckpt_interval == 0) or final):
            save(step, ev)
        if final:
            break

        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, max_steps, lr, warmup_steps, min_lr, lr_schedule)
        # every rank draws the same global sequence of micro-batches and keeps its share
        micro = [next(batches) for _ in range(grad_accum * world_size)][rank::world_size]
        # model FLOPs of this step on all ranks (each rank's share taken as typical), counted on the host copy
        flops_since_log += raw_model.flops(torch.cat([mb["seq_lengths"] for mb in micro])) * world_size
        micro = [to_device(mb) for mb in micro]
        # Loss normalisation. We want the gradient of (sum of token losses over the whole step, all
        # micro-batches on all ranks) / (number of target tokens in the whole step), so every target token
        # weighs the same however the step is cut into micro-batches and ranks. So: count the step's target
        # tokens first and all-reduce that count, then backprop each micro-batch's *summed* loss divided by it.
        # DDP and FSDP average gradients over ranks (sum / world_size), so each rank also multiplies by
        # world_size: (1/W) * sum_r W * grad(L_r) / N = grad(sum_r L_r) / N.
        n_tok = torch.tensor(sum(int((mb["targets"] != -100).sum()) for mb in micro), device=device,
                             dtype=torch.float64)
        if ddp:
            dist.all_reduce(n_tok)
        n_tok = n_tok.item()
        step_loss = torch.zeros((), device=device, dtype=torch.float64)
        for i, mb in enumerate(micro):
            if neftune_alpha > 0:
                doc_ids = mb.get("doc_ids")
                if doc_ids is None:  # padded rows: the conversation, then its pads
                    doc_ids = (torch.arange(mb["idx"].shape[1], device=device)[None] >= mb["lengths"][:, None]).long()
                raw_model.tok_emb.noise_scale = neftune_scale(doc_ids, neftune_alpha, cfg.n_embd)
            with grad_sync(model, i == len(micro) - 1), autocast:
                _, loss_sum = model(mb["idx"], mb["targets"], positions=mb.get("positions"),
                                    doc_ids=mb.get("doc_ids"), reduction="sum")
            (loss_sum * (world_size / n_tok)).backward()
            step_loss += loss_sum.detach().double()
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                   grad_clip if grad_clip > 0 else float("inf"))
        first_bad = mark_nonfinite(first_bad, step, step_loss, grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cfg.n_experts:
            raw_model.update_moe_bias()
        tokens_since_log += sum(mb["idx"].numel() for mb in micro) * world_size
        n_train_tokens += sum(mb["idx"].numel() for mb in micro) * world_size

        done = step + 1
        if done % log_interval == 0 or done == last_step:
            if ddp:
                dist.all_reduce(step_loss)
            stop_if_nonfinite(first_bad, ckpt_path=ckpt_path)
            loss = step_loss.item() / n_tok
            now = time.time()
            eta = (now - t0) / (done - start_step) * (last_step - done)
            log(f"step {done}/{max_steps} | loss {loss:.4f} | lr {optimizer.param_groups[0]['lr']:.2e} | "
                f"grad_norm {float(grad_norm):.2f} | tok/s {tokens_since_log / (now - t_log):,.0f} | "
                f"mfu {mfu(flops_since_log, now - t_log, world_size, peak_flops)} | "
                f"targets/step {int(n_tok):,} | eta {int(eta // 60)}m{int(eta % 60):02d}s")
            metrics.log(done, loss=loss, lr=optimizer.param_groups[0]["lr"], grad_norm=float(grad_norm),
                        tokens_per_sec=tokens_since_log / (now - t_log))
            t_log, tokens_since_log, flops_since_log = now, 0, 0

    if ddp and parallel == "ddp":
        log(f"parameters identical on all {check_replicas_identical(model)} ranks")
    if last_step < max_steps:
        log(f"halted at step {last_step} (halt_at_step); continue with --init_from=resume --out_dir={out_dir}")
    elif "accuracy_per_task" in ev:
        log(f"held-out exact match: {ev0['accuracy']:.1%} before SFT -> {ev['accuracy']:.1%} after")
        for t in ev["accuracy_per_task"]:
            log(f"  {t:8s} {ev0['accuracy_per_task'][t]:6.1%} -> {ev['accuracy_per_task'][t]:6.1%}")
    log(f"done in {time.time() - t0:.0f}s")
    if master:
        keys = ("val_loss", "accuracy")
        write_summary(report_dir, "sft", out_dir=out_dir, summary=dict(
            setup=run_setup(device, world_size), params=raw_model.num_params(), trainable=n_trainable,
            tokens=n_train_tokens, wall_time=time.time() - t0, steps=last_step, init_from=base_init, ckpt=ckpt_path,
            before={k: ev0[k] for k in keys if ev0 and k in ev0}, after={k: ev[k] for k in keys if k in ev},
            accuracy_per_task=dict(before=(ev0 or {}).get("accuracy_per_task"), after=ev.get("accuracy_per_task")),
            metrics=metrics.path))
    teardown_distributed(ddp)
