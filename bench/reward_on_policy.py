"""
Does the learned reward rank the policy's own samples? (What PPO with a learned reward optimises.)

For 300 training prompts of add/count/max, 8 samples each at temperature 1 from the policy: the fraction of
(correct, wrong) pairs of the same prompt where the reward model scores the correct one higher (ties count
half), and the accuracy of best-of-8 chosen by the reward model against the mean sample accuracy. A reward
model whose held-out pair accuracy (reward.py's, on the dataset's answers) looks fine can still fail here, on
the policy's own mistakes.

$ python bench/reward_on_policy.py [POLICY_CKPT] [REWARD_CKPT]    # defaults: out/sft/ckpt.pt out/reward/ckpt.pt
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from checkpoint import load_model
from data import tasks
from data.chat import render_prompt
from data.tokenizer import get_tokenizer
from reward import score_conversations

G, N_PROMPTS, TASKS = 8, 300, ("add", "count", "max")

if __name__ == "__main__":
    policy_path = sys.argv[1] if len(sys.argv) > 1 else "out/sft/ckpt.pt"
    reward_path = sys.argv[2] if len(sys.argv) > 2 else "out/reward/ckpt.pt"
    policy, ckpt = load_model(policy_path, kernels="torch")
    rm, _ = load_model(reward_path, kind="reward", kernels="torch")
    policy.eval()
    rm.eval()
    tok = get_tokenizer(ckpt["tokenizer"])
    examples = tasks.generate(N_PROMPTS, "train", seed=4242, tasks=TASKS)
    rows = [ex for ex in examples for _ in range(G)]
    prompts = [render_prompt(tasks.to_messages(ex), tok) for ex in rows]
    with torch.no_grad():
        g = policy.generate(prompts, 16, temperature=1.0, stop_tokens=tok.stop_ids, pad_id=tok.pad_id,
                            generator=torch.Generator().manual_seed(0))
        texts = [tok.decode_reply(r[:n]) for r, n in zip(g["tokens"].tolist(), g["lengths"].tolist())]
        convs = [tasks.to_messages(dict(prompt=ex["prompt"], answer=t)) for ex, t in zip(rows, texts)]
        scores = score_conversations(rm, convs, tok).float().view(-1, G)
    correct = torch.tensor([float(tasks.is_correct(ex, t)) for ex, t in zip(rows, texts)]).view(-1, G)
    for task in TASKS + ("all",):
        idx = [i for i, ex in enumerate(examples) if task == "all" or ex["task"] == task]
        c, s = correct[idx], scores[idx]
        # every (correct a, wrong b) pair of one prompt: does the reward model put a above b?
        pair = (c[:, :, None] == 1) & (c[:, None, :] == 0)
        wins = ((s[:, :, None] > s[:, None, :]).float() + 0.5 * (s[:, :, None] == s[:, None, :]).float())[pair]
        best = c.gather(1, s.argmax(1, keepdim=True)).mean().item()
        print(f"{task:5s} prompts {len(idx):3d} | sample acc {c.mean():.3f} | best-of-{G} by the reward model "
              f"{best:.3f} | correct ranked over wrong (same prompt) {wins.mean():.3f} of {int(pair.sum())} pairs")
