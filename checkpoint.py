"""
Checkpoints: what every stage saves, atomic writes, and the one loader every stage and chat.py use.

A checkpoint (out_dir/ckpt.pt) is a dict of plain tensors and Python values, read with
torch.load(weights_only=True), so loading one never runs code:
    model_config   the ModelConfig fields          model      the full, unsharded state dict
    tokenizer      the name get_tokenizer() takes  git        the commit that wrote it (and whether the tree was dirty)
    config         the stage's settings            ...        training state (step, optimizer, RNG, data position)
An adapter checkpoint (LoRA without merging) holds lora_state, the lora settings and base_checkpoint, the path
of the checkpoint the adapters apply to, instead of model.

    model, ckpt = load_model(path)                 # a language model (adapters applied, unmerged)
    rm, ckpt = load_model(path, kind="reward")     # a reward model written by reward.py
"""

import errno
import functools
import hashlib
import os
import subprocess
from dataclasses import asdict

import torch

from distributed import is_sharded, unwrap
from lora import apply_lora, merge_lora, merged_model
from model import ModelConfig, RewardModel, Transformer

CKPT_NAME = "ckpt.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (corrupt, incomplete, of the wrong kind, or not matching its base)."""


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


def training_checkpoint(model, tokenizer_name, lora, finished, make_plain, **extra):
    """What a post-training stage saves (a collective: every rank calls it; under FSDP the weights are complete on
    rank 0). While training: the full weights, LoRA adapters unmerged (load_model applies them again), and the
    training state in extra. Once finished with LoRA: the plain model, adapters merged into a fresh CPU copy
    that make_plain() builds, so the result loads like any full checkpoint."""
    if not (finished and lora):
        return checkpoint_dict(model, tokenizer_name, lora=lora, **extra)
    full = model_state_dict(model)
    if not full:  # FSDP ranks other than 0 receive nothing
        return None
    return checkpoint_dict(merged_model(full, make_plain(), lora), tokenizer_name, merged_lora=lora, **extra)


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


def rng_states(device, ddp, generators=()):
    """Every rank's random state (torch CPU, CUDA and the given torch.Generators), gathered to every rank (a
    collective under torchrun), for an exact resume."""
    mine = dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                generators=[g.get_state() for g in generators])
    if not ddp:
        return [mine]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, mine)
    return out


def restore_rng_states(states, rank, device, generators=()):
    """The inverse of rng_states for this rank (the same world size as when saved; otherwise rank modulo it)."""
    s = states[rank % len(states)]
    torch.set_rng_state(s["cpu"])
    if s["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(s["cuda"], device)
    for g, state in zip(generators, s["generators"]):
        g.set_state(state)


def save_checkpoint(path, state, protect=()):
    """Write atomically: a crash mid-write leaves the previous checkpoint intact. A failed write (a full disk, an
    unwritable directory) removes its temp file and stops the run, saying so. protect: paths this run must never
    overwrite (its init checkpoint, the base its adapters point to)."""
    real = os.path.realpath(path)
    for p in protect:
        if p and os.path.realpath(checkpoint_path(p)) == real:
            raise SystemExit(f"refusing to write {path}: it is {p}, which this run started from (or whose weights its "
                             f"adapters apply to); set out_dir to another directory")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        full = " (no space left on the device: free some, or set out_dir elsewhere)" if e.errno == errno.ENOSPC else ""
        raise SystemExit(f"could not write checkpoint {path}: {e.strerror or e}{full}. The previous checkpoint there, "
                         f"if any, is intact.") from None


def check_writable(out_dir, protect=()):
    """Stop before any work is done if out_dir cannot be created or written to (rather than at the first save),
    or if its ckpt.pt is one of the protect paths (the checkpoint this run starts from: saving would destroy it)."""
    for p in protect:
        if p and os.path.realpath(checkpoint_path(p)) == os.path.realpath(os.path.join(out_dir, CKPT_NAME)):
            raise SystemExit(f"out_dir {out_dir} holds {p}, the checkpoint this run starts from (or whose weights "
                             f"its adapters apply to): saving there would overwrite it. Set --out_dir elsewhere.")
    probe = os.path.join(out_dir, f".write_test_{os.getpid()}")
    try:
        os.makedirs(out_dir, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.remove(probe)
    except OSError as e:
        raise SystemExit(f"out_dir {out_dir} is not writable ({e.strerror or e}): set --out_dir to a directory you "
                         f"can write to") from None


def fingerprint(source):
    """A cheap content fingerprint of a checkpoint file (or of an HF directory's weight files): its size and a
    SHA-256 of 64 evenly spaced 64 KiB blocks. Any retraining changes weights everywhere, so this tells a base
    checkpoint that was overwritten or replaced from the one an adapter or a reference was trained against."""
    paths = ([checkpoint_path(source)] if not os.path.isdir(source) or os.path.exists(checkpoint_path(source)) else
             sorted(os.path.join(source, f) for f in os.listdir(source) if f.endswith((".safetensors", ".json"))))
    h = hashlib.sha256()
    for p in paths:
        size = os.path.getsize(p)
        h.update(f"{os.path.basename(p)}:{size};".encode())
        with open(p, "rb") as f:
            for i in range(64):
                f.seek(size * i // 64)
                h.update(f.read(1 << 16))
    return h.hexdigest()[:16]


def checkpoint_path(source):
    """The checkpoint file of source: the file itself, or ckpt.pt inside a directory."""
    return os.path.join(source, CKPT_NAME) if os.path.isdir(source) else source


def load_checkpoint(source, map_location="cpu"):
    """The checkpoint dict of a file, or of the ckpt.pt in a directory. A file that is not a complete checkpoint
    (truncated, empty, random bytes, or with arbitrary pickled objects) is a CheckpointError naming it."""
    path = checkpoint_path(source)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types here, and its message suggests unsafe loading
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or incomplete and cannot be read ({reason}); a run that "
                              f"was killed mid-save leaves the previous checkpoint intact, so this file was damaged "
                              f"or replaced: restore it, or retrain") from None
    if not isinstance(ckpt, dict) or "model_config" not in ckpt:
        raise CheckpointError(f"{path} is not a checkpoint written by this repo's stages (no model_config)")
    return ckpt


def load_model(source, device="cpu", kind="lm", **overrides):
    """The one loader. source: a checkpoint file, a directory holding ckpt.pt, or a checkpoint dict.
    kind "lm": a language model (a full checkpoint, or an adapter checkpoint: its base plus the adapters,
    applied and unmerged — merge_lora(model) gives a plain model); kind "reward": a reward.py checkpoint.
    A training checkpoint of a LoRA run (full weights with the adapters unmerged) comes back with its adapters.
    overrides replace model config fields that do not change the weights (kernels, dropout, ...).
    Returns (model, ckpt): ckpt is the checkpoint dict without its weights (tokenizer, config, training state).
    Raises CheckpointError (a ValueError) for a checkpoint that cannot serve as `kind`."""
    ckpt = load_checkpoint(source) if isinstance(source, str) else source
    where = source if isinstance(source, str) else "the checkpoint"
    if "lora_state" in ckpt:
        if kind != "lm":
            raise CheckpointError(f"{where} is an adapter checkpoint of a language model, not a {kind} model")
        base = ckpt["base_checkpoint"]
        if not os.path.exists(checkpoint_path(base)):
            raise CheckpointError(f"{where} holds LoRA adapters for the base checkpoint {base}, which does not exist "
                                  f"(any more): restore it, or point base_checkpoint at a copy")
        if ckpt.get("base_fingerprint") and fingerprint(base) != ckpt["base_fingerprint"]:
            raise CheckpointError(f"{where} holds LoRA adapters trained on {base}, but that file has changed since "
                                  f"(fingerprint {fingerprint(base)}, expected {ckpt['base_fingerprint']}): the "
                                  f"adapters would apply to other weights. Restore the original base checkpoint.")
        model, _ = load_model(base, "cpu", "lm", **overrides)
        merge_lora(model)  # a base that is itself an adapter checkpoint: these adapters go on its merged weights
        runtime = ("kernels", "dropout")  # settings that do not change the weights may differ
        if {k: v for k, v in asdict(model.config).items() if k not in runtime} != \
                {k: v for k, v in ckpt["model_config"].items() if k not in runtime}:
            raise CheckpointError(f"base checkpoint {base} does not have the model config the adapters were "
                                  f"trained on")
        apply_lora(model, **ckpt["lora"])
        missing, unexpected = model.load_state_dict(ckpt["lora_state"], strict=False)
        if unexpected or [k for k in missing if "lora_" in k]:
            raise CheckpointError(f"{where}: the adapter weights do not fit the model ({len(unexpected)} unexpected, "
                                  f"{len([k for k in missing if 'lora_' in k])} missing adapter tensors)")
        return model.to(device), {k: v for k, v in ckpt.items() if k != "lora_state"}
    is_reward = "score_head.weight" in ckpt["model"]
    if kind == "reward" and not is_reward:
        raise CheckpointError(f"{where} is not a reward-model checkpoint (it has no score_head): train one with "
                              f"`python reward.py`, or put a fresh head on a language model with RewardModel(model)")
    if kind == "lm" and is_reward:
        raise CheckpointError(f"{where} is a reward model (written by reward.py), but this needs a language model, "
                              f"e.g. out/sft/ckpt.pt")
    model = Transformer(ModelConfig.from_dict({**ckpt["model_config"], **overrides}))
    if is_reward:
        model = RewardModel(model)
    if ckpt.get("lora") and any("lora_A" in k for k in ckpt["model"]):  # a LoRA run's training checkpoint
        apply_lora(getattr(model, "transformer", model), **ckpt["lora"])
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:  # keys or shapes that do not fit: say so in a line, not a dump of every key
        first = str(e).split("\n")[1].strip()[:200] if "\n" in str(e) else str(e)[:200]
        raise CheckpointError(f"{where}: the weights do not fit the model its model_config describes ({first})")
    return model.to(device), {k: v for k, v in ckpt.items() if k != "model"}


def check_vocab(model, tokenizer, where):
    """Stop before training when the tokenizer has ids the model's embedding does not (IndexError later, or
    silently wrong if the model is larger than the tokenizer but the two come from different runs)."""
    if tokenizer.vocab_size > model.config.vocab_size:
        raise CheckpointError(f"{where}: tokenizer {tokenizer.name!r} has {tokenizer.vocab_size} tokens but the "
                              f"model's embedding only {model.config.vocab_size}: they do not belong together")
