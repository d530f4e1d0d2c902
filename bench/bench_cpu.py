"""
CPU training-step time of the repo's model, and where it goes: matmuls vs attention vs elementwise
work (norms, RoPE, SwiGLU, cross-entropy, optimizer), from torch.profiler.

    python bench/bench_cpu.py                         # the nanoGPT-comparison size: 6x384, 6 heads, vocab 8192, 16x256
    python bench/bench_cpu.py --compile=True          # the same step through torch.compile (needs a C++ compiler)
    python bench/bench_cpu.py --steps=5 --n_layer=2   # smaller
    python bench/bench_cpu.py --nanogpt=../nanoGPT    # interleaved with nanoGPT's model.py at equal size

With --nanogpt=DIR (a checkout of karpathy/nanoGPT; nothing of it is copied here) the steps alternate between
this repo's model and nanoGPT's GPT at the same size (bias=False, dropout 0, tied embeddings, 13.77M
parameters at the defaults), same batches, same AdamW + clipping step: on a shared machine both see the same
load, so the ratio of their medians means something even when the absolute times do not.

One step = forward with the fused linear + cross-entropy loss, backward, grad clip, AdamW step: what
pretrain.py does per step on the CPU (fp32, kernels="torch"). The machine is often shared: the load
average is printed beside the figures; compare runs only when they were taken under similar load.
"""

import argparse
import importlib.util
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import ModelConfig, Transformer  # noqa: E402
from optim import configure_optimizer  # noqa: E402

# profiler op names -> category; anything else is "elementwise/other"
MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::_grouped_mm",
          "aten::baddbmm")
ATTENTION = ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math",
             "aten::_flash_attention_forward", "aten::_flash_attention_backward")  # prefixes: backward ops too
OPTIMIZER = ("Optimizer.step", "aten::_foreach", "aten::_fused_adamw")


def load():
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def category(name):
    if name.startswith(MATMUL):
        return "matmul"
    if name.startswith(ATTENTION):
        return "attention"
    if name.startswith(OPTIMIZER):
        return "optimizer"
    return "elementwise/other"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n_layer", type=int, default=6)
    ap.add_argument("--n_head", type=int, default=6)
    ap.add_argument("--n_kv_head", type=int, default=6)
    ap.add_argument("--n_embd", type=int, default=384)
    ap.add_argument("--vocab_size", type=int, default=8192)
    ap.add_argument("--seq_len", type=int, default=256)
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8, help="timed steps (after 2 warm-up steps)")
    ap.add_argument("--compile", type=lambda s: s.lower() in ("1", "true", "yes"), default=False)
    ap.add_argument("--profile", type=lambda s: s.lower() in ("1", "true", "yes"), default=True)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--nanogpt", default=None, help="path of a nanoGPT checkout: alternate steps with its model")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=args.vocab_size, n_layer=args.n_layer, n_head=args.n_head, n_kv_head=args.n_kv_head,
                      n_embd=args.n_embd, max_seq_len=args.seq_len, kernels="torch")
    model = Transformer(cfg)
    opt = configure_optimizer(model, 3e-3, 0.1, device_type="cpu")
    step_model = torch.compile(model) if args.compile else model
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len + 1), generator=g) for _ in range(4)]

    def make_step(fwd, params, optimizer):
        def step(i):
            xy = batches[i % len(batches)]
            _, loss = fwd(xy[:, :-1].contiguous(), xy[:, 1:].contiguous())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss
        return step

    name = "this repo" + (" (compiled)" if args.compile else "")
    steps = {name: make_step(step_model, list(model.parameters()), opt)}
    if args.nanogpt:
        spec = importlib.util.spec_from_file_location("nanogpt_model", os.path.join(args.nanogpt, "model.py"))
        nano = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(nano)
        torch.manual_seed(0)
        gpt = nano.GPT(nano.GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                                      block_size=args.seq_len, vocab_size=args.vocab_size, bias=False, dropout=0.0))
        gpt_opt = gpt.configure_optimizers(0.1, 3e-3, (0.9, 0.95), "cpu")
        steps["nanoGPT"] = make_step(gpt, list(gpt.parameters()), gpt_opt)
    step = steps[next(iter(steps))]

    t0 = time.perf_counter()
    for i in range(2):
        for f in steps.values():
            f(i)
    warm = time.perf_counter() - t0
    times = {name: [] for name in steps}
    for i in range(args.steps):  # interleaved: every model sees the same machine load
        for name, f in steps.items():
            t0 = time.perf_counter()
            f(i)
            times[name].append(time.perf_counter() - t0)
    tokens = args.batch_size * args.seq_len
    print(f"model {model.num_params() / 1e6:.2f}M params | {args.batch_size}x{args.seq_len} tokens/step | "
          f"threads {torch.get_num_threads()} | compile {args.compile} | torch {torch.__version__}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:22s} step {med * 1e3:.0f} ms median of {args.steps} (min {min(ts) * 1e3:.0f}, max "
              f"{max(ts) * 1e3:.0f}) | {tokens / med:,.0f} tokens/s | load average {load():.2f}")
    if args.nanogpt:
        ours, theirs = (statistics.median(ts) for ts in times.values())
        print(f"tokens/s ratio this repo / nanoGPT: {theirs / ours:.2f} (warm-up of both {warm:.1f}s)")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(2):
                step(i)
        # self time per op (children not double counted), summed by category
        totals, by_op = {}, {}
        for e in prof.key_averages():
            c = category(e.key)
            totals[c] = totals.get(c, 0.0) + e.self_cpu_time_total
            by_op[e.key] = e.self_cpu_time_total
        total = sum(totals.values())
        print(f"breakdown of 2 profiled steps ({total / 2e3:.0f} ms/step under the profiler, self CPU time):")
        for c, t in sorted(totals.items(), key=lambda kv: -kv[1]):
            print(f"  {c:18s} {t / 2e3:8.0f} ms/step  {t / total:6.1%}")
        print("top ops by self time:")
        for name, t in sorted(by_op.items(), key=lambda kv: -kv[1])[:15]:
            print(f"  {name:60s} {t / 2e3:8.1f} ms/step  [{category(name)}]")


if __name__ == "__main__":
    main()
