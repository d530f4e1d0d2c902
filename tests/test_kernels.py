"""
Tests for kernels.py: every op, both impls ("torch" reference and "triton"), forward values and
gradients, against naive PyTorch written here (explicit softmax with masks, explicit RMS formula,
rotation via complex multiplication, log-softmax by hand...) evaluated in float64.

Without CUDA the Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1), which must be
set before triton is imported. The interpreter gets tl.dot on bf16 wrong, so bf16 only runs on CUDA,
where it is judged against float64 with SDPA-flash's own bf16 error on the same inputs as the scale.
"""

import json
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import kernels  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HAS_TRITON = kernels.triton is not None
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
TRITON = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")

IMPLS = ["torch", pytest.param("triton", marks=TRITON)]
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=CUDA)]

# absolute tolerance, scaled by the reference's magnitude (see assert_close)
TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def assert_close(out, ref, dtype, name=""):
    tol = TOL[dtype]
    if DEVICE == "cuda" and dtype == torch.float32:
        tol = 1e-3  # torch's own GPU fp32 kernels (e.g. matmuls in the reference paths) may use tf32
    out, ref = out.double(), ref.double()
    err = (out - ref).abs().max().item() if out.numel() else 0.0
    scale = max(1.0, ref.abs().max().item() if ref.numel() else 0.0)
    assert err <= tol * scale, f"{name}: max abs err {err:.3e} > {tol * scale:.3e}"


def leaf(t, dtype):
    return t.to(device=DEVICE, dtype=dtype).requires_grad_()


def grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out)


# -----------------------------------------------------------------------------
# attention

def naive_attention(q, k, v, causal, doc_ids):
    # explicit: repeat K/V for GQA, scores, boolean mask, softmax, weighted sum (all float64)
    B, H, T, D = q.shape
    group = H // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    scores = q.double() @ k.transpose(-1, -2) / (D ** 0.5)
    i = torch.arange(T, device=q.device)[:, None]
    j = torch.arange(T, device=q.device)[None, :]
    allowed = torch.ones(B, 1, T, T, dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed & (j <= i)
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    scores = scores.masked_fill(~allowed, float("-inf"))
    p = torch.exp(scores - scores.amax(-1, keepdim=True))
    p = p / p.sum(-1, keepdim=True)
    return p @ v


def make_doc_ids(B, T, kind, gen):
    if kind is None:
        return None
    if kind == "packed":  # several documents of uneven length per row, ids increasing
        ids = torch.zeros(B, T, dtype=torch.long)
        for b in range(B):
            n_cuts = min(T - 1, 3 + b)
            cuts = torch.randperm(T - 1, generator=gen)[:n_cuts] + 1 if T > 1 else torch.tensor([], dtype=torch.long)
            for c in cuts.tolist():
                ids[b, c:] += 1
        return ids.to(DEVICE)
    if kind == "scattered":  # ids in no particular order: the key ranges must hold for any ids, not only runs
        return torch.randint(0, 3, (B, T), generator=gen).to(DEVICE)
    raise ValueError(kind)


def attention_case(B, H, H_KV, T, D, doc_kind, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = leaf(torch.randn(B, H, T, D, generator=gen), dtype)
    k = leaf(torch.randn(B, H_KV, T, D, generator=gen), dtype)
    v = leaf(torch.randn(B, H_KV, T, D, generator=gen), dtype)
    do = torch.randn(B, H, T, D, generator=gen).to(DEVICE, dtype)
    return q, k, v, do, make_doc_ids(B, T, doc_kind, gen)


def check_attention(q, k, v, do, causal, doc_ids, dtype, impl):
    out = kernels.attention(q, k, v, causal=causal, doc_ids=doc_ids, impl=impl)
    assert out.shape == q.shape and out.dtype == dtype
    ref = naive_attention(q, k, v, causal, doc_ids)
    assert_close(out, ref, dtype, "out")
    for name, g, gr in zip("qkv", grads(out, (q, k, v), do), grads(ref, (q, k, v), do.double())):
        assert_close(g, gr, dtype, "d" + name)


# (B, H, H_KV, T, D, causal, doc kind, dtype): in the interpreter's 16x16 tiles these span 1-4 tiles
ATTN_CASES = [
    (1, 2, 2, 1, 16, True, None, torch.float32),
    (2, 4, 2, 17, 32, True, None, torch.float32),
    (1, 4, 1, 33, 16, False, None, torch.float32),
    (1, 8, 1, 64, 16, True, None, torch.float32),
    (1, 8, 2, 40, 32, False, None, torch.float16),
    (2, 4, 4, 33, 32, True, None, torch.float16),
    (2, 4, 2, 48, 16, True, "packed", torch.float32),
    (2, 4, 4, 37, 16, False, "packed", torch.float32),
    (1, 8, 1, 64, 32, True, "packed", torch.float16),
    (2, 4, 1, 29, 16, True, "scattered", torch.float32),
    (1, 2, 1, 33, 16, False, "scattered", torch.float16),
    (1, 2, 2, 20, 24, True, None, torch.float32),  # head dim that is not a power of two
    (1, 4, 2, 33, 64, True, "packed", torch.float16),
]


def _attn_case_id(c):
    B, H, HK, T, D, causal, doc, dt = c
    return f"B{B}-H{H}-kv{HK}-T{T}-d{D}-{'causal' if causal else 'full'}-{doc}-{str(dt)[6:]}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", ATTN_CASES, ids=_attn_case_id)
def test_attention(impl, case):
    B, H, H_KV, T, D, causal, doc_kind, dtype = case
    q, k, v, do, doc_ids = attention_case(B, H, H_KV, T, D, doc_kind, dtype, seed=T * 31 + H)
    check_attention(q, k, v, do, causal, doc_ids, dtype, impl)


# Several tiles of unequal size: forced query/key blocks of 32x16 and 16x32 (16 is the smallest tl.dot
# allows), lengths that are no multiple of either, GQA group sizes 1, 2, 4 and 8 (the dK/dV pass split over
# 1, 2 or 4 programs per group), packed and scattered documents. On a GPU the same forced blocks make these
# small inputs span several tiles too.
TILES = {
    "m32n16": dict(attn_fwd=dict(BLOCK_M=32, BLOCK_N=16), attn_dq=dict(BLOCK_M=32, BLOCK_N=16),
                   attn_dkdv=dict(BLOCK_M=16, BLOCK_N=32, SPLIT=2)),
    "m16n32": dict(attn_fwd=dict(BLOCK_M=16, BLOCK_N=32), attn_dq=dict(BLOCK_M=16, BLOCK_N=32),
                   attn_dkdv=dict(BLOCK_M=32, BLOCK_N=16, SPLIT=4)),
}
MULTI_TILE_CASES = [  # (H, H_KV, T, causal, doc kind), alternating between the two tilings
    (2, 2, 45, True, None),
    (4, 1, 70, False, None),
    (8, 1, 53, True, "packed"),
    (4, 1, 61, False, "packed"),
    (4, 2, 50, True, "scattered"),
    (2, 2, 39, True, "packed"),
]


@TRITON
@pytest.mark.parametrize("case,tiles", [(c, list(TILES)[i % 2]) for i, c in enumerate(MULTI_TILE_CASES)],
                         ids=lambda c: f"H{c[0]}-kv{c[1]}-T{c[2]}-{'causal' if c[3] else 'full'}-{c[4]}"
                         if isinstance(c, tuple) else c)
def test_attention_multi_tile(case, tiles):
    H, H_KV, T, causal, doc_kind = case
    forced = {name: dict(cfg, num_warps=4, num_stages=2) for name, cfg in TILES[tiles].items()}
    for name in ("attn_dkdv",):
        forced[name]["SPLIT"] = min(forced[name]["SPLIT"], H // H_KV)  # a divisor of the group size
    q, k, v, do, doc_ids = attention_case(1, H, H_KV, T, 16, doc_kind, torch.float32, seed=T)
    with kernels.force_configs(**forced):
        check_attention(q, k, v, do, causal, doc_ids, torch.float32, "triton")


@pytest.mark.parametrize("impl", IMPLS)
def test_attention_strided_inputs(impl):
    # the model produces q/k/v as (B, T, H, D) views transposed to (B, H, T, D): non-contiguous
    B, T, H, H_KV, D = 2, 19, 4, 2, 16
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, T, H + 2 * H_KV, D, generator=gen).to(DEVICE).requires_grad_()
    q, k, v = qkv.split([H, H_KV, H_KV], dim=2)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    doc_ids = make_doc_ids(B, T, "packed", gen)
    out = kernels.attention(q, k, v, causal=True, doc_ids=doc_ids, impl=impl)
    ref = naive_attention(q, k, v, True, doc_ids)
    assert_close(out, ref, torch.float32, "out")
    do = torch.randn(out.shape, generator=gen).to(DEVICE)
    (g,) = grads(out, (qkv,), do)
    (gr,) = grads(ref, (qkv,), do.double())
    assert_close(g, gr, torch.float32, "dqkv")


def test_document_bounds():
    gen = torch.Generator().manual_seed(1)
    ids = torch.cat([make_doc_ids(2, 23, "packed", gen), torch.randint(0, 4, (2, 23), generator=gen).to(DEVICE)])
    ids[3, :] = 7  # one document over the whole row
    got = kernels.document_bounds(ids).cpu()
    for b in range(ids.shape[0]):
        row = ids[b].tolist()
        first = [row.index(d) for d in row]
        end = [len(row) - row[::-1].index(d) for d in row]
        assert got[0, b].tolist() == row and got[1, b].tolist() == first and got[2, b].tolist() == end


@pytest.mark.parametrize("impl", IMPLS)
def test_attention_argument_errors(impl):
    q = torch.randn(1, 4, 8, 16, device=DEVICE)
    kv = torch.randn(1, 2, 8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="seq_q == seq_k"):
        kernels.attention(q, kv[:, :, :5], kv[:, :, :5], impl=impl)
    with pytest.raises(ValueError, match="same shape"):
        kernels.attention(q, kv, kv[:, :1], impl=impl)
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        kernels.attention(q, kv[:, :1].expand(1, 3, 8, 16), kv[:, :1].expand(1, 3, 8, 16), impl=impl)
    with pytest.raises(ValueError, match="one float dtype"):
        kernels.attention(q, kv, kv.half(), impl=impl)
    with pytest.raises(ValueError, match=r"doc_ids must be an integer tensor of shape \(B=1, T=8\)"):
        kernels.attention(q, kv, kv, doc_ids=torch.zeros(1, 7, dtype=torch.long, device=DEVICE), impl=impl)
    with pytest.raises(ValueError, match="4-D"):
        kernels.attention(q[0], kv[0], kv[0], impl=impl)


def test_dot_precision_follows_torch_setting():
    saved = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert kernels._dot_precision(torch.float32) == "ieee"
        torch.set_float32_matmul_precision("high")
        assert kernels._dot_precision(torch.float32) == "tf32"
    finally:
        torch.set_float32_matmul_precision(saved)


# -----------------------------------------------------------------------------
# launch configs: buckets, timing, caching, logging (CPU: fake kernels and timings)

def test_seq_bucket():
    assert kernels.seq_bucket(1) == kernels.seq_bucket(64) == 64
    assert kernels.seq_bucket(1000) == kernels.seq_bucket(1024) == 1024
    assert kernels.seq_bucket(1025) == 2048
    assert kernels.seq_bucket(10 ** 6) == 16384


class FakeCompiled:
    def __init__(self, n_spills):
        self.n_spills = n_spills


@TRITON
def test_autotune_picks_fastest_without_spills_caches_and_logs(monkeypatch, tmp_path, capsys):
    import triton.testing
    cache = tmp_path / "tuned.json"
    monkeypatch.setenv("KERNELS_AUTOTUNE", "1")
    monkeypatch.setenv("KERNELS_AUTOTUNE_CACHE", str(cache))
    monkeypatch.setattr(kernels, "_tuned", {})
    monkeypatch.setattr(kernels, "_tuned_loaded", False)
    configs = [dict(BLOCK_M=128, BLOCK_N=64), dict(BLOCK_M=64, BLOCK_N=64), dict(BLOCK_M=64, BLOCK_N=32)]
    spills = {128: 40, 64: 0}  # the 128-row config spills registers (and would time fastest)
    times = {(128, 64): 0.1, (64, 64): 0.5, (64, 32): 0.3}
    launched = []
    current = {}

    def launch(cfg):
        launched.append(cfg)
        current["cfg"] = cfg
        return FakeCompiled(spills[cfg["BLOCK_M"]])

    def fake_do_bench(fn, warmup, rep):
        fn()
        return times[current["cfg"]["BLOCK_M"], current["cfg"]["BLOCK_N"]]

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    key = (kernels.seq_bucket(1000), 128, 1, 0, "bfloat16", "gqa")
    best = kernels._choose_config("attn_fwd", key, configs, launch)
    assert best == dict(BLOCK_M=64, BLOCK_N=32)
    out = capsys.readouterr().out
    assert "autotuned attn_fwd|1024|128|1|0|bfloat16|gqa -> BLOCK_M=64 BLOCK_N=32" in out and "40 spilled" in out
    # same bucket (another length): no new timing
    n = len(launched)
    assert kernels._choose_config("attn_fwd", (kernels.seq_bucket(1024),) + key[1:], configs, launch) == best
    assert len(launched) == n
    # a new process (empty in-memory table) reads the saved winner instead of timing again
    saved = json.loads(cache.read_text())
    assert saved["configs"] == {"attn_fwd|1024|128|1|0|bfloat16|gqa": best}
    monkeypatch.setattr(kernels, "_tuned", {})
    monkeypatch.setattr(kernels, "_tuned_loaded", False)
    assert kernels._choose_config("attn_fwd", key, configs, launch) == best and len(launched) == n
    # timing off: the first config, deterministically, without launching anything
    monkeypatch.setenv("KERNELS_AUTOTUNE", "0")
    assert kernels._choose_config("attn_fwd", (2048,) + key[1:], configs, launch) == configs[0]
    assert len(launched) == n


# -----------------------------------------------------------------------------
# decoding: one token per row takes the torch path (no Triton launches)

@TRITON
def test_decode_step_takes_torch_path(monkeypatch):
    def no_triton(*args, **kwargs):
        raise AssertionError("a Triton op was called for a one-token step")

    for op in ("_attention_fwd_op", "_rms_norm_fwd_op", "_rope_op", "_swiglu_fwd_op"):
        monkeypatch.setattr(kernels, op, no_triton)
    B, H, D = 3, 4, 16
    x = torch.randn(B, 1, H * D, device=DEVICE)
    w = torch.randn(H * D, device=DEVICE)
    assert_close(kernels.rms_norm(x, w, 1e-5, impl="triton"), naive_rms_norm(x, w, 1e-5), torch.float32, "rms")
    q = torch.randn(B, 1, H, D, device=DEVICE)
    theta = torch.randn(1, 1, D // 2, device=DEVICE)
    rope = kernels.apply_rope(q, theta.cos(), theta.sin(), impl="triton")
    assert_close(rope, naive_rope(q, theta), torch.float32, "rope")
    assert_close(kernels.swiglu(x, x, impl="triton"), torch.nn.functional.silu(x) * x, torch.float32, "swiglu")
    qt = q.transpose(1, 2)
    attn = kernels.attention(qt, qt, qt, impl="triton")
    assert_close(attn, naive_attention(qt, qt, qt, True, None), torch.float32, "attn")


# -----------------------------------------------------------------------------
# bf16 on CUDA: against float64, with SDPA-flash's own bf16 error on the same inputs as the yardstick

BF16_CASES = [  # (B, H, H_KV, T, D, causal, doc kind): several default-config tiles, ragged ends
    (2, 8, 8, 1000, 128, True, None),
    (1, 8, 2, 777, 64, True, None),
    (1, 4, 1, 513, 128, False, None),
    (2, 8, 2, 700, 64, True, "packed"),
    (1, 4, 4, 300, 128, False, "scattered"),
]


def rel_err(x, ref):
    return ((x.double() - ref).abs().max() / ref.abs().max()).item()


@CUDA
@TRITON
@pytest.mark.parametrize("case", BF16_CASES, ids=lambda c: f"B{c[0]}-H{c[1]}-kv{c[2]}-T{c[3]}-d{c[4]}-{c[6]}")
def test_attention_bf16_against_fp64(case):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    B, H, H_KV, T, D, causal, doc_kind = case
    q, k, v, do, doc_ids = attention_case(B, H, H_KV, T, D, doc_kind, torch.float64, seed=T)
    ref = naive_attention(q, k, v, causal, doc_ids)
    ref_grads = grads(ref, (q, k, v), do)
    qb, kb, vb = (t.detach().bfloat16().requires_grad_() for t in (q, k, v))
    out = kernels.attention(qb, kb, vb, causal=causal, doc_ids=doc_ids, impl="triton")
    ours = [out] + list(grads(out, (qb, kb, vb), do.bfloat16()))
    # the yardstick: flash SDPA in bf16 (no document masks there: the torch path's masked SDPA instead)
    g = H // H_KV
    qs, ks, vs = qb.detach().requires_grad_(), kb.detach().requires_grad_(), vb.detach().requires_grad_()
    if doc_ids is None:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            sd = torch.nn.functional.scaled_dot_product_attention(
                qs, ks.repeat_interleave(g, 1), vs.repeat_interleave(g, 1), is_causal=causal)
    else:
        sd = kernels.attention(qs, ks, vs, causal=causal, doc_ids=doc_ids, impl="torch")
    theirs = [sd] + list(grads(sd, (qs, ks, vs), do.bfloat16()))
    for name, a, b, r in zip(["out", "dq", "dk", "dv"], ours, theirs, [ref] + list(ref_grads)):
        err, yardstick = rel_err(a, r), rel_err(b, r)
        assert err <= 3 * yardstick + 1e-3, f"{name}: rel err {err:.2e} vs SDPA's {yardstick:.2e}"


@CUDA
@TRITON
def test_attention_every_config_on_gpu():
    """Autotuning may pick any config of the lists: each one, forced, gives the right answer. The shape has
    the same Triton specialisation (bf16, hd 128, 16 heads, multiples of 16) as bench/gpu_check.py's attention
    benchmark, so the compiled kernels are in Triton's cache when that autotunes."""
    q, k, v, do, doc_ids = attention_case(1, 16, 16, 320, 128, "packed", torch.bfloat16, seed=3)
    for name, configs in (("attn_fwd", kernels._ATTN_FWD_CONFIGS), ("attn_dkdv", kernels._ATTN_DKDV_CONFIGS),
                          ("attn_dq", kernels._ATTN_DQ_CONFIGS)):
        for cfg in configs:
            with kernels.force_configs(**{name: cfg}):
                for docs in (None, doc_ids):
                    check_attention(q, k, v, do, True, docs, torch.bfloat16, "triton")


@CUDA
@TRITON
@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_properties(0).total_memory < 60e9,
                    reason="needs ~30 GB of GPU memory")
def test_offsets_past_2_31_elements():
    # q with more than 2^31 elements: batch offsets b * stride_qb pass the int32 range
    B, H, T, D = 1040, 128, 128, 128  # 2.18e9 elements; MQA keeps k/v small
    assert B * H * T * D > 2 ** 31
    q = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, 1, T, D, device="cuda", dtype=torch.bfloat16)
    out = kernels.attention(q, k, k, causal=True, impl="triton")
    for b in (0, B - 1):  # the last batch row lives past 2^31 elements
        ref = torch.nn.functional.scaled_dot_product_attention(q[b:b + 1], k[b:b + 1].expand(1, H, T, D),
                                                               k[b:b + 1].expand(1, H, T, D), is_causal=True)
        assert (out[b:b + 1].float() - ref.float()).abs().max() < 2e-2
    del out
    x = q.view(-1, D * 64)[: 2 ** 31 // (D * 64) + 8]  # rms_norm rows past 2^31 elements
    y = kernels.rms_norm(x, None, 1e-6, impl="triton")
    tail = x[-4:].float()
    assert (y[-4:].float() - tail * torch.rsqrt(tail.pow(2).mean(-1, keepdim=True) + 1e-6)).abs().max() < 3e-2


# -----------------------------------------------------------------------------
# RMSNorm

def naive_rms_norm(x, w, eps):
    x = x.double()
    y = x / torch.sqrt((x * x).sum(-1, keepdim=True) / x.shape[-1] + eps)
    return y * w.double() if w is not None else y


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 48), (37, 100), (1, 64)])
def test_rms_norm(impl, dtype, shape):
    gen = torch.Generator().manual_seed(len(shape) + shape[-1])
    x = leaf(torch.randn(shape, generator=gen) * 3, dtype)
    w = leaf(1 + 0.5 * torch.randn(shape[-1], generator=gen), torch.float32)
    dy = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    y = kernels.rms_norm(x, w, 1e-5, impl=impl)
    assert y.dtype == dtype and y.shape == x.shape
    ref = naive_rms_norm(x, w, 1e-5)
    assert_close(y, ref, dtype, "y")
    gx, gw = grads(y, (x, w), dy)
    gxr, gwr = grads(ref, (x, w), dy.double())
    assert_close(gx, gxr, dtype, "dx")
    assert_close(gw, gwr, dtype, "dw")  # summed over all rows: checks the partial-sum reduction


@pytest.mark.parametrize("impl", IMPLS)
def test_rms_norm_no_weight(impl):
    x = leaf(torch.randn(9, 40), torch.float32)
    y = kernels.rms_norm(x, None, 1e-6, impl=impl)
    ref = naive_rms_norm(x, None, 1e-6)
    assert_close(y, ref, torch.float32, "y")
    dy = torch.randn(9, 40, device=DEVICE)
    assert_close(grads(y, (x,), dy)[0], grads(ref, (x,), dy.double())[0], torch.float32, "dx")


def test_rms_norm_weight_shape_error():
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        kernels.rms_norm(torch.randn(2, 8), torch.ones(4), 1e-5)


# -----------------------------------------------------------------------------
# RoPE

def naive_rope(x, theta):
    # rotate each pair (x[i], x[i + hd/2]) by theta[i] as a complex multiplication
    half = x.shape[-1] // 2
    xd = x.double()
    z = torch.complex(xd[..., :half], xd[..., half:])
    rot = torch.polar(torch.ones_like(theta, dtype=torch.float64), theta.double())[:, :, None, :]
    z = z * rot
    return torch.cat([z.real, z.imag], dim=-1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,H,hd,per_batch", [(2, 7, 3, 16, False), (1, 33, 4, 32, True), (2, 1, 2, 64, False)])
def test_rope(impl, dtype, B, T, H, hd, per_batch):
    gen = torch.Generator().manual_seed(T + hd)
    x = leaf(torch.randn(B, T, H, hd, generator=gen), dtype)
    theta = (torch.rand(B if per_batch else 1, T, hd // 2, generator=gen) * 20 - 10).to(DEVICE)
    dy = torch.randn(B, T, H, hd, generator=gen).to(DEVICE, dtype)
    y = kernels.apply_rope(x, theta.cos(), theta.sin(), impl=impl)
    assert y.dtype == dtype and y.shape == x.shape
    ref = naive_rope(x, theta)
    assert_close(y, ref, dtype, "y")
    assert_close(grads(y, (x,), dy)[0], grads(ref, (x,), dy.double())[0], dtype, "dx")


@pytest.mark.parametrize("impl", IMPLS)
def test_rope_strided_input(impl):
    # q as a slice of a fused qkv projection: non-contiguous along heads
    B, T, H, hd = 2, 9, 2, 16
    qkv = torch.randn(B, T, 3 * H, hd, device=DEVICE).requires_grad_()
    x = qkv[:, :, H:2 * H]
    theta = torch.randn(1, T, hd // 2, device=DEVICE)
    y = kernels.apply_rope(x, theta.cos(), theta.sin(), impl=impl)
    ref = naive_rope(x, theta)
    assert_close(y, ref, torch.float32, "y")
    dy = torch.randn(B, T, H, hd, device=DEVICE)
    assert_close(grads(y, (qkv,), dy)[0], grads(ref, (qkv,), dy.double())[0], torch.float32, "dqkv")


def test_rope_shape_error():
    with pytest.raises(ValueError, match="cos/sin must be"):
        kernels.apply_rope(torch.randn(1, 5, 2, 8), torch.ones(1, 4, 4), torch.ones(1, 4, 4))


# -----------------------------------------------------------------------------
# SwiGLU

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 67), (1000,)])
def test_swiglu(impl, dtype, shape):
    gen = torch.Generator().manual_seed(shape[-1])
    gate = leaf(torch.randn(shape, generator=gen) * 4, dtype)
    up = leaf(torch.randn(shape, generator=gen), dtype)
    dy = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    y = kernels.swiglu(gate, up, impl=impl)
    assert y.dtype == dtype and y.shape == gate.shape
    g64 = gate.double()
    ref = g64 / (1 + torch.exp(-g64)) * up.double()
    assert_close(y, ref, dtype, "y")
    for name, a, b in zip(["dgate", "dup"], grads(y, (gate, up), dy), grads(ref, (gate, up), dy.double())):
        assert_close(a, b, dtype, name)


# -----------------------------------------------------------------------------
# cross-entropy

def naive_cross_entropy(logits, targets, ignore_index, reduction, z_loss, softcap):
    # log-softmax by hand in float64
    z = logits.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    m = z.amax(-1, keepdim=True)
    lse = (torch.log(torch.exp(z - m).sum(-1, keepdim=True)) + m).squeeze(-1)
    valid = targets != ignore_index
    z_t = z.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    loss = torch.where(valid, lse - z_t + z_loss * lse * lse, torch.zeros_like(lse))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    n = valid.sum()
    return loss.sum() / n if n > 0 else loss.sum() * 0.0


def make_targets(N, V, gen, frac_ignored=0.2, ignore_index=-100):
    t = torch.randint(0, V, (N,), generator=gen)
    t[torch.rand(N, generator=gen) < frac_ignored] = ignore_index
    return t.to(DEVICE)


CE_OPTS = [(0.0, None), (1e-3, None), (0.0, 8.0), (1e-2, 15.0)]  # (z_loss, softcap)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("z_loss,softcap", CE_OPTS)
def test_cross_entropy(impl, dtype, reduction, z_loss, softcap):
    N, V = 37, 300  # V spans several vocab blocks of the kernel, and not a power of two
    gen = torch.Generator().manual_seed(7)
    logits = leaf(torch.randn(N, V, generator=gen) * 4, dtype)
    targets = make_targets(N, V, gen)
    loss = kernels.cross_entropy(logits, targets, reduction=reduction, z_loss=z_loss, softcap=softcap, impl=impl)
    ref = naive_cross_entropy(logits, targets, -100, reduction, z_loss, softcap)
    assert loss.shape == ref.shape
    assert_close(loss, ref, torch.float32, "loss")  # loss is computed in fp32 whatever the input
    go = torch.rand(ref.shape, generator=gen).to(DEVICE) + 0.5
    (g,) = grads(loss, (logits,), go)
    (gr,) = grads(ref, (logits,), go.double())
    assert g.dtype == dtype
    assert_close(g, gr, dtype, "dlogits")
    if reduction == "none":
        assert (loss[targets == -100] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_cross_entropy_all_ignored(impl):
    logits = leaf(torch.randn(5, 50), torch.float32)
    targets = torch.full((5,), 3, device=DEVICE)
    targets[:] = 7  # custom ignore index, every token ignored
    loss = kernels.cross_entropy(logits, targets, ignore_index=7, impl=impl)
    assert loss.item() == 0.0
    (g,) = grads(loss, (logits,), None)
    assert (g == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_cross_entropy_large_vocab(impl):
    # a Llama-3-sized vocabulary row spans many vocab blocks; a few rows keep the interpreter quick
    N, V = 3, 65536
    gen = torch.Generator().manual_seed(2)
    logits = leaf(torch.randn(N, V, generator=gen) * 6, torch.float32)
    targets = torch.tensor([0, V - 1, 12345], device=DEVICE)
    loss = kernels.cross_entropy(logits, targets, z_loss=1e-4, impl=impl)
    ref = naive_cross_entropy(logits, targets, -100, "mean", 1e-4, None)
    assert_close(loss, ref, torch.float32, "loss")
    assert_close(grads(loss, (logits,), None)[0], grads(ref, (logits,), None)[0], torch.float32, "dlogits")


@pytest.mark.parametrize("impl", IMPLS)
def test_cross_entropy_target_out_of_range(impl):
    logits = torch.randn(4, 10, device=DEVICE)
    for bad in (10, -3):
        targets = torch.tensor([1, -100, bad, 2], device=DEVICE)
        with pytest.raises(ValueError, match=rf"target {bad} at row 2 is outside the vocabulary \[0, 10\)"):
            kernels.cross_entropy(logits, targets, impl=impl)
        with pytest.raises(ValueError, match=rf"target {bad} at row 2"):
            kernels.linear_cross_entropy(torch.randn(4, 8, device=DEVICE), torch.randn(10, 8, device=DEVICE),
                                         targets, impl=impl)


# -----------------------------------------------------------------------------
# fused linear + cross-entropy

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("z_loss,softcap", [(0.0, None), (1e-2, 15.0)])
@pytest.mark.parametrize("chunk_size", [10, 4096])
def test_linear_cross_entropy(impl, reduction, z_loss, softcap, chunk_size):
    N, d, V = 37, 24, 300
    gen = torch.Generator().manual_seed(3)
    x = leaf(torch.randn(N, d, generator=gen), torch.float32)
    w = leaf(torch.randn(V, d, generator=gen) / d ** 0.5 * 3, torch.float32)
    targets = make_targets(N, V, gen)
    loss = kernels.linear_cross_entropy(x, w, targets, reduction=reduction, z_loss=z_loss, softcap=softcap,
                                        chunk_size=chunk_size, impl=impl)
    ref = naive_cross_entropy(x.double() @ w.double().T, targets, -100, reduction, z_loss, softcap)
    assert loss.shape == ref.shape
    assert_close(loss, ref, torch.float32, "loss")
    go = torch.rand(ref.shape, generator=gen).to(DEVICE) + 0.5
    gx, gw = grads(loss, (x, w), go)
    gxr, gwr = grads(ref, (x, w), go.double())
    assert_close(gx, gxr, torch.float32, "dx")
    assert_close(gw, gwr, torch.float32, "dw")


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_cross_entropy_no_grad_runs_only_the_logits_matmul(impl):
    # evaluation of a model whose weights require grad: under no_grad one matmul per chunk, no gradient
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(21, 16, generator=gen).to(DEVICE).requires_grad_()
    w = torch.randn(130, 16, generator=gen).to(DEVICE).requires_grad_()
    targets = make_targets(21, 130, gen)
    with torch.no_grad(), torch.profiler.profile() as prof:
        loss = kernels.linear_cross_entropy(x, w, targets, chunk_size=8, impl=impl)
    n_mm = sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm"))
    assert n_mm == 3, f"{n_mm} matmuls for 3 chunks"
    ref = naive_cross_entropy(x.double() @ w.double().T, targets, -100, "mean", 0.0, None)
    assert_close(loss, ref, torch.float32, "loss")


@CUDA
@pytest.mark.parametrize("impl", IMPLS)
def test_linear_cross_entropy_bf16_autocast(impl):
    # the model runs the LM head under bf16 autocast with fp32 weights
    gen = torch.Generator().manual_seed(11)
    x = leaf(torch.randn(64, 64, generator=gen), torch.bfloat16)
    w = leaf(torch.randn(512, 64, generator=gen) / 8, torch.float32)
    targets = make_targets(64, 512, gen)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = kernels.linear_cross_entropy(x, w, targets, chunk_size=16, impl=impl)
    ref = naive_cross_entropy(x.double() @ w.double().T, targets, -100, "mean", 0.0, None)
    assert_close(loss, ref, torch.bfloat16, "loss")
    gx, gw = grads(loss, (x, w), None)
    gxr, gwr = grads(ref, (x, w), None)
    assert gx.dtype == torch.bfloat16 and gw.dtype == torch.float32
    assert_close(gx, gxr, torch.bfloat16, "dx")
    assert_close(gw, gwr, torch.bfloat16, "dw")


# -----------------------------------------------------------------------------
# torch.compile: the ops trace into one graph, and a new length does not recompile again

def _block(x, w, wq, cos, sin, doc, targets, impl):
    B, T, D = x.shape
    h = kernels.rms_norm(x, w, 1e-5, impl=impl)
    q = kernels.apply_rope((h @ wq).view(B, T, 2, D // 2), cos[:, :T], sin[:, :T], impl=impl).transpose(1, 2)
    y = kernels.attention(q, q, q, causal=True, doc_ids=doc, impl=impl).transpose(1, 2).reshape(B, T, D)
    y = kernels.swiglu(y, h, impl=impl)
    return kernels.linear_cross_entropy(y.reshape(B * T, D), wq, targets.view(-1), impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_compile_fullgraph_no_recompile_per_length(impl):
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")  # traces forward and backward graphs, runs them eagerly
    compiled = torch.compile(_block, backend=counter, fullgraph=True)  # fullgraph: a graph break is an error
    gen = torch.Generator().manual_seed(0)
    D = 32
    w, wq = leaf(torch.randn(D, generator=gen), torch.float32), leaf(torch.randn(D, D, generator=gen), torch.float32)
    theta = torch.randn(1, 64, D // 4, generator=gen).to(DEVICE)
    for T in (17, 23, 30):
        x = leaf(torch.randn(2, T, D, generator=gen), torch.float32)
        doc = make_doc_ids(2, T, "packed", gen)
        targets = torch.randint(0, D, (2, T), generator=gen).to(DEVICE)
        args = (x, w, wq, theta.cos(), theta.sin(), doc, targets, impl)
        loss = compiled(*args)
        ref = _block(*args)
        assert_close(loss, ref, torch.float32, "loss")
        assert_close(grads(loss, (x, wq), None)[0], grads(ref, (x, wq), None)[0], torch.float32, "dx")
    assert counter.frame_count <= 2  # the second length marks T dynamic; the third reuses that graph


# -----------------------------------------------------------------------------
# mixture of experts

def naive_moe(x_sorted, expert, w_gate, w_up, w_down):
    # one assignment at a time, float64
    out = []
    for i in range(x_sorted.shape[0]):
        e, xi = expert[i], x_sorted[i].double()
        h = torch.nn.functional.silu(w_gate[e].double() @ xi) * (w_up[e].double() @ xi)
        out.append(w_down[e].double() @ h)
    return torch.stack(out)


def moe_case(gen, M=29, E=5, d=16, h=24, empty=(2,)):
    expert = torch.randint(0, E, (M,), generator=gen)
    for e in empty:  # experts without tokens
        expert[expert == e] = (e + 1) % E
    expert = expert.sort().values
    counts = torch.bincount(expert, minlength=E)
    x = torch.randn(M, d, generator=gen)
    ws = [torch.randn(E, h, d, generator=gen) / d ** 0.5, torch.randn(E, h, d, generator=gen) / d ** 0.5,
          torch.randn(E, d, h, generator=gen) / h ** 0.5]
    return x, expert, counts, ws


@pytest.mark.parametrize("impl", IMPLS)
def test_moe_experts_loop(impl):
    gen = torch.Generator().manual_seed(4)
    x, expert, counts, ws = moe_case(gen)
    x = leaf(x, torch.float32)
    ws = [leaf(w, torch.float32) for w in ws]
    out = kernels.moe_experts(x, counts.to(DEVICE), *ws, impl=impl)
    ref = naive_moe(x, expert.tolist(), *ws)
    assert_close(out, ref, torch.float32, "out")
    go = torch.randn(out.shape, generator=gen).to(DEVICE)
    for name, a, b in zip(["dx", "dgate", "dup", "ddown"], grads(out, [x] + ws, go), grads(ref, [x] + ws, go.double())):
        assert_close(a, b, torch.float32, name)


def test_expert_offsets():
    counts = torch.tensor([3, 0, 4, 1])
    assert kernels.expert_offsets(counts).tolist() == [3, 3, 7, 8]
    assert kernels.expert_offsets(counts).dtype == torch.int32


def test_moe_grouped_indexing_on_cpu():
    # torch._grouped_mm also has a CPU forward (torch 2.13): the grouped path's offsets and weight layout
    # against the per-token reference, in bf16 (its only dtype on CUDA)
    gen = torch.Generator().manual_seed(6)
    x, expert, counts, ws = moe_case(gen, M=40, E=4, d=16, h=32, empty=(1,))
    try:
        out = kernels._moe_experts_grouped(x, counts, *ws, impl="torch")
    except (RuntimeError, AttributeError, NotImplementedError) as e:
        pytest.skip(f"torch._grouped_mm has no CPU path in torch {torch.__version__}: {e}")
    ref = naive_moe(x.bfloat16(), expert.tolist(), *[w.bfloat16() for w in ws])
    assert out.dtype == torch.bfloat16
    assert_close(out, ref, torch.bfloat16, "out")


@CUDA
def test_moe_grouped_on_cuda():
    gen = torch.Generator().manual_seed(8)
    x, expert, counts, ws = moe_case(gen, M=300, E=8, d=64, h=128, empty=(3,))
    x = leaf(x, torch.bfloat16)
    ws = [leaf(w, torch.float32) for w in ws]
    assert kernels._grouped_mm_usable(x, ws[0], ws[2]) == hasattr(torch, "_grouped_mm")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = kernels.moe_experts(x, counts.cuda(), *ws, impl="triton")
    ref = naive_moe(x, expert.tolist(), *ws)
    assert_close(out, ref, torch.bfloat16, "out")
    go = torch.randn(out.shape, generator=gen).cuda()
    for name, a, b in zip(["dx", "dgate", "dup", "ddown"], grads(out, [x] + ws, go.bfloat16()),
                          grads(ref, [x] + ws, go.double())):
        assert_close(a, b, torch.bfloat16, name)


# -----------------------------------------------------------------------------
# dispatcher

def test_resolve_impl():
    assert kernels.resolve_impl("torch", "cuda") == "torch"
    assert kernels.resolve_impl("triton", "cpu") == "triton"
    assert kernels.resolve_impl("auto", "cpu") == "torch"
    assert kernels.resolve_impl("auto", torch.device("cpu")) == "torch"
    assert kernels.resolve_impl("auto", "cuda") == ("triton" if HAS_TRITON else "torch")
    with pytest.raises(ValueError):
        kernels.resolve_impl("fast", "cpu")


@TRITON
@pytest.mark.parametrize("packed", [False, True])
def test_model_triton_equals_torch(packed):
    """The whole model with kernels="triton" vs kernels="torch": same loss, same gradients."""
    from model import ModelConfig, Transformer
    torch.manual_seed(0)
    cfg = dict(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, max_seq_len=32, qk_norm=True)
    ref = Transformer(ModelConfig(**cfg, kernels="torch")).to(DEVICE)
    tri = Transformer(ModelConfig(**cfg, kernels="triton")).to(DEVICE)
    tri.load_state_dict(ref.state_dict())
    assert tri.impl == "triton" and ref.impl == "torch"
    idx = torch.randint(0, 97, (2, 19), device=DEVICE)
    targets = torch.randint(0, 97, (2, 19), device=DEVICE)
    targets[0, :4] = -100
    kw = {}
    if packed:  # two documents in row 0, positions restarting at the boundary
        doc = torch.tensor([[0] * 8 + [1] * 11, [0] * 19], device=DEVICE)
        pos = torch.tensor([list(range(8)) + list(range(11)), list(range(19))], device=DEVICE)
        kw = dict(doc_ids=doc, positions=pos)
    losses = []
    for m in (ref, tri):
        _, loss = m(idx, targets, **kw)
        loss.backward()
        losses.append(loss)
    assert_close(losses[1], losses[0], torch.float32, "loss")
    for (name, p_ref), p_tri in zip(ref.named_parameters(), tri.parameters()):
        assert_close(p_tri.grad, p_ref.grad, torch.float32, name)
