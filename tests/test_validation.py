"""Every bad input stops at once with a message that says what, where and how to fix it (issue: clear errors).

Config values are checked in-process against each script's own declared choices and ranges (importing a stage
script runs nothing: its globals and their _choices/_ranges are all there is at module level); one real command
line per family checks the exit code and the message."""

import os
import subprocess
import sys

import pytest
import torch

import chat
import dpo
import grpo
import pretrain
import reward
import sft
from configs import check_resume, configure
from conftest import ROOT, tiny_config

SCRIPTS = dict(pretrain=pretrain, sft=sft, reward=reward, dpo=dpo, grpo=grpo, chat=chat)


def config_error(script, *argv):
    g = dict(vars(SCRIPTS[script]))
    with pytest.raises(SystemExit) as e:
        configure(g, list(argv))
    return str(e.value)


@pytest.mark.parametrize("script, arg, words", [
    ("pretrain", "--n_head=0", "n_head=0 is out of range"),
    ("pretrain", "--log_interval=0", "log_interval=0 is out of range"),
    ("pretrain", "--seq_len=0", "seq_len=0"),
    ("pretrain", "--batch_size=0", "batch_size=0"),
    ("pretrain", "--grad_accum=0", "grad_accum=0"),
    ("pretrain", "--max_steps=-5", "max_steps=-5"),
    ("pretrain", "--lr_schedule=cosin", "Did you mean 'cosine'"),
    ("pretrain", "--parallel=fsdpp", "choose one of 'ddp', 'fsdp'"),
    ("pretrain", "--device=gpu", "device='gpu' is not valid"),
    ("pretrain", "--kernels=cuda", "kernels='cuda'"),
    ("sft", "--max_steps=-1", "max_steps=-1 is out of range"),
    ("sft", "--lora_targets=q,vv", "unknown LoRA target(s) ['vv']"),
    ("grpo", "--max_steps=-1", "max_steps=-1"),
    ("grpo", "--num_generations=0", "num_generations=0"),  # 1 is valid (gae, reinforce++): test_ppo checks the rest
    ("grpo", "--reward_funcs=('exact','fromat')", "Did you mean 'format'"),
    ("grpo", "--loss_type=drgrpo", "loss_type='drgrpo'"),
    ("grpo", "--top_p=1.5", "top_p=1.5"),
    ("dpo", "--loss_type=robustt", "Did you mean 'robust'"),
    ("dpo", "--label_smoothing=0.5", "label_smoothing=0.5 is out of range: it must be in [0, 0.5)"),
    ("dpo", "--max_steps=0", "max_steps=0"),
    ("reward", "--val_fraction=1.0", "val_fraction=1.0"),
    ("chat", "--temperature=-1", "temperature=-1"),
])
def test_bad_config_values_are_refused(script, arg, words):
    assert words in config_error(script, arg)


@pytest.mark.parametrize("script, args", [
    ("sft", ["--eval_interval=0", "--max_seq_len=0", "--ckpt_interval=0", "--grad_clip=0"]),
    ("grpo", ["--eval_interval=0", "--top_k=0", "--ckpt_interval=0", "--grad_clip=0", "--reward_funcs=()"]),
    ("dpo", ["--max_steps=-1", "--max_len=-1", "--label_smoothing=0.1"]),
    ("reward", ["--max_steps=-1", "--max_records=-1"]),
    ("pretrain", ["--ckpt_interval=0", "--halt_at_step=-1", "--logit_softcap=None"]),
])
def test_documented_sentinels_stay_valid(script, args):
    configure(dict(vars(SCRIPTS[script])), args)


def test_cuda_without_cuda_is_an_error_not_a_cpu_run():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from distributed import setup_distributed
    with pytest.raises(SystemExit, match="device='cuda' but this PyTorch sees no CUDA"):
        setup_distributed("cuda")


# --- checkpoints ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("content", [b"", b"PK\x03\x04trunc", os.urandom(4096)], ids=["empty", "truncated", "random"])
def test_corrupt_checkpoint_names_the_file(content, tmp_path):
    from checkpoint import CheckpointError, load_model
    path = tmp_path / "ckpt.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=f"checkpoint {path} is corrupt or incomplete") as e:
        load_model(str(path))
    assert "weights_only=False" not in str(e.value)


def test_truncated_real_checkpoint(tiny_ckpt, tmp_path):
    from checkpoint import CheckpointError, load_checkpoint
    data = open(tiny_ckpt, "rb").read()
    (tmp_path / "ckpt.pt").write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or incomplete"):
        load_checkpoint(str(tmp_path))  # a directory holding ckpt.pt works where a path does


def test_reward_model_as_policy_and_vocab_mismatch(tmp_path):
    from checkpoint import CheckpointError, check_vocab, checkpoint_dict, load_model, save_checkpoint
    from data.tokenizer import get_tokenizer
    from model import RewardModel, Transformer
    save_checkpoint(str(tmp_path / "rm.pt"), checkpoint_dict(RewardModel(Transformer(tiny_config())), "default"))
    with pytest.raises(CheckpointError, match="is a reward model") as e:
        load_model(str(tmp_path / "rm.pt"))
    assert len(str(e.value).splitlines()) == 1  # a sentence, not a dump of state-dict keys
    with pytest.raises(CheckpointError, match="has 8192 tokens but the model's embedding only 1000"):
        check_vocab(Transformer(tiny_config(vocab_size=1000)), get_tokenizer("default"), "x.pt")


def test_resume_refuses_a_changed_shape_and_warns_on_a_changed_schedule(capsys):
    ckpt = dict(optimizer={}, config=dict(n_layer=4, data="embedded", max_steps=300, lr=3e-3))
    with pytest.raises(SystemExit, match=r"n_layer=8 \(checkpoint: 4\)"):
        check_resume(ckpt, dict(n_layer=8, data="embedded", max_steps=300, lr=3e-3), ("n_layer", "data"),
                     ("max_steps", "lr"), "out/x/ckpt.pt")
    check_resume(ckpt, dict(n_layer=4, data="embedded", max_steps=600, lr=3e-3), ("n_layer", "data"),
                 ("max_steps", "lr"), "out/x/ckpt.pt")
    assert "max_steps 300 -> 600" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="finished run"):
        check_resume(dict(config={}, step=300), {}, (), (), "out/x/ckpt.pt")


# --- one real command line per family ---------------------------------------------------------------------

def run_failing(args):
    p = subprocess.run([sys.executable] + args, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"})
    assert p.returncode != 0, p.stdout[-1500:]
    out = p.stdout + p.stderr
    assert "Traceback" not in out, out[-3000:]
    return out


def test_command_line_config_value():
    assert "lr_schedule='cosin' is not valid" in run_failing(["pretrain.py", "--lr_schedule=cosin"])


def test_command_line_bad_data_file(tiny_ckpt, tmp_path):
    path = tmp_path / "chats.jsonl"
    good = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
    path.write_text(good * 3 + '{"messages": [oops\n' + good)
    out = run_failing(["sft.py", f"--init_from={tiny_ckpt}", f"--data={path}", f"--out_dir={tmp_path / 'o'}"])
    assert str(path) in out and "line 4" in out and "skip_bad=True" in out


def test_command_line_corrupt_checkpoint(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"garbage")
    out = run_failing(["chat.py", f"--ckpt={tmp_path}", "--prompt=hi"])
    assert f"{tmp_path / 'ckpt.pt'} is corrupt or incomplete" in out


def test_command_line_resume_with_a_changed_shape(tmp_path):
    from data.prepare import prepare
    prepare("embedded", str(tmp_path / "tok"), max_docs=20, val_fraction=0.2, verbose=False)
    tiny = [f"--data={tmp_path / 'tok'}", f"--out_dir={tmp_path / 'run'}", "--n_layer=1", "--n_head=2",
            "--n_kv_head=1", "--n_embd=32", "--seq_len=32", "--batch_size=2", "--max_steps=4", "--halt_at_step=2",
            "--eval_iters=1", "--sample_tokens=0", "--kernels=torch"]
    subprocess.run([sys.executable, "pretrain.py", *tiny], cwd=ROOT, check=True, capture_output=True, timeout=300)
    out = run_failing(["pretrain.py", *tiny, "--init_from=resume", "--n_layer=2"])
    assert "n_layer=2 (checkpoint: 1)" in out and "cannot change on resume" in out
