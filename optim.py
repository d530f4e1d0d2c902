"""
The optimizer and learning-rate schedules every stage shares.
"""

import math

import torch

from distributed import unwrap

SCHEDULES = ("cosine", "wsd", "constant")  # the lr_schedule choices


def configure_optimizer(model, lr, weight_decay, betas=(0.9, 0.95), eps=1e-8, device_type="cpu"):
    """AdamW over the trainable parameters; weight decay on matrices only (not on norms, biases,
    embeddings or the MoE selection bias), fused on CUDA."""
    params = [(n, p) for n, p in unwrap(model).named_parameters() if p.requires_grad]
    decay = [p for n, p in params if p.dim() >= 2 and "tok_emb" not in n]
    no_decay = [p for n, p in params if not (p.dim() >= 2 and "tok_emb" not in n)]
    groups = [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=device_type == "cuda")


def lr_at(step, max_steps, lr, warmup_steps=0, min_lr=0.0, schedule="cosine", decay_fraction=0.2):
    """Learning rate at a step. "cosine": linear warmup, cosine to min_lr at max_steps; "wsd":
    warmup, stable at lr, linear decay to min_lr over the last decay_fraction of steps; "constant"."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule == "wsd":
        decay_start = int(max_steps * (1 - decay_fraction))
        if step < decay_start:
            return lr
        return lr + (min_lr - lr) * min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
    if schedule != "cosine":
        raise ValueError(f"unknown lr_schedule {schedule!r}: use cosine, wsd or constant")
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
