"""
End-to-end pretraining throughput on one GPU, measured on pretrain.py itself (what users run), on
synthetic tokens: a GPT-2-small-sized model (124M) at seq 1024, a ~1.1B GQA model at seq 2048 with
activation checkpointing, and an MoE (1.2B total, 0.26B active), each with kernels="triton"/"torch"
and torch.compile on/off. Records tokens/s, MFU — model FLOPs per token from model.py (6N plus the
attention term) against the device's dense bf16 peak (989 TFLOP/s for H100/H200 SXM) and against a
measured bf16 matmul ceiling — and peak memory, in bench/results/pretrain_<device>_<date>.json.

    python bench/bench_pretrain.py                          # all models x kernels x compile
    python bench/bench_pretrain.py --models=gpt2_124m --steps=40 --variants=triton+compile

Each run is a subprocess (a fresh CUDA context and compile cache); the first log intervals (warm-up,
compilation, autotuning) are left out of the figures. A run that fails (out of memory, a compile
error) is recorded with the tail of its log and the sweep goes on. Refuses to run without CUDA.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.report import ROOT, matmul_ceiling, require_cuda, run_metadata, write_report  # noqa: E402

VOCAB = 50304  # GPT-2's 50257 padded to a multiple of 64, as pretrain.py pads it
MODELS = {
    "gpt2_124m": dict(n_layer=12, n_head=12, n_kv_head=12, n_embd=768, seq_len=1024, batch_size=16),
    "llama_1b": dict(n_layer=16, n_head=32, n_kv_head=8, n_embd=2048, ffn_hidden=8192, seq_len=2048, batch_size=8,
                     rope_theta=500000.0, activation_checkpointing=True),
    "moe": dict(n_layer=16, n_head=16, n_kv_head=4, n_embd=1024, seq_len=2048, batch_size=8, n_experts=32,
                n_experts_per_tok=4, n_shared_experts=1, moe_ffn_hidden=704, first_k_dense=1,
                moe_aux_loss_coef=0.001, moe_bias_update_rate=0.001),
}
VARIANTS = {"triton+compile": ("triton", True), "triton": ("triton", False),
            "torch+compile": ("torch", True), "torch": ("torch", False)}
LOG_LINE = re.compile(r"^step (\d+)/\d+ \| loss ([\d.]+) .*?\| tok/s ([\d,]+) \| mfu ([\d.]+|n/a)%? \| mem ([\d.]+)GiB", re.M)


def parse_log(text, skip):
    """pretrain.py log lines -> dict of per-interval figures, leaving out the first `skip` intervals."""
    rows = [(int(s), float(loss), float(tps.replace(",", "")), float(mem)) for s, loss, tps, _, mem in LOG_LINE.findall(text)]
    timed = rows[skip:]
    if not timed:
        return None
    return dict(steps_logged=[r[0] for r in rows], final_loss=rows[-1][1],
                tokens_per_sec=statistics.median(r[2] for r in timed), peak_memory_gib=max(r[3] for r in rows))


def synthetic_data(directory, n_tokens, seed=0):
    """Uniform random token ids in the repo's token-file format; meta.json names no tokenizer (no samples)."""
    from data.prepare import write_tokens
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_tokens), ("val", 1 << 16)):
        write_tokens(os.path.join(directory, f"{split}.bin"), rng.integers(0, 50257, n, dtype=np.int64), VOCAB)
    with open(os.path.join(directory, "meta.json"), "w") as f:
        json.dump({"tokenizer": None, "vocab_size": VOCAB, "source": "synthetic uniform tokens"}, f)


def pretrain_command(data_dir, out_dir, steps, log_interval, impl, compiled, model_kw):
    """The pretrain.py command line of one run: no eval, no checkpoints, no samples, no warmup."""
    return [sys.executable, "pretrain.py", f"--data={data_dir}", f"--out_dir={out_dir}", f"--max_steps={steps}",
            f"--log_interval={log_interval}", "--eval_interval=1000000", "--eval_iters=1", "--ckpt_interval=0",
            "--warmup_steps=0", f"--kernels='{impl}'", f"--compile={compiled}", "--sample_prompts=()"] + \
        [f"--{k}={v!r}" for k, v in model_kw.items()]


def flops_per_token(model_kw):
    from model import ModelConfig, Transformer
    kw = {k: v for k, v in model_kw.items() if k not in ("seq_len", "batch_size", "activation_checkpointing")}
    with torch.device("meta"):
        m = Transformer(ModelConfig(vocab_size=VOCAB, max_seq_len=model_kw["seq_len"], kernels="torch", **kw))
    return m.flops_per_token(model_kw["seq_len"]), m.num_params(), m.num_params(active_only=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated from {list(MODELS)}")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated from {list(VARIANTS)}")
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    ap.add_argument("--log_interval", type=int, default=10)
    ap.add_argument("--skip", type=int, default=2, help="log intervals left out as warm-up")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per run")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    require_cuda("bench_pretrain.py")
    from distributed import device_peak_flops

    meta = run_metadata()
    peak = device_peak_flops(meta["device"])
    ceiling = matmul_ceiling()
    print(f"{meta['device']}: dense bf16 peak {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s (spec), "
          f"measured matmul ceiling {ceiling / 1e12:.0f} TFLOP/s", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        longest = max(MODELS[m]["seq_len"] * MODELS[m]["batch_size"] for m in args.models.split(","))
        synthetic_data(tmp, longest * (args.steps + 2) + 1)
        for name in args.models.split(","):
            model_kw = MODELS[name]
            fpt, n_params, n_active = flops_per_token(model_kw)
            for variant in args.variants.split(","):
                impl, compiled = VARIANTS[variant]
                cmd = pretrain_command(tmp, os.path.join(tmp, "out"), args.steps, args.log_interval, impl, compiled,
                                       model_kw)
                print(f"--- {name} {variant}: {' '.join(cmd[1:])}", flush=True)
                try:
                    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout,
                                       env={**os.environ, "WANDB_MODE": "disabled"})
                    log, rc = p.stdout + p.stderr, p.returncode
                except subprocess.TimeoutExpired as e:
                    log, rc = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timeout"
                figures = parse_log(log, args.skip) if rc == 0 else None
                entry = dict(model=name, variant=variant, kernels=impl, compile=compiled, config=model_kw,
                             params=n_params, active_params=n_active, flops_per_token=fpt, returncode=rc)
                if figures:
                    tps = figures["tokens_per_sec"]
                    entry.update(figures, mfu=fpt * tps / peak if peak else None, mfu_vs_matmul_ceiling=fpt * tps / ceiling)
                    print(f"    {tps:,.0f} tok/s | MFU {entry['mfu'] or float('nan'):.1%} of peak, "
                          f"{entry['mfu_vs_matmul_ceiling']:.1%} of measured matmul | "
                          f"peak mem {figures['peak_memory_gib']:.1f} GiB | final loss {figures['final_loss']:.3f}",
                          flush=True)
                else:
                    entry["log_tail"] = log[-3000:]
                    print(f"    failed ({rc}):\n{log[-1500:]}", flush=True)
                results.append(entry)
    report = dict(meta=meta, peak_bf16_flops=peak, measured_matmul_flops=ceiling, steps=args.steps,
                  skipped_log_intervals=args.skip, vocab_size=VOCAB, results=results,
                  notes="MFU = flops_per_token (model.py: 6 x matmul weights incl. lm_head, + 12*L*H*hd*T attention) "
                        "x tokens/s / peak; tokens/s is the median over the timed log intervals of pretrain.py")
    write_report("pretrain", report, args.out)


if __name__ == "__main__":
    main()
