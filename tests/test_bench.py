"""The GPU benchmarks: they refuse to run without CUDA, and bench_pretrain's runs of pretrain.py parse."""

import os
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
