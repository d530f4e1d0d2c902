"""
The first GPU run in one call (run through bench/gpu_check.sh): the CUDA tests of kernels and model, attention
against SDPA flash/cuDNN, the fused linear + cross-entropy against the unfused loss, pretrain.py at 124M
(eager and compiled, kernels on and off) and rollout throughput through model.generate.

    bash bench/gpu_check.sh OUT_DIR COMMIT                      # everything, about 5 minutes on one H100/H200
    bash bench/gpu_check.sh OUT_DIR COMMIT --only tests,flce    # rerun some sections
    bash bench/gpu_check.sh OUT_DIR COMMIT --dry-run            # the same code paths on the CPU, tiny shapes

Each section runs in its own process under a time budget (BUDGET_S; a section over it is killed and marked
"timed_out", keeping what it wrote) and writes OUT_DIR/<section>.json as each figure comes in, with the
device, versions and the commit given on the command line (the GPU machine may have no .git). Everything
printed also goes to OUT_DIR/gpu_check.log. Attention autotuning winners are kept in OUT_DIR/autotune.json
(KERNELS_AUTOTUNE_CACHE) and reused by later sections and reruns. At most 8 files, no subfolders.

Nothing here imports datasets or wandb (the GPU machine has neither), and nothing reaches the network.
"""

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SECTIONS = ["env", "tests", "attention", "flce", "pretrain", "rollout"]
# seconds per section on one H100/H200 (the sum is the 5-minute budget); the dry run has no limits
BUDGET_S = {"env": 10, "tests": 75, "attention": 45, "flce": 35, "pretrain": 115, "rollout": 20}


# -----------------------------------------------------------------------------
# recording

class Recorder:
    """OUT/<section>.json, rewritten after every figure so a killed section keeps what it measured."""

    def __init__(self, out, section, commit, dry_run):
        import torch
        self.path = os.path.join(out, f"{section}.json")
        cuda = torch.cuda.is_available()
        try:
            import triton
            triton_version = triton.__version__
        except ImportError:
            triton_version = None
        self.data = dict(section=section, status="running", commit=commit, dry_run=dry_run,
                         started=datetime.datetime.now().isoformat(timespec="seconds"),
                         device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
                         triton=triton_version, cuda=torch.version.cuda, results=[])
        self.t0 = time.time()
        self.write()

    def add(self, **entry):
        self.data["results"].append(entry)
        self.write()
        print(f"  {json.dumps(entry, default=str)[:400]}", flush=True)

    def set(self, **kw):
        self.data.update(kw)
        self.write()

    def write(self):
        self.data["seconds"] = round(time.time() - self.t0, 1)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(tmp, self.path)


def cuda_time_ms(fn, reps, warmup=1):
    """Median wall time of fn() in ms (CUDA-synchronised; plain wall clock on the CPU)."""
    import torch
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# -----------------------------------------------------------------------------
# sections (each runs in its own process)

def section_env(rec, args):
    import torch
    spec = {name: importlib.util.find_spec(name) is not None  # find_spec: looks, does not import
            for name in ("triton", "numpy", "tiktoken", "regex", "datasets", "wandb", "pytest")}
    rec.set(python=platform.python_version(), packages=spec, git=os.path.isdir(os.path.join(ROOT, ".git")) or
            os.path.isfile(os.path.join(ROOT, ".git")))
    if not torch.cuda.is_available():
        rec.add(name="device", note="no CUDA device (dry run)")
        return
    props = torch.cuda.get_device_properties(0)
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        smi = None
    rec.add(name="device", device=props.name, capability=list(torch.cuda.get_device_capability()),
            sms=props.multi_processor_count, memory_gb=round(props.total_memory / 1e9, 1), nvidia_smi=smi)
    from bench.report import matmul_ceiling
    n = 1 << 30
    x = torch.empty(n, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = cuda_time_ms(lambda: y.copy_(x), reps=10, warmup=3)
    rec.add(name="copy_bandwidth", gb_per_s=round(2 * n / (ms * 1e-3) / 1e9, 1), bytes=n)
    del x, y
    rec.add(name="bf16_matmul_8192", tflops=round(matmul_ceiling() / 1e12, 1))


def section_tests(rec, args):
    # GPU-only checks first (bf16 against fp64, every launch config, > 2^31 elements, grouped MoE GEMM, the
    # model with Triton kernels), then the rest of both files: if the budget runs out, the important part ran
    first = "bf16 or every_config or 2_31 or grouped_on_cuda or multi_tile or triton_equals or compile"
    runs = [["tests/test_kernels.py", "-k", first],
            ["tests/test_kernels.py", "tests/test_model.py", "-k", f"not ({first})"]]
    if args.dry_run:
        runs = [["tests/test_kernels.py", "-k", "resolve_impl or seq_bucket"], ["tests/test_model.py", "-k", "lr_schedules"]]
    # first config of each list, no timing: autotuning every test shape would cost minutes of compiles
    # (test_attention_every_config_on_gpu forces each config instead)
    env = {**os.environ, "KERNELS_AUTOTUNE": "0", "WANDB_MODE": "disabled"}
    env.pop("KERNELS_AUTOTUNE_CACHE", None)
    counts, failed, rcs, tail = {}, [], [], []
    for run in runs:
        cmd = [sys.executable, "-m", "pytest", "-v", "--tb=line", "-rfE", "-p", "no:cacheprovider"] + run
        print(" ".join(cmd), flush=True)
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in p.stdout:
            print(line, end="", flush=True)
            tail = (tail + [line.rstrip()])[-60:]
            m = re.search(r"::(\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)", line)
            if m:
                counts[m.group(2).lower()] = counts.get(m.group(2).lower(), 0) + 1
                if m.group(2) in ("FAILED", "ERROR"):
                    failed.append(line.split(" ")[0])
                rec.set(counts=counts, failed=failed)
        rcs.append(p.wait())
    rc = max(rcs)  # 0 all passed, 1 failures, 5 nothing selected
    rec.set(counts=counts, failed=failed, returncode=rc, returncodes=rcs, tail=tail[-40:])
    rec.add(name="pytest", returncode=rc, **counts)


def _attention_providers(K, causal, doc_ids, dry_run):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(backend):
        def f(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=k.shape[1] != q.shape[1])
        return f

    providers = {"triton": lambda q, k, v: K.attention(q, k, v, causal, doc_ids, impl="triton")}
    if doc_ids is None and not dry_run:
        providers["sdpa_flash"] = sdpa(SDPBackend.FLASH_ATTENTION)
        providers["sdpa_cudnn"] = sdpa(SDPBackend.CUDNN_ATTENTION)
    else:
        providers["torch_sdpa"] = lambda q, k, v: K.attention(q, k, v, causal, doc_ids, impl="torch")
    return providers


def section_attention(rec, args):
    import torch
    import kernels as K
    from bench.bench_kernels import packed_doc_ids
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    # (B, n_head, n_kv_head, T, hd, doc mean length): causal, the 2k and 8k points, and packed docs
    shapes = [(8, 16, 16, 2048, 128, None), (2, 16, 16, 8192, 128, None), (2, 16, 16, 8192, 128, 1024)]
    reps = 10
    if args.dry_run:
        shapes, reps = [(1, 2, 1, 24, 16, 8)], 1  # one shape, documents on: the longest code path
    for B, H, HK, T, D, doc_len in shapes:
        doc_ids = packed_doc_ids(B, T, doc_len, dev) if doc_len else None
        flops = 4 * B * H * T * T * D * 0.5  # causal: half the dense matmul work
        g = torch.Generator(device=dev).manual_seed(0)
        q = torch.randn(B, H, T, D, device=dev, dtype=dt, generator=g, requires_grad=True)
        k = torch.randn(B, HK, T, D, device=dev, dtype=dt, generator=g, requires_grad=True)
        v = torch.randn(B, HK, T, D, device=dev, dtype=dt, generator=g, requires_grad=True)
        do = torch.randn_like(q)
        for name, f in _attention_providers(K, True, doc_ids, args.dry_run).items():
            entry = dict(name=name, B=B, n_head=H, n_kv_head=HK, T=T, hd=D, causal=True, doc_mean_len=doc_len,
                         dtype=str(dt))
            try:
                t0 = time.time()
                with torch.no_grad():
                    f(q, k, v)  # first call: compiles and (triton) autotunes this shape bucket
                fwd_bwd = lambda: torch.autograd.grad(f(q, k, v), (q, k, v), do)
                fwd_bwd()
                entry["first_calls_s"] = round(time.time() - t0, 2)
                with torch.no_grad():
                    fwd = cuda_time_ms(lambda: f(q, k, v), reps)
                fb = cuda_time_ms(fwd_bwd, reps)
                entry.update(fwd_ms=round(fwd, 3), fwd_tflops=round(flops / fwd / 1e9, 1), fwd_bwd_ms=round(fb, 3),
                             fwd_bwd_tflops=round(3.5 * flops / fb / 1e9, 1))
            except Exception as e:  # noqa: BLE001 - record and go on (e.g. cuDNN backend not available)
                entry["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            rec.add(**entry)
        del q, k, v, do
    rec.set(autotuned=K.autotuned_configs(),
            notes="TFLOP/s with causal FLOPs 2*B*H*T^2*hd (fwd) and 3.5x that (fwd+bwd); doc-masked rows count "
                  "the dense causal FLOPs (effective rate)")


def section_flce(rec, args):
    import torch
    import torch.nn.functional as F
    import kernels as K
    from bench.bench_kernels import peak_mem_gb
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    N, d, V, dt, reps = 32768, 4096, 131072, torch.bfloat16, 3
    if args.dry_run:
        N, d, V, dt, reps = 8, 16, 160, torch.float32, 1
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(N, d, device=dev, dtype=dt, generator=g).requires_grad_()
    w = (torch.randn(V, d, device=dev, dtype=dt, generator=g) / d ** 0.5).requires_grad_()
    t = torch.randint(0, V, (N,), device=dev, generator=g)

    def unfused(x, w, t):
        return F.cross_entropy((x @ w.t()).float(), t)

    providers = [("unfused_eager", lambda: unfused(x, w, t)),  # first: the yardstick of the others
                 ("fused_triton", lambda: K.linear_cross_entropy(x, w, t, impl="triton")),
                 ("fused_torch_chunks", lambda: K.linear_cross_entropy(x, w, t, impl="torch"))]
    if not args.dry_run:  # compiling on the CPU takes long; the GPU run measures it
        compiled = torch.compile(unfused)
        providers.append(("unfused_compiled", lambda: compiled(x, w, t)))
    ref = None
    for name, f in providers:
        entry = dict(name=name, N=N, d=d, V=V, dtype=str(dt))
        try:
            step = lambda: torch.autograd.grad(f(), (x, w))
            t0 = time.time()
            loss = f().item()
            grads = step()
            entry["first_calls_s"] = round(time.time() - t0, 2)
            if ref is None:  # the first provider's loss and gradients are the yardstick of the others
                ref = (loss, grads)
            entry.update(loss=loss, loss_diff_vs_first=abs(loss - ref[0]),
                         grad_rel_err_vs_first=max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
                                                   for a, b in zip(grads, ref[1])))
            del grads
            entry.update(fwd_bwd_ms=round(cuda_time_ms(step, reps), 2), peak_extra_gb=round(peak_mem_gb(step), 2))
        except Exception as e:  # noqa: BLE001 - an unfused loss may run out of memory
            entry["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        if dev == "cuda":
            torch.cuda.empty_cache()
        rec.add(**entry)


def _stub_missing(names, directory):
    """pretrain.py imports data/tokenizer.py, which imports tiktoken and regex at module level but uses them
    only to tokenise; the synthetic data here needs no tokenizer. Where they are missing, empty stand-ins
    (that fail on first use) let pretrain.py start. Returns the names stubbed."""
    missing = [n for n in names if importlib.util.find_spec(n) is None]
    for name in missing:
        write_stub(name, directory)
    return missing


def write_stub(name, directory):
    with open(os.path.join(directory, f"{name}.py"), "w") as f:
        f.write(f"def __getattr__(attr):\n    raise ImportError('{name} is not installed (gpu_check stand-in)')\n")


def section_pretrain(rec, args):
    import torch
    from bench.bench_pretrain import MODELS, VARIANTS, flops_per_token, parse_log, pretrain_command, synthetic_data
    model_kw = dict(MODELS["gpt2_124m"])
    steps, log_interval, skip = 30, 5, 2
    # eager first (they finish for sure; triton eager fills autotune.json for the compiled run), compiles last
    variants = ["triton", "torch", "triton+compile", "torch+compile"]
    if args.dry_run:
        model_kw = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, seq_len=64, batch_size=4)
        steps, log_interval, skip, variants = 4, 2, 1, ["torch"]
    fpt, n_params, _ = flops_per_token(model_kw)
    peak = matmul = None
    if torch.cuda.is_available():
        from bench.report import matmul_ceiling
        from distributed import device_peak_flops
        peak, matmul = device_peak_flops(torch.cuda.get_device_name()), matmul_ceiling()
    rec.set(model=model_kw, params=n_params, flops_per_token=fpt, peak_bf16_flops=peak, measured_matmul_flops=matmul,
            steps=steps, skipped_log_intervals=skip)
    deadline = time.time() + (BUDGET_S["pretrain"] - 8 if not args.dry_run else 10 ** 6)
    with tempfile.TemporaryDirectory() as tmp:
        stubs = os.path.join(tmp, "stubs")
        os.makedirs(stubs)
        stubbed = _stub_missing(["tiktoken", "regex"], stubs)
        env = {**os.environ, "WANDB_MODE": "disabled"}
        if stubbed:
            env["PYTHONPATH"] = os.pathsep.join([stubs] + [p for p in [env.get("PYTHONPATH")] if p])
            rec.set(stubbed_modules=stubbed)
        synthetic_data(tmp, model_kw["seq_len"] * model_kw["batch_size"] * (steps + 2) + 1)
        for variant in variants:
            impl, compiled = VARIANTS[variant]
            cmd = pretrain_command(tmp, os.path.join(tmp, "out"), steps, log_interval, impl, compiled, model_kw)
            print(f"--- {variant}: {' '.join(cmd[1:])}", flush=True)
            entry = dict(name=variant, kernels=impl, compile=compiled)
            left = deadline - time.time()
            if left < 10:
                entry["error"] = "skipped: the section's time budget is spent"
                rec.add(**entry)
                continue
            t0 = time.time()
            try:
                p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=left, env=env)
                log, rc = p.stdout + p.stderr, p.returncode
            except subprocess.TimeoutExpired as e:
                log = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
                rc = "timeout"
            print(log[-2500:], flush=True)
            entry.update(returncode=rc, wall_s=round(time.time() - t0, 1))
            figures = parse_log(log, skip) if log else None
            if figures:
                tps = figures["tokens_per_sec"]
                entry.update(figures, mfu_vs_peak=fpt * tps / peak if peak else None,
                             mfu_vs_matmul=fpt * tps / matmul if matmul else None)
            if rc != 0:
                entry["log_tail"] = log[-1500:]
            rec.add(**entry)


def section_rollout(rec, args):
    import torch
    import model as M
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    # GPT-2 small shape (124M with the 50304 vocab); grpo.py samples with model.generate, eagerly, in bf16 autocast
    cfg_kw = dict(vocab_size=50304, n_layer=12, n_head=12, n_kv_head=12, n_embd=768, max_seq_len=1024)
    rows, prompt_len, new_tokens = 64, 128, 256
    if args.dry_run:
        cfg_kw = dict(vocab_size=128, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, max_seq_len=64)
        rows, prompt_len, new_tokens = 4, 8, 8
    torch.manual_seed(0)
    model = M.Transformer(M.ModelConfig(**cfg_kw, kernels="auto")).to(dev).eval()
    g = torch.Generator(device=dev).manual_seed(0)
    prompts = torch.randint(0, cfg_kw["vocab_size"], (rows, prompt_len), generator=g, device=dev).tolist()
    autocast = torch.autocast("cuda", torch.bfloat16) if dev == "cuda" else torch.autocast("cpu", enabled=False)

    def run(n):
        with torch.no_grad(), autocast:
            out = model.generate(prompts, n, temperature=1.0, top_p=0.95, stop_tokens=(), pad_id=0, generator=g)
        if dev == "cuda":
            torch.cuda.synchronize()
        return out

    t0 = time.time()
    run(min(16, new_tokens))  # warm-up: allocator, kernel compiles and the prefill's autotuning
    warm = time.time() - t0
    t0 = time.time()
    out = run(new_tokens)
    sec = time.time() - t0
    assert out["tokens"].shape == (rows, new_tokens), out["tokens"].shape
    rec.add(name="generate_eager_bf16", params=model.num_params(), kernels=model.impl, rows=rows,
            prompt_len=prompt_len, new_tokens=new_tokens, seconds=round(sec, 3), warmup_s=round(warm, 1),
            tokens_per_s=round(rows * new_tokens / sec), ms_per_decode_step=round(sec / new_tokens * 1e3, 3))


# -----------------------------------------------------------------------------
# orchestration

def run_section(section, args, log):
    """Run one section in a child process under its time budget, echoing its output to stdout and the log."""
    cmd = [sys.executable, "-u", os.path.abspath(__file__), "--section", section, "--out", args.out,
           "--commit", args.commit] + (["--dry-run"] if args.dry_run else [])
    env = {**os.environ, "KERNELS_AUTOTUNE_CACHE": os.path.join(args.out, "autotune.json"), "WANDB_MODE": "disabled"}
    if args.dry_run:
        env["TRITON_INTERPRET"] = "1"
    budget = None if args.dry_run else BUDGET_S[section]
    banner = f"=== {section} (budget {budget or '-'} s) {datetime.datetime.now().isoformat(timespec='seconds')}"
    for stream in (sys.stdout, log):
        print(banner, file=stream, flush=True)
    t0 = time.time()
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)

    def pump():
        for line in p.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            log.write(line)
            log.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = p.wait(timeout=budget)
        status = "ok" if rc == 0 else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # the section and its children (pytest, pretrain.py)
        p.wait()
        rc, status = None, "timed_out"
    reader.join(timeout=5)
    path = os.path.join(args.out, f"{section}.json")
    data = {}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    if section == "tests" and status == "ok" and data.get("returncode") not in (0, None):
        status = "failed"  # pytest ran to the end, with failures
    data.update(section=section, status=status, returncode=rc, wall_s=round(time.time() - t0, 1), commit=args.commit)
    with open(path, "w") as f:
        json.dump(data, f, indent=1, default=str)
    msg = f"=== {section}: {status} in {time.time() - t0:.0f} s"
    for stream in (sys.stdout, log):
        print(msg, file=stream, flush=True)
    return status


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for the JSON files and the log (created)")
    ap.add_argument("--commit", required=True, help="commit hash of the tree being measured")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    ap.add_argument("--dry-run", action="store_true", help="run every section on the CPU with tiny shapes")
    ap.add_argument("--section", default=None, help=argparse.SUPPRESS)  # internal: run one section here
    args = ap.parse_args()
    args.out = os.path.abspath(args.out)
    if args.section:
        rec = Recorder(args.out, args.section, args.commit, args.dry_run)
        globals()[f"section_{args.section}"](rec, args)
        rec.set(status="ok")
        return
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        sys.exit(f"gpu_check: unknown section(s) {unknown}; choose from {SECTIONS}")
    import torch
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device is visible; use --dry-run to exercise the script on the CPU")
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    with open(os.path.join(args.out, "gpu_check.log"), "a") as log:
        statuses = {s: run_section(s, args, log) for s in sections}
        summary = f"gpu_check {args.commit}: " + ", ".join(f"{s} {v}" for s, v in statuses.items()) + \
                  f" | {time.time() - t0:.0f} s in all"
        print(summary, flush=True)
        print(summary, file=log, flush=True)
    sys.exit(0 if all(v == "ok" for v in statuses.values()) else 1)


if __name__ == "__main__":
    main()
