"""A local Hugging Face model directory works wherever a checkpoint path works: the README's commands for an
open instruct model (SFT, reward, DPO, GRPO, chat, continued pretraining, export), run with the same flags on a
tiny Qwen2.5-style directory built here (random weights, a tokenizer trained in the test, the published chat
template). Nothing is downloaded."""

import json
import os

import pytest
import torch

from conftest import run_script

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    from hf_tokenizers import family_dir
    path = str(tmp_path_factory.mktemp("qwen") / "Qwen2.5-tiny-Instruct")
    family_dir(path, "qwen2.5")  # tokenizer.json, tokenizer_config.json (ChatML template), generation_config.json
    vocab = json.load(open(os.path.join(path, "tokenizer.json")))
    n_vocab = max(vocab["model"]["vocab"].values()) + 1 + len(vocab["added_tokens"])
    cfg = transformers.Qwen2Config(vocab_size=64 * ((n_vocab + 63) // 64), hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=256, tie_word_embeddings=True, rope_theta=1e6)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path


SMALL = ["--kernels=torch", "--log_interval=1"]


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def test_the_readme_commands_on_an_hf_directory(qwen_dir, tmp_path):
    """The README's config files and flags for an open model, on local files in the hub datasets' schemas
    (no_robots-style messages, UltraFeedback-binarized pairs, openai/gsm8k), shrunk to a few steps."""
    chats = write_jsonl(tmp_path / "chats.jsonl", [{"messages": [
        {"role": "user", "content": f"Name a number after {i}."}, {"role": "assistant", "content": str(i + 1)}]}
        for i in range(30)])
    prefs = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": f"What is {i} + 1?", "chosen": [
        {"role": "user", "content": f"What is {i} + 1?"}, {"role": "assistant", "content": str(i + 1)}],
        "rejected": [{"role": "user", "content": f"What is {i} + 1?"}, {"role": "assistant", "content": str(i)}],
        "score_chosen": 8.0, "score_rejected": 3.0} for i in range(20)])
    gsm8k = write_jsonl(tmp_path / "gsm8k.jsonl", [{"question": f"Tom has {i} apples and buys 2. How many?",
                                                   "answer": f"{i} + 2 = {i + 2}\n#### {i + 2}"} for i in range(12)])
    tiny = ["--compile=False", "--kernels=torch", "--log_interval=1", "--max_steps=2", "--eval_interval=0"]
    sft = run_script(["sft.py", "configs/sft_gpu.py", f"--init_from={qwen_dir}", f"--data={chats}",
                      f"--out_dir={tmp_path / 'sft'}", "--val_size=4", "--max_seq_len=128", "--batch_size=2",
                      "--eval_accuracy_size=0", *tiny])
    assert "step 2/2 | loss" in sft and f"tokenizer {qwen_dir}" in sft
    ckpt = torch.load(tmp_path / "sft" / "ckpt.pt", weights_only=True)
    assert ckpt["tokenizer"] == qwen_dir  # the stages after it read the same tokenizer and chat template
    run_script(["dpo.py", "configs/dpo_ultrafeedback.py", f"--init_from={tmp_path / 'sft'}", f"--data={prefs}",
                f"--val_data={prefs}", f"--out_dir={tmp_path / 'dpo'}", "--batch_size=4", "--grad_accum=1",
                "--max_len=128", "--activation_checkpointing=False", "--eval_interval=100", *tiny[:4]])
    run_script(["reward.py", "configs/reward_ultrafeedback.py", f"--init_from={tmp_path / 'sft'}", f"--data={prefs}",
                f"--val_data={prefs}", f"--out_dir={tmp_path / 'rm'}", "--batch_size=4", "--grad_accum=1",
                "--max_len=128", "--activation_checkpointing=False", "--eval_interval=100", *tiny[:4]])
    run_script(["grpo.py", "configs/grpo_gsm8k.py", f"--init_from={tmp_path / 'sft'}", f"--data_path={gsm8k}",
                f"--eval_data_path={gsm8k}", f"--out_dir={tmp_path / 'grpo'}", "--max_new_tokens=16",
                "--num_generations=4", "--prompts_per_step=2", "--micro_batch_size=8", "--eval_size=4", *tiny])
    reply = run_script(["chat.py", f"--ckpt={tmp_path / 'grpo'}", "--prompt=What is 2 + 3?", "--temperature=0",
                        "--max_new_tokens=8", "--kernels=torch"])
    assert reply.endswith("\n")


def test_export_after_sft_loads_in_transformers_with_our_logits(qwen_dir, tmp_path):
    run_script(["sft.py", f"--init_from={qwen_dir}", f"--out_dir={tmp_path / 'sft'}", "--max_steps=1",
                "--batch_size=2", "--n_train=20", "--val_size=2", "--eval_accuracy_size=0", "--eval_samples=0",
                "--max_seq_len=128", "--lora_r=4", "--merge_lora_on_save=True", *SMALL])
    run_script(["hf.py", "export", f"--ckpt={tmp_path / 'sft' / 'ckpt.pt'}", f"--out={tmp_path / 'hf'}"])
    assert os.path.exists(tmp_path / "hf" / "tokenizer.json")  # the source's tokenizer files, copied verbatim
    from checkpoint import load_model
    ours, _ = load_model(str(tmp_path / "sft" / "ckpt.pt"))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    x = torch.randint(0, 500, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours.eval()(x)[0], rtol=1e-4, atol=1e-4)


def test_continued_pretraining_from_an_hf_directory(qwen_dir, tmp_path):
    from data.prepare import prepare
    prepare("embedded", str(tmp_path / "tok"), tokenizer=qwen_dir, max_docs=20, val_fraction=0.2, verbose=False)
    out = run_script(["pretrain.py", f"--init_from={qwen_dir}", f"--data={tmp_path / 'tok'}",
                      f"--out_dir={tmp_path / 'pt'}", "--max_steps=2", "--seq_len=64", "--batch_size=2",
                      "--eval_iters=1", "--sample_tokens=0", "--ckpt_interval=2", "--warmup_steps=0", *SMALL])
    assert "step 2/2 | loss" in out


def test_fsdp_sft_shards_an_hf_model_at_load_and_matches_one_process(qwen_dir, tmp_path):
    import re
    common = ["sft.py", f"--init_from={qwen_dir}", "--max_steps=2", "--n_train=40", "--val_size=4",
              "--eval_accuracy_size=0", "--eval_samples=0", "--max_seq_len=128", "--batch_size=1", *SMALL]
    one = run_script(common + [f"--out_dir={tmp_path / 'one'}", "--grad_accum=2"])
    two = run_script(["torchrun", "--standalone", "--nproc_per_node=2", *common, f"--out_dir={tmp_path / 'two'}",
                      "--parallel=fsdp"])
    assert "FSDP-sharded" in two  # the meta-device, shard-by-shard load path (hf.load_hf) was taken
    loss = lambda log: [float(v) for v in re.findall(r"^step \d+/2 \| loss ([\d.]+)", log, re.M)]
    assert len(loss(one)) == 2 and loss(one) == pytest.approx(loss(two), abs=2e-4)
