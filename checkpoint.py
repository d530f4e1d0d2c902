"""
Checkpoints: what every stage saves, atomic writes, and the one loader every stage and chat.py use.

A checkpoint (out_dir/ckpt.pt) is a dict of plain tensors and Python values, read with
torch.load(weights_only=True), so loading one never runs code:
    model_config   the ModelConfig fields          model      the full, unsharded state dict
    tokenizer      the name get_tokenizer() takes  git        the commit that wrote it (and whether the tree was dirty)
    config         the stage's settings            ...        training state (step, optimizer, RNG, data position)
An adapter checkpoint (LoRA without merging) holds lora_state, the lora settings and base_checkpoint, the path
of the checkpoint the adapters apply to, instead of model. A local Hugging Face model directory (config.json
beside model.safetensors or a safetensors index, see hf.py) is a checkpoint too: its ckpt dict has model_config,
tokenizer = the directory's absolute path, and hf_config (its config.json).

    model, ckpt = load_model(path)                 # a language model (adapters applied, unmerged)
    model, ckpt = load_model(hf_dir, "cuda")       # an HF model, bf16 on CUDA (dtype=... to choose)
    model, ckpt = load_model(hf_dir, dev, fsdp=True)   # under torchrun: sharded before any weight is read
    rm, ckpt = load_model(path, kind="reward")     # a reward model written by reward.py
"""

import functools
import os
import subprocess
from dataclasses import asdict

import torch

from distributed import is_sharded, unwrap
from lora import apply_lora
from model import ModelConfig, RewardModel, Transformer, rope_cache

CKPT_NAME = "ckpt.pt"


@functools.lru_cache(maxsize=None)
def git_state():
    """dict(commit, dirty) of the repository this file is in, or None outside a git checkout."""
    root = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode != 0:
        return None
    return dict(commit=commit.stdout.strip(), dirty=bool(status.stdout.strip()))


def model_state_dict(model):
    """A full, unsharded, CPU state dict on every rank, for DDP, FSDP2 and plain models alike."""
    model = unwrap(model)
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def checkpoint_dict(model, tokenizer_name, **extra):
    """What every stage saves: model config, full weights, the tokenizer it was trained with, the git commit,
    and any training state passed in extra (optimizer, step, data position, RNG states, ...)."""
    return dict(model_config=asdict(unwrap(model).config), model=model_state_dict(model),
                tokenizer=tokenizer_name, git=git_state(), **extra)


def optimizer_state_dict(model, optimizer):
    """The optimizer state in a form that reloads exactly. Under FSDP2 each sharded state tensor is
    gathered to its full value (a collective: call it on every rank), so any world size can reload it."""
    state = optimizer.state_dict()
    if is_sharded(model):
        state["state"] = {i: {k: v.full_tensor().cpu() if type(v).__name__ == "DTensor" else v for k, v in s.items()}
                          for i, s in state["state"].items()}
    return state


def load_optimizer_state(model, optimizer, state):
    if is_sharded(model):  # shard each full state tensor the way its parameter is sharded
        from torch.distributed.tensor import distribute_tensor
        params = [p for group in optimizer.param_groups for p in group["params"]]
        state["state"] = {i: {k: distribute_tensor(v.to(params[i].device), params[i].device_mesh, params[i].placements)
                              if torch.is_tensor(v) and v.shape == params[i].shape else v for k, v in s.items()}
                          for i, s in state["state"].items()}
    optimizer.load_state_dict(state)


def save_checkpoint(path, state):
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def checkpoint_path(source):
    """The checkpoint file of source: the file itself, or ckpt.pt inside a directory."""
    return os.path.join(source, CKPT_NAME) if os.path.isdir(source) else source


def is_hf_source(source):
    """An HF model directory (and not a directory holding a repo ckpt.pt, which takes precedence)."""
    import hf
    return isinstance(source, str) and hf.is_hf_dir(source) and not os.path.exists(os.path.join(source, CKPT_NAME))


def load_checkpoint(source, map_location="cpu"):
    """The checkpoint dict of a file, of the ckpt.pt in a directory, or of an HF model directory (its weights
    under our names, in the files' dtype)."""
    if is_hf_source(source):
        import hf
        ckpt = hf.hf_checkpoint(source)
        ckpt["model"] = {k: v.to(map_location) for k, v in ckpt["model"].items()}
        return ckpt
    path = checkpoint_path(source)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} not found")
    return torch.load(path, map_location=map_location, weights_only=True)


def load_model(source, device="cpu", kind="lm", dtype=None, fsdp=False, **overrides):
    """The one loader. source: a checkpoint file, a directory holding ckpt.pt, a checkpoint dict, or a local
    HF model directory (hf.load_hf: built on the meta device, weights streamed from safetensors).
    kind "lm": a language model (a full checkpoint, or an adapter checkpoint: its base plus the adapters,
    applied and unmerged — merge_lora(model) gives a plain model); kind "reward": a reward.py checkpoint.
    dtype: the weights' dtype (None: as stored; for an HF directory bf16 on CUDA, fp32 on CPU).
    fsdp: return the model FSDP2-sharded (distributed.parallelize(..., "fsdp")); for an HF directory it is
    sharded before its weights are read, so no rank ever holds the full model.
    overrides replace model config fields that do not change the weights (kernels, dropout, max_seq_len, ...).
    Returns (model, ckpt): ckpt is the checkpoint dict without its weights (tokenizer, config, training state)."""
    if is_hf_source(source):
        if kind != "lm":
            raise ValueError(f"{source} is a Hugging Face causal language model, not a {kind} model: reward.py "
                             f"trains a reward model from it (--init_from={source})")
        import hf
        return hf.load_hf(source, device, dtype, fsdp=fsdp, **overrides)
    ckpt = load_checkpoint(source) if isinstance(source, str) else source
    where = source if isinstance(source, str) else "the checkpoint"
    if "lora_state" in ckpt:
        if kind != "lm":
            raise ValueError(f"{where} is an adapter checkpoint of a language model, not a {kind} model")
        model, _ = load_model(ckpt["base_checkpoint"], "cpu", "lm", **overrides)
        runtime = ("kernels", "dropout")  # settings that do not change the weights may differ
        # both sides through ModelConfig, so keys an older model.py did not write compare as their defaults
        trained_on = asdict(ModelConfig.from_dict({**ckpt["model_config"], **overrides}))
        if {k: v for k, v in asdict(model.config).items() if k not in runtime} != \
                {k: v for k, v in trained_on.items() if k not in runtime}:
            raise ValueError(f"base checkpoint {ckpt['base_checkpoint']} does not have the model config "
                             f"the adapters were trained on")
        apply_lora(model, **ckpt["lora"])
        missing, unexpected = model.load_state_dict(ckpt["lora_state"], strict=False)
        assert not unexpected and not [k for k in missing if "lora_" in k], \
            f"adapter keys do not match: {unexpected or missing}"
        return _place(model, device, dtype, fsdp), {k: v for k, v in ckpt.items() if k != "lora_state"}
    is_reward = "score_head.weight" in ckpt["model"]
    if kind == "reward" and not is_reward:
        raise ValueError(f"{where} is not a reward-model checkpoint (it has no score_head): train one with "
                         f"`python reward.py`, or put a fresh head on a language model with RewardModel(model)")
    if kind == "lm" and is_reward:
        raise ValueError(f"{where} is a reward model (reward.py): this needs a language model, "
                         f"e.g. out/sft/ckpt.pt")
    model = Transformer(ModelConfig.from_dict({**ckpt["model_config"], **overrides}))
    if is_reward:
        model = RewardModel(model)
    model.load_state_dict(ckpt["model"])
    return _place(model, device, dtype, fsdp), {k: v for k, v in ckpt.items() if k != "model"}


def _place(model, device, dtype, fsdp):
    model = model.to(device)
    if dtype is not None:
        model.to(dtype)
        for m in model.modules():  # the RoPE tables stay fp32 (model.to converted them too)
            if isinstance(m, Transformer):
                m.rope_cos, m.rope_sin = rope_cache(m.config, m.config.max_seq_len, m.rope_cos.device)
    if fsdp:
        from distributed import parallelize
        model = parallelize(model, "fsdp", torch.device(device))
    return model
