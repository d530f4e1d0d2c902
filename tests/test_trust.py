"""No silent wrong results, no lost runs (the audit's findings, each against an independent reference)."""

import errno
import hashlib
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run_script, tiny_config


def run_failing(args, timeout=300):
    p = subprocess.run([sys.executable] + args, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"})
    assert p.returncode != 0, p.stdout[-2000:]
    return p.stdout + p.stderr


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def zloss_ckpt(tmp_path_factory):
    """A tiny checkpoint pretrained with z-loss and dropout: neither may leak into log-probs or references."""
    from checkpoint import checkpoint_dict, save_checkpoint
    from model import Transformer
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("zloss") / "ckpt.pt")
    save_checkpoint(path, checkpoint_dict(Transformer(tiny_config(z_loss=0.1, dropout=0.1)), "default", step=0))
    return path


# --- 1, 4: log-probs are log-probs; policy == reference gives exactly log 2 / a ratio of 1 -------------------

def test_dpo_first_training_loss_is_log2_with_zloss_and_dropout_checkpoint(zloss_ckpt, tmp_path):
    out = run_script(["dpo.py", f"--init_from={zloss_ckpt}", f"--out_dir={tmp_path}", "--task_pairs=16",
                      "--task_val_pairs=4", "--sampled_pairs=0", "--eval_tasks=0", "--batch_size=8", "--max_steps=1",
                      "--log_interval=1", "--rpo_alpha=0.0", "--kernels=torch"])
    # logged step 1: the mean loss of the pairs the first update trains on, before it: policy == reference
    assert re.search(r"^step 1/1 \| loss 0\.6931 ", out, re.M), out[-1500:]


def test_grpo_training_logprobs_equal_the_samplers_with_zloss_checkpoint(zloss_ckpt, tmp_path):
    out = run_script(["grpo.py", "configs/grpo_tiny.py", f"--init_from={zloss_ckpt}", f"--out_dir={tmp_path}",
                      "--max_steps=1", "--lora_r=4", "--beta=0.1"])
    line = next(ln for ln in out.splitlines() if ln.startswith("step 1/1"))
    assert float(re.search(r"logp_diff ([\d.e+-]+)", line).group(1)) < 1e-5, line  # was ~8e-3 with z-loss in it
    assert float(re.search(r"\| kl ([\d.]+)", line).group(1)) == 0.0, line  # adapters off == policy at step 1


# --- 3: NEFTune scales by each conversation's own length --------------------------------------------------

def test_neftune_scale_is_per_conversation():
    from sft import neftune_scale
    # one packed row: conversations of 3, 2 and 1 tokens; one padded row: a 4-token conversation + 2 pads
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2], [0, 0, 0, 0, 1, 1]])
    L = torch.tensor([[3, 3, 3, 2, 2, 1], [4, 4, 4, 4, 2, 2]], dtype=torch.float)  # by hand
    torch.testing.assert_close(neftune_scale(doc_ids, 5.0, 64)[..., 0], 5.0 / torch.sqrt(L * 64))


# --- 7: documented paths that crashed --------------------------------------------------------------------

@pytest.fixture(scope="module")
def adapter_ckpt(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft_lora")
    run_script(["sft.py", f"--init_from={tiny_ckpt}", f"--out_dir={out}", "--lora_r=4", "--max_steps=2",
                "--batch_size=2", "--n_train=50", "--val_size=4", "--eval_accuracy_size=2", "--eval_samples=0",
                "--kernels=torch"])
    return str(out / "ckpt.pt")


@pytest.mark.parametrize("stage", ["dpo", "reward"])
def test_preference_stages_start_from_an_adapter_checkpoint(stage, adapter_ckpt, tmp_path):
    extra = ["--sampled_pairs=0", "--eval_tasks=0"] if stage == "dpo" else []
    out = run_script([f"{stage}.py", f"--init_from={adapter_ckpt}", f"--out_dir={tmp_path}", "--task_pairs=16",
                      "--task_val_pairs=4", "--batch_size=4", "--max_steps=1", "--kernels=torch", *extra])
    assert "saved" in out


def test_grpo_with_a_learned_reward_only(tiny_ckpt, tmp_path):
    from checkpoint import checkpoint_dict, save_checkpoint
    from model import RewardModel, Transformer
    torch.manual_seed(0)
    rm = RewardModel(Transformer(tiny_config()))
    torch.nn.init.normal_(rm.score_head.weight, std=1.0)
    save_checkpoint(str(tmp_path / "rm.pt"), checkpoint_dict(rm, "default"))
    out = run_script(["grpo.py", "configs/grpo_tiny.py", f"--init_from={tiny_ckpt}", f"--out_dir={tmp_path / 'g'}",
                      "--reward_funcs=()", f"--reward_model={tmp_path / 'rm.pt'}", "--max_steps=1"])
    assert "step 1/1" in out and "| rm " in out


# --- 8: a non-finite step never overwrites the last good checkpoint --------------------------------------

def test_nonfinite_gradient_with_finite_loss_is_caught():
    from optim import mark_nonfinite, stop_if_nonfinite
    first = torch.tensor(-1)
    first = mark_nonfinite(first, 3, torch.tensor(2.5), torch.tensor(1.0))  # fine
    assert int(first) == -1
    first = mark_nonfinite(first, 4, torch.tensor(2.5), torch.tensor(float("nan")))  # finite loss, NaN gradient
    first = mark_nonfinite(first, 5, torch.tensor(float("inf")), torch.tensor(1.0))
    assert int(first) == 4  # the first bad step is kept
    with pytest.raises(SystemExit, match="non-finite loss or gradient norm at step 5"):
        stop_if_nonfinite(first)
    m = torch.nn.Linear(2, 2)
    with torch.no_grad():
        m.weight[0, 0] = float("nan")
    with pytest.raises(SystemExit, match="non-finite weights"):
        stop_if_nonfinite(torch.tensor(-1), m)  # before a save, the weights themselves are checked


def test_diverging_sft_stops_without_saving(overflowing_ckpt, tmp_path):
    # Divergence made deterministic by a checkpoint whose logits overflow fp32 (conftest.overflowing_ckpt): the
    # first step's loss is NaN on every machine. The run must stop at once, say why, and write nothing.
    init = overflowing_ckpt
    out_dir = tmp_path / "run"
    out = run_failing(["sft.py", f"--init_from={init}", f"--out_dir={out_dir}", "--max_steps=5",
                       "--ckpt_interval=1", "--log_interval=1", "--batch_size=2", "--n_train=50", "--val_size=4",
                       "--eval_accuracy_size=2", "--eval_samples=0", "--kernels=torch"])
    assert "non-finite loss or gradient norm at step 1" in out and "Traceback" not in out, out[-1500:]
    assert not (out_dir / "ckpt.pt").exists()


# --- 9: a LoRA run never destroys its base, and its adapters refuse a base that changed --------------------

def test_lora_run_refuses_to_overwrite_its_base(tiny_ckpt, tmp_path):
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    shutil.copy(tiny_ckpt, base_dir / "ckpt.pt")
    before = sha(base_dir / "ckpt.pt")
    out = run_failing(["sft.py", f"--init_from={base_dir / 'ckpt.pt'}", f"--out_dir={base_dir}", "--lora_r=4",
                       "--max_steps=1", "--kernels=torch"])
    assert "would overwrite it" in out and sha(base_dir / "ckpt.pt") == before


def test_adapter_checkpoint_finds_its_base_from_anywhere_and_refuses_a_changed_one(adapter_ckpt, tmp_path):
    from checkpoint import CheckpointError, load_checkpoint, load_model
    ck = load_checkpoint(adapter_ckpt)
    assert os.path.isabs(ck["base_checkpoint"]) and ck["base_fingerprint"]
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)  # the base is stored as an absolute path
        load_model(adapter_ckpt)
    finally:
        os.chdir(cwd)
    # the same adapters against a base that was retrained: a replaced file with other weights
    moved = dict(ck, base_checkpoint=str(tmp_path / "base.pt"))
    from checkpoint import checkpoint_dict, save_checkpoint
    from model import Transformer
    torch.manual_seed(1)
    save_checkpoint(str(tmp_path / "base.pt"), checkpoint_dict(Transformer(tiny_config()), "default"))
    with pytest.raises(CheckpointError, match="has changed since"):
        load_model(moved)


# --- 10: a full disk or an unwritable out_dir loses nothing ------------------------------------------------

def test_full_disk_leaves_the_previous_checkpoint_and_no_temp_file(tmp_path, monkeypatch):
    from checkpoint import save_checkpoint
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, {"step": 1})
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial")  # a write that got some way before the disk filled up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SystemExit, match="no space left on the device"):
        save_checkpoint(path, {"step": 2})
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(path, weights_only=True) == {"step": 1} and not os.path.exists(path + ".tmp")


def test_unwritable_out_dir_is_refused_before_training(tiny_ckpt, tmp_path):
    (tmp_path / "a_file").write_text("x")
    out = run_failing(["sft.py", f"--init_from={tiny_ckpt}", f"--out_dir={tmp_path / 'a_file' / 'sub'}",
                       "--max_steps=1", "--kernels=torch"])
    assert "is not writable" in out and "step 1/" not in out and "Traceback" not in out
