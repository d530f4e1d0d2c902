"""
Fused kernels for training, each with a plain PyTorch reference right beside it.

Every public op takes impl="torch" (the reference: plain PyTorch, runs anywhere, this is what CPU
training uses) or impl="triton" (hand-written Triton kernels; needs CUDA, or the CPU interpreter with
TRITON_INTERPRET=1, which is how the tests run without a GPU).

Ops:
    attention(q, k, v, causal, doc_ids)     flash attention (FA2-style), GQA, packed-document masks
    rms_norm(x, weight, eps)                RMSNorm
    apply_rope(x, cos, sin)                 rotary embedding, half-split (Llama/HF) convention
    swiglu(gate, up)                        silu(gate) * up
    cross_entropy(logits, targets, ...)     with ignore_index, z_loss, tanh softcap
    linear_cross_entropy(x, weight, ...)    LM head + CE, chunked so the (N, V) logits never exist
    moe_experts(x_sorted, counts, ...)      SwiGLU experts over expert-sorted tokens (grouped GEMM on CUDA)

The Triton paths are registered as torch custom ops (torch.library.custom_op with register_fake and
register_autograd, namespace "kernels"), so torch.compile traces a model that calls them as single graph
nodes: no graph breaks, and no recompiles per sequence length (the fake implementations are shape
functions, valid for symbolic shapes). One token at a time (decoding, T == 1) every op takes the torch
path: a handful of tiny launches per layer is all a decode step is, and Triton's per-launch overhead
would dominate it.

Attention kernels are autotuned per shape *bucket* (next power of two of T), not per exact length; the
winners are logged once, and with KERNELS_AUTOTUNE_CACHE=path they are saved there and reused by later
runs (and ranks), so reruns launch the same configs; KERNELS_AUTOTUNE=0 skips timing and always uses
the first config of each list (deterministic everywhere).

Triton is imported lazily so `import kernels` works on machines without it (e.g. macOS).
"""

import json
import math
import os
from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # no triton (macOS, minimal installs): only impl="torch" is available
    triton = None
    tl = None

# under the CPU interpreter every kernel program is executed in numpy, so we use tiny
# blocks and a single config to keep tests fast
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
Tensor = torch.Tensor


def resolve_impl(kernels, device):
    """Map a config value "auto" | "triton" | "torch" to the impl string the ops take."""
    if kernels not in ("auto", "triton", "torch"):
        raise ValueError(f"kernels must be 'auto', 'triton' or 'torch', got {kernels!r}")
    if kernels == "triton":
        return "triton"
    if kernels == "auto" and torch.device(device).type == "cuda" and triton is not None:
        return "triton"
    return "torch"


def _check_impl(impl):
    if impl == "triton":
        if triton is None:
            raise RuntimeError("impl='triton' requested but triton is not installed")
        return True
    if impl != "torch":
        raise ValueError(f"impl must be 'torch' or 'triton', got {impl!r}")
    return False


def _is_decode(x, t_dim=1):
    # one new token per row: (B, 1, ...) activations of a KV-cached decode step
    return x.dim() > t_dim + 1 and x.shape[t_dim] == 1


def _num_programs_hint(device):
    # how many persistent programs to launch for kernels that reduce across rows
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _dot_precision(dtype):
    """tl.dot input precision: fp32 inputs use tf32 tensor cores when torch allows tf32 for fp32 matmuls
    (torch.set_float32_matmul_precision("high"), or allow_tf32 = True as the training scripts set it),
    else the exact IEEE path (several times slower). 16-bit inputs ignore it."""
    if dtype != torch.float32:
        return "tf32"
    try:
        allowed = torch.get_float32_matmul_precision() != "highest"
    except RuntimeError:  # torch >= 2.9 raises when the legacy and the new precision APIs were mixed
        allowed = getattr(torch.backends.cuda.matmul, "fp32_precision", "ieee") == "tf32"
    return "tf32" if allowed else "ieee"


# -----------------------------------------------------------------------------
# Launch configs: forced (tests), cached, or timed once per shape bucket

_tuned = {}        # "kernel|key" -> config dict: the winners of this process (and of KERNELS_AUTOTUNE_CACHE)
_tuned_loaded = False
_forced = {}       # kernel name -> config entries that override the chosen config (force_configs)


@contextmanager
def force_configs(**configs):
    """Launch the named kernels with these config entries, e.g. force_configs(attn_fwd=dict(BLOCK_M=32,
    BLOCK_N=16)): the tests use it to make small inputs span several tiles of unequal size."""
    saved = dict(_forced)
    _forced.update(configs)
    try:
        yield
    finally:
        _forced.clear()
        _forced.update(saved)


def autotuned_configs():
    """{"kernel|key": config} of every config chosen by timing (or loaded) so far in this process."""
    return dict(_tuned)


def seq_bucket(T):
    """Autotune key of a sequence length: the next power of two (at least 64, at most 16384). Padded
    post-training batches come in hundreds of lengths; tuning each would re-time every config."""
    return min(max(64, 1 << max(0, T - 1).bit_length()), 16384)


def _log(msg):
    if os.environ.get("RANK", "0") == "0":
        print(f"kernels: {msg}", flush=True)


def _cache_tag():
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return f"triton {triton.__version__} | {dev}"


def _cache_path():
    return os.environ.get("KERNELS_AUTOTUNE_CACHE") or None


def _load_tuned():
    global _tuned_loaded
    path = _cache_path()
    if _tuned_loaded or not path:
        return
    _tuned_loaded = True
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved.get("tag") == _cache_tag():  # configs timed on another device or Triton version do not apply
            _tuned.update(saved.get("configs", {}))
            _log(f"loaded {len(saved.get('configs', {}))} autotuned configs from {path}")


def _save_tuned():
    path = _cache_path()
    if not path or os.environ.get("RANK", "0") != "0":
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(dict(tag=_cache_tag(), configs=_tuned), f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _choose_config(name, key, configs, launch):
    """The config to launch kernel `name` with for autotune key `key` (a tuple of ints/strings).
    launch(cfg) launches the kernel once on the real inputs and returns Triton's compiled kernel."""
    if name in _forced:
        return {**configs[0], **_forced[name]}
    capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()  # no timing in a CUDA graph
    if len(configs) == 1 or os.environ.get("KERNELS_AUTOTUNE", "1") == "0" or capturing:
        return configs[0]
    _load_tuned()
    k = "|".join([name] + [str(x) for x in key])
    if k in _tuned:
        return _tuned[k]
    from triton.runtime.errors import OutOfResources
    from triton.testing import do_bench
    ran, skipped = [], []
    for cfg in configs:
        try:
            compiled = launch(cfg)
        except OutOfResources:  # too much shared memory for this device
            skipped.append(f"{_cfg_str(cfg)}: out of resources")
            continue
        spills = getattr(compiled, "n_spills", 0) or 0
        ran.append((cfg, spills))
    if not ran:
        raise RuntimeError(f"kernels: no launch config of {name} fits this device ({'; '.join(skipped)})")
    # register spills make a kernel slow and its timing misleading: time only the ones without, if any
    candidates = [c for c, s in ran if s == 0] or [c for c, _ in ran]
    skipped += [f"{_cfg_str(c)}: {s} spilled registers" for c, s in ran if s and c not in candidates] + \
        [f"{_cfg_str(c)}: {s} spilled registers (kept: every config spills)" for c, s in ran if s and c in candidates]
    times = [do_bench(lambda: launch(c), warmup=5, rep=20) for c in candidates]
    best = candidates[min(range(len(times)), key=times.__getitem__)]
    _tuned[k] = best
    _log(f"autotuned {k} -> {_cfg_str(best)} ({min(times):.3f} ms; {len(candidates)} timed"
         + (f"; {'; '.join(skipped)}" if skipped else "") + ")")
    _save_tuned()
    return best


def _cfg_str(cfg):
    return " ".join(f"{k}={v}" for k, v in cfg.items())


# -----------------------------------------------------------------------------
# Argument checks: ValueErrors that name the op, the shapes and the fix (asserts vanish under python -O)

def _fail(op, msg):
    raise ValueError(f"kernels.{op}: {msg}")


_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _check_attention_args(q, k, v, doc_ids):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        _fail("attention", f"q, k, v must be 4-D (B, heads, T, head_dim), got {tuple(q.shape)}, {tuple(k.shape)}, "
                           f"{tuple(v.shape)}")
    B, H, T, D = q.shape
    if k.shape != v.shape:
        _fail("attention", f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if k.shape[0] != B or k.shape[3] != D:
        _fail("attention", f"k/v {tuple(k.shape)} must be (B={B}, n_kv_head, T, head_dim={D}) for q {tuple(q.shape)}")
    if k.shape[2] != T:
        _fail("attention", f"q has {T} positions but k/v have {k.shape[2]}: only self-attention over one sequence "
                           "is supported (seq_q == seq_k); attend to a KV cache with F.scaled_dot_product_attention")
    if H % k.shape[1] != 0:
        _fail("attention", f"n_head={H} must be a multiple of n_kv_head={k.shape[1]}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _FLOATS:
        _fail("attention", f"q, k, v must share one float dtype (fp32/fp16/bf16), got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        _fail("attention", f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
    if doc_ids is not None:
        if tuple(doc_ids.shape) != (B, T) or doc_ids.dtype.is_floating_point or doc_ids.dtype == torch.bool:
            _fail("attention", f"doc_ids must be an integer tensor of shape (B={B}, T={T}), got "
                               f"{doc_ids.dtype} {tuple(doc_ids.shape)}")


def _check_targets(op, targets, N, V, ignore_index):
    if targets.dim() != 1 or targets.shape[0] != N or targets.dtype.is_floating_point or targets.dtype == torch.bool:
        _fail(op, f"targets must be an integer tensor of shape (N={N},), got {targets.dtype} {tuple(targets.shape)}")
    if torch.compiler.is_compiling():  # reading the values back would break the graph
        return
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
    if bool(bad.any()):  # the kernels would read logits out of bounds
        i = int(bad.nonzero()[0, 0])
        _fail(op, f"target {int(targets[i])} at row {i} is outside the vocabulary [0, {V}) and is not "
                  f"ignore_index={ignore_index}")


# -----------------------------------------------------------------------------
# Attention

def _attention_torch(q, k, v, causal, doc_ids):
    if doc_ids is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    T = q.shape[2]
    mask = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T) same document
    if causal:
        mask = mask & torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=True)


def document_bounds(doc_ids):
    """(B, T) ids -> (3, B, T) int32 [ids, first, end]: for each token the first position and one past the
    last position of its document id in its row. For packed rows (ids in runs) these are the document's
    start and end; for ids in any order they still bound every position a token may attend to. Computed
    on the device with a sort, no host sync."""
    B, T = doc_ids.shape
    ids, order = torch.sort(doc_ids, dim=1, stable=True)
    pos = torch.arange(T, device=doc_ids.device).expand(B, T)
    starts = torch.ones(B, T, dtype=torch.bool, device=doc_ids.device)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    run_first = torch.where(starts, pos, 0).cummax(1).values                    # sorted index of the run's start
    run_last = torch.where(ends, pos, T - 1).flip(1).cummin(1).values.flip(1)   # and of its end
    # a stable sort keeps equal ids in position order: a run's first/last element has the smallest/largest position
    first = torch.empty_like(order).scatter_(1, order, order.gather(1, run_first))
    end = torch.empty_like(order).scatter_(1, order, order.gather(1, run_last) + 1)
    return torch.stack([doc_ids.to(order.dtype), first, end]).to(torch.int32)


if triton is not None:

    def _attn_configs(rows):
        if INTERPRET:
            return [dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)]
        return [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s) for bm, bn, w, s in rows]

    # (BLOCK_M, BLOCK_N, warps, stages) for Hopper/Ampere, first = the default when timing is off. BLOCK_M
    # tiles queries, BLOCK_N keys, in every kernel. Configs that spill registers at the launched head dim
    # are dropped at tuning time (Triton reports the spills); those that spilled at hd 128 in the
    # ahead-of-time review (fwd 128x64 with 4 warps; dK/dV 16x128 and 32x128 with 8 warps) are gone. The
    # backward lists include the Triton fused-attention tutorial's choice (dK/dV 32 queries x 128 keys,
    # dQ 128 x 32, 4 warps, 5 stages).
    _ATTN_FWD_CONFIGS = _attn_configs([(128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3),
                                       (64, 32, 4, 4)])
    _ATTN_DKDV_CONFIGS = _attn_configs([(64, 64, 8, 2), (32, 64, 8, 2), (32, 64, 4, 3), (32, 128, 4, 5)])
    _ATTN_DQ_CONFIGS = _attn_configs([(128, 32, 8, 3), (128, 64, 8, 2), (128, 32, 4, 5), (64, 64, 4, 3),
                                      (64, 32, 4, 3)])

    @triton.jit
    def _tile(BASE, start, offs, stride_t, offs_d, stride_d):
        # pointers of rows start + offs and columns offs_d: the row base in int64 (start * stride passes
        # 2^31 on long sequences), the offsets within the tile in int32
        return BASE + tl.cast(start, tl.int64) * stride_t + offs[:, None] * stride_t + offs_d[None, :] * stride_d

    @triton.jit
    def _attn_tile_mask(rows, cols, T, doc_r, doc_c, CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr):
        # (len(rows), len(cols)) boolean: may query row attend to key col
        valid = (rows[:, None] < T) & (cols[None, :] < T)
        if CAUSAL:
            valid = valid & (rows[:, None] >= cols[None, :])
        if HAS_DOC:
            valid = valid & (doc_r[:, None] == doc_c[None, :])
        return valid

    @triton.jit
    def _doc_span(DOCS_b, doc_stride, offs, T):
        # the positions a block of tokens may attend to (or be attended from) by document: [min first, max end)
        m = offs < T
        lo = tl.min(tl.load(DOCS_b + doc_stride + offs, mask=m, other=T), axis=0)
        hi = tl.max(tl.load(DOCS_b + 2 * doc_stride + offs, mask=m, other=0), axis=0)
        return lo, hi

    @triton.jit
    def _attn_fwd_tile(acc, l_i, m_i, q, K_bh, V_bh, DOCS_b, rows, doc_q, start_n, T,
                       stride_kt, stride_kd, stride_vt, stride_vd, qk_scale,
                       HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr,
                       DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        # one key/value tile of the online softmax. MASKED=False only for tiles the caller knows are
        # fully visible (below the causal diagonal, inside T, no doc mask): saves the mask math
        offs_n = tl.arange(0, BLOCK_N)
        cols = start_n + offs_n
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < HEAD_DIM
        kt_ptrs = (K_bh + tl.cast(start_n, tl.int64) * stride_kt + offs_n[None, :] * stride_kt
                   + offs_d[:, None] * stride_kd)  # (D, N): K^T
        v_ptrs = _tile(V_bh, start_n, offs_n, stride_vt, offs_d, stride_vd)
        if MASKED:  # the only tiles that can reach past T
            kt = tl.load(kt_ptrs, mask=(cols[None, :] < T) & mask_d[:, None], other=0.0)
        elif BLOCK_D == HEAD_DIM:
            kt = tl.load(kt_ptrs)
        else:
            kt = tl.load(kt_ptrs, mask=mask_d[:, None], other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale  # in log2 units (scale * log2 e)
        if MASKED:
            doc_k = cols
            if HAS_DOC:
                doc_k = tl.load(DOCS_b + cols, mask=cols < T, other=-1)
            s = tl.where(_attn_tile_mask(rows, cols, T, doc_q, doc_k, CAUSAL, HAS_DOC), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_ptrs, mask=(cols[:, None] < T) & mask_d[None, :], other=0.0)
        elif BLOCK_D == HEAD_DIM:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=mask_d[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        return acc, l_i, m_new

    @triton.jit
    def _attn_fwd_kernel(
        Q, K, V, O, LSE, DOCS,
        stride_qb, stride_qh, stride_qt, stride_qd,
        stride_kb, stride_kh, stride_kt, stride_kd,
        stride_vb, stride_vh, stride_vt, stride_vd,
        stride_ob, stride_oh, stride_ot, stride_od,
        stride_docb, doc_stride,
        H, T, GROUP, qk_scale,
        HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, DOT_PREC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # one flat grid axis (the second one stops at 65535 programs, less than batch x heads can be); the
        # query blocks of one head are neighbours, so they share its K/V tiles in L2
        n_m = tl.cdiv(T, BLOCK_M)
        start_m = (tl.program_id(0) % n_m) * BLOCK_M
        bh = (tl.program_id(0) // n_m).to(tl.int64)  # int64: b * stride_qb passes 2^31 on large batches
        b = bh // H
        h = bh % H
        hk = h // GROUP  # GQA: the kv head this query head reads, no repeated K/V in memory
        offs_m = tl.arange(0, BLOCK_M)
        rows = start_m + offs_m
        offs_d = tl.arange(0, BLOCK_D)
        io_mask = (rows[:, None] < T) & (offs_d[None, :] < HEAD_DIM)
        q = tl.load(_tile(Q + b * stride_qb + h * stride_qh, start_m, offs_m, stride_qt, offs_d, stride_qd),
                    mask=io_mask, other=0.0)
        K_bh = K + b * stride_kb + hk * stride_kh
        V_bh = V + b * stride_vb + hk * stride_vh
        DOCS_b = DOCS + b * stride_docb

        # running max starts finite so that a fully-masked tile never computes (-inf) - (-inf)
        m_i = tl.full([BLOCK_M], -1e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

        if HAS_DOC:
            # only the key tiles of this block's documents, in one loop without a branch around the loads
            # and dots (a runtime `if` there switches off software pipelining)
            doc_q = tl.load(DOCS_b + rows, mask=rows < T, other=-2)
            lo, hi = _doc_span(DOCS_b, doc_stride, rows, T)
            if CAUSAL:
                hi = tl.minimum(hi, start_m + BLOCK_M)
            for start_n in range((lo // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
                acc, l_i, m_i = _attn_fwd_tile(acc, l_i, m_i, q, K_bh, V_bh, DOCS_b, rows, doc_q, start_n, T,
                                               stride_kt, stride_kd, stride_vt, stride_vd, qk_scale,
                                               HEAD_DIM, True, CAUSAL, True, DOT_PREC, BLOCK_N, BLOCK_D)
        else:
            # key tiles [0, n_full) need no mask; [n_full, hi) do (diagonal or ragged end). Causal: tiles
            # strictly above the diagonal are fully masked and never visited.
            if CAUSAL:
                n_full = (start_m // BLOCK_N) * BLOCK_N
                hi = tl.minimum(start_m + BLOCK_M, T)
            else:
                n_full = (T // BLOCK_N) * BLOCK_N
                hi = T
            for start_n in range(0, n_full, BLOCK_N):
                acc, l_i, m_i = _attn_fwd_tile(acc, l_i, m_i, q, K_bh, V_bh, DOCS_b, rows, rows, start_n, T,
                                               stride_kt, stride_kd, stride_vt, stride_vd, qk_scale,
                                               HEAD_DIM, False, CAUSAL, False, DOT_PREC, BLOCK_N, BLOCK_D)
            for start_n in range(n_full, hi, BLOCK_N):
                acc, l_i, m_i = _attn_fwd_tile(acc, l_i, m_i, q, K_bh, V_bh, DOCS_b, rows, rows, start_n, T,
                                               stride_kt, stride_kd, stride_vt, stride_vd, qk_scale,
                                               HEAD_DIM, True, CAUSAL, False, DOT_PREC, BLOCK_N, BLOCK_D)

        l_i = tl.where(l_i == 0.0, 1.0, l_i)  # only padding rows can have nothing to attend to
        acc = acc / l_i[:, None]
        tl.store(_tile(O + b * stride_ob + h * stride_oh, start_m, offs_m, stride_ot, offs_d, stride_od),
                 acc.to(O.dtype.element_ty), mask=io_mask)
        # log-sum-exp in log2 units, exactly what the backward needs to rebuild P = exp2(s - lse)
        tl.store(LSE + bh * T + rows, m_i + tl.log2(l_i), mask=rows < T)

    @triton.jit
    def _attn_bwd_preprocess_kernel(O, DO, DELTA, stride_ob, stride_oh, stride_ot, stride_od,
                                    stride_dob, stride_doh, stride_dot, stride_dod,
                                    H, T, HEAD_DIM, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        # delta_i = sum_d dO_id * O_id = rowsum(dP * P) for row i, used in dS = P * (dP - delta)
        n_m = tl.cdiv(T, BLOCK_M)
        bh = (tl.program_id(0) // n_m).to(tl.int64)
        b = bh // H
        h = bh % H
        start_m = (tl.program_id(0) % n_m) * BLOCK_M
        offs_m = tl.arange(0, BLOCK_M)
        rows = start_m + offs_m
        offs_d = tl.arange(0, BLOCK_D)
        m = (rows[:, None] < T) & (offs_d[None, :] < HEAD_DIM)
        o = tl.load(_tile(O + b * stride_ob + h * stride_oh, start_m, offs_m, stride_ot, offs_d, stride_od),
                    mask=m, other=0.0)
        do = tl.load(_tile(DO + b * stride_dob + h * stride_doh, start_m, offs_m, stride_dot, offs_d, stride_dod),
                     mask=m, other=0.0)
        tl.store(DELTA + bh * T + rows, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=rows < T)

    @triton.jit
    def _attn_dkdv_tile(dk, dv, k, v, Q_bh, DO_bh, LSE_bh, DELTA_bh, DOCS_b, cols, doc_k, start_m, T,
                        stride_qt, stride_qd, stride_dot, stride_dod, qk_scale,
                        HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr,
                        DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        # one query tile's contribution to dK/dV of this key block. Works on the transposed tile
        # (keys x queries) so results land in dK/dV's layout without transposing accumulators.
        offs_m = tl.arange(0, BLOCK_M)
        rows = start_m + offs_m
        offs_d = tl.arange(0, BLOCK_D)
        q_mask = (rows[:, None] < T) & (offs_d[None, :] < HEAD_DIM)
        q = tl.load(_tile(Q_bh, start_m, offs_m, stride_qt, offs_d, stride_qd), mask=q_mask, other=0.0)
        do = tl.load(_tile(DO_bh, start_m, offs_m, stride_dot, offs_d, stride_dod), mask=q_mask, other=0.0)
        # lse = +inf on padding rows makes their P exactly 0 even in unmasked tiles
        lse = tl.load(LSE_bh + rows, mask=rows < T, other=float("inf"))
        delta = tl.load(DELTA_bh + rows, mask=rows < T, other=0.0)
        sT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale
        pT = tl.exp2(sT - lse[None, :])
        if MASKED:
            doc_q = rows
            if HAS_DOC:
                doc_q = tl.load(DOCS_b + rows, mask=rows < T, other=-2)
            pT = tl.where(tl.trans(_attn_tile_mask(rows, cols, T, doc_q, doc_k, CAUSAL, HAS_DOC)), pT, 0.0)
        dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(q.dtype), q, input_precision=DOT_PREC)
        return dk, dv

    @triton.jit
    def _attn_bwd_dkdv_kernel(
        Q, K, V, DO, LSE, DELTA, DK, DV, DOCS,
        stride_qb, stride_qh, stride_qt, stride_qd,
        stride_kb, stride_kh, stride_kt, stride_kd,
        stride_vb, stride_vh, stride_vt, stride_vd,
        stride_dob, stride_doh, stride_dot, stride_dod,
        stride_dkb, stride_dkh, stride_dkt, stride_dkd,  # DK and DV share one layout
        stride_docb, doc_stride,
        H, H_KV, T, GROUP, SPLIT, HEADS_PER_PROGRAM, qk_scale, sm_scale,
        HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, DOT_PREC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # One program per (key block, kv head, slice of its query-head group). It walks the query blocks of
        # HEADS_PER_PROGRAM = GROUP / SPLIT query heads, so dK/dV are summed over those heads in registers
        # (no atomics: the result is bitwise reproducible). SPLIT > 1 spreads one GQA group over SPLIT
        # programs when (key blocks x kv heads) alone would leave SMs idle (MQA at batch 1); each then
        # writes an fp32 partial that the caller sums over the group.
        n_n = tl.cdiv(T, BLOCK_N)
        start_n = (tl.program_id(0) % n_n) * BLOCK_N
        pid = (tl.program_id(0) // n_n).to(tl.int64)
        part = pid % SPLIT
        bhk = pid // SPLIT
        b = bhk // H_KV
        hk = bhk % H_KV
        offs_n = tl.arange(0, BLOCK_N)
        cols = start_n + offs_n
        offs_d = tl.arange(0, BLOCK_D)
        kv_mask = (cols[:, None] < T) & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(_tile(K + b * stride_kb + hk * stride_kh, start_n, offs_n, stride_kt, offs_d, stride_kd),
                    mask=kv_mask, other=0.0)
        v = tl.load(_tile(V + b * stride_vb + hk * stride_vh, start_n, offs_n, stride_vt, offs_d, stride_vd),
                    mask=kv_mask, other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        DOCS_b = DOCS + b * stride_docb

        if HAS_DOC:
            # the query blocks of this key block's documents (causal: from the block on), one loop, no branch
            doc_k = tl.load(DOCS_b + cols, mask=cols < T, other=-1)
            lo, hi = _doc_span(DOCS_b, doc_stride, cols, T)
            if CAUSAL:
                lo = tl.maximum(lo, start_n)
            lo = (lo // BLOCK_M) * BLOCK_M
            mid = lo
        else:
            # causal: query tiles before this key block see none of it (skipped), tiles in [lo, mid)
            # straddle the diagonal (masked), tiles from mid on see all of it (unmasked)
            doc_k = cols
            lo = 0
            mid = 0
            hi = T
            if CAUSAL:
                lo = (start_n // BLOCK_M) * BLOCK_M
                mid = tl.minimum((start_n + BLOCK_N + BLOCK_M - 1) // BLOCK_M * BLOCK_M, T)
        for g in range(HEADS_PER_PROGRAM):
            h = hk * GROUP + part * HEADS_PER_PROGRAM + g
            Q_bh = Q + b * stride_qb + h * stride_qh
            DO_bh = DO + b * stride_dob + h * stride_doh
            LSE_bh = LSE + (b * H + h) * T
            DELTA_bh = DELTA + (b * H + h) * T
            if HAS_DOC:
                for start_m in range(lo, hi, BLOCK_M):
                    dk, dv = _attn_dkdv_tile(dk, dv, k, v, Q_bh, DO_bh, LSE_bh, DELTA_bh, DOCS_b, cols, doc_k,
                                             start_m, T, stride_qt, stride_qd, stride_dot, stride_dod, qk_scale,
                                             HEAD_DIM, True, CAUSAL, True, DOT_PREC, BLOCK_M, BLOCK_D)
            else:
                for start_m in range(lo, mid, BLOCK_M):
                    dk, dv = _attn_dkdv_tile(dk, dv, k, v, Q_bh, DO_bh, LSE_bh, DELTA_bh, DOCS_b, cols, doc_k,
                                             start_m, T, stride_qt, stride_qd, stride_dot, stride_dod, qk_scale,
                                             HEAD_DIM, True, CAUSAL, False, DOT_PREC, BLOCK_M, BLOCK_D)
                for start_m in range(mid, hi, BLOCK_M):
                    dk, dv = _attn_dkdv_tile(dk, dv, k, v, Q_bh, DO_bh, LSE_bh, DELTA_bh, DOCS_b, cols, doc_k,
                                             start_m, T, stride_qt, stride_qd, stride_dot, stride_dod, qk_scale,
                                             HEAD_DIM, False, CAUSAL, False, DOT_PREC, BLOCK_M, BLOCK_D)
        dk = dk * sm_scale
        out = DK + b * stride_dkb + (hk * SPLIT + part) * stride_dkh
        tl.store(_tile(out, start_n, offs_n, stride_dkt, offs_d, stride_dkd), dk.to(DK.dtype.element_ty), mask=kv_mask)
        out = DV + b * stride_dkb + (hk * SPLIT + part) * stride_dkh
        tl.store(_tile(out, start_n, offs_n, stride_dkt, offs_d, stride_dkd), dv.to(DV.dtype.element_ty), mask=kv_mask)

    @triton.jit
    def _attn_dq_tile(dq, q, do, lse, delta, K_bh, V_bh, DOCS_b, rows, doc_q, start_n, T,
                      stride_kt, stride_kd, stride_vt, stride_vd, qk_scale,
                      HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr,
                      DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        offs_n = tl.arange(0, BLOCK_N)
        cols = start_n + offs_n
        offs_d = tl.arange(0, BLOCK_D)
        k_ptrs = _tile(K_bh, start_n, offs_n, stride_kt, offs_d, stride_kd)
        v_ptrs = _tile(V_bh, start_n, offs_n, stride_vt, offs_d, stride_vd)
        if MASKED:  # the only tiles that can reach past T
            kv_mask = (cols[:, None] < T) & (offs_d[None, :] < HEAD_DIM)
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
            v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        elif BLOCK_D == HEAD_DIM:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            k = tl.load(k_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
            v = tl.load(v_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        p = tl.exp2(s - lse[:, None])
        if MASKED:
            doc_k = cols
            if HAS_DOC:
                doc_k = tl.load(DOCS_b + cols, mask=cols < T, other=-1)
            p = tl.where(_attn_tile_mask(rows, cols, T, doc_q, doc_k, CAUSAL, HAS_DOC), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
        return dq

    @triton.jit
    def _attn_bwd_dq_kernel(
        Q, K, V, DO, LSE, DELTA, DQ, DOCS,
        stride_qb, stride_qh, stride_qt, stride_qd,
        stride_kb, stride_kh, stride_kt, stride_kd,
        stride_vb, stride_vh, stride_vt, stride_vd,
        stride_dob, stride_doh, stride_dot, stride_dod,
        stride_dqb, stride_dqh, stride_dqt, stride_dqd,
        stride_docb, doc_stride,
        H, T, GROUP, qk_scale, sm_scale,
        HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, DOT_PREC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # a separate pass for dQ (one program per query block) rebuilds P once more: 7 tile GEMMs per
        # (query, key) tile pair against FlashAttention-2's 5, which accumulates dQ with atomic adds from the
        # dK/dV pass instead. Atomics make dQ's summation order vary from run to run; this repository
        # promises bitwise-identical reruns, so it pays the two extra GEMMs (as Triton's tutorial does).
        n_m = tl.cdiv(T, BLOCK_M)
        start_m = (tl.program_id(0) % n_m) * BLOCK_M
        bh = (tl.program_id(0) // n_m).to(tl.int64)
        b = bh // H
        h = bh % H
        hk = h // GROUP
        offs_m = tl.arange(0, BLOCK_M)
        rows = start_m + offs_m
        offs_d = tl.arange(0, BLOCK_D)
        q_mask = (rows[:, None] < T) & (offs_d[None, :] < HEAD_DIM)
        q = tl.load(_tile(Q + b * stride_qb + h * stride_qh, start_m, offs_m, stride_qt, offs_d, stride_qd),
                    mask=q_mask, other=0.0)
        do = tl.load(_tile(DO + b * stride_dob + h * stride_doh, start_m, offs_m, stride_dot, offs_d, stride_dod),
                     mask=q_mask, other=0.0)
        lse = tl.load(LSE + bh * T + rows, mask=rows < T, other=float("inf"))
        delta = tl.load(DELTA + bh * T + rows, mask=rows < T, other=0.0)
        K_bh = K + b * stride_kb + hk * stride_kh
        V_bh = V + b * stride_vb + hk * stride_vh
        DOCS_b = DOCS + b * stride_docb
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

        if HAS_DOC:  # same key range as the forward
            doc_q = tl.load(DOCS_b + rows, mask=rows < T, other=-2)
            lo, hi = _doc_span(DOCS_b, doc_stride, rows, T)
            if CAUSAL:
                hi = tl.minimum(hi, start_m + BLOCK_M)
            for start_n in range((lo // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
                dq = _attn_dq_tile(dq, q, do, lse, delta, K_bh, V_bh, DOCS_b, rows, doc_q, start_n, T,
                                   stride_kt, stride_kd, stride_vt, stride_vd, qk_scale,
                                   HEAD_DIM, True, CAUSAL, True, DOT_PREC, BLOCK_N, BLOCK_D)
        else:  # same tile split as the forward: [0, n_full) unmasked, [n_full, hi) masked
            if CAUSAL:
                n_full = (start_m // BLOCK_N) * BLOCK_N
                hi = tl.minimum(start_m + BLOCK_M, T)
            else:
                n_full = (T // BLOCK_N) * BLOCK_N
                hi = T
            for start_n in range(0, n_full, BLOCK_N):
                dq = _attn_dq_tile(dq, q, do, lse, delta, K_bh, V_bh, DOCS_b, rows, rows, start_n, T,
                                   stride_kt, stride_kd, stride_vt, stride_vd, qk_scale,
                                   HEAD_DIM, False, CAUSAL, False, DOT_PREC, BLOCK_N, BLOCK_D)
            for start_n in range(n_full, hi, BLOCK_N):
                dq = _attn_dq_tile(dq, q, do, lse, delta, K_bh, V_bh, DOCS_b, rows, rows, start_n, T,
                                   stride_kt, stride_kd, stride_vt, stride_vd, qk_scale,
                                   HEAD_DIM, True, CAUSAL, False, DOT_PREC, BLOCK_N, BLOCK_D)
        dq = dq * sm_scale
        tl.store(_tile(DQ + b * stride_dqb + h * stride_dqh, start_m, offs_m, stride_dqt, offs_d, stride_dqd),
                 dq.to(DQ.dtype.element_ty), mask=q_mask)

    def _attn_key(name, q, k, causal, docs):
        B, H, T, D = q.shape
        gqa = "gqa" if k.shape[1] < H else "mha"
        return (seq_bucket(T), D, int(causal), int(docs is not None), str(q.dtype)[6:], gqa)

    def _attn_fwd_triton(q, k, v, docs, causal):
        B, H, T, D = q.shape
        H_KV = k.shape[1]
        o = torch.empty_like(q)
        lse = torch.empty((B, H, T), device=q.device, dtype=torch.float32)
        doc_ptr = docs if docs is not None else lse  # dummy pointer, never read
        doc_strides = (docs.stride(1), docs.stride(0)) if docs is not None else (0, 0)

        def launch(cfg):
            return _attn_fwd_kernel[(triton.cdiv(T, cfg["BLOCK_M"]) * B * H,)](
                q, k, v, o, lse, doc_ptr, *q.stride(), *k.stride(), *v.stride(), *o.stride(), *doc_strides,
                H, T, H // H_KV, 1.4426950408889634 / math.sqrt(D),
                HEAD_DIM=D, CAUSAL=causal, HAS_DOC=docs is not None, DOT_PREC=_dot_precision(q.dtype),
                BLOCK_D=max(16, triton.next_power_of_2(D)),  # tl.dot needs every dim >= 16
                BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"],
                num_stages=cfg["num_stages"])

        launch(_choose_config("attn_fwd", _attn_key("attn_fwd", q, k, causal, docs), _ATTN_FWD_CONFIGS, launch))
        return o, lse

    def _gqa_split(B, H_KV, group, n_key_blocks, device):
        # how many programs share one GQA group in the dK/dV pass: enough for a full wave of SMs
        if device.type != "cuda" or group == 1:
            return 1
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        for split in range(1, group + 1):
            if group % split == 0 and n_key_blocks * B * H_KV * split >= sms:
                return split
        return group

    def _attn_bwd_triton(do, q, k, v, o, lse, docs, causal):
        B, H, T, D = q.shape
        H_KV = k.shape[1]
        group = H // H_KV
        if do.stride(-1) != 1:
            do = do.contiguous()
        BLOCK_D = max(16, triton.next_power_of_2(D))
        dot_prec = _dot_precision(q.dtype)
        qk_scale = 1.4426950408889634 / math.sqrt(D)
        delta = torch.empty_like(lse)
        PRE_M = 16 if INTERPRET else 64
        _attn_bwd_preprocess_kernel[(triton.cdiv(T, PRE_M) * B * H,)](
            o, do, delta, *o.stride(), *do.stride(), H, T, D, BLOCK_M=PRE_M, BLOCK_D=BLOCK_D)
        dq = torch.empty_like(q)
        dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)  # dk and dv share the kernel's output strides
        dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
        doc_ptr = docs if docs is not None else lse
        doc_strides = (docs.stride(1), docs.stride(0)) if docs is not None else (0, 0)
        has_doc = docs is not None
        key = _attn_key("attn_dkdv", q, k, causal, docs)
        partials = {}  # split -> fp32 (2, B, H_KV * split, T, D) partial dK/dV
        used_split = [1]

        def launch_dkdv(cfg):
            split = cfg.get("SPLIT") or _gqa_split(B, H_KV, group, triton.cdiv(T, cfg["BLOCK_N"]), q.device)
            if group % split:
                raise ValueError(f"SPLIT={split} must divide the GQA group size {group}")
            if split == 1:
                out_k, out_v = dk, dv
            else:  # fp32 partial sums, one per slice of the group, summed below
                if split not in partials:
                    partials[split] = torch.empty((2, B, H_KV * split, T, D), device=q.device, dtype=torch.float32)
                out_k, out_v = partials[split]
            compiled = _attn_bwd_dkdv_kernel[(triton.cdiv(T, cfg["BLOCK_N"]) * B * H_KV * split,)](
                q, k, v, do, lse, delta, out_k, out_v, doc_ptr,
                *q.stride(), *k.stride(), *v.stride(), *do.stride(), *out_k.stride(), *doc_strides,
                H, H_KV, T, group, split, group // split, qk_scale, 1.0 / math.sqrt(D),
                HEAD_DIM=D, CAUSAL=causal, HAS_DOC=has_doc, DOT_PREC=dot_prec, BLOCK_D=BLOCK_D,
                BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"],
                num_stages=cfg["num_stages"])
            used_split[0] = split
            return compiled

        def launch_dq(cfg):
            return _attn_bwd_dq_kernel[(triton.cdiv(T, cfg["BLOCK_M"]) * B * H,)](
                q, k, v, do, lse, delta, dq, doc_ptr,
                *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(), *doc_strides,
                H, T, group, qk_scale, 1.0 / math.sqrt(D),
                HEAD_DIM=D, CAUSAL=causal, HAS_DOC=has_doc, DOT_PREC=dot_prec, BLOCK_D=BLOCK_D,
                BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"],
                num_stages=cfg["num_stages"])

        launch_dkdv(_choose_config("attn_dkdv", key, _ATTN_DKDV_CONFIGS, launch_dkdv))
        if used_split[0] > 1:  # sum the partials over the slices of each group (fixed order: deterministic)
            pk, pv = partials[used_split[0]]
            dk.copy_(pk.view(B, H_KV, used_split[0], T, D).sum(2))
            dv.copy_(pv.view(B, H_KV, used_split[0], T, D).sum(2))
        launch_dq(_choose_config("attn_dq", key, _ATTN_DQ_CONFIGS, launch_dq))
        return dq, dk, dv

    # --- as custom ops: one graph node each under torch.compile ---

    @torch.library.custom_op("kernels::attention_fwd", mutates_args=())
    def _attention_fwd_op(q: Tensor, k: Tensor, v: Tensor, docs: Optional[Tensor],
                          causal: bool) -> tuple[Tensor, Tensor]:
        return _attn_fwd_triton(q, k, v, docs, causal)

    @_attention_fwd_op.register_fake
    def _(q, k, v, docs, causal):
        return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)

    @torch.library.custom_op("kernels::attention_bwd", mutates_args=())
    def _attention_bwd_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, docs: Optional[Tensor],
                          causal: bool) -> tuple[Tensor, Tensor, Tensor]:
        return _attn_bwd_triton(do, q, k, v, o, lse, docs, causal)

    @_attention_bwd_op.register_fake
    def _(do, q, k, v, o, lse, docs, causal):
        return torch.empty_like(q), k.new_empty(k.shape), v.new_empty(v.shape)

    def _attention_setup(ctx, inputs, output):
        q, k, v, docs, causal = inputs
        ctx.save_for_backward(q, k, v, *output, docs)
        ctx.causal = causal

    def _attention_backward(ctx, do, dlse):
        q, k, v, o, lse, docs = ctx.saved_tensors
        dq, dk, dv = _attention_bwd_op(do, q, k, v, o, lse, docs, ctx.causal)
        return dq, dk, dv, None, None

    _attention_fwd_op.register_autograd(_attention_backward, setup_context=_attention_setup)


def attention(q, k, v, causal=True, doc_ids=None, impl="torch"):
    """q: (B, n_head, T, hd), k/v: (B, n_kv_head, T, hd). doc_ids: None or (B, T) ints; tokens only
    attend within their own document. Softmax scale 1/sqrt(hd). Returns (B, n_head, T, hd)."""
    _check_attention_args(q, k, v, doc_ids)
    if _check_impl(impl) and q.shape[2] > 1:
        docs = document_bounds(doc_ids) if doc_ids is not None else None
        return _attention_fwd_op(q, k, v, docs, causal)[0]
    return _attention_torch(q, k, v, causal, doc_ids)


# -----------------------------------------------------------------------------
# RMSNorm

class _RMSNormTorch(torch.autograd.Function):
    """The reference, y = x / sqrt(mean(x^2) + eps) * weight in fp32, with its gradient written out: autograd
    through the five ops of the formula keeps four activation-sized temporaries and makes ten passes."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = x.float()
        rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True).add_(eps))
        y = xf * rstd
        if weight is not None:
            y.mul_(weight.float())
        ctx.save_for_backward(x, weight, rstd)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        xhat = x.float() * rstd
        dyf = dy.float()
        dw = None
        if weight is not None and ctx.needs_input_grad[1]:
            dw = (dyf * xhat).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        g = dyf * weight.float() if weight is not None else dyf
        # d/dx of x * rstd(x): rstd * (g - xhat * mean(g * xhat))
        dx = g - xhat * (g * xhat).mean(-1, keepdim=True)
        return dx.mul_(rstd).to(x.dtype), dw, None


if triton is not None:

    @triton.jit
    def _rms_norm_fwd_kernel(X, W, Y, RSTD, stride_x, stride_y, D, eps, BLOCK_D: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # int64: row * stride passes 2^31 on large activations
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / D + eps)
        tl.store(Y + row * stride_y + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + row, rstd)

    @triton.jit
    def _rms_norm_bwd_kernel(X, W, DY, RSTD, DX, DW_PARTIAL, stride_x, stride_dy, stride_dx,
                             M, D, rows_per_program, BLOCK_D: tl.constexpr):
        # each program owns a contiguous range of rows and writes one partial dW row; the
        # partials are summed afterwards (deterministic, no atomics)
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_D], dtype=tl.float32)
        row_start = pid * rows_per_program
        row_end = tl.minimum(row_start + rows_per_program, M)
        for r in range(row_start, row_end):
            row = tl.cast(r, tl.int64)
            x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row)
            xhat = x * rstd
            g = dy * w
            # d/dx of x*rstd: rstd * (g - xhat * mean(g * xhat))
            dx = rstd * (g - xhat * (tl.sum(g * xhat, 0) / D))
            tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
            dw += dy * xhat
        tl.store(DW_PARTIAL + pid * D + cols, dw, mask=mask)

    def _rms_warps(D):
        return min(max(triton.next_power_of_2(D) // 256, 1), 8)

    @torch.library.custom_op("kernels::rms_norm_fwd", mutates_args=())
    def _rms_norm_fwd_op(x: Tensor, w: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        M, D = x.shape
        y = torch.empty((M, D), device=x.device, dtype=x.dtype)
        rstd = torch.empty(M, device=x.device, dtype=torch.float32)
        _rms_norm_fwd_kernel[(M,)](x, w, y, rstd, x.stride(0), y.stride(0), D, eps,
                                   BLOCK_D=triton.next_power_of_2(D), num_warps=_rms_warps(D))
        return y, rstd

    @_rms_norm_fwd_op.register_fake
    def _(x, w, eps):
        return x.new_empty(x.shape), x.new_empty(x.shape[:1], dtype=torch.float32)

    @torch.library.custom_op("kernels::rms_norm_bwd", mutates_args=())
    def _rms_norm_bwd_op(dy: Tensor, x: Tensor, w: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
        M, D = x.shape
        if dy.stride(-1) != 1:
            dy = dy.contiguous()
        dx = torch.empty((M, D), device=x.device, dtype=x.dtype)
        n_prog = max(1, min(M, _num_programs_hint(x.device)))
        rows_per_program = triton.cdiv(M, n_prog)
        n_prog = triton.cdiv(M, rows_per_program)
        dw_partial = torch.empty((n_prog, D), device=x.device, dtype=torch.float32)
        _rms_norm_bwd_kernel[(n_prog,)](x, w, dy, rstd, dx, dw_partial, x.stride(0), dy.stride(0), dx.stride(0),
                                        M, D, rows_per_program, BLOCK_D=triton.next_power_of_2(D),
                                        num_warps=_rms_warps(D))
        return dx, dw_partial.sum(0).to(w.dtype)

    @_rms_norm_bwd_op.register_fake
    def _(dy, x, w, rstd):
        return x.new_empty(x.shape), w.new_empty(w.shape)

    def _rms_norm_setup(ctx, inputs, output):
        x, w, eps = inputs
        ctx.save_for_backward(x, w, output[1])

    def _rms_norm_backward(ctx, dy, drstd):
        x, w, rstd = ctx.saved_tensors
        dx, dw = _rms_norm_bwd_op(dy, x, w, rstd)
        return dx, dw, None

    _rms_norm_fwd_op.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup)


def rms_norm(x, weight, eps, impl="torch"):
    """y = x / sqrt(mean(x^2, -1) + eps) * weight, computed in fp32, returned in x.dtype."""
    D = x.shape[-1]
    if weight is not None and tuple(weight.shape) != (D,):
        _fail("rms_norm", f"weight must have shape ({D},) for x {tuple(x.shape)}, got {tuple(weight.shape)}")
    if x.dtype not in _FLOATS:
        _fail("rms_norm", f"x must be fp32/fp16/bf16, got {x.dtype}")
    if _check_impl(impl) and not _is_decode(x):
        x2 = x.reshape(-1, D)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        w = weight if weight is not None else torch.ones(D, device=x.device, dtype=torch.float32)
        return _rms_norm_fwd_op(x2, w, float(eps))[0].view(x.shape)
    return _RMSNormTorch.apply(x, weight, eps)


# -----------------------------------------------------------------------------
# Rotary embedding (half-split convention: rotate pairs (x[i], x[i + hd/2]))

def _rope_rotate(x, cos, sin, sign):
    """Rotate each pair (x1, x2) = (x[i], x[i + hd/2]) by +theta (sign 1) or -theta (sign -1) in fp32:
    (x1 cos - x2 sin, x2 cos + x1 sin). Written into the two halves of one output: no cat, no negation."""
    half = x.shape[-1] // 2
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # broadcast over heads
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    if torch.compiler.is_compiling():  # out= into views is not traceable; Inductor fuses the formula anyway
        return torch.cat([x1 * cos - sign * x2 * sin, x2 * cos + sign * x1 * sin], dim=-1).to(x.dtype)
    y = torch.empty(x.shape, device=x.device, dtype=torch.float32)
    y1, y2 = y[..., :half], y[..., half:]
    torch.mul(x1, cos, out=y1).addcmul_(x2, sin, value=-sign)
    torch.mul(x2, cos, out=y2).addcmul_(x1, sin, value=sign)
    return y.to(x.dtype)


class _RoPETorch(torch.autograd.Function):
    # a rotation's gradient is the rotation by -theta, so backward is the same two fused lines
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rope_rotate(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _rope_rotate(dy, cos, sin, -1.0), None, None


if triton is not None:

    @triton.jit
    def _rope_kernel(X, COS, SIN, Y, T, H, HALF,
                     stride_xb, stride_xt, stride_xh, stride_xd,
                     stride_yb, stride_yt, stride_yh, stride_yd,
                     stride_cb, stride_ct,
                     BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
        # one program per (b, t): cos/sin are loaded once and reused for every head
        pid = tl.program_id(0).to(tl.int64)
        b = pid // T
        t = pid % T
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_HALF)
        mask_d = offs_d < HALF
        cos = tl.load(COS + b * stride_cb + t * stride_ct + offs_d, mask=mask_d, other=0.0)
        sin = tl.load(SIN + b * stride_cb + t * stride_ct + offs_d, mask=mask_d, other=0.0)
        if BACKWARD:
            sin = -sin  # the gradient of a rotation by theta is a rotation by -theta
        mask = (offs_h[:, None] < H) & mask_d[None, :]
        x_ptr = X + b * stride_xb + t * stride_xt + offs_h[:, None] * stride_xh + offs_d[None, :] * stride_xd
        x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + HALF * stride_xd, mask=mask, other=0.0).to(tl.float32)
        y1 = x1 * cos[None, :] - x2 * sin[None, :]
        y2 = x2 * cos[None, :] + x1 * sin[None, :]
        y_ptr = Y + b * stride_yb + t * stride_yt + offs_h[:, None] * stride_yh + offs_d[None, :] * stride_yd
        tl.store(y_ptr, y1.to(Y.dtype.element_ty), mask=mask)
        tl.store(y_ptr + HALF * stride_yd, y2.to(Y.dtype.element_ty), mask=mask)

    @torch.library.custom_op("kernels::rope", mutates_args=())
    def _rope_op(x: Tensor, cos: Tensor, sin: Tensor, inverse: bool) -> Tensor:
        B, T, H, hd = x.shape
        y = torch.empty((B, T, H, hd), device=x.device, dtype=x.dtype)
        stride_cb = cos.stride(0) if cos.shape[0] > 1 else 0
        _rope_kernel[(B * T,)](x, cos, sin, y, T, H, hd // 2, *x.stride(), *y.stride(), stride_cb, cos.stride(1),
                               BACKWARD=inverse, BLOCK_H=triton.next_power_of_2(H),
                               BLOCK_HALF=triton.next_power_of_2(hd // 2))
        return y

    @_rope_op.register_fake
    def _(x, cos, sin, inverse):
        return x.new_empty(x.shape)

    def _rope_setup(ctx, inputs, output):
        x, cos, sin, inverse = inputs
        ctx.save_for_backward(cos, sin)
        ctx.inverse = inverse

    def _rope_backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _rope_op(dy, cos, sin, not ctx.inverse), None, None, None

    _rope_op.register_autograd(_rope_backward, setup_context=_rope_setup)


def apply_rope(x, cos, sin, impl="torch"):
    """x: (B, T, H, hd); cos/sin: fp32 (B or 1, T, hd/2). out = cat(x1*cos - x2*sin, x2*cos + x1*sin)."""
    if x.dim() != 4 or x.shape[-1] % 2:
        _fail("apply_rope", f"x must be (B, T, heads, head_dim) with an even head_dim, got {tuple(x.shape)}")
    B, T, H, hd = x.shape
    if cos.shape != sin.shape or cos.dim() != 3 or cos.shape[0] not in (1, B) or tuple(cos.shape[1:]) != (T, hd // 2):
        _fail("apply_rope", f"cos/sin must be (1 or B={B}, T={T}, head_dim/2={hd // 2}), got {tuple(cos.shape)} "
                            f"and {tuple(sin.shape)}")
    if _check_impl(impl) and T > 1:
        return _rope_op(x, cos.float().contiguous(), sin.float().contiguous(), False)
    return _RoPETorch.apply(x, cos, sin)


# -----------------------------------------------------------------------------
# SwiGLU

def _swiglu_torch(gate, up):
    return F.silu(gate) * up


if triton is not None:

    @triton.jit
    def _swiglu_fwd_kernel(G, U, Y, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: n can pass 2^31
        mask = offs < n
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        y = g * tl.sigmoid(g) * u
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(G, U, DY, DG, DU, n, BLOCK: tl.constexpr):
        # recompute sigmoid instead of storing silu(gate): one fewer activation-sized tensor
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: n can pass 2^31
        mask = offs < n
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        silu = g * sig
        dsilu = sig * (1.0 + g * (1.0 - sig))
        tl.store(DG + offs, (dy * u * dsilu).to(DG.dtype.element_ty), mask=mask)
        tl.store(DU + offs, (dy * silu).to(DU.dtype.element_ty), mask=mask)

    _SWIGLU_BLOCK = 128 if INTERPRET else 1024

    @torch.library.custom_op("kernels::swiglu_fwd", mutates_args=())
    def _swiglu_fwd_op(gate: Tensor, up: Tensor) -> Tensor:
        gate, up = gate.contiguous(), up.contiguous()
        y = torch.empty(gate.shape, device=gate.device, dtype=gate.dtype)
        n = gate.numel()
        _swiglu_fwd_kernel[(triton.cdiv(n, _SWIGLU_BLOCK),)](gate, up, y, n, BLOCK=_SWIGLU_BLOCK)
        return y

    @_swiglu_fwd_op.register_fake
    def _(gate, up):
        return gate.new_empty(gate.shape)

    @torch.library.custom_op("kernels::swiglu_bwd", mutates_args=())
    def _swiglu_bwd_op(gate: Tensor, up: Tensor, dy: Tensor) -> tuple[Tensor, Tensor]:
        gate, up, dy = gate.contiguous(), up.contiguous(), dy.contiguous()
        dg = torch.empty(gate.shape, device=gate.device, dtype=gate.dtype)
        du = torch.empty(up.shape, device=up.device, dtype=up.dtype)
        n = gate.numel()
        _swiglu_bwd_kernel[(triton.cdiv(n, _SWIGLU_BLOCK),)](gate, up, dy, dg, du, n, BLOCK=_SWIGLU_BLOCK)
        return dg, du

    @_swiglu_bwd_op.register_fake
    def _(gate, up, dy):
        return gate.new_empty(gate.shape), up.new_empty(up.shape)

    def _swiglu_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _swiglu_backward(ctx, dy):
        return _swiglu_bwd_op(*ctx.saved_tensors, dy)

    _swiglu_fwd_op.register_autograd(_swiglu_backward, setup_context=_swiglu_setup)


def swiglu(gate, up, impl="torch"):
    """silu(gate) * up, elementwise."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        _fail("swiglu", f"gate and up must have the same shape and dtype, got {gate.dtype} {tuple(gate.shape)} and "
                        f"{up.dtype} {tuple(up.shape)}")
    if _check_impl(impl) and not _is_decode(gate):
        return _swiglu_fwd_op(gate, up)
    return _swiglu_torch(gate, up)


# -----------------------------------------------------------------------------
# Cross-entropy (with ignore_index, z_loss and tanh softcap)

def _reduce_loss(loss, valid, reduction):
    # loss: (N,) fp32 per token, already 0 at ignored tokens
    if reduction == "mean":
        return loss.sum() / valid.sum().clamp(min=1)  # 0 (not nan) when every token is ignored
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"unknown reduction {reduction!r}")


def _cross_entropy_torch(logits, targets, ignore_index, reduction, z_loss, softcap):
    z = logits.float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    valid = targets != ignore_index
    loss = F.cross_entropy(z, targets, ignore_index=ignore_index, reduction="none")
    if z_loss:
        loss = loss + z_loss * torch.logsumexp(z, dim=-1).pow(2) * valid
    return _reduce_loss(loss, valid, reduction)


def _ce_chunk_torch(z, targets, ignore_index, z_loss, softcap, scale):
    """The per-token loss of one chunk of fp32 logits z (n, V) -- lse - z[target] + z_loss * lse^2, 0 at
    ignored tokens -- and, if scale (n,) is given, d(sum_i scale_i * loss_i)/dz, written over z (a temporary
    of the caller). The gradient by its closed form, softmax * (1 + 2 z_loss lse) - onehot(target) (times
    1 - tanh^2 under the softcap), in place: autograd through F.cross_entropy would allocate three more (n, V)
    tensors (log-probs, a zero-filled gradient, its softmax backward)."""
    valid = targets != ignore_index
    t = torch.where(valid, targets, 0)[:, None]
    if softcap is not None:
        z = torch.tanh(z.div_(softcap), out=z)  # z = tanh(z / cap); the capped logits are cap * z
        zc = z * softcap
    else:
        zc = z
    m = zc.amax(1, keepdim=True)
    z_t = zc.gather(1, t)
    p = zc.sub_(m).exp_()  # zc is a temporary (z itself without the cap): exp(z - max) in place
    s = p.sum(1, keepdim=True)
    lse = m + s.log()
    loss = torch.where(valid[:, None], lse - z_t + z_loss * lse * lse, 0.0).squeeze(1)
    if scale is None:
        return loss, None
    row = (scale * valid)[:, None].float()
    p.mul_(row * (1.0 + 2.0 * z_loss * lse) / s)  # softmax * (1 + 2 z_loss lse), times the row's scale
    p.scatter_add_(1, t, -row)                     # - onehot(target)
    if softcap is not None:
        p.mul_(z.square_().neg_().add_(1.0))        # d(cap * tanh(z / cap))/dz = 1 - tanh^2
    return loss, p


if triton is not None:

    @triton.jit
    def _softcap(z, softcap):
        # softcap * tanh(z / softcap), tanh written via exp (stable: exp overflow gives +-1)
        return softcap * (1.0 - 2.0 / (tl.exp(2.0 * z / softcap) + 1.0))

    @triton.jit
    def _ce_grad_row(LOGITS_row, DLOGITS_row, target, lse, scale, V, z_loss, softcap,
                     HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
        # dloss/dz_j = softmax_j - [j == target] + 2 * z_loss * lse * softmax_j, times the softcap
        # chain factor and the per-row upstream scale (0 for ignored rows)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < V
            z = tl.load(LOGITS_row + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                z = _softcap(z, softcap)
            p = tl.exp(z - lse)
            g = p * (1.0 + 2.0 * z_loss * lse) - tl.where(cols == target, 1.0, 0.0)
            if HAS_SOFTCAP:
                g = g * (1.0 - (z / softcap) * (z / softcap))  # d tanh = 1 - tanh^2
            g = g * scale
            tl.store(DLOGITS_row + cols, g.to(DLOGITS_row.dtype.element_ty), mask=mask)

    @triton.jit
    def _ce_fwd_kernel(LOGITS, TARGETS, LOSS, LSE, DLOGITS, SCALE, stride_l, stride_dl,
                       V, ignore_index, z_loss, softcap,
                       HAS_SOFTCAP: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
        # one program per row: online logsumexp over vocab blocks (logits read once); with
        # WRITE_GRAD the gradient (for a known per-row scale) is written in a second sweep
        row = tl.program_id(0).to(tl.int64)
        LOGITS_row = LOGITS + row * stride_l
        target = tl.load(TARGETS + row)
        valid = target != ignore_index
        m = -float("inf")
        s = 0.0
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            z = tl.load(LOGITS_row + cols, mask=cols < V, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                z = _softcap(z, softcap)
            z = tl.where(cols < V, z, -float("inf"))
            m_new = tl.maximum(m, tl.max(z, 0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
            m = m_new
        lse = m + tl.log(s)
        z_t = tl.load(LOGITS_row + tl.where(valid, target, 0)).to(tl.float32)
        if HAS_SOFTCAP:
            z_t = _softcap(z_t, softcap)
        loss = lse - z_t + z_loss * lse * lse
        tl.store(LOSS + row, tl.where(valid, loss, 0.0))
        tl.store(LSE + row, lse)
        if WRITE_GRAD:
            scale = tl.where(valid, tl.load(SCALE + row), 0.0)
            _ce_grad_row(LOGITS_row, DLOGITS + row * stride_dl, target, lse, scale, V, z_loss, softcap,
                         HAS_SOFTCAP, BLOCK_V)

    @triton.jit
    def _ce_bwd_kernel(LOGITS, TARGETS, LSE, SCALE, DLOGITS, stride_l, stride_dl, V, ignore_index, z_loss, softcap,
                       HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        target = tl.load(TARGETS + row)
        scale = tl.where(target != ignore_index, tl.load(SCALE + row), 0.0)
        _ce_grad_row(LOGITS + row * stride_l, DLOGITS + row * stride_dl, target, tl.load(LSE + row), scale,
                     V, z_loss, softcap, HAS_SOFTCAP, BLOCK_V)

    def _ce_block_v(V):
        if INTERPRET:  # small blocks so that tests span several; large vocabularies in few numpy steps
            return 128 if V <= 4096 else 4096
        return min(4096, triton.next_power_of_2(V))

    def _ce_warps(block_v):
        return 1 if INTERPRET else (8 if block_v >= 2048 else 4)

    def _ce_fwd_triton(logits, targets, ignore_index, z_loss, softcap, dlogits=None, scale=None):
        # returns per-token loss (fp32, 0 at ignored) and lse; writes the gradient into dlogits
        # (which may be logits itself: each block is read before it is overwritten) if given
        N, V = logits.shape
        if logits.stride(-1) != 1:
            logits = logits.contiguous()
        loss = torch.empty(N, device=logits.device, dtype=torch.float32)
        lse = torch.empty(N, device=logits.device, dtype=torch.float32)
        write_grad = dlogits is not None
        BLOCK_V = _ce_block_v(V)
        _ce_fwd_kernel[(N,)](
            logits, targets, loss, lse, dlogits if write_grad else logits, scale if write_grad else loss,
            logits.stride(0), dlogits.stride(0) if write_grad else 0, V, ignore_index, float(z_loss),
            float(softcap) if softcap is not None else 1.0,
            HAS_SOFTCAP=softcap is not None, WRITE_GRAD=write_grad, BLOCK_V=BLOCK_V, num_warps=_ce_warps(BLOCK_V),
        )
        return loss, lse

    @torch.library.custom_op("kernels::cross_entropy_fwd", mutates_args=())
    def _ce_fwd_op(logits: Tensor, targets: Tensor, ignore_index: int, z_loss: float,
                   softcap: Optional[float]) -> tuple[Tensor, Tensor]:
        return _ce_fwd_triton(logits, targets, ignore_index, z_loss, softcap)

    @_ce_fwd_op.register_fake
    def _(logits, targets, ignore_index, z_loss, softcap):
        n = logits.shape[:1]
        return logits.new_empty(n, dtype=torch.float32), logits.new_empty(n, dtype=torch.float32)

    @torch.library.custom_op("kernels::cross_entropy_bwd", mutates_args=())
    def _ce_bwd_op(logits: Tensor, targets: Tensor, lse: Tensor, scale: Tensor, ignore_index: int, z_loss: float,
                   softcap: Optional[float]) -> Tensor:
        if logits.stride(-1) != 1:
            logits = logits.contiguous()
        N, V = logits.shape
        dlogits = torch.empty((N, V), device=logits.device, dtype=logits.dtype)
        BLOCK_V = _ce_block_v(V)
        _ce_bwd_kernel[(N,)](
            logits, targets, lse, scale.float().contiguous(), dlogits, logits.stride(0), dlogits.stride(0), V,
            ignore_index, float(z_loss), float(softcap) if softcap is not None else 1.0,
            HAS_SOFTCAP=softcap is not None, BLOCK_V=BLOCK_V, num_warps=_ce_warps(BLOCK_V),
        )
        return dlogits

    @_ce_bwd_op.register_fake
    def _(logits, targets, lse, scale, ignore_index, z_loss, softcap):
        return logits.new_empty(logits.shape)

    def _ce_setup(ctx, inputs, output):
        logits, targets, ignore_index, z_loss, softcap = inputs
        ctx.save_for_backward(logits, targets, output[1])
        ctx.args = (ignore_index, z_loss, softcap)

    def _ce_backward(ctx, dloss, dlse):
        # dloss (N,) is d(reduced loss)/d(per-token loss): the reduction is plain torch outside the op
        logits, targets, lse = ctx.saved_tensors
        return _ce_bwd_op(logits, targets, lse, dloss, *ctx.args), None, None, None, None

    _ce_fwd_op.register_autograd(_ce_backward, setup_context=_ce_setup)


def cross_entropy(logits, targets, ignore_index=-100, reduction="mean", z_loss=0.0, softcap=None, impl="torch"):
    """logits (N, V) any float dtype (computed in fp32), targets (N,) long. softcap: logits ->
    softcap * tanh(logits / softcap) first. z_loss adds z_loss * lse^2 per non-ignored token.
    reduction: "mean" over non-ignored tokens (0 if none), "sum", or "none" (0 at ignored)."""
    if reduction not in ("mean", "sum", "none"):
        _fail("cross_entropy", f"unknown reduction {reduction!r}: use 'mean', 'sum' or 'none'")
    if logits.dim() != 2:
        _fail("cross_entropy", f"logits must be 2-D (N, V), got {tuple(logits.shape)}")
    _check_targets("cross_entropy", targets, logits.shape[0], logits.shape[1], ignore_index)
    if _check_impl(impl):
        loss, _ = _ce_fwd_op(logits, targets.contiguous(), int(ignore_index), float(z_loss),
                             None if softcap is None else float(softcap))
        return _reduce_loss(loss, targets != ignore_index, reduction)
    return _cross_entropy_torch(logits, targets, ignore_index, reduction, z_loss, softcap)


# -----------------------------------------------------------------------------
# Fused linear + cross-entropy: the LM head without ever holding (N, V) logits
#
# For "mean"/"sum" the gradient of every chunk is known up to the (scalar) upstream grad, so it is computed
# during the forward and only rescaled in the backward: one logits matmul per chunk in total. For "none" the
# per-token upstream grads are only known in the backward, which then recomputes the chunk logits. Either
# way only one (chunk, V) block of logits exists at a time. Without grad mode (evaluation) the forward runs
# the logits matmul only.

_HAS_ADDMM_OUT_DTYPE = any("dtype_out" in str(s) for s in torch._C._jit_get_schemas_for_operator("aten::addmm"))


def _accumulate_dw(dw, dlogits, xs):
    """dw (V, d) fp32 += dlogits^T @ xs, in place: no (V, d) temporaries per chunk."""
    global _HAS_ADDMM_OUT_DTYPE
    if dlogits.dtype == torch.float32:
        dw.addmm_(dlogits.t(), xs.float())
        return
    if dw.is_cuda and _HAS_ADDMM_OUT_DTYPE:  # torch >= 2.8: 16-bit inputs, fp32 accumulation into dw itself
        try:
            torch.addmm(dw, dlogits.t(), xs, out_dtype=torch.float32, out=dw)
            return
        except (RuntimeError, TypeError) as e:
            _HAS_ADDMM_OUT_DTYPE = False
            _log(f"addmm with out_dtype failed ({str(e).splitlines()[0][:120]}); accumulating dw via a temporary")
    dw.add_(dlogits.t() @ xs)


def _linear_ce_chunks(x, weight, targets, ignore_index, z_loss, softcap, chunk_size, impl, cdt, scale, loss):
    """Loop over chunks of rows: fills loss (N,) if given, and with scale (N,) returns (dx, dw) of
    sum_i scale_i * loss_i (dx in cdt, dw in fp32)."""
    N = x.shape[0]
    with torch.autocast(x.device.type, enabled=False):  # the matmuls run in cdt, chosen by the caller
        xc, wc = x.to(cdt), weight.to(cdt)
        dx = torch.empty(x.shape, device=x.device, dtype=cdt) if scale is not None else None
        dw = torch.zeros(weight.shape, device=x.device, dtype=torch.float32) if scale is not None else None
        for s in range(0, N, chunk_size):
            e = min(s + chunk_size, N)
            logits = xc[s:e] @ wc.t()
            sc = scale[s:e] if scale is not None else None
            if impl == "triton":
                # the chunk's logits are a temporary: the kernel writes the gradient over them
                chunk_loss, _ = _ce_fwd_triton(logits, targets[s:e], ignore_index, z_loss, softcap,
                                               dlogits=logits if sc is not None else None, scale=sc)
                dlogits = logits
            else:
                chunk_loss, dlogits = _ce_chunk_torch(logits.float(), targets[s:e], ignore_index, z_loss, softcap, sc)
            if loss is not None:
                loss[s:e] = chunk_loss
            if scale is not None:
                dlogits = dlogits.to(cdt)
                torch.mm(dlogits, wc, out=dx[s:e])
                _accumulate_dw(dw, dlogits, xc[s:e])
    return dx, dw


@torch.library.custom_op("kernels::linear_cross_entropy_fwd", mutates_args=())
def _linear_ce_fwd_op(x: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, reduction: str, z_loss: float,
                      softcap: Optional[float], chunk_size: int, impl: str, cdt: torch.dtype,
                      need_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    valid = targets != ignore_index
    n_valid = valid.sum().clamp(min=1)
    precompute = need_grad and reduction != "none"
    scale = None
    if precompute:  # d(reduced loss)/d(loss_i) for a unit upstream grad
        scale = valid.float() / n_valid if reduction == "mean" else valid.float()
    loss = torch.empty(x.shape[0], device=x.device, dtype=torch.float32)
    dx, dw = _linear_ce_chunks(x, weight, targets, ignore_index, z_loss, softcap, chunk_size, impl, cdt, scale, loss)
    if reduction != "none":
        loss = loss.sum() / n_valid if reduction == "mean" else loss.sum()
    if not precompute:
        dx, dw = x.new_empty(0, dtype=cdt), x.new_empty(0, dtype=torch.float32)
    return loss, dx, dw


@_linear_ce_fwd_op.register_fake
def _(x, weight, targets, ignore_index, reduction, z_loss, softcap, chunk_size, impl, cdt, need_grad):
    loss = x.new_empty(() if reduction != "none" else x.shape[:1], dtype=torch.float32)
    if need_grad and reduction != "none":
        return loss, x.new_empty(x.shape, dtype=cdt), weight.new_empty(weight.shape, dtype=torch.float32)
    return loss, x.new_empty(0, dtype=cdt), x.new_empty(0, dtype=torch.float32)


@torch.library.custom_op("kernels::linear_cross_entropy_bwd", mutates_args=())
def _linear_ce_bwd_op(x: Tensor, weight: Tensor, targets: Tensor, dloss: Tensor, ignore_index: int, z_loss: float,
                      softcap: Optional[float], chunk_size: int, impl: str, cdt: torch.dtype) -> tuple[Tensor, Tensor]:
    scale = dloss.float() * (targets != ignore_index)
    dx, dw = _linear_ce_chunks(x, weight, targets, ignore_index, z_loss, softcap, chunk_size, impl, cdt, scale, None)
    return dx.to(x.dtype), dw.to(weight.dtype)


@_linear_ce_bwd_op.register_fake
def _(x, weight, targets, dloss, ignore_index, z_loss, softcap, chunk_size, impl, cdt):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _linear_ce_setup(ctx, inputs, output):
    x, weight, targets, ignore_index, reduction, z_loss, softcap, chunk_size, impl, cdt, need_grad = inputs
    ctx.precompute = need_grad and reduction != "none"
    ctx.save_for_backward(*(output[1:] if ctx.precompute else (x, weight, targets)))
    ctx.args = (ignore_index, z_loss, softcap, chunk_size, impl, cdt)
    ctx.dtypes = (x.dtype, weight.dtype)


def _linear_ce_backward(ctx, dloss, ddx, ddw):
    if ctx.precompute:
        dx, dw = ctx.saved_tensors
        return (dx * dloss).to(ctx.dtypes[0]), (dw * dloss).to(ctx.dtypes[1]), *([None] * 9)
    x, weight, targets = ctx.saved_tensors
    dx, dw = _linear_ce_bwd_op(x, weight, targets, dloss, *ctx.args)
    return dx, dw, *([None] * 9)


_linear_ce_fwd_op.register_autograd(_linear_ce_backward, setup_context=_linear_ce_setup)


def linear_cross_entropy(x, weight, targets, ignore_index=-100, reduction="mean", z_loss=0.0, softcap=None,
                         chunk_size=4096, impl="torch"):
    """== cross_entropy(x @ weight.T, targets, ...) for x (N, d), weight (V, d), but processed
    chunk_size tokens at a time so memory is O(chunk_size * V) instead of O(N * V)."""
    if reduction not in ("mean", "sum", "none"):
        _fail("linear_cross_entropy", f"unknown reduction {reduction!r}: use 'mean', 'sum' or 'none'")
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        _fail("linear_cross_entropy", f"x must be (N, d) and weight (V, d), got {tuple(x.shape)} and "
                                      f"{tuple(weight.shape)}")
    _check_targets("linear_cross_entropy", targets, x.shape[0], weight.shape[0], ignore_index)
    _check_impl(impl)
    dev = x.device.type
    # honour autocast explicitly (the op's body and the backward run outside it): matmuls in the autocast dtype
    autocast = torch.is_autocast_enabled(dev)
    cdt = torch.get_autocast_dtype(dev) if autocast else torch.promote_types(x.dtype, weight.dtype)
    # decided here, in grad mode: inside an autograd function requires_grad says nothing about torch.no_grad()
    need_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    loss, _, _ = _linear_ce_fwd_op(x, weight, targets.contiguous(), int(ignore_index), reduction, float(z_loss),
                                   None if softcap is None else float(softcap), int(chunk_size), impl, cdt, need_grad)
    return loss


# -----------------------------------------------------------------------------
# Mixture-of-experts: SwiGLU experts over tokens sorted by expert

def expert_offsets(counts):
    """(E,) tokens per expert -> (E,) int32 end offsets: expert e owns sorted rows [offs[e-1], offs[e]) --
    the offs convention of torch._grouped_mm."""
    return torch.cumsum(counts, 0, dtype=torch.int32)


def _grouped_mm_usable(x, *weights):
    # torch._grouped_mm: CUDA, bf16, 16-byte aligned strides (d, h multiples of 8), sm90 in torch 2.8-2.9
    return (hasattr(torch, "_grouped_mm") and x.is_cuda and torch.cuda.get_device_capability(x.device) >= (9, 0)
            and all(s % 8 == 0 for w in weights for s in w.shape[1:]))


def _moe_experts_grouped(x, counts, w_gate, w_up, w_down, impl):
    # three grouped GEMMs over all experts at once, no host sync; mat_b is the (E, in, out) transposed view
    # of the stacked (E, out, in) weights, the column-major layout the kernel wants
    offs = expert_offsets(counts)
    x = x.to(torch.bfloat16)
    w_gate, w_up, w_down = (w.to(torch.bfloat16) for w in (w_gate, w_up, w_down))
    gate = torch._grouped_mm(x, w_gate.transpose(-2, -1), offs=offs)
    up = torch._grouped_mm(x, w_up.transpose(-2, -1), offs=offs)
    return torch._grouped_mm(swiglu(gate, up, impl), w_down.transpose(-2, -1), offs=offs)


def _moe_experts_loop(x, counts, w_gate, w_up, w_down, impl):
    parts, start = [], 0
    for e, n in enumerate(counts.tolist()):  # one host sync for the counts
        if n:
            xe = x[start:start + n]
            parts.append(swiglu(xe @ w_gate[e].t(), xe @ w_up[e].t(), impl) @ w_down[e].t())
        start += n
    return torch.cat(parts) if parts else x.new_zeros(0, w_down.shape[1])


def moe_experts(x_sorted, counts, w_gate, w_up, w_down, impl="torch"):
    """SwiGLU expert outputs for tokens already sorted by expert.

    x_sorted (M, d): one row per (token, expert) assignment, grouped by expert in expert order;
    counts (E,): rows per expert (sum = M); w_gate, w_up (E, h, d) and w_down (E, d, h) as model.MoE stores
    them. Returns (M, d): row i is w_down[e] @ (silu(w_gate[e] @ x_i) * (w_up[e] @ x_i)) for its expert e.
    On CUDA (sm90+, bf16 or bf16 autocast) three torch._grouped_mm calls; elsewhere a loop over experts."""
    E = w_gate.shape[0]
    if x_sorted.dim() != 2 or tuple(counts.shape) != (E,) or w_up.shape != w_gate.shape or \
            tuple(w_down.shape) != (E, w_gate.shape[2], w_gate.shape[1]) or x_sorted.shape[1] != w_gate.shape[2]:
        _fail("moe_experts", f"expected x_sorted (M, d), counts (E,), w_gate/w_up (E, h, d), w_down (E, d, h); got "
                             f"{tuple(x_sorted.shape)}, {tuple(counts.shape)}, {tuple(w_gate.shape)}, "
                             f"{tuple(w_up.shape)}, {tuple(w_down.shape)}")
    bf16 = x_sorted.dtype == torch.bfloat16 or (torch.is_autocast_enabled("cuda") and
                                                torch.get_autocast_dtype("cuda") == torch.bfloat16)
    if bf16 and _grouped_mm_usable(x_sorted, w_gate, w_down):
        return _moe_experts_grouped(x_sorted, counts, w_gate, w_up, w_down, impl)
    return _moe_experts_loop(x_sorted, counts, w_gate, w_up, w_down, impl)
