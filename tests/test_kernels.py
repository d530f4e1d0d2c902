"""
Tests for kernels.py: every op, both impls ("torch" reference and "triton"), forward values and
gradients, against naive PyTorch written here (explicit softmax with masks, explicit RMS formula,
rotation via complex multiplication, log-softmax by hand...) evaluated in float64.

Without CUDA the Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1), which must be
set before triton is imported. The interpreter gets tl.dot on bf16 wrong, so bf16 only runs on CUDA.
"""

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

IMPLS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton not installed"))]
DTYPES = [
    torch.float32,
    torch.float16,
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 needs CUDA")),
]

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
    if kind == "scattered":  # ids in no particular order: checks the tile-skip logic is not order-dependent
        return torch.randint(0, 3, (B, T), generator=gen).to(DEVICE)
    raise ValueError(kind)


# (B, H, H_KV, T, D, causal, doc kind, dtype)
ATTN_CASES = [
    (1, 2, 2, 1, 16, True, None, torch.float32),
    (2, 4, 2, 17, 32, True, None, torch.float32),
    (1, 4, 1, 33, 16, False, None, torch.float32),
    (1, 8, 1, 64, 16, True, None, torch.float32),
    (1, 8, 2, 40, 32, False, None, torch.float16),
    (2, 4, 4, 33, 32, True, None, torch.float16),
    (2, 4, 2, 48, 16, True, "packed", torch.float32),
    (2, 8, 8, 37, 16, False, "packed", torch.float32),
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
    gen = torch.Generator().manual_seed(T * 31 + H)
    q = leaf(torch.randn(B, H, T, D, generator=gen), dtype)
    k = leaf(torch.randn(B, H_KV, T, D, generator=gen), dtype)
    v = leaf(torch.randn(B, H_KV, T, D, generator=gen), dtype)
    do = torch.randn(B, H, T, D, generator=gen).to(DEVICE, dtype)
    doc_ids = make_doc_ids(B, T, doc_kind, gen)

    out = kernels.attention(q, k, v, causal=causal, doc_ids=doc_ids, impl=impl)
    assert out.shape == (B, H, T, D) and out.dtype == dtype
    ref = naive_attention(q, k, v, causal, doc_ids)
    assert_close(out, ref, dtype, "out")
    for name, g, gr in zip("qkv", grads(out, (q, k, v), do), grads(ref, (q, k, v), do.double())):
        assert_close(g, gr, dtype, "d" + name)


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
def test_linear_cross_entropy_no_grad(impl):
    # eval path: no gradients requested, loss must still be right
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(21, 16, generator=gen).to(DEVICE)
    w = torch.randn(130, 16, generator=gen).to(DEVICE)
    targets = make_targets(21, 130, gen)
    with torch.no_grad():
        loss = kernels.linear_cross_entropy(x, w, targets, chunk_size=8, impl=impl)
    ref = naive_cross_entropy(x.double() @ w.double().T, targets, -100, "mean", 0.0, None)
    assert_close(loss, ref, torch.float32, "loss")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 needs CUDA")
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
# dispatcher

def test_resolve_impl():
    assert kernels.resolve_impl("torch", "cuda") == "torch"
    assert kernels.resolve_impl("triton", "cpu") == "triton"
    assert kernels.resolve_impl("auto", "cpu") == "torch"
    assert kernels.resolve_impl("auto", torch.device("cpu")) == "torch"
    assert kernels.resolve_impl("auto", "cuda") == ("triton" if HAS_TRITON else "torch")
    with pytest.raises(ValueError):
        kernels.resolve_impl("fast", "cpu")


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
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
