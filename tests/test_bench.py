"""The GPU benchmarks: they refuse to run without CUDA, bench_pretrain's runs of pretrain.py parse, and the GPU check
runs end to end on the CPU (its dry run)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run_script


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
@pytest.mark.parametrize("script", ["bench_kernels.py", "bench_rollout.py", "bench_pretrain.py"])
def test_benchmarks_refuse_without_cuda(script):
    p = subprocess.run([sys.executable, os.path.join("bench", script)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and "needs a CUDA GPU" in p.stderr and "Nothing was measured" in p.stderr


def test_bench_pretrain_run_parses(tmp_path):
    """The exact command line the benchmark gives pretrain.py, on a tiny model on the CPU: its log parses."""
    sys.path.insert(0, ROOT)
    from bench.bench_pretrain import parse_log, pretrain_command, synthetic_data
    kw = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, ffn_hidden=128, seq_len=64, batch_size=4,
              rope_theta=500000.0, activation_checkpointing=True)
    synthetic_data(str(tmp_path), 64 * 4 * 12)
    cmd = pretrain_command(str(tmp_path), str(tmp_path / "out"), 12, 3, "torch", False, kw)
    out = run_script(cmd[1:], timeout=300)
    figures = parse_log(out, skip=1)
    assert figures["steps_logged"] == [3, 6, 9, 12]
    assert figures["tokens_per_sec"] > 0 and figures["peak_memory_gib"] > 0
    assert abs(figures["final_loss"] - 10.83) < 0.2  # ln(50304): uniform random tokens are unlearnable
    assert not os.path.exists(tmp_path / "out" / "ckpt.pt")  # ckpt_interval=0 saves nothing


def _repo_copy_without_git(dst):
    # the GPU machine may get the tree without .git (and without prepared data)
    shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns(".git", "bin", "__pycache__", "out", "results", "*.pt"))


def test_gpu_check_dry_run(tmp_path):
    """bench/gpu_check.sh end to end on the CPU with tiny shapes, the way the GPU machine will run it: no .git,
    and datasets / wandb not importable (here: made to fail on import). Every section writes its JSON with the
    commit from the command line; at most 8 files, no subfolders; --only reruns one section."""
    repo = tmp_path / "repo"
    _repo_copy_without_git(repo)
    blocked = tmp_path / "blocked"
    for name in ("datasets", "wandb"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is not on the GPU machine')\n")
    env = {**os.environ, "PYTHONPATH": str(blocked), "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    out = tmp_path / "gpu_out"
    p = subprocess.run(["bash", "bench/gpu_check.sh", str(out), "abc1234", "--dry-run"], cwd=repo, env=env,
                       capture_output=True, text=True, timeout=900)
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-4000:]
    files = sorted(os.listdir(out))
    assert len(files) <= 8 and all((out / f).is_file() for f in files), files
    from bench.gpu_check import SECTIONS
    data = {s: json.loads((out / f"{s}.json").read_text()) for s in SECTIONS}
    for s, d in data.items():
        assert d["status"] == "ok" and d["commit"] == "abc1234" and d["dry_run"], (s, d.get("status"))
    assert data["env"]["packages"]["datasets"] and data["env"]["git"] is False  # found on the path, never imported
    assert data["tests"]["counts"]["passed"] >= 3 and not data["tests"]["failed"]
    attn = {r["name"] for r in data["attention"]["results"] if "fwd_ms" in r}
    assert attn == {"triton", "torch_sdpa"}, data["attention"]["results"]
    flce = {r["name"]: r for r in data["flce"]["results"]}
    assert set(flce) == {"fused_triton", "fused_torch_chunks", "unfused_eager"}
    assert all(r["loss_diff_vs_first"] < 1e-4 and r["grad_rel_err_vs_first"] < 1e-4 for r in flce.values()), flce
    (run,) = data["pretrain"]["results"]
    assert run["returncode"] == 0 and run["tokens_per_sec"] > 0, run
    assert data["rollout"]["results"][0]["tokens_per_s"] > 0
    assert "=== rollout: ok" in (out / "gpu_check.log").read_text()

    # --only: one section again (appending to the log), the others untouched
    before = (out / "flce.json").read_text()
    p = subprocess.run(["bash", "bench/gpu_check.sh", str(out), "def5678", "--only", "env", "--dry-run"], cwd=repo,
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert json.loads((out / "env.json").read_text())["commit"] == "def5678"
    assert (out / "flce.json").read_text() == before


def test_gpu_check_usage_errors(tmp_path):
    p = subprocess.run(["bash", "bench/gpu_check.sh", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2 and "usage: bash bench/gpu_check.sh OUT_DIR COMMIT" in p.stderr
    p = subprocess.run(["bash", "bench/gpu_check.sh", str(tmp_path), "abc", "--only", "nope", "--dry-run"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "unknown section(s) ['nope']" in p.stderr


def test_gpu_check_stubs_let_pretrain_import_without_tiktoken(tmp_path):
    # the GPU machine may lack tiktoken/regex: pretrain.py must still start on synthetic data (no tokenizer)
    sys.path.insert(0, ROOT)
    from bench.gpu_check import _stub_missing, write_stub
    assert _stub_missing(["surely_not_a_module_xyz", "json"], str(tmp_path)) == ["surely_not_a_module_xyz"]
    for name in ("tiktoken", "regex"):  # stand-ins first on the path, as if the real ones were missing
        write_stub(name, str(tmp_path))
    code = ("import data.tokenizer, tiktoken\n"
            "try:\n    tiktoken.get_encoding('gpt2')\nexcept ImportError as e:\n    print('stand-in:', e)\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert p.returncode == 0 and "stand-in: tiktoken is not installed" in p.stdout, p.stderr[-2000:]


def test_bench_cpu_runs_and_breaks_the_step_down():
    """The CPU benchmark on a tiny model: step times and the profiler's breakdown by category (it imports the
    model's and the optimizer's modules, which moved once without it noticing)."""
    out = run_script(["bench/bench_cpu.py", "--steps=2", "--n_layer=1", "--n_embd=64", "--n_head=2", "--n_kv_head=2",
                      "--seq_len=32", "--batch_size=2", "--threads=1"], timeout=300)
    assert "step" in out and "ms median of 2" in out and "breakdown of 2 profiled steps" in out
    for category in ("matmul", "attention", "elementwise/other"):
        assert category in out, out[-2000:]
