"""pretrain.py end to end on CPU: the loss falls, resume is exact, DDP/FSDP match one process, bad configs fail clearly."""

import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, run_script
from model import ModelConfig, Transformer

TINY = ["--n_layer=2", "--n_head=4", "--n_kv_head=2", "--n_embd=64", "--seq_len=64", "--batch_size=4",
        "--warmup_steps=5", "--lr=3e-3", "--min_lr=3e-4", "--eval_iters=2", "--sample_tokens=8", "--kernels='torch'"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from data.prepare import prepare
    out = str(tmp_path_factory.mktemp("tokens"))
    prepare("embedded", out, max_docs=40, val_fraction=0.1, verbose=False)
    return out


def losses(out):
    return {int(s): float(l) for s, l in re.findall(r"^step (\d+)/\d+ \| loss ([\d.]+)", out, re.M)}


def test_loss_falls(data_dir, tmp_path):
    out = run_script(["pretrain.py", f"--data={data_dir}", f"--out_dir={tmp_path}", "--max_steps=40",
                      "--log_interval=5", "--eval_interval=40", "--ckpt_interval=40", "--peak_flops=1e8"] + TINY)
    curve = losses(out)
    assert curve[40] < curve[5] - 1.0, curve
    assert "val loss" in out and "tok/s" in out and "eta" in out
    # MFU = FLOPs per token (6 per weight + attention, by hand in tests/test_model.py) x tokens/s / peak
    fpt = Transformer(ModelConfig(vocab_size=8192, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                                  max_seq_len=64)).flops_per_token(64)
    for tok_s, pct in re.findall(r"tok/s ([\d,]+) \| mfu ([\d.]+)%", out):
        assert float(pct) / 100 == pytest.approx(fpt * float(tok_s.replace(",", "")) / 1e8, rel=0.02, abs=1e-3)
    assert os.path.exists(tmp_path / "ckpt.pt")


def test_resume_gives_identical_losses(data_dir, tmp_path):
    common = [f"--data={data_dir}", "--max_steps=16", "--log_interval=1", "--eval_interval=100",
              "--ckpt_interval=8", "--dropout=0.1"] + TINY  # dropout: the RNG state must be restored too
    full = losses(run_script(["pretrain.py", f"--out_dir={tmp_path / 'a'}"] + common))
    first = losses(run_script(["pretrain.py", f"--out_dir={tmp_path / 'b'}", "--halt_at_step=8"] + common))
    second = losses(run_script(["pretrain.py", f"--out_dir={tmp_path / 'b'}", "--init_from='resume'"] + common))
    assert max(first) == 8 and min(second) == 9
    assert {**first, **second} == full


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_torchrun_matches_single_process(data_dir, tmp_path, parallel):
    # the same global batch of 4 rows: one process x 4, or two ranks x 2 (rank r takes rows 2r, 2r+1)
    common = [f"--data={data_dir}", "--max_steps=8", "--log_interval=1", "--eval_interval=8",
              "--ckpt_interval=100"] + TINY
    single = losses(run_script(["pretrain.py", f"--out_dir={tmp_path / 's'}"] + common))
    out = run_script(["torchrun", "--standalone", "--nproc_per_node=2", "pretrain.py", f"--out_dir={tmp_path / 'd'}",
                      f"--parallel='{parallel}'"] + common + ["--batch_size=2"])
    multi = losses(out)
    assert multi.keys() == single.keys()
    for s in single:
        assert multi[s] == pytest.approx(single[s], abs=2e-3), (s, single, multi)
    if parallel == "ddp":
        assert "replicas identical" in out  # every rank ends with the same parameters


def run_failing(args):
    p = subprocess.run([sys.executable] + args, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "WANDB_MODE": "disabled"})
    assert p.returncode != 0
    return p.stdout + p.stderr


def test_bad_config_key_and_value():
    out = run_failing(["pretrain.py", "--n_layr=2"])
    assert "unknown key 'n_layr'" in out and "n_layer" in out and "Traceback" not in out
    out = run_failing(["pretrain.py", "--batch_size=big"])
    assert "'batch_size' (from --batch_size) expects int" in out
    out = run_failing(["pretrain.py", "--n_embd=100", "--n_head=6"])
    assert "config error: n_embd=100 must be divisible by n_head=6" in out and "Traceback" not in out
    out = run_failing(["pretrain.py", "configs/does_not_exist.py"])
    assert "cannot read config file configs/does_not_exist.py" in out


def test_nonfinite_loss_stops_without_saving(data_dir, overflowing_ckpt, tmp_path):
    # continued pretraining from a checkpoint whose logits overflow: the loss is NaN at step 1 on every machine
    out = run_failing(["pretrain.py", f"--data={data_dir}", f"--out_dir={tmp_path}", f"--init_from={overflowing_ckpt}",
                       "--max_steps=20", "--log_interval=5", "--ckpt_interval=5", "--seq_len=64", "--batch_size=4",
                       "--eval_iters=2", "--sample_tokens=8", "--kernels=torch"])
    assert "non-finite loss or gradient norm at step 1" in out and "Traceback" not in out, out[-2000:]
    assert not os.path.exists(tmp_path / "ckpt.pt")
