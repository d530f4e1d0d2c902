"""
Processes and devices: the one distributed setup every stage calls, data-parallel wrapping (DDP or FSDP2),
gradient-accumulation sync, and the checks and helpers that only make sense under torchrun.

    ddp, rank, world_size, device, autocast = setup_distributed(device)   # "auto" | "cpu" | "cuda"
    ...
    teardown_distributed(ddp)

Launched with torchrun, each process joins the group (NCCL on CUDA, gloo on the CPU) and takes the GPU of its
local rank; without torchrun it is rank 0 of 1. On CUDA, TF32 matmuls are on and autocast runs in bf16.
"""

import os
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist


def setup_distributed(device="auto"):
    """Returns (ddp, rank, world_size, device, autocast). device: "auto" (CUDA if available), "cpu" or "cuda"."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("config error: device='cuda' but this PyTorch sees no CUDA device "
                         f"(torch {torch.__version__}); use --device=cpu or --device=auto")
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
        rank, world_size = dist.get_rank(), dist.get_world_size()
    else:
        rank, world_size = 0, 1
    if device == "cuda":
        dev = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    else:
        dev, autocast = torch.device("cpu"), nullcontext()
    return ddp, rank, world_size, dev, autocast


def teardown_distributed(ddp):
    if ddp:
        dist.barrier()  # leave together: rank 0 may still be writing a checkpoint (else gloo aborts at exit)
        dist.destroy_process_group()


def grad_sync(model, last):
    """The context for one micro-batch's forward under gradient accumulation. Gradients are communicated once
    per optimizer step: accumulated locally on every micro-batch but the last, all-reduced (DDP) or
    reduce-scattered (FSDP2) on the last. model: what the stage trains through (DDP/FSDP2/compiled/plain)."""
    model = getattr(model, "_orig_mod", model)  # torch.compile wraps the DDP module
    if hasattr(model, "no_sync") and hasattr(model, "require_backward_grad_sync"):  # DDP
        return nullcontext() if last else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(last)
    return nullcontext()


def unwrap(model):
    """The plain module behind DDP / torch.compile wrappers (FSDP2 shards in place, no wrapper)."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod")
    return model


def parallelize(model, strategy, device, mixed_precision=True):
    """Wrap for data parallelism under torchrun. strategy: "none", "ddp", or "fsdp" (FSDP2 fully_shard
    per block, then the root; bf16 compute with fp32 reduction on CUDA when mixed_precision).
    Train through the returned object: its forward is what synchronises gradients."""
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        # an expert that receives no token in a step has no gradient: DDP must be told to expect that
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                   find_unused_parameters=bool(unwrap(model).moe_layers()))
    if strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        kw = {}
        if mixed_precision and device.type == "cuda":
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in unwrap(model).blocks:
            fully_shard(block, **kw)
        fully_shard(model, **kw)
        return model
    assert strategy == "none", f"unknown parallel strategy {strategy!r}: use none, ddp or fsdp"
    return model


def is_sharded(model):
    return any(type(p).__name__ == "DTensor" for p in unwrap(model).parameters())


@contextmanager
def fsdp_gathered(model):
    """Hold every FSDP2 layer's full parameters for a stretch of generation (no-op for other models).

    FSDP2 gathers a layer's parameters inside its forward. Generation would then all-gather every
    layer at every token, never gather the root's own embedding/norm/head (decoding bypasses the root
    forward), and deadlock when one rank's rows finish earlier than another's. Inside this block there
    are no collectives, so ranks may make different numbers of generate calls; entering and leaving it
    are collectives (every rank must do both). generate() enters it itself unless the caller already has."""
    model = unwrap(model)
    if not hasattr(model, "unshard") or getattr(model, "_fsdp_gathered", False):
        yield
        return
    model._get_fsdp_state()._lazy_init()  # what the first root forward would do
    sharded = [m for m in model.modules() if hasattr(m, "unshard")]
    model.set_reshard_after_forward(False)
    for m in sharded:
        m.unshard()
    model._fsdp_gathered = True
    try:
        yield
    finally:
        model._fsdp_gathered = False
        model.set_reshard_after_forward(True)
        for m in sharded:
            m.reshard()


def check_replicas_identical(model):
    """Under DDP: raise unless every rank holds exactly the same parameters. Replicas drift apart when a
    training forward bypasses the DDP wrapper (e.g. calling model.module), which skips gradient sync.
    A collective: call it on every rank. Returns the number of ranks compared."""
    sums = torch.stack([p.detach().double().sum() for p in unwrap(model).parameters()])
    gathered = [torch.empty_like(sums) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, sums)
    if not all(torch.equal(g, sums) for g in gathered):
        raise RuntimeError(f"DDP replicas diverged: parameters differ on rank {torch.distributed.get_rank()}; "
                           f"gradients were not synchronised (does every training forward go through the wrapper?)")
    return len(gathered)


# dense bf16 peak FLOP/s of one device (vendor spec sheets, without sparsity), for MFU
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12,
                   "A800": 312e12, "L40S": 362e12, "4090": 165e12}


def device_peak_flops(device):
    """The dense bf16 peak of a CUDA device (a torch.device, or a name like torch.cuda.get_device_name()), or None
    if it is unlisted or not a GPU (a CPU's peak is for the user to give)."""
    if isinstance(device, torch.device):
        if device.type != "cuda":
            return None
        device = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in device), None)


def mfu(flops, seconds, world_size, peak_flops):
    """Model FLOPs utilisation, as a log field: flops done on all ranks in seconds, over world_size devices of
    peak_flops each (model.flops counts them); "n/a" without a peak (the CPU, an unlisted GPU: pass peak_flops)."""
    return f"{float(flops) / seconds / world_size / peak_flops:.1%}" if peak_flops else "n/a"
