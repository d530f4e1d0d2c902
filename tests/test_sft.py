"""SFT: packing and accumulation are loss/gradient-equivalent to the naive computation, LoRA behaves, and
sft.py trains (single process, DDP) and reports bad data the documented way."""

import copy
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run_script, tiny_config
from data import tasks
from data.sft_data import collate_packed, micro_batches, packed_rows, tokenize_conversations
from data.tokenizer import get_tokenizer
from checkpoint import load_checkpoint, load_model
from lora import apply_lora, lora_modules, merge_lora
from model import Transformer

MULTI = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 1 + 1?"},
         {"role": "assistant", "content": "2"}]


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer("default")


def _convs(n, seed=0):
    return [tasks.to_messages(ex) for ex in tasks.generate(n, "train", seed=seed)]


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return Transformer(tiny_config(**kw))


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_packing_is_loss_and_gradient_equivalent(tok):
    examples, _, _ = tokenize_conversations(_convs(7) + [MULTI], tok, max_seq_len=128)
    rows = [examples[:3], examples[3:5], examples[5:]]
    model = _model()
    # reference: every conversation on its own, no positions, no document mask
    ref = 0.0
    for x, y in examples:
        _, loss = model(torch.tensor([x]), torch.tensor([y]), reduction="sum")
        loss.backward()
        ref += loss.item()
    ref_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    mb = collate_packed(rows, 128, tok.pad_id)
    assert mb["idx"].shape == (3, 128)
    _, loss = model(mb["idx"], mb["targets"], positions=mb["positions"], doc_ids=mb["doc_ids"], reduction="sum")
    loss.backward()
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    for n, g in _grads(model).items():
        # fp32 rounding of sums in another order: judge each tensor relative to its own scale
        torch.testing.assert_close(g, ref_grads[n], rtol=1e-4, atol=1e-5 * ref_grads[n].abs().max().item(), msg=n)
    # the test can tell: without the document mask and positions, packed conversations see each other
    _, leaky = model(mb["idx"], mb["targets"], reduction="sum")
    assert abs(leaky.item() - ref) > 1e-4 * abs(ref)


def test_packed_rows_cover_every_example_once_per_epoch():
    import random
    lengths = [random.Random(i).randint(5, 60) for i in range(200)]
    rows = packed_rows(lengths, 128, random.Random(0))
    assert sorted(i for r in rows for i in r) == list(range(200))
    assert all(sum(lengths[i] for i in r) <= 128 for r in rows)
    assert sum(lengths) / (128 * len(rows)) > 0.8  # greedy filling leaves little padding


def test_padded_micro_batches_are_length_grouped(tok):
    examples, _, _ = tokenize_conversations(_convs(60) + [MULTI] * 4, tok, 256)
    it = micro_batches(examples, 8, 256, tok.pad_id, packing=False, seed=0)
    batches = [next(it) for _ in range(len(examples) // 8)]
    n_real = sum(int((b["idx"] != tok.pad_id).sum()) for b in batches)
    assert n_real == sum(len(x) for x, _ in examples)  # one epoch: every token once
    assert n_real / sum(b["idx"].numel() for b in batches) > 0.8


# -----------------------------------------------------------------------------
# LoRA

def test_lora_starts_at_base_merges_and_trains_only_adapters():
    base = _model()
    model = copy.deepcopy(base)
    names = apply_lora(model, "all", r=4, alpha=8)
    assert len(names) == 2 * 7
    x = torch.randint(0, 1000, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], base(x)[0], rtol=0, atol=0)  # B = 0 at init
    # only the adapters get gradients
    _, loss = model(x, x)
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_A" in n or "lora_B" in n for n in with_grad)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == with_grad
    # with non-zero B: merged == unmerged == W0 + (alpha/r) B A done by hand
    for m in lora_modules(model):
        torch.nn.init.normal_(m.lora_B, std=0.05)
    m0 = lora_modules(model)[0]
    w_expected = m0.base.weight + (8 / 4) * m0.lora_B @ m0.lora_A
    with torch.no_grad():
        unmerged = model(x)[0]
        merged_model = merge_lora(copy.deepcopy(model))
        torch.testing.assert_close(merged_model(x)[0], unmerged, rtol=1e-4, atol=1e-5)
        assert not (unmerged - base(x)[0]).abs().max() < 1e-4  # the adapters do change the output
    torch.testing.assert_close(merged_model.blocks[0].attn.q_proj.weight, w_expected.detach())
    assert not lora_modules(merged_model)


def _sft(tiny_ckpt, tmp_path, name, *extra, torchrun=False):
    out = str(tmp_path / name)
    args = ["sft.py", f"--init_from={tiny_ckpt}", f"--out_dir={out}", "--log_interval=1", "--eval_interval=0",
            "--eval_samples=0", *extra]
    return run_script(["torchrun", "--nproc_per_node=2", *args] if torchrun else args, timeout=300), \
        os.path.join(out, "ckpt.pt")


def _losses(log):
    return [float(v) for v in re.findall(r"^step \d+/\d+ \| loss ([0-9.]+)", log, re.M)]


def test_lora_sft_adapter_checkpoint_round_trip_and_merged_export(tiny_ckpt, tmp_path):
    common = ["--lora_r=4", "--lora_alpha=8", "--lora_targets=q,v,down", "--lora_dropout=0.0", "--lr=1e-2",
              "--max_steps=4", "--batch_size=2", "--n_train=200", "--val_size=10", "--eval_accuracy_size=5"]
    log, path = _sft(tiny_ckpt, tmp_path, "lora", *common)
    assert "adapter-only checkpoint" in log
    ck = load_checkpoint(path)
    assert "model" not in ck and ck["base_checkpoint"] == tiny_ckpt
    assert set(ck["lora_state"]) and all("lora_" in k for k in ck["lora_state"])
    assert len(ck["lora_state"]) == 2 * 2 * 3  # (A, B) x 2 layers x 3 targets
    adapted = load_model(path)[0]
    base = load_model(tiny_ckpt)[0]
    # the base weights are untouched, the adapters moved
    for k, v in base.state_dict().items():
        k2 = k.replace("q_proj.", "q_proj.base.").replace("v_proj.", "v_proj.base.").replace("down_proj.", "down_proj.base.")
        torch.testing.assert_close(adapted.state_dict()[k2], v, rtol=0, atol=0)
    assert all(m.lora_B.abs().max() > 0 for m in lora_modules(adapted))
    # merged export of the same (deterministic) run gives the same function as base + adapters
    log, merged_path = _sft(tiny_ckpt, tmp_path, "merged", *common, "--merge_lora_on_save=True")
    assert "saved full checkpoint" in log
    merged = load_model(merged_path)[0]
    assert not lora_modules(merged)
    x = torch.randint(0, 1000, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(merged(x)[0], adapted.eval()(x)[0], rtol=1e-4, atol=1e-4)
        assert (merged(x)[0] - base(x)[0]).abs().max() > 1e-4
    # the same run as 2 FSDP ranks x 1 conversation: only rank 0 receives the full weights to merge and save
    log, fsdp_path = _sft(tiny_ckpt, tmp_path, "merged_fsdp", *common, "--merge_lora_on_save=True", "--batch_size=1",
                          "--parallel=fsdp", torchrun=True)
    with torch.no_grad():
        torch.testing.assert_close(load_model(fsdp_path)[0](x)[0], merged(x)[0], rtol=1e-3, atol=1e-3)


# -----------------------------------------------------------------------------
# sft.py end to end

def test_sft_loss_falls(tiny_ckpt, tmp_path):
    log, path = _sft(tiny_ckpt, tmp_path, "full", "--max_steps=25", "--batch_size=4", "--lr=3e-3", "--warmup_steps=3",
                     "--n_train=1000", "--val_size=20", "--eval_accuracy_size=10", "--neftune_alpha=5.0")
    losses = _losses(log)
    assert len(losses) == 25
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0, losses
    ck = load_checkpoint(path)
    assert ck["step"] == 25 and ck["tokenizer"] == "default" and ck["config"]["max_steps"] == 25
    load_model(path)[0]
    assert "held-out exact match" in log
    assert "| mfu n/a |" in log  # no peak FLOP/s known for a CPU: said, not guessed


def test_bad_record_through_sft(tiny_ckpt, tmp_path):
    path = tmp_path / "chats.jsonl"
    recs = [{"messages": MULTI}] * 3 + [{"conversations": [{"from": "human", "value": "hi"}]}] + [{"messages": MULTI}]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    p = subprocess.run([sys.executable, "sft.py", f"--init_from={tiny_ckpt}", f"--out_dir={tmp_path / 'o'}",
                        f"--data={path}", "--val_size=1", "--max_steps=1"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert p.returncode != 0
    assert f"{path}: record 3: the conversation has no assistant turn" in p.stderr
    assert not os.path.exists(tmp_path / "o" / "ckpt.pt")


def test_missing_init_checkpoint_says_what_to_run(tmp_path):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "sft.py"), f"--out_dir={tmp_path}"], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}, timeout=120)
    assert p.returncode != 0 and "python pretrain.py" in p.stderr


def _reference_params(tiny_ckpt, examples, steps, lr, eps):
    """The naive computation: the mean token loss over all examples of the (full-batch) step, one example
    at a time, and torch's AdamW."""
    model = load_model(tiny_ckpt)[0]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), eps=eps, weight_decay=0.0)
    n = sum(sum(t != -100 for t in y) for _, y in examples)
    for _ in range(steps):
        for x, y in examples:
            _, loss = model(torch.tensor([x]), torch.tensor([y]), reduction="sum")
            (loss / n).backward()
        opt.step()
        opt.zero_grad()
    return model.state_dict()


def test_grad_accumulation_ddp_and_fsdp_match_the_full_batch_step(tiny_ckpt, tmp_path, tok):
    # 8 conversations of different lengths; every optimizer step sees all 8 (global batch 8)
    convs = [MULTI] + _convs(7, seed=3)
    convs[2] = convs[2][:1] + [{"role": "assistant", "content": "a much longer reply " * 6}]
    data = tmp_path / "eight.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    examples, _, _ = tokenize_conversations(convs, tok, 256)
    assert len({len(x) for x, _ in examples}) > 3
    # a huge eps makes Adam's update ~ lr/eps * gradient, so the parameters show the gradient's scale
    # (with eps ~ 0 the first Adam step is ~ lr * sign(grad) and would hide a normalisation error)
    lr, eps, steps = 100.0, 1000.0, 2
    common = [f"--data={data}", "--val_size=0", "--packing=False", f"--max_steps={steps}", f"--lr={lr}",
              f"--adam_eps={eps}", "--warmup_steps=0", "--lr_schedule=constant", "--grad_clip=0.0"]
    ref = _reference_params(tiny_ckpt, examples, steps, lr, eps)
    init = load_checkpoint(tiny_ckpt)["model"]
    runs = {"1x8": _sft(tiny_ckpt, tmp_path, "a", *common, "--batch_size=8", "--grad_accum=1"),
            "8x1": _sft(tiny_ckpt, tmp_path, "b", *common, "--batch_size=1", "--grad_accum=8"),
            "ddp 2x(2x2)": _sft(tiny_ckpt, tmp_path, "c", *common, "--batch_size=2", "--grad_accum=2", torchrun=True),
            "fsdp 2x(4x1)": _sft(tiny_ckpt, tmp_path, "d", *common, "--batch_size=4", "--parallel=fsdp", torchrun=True)}
    assert "parameters identical on all 2 ranks" in runs["ddp 2x(2x2)"][0]
    moved = max((ref[k] - init[k]).abs().max().item() for k in ref)
    assert moved > 1e-3
    for name, (log, path) in runs.items():
        got = load_checkpoint(path)["model"]
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=0, atol=moved * 1e-3, msg=f"{name}: {k}")
