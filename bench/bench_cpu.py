"""
CPU training-step time of the repo's model, and where it goes: matmuls vs attention vs elementwise
work (norms, RoPE, SwiGLU, cross-entropy, optimizer), from torch.profiler.

    python bench/bench_cpu.py                         # the nanoGPT-comparison size: 6x384, 6 heads, vocab 8192, 16x256
    python bench/bench_cpu.py --compile=True          # the same step through torch.compile (needs a C++ compiler)
    python bench/bench_cpu.py --steps=5 --n_layer=2   # smaller

One step = forward with the fused linear + cross-entropy loss, backward, grad clip, AdamW step: what
pretrain.py does per step on the CPU (fp32, kernels="torch"). The machine is often shared: the load
average is printed beside the figures; compare runs only when they were taken under similar load.
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import ModelConfig, Transformer, configure_optimizer  # noqa: E402

# profiler op names -> category; anything else is "elementwise/other"
MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::_grouped_mm", "aten::baddbmm")
ATTENTION = ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
             "aten::_scaled_dot_product_attention_math", "aten::_flash_attention_forward", "aten::_flash_attention_backward")
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

    def step(i):
        xy = batches[i % len(batches)]
        _, loss = step_model(xy[:, :-1], xy[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    for i in range(2):
        step(i)
    warm = time.perf_counter() - t0
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    tokens = args.batch_size * args.seq_len
    print(f"model {model.num_params() / 1e6:.2f}M params | {args.batch_size}x{args.seq_len} tokens/step | "
          f"threads {torch.get_num_threads()} | compile {args.compile} | torch {torch.__version__}")
    print(f"step {med * 1e3:.0f} ms median of {args.steps} (min {min(times) * 1e3:.0f}, max {max(times) * 1e3:.0f}) | "
          f"{tokens / med:,.0f} tokens/s | warm-up {warm:.1f}s | load average {load():.2f}")

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
