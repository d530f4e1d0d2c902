"""
Pretraining: next-token prediction on a flat token file.

$ python pretrain.py                                   # small model, embedded corpus, CPU, a few minutes
$ python pretrain.py configs/gpt2_small.py --max_steps=2000
$ torchrun --standalone --nproc_per_node=8 pretrain.py configs/gpt2_small.py
$ torchrun --nnodes=2 --node_rank=0 --master_addr=10.0.0.1 --master_port=29500 \
      --nproc_per_node=8 pretrain.py configs/llama_1b.py       # (and node_rank=1 on the other node)
$ python pretrain.py --init_from=out/sft/ckpt.pt --lr=3e-4   # continued pretraining: weights only, fresh optimizer

Data: `data = "embedded"` tokenises the Python standard library's source the first
time (data/corpus.py) into data/bin/embedded/; any directory made by
`python -m data.prepare` works (train.bin, val.bin).

Every (step, micro-step, rank, row) maps to a fixed window of the token file through a
seeded permutation, so the data order is a function of the step alone: resuming from a
checkpoint replays exactly the batches the uninterrupted run would have seen.
"""

import json
import math
import os
import resource
import time

import torch
import torch.distributed as dist

from checkpoint import (check_writable, checkpoint_dict, load_model, load_optimizer_state, optimizer_state_dict,
                        restore_rng_states, rng_states, save_checkpoint)
from distributed import (check_replicas_identical, device_peak_flops, grad_sync, mfu, parallelize,
                         setup_distributed, teardown_distributed)
from model import ModelConfig, Transformer
from optim import SCHEDULES, configure_optimizer, lr_at, mark_nonfinite, stop_if_nonfinite
from report import MetricsLogger, run_setup, write_summary

# -----------------------------------------------------------------------------
# config: every global below can be set from a config file or --key=value
out_dir = "out/pretrain"
init_from = "scratch"      # "scratch", "resume" (from out_dir/ckpt.pt), or a checkpoint to continue from (weights only)
data = "embedded"          # "embedded" or a directory with train.bin / val.bin from data/prepare.py
tokenizer = "default"      # for the embedded corpus; a prepared data dir names its own in meta.json
seed = 1337
# model
n_layer = 4
n_head = 6
n_kv_head = 2
n_embd = 192
ffn_hidden = None
seq_len = 256              # training context length (also the model's max_seq_len)
rope_theta = 10000.0
qk_norm = False
tie_embeddings = True
dropout = 0.0
n_experts = 0
n_experts_per_tok = 2
n_shared_experts = 0
moe_ffn_hidden = None
first_k_dense = 0
moe_aux_loss_coef = 0.01
moe_bias_update_rate = 0.0
z_loss = 0.0
logit_softcap = None
kernels = "auto"           # "auto" (Triton on CUDA) | "triton" | "torch"
# optimisation
batch_size = 16            # sequences per micro-batch per rank
grad_accum = 1             # micro-batches per optimizer step
max_steps = 300
lr = 3e-3
min_lr = 3e-4              # cosine/wsd floor (10% of peak)
warmup_steps = 30
lr_schedule = "cosine"     # "cosine" | "wsd" | "constant"
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0            # 0: no clipping
halt_at_step = -1          # stop early at this step, keeping the schedule of max_steps (a planned interruption)
# system
parallel = "ddp"           # under torchrun: "ddp" or "fsdp"
compile = False
activation_checkpointing = False
device = "auto"            # "auto" | "cpu" | "cuda"
peak_flops = None          # dense bf16 FLOP/s of one device for MFU; None: looked up from the device name
# logging, eval, checkpoints
log_interval = 25
eval_interval = 100
eval_iters = 20
ckpt_interval = 100        # 0: never save (benchmarks)
sample_prompts = ("def ", "import ", "class ")
sample_tokens = 64
report_dir = ""             # the summary goes into report_dir/<stage>.json and report.md ("": beside out_dir)
wandb_log = False
wandb_project = "pretrain"
wandb_run_name = "run"
# what the configurator accepts (checked before any work is done)
_choices = dict(lr_schedule=SCHEDULES, parallel=("ddp", "fsdp"), device=("auto", "cpu", "cuda"),
                kernels=("auto", "triton", "torch"))
# init_from="resume" keeps the checkpoint's model, tokenizer and data: these must not change on resume
_resume_fixed = ("data", "tokenizer", "seed", "n_layer", "n_head", "n_kv_head", "n_embd", "ffn_hidden", "seq_len",
                 "rope_theta", "qk_norm", "tie_embeddings", "n_experts", "n_experts_per_tok", "n_shared_experts",
                 "moe_ffn_hidden", "first_k_dense", "logit_softcap")
_resume_schedule = ("batch_size", "grad_accum", "max_steps", "lr", "min_lr", "warmup_steps", "lr_schedule")
_ranges = dict(n_layer="[1, inf)", n_head="[1, inf)", n_kv_head="[1, inf)", n_embd="[1, inf)",
               ffn_hidden="[1, inf)", seq_len="[1, inf)", rope_theta="(0, inf)", dropout="[0, 1)",
               n_experts="[0, inf)", n_experts_per_tok="[1, inf)", n_shared_experts="[0, inf)",
               moe_ffn_hidden="[1, inf)", first_k_dense="[0, inf)", moe_aux_loss_coef="[0, inf)",
               moe_bias_update_rate="[0, inf)", z_loss="[0, inf)", logit_softcap="(0, inf)",
               batch_size="[1, inf)", grad_accum="[1, inf)", max_steps="[1, inf)", lr="(0, inf)",
               min_lr="[0, inf)", warmup_steps="[0, inf)", weight_decay="[0, inf)", beta1="[0, 1)",
               beta2="[0, 1)", grad_clip="[0, inf)", halt_at_step="[1, inf) or -1", peak_flops="(0, inf)",
               log_interval="[1, inf)", eval_interval="[1, inf)", eval_iters="[1, inf)",
               ckpt_interval="[0, inf)", sample_tokens="[0, inf)")

if __name__ == "__main__":
    from configs import configure
    config = configure(globals())
    ddp, rank, world_size, device, autocast = setup_distributed(device)
    master = rank == 0
    torch.manual_seed(seed)
    if ckpt_interval > 0 and master:
        check_writable(out_dir)

    # data ----------------------------------------------------------------------------------
    from data.order import EpochOrder
    from data.prepare import load_tokens, prepare, read_header
    from data.tokenizer import get_tokenizer

    data_dir = os.path.join("data", "bin", "embedded") if data == "embedded" else data
    if data == "embedded" and not os.path.exists(os.path.join(data_dir, "val.bin")):
        if master:
            prepare("embedded", data_dir, tokenizer=tokenizer, val_fraction=0.02)
        if ddp:
            dist.barrier()
    for split in ("train", "val"):
        if not os.path.exists(os.path.join(data_dir, f"{split}.bin")):
            raise SystemExit(f"{data_dir}/{split}.bin not found: run `python -m data.prepare --source=... "
                             f"--out={data_dir}` or set data='embedded'")
    train_tokens = load_tokens(os.path.join(data_dir, "train.bin"))
    val_tokens = load_tokens(os.path.join(data_dir, "val.bin"))
    vocab_size = read_header(os.path.join(data_dir, "train.bin"))[1]
    meta_path = os.path.join(data_dir, "meta.json")
    if os.path.exists(meta_path):  # the tokenizer the data was made with (None: synthetic tokens, no samples)
        with open(meta_path) as f:
            tokenizer = json.load(f).get("tokenizer")
    tok = get_tokenizer(tokenizer) if tokenizer else None
    if tok is not None and tok.vocab_size != vocab_size:
        raise SystemExit(f"{data_dir} has vocab_size {vocab_size} but tokenizer {tokenizer!r} has {tok.vocab_size}")

    n_windows = (len(train_tokens) - 1) // seq_len
    if n_windows < batch_size:
        raise SystemExit(f"{data_dir}/train.bin has only {len(train_tokens)} tokens: too few for "
                         f"batch_size={batch_size} windows of seq_len={seq_len}")
    order = EpochOrder(n_windows, seed)  # window number of each (step, micro, rank, row): a function of the step

    def train_batch(step, micro):
        """The batch of (step, micro) for this rank."""
        starts = [i * seq_len for i in order.batch(step, micro, rank, world_size, grad_accum, batch_size)]
        x = torch.stack([torch.from_numpy(train_tokens[s:s + seq_len + 1].astype("int64")) for s in starts])
        return x[:, :-1].to(device, non_blocking=True), x[:, 1:].to(device, non_blocking=True)

    def val_batches():
        """A fixed set of windows from the start of val.bin, split across ranks."""
        n = min(eval_iters * batch_size * world_size, (len(val_tokens) - 1) // seq_len)
        for b in range(rank * batch_size, n - batch_size + 1, batch_size * world_size):
            x = torch.stack([torch.from_numpy(val_tokens[i * seq_len:i * seq_len + seq_len + 1].astype("int64"))
                             for i in range(b, b + batch_size)])
            yield x[:, :-1].to(device), x[:, 1:].to(device)

    # model, optimizer ----------------------------------------------------------------------
    # the embedding is padded to a multiple of 64 rows (fast matmuls); the extra ids never occur in data
    model_args = dict(vocab_size=64 * math.ceil(vocab_size / 64), n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head,
                      n_embd=n_embd, ffn_hidden=ffn_hidden, max_seq_len=seq_len, rope_theta=rope_theta,
                      qk_norm=qk_norm, tie_embeddings=tie_embeddings, dropout=dropout, n_experts=n_experts,
                      n_experts_per_tok=n_experts_per_tok, n_shared_experts=n_shared_experts,
                      moe_ffn_hidden=moe_ffn_hidden, first_k_dense=first_k_dense,
                      moe_aux_loss_coef=moe_aux_loss_coef, moe_bias_update_rate=moe_bias_update_rate, z_loss=z_loss,
                      logit_softcap=logit_softcap, kernels=kernels)
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    start_step, best_val, val0, ckpt = 0, float("inf"), None, None
    if init_from == "scratch":
        try:
            model = Transformer(ModelConfig(**model_args))
        except (AssertionError, ValueError) as e:  # e.g. n_embd not divisible by n_head: a config mistake
            raise SystemExit(f"config error: {e}")
    else:
        try:
            model, ckpt = load_model(ckpt_path if init_from == "resume" else init_from, kernels=kernels)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"pretrain: init_from={init_from}: {e}")
        if init_from == "resume":
            from configs import check_resume
            check_resume(ckpt, {**config, "world_size": world_size}, _resume_fixed,
                         _resume_schedule + ("world_size",), ckpt_path)
            start_step, best_val, val0 = ckpt["step"], ckpt["best_val_loss"], ckpt.get("val_loss0")
        else:  # continued pretraining: the weights of any language-model checkpoint, a fresh optimizer and schedule
            ckpt = None
    model.to(device)
    model.activation_checkpointing = activation_checkpointing
    raw_model = model
    n_params, n_active = model.num_params(), model.num_params(active_only=True)
    flops_per_token = model.flops_per_token(seq_len)
    model = parallelize(model, parallel if ddp else "none", device)
    optimizer = configure_optimizer(model, lr, weight_decay, (beta1, beta2), device_type=device.type)
    if ckpt is not None:
        load_optimizer_state(model, optimizer, ckpt["optimizer"])
        restore_rng_states(ckpt["rng"], rank, device)
        del ckpt
    train_model = torch.compile(model) if compile else model  # forward through this

    peak_flops = peak_flops or device_peak_flops(device)  # for MFU; None on a CPU
    tokens_per_step = batch_size * seq_len * grad_accum * world_size
    if master:
        print(f"model: {n_params / 1e6:.2f}M params ({n_active / 1e6:.2f}M active, "
              f"{raw_model.num_params(exclude_embeddings=True) / 1e6:.2f}M non-embedding), "
              f"{flops_per_token / 1e6:.1f} MFLOP/token | data {data_dir}: {len(train_tokens):,} train tokens | "
              f"{tokens_per_step:,} tokens/step x {max_steps} steps = "
              f"{tokens_per_step * max_steps / len(train_tokens):.2f} epochs | device {device} x {world_size} | "
              f"kernels {raw_model.impl}")

    @torch.no_grad()
    def evaluate():
        model.eval()
        total = torch.zeros(2, device=device)
        for x, y in val_batches():
            with autocast:
                _, loss = train_model(x, y, reduction="sum")
            total += torch.stack([loss.float(), torch.tensor(float(y.numel()), device=device)])
        if ddp:
            dist.all_reduce(total)
        model.train()
        return (total[0] / total[1]).item()

    def sample():
        # every rank runs this: under FSDP each layer's forward all-gathers its shards
        if tok is None or not sample_prompts:
            return
        raw_model.eval()
        prompts = [tok.encode(p) for p in sample_prompts]
        n_new = min(sample_tokens, seq_len - max(map(len, prompts)))
        with torch.no_grad(), autocast:
            out = raw_model.generate(prompts, n_new, temperature=0.8, top_k=50, stop_tokens=[tok.eot_id],
                                     generator=torch.Generator(device).manual_seed(seed))
        raw_model.train()
        for p, ids in zip(sample_prompts, out["tokens"].tolist()):
            if master:
                print(f"--- {p!r} ->\n{p}{tok.decode(ids)}")

    wandb = dict(project=wandb_project, name=wandb_run_name, config=config) if wandb_log else None
    metrics = MetricsLogger(out_dir, start_step if init_from == "resume" else None, enabled=master, wandb=wandb)

    def save(step, val_loss):
        stop_if_nonfinite(nonfinite_step, model, ckpt_path)  # never write NaN weights over the last good checkpoint
        state = checkpoint_dict(model, tokenizer, step=step, best_val_loss=best_val, val_loss=val_loss, val_loss0=val0,
                                optimizer=optimizer_state_dict(model, optimizer), rng=rng_states(device, ddp),
                                config={**config, "world_size": world_size})
        if master:
            save_checkpoint(ckpt_path, state, protect=(init_from,) if init_from not in ("scratch", "resume") else ())
            print(f"saved {ckpt_path} at step {step}")

    # training loop: evaluate, save and stop at the top of an iteration, so step 0, every interval and the
    # last step take the same path ---------------------------------------------------------------
    model.train()
    last_step = max_steps if halt_at_step < 0 else min(halt_at_step, max_steps)
    t_start = t_log = time.time()
    tokens_since_log, nonfinite_step = 0, torch.tensor(-1, device=device)
    val_loss = None
    for step in range(start_step, last_step + 1):
        final = step == last_step
        if (step % eval_interval == 0 or final) and (step > start_step or step == 0):
            stop_if_nonfinite(nonfinite_step, ckpt_path=ckpt_path)
            val_loss = evaluate()
            if master:
                print(f"step {step}: val loss {val_loss:.4f} (ppl {math.exp(min(val_loss, 20)):.1f})")
            metrics.log(step, val_loss=val_loss)
            val0 = val_loss if step == 0 else val0
            best_val = min(best_val, val_loss)
            t_log = time.time()  # evaluation time is not training throughput
        if ckpt_interval > 0 and step > start_step and (step % ckpt_interval == 0 or final):
            save(step, val_loss)
        if final:
            break

        # one optimizer step: grad_accum micro-batches, gradients synchronised on the last one
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, max_steps, lr, warmup_steps, min_lr, lr_schedule)
        step_loss = torch.zeros((), device=device)
        for micro in range(grad_accum):
            x, y = train_batch(step, micro)
            with grad_sync(model, micro == grad_accum - 1), autocast:
                _, loss = train_model(x, y)
            (loss / grad_accum).backward()
            step_loss += loss.detach() / grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        expert_load = raw_model.update_moe_bias()
        # mark the first non-finite step on the device; checked at each log, eval and save (no per-step host sync)
        nonfinite_step = mark_nonfinite(nonfinite_step, step, step_loss, grad_norm)
        tokens_since_log += tokens_per_step

        done = step + 1
        if done % log_interval == 0 or done == last_step:
            if ddp:
                dist.all_reduce(step_loss, op=dist.ReduceOp.AVG)
            stop_if_nonfinite(nonfinite_step, ckpt_path=ckpt_path)
            dt = time.time() - t_log
            tok_s = tokens_since_log / dt
            eta = (last_step - done) * (time.time() - t_start) / (done - start_step)
            step_mfu = mfu(flops_per_token * tokens_since_log, dt, world_size, peak_flops)
            mem = (f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}GiB" if device.type == "cuda"
                   else f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f}GiB rss")
            line = (f"step {done}/{max_steps} | loss {step_loss.item():.4f} | "
                    f"lr {optimizer.param_groups[0]['lr']:.2e} | grad_norm {grad_norm.item():.2f} | "
                    f"tok/s {tok_s:,.0f} | mfu {step_mfu} | mem {mem}")
            if expert_load is not None:
                line += f" | expert load max/mean {(expert_load.max(1).values * expert_load.shape[1]).mean():.2f}"
            if master:
                print(f"{line} | eta {int(eta // 60)}m{int(eta % 60):02d}s", flush=True)
            metrics.log(done, loss=step_loss.item(), lr=optimizer.param_groups[0]["lr"], grad_norm=grad_norm.item(),
                        tokens_per_sec=tok_s)
            t_log, tokens_since_log = time.time(), 0

    if ddp and parallel == "ddp":
        n = check_replicas_identical(model)
        if master:
            print(f"replicas identical across {n} ranks")
    if master:
        print(f"done: {last_step - start_step} steps in {time.time() - t_start:.0f}s")
        write_summary(report_dir, "pretrain", out_dir=out_dir, summary=dict(
            setup=run_setup(device, world_size), params=n_params, tokens=tokens_per_step * last_step,
            wall_time=time.time() - t_start, before=dict(val_loss=val0), after=dict(val_loss=val_loss),
            metrics=metrics.path, ckpt=ckpt_path if ckpt_interval else None, steps=last_step))
    sample()
    teardown_distributed(ddp)
