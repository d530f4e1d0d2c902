"""What every benchmark records beside its figures, and where it writes them (bench/results/*.json)."""

import datetime
import json
import os
import re
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def require_cuda(what):
    """Benchmarks measure GPUs: refuse (exit 2) rather than print CPU numbers as if they meant something."""
    if not torch.cuda.is_available():
        print(f"{what} needs a CUDA GPU; none is visible. Nothing was measured.", file=sys.stderr)
        sys.exit(2)


def run_metadata():
    """Device, versions, commit (and whether the tree had uncommitted changes), date."""
    try:
        commit = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True).strip()
        dirty = bool(subprocess.check_output(["git", "status", "--porcelain"], cwd=ROOT, text=True).strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", None
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return dict(device=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
                torch=torch.__version__, triton=triton_version, cuda=torch.version.cuda, git_commit=commit,
                git_dirty=dirty, date=datetime.datetime.now().isoformat(timespec="seconds"))


def write_report(kind, report, path=None):
    """Write report as bench/results/<kind>_<device>_<date-time>.json (or to path); returns the path."""
    slug = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = path or os.path.join(ROOT, "bench", "results", f"{kind}_{slug}_{stamp}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {path}")
    return path


def matmul_ceiling(n=8192):
    """Measured dense bf16 matmul throughput (FLOP/s) of this device: the realistic ceiling for MFU."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n ** 3 * 20 / (start.elapsed_time(end) * 1e-3)
