"""
LoRA: h = W0 x + (alpha / r) * B A x, A random, B zero (training starts exactly at the base model), W0 frozen.

apply_lora wraps the chosen linear layers of a model; lora_disabled runs the base model (a free reference
for DPO and the RL stage); merge_lora / merged_model fold the adapters in for export.
"""

import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

LORA_TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
                "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r, alpha, dropout=0.0, rslora=False):
        super().__init__()
        self.base = base
        self.r = r
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear inits its weight
        self.dropout = dropout
        self.enabled = True   # False: the base model (a free reference model for DPO/GRPO)
        self.merged = False

    def forward(self, x):
        y = self.base(x)
        if self.enabled and not self.merged:
            h = F.dropout(x, self.dropout, self.training) @ self.lora_A.to(x.dtype).t()
            y = y + (h @ self.lora_B.to(x.dtype).t()) * self.scaling
        return y

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.base.weight += (self.lora_B @ self.lora_A * self.scaling).to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.base.weight -= (self.lora_B @ self.lora_A * self.scaling).to(self.base.weight.dtype)
            self.merged = False


def check_targets(targets):
    """What is wrong with a lora_targets value ("all" or comma-separated short names), or None."""
    names = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else list(targets)
    unknown = [t for t in names if t not in LORA_TARGETS and names != ["all"]]
    return f"unknown LoRA target(s) {unknown}: use 'all' or comma-separated names from {', '.join(LORA_TARGETS)}" \
        if unknown or not names else None


def apply_lora(model, targets=("q", "k", "v", "o", "gate", "up", "down"), r=8, alpha=16, dropout=0.0, rslora=False):
    """Wrap the target linear layers (short names from LORA_TARGETS, as a tuple or a comma-separated string, or
    "all") in LoRALinear and freeze everything else. Returns the list of wrapped module names."""
    if isinstance(targets, str):  # "all" or "q,v" as a config value gives it
        targets = tuple(t.strip() for t in targets.split(","))
    if targets == ("all",):
        targets = tuple(LORA_TARGETS)
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown:
        raise ValueError(f"unknown LoRA targets {unknown}; choose from {list(LORA_TARGETS)} or 'all'")
    names = {LORA_TARGETS[t] for t in targets}
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if child_name in names and isinstance(child, nn.Linear):
                setattr(parent, child_name, LoRALinear(child, r, alpha, dropout, rslora))
                wrapped.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    assert wrapped, f"no linear layers named {sorted(names)} found"
    return wrapped


def lora_modules(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def lora_state_dict(model):
    """The adapter weights only (small checkpoints)."""
    return {k: v for k, v in model.state_dict().items() if "lora_A" in k or "lora_B" in k}


@contextmanager
def lora_disabled(model):
    """Run the base model: inside this block every adapter is off."""
    mods = lora_modules(model)
    states = [m.enabled for m in mods]
    for m in mods:
        m.enabled = False
    try:
        yield
    finally:
        for m, s in zip(mods, states):
            m.enabled = s


def merge_lora(model):
    """Fold every adapter into its base weight and put the plain nn.Linear back (for export)."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                child.merge()
                setattr(parent, child_name, child.base)
    for p in model.parameters():
        p.requires_grad_(True)
    return model



def merged_model(state, model, lora=None):
    """The plain model a stage exports: `model` (a fresh, unwrapped copy of the trained architecture,
    e.g. on the CPU) given the adapters described by `lora` (apply_lora's keyword arguments, or None),
    loaded with the full state dict `state` (as model_state_dict returns it), adapters folded in."""
    if lora:
        apply_lora(getattr(model, "transformer", model), **lora)  # a RewardModel adapts its transformer
    model.load_state_dict(state)
    return merge_lora(model)


