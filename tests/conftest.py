"""Shared fixtures: a tiny random checkpoint in the format every stage writes, and a way to run a stage script."""

import os
import subprocess
import sys

import pytest
import torch

# Without CUDA the Triton kernels run in Triton's CPU interpreter. triton.jit reads this when kernels.py
# is imported, so it is set here, before any test module imports model.py or kernels.py.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def tiny_config(**kw):
    from data.tokenizer import get_tokenizer
    from model import ModelConfig
    base = dict(vocab_size=get_tokenizer("default").vocab_size, n_layer=2, n_head=4, n_kv_head=2,
                n_embd=64, max_seq_len=256, kernels="torch")
    return ModelConfig(**{**base, **kw})


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """Path of a tiny random-weight checkpoint (default tokenizer), as pretrain.py would write it."""
    from checkpoint import checkpoint_dict, save_checkpoint
    from model import Transformer
    torch.manual_seed(0)
    model = Transformer(tiny_config())
    path = str(tmp_path_factory.mktemp("ckpt") / "ckpt.pt")
    save_checkpoint(path, checkpoint_dict(model, "default", step=0))
    return path


@pytest.fixture(scope="session")
def overflowing_ckpt(tmp_path_factory):
    """A checkpoint with finite weights whose logits overflow fp32 (an untied output head at 3e38; the largest
    fp32 is 3.4e38), so the first training step's loss is NaN on every machine. (A huge lr is not a reliable
    way to diverge: the RMSNorms saturate to a finite loss of log V on some CPUs.)"""
    from checkpoint import checkpoint_dict, save_checkpoint
    from model import Transformer
    torch.manual_seed(0)
    model = Transformer(tiny_config(tie_embeddings=False))
    with torch.no_grad():
        model.lm_head.weight.fill_(3e38)
    path = str(tmp_path_factory.mktemp("overflowing") / "ckpt.pt")
    save_checkpoint(path, checkpoint_dict(model, "default", step=0))
    return path


def run_script(args, timeout=600, env=None, cwd=ROOT):
    """Run `python <args>` (or torchrun when args[0] == "torchrun") from the repo root; return stdout+stderr.
    Fails the test with the output when the exit code is not 0."""
    cmd = args if args[0] == "torchrun" else [sys.executable] + list(args)
    if args[0] == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run"] + list(args[1:])
    full_env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", **(env or {})}
    p = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"{' '.join(cmd)} exited {p.returncode}:\n{out[-4000:]}"
    return out
