"""Reward model: the Bradley-Terry objective against its formula, the head read at the right position
whatever the padding, learning on an easy set, and reward.py end to end."""

import json
import math
import re

import pytest
import torch

from conftest import run_script, tiny_config
from data.preference import encode_response, pad_batch
from data.tokenizer import get_tokenizer
from checkpoint import checkpoint_dict, load_model
from model import RewardModel, Transformer
from reward import bradley_terry_loss, ranked_pairs, reward_loss, score_conversations


def softplus(x):
    return math.log1p(math.exp(x))


def test_bradley_terry_matches_formula():
    rc, rr = torch.tensor([2.0, -1.0, 0.3]), torch.tensor([0.5, 1.0, 0.3])
    want = [softplus(-(2.0 - 0.5)), softplus(-(-1.0 - 1.0)), math.log(2)]  # -log sigmoid(d) = log(1 + e^-d)
    assert torch.allclose(bradley_terry_loss(rc, rr), torch.tensor(want), atol=1e-6)
    want_m = [softplus(-(2.0 - 0.5 - 1.0)), softplus(-(-1.0 - 1.0 - 1.0)), softplus(1.0)]
    assert torch.allclose(bradley_terry_loss(rc, rr, 1.0), torch.tensor(want_m), atol=1e-6)


def test_ranked_groups_average_pairs_per_prompt():
    # prompt 1: three ranked responses (best first), prompt 2: a pair
    r = torch.tensor([3.0, 1.0, 2.0, 0.5, -0.5])
    loss, diff = reward_loss(r, [3, 2])
    p1 = (softplus(-(3 - 1)) + softplus(-(3 - 2)) + softplus(-(1 - 2))) / 3
    p2 = softplus(-(0.5 + 0.5))
    assert loss.item() == pytest.approx((p1 + p2) / 2, abs=1e-6)
    assert sorted(diff.tolist()) == sorted([2.0, 1.0, -1.0, 1.0])
    better, worse, weight = ranked_pairs([3, 2])
    assert better.tolist() == [0, 0, 1, 3] and worse.tolist() == [1, 2, 2, 4]
    # centering adds coef * (r_i + r_j)^2 per pair, averaged the same way
    c = 0.1
    loss_c, _ = reward_loss(r, [3, 2], center_coef=c)
    cen = (c * ((3 + 1) ** 2 + (3 + 2) ** 2 + (1 + 2) ** 2) / 3 + c * (0.5 - 0.5) ** 2) / 2
    assert loss_c.item() == pytest.approx((p1 + p2) / 2 + cen, abs=1e-5)


def make_rm(seed=0):
    torch.manual_seed(seed)
    rm = RewardModel(Transformer(tiny_config()))
    torch.nn.init.normal_(rm.score_head.weight, std=1.0)  # a non-zero head so positions matter
    return rm.eval()


def test_head_reads_the_given_position_with_right_and_left_padding():
    tok = get_tokenizer("default")
    rm = make_rm()
    prompt = [{"role": "user", "content": "What is 3 + 4?"}]
    seqs = [encode_response(prompt, r, tok)[0] for r in ("7", "a much longer wrong reply, 8")]
    with torch.no_grad():
        # reference: each sequence alone, reward = head(hidden at its last token)
        ref = torch.stack([rm.score_head(rm.transformer(torch.tensor([s]), return_hidden=True)[0][0, -1]).squeeze()
                           for s in seqs])
        T = max(map(len, seqs))
        right = torch.full((2, T), tok.pad_id)
        left = torch.full((2, T), tok.pad_id)
        pos = torch.zeros(2, T, dtype=torch.long)
        doc = torch.zeros(2, T, dtype=torch.long)
        for i, s in enumerate(seqs):
            right[i, :len(s)] = torch.tensor(s)
            left[i, T - len(s):] = torch.tensor(s)
            pos[i, T - len(s):] = torch.arange(len(s))
            doc[i, T - len(s):] = 1  # the pads are their own document
        r_right = rm(right, torch.tensor([len(s) - 1 for s in seqs]))
        r_left = rm(left, torch.tensor([T - 1, T - 1]), positions=pos, doc_ids=doc)
        assert torch.allclose(r_right, ref, atol=1e-5) and torch.allclose(r_left, ref, atol=1e-5)
        # the shorter row read at the last index (a pad) would be a different number
        assert not torch.allclose(rm(right, torch.tensor([T - 1, T - 1]))[0], ref[0], atol=1e-3)
        # score() renders with the chat template and reads at the reply's <|im_end|>
        scored = score_conversations(rm, [prompt + [{"role": "assistant", "content": r}] for r in ("7", "a much longer wrong reply, 8")],
                          tok)
        assert torch.allclose(scored, ref, atol=1e-5)
        assert all(s[-1] == tok.im_end_id for s in seqs)


def test_reward_checkpoint_round_trip(tmp_path):
    tok = get_tokenizer("default")
    rm = make_rm(1)
    path = str(tmp_path / "rm.pt")
    torch.save(checkpoint_dict(rm, "default"), path)
    back = load_model(path, kind="reward")[0]
    msgs = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]]
    assert torch.allclose(score_conversations(back, msgs, tok), score_conversations(rm, msgs, tok))
    lm_path = str(tmp_path / "lm.pt")
    torch.save(checkpoint_dict(Transformer(tiny_config()), "default"), lm_path)
    with pytest.raises(ValueError, match="not a reward-model checkpoint"):
        load_model(lm_path, kind="reward")[0]


def test_accuracy_rises_above_chance_on_an_easy_set(tiny_ckpt):
    """Chosen replies say "yes", rejected say "no": a few steps must separate held-out pairs."""
    torch.manual_seed(0)
    tok = get_tokenizer("default")
    rm = RewardModel(load_model(tiny_ckpt)[0])

    def pairs(lo, hi):
        out = []
        for i in range(lo, hi):
            prompt = [{"role": "user", "content": f"Question number {i}?"}]
            out += [encode_response(prompt, f"yes {i % 7}", tok)[:2], encode_response(prompt, f"no {i % 5}", tok)[:2]]
        return out

    def accuracy(seqs):
        with torch.no_grad():
            idx, _, end = pad_batch(seqs, tok.pad_id)
            r = rm(idx, end)
        return (r[0::2] > r[1::2]).float().mean().item()

    train, held_out = pairs(0, 64), pairs(1000, 1032)
    opt = torch.optim.AdamW(rm.parameters(), lr=3e-3)
    for step in range(30):
        batch = train[(step % 4) * 32:(step % 4) * 32 + 32]  # 16 groups of (chosen, rejected)
        idx, _, end = pad_batch(batch, tok.pad_id)
        loss, _ = reward_loss(rm(idx, end), [2] * 16)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert accuracy(held_out) > 0.9


def test_reward_script_runs_and_saves_a_scorer(tiny_ckpt, tmp_path):
    out_dir = tmp_path / "rm"
    out = run_script(["reward.py", f"--init_from={tiny_ckpt}", f"--out_dir={out_dir}", "--task_pairs=48",
                      "--task_val_pairs=16", "--batch_size=8", "--max_steps=4", "--log_interval=2",
                      "--eval_interval=4", "--kernels=torch", "--peak_flops=1e9"], timeout=300)
    assert "step 4/4 | loss" in out and "val accuracy" in out and "saved" in out
    assert len(re.findall(r"^step \d+/4 \|.* mfu \d+\.\d% \|", out, re.M)) == 2  # with a given peak FLOP/s
    rm = load_model(str(out_dir / "ckpt.pt"), kind="reward")[0]
    r = score_conversations(rm, [[{"role": "user", "content": "What is 1 + 1?"}, {"role": "assistant", "content": a}]
                  for a in ("2", "3")], get_tokenizer("default"))
    assert r.shape == (2,) and torch.isfinite(r).all()


def test_reward_script_lora_on_local_file_with_ranked_records(tiny_ckpt, tmp_path):
    path = tmp_path / "ranked.jsonl"
    with open(path, "w") as f:
        for i in range(24):
            f.write(json.dumps({"prompt": f"Say something about {i}", "responses": [f"fine {i}", f"great {i}", f"bad {i}"],
                                "scores": [5, 9, 1]}) + "\n")
    out = run_script(["reward.py", f"--init_from={tiny_ckpt}", f"--out_dir={tmp_path / 'rm'}", f"--data={path}",
                      "--val_fraction=0.25", "--lora_r=4", "--batch_size=6", "--max_steps=3", "--log_interval=1",
                      "--center_coef=0.01", "--kernels=torch"], timeout=300)
    assert "3.0 responses each" in out and "(LoRA r=4)" in out and "saved" in out
    assert "lora_A" not in "".join(torch.load(tmp_path / "rm" / "ckpt.pt", weights_only=True)["model"])


@pytest.mark.parametrize("stage, cfg", [("reward", "configs/reward_ultrafeedback.py"), ("reward", "configs/reward_lora.py"),
                                        ("dpo", "configs/dpo_ultrafeedback.py"), ("dpo", "configs/dpo_hh.py")])
def test_config_files_set_known_keys(stage, cfg):
    import importlib
    import os
    from configs import configure
    g = dict(vars(importlib.import_module(stage)))  # the script's defaults (importing runs nothing)
    configure(g, argv=[os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), cfg)])


def test_reward_ddp_keeps_replicas_identical(tiny_ckpt, tmp_path):
    out = run_script(["torchrun", "--standalone", "--nproc_per_node=2", "reward.py", f"--init_from={tiny_ckpt}",
                      f"--out_dir={tmp_path / 'rm'}", "--task_pairs=32", "--task_val_pairs=8", "--batch_size=4",
                      "--max_steps=3", "--log_interval=1", "--eval_interval=3", "--kernels=torch"], timeout=300)
    assert "parameters identical on all 2 ranks" in out
