"""
Rollout throughput of model.generate, as grpo.py uses it: prompts x G completions sampled in one
batched call with the preallocated KV cache, bf16 autocast, temperature 1 with top_p, and no stop
token (every row generates all max_new_tokens, so tokens/s is rows * max_new_tokens / seconds).

Two randomly initialised models (~125M and ~0.5B, configs below), G in {8, 16} x 16 prompts of 128
tokens, 256 new tokens; each once eagerly and once with the decode step (the one-token forward that
generate repeats) compiled by torch.compile(mode="reduce-overhead"), i.e. Inductor kernels replayed as
CUDA graphs. The KV cache is written in place by every decode step; CUDA graphs accept that only for
inputs at static addresses, so the cache tensors are marked static (a new generate call allocates a
new cache: its first decode step re-records the graph, which the warm-up call absorbs once per shape).

$ python bench/bench_rollout.py                       # all models and shapes, writes bench/results/rollout_*.json
$ python bench/bench_rollout.py --models=125m --G=8 --repeats=5

Needs a CUDA GPU (exits with status 2 otherwise).
"""

import argparse
import os
import platform
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import generation  # noqa: E402
import model as M  # noqa: E402
from bench.report import require_cuda, run_metadata, write_report  # noqa: E402

MODELS = {
    # GPT-2 small shape (124M with the 50304 vocab, tied embeddings)
    "125m": dict(vocab_size=50304, n_layer=12, n_head=12, n_kv_head=12, n_embd=768, max_seq_len=1024),
    # Qwen2.5-0.5B-like depth and GQA at a 50k vocab: ~0.48B
    "0.5b": dict(vocab_size=50304, n_layer=24, n_head=20, n_kv_head=4, n_embd=1280, max_seq_len=1024),
}


class StaticKVCache(generation.KVCache):
    """The model's KV cache with its tensors marked as static inputs for CUDA graphs (see the docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for t in (self.k, self.v, self.valid):
            torch._dynamo.mark_static_address(t)


def compile_decode_step(model):
    """Route generate's one-token decode steps through torch.compile(mode="reduce-overhead"); the
    prefill (a different shape, once per call) stays eager."""
    eager = model.forward_cached
    compiled = torch.compile(eager, mode="reduce-overhead", dynamic=False)

    def step(idx, positions, cache, cache_pos):
        if idx.shape[1] != 1:
            return eager(idx, positions, cache, cache_pos)
        # generate passes a 0-d view into its slot index vector; a fresh copy keeps the input's
        # storage offset fixed, so the compiled graph's guards hold at every step
        return compiled(idx, positions, cache, cache_pos.clone())

    model.forward_cached = step  # an instance attribute shadows the method for this model only
    generation.KVCache = StaticKVCache


def bench_one(name, cfg_kw, G, n_prompts, prompt_len, new_tokens, compiled, repeats, seed=0):
    torch.manual_seed(seed)
    # the training scripts' kernel choice ("auto": the hand-written Triton kernels on CUDA) when eager;
    # plain PyTorch ops under compile, which Inductor fuses itself (autograd.Function Triton wrappers
    # would break the graph)
    cfg = M.ModelConfig(**cfg_kw, kernels="torch" if compiled else "auto")
    model = M.Transformer(cfg).cuda().eval()
    saved_cache = generation.KVCache
    if compiled:
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        compile_decode_step(model)
    g = torch.Generator(device="cuda").manual_seed(seed)
    prompts = torch.randint(0, cfg.vocab_size, (n_prompts, prompt_len), generator=g, device="cuda").tolist()
    rows = [p for p in prompts for _ in range(G)]

    def run():
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
            out = model.generate(rows, new_tokens, temperature=1.0, top_p=0.95, stop_tokens=(), pad_id=0, generator=g)
        torch.cuda.synchronize()
        return out

    try:
        t0 = time.perf_counter()
        out = run()  # warm-up: compiles and records the graph (compiled), allocator and kernel caches (eager)
        warmup_s = time.perf_counter() - t0
        assert out["tokens"].shape == (len(rows), new_tokens), out["tokens"].shape
        times = []
        torch.cuda.reset_peak_memory_stats()
        for _ in range(repeats):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
    finally:
        generation.KVCache = saved_cache
    times.sort()
    med = times[len(times) // 2]
    res = dict(model=name, params=model.num_params(), config=cfg_kw, compiled=compiled, G=G, prompts=n_prompts,
               rows=len(rows), prompt_len=prompt_len, new_tokens=new_tokens, repeats=repeats,
               seconds_median=med, seconds_all=times, warmup_seconds=warmup_s,
               tokens_per_s=len(rows) * new_tokens / med, ms_per_decode_step=med / new_tokens * 1e3,
               peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30)
    if compiled:
        c = torch._dynamo.utils.counters
        res["cudagraph_skips"] = int(c["inductor"]["cudagraph_skips"])  # > 0: it ran without CUDA graphs
        res["graph_breaks"] = int(sum(c["graph_break"].values()))
    del model
    torch.cuda.empty_cache()
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="125m,0.5b", help=f"comma-separated from {list(MODELS)}")
    ap.add_argument("--G", default="8,16", help="completions per prompt, comma-separated")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt_len", type=int, default=128)
    ap.add_argument("--new_tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--modes", default="eager,compiled")
    ap.add_argument("--out", default=None, help="output JSON path (default: bench/results/rollout_<device>_<date>.json)")
    args = ap.parse_args()
    require_cuda("bench_rollout.py")
    unknown = [m for m in args.models.split(",") if m not in MODELS]
    if unknown:
        sys.exit(f"unknown model(s) {unknown}: choose from {list(MODELS)}")

    results = []
    for name in args.models.split(","):
        for G in map(int, args.G.split(",")):
            for mode in args.modes.split(","):
                r = bench_one(name, MODELS[name], G, args.prompts, args.prompt_len, args.new_tokens,
                              mode == "compiled", args.repeats)
                results.append(r)
                extra = f" | cudagraph skips {r['cudagraph_skips']}, graph breaks {r['graph_breaks']}" if r["compiled"] else ""
                print(f"{name:5s} ({r['params'] / 1e6:.0f}M) G={G:2d} x {args.prompts} prompts = {r['rows']:3d} rows | "
                      f"{mode:8s} | {r['tokens_per_s']:10,.0f} tok/s | {r['ms_per_decode_step']:6.2f} ms/step | "
                      f"warm-up {r['warmup_seconds']:.1f}s | peak {r['peak_memory_gib']:.1f} GiB{extra}", flush=True)

    meta = dict(run_metadata(), python=platform.python_version(),
                sampling=dict(temperature=1.0, top_p=0.95, dtype="bf16 autocast", stop_tokens=None))
    write_report("rollout", dict(meta=meta, results=results), args.out)


if __name__ == "__main__":
    main()
