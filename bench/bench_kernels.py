"""
Benchmark the kernels in kernels.py on a GPU against PyTorch eager, torch.compile of the
reference, and (attention) SDPA's flash and cuDNN backends.

    python bench/bench_kernels.py            # full sweep
    python bench/bench_kernels.py --quick    # one or two shapes per op

Reports per (op, shape, provider): median time of fwd and fwd+bwd, TFLOP/s (attention, fused
linear+CE) or GB/s (norm, rope, swiglu, CE), and peak extra memory of one fwd+bwd. Also measures
two ceilings for context: copy bandwidth (x.copy_) and a bf16 matmul. Results go to
bench/results/kernels_<device-slug>_<date>.json. Refuses to run without CUDA (exit code 2):
CPU/interpreter numbers would mean nothing.
"""

import argparse
import os
import sys
import traceback

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.report import matmul_ceiling, require_cuda, run_metadata, write_report  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="only a couple of shapes per op")
    p.add_argument("--ops", default="attention,rms_norm,rope,swiglu,cross_entropy,linear_cross_entropy",
                   help="comma-separated subset of ops to run")
    p.add_argument("--out", default=None, help="output JSON path (default: bench/results/kernels_<device>_<date>.json)")
    return p.parse_args()


# -----------------------------------------------------------------------------
# measurement helpers

def bench_ms(fn):
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def peak_mem_gb(fn):
    """Peak GPU memory above what is already allocated (the inputs) during one call of fn; 0 on the CPU
    (gpu_check.py's dry run)."""
    if not torch.cuda.is_available():
        fn()
        return 0.0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 1e9


def fwd_bwd_fn(f, inputs, grad_out=None):
    # one forward + backward; torch.autograd.grad so nothing accumulates in .grad between reps
    def run():
        out = f()
        g = grad_out if grad_out is not None else (torch.ones_like(out) if out.dim() else None)
        torch.autograd.grad(out, inputs, g)
    return run


def measure(f, inputs, grad_out, work_fwd, work_fwdbwd, unit):
    """Time f (no grad) and f + backward. work_* is flops (unit TFLOP/s) or bytes (unit GB/s)."""
    res = {}
    fwd = lambda: f()
    fb = fwd_bwd_fn(f, inputs, grad_out)
    with torch.no_grad():
        fwd()  # warm-up: compiles, autotunes
        ms = bench_ms(fwd)
    res["fwd_ms"] = ms
    res[f"fwd_{unit}"] = work_fwd / (ms * 1e-3) / (1e12 if unit == "tflops" else 1e9)
    fb()
    ms = bench_ms(fb)
    res["fwd_bwd_ms"] = ms
    res[f"fwd_bwd_{unit}"] = work_fwdbwd / (ms * 1e-3) / (1e12 if unit == "tflops" else 1e9)
    res["fwd_bwd_peak_mem_gb"] = peak_mem_gb(fb)
    return res


def run_provider(name, make, results_list, meta):
    """make() -> (f, inputs, grad_out, work_fwd, work_fwdbwd, unit). Errors (OOM, unsupported
    backend) are recorded, not fatal."""
    entry = dict(meta, provider=name)
    try:
        entry.update(measure(*make()))
        unit = "tflops" if "fwd_tflops" in entry else "gbps"
        print(f"  {name:>16}: fwd {entry['fwd_ms']:8.3f} ms {entry['fwd_' + unit]:8.1f} {unit} | "
              f"fwd+bwd {entry['fwd_bwd_ms']:8.3f} ms {entry['fwd_bwd_' + unit]:8.1f} {unit} | "
              f"peak {entry['fwd_bwd_peak_mem_gb']:.2f} GB", flush=True)
    except Exception as e:  # noqa: BLE001 - a failing provider must not kill the sweep
        entry["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        print(f"  {name:>16}: ERROR {entry['error']}", flush=True)
        if not isinstance(e, torch.cuda.OutOfMemoryError):
            traceback.print_exc(limit=2)
    torch.cuda.empty_cache()
    results_list.append(entry)


def compiled(fn):
    return torch.compile(fn, dynamic=False)


# -----------------------------------------------------------------------------
# reference ceilings

def copy_bandwidth():
    n = 1 << 30  # 1 GiB per buffer
    x = torch.empty(n, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = bench_ms(lambda: y.copy_(x))
    return {"bytes_per_buffer": n, "ms": ms, "gbps": 2 * n / (ms * 1e-3) / 1e9}


# -----------------------------------------------------------------------------
# per-op sweeps

def packed_doc_ids(B, T, mean_len, device):
    # documents of random (uneven) length, as in packed pretraining batches
    g = torch.Generator().manual_seed(0)
    ids = torch.zeros(B, T, dtype=torch.int32)
    for b in range(B):
        pos, d = 0, 0
        while pos < T:
            n = int(torch.randint(mean_len // 4, 2 * mean_len, (1,), generator=g))
            ids[b, pos:pos + n] = d
            pos, d = pos + n, d + 1
    return ids.to(device)


def bench_attention(K, quick, out):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    dt = torch.bfloat16
    # (B, n_head, n_kv_head, T, hd, causal, doc mean length or None)
    shapes = [
        (16, 16, 16, 1024, 128, True, None),
        (4, 32, 32, 4096, 128, True, None),
        (8, 32, 32, 2048, 64, True, None),
        (4, 32, 8, 4096, 128, True, None),   # GQA 4
        (1, 32, 8, 16384, 128, True, None),
        (2, 16, 16, 8192, 128, False, None),
        (4, 32, 8, 4096, 128, True, 1024),   # packed documents
    ]
    if quick:
        shapes = [shapes[1], shapes[3], shapes[6]]
    for B, H, HK, T, D, causal, doc_len in shapes:
        meta = dict(op="attention", B=B, n_head=H, n_kv_head=HK, T=T, hd=D, causal=causal,
                    doc_mean_len=doc_len, dtype=str(dt))
        print(f"attention {meta}", flush=True)
        # flops of the dense attention (doc masks skip work, so their TFLOP/s is "effective")
        flops = 4 * B * H * T * T * D * (0.5 if causal else 1.0)
        flops_fb = flops * 3.5  # backward does 2.5x the forward's matmul work
        doc_ids = packed_doc_ids(B, T, doc_len, "cuda") if doc_len else None

        def make(fn):
            def _make():
                q = torch.randn(B, H, T, D, device="cuda", dtype=dt, requires_grad=True)
                k = torch.randn(B, HK, T, D, device="cuda", dtype=dt, requires_grad=True)
                v = torch.randn(B, HK, T, D, device="cuda", dtype=dt, requires_grad=True)
                do = torch.randn_like(q)
                return (lambda: fn(q, k, v)), (q, k, v), do, flops, flops_fb, "tflops"
            return _make

        def sdpa_backend(backend):
            def fn(q, k, v):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=HK != H)
            return fn

        ref = lambda q, k, v: K.attention(q, k, v, causal, doc_ids, impl="torch")
        run_provider("triton", make(lambda q, k, v: K.attention(q, k, v, causal, doc_ids, impl="triton")), out, meta)
        run_provider("torch_eager", make(ref), out, meta)
        run_provider("torch_compile", make(compiled(ref)), out, meta)
        if doc_ids is None:  # flash/cuDNN SDPA backends take no arbitrary boolean mask
            run_provider("sdpa_flash", make(sdpa_backend(SDPBackend.FLASH_ATTENTION)), out, meta)
            run_provider("sdpa_cudnn", make(sdpa_backend(SDPBackend.CUDNN_ATTENTION)), out, meta)


def bench_rms_norm(K, quick, out):
    dt = torch.bfloat16
    shapes = [(32768, 2048), (65536, 4096), (16384, 8192)]
    if quick:
        shapes = shapes[1:2]
    for N, d in shapes:
        meta = dict(op="rms_norm", N=N, d=d, dtype=str(dt))
        print(f"rms_norm {meta}", flush=True)
        es = 2
        bytes_f = 2 * N * d * es  # read x, write y
        bytes_fb = bytes_f + 3 * N * d * es  # + read x, dy, write dx (weight and rstd are negligible)

        def make(fn):
            def _make():
                x = torch.randn(N, d, device="cuda", dtype=dt, requires_grad=True)
                w = torch.ones(d, device="cuda", dtype=torch.float32, requires_grad=True)
                return (lambda: fn(x, w)), (x, w), torch.randn_like(x), bytes_f, bytes_fb, "gbps"
            return _make

        ref = lambda x, w: K.rms_norm(x, w, 1e-6, impl="torch")
        run_provider("triton", make(lambda x, w: K.rms_norm(x, w, 1e-6, impl="triton")), out, meta)
        run_provider("torch_eager", make(ref), out, meta)
        run_provider("torch_compile", make(compiled(ref)), out, meta)


def bench_rope(K, quick, out):
    dt = torch.bfloat16
    shapes = [(16, 1024, 32, 128), (4, 8192, 32, 128), (8, 4096, 16, 64)]
    if quick:
        shapes = shapes[1:2]
    for B, T, H, hd in shapes:
        meta = dict(op="rope", B=B, T=T, H=H, hd=hd, dtype=str(dt))
        print(f"rope {meta}", flush=True)
        n = B * T * H * hd
        bytes_f = 2 * n * 2  # read x, write y (cos/sin are shared over heads)
        bytes_fb = bytes_f + 2 * n * 2

        def make(fn):
            def _make():
                x = torch.randn(B, T, H, hd, device="cuda", dtype=dt, requires_grad=True)
                theta = torch.rand(1, T, hd // 2, device="cuda") * 100
                cos, sin = theta.cos(), theta.sin()
                return (lambda: fn(x, cos, sin)), (x,), torch.randn_like(x), bytes_f, bytes_fb, "gbps"
            return _make

        ref = lambda x, c, s: K.apply_rope(x, c, s, impl="torch")
        run_provider("triton", make(lambda x, c, s: K.apply_rope(x, c, s, impl="triton")), out, meta)
        run_provider("torch_eager", make(ref), out, meta)
        run_provider("torch_compile", make(compiled(ref)), out, meta)


def bench_swiglu(K, quick, out):
    dt = torch.bfloat16
    shapes = [(32768, 5632), (65536, 8192), (16384, 14336)]
    if quick:
        shapes = shapes[1:2]
    for N, f in shapes:
        meta = dict(op="swiglu", N=N, ffn=f, dtype=str(dt))
        print(f"swiglu {meta}", flush=True)
        n = N * f
        bytes_f = 3 * n * 2  # read gate, up; write y
        bytes_fb = bytes_f + 5 * n * 2  # read gate, up, dy; write dgate, dup

        def make(fn):
            def _make():
                g = torch.randn(N, f, device="cuda", dtype=dt, requires_grad=True)
                u = torch.randn(N, f, device="cuda", dtype=dt, requires_grad=True)
                return (lambda: fn(g, u)), (g, u), torch.randn_like(g), bytes_f, bytes_fb, "gbps"
            return _make

        ref = lambda g, u: K.swiglu(g, u, impl="torch")
        run_provider("triton", make(lambda g, u: K.swiglu(g, u, impl="triton")), out, meta)
        run_provider("torch_eager", make(ref), out, meta)
        run_provider("torch_compile", make(compiled(ref)), out, meta)


def bench_cross_entropy(K, quick, out):
    dt = torch.bfloat16
    shapes = [(16384, 32768), (16384, 131072), (8192, 151936)]
    if quick:
        shapes = shapes[1:2]
    for N, V in shapes:
        for softcap, z_loss in [(None, 0.0), (30.0, 1e-4)]:
            meta = dict(op="cross_entropy", N=N, V=V, softcap=softcap, z_loss=z_loss, dtype=str(dt))
            print(f"cross_entropy {meta}", flush=True)
            bytes_f = N * V * 2  # read logits
            bytes_fb = bytes_f + 2 * N * V * 2  # + read logits, write dlogits

            def make(fn):
                def _make():
                    logits = torch.randn(N, V, device="cuda", dtype=dt, requires_grad=True)
                    t = torch.randint(0, V, (N,), device="cuda")
                    return (lambda: fn(logits, t)), (logits,), None, bytes_f, bytes_fb, "gbps"
                return _make

            ref = lambda l, t: K.cross_entropy(l, t, z_loss=z_loss, softcap=softcap, impl="torch")
            run_provider("triton", make(lambda l, t: K.cross_entropy(l, t, z_loss=z_loss, softcap=softcap, impl="triton")), out, meta)
            run_provider("torch_eager", make(ref), out, meta)
            run_provider("torch_compile", make(compiled(ref)), out, meta)


def bench_linear_cross_entropy(K, quick, out):
    dt = torch.bfloat16
    shapes = [(16384, 2048, 32768), (16384, 4096, 131072), (16384, 3584, 151936), (65536, 2048, 50304)]
    if quick:
        shapes = shapes[1:2]
    for N, d, V in shapes:
        meta = dict(op="linear_cross_entropy", N=N, d=d, V=V, dtype=str(dt), chunk_size=4096)
        print(f"linear_cross_entropy {meta}", flush=True)
        flops = 2 * N * V * d
        flops_fb = 3 * flops

        def make(fn):
            def _make():
                x = torch.randn(N, d, device="cuda", dtype=dt, requires_grad=True)
                w = (torch.randn(V, d, device="cuda", dtype=dt) / d ** 0.5).requires_grad_()
                t = torch.randint(0, V, (N,), device="cuda")
                return (lambda: fn(x, w, t)), (x, w), None, flops, flops_fb, "tflops"
            return _make

        # materialised logits: what you would write without the fused op
        naive = lambda x, w, t: K.cross_entropy(x @ w.T, t, impl="torch")
        run_provider("triton", make(lambda x, w, t: K.linear_cross_entropy(x, w, t, impl="triton")), out, meta)
        run_provider("torch_chunked", make(lambda x, w, t: K.linear_cross_entropy(x, w, t, impl="torch")), out, meta)
        run_provider("torch_eager", make(naive), out, meta)
        run_provider("torch_compile", make(compiled(naive)), out, meta)


# -----------------------------------------------------------------------------

def main():
    args = parse_args()
    require_cuda("bench_kernels.py")
    try:
        import triton
    except ImportError:
        print("bench_kernels.py needs triton; it is not installed.", file=sys.stderr)
        sys.exit(2)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("TRITON_INTERPRET=1 is set; unset it to benchmark compiled kernels.", file=sys.stderr)
        sys.exit(2)
    import kernels as K

    torch.backends.cuda.matmul.allow_tf32 = True
    torch._dynamo.config.cache_size_limit = 64  # one compiled graph per shape and op

    report = {
        **run_metadata(),
        "quick": args.quick,
        "notes": {
            "timing": "triton.testing.do_bench median, ms; fwd timed under torch.no_grad()",
            "attention_flops": "fwd 4*B*H*T*T*hd (x0.5 causal); fwd+bwd = 3.5 x fwd (bwd = 2.5 x fwd)",
            "linear_cross_entropy_flops": "fwd 2*N*V*d; fwd+bwd = 3 x fwd",
            "bytes": "elementwise ops/CE: bytes read+written by an ideal kernel, see bench_kernels.py",
            "peak_mem": "max_memory_allocated during one fwd+bwd minus memory allocated before it (inputs)",
        },
    }
    print(f"device {report['device']}, torch {torch.__version__}, triton {triton.__version__}, "
          f"commit {report['git_commit']}", flush=True)
    report["copy_bandwidth"] = copy_bandwidth()
    print(f"copy bandwidth: {report['copy_bandwidth']['gbps']:.0f} GB/s", flush=True)
    report["bf16_matmul"] = {"shape": [8192, 8192, 8192], "tflops": matmul_ceiling() / 1e12}
    print(f"bf16 matmul 8192^3: {report['bf16_matmul']['tflops']:.0f} TFLOP/s", flush=True)

    benches = {
        "attention": bench_attention,
        "rms_norm": bench_rms_norm,
        "rope": bench_rope,
        "swiglu": bench_swiglu,
        "cross_entropy": bench_cross_entropy,
        "linear_cross_entropy": bench_linear_cross_entropy,
    }
    results = []
    for op in args.ops.split(","):
        benches[op.strip()](K, args.quick, results)
    report["results"] = results
    report["autotuned"] = K.autotuned_configs()  # the launch config chosen per kernel and shape bucket

    write_report("kernels", report, args.out)


if __name__ == "__main__":
    main()
