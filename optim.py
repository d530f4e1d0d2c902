"""
The optimizer and learning-rate schedules every stage shares.
"""

import math
import os

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


# -----------------------------------------------------------------------------
# non-finite steps. A loss can be finite while the gradient is not (an overflow in the backward); then the
# optimizer step fills the weights with NaN, and the next save would write them over the last good checkpoint.
# Every stage marks the first non-finite step on the device (no host sync per step), checks the mark at each
# log line and before every save, and stops the run (it does not skip the update: a run that produces NaN needs
# a lower lr or other data, and a silent skip would hide that); the checkpoint on disk stays the last good one.

def mark_nonfinite(first_bad, step, loss, grad_norm):
    """first_bad: a device scalar, -1 until a step's loss or gradient norm is not finite, then that step."""
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP2: a DTensor
    bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm.to(loss.device)))
    return torch.where((first_bad < 0) & bad, torch.full_like(first_bad, step), first_bad)


def stop_if_nonfinite(first_bad, model=None, ckpt_path=None, hint="lower lr, or check the data"):
    """A host sync: SystemExit if a step was marked non-finite, or (model given: before a save) if any weight is."""
    bad = int(first_bad)
    what = f"non-finite loss or gradient norm at step {bad + 1}"
    if bad < 0 and model is not None:
        local = (p.to_local() if hasattr(p, "to_local") else p for p in model.parameters())  # FSDP2: own shard
        if not all(torch.isfinite(p).all() for p in local):
            bad, what = 0, "non-finite weights"
    if bad >= 0:
        where = f"; the last good checkpoint is {ckpt_path}" if ckpt_path and os.path.exists(ckpt_path) else ""
        raise SystemExit(f"{what}: stopping without saving{where}. Try: {hint}.")
