"""
Fused kernels for training, each with a plain PyTorch reference right beside it.

Every public op takes impl="torch" (the reference: obviously-correct PyTorch, runs
anywhere, this is what CPU training uses) or impl="triton" (hand-written Triton kernels
wrapped in torch.autograd.Function with forward and backward; needs CUDA, or the CPU
interpreter with TRITON_INTERPRET=1 which is how the tests run without a GPU).

Ops:
    attention(q, k, v, causal, doc_ids)     flash attention (FA2-style), GQA, packed-document masks
    rms_norm(x, weight, eps)                RMSNorm
    apply_rope(x, cos, sin)                 rotary embedding, half-split (Llama/HF) convention
    swiglu(gate, up)                        silu(gate) * up
    cross_entropy(logits, targets, ...)     with ignore_index, z_loss, tanh softcap
    linear_cross_entropy(x, weight, ...)    LM head + CE, chunked so the (N, V) logits never exist

Triton is imported lazily so `import kernels` works on machines without it (e.g. macOS).
"""

import math
import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # no triton (macOS, minimal installs): only impl="torch" is available
    triton = None
    tl = None

# under the CPU interpreter every kernel program is executed in numpy, so we use tiny
# blocks and a single autotune config to keep tests fast
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


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


def _num_programs_hint(device):
    # how many persistent programs to launch for kernels that reduce across rows
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


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


if triton is not None:

    def _attn_configs(pairs):
        if INTERPRET:
            return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in pairs]

    # small lists for Hopper (H100/H200) and Ampere (A100), (BLOCK_M, BLOCK_N, warps, stages); chosen
    # from ptxas register/shared-memory reports for hd 64/128 (the dK/dV kernel keeps two fp32
    # accumulators, so it wants narrow query tiles and 8 warps). Autotune drops what does not fit.
    _ATTN_FWD_CONFIGS = _attn_configs([(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (64, 32, 4, 4)])
    _ATTN_DKDV_CONFIGS = _attn_configs([(32, 64, 8, 2), (16, 128, 8, 2), (32, 128, 8, 2), (64, 64, 8, 2), (32, 64, 4, 3)])
    _ATTN_DQ_CONFIGS = _attn_configs([(128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)])

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
    def _doc_range(DOC_b, offs, T):
        # load a block of doc ids and its [min, max]; a tile whose q and kv doc-id ranges do not
        # overlap has no allowed pair at all, so it can be skipped (works for any ids, sorted or not)
        m = offs < T
        doc = tl.load(DOC_b + offs, mask=m, other=-1)
        lo = tl.min(tl.where(m, doc, 2147483647), axis=0)
        hi = tl.max(tl.where(m, doc, -2147483647), axis=0)
        return doc, lo, hi

    @triton.jit
    def _attn_fwd_tile(acc, l_i, m_i, q, K_bh, V_bh, DOC_b, rows, doc_q, q_lo, q_hi, start_n, T, HEAD_DIM: tl.constexpr,
                       stride_kt, stride_kd, stride_vt, stride_vd, qk_scale,
                       MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, DOT_PREC: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        # one key/value tile of the online softmax. MASKED=False only for tiles the caller knows are
        # fully visible (below the causal diagonal, inside T, no doc mask): saves the mask math
        cols = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < HEAD_DIM
        doc_k = cols
        overlap = True
        if HAS_DOC:
            doc_k, k_lo, k_hi = _doc_range(DOC_b, cols, T)
            overlap = (k_hi >= q_lo) & (k_lo <= q_hi)
        if overlap:
            kt_ptrs = K_bh + cols[None, :] * stride_kt + offs_d[:, None] * stride_kd  # (D, N): K^T
            v_ptrs = V_bh + cols[:, None] * stride_vt + offs_d[None, :] * stride_vd
            if MASKED:  # the only tiles that can reach past T
                kt = tl.load(kt_ptrs, mask=(cols[None, :] < T) & mask_d[:, None], other=0.0)
            elif BLOCK_D == HEAD_DIM:
                kt = tl.load(kt_ptrs)
            else:
                kt = tl.load(kt_ptrs, mask=mask_d[:, None], other=0.0)
            s = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale  # in log2 units (scale * log2 e)
            if MASKED:
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
            m_i = m_new
        return acc, l_i, m_i

    @triton.autotune(configs=_ATTN_FWD_CONFIGS, key=["T", "HEAD_DIM", "CAUSAL", "HAS_DOC"])
    @triton.jit
    def _attn_fwd_kernel(
        Q, K, V, O, LSE, DOC,
        stride_qb, stride_qh, stride_qt, stride_qd,
        stride_kb, stride_kh, stride_kt, stride_kd,
        stride_vb, stride_vh, stride_vt, stride_vd,
        stride_ob, stride_oh, stride_ot, stride_od,
        stride_docb,
        H, T, GROUP, qk_scale,
        HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, DOT_PREC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        start_m = tl.program_id(0) * BLOCK_M
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        hk = h // GROUP  # GQA: the kv head this query head reads, no repeated K/V in memory
        rows = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        io_mask = (rows[:, None] < T) & (offs_d[None, :] < HEAD_DIM)
        q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                    mask=io_mask, other=0.0)
        K_bh = K + b * stride_kb + hk * stride_kh
        V_bh = V + b * stride_vb + hk * stride_vh
        DOC_b = DOC + b * stride_docb

        # running max starts finite so that a fully-masked tile never computes (-inf) - (-inf)
        m_i = tl.full([BLOCK_M], -1e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

        doc_q = rows  # placeholder when there are no doc ids
        q_lo = 0
        q_hi = 0
        if HAS_DOC:
            doc_q, q_lo, q_hi = _doc_range(DOC_b, rows, T)

        # key tiles [0, n_full) need no mask; [n_full, hi) do (diagonal or ragged end). Causal:
        # tiles strictly above the diagonal are fully masked and never visited.
        if CAUSAL:
            n_full = (start_m // BLOCK_N) * BLOCK_N
            hi = tl.minimum(start_m + BLOCK_M, T)
        else:
            n_full = (T // BLOCK_N) * BLOCK_N
            hi = T
        for start_n in range(0, n_full, BLOCK_N):
            acc, l_i, m_i = _attn_fwd_tile(acc, l_i, m_i, q, K_bh, V_bh, DOC_b, rows, doc_q, q_lo, q_hi, start_n,
                                           T, HEAD_DIM, stride_kt, stride_kd, stride_vt, stride_vd, qk_scale,
                                           HAS_DOC, CAUSAL, HAS_DOC, DOT_PREC, BLOCK_N, BLOCK_D)
        for start_n in range(n_full, hi, BLOCK_N):
            acc, l_i, m_i = _attn_fwd_tile(acc, l_i, m_i, q, K_bh, V_bh, DOC_b, rows, doc_q, q_lo, q_hi, start_n,
                                           T, HEAD_DIM, stride_kt, stride_kd, stride_vt, stride_vd, qk_scale,
                                           True, CAUSAL, HAS_DOC, DOT_PREC, BLOCK_N, BLOCK_D)

        l_i = tl.where(l_i == 0.0, 1.0, l_i)  # only padding rows can have nothing to attend to
        acc = acc / l_i[:, None]
        tl.store(O + b * stride_ob + h * stride_oh + rows[:, None] * stride_ot + offs_d[None, :] * stride_od,
                 acc.to(O.dtype.element_ty), mask=io_mask)
        # log-sum-exp in log2 units, exactly what the backward needs to rebuild P = exp2(s - lse)
        tl.store(LSE + bh * T + rows, m_i + tl.log2(l_i), mask=rows < T)

    @triton.jit
    def _attn_bwd_preprocess_kernel(O, DO, DELTA, stride_ob, stride_oh, stride_ot, stride_od,
                                    stride_dob, stride_doh, stride_dot, stride_dod,
                                    H, T, HEAD_DIM, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        # delta_i = sum_d dO_id * O_id = rowsum(dP * P) for row i, used in dS = P * (dP - delta)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m = (rows[:, None] < T) & (offs_d[None, :] < HEAD_DIM)
        o = tl.load(O + b * stride_ob + h * stride_oh + rows[:, None] * stride_ot + offs_d[None, :] * stride_od, mask=m, other=0.0)
        do = tl.load(DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dot + offs_d[None, :] * stride_dod, mask=m, other=0.0)
        tl.store(DELTA + bh * T + rows, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=rows < T)

    @triton.jit
    def _attn_dkdv_tile(dk, dv, k, v, Q_bh, DO_bh, LSE_bh, DELTA_bh, DOC_b, cols, doc_k, k_lo, k_hi, start_m,
                        T, HEAD_DIM: tl.constexpr, stride_qt, stride_qd, stride_dot, stride_dod, qk_scale,
                        MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, DOT_PREC: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        # one query tile's contribution to dK/dV of this key block. Works on the transposed tile
        # (keys x queries) so results land in dK/dV's layout without transposing accumulators.
        rows = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        doc_q = rows
        overlap = True
        if HAS_DOC:
            doc_q, q_lo, q_hi = _doc_range(DOC_b, rows, T)
            overlap = (k_hi >= q_lo) & (k_lo <= q_hi)
        if overlap:
            q_mask = (rows[:, None] < T) & (offs_d[None, :] < HEAD_DIM)
            q = tl.load(Q_bh + rows[:, None] * stride_qt + offs_d[None, :] * stride_qd, mask=q_mask, other=0.0)
            do = tl.load(DO_bh + rows[:, None] * stride_dot + offs_d[None, :] * stride_dod, mask=q_mask, other=0.0)
            # lse = +inf on padding rows makes their P exactly 0 even in unmasked tiles
            lse = tl.load(LSE_bh + rows, mask=rows < T, other=float("inf"))
            delta = tl.load(DELTA_bh + rows, mask=rows < T, other=0.0)
            sT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale
            pT = tl.exp2(sT - lse[None, :])
            if MASKED:
                pT = tl.where(tl.trans(_attn_tile_mask(rows, cols, T, doc_q, doc_k, CAUSAL, HAS_DOC)), pT, 0.0)
            dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PREC)
            dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
            dsT = pT * (dpT - delta[None, :])
            dk += tl.dot(dsT.to(q.dtype), q, input_precision=DOT_PREC)
        return dk, dv

    @triton.autotune(configs=_ATTN_DKDV_CONFIGS, key=["T", "HEAD_DIM", "CAUSAL", "HAS_DOC"])
    @triton.jit
    def _attn_bwd_dkdv_kernel(
        Q, K, V, DO, LSE, DELTA, DK, DV, DOC,
        stride_qb, stride_qh, stride_qt, stride_qd,
        stride_kb, stride_kh, stride_kt, stride_kd,
        stride_vb, stride_vh, stride_vt, stride_vd,
        stride_dob, stride_doh, stride_dot, stride_dod,
        stride_dkb, stride_dkh, stride_dkt, stride_dkd,  # DK and DV share one layout
        stride_docb,
        H, H_KV, T, GROUP, qk_scale, sm_scale,
        HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, DOT_PREC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # one program per (key block, kv head); walks all query blocks of every query head in the
        # GQA group, so dK/dV are summed over the group in registers (no atomics, no repeated K/V)
        start_n = tl.program_id(0) * BLOCK_N
        bhk = tl.program_id(1)
        b = bhk // H_KV
        hk = bhk % H_KV
        cols = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        kv_mask = (cols[:, None] < T) & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(K + b * stride_kb + hk * stride_kh + cols[:, None] * stride_kt + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(V + b * stride_vb + hk * stride_vh + cols[:, None] * stride_vt + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        DOC_b = DOC + b * stride_docb

        doc_k = cols
        k_lo = 0
        k_hi = 0
        if HAS_DOC:
            doc_k, k_lo, k_hi = _doc_range(DOC_b, cols, T)

        # causal: query tiles before this key block see none of it (skipped), tiles in [lo, mid)
        # straddle the diagonal (masked), tiles from mid on see all of it (unmasked)
        lo = 0
        mid = 0
        if CAUSAL:
            lo = (start_n // BLOCK_M) * BLOCK_M
            mid = tl.minimum((start_n + BLOCK_N + BLOCK_M - 1) // BLOCK_M * BLOCK_M, T)
        for g in range(GROUP):
            h = hk * GROUP + g
            Q_bh = Q + b * stride_qb + h * stride_qh
            DO_bh = DO + b * stride_dob + h * stride_doh
            LSE_bh = LSE + (b * H + h) * T
            DELTA_bh = DELTA + (b * H + h) * T
            for start_m in range(lo, mid, BLOCK_M):
                dk, dv = _attn_dkdv_tile(dk, dv, k, v, Q_bh, DO_bh, LSE_bh, DELTA_bh, DOC_b, cols, doc_k, k_lo, k_hi,
                                         start_m, T, HEAD_DIM, stride_qt, stride_qd, stride_dot, stride_dod, qk_scale,
                                         True, CAUSAL, HAS_DOC, DOT_PREC, BLOCK_M, BLOCK_D)
            for start_m in range(mid, T, BLOCK_M):
                dk, dv = _attn_dkdv_tile(dk, dv, k, v, Q_bh, DO_bh, LSE_bh, DELTA_bh, DOC_b, cols, doc_k, k_lo, k_hi,
                                         start_m, T, HEAD_DIM, stride_qt, stride_qd, stride_dot, stride_dod, qk_scale,
                                         HAS_DOC, CAUSAL, HAS_DOC, DOT_PREC, BLOCK_M, BLOCK_D)
        dk = dk * sm_scale
        out_off = b * stride_dkb + hk * stride_dkh + cols[:, None] * stride_dkt + offs_d[None, :] * stride_dkd
        tl.store(DK + out_off, dk.to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=kv_mask)

    @triton.jit
    def _attn_dq_tile(dq, q, do, lse, delta, K_bh, V_bh, DOC_b, rows, doc_q, q_lo, q_hi, start_n, T, HEAD_DIM: tl.constexpr,
                      stride_kt, stride_kd, stride_vt, stride_vd, qk_scale,
                      MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, DOT_PREC: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        cols = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        doc_k = cols
        overlap = True
        if HAS_DOC:
            doc_k, k_lo, k_hi = _doc_range(DOC_b, cols, T)
            overlap = (k_hi >= q_lo) & (k_lo <= q_hi)
        if overlap:
            k_ptrs = K_bh + cols[:, None] * stride_kt + offs_d[None, :] * stride_kd
            v_ptrs = V_bh + cols[:, None] * stride_vt + offs_d[None, :] * stride_vd
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
                p = tl.where(_attn_tile_mask(rows, cols, T, doc_q, doc_k, CAUSAL, HAS_DOC), p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
        return dq

    @triton.autotune(configs=_ATTN_DQ_CONFIGS, key=["T", "HEAD_DIM", "CAUSAL", "HAS_DOC"])
    @triton.jit
    def _attn_bwd_dq_kernel(
        Q, K, V, DO, LSE, DELTA, DQ, DOC,
        stride_qb, stride_qh, stride_qt, stride_qd,
        stride_kb, stride_kh, stride_kt, stride_kd,
        stride_vb, stride_vh, stride_vt, stride_vd,
        stride_dob, stride_doh, stride_dot, stride_dod,
        stride_dqb, stride_dqh, stride_dqt, stride_dqd,
        stride_docb,
        H, T, GROUP, qk_scale, sm_scale,
        HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, DOT_PREC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # separate pass for dQ (one program per query block) so nothing needs atomics
        start_m = tl.program_id(0) * BLOCK_M
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        hk = h // GROUP
        rows = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        q_mask = (rows[:, None] < T) & (offs_d[None, :] < HEAD_DIM)
        q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qt + offs_d[None, :] * stride_qd, mask=q_mask, other=0.0)
        do = tl.load(DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dot + offs_d[None, :] * stride_dod, mask=q_mask, other=0.0)
        lse = tl.load(LSE + bh * T + rows, mask=rows < T, other=float("inf"))
        delta = tl.load(DELTA + bh * T + rows, mask=rows < T, other=0.0)
        K_bh = K + b * stride_kb + hk * stride_kh
        V_bh = V + b * stride_vb + hk * stride_vh
        DOC_b = DOC + b * stride_docb
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

        doc_q = rows
        q_lo = 0
        q_hi = 0
        if HAS_DOC:
            doc_q, q_lo, q_hi = _doc_range(DOC_b, rows, T)

        # same tile split as the forward: [0, n_full) unmasked, [n_full, hi) masked
        if CAUSAL:
            n_full = (start_m // BLOCK_N) * BLOCK_N
            hi = tl.minimum(start_m + BLOCK_M, T)
        else:
            n_full = (T // BLOCK_N) * BLOCK_N
            hi = T
        for start_n in range(0, n_full, BLOCK_N):
            dq = _attn_dq_tile(dq, q, do, lse, delta, K_bh, V_bh, DOC_b, rows, doc_q, q_lo, q_hi, start_n, T, HEAD_DIM,
                               stride_kt, stride_kd, stride_vt, stride_vd, qk_scale,
                               HAS_DOC, CAUSAL, HAS_DOC, DOT_PREC, BLOCK_N, BLOCK_D)
        for start_n in range(n_full, hi, BLOCK_N):
            dq = _attn_dq_tile(dq, q, do, lse, delta, K_bh, V_bh, DOC_b, rows, doc_q, q_lo, q_hi, start_n, T, HEAD_DIM,
                               stride_kt, stride_kd, stride_vt, stride_vd, qk_scale,
                               True, CAUSAL, HAS_DOC, DOT_PREC, BLOCK_N, BLOCK_D)
        dq = dq * sm_scale
        tl.store(DQ + b * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqt + offs_d[None, :] * stride_dqd,
                 dq.to(DQ.dtype.element_ty), mask=q_mask)

    def _attn_common(q, k, doc_ids):
        B, H, T, D = q.shape
        H_KV = k.shape[1]
        assert H % H_KV == 0, "n_head must be a multiple of n_kv_head"
        assert k.shape == (B, H_KV, T, D), "k/v must be (B, n_kv_head, T, hd) with the same T as q"
        BLOCK_D = max(16, triton.next_power_of_2(D))  # tl.dot needs every dim >= 16
        sm_scale = 1.0 / math.sqrt(D)
        # fp32 inputs: full-precision dots (tf32 would be a silent accuracy change); 16-bit: native
        dot_prec = "ieee" if q.dtype == torch.float32 else "tf32"
        if doc_ids is not None:
            doc_ids = doc_ids.to(device=q.device, dtype=torch.int32).contiguous()
            assert doc_ids.shape == (B, T)
        return B, H, H_KV, T, D, BLOCK_D, sm_scale, dot_prec, doc_ids

    class _FlashAttention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, causal, doc_ids):
            B, H, H_KV, T, D, BLOCK_D, sm_scale, dot_prec, doc_ids = _attn_common(q, k, doc_ids)
            o = torch.empty_like(q)
            lse = torch.empty((B, H, T), device=q.device, dtype=torch.float32)
            doc = doc_ids if doc_ids is not None else lse  # dummy pointer, never read
            grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)
            _attn_fwd_kernel[grid](
                q, k, v, o, lse, doc,
                *q.stride(), *k.stride(), *v.stride(), *o.stride(),
                doc_ids.stride(0) if doc_ids is not None else 0,
                H, T, H // H_KV, sm_scale * 1.4426950408889634,
                HEAD_DIM=D, CAUSAL=causal, HAS_DOC=doc_ids is not None, DOT_PREC=dot_prec, BLOCK_D=BLOCK_D,
            )
            ctx.save_for_backward(q, k, v, o, lse, doc_ids)
            ctx.causal = causal
            return o

        @staticmethod
        def backward(ctx, do):
            q, k, v, o, lse, doc_ids = ctx.saved_tensors
            B, H, H_KV, T, D, BLOCK_D, sm_scale, dot_prec, doc_ids = _attn_common(q, k, doc_ids)
            causal = ctx.causal
            if do.stride(-1) != 1:
                do = do.contiguous()
            delta = torch.empty_like(lse)
            PRE_M = 16 if INTERPRET else 64
            _attn_bwd_preprocess_kernel[(triton.cdiv(T, PRE_M), B * H)](
                o, do, delta, *o.stride(), *do.stride(), H, T, D, BLOCK_M=PRE_M, BLOCK_D=BLOCK_D)
            dq = torch.empty_like(q)
            dk = torch.empty_like(k)
            dv = torch.empty_like(v)
            assert dk.stride() == dv.stride()
            doc = doc_ids if doc_ids is not None else lse
            doc_stride = doc_ids.stride(0) if doc_ids is not None else 0
            has_doc = doc_ids is not None
            qk_scale = sm_scale * 1.4426950408889634
            _attn_bwd_dkdv_kernel[lambda meta: (triton.cdiv(T, meta["BLOCK_N"]), B * H_KV)](
                q, k, v, do, lse, delta, dk, dv, doc,
                *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), doc_stride,
                H, H_KV, T, H // H_KV, qk_scale, sm_scale,
                HEAD_DIM=D, CAUSAL=causal, HAS_DOC=has_doc, DOT_PREC=dot_prec, BLOCK_D=BLOCK_D,
            )
            _attn_bwd_dq_kernel[lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)](
                q, k, v, do, lse, delta, dq, doc,
                *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(), doc_stride,
                H, T, H // H_KV, qk_scale, sm_scale,
                HEAD_DIM=D, CAUSAL=causal, HAS_DOC=has_doc, DOT_PREC=dot_prec, BLOCK_D=BLOCK_D,
            )
            return dq, dk, dv, None, None


def attention(q, k, v, causal=True, doc_ids=None, impl="torch"):
    """q: (B, n_head, T, hd), k/v: (B, n_kv_head, T, hd). doc_ids: None or (B, T) ints; tokens only
    attend within their own document. Softmax scale 1/sqrt(hd). Returns (B, n_head, T, hd)."""
    if _check_impl(impl):
        return _FlashAttention.apply(q, k, v, causal, doc_ids)
    return _attention_torch(q, k, v, causal, doc_ids)


# -----------------------------------------------------------------------------
# RMSNorm

def _rms_norm_torch(x, weight, eps):
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


if triton is not None:

    @triton.jit
    def _rms_norm_fwd_kernel(X, W, Y, RSTD, stride_x, stride_y, D, eps, BLOCK_D: tl.constexpr):
        row = tl.program_id(0)
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
        for row in range(row_start, row_end):
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

    class _RMSNorm(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, eps):
            shape = x.shape
            D = shape[-1]
            x2 = x.reshape(-1, D)
            if x2.stride(-1) != 1:
                x2 = x2.contiguous()
            M = x2.shape[0]
            has_weight = weight is not None
            w = weight if has_weight else torch.ones(D, device=x.device, dtype=torch.float32)
            y = torch.empty((M, D), device=x.device, dtype=x.dtype)
            rstd = torch.empty(M, device=x.device, dtype=torch.float32)
            BLOCK_D = triton.next_power_of_2(D)
            num_warps = min(max(BLOCK_D // 256, 1), 8)
            _rms_norm_fwd_kernel[(M,)](x2, w, y, rstd, x2.stride(0), y.stride(0), D, eps, BLOCK_D=BLOCK_D, num_warps=num_warps)
            ctx.save_for_backward(x2, w, rstd)
            ctx.has_weight = has_weight
            ctx.shape = shape
            return y.view(shape)

        @staticmethod
        def backward(ctx, dy):
            x2, w, rstd = ctx.saved_tensors
            M, D = x2.shape
            dy = dy.reshape(-1, D)
            if dy.stride(-1) != 1:
                dy = dy.contiguous()
            dx = torch.empty_like(x2)
            n_prog = max(1, min(M, _num_programs_hint(x2.device)))
            rows_per_program = triton.cdiv(M, n_prog)
            n_prog = triton.cdiv(M, rows_per_program)
            dw_partial = torch.empty((n_prog, D), device=x2.device, dtype=torch.float32)
            BLOCK_D = triton.next_power_of_2(D)
            num_warps = min(max(BLOCK_D // 256, 1), 8)
            _rms_norm_bwd_kernel[(n_prog,)](x2, w, dy, rstd, dx, dw_partial, x2.stride(0), dy.stride(0), dx.stride(0),
                                            M, D, rows_per_program, BLOCK_D=BLOCK_D, num_warps=num_warps)
            dw = dw_partial.sum(0).to(w.dtype) if ctx.has_weight else None
            return dx.view(ctx.shape), dw, None


def rms_norm(x, weight, eps, impl="torch"):
    """y = x / sqrt(mean(x^2, -1) + eps) * weight, computed in fp32, returned in x.dtype."""
    if _check_impl(impl):
        return _RMSNorm.apply(x, weight, eps)
    return _rms_norm_torch(x, weight, eps)


# -----------------------------------------------------------------------------
# Rotary embedding (half-split convention: rotate pairs (x[i], x[i + hd/2]))

def _apply_rope_torch(x, cos, sin):
    hd = x.shape[-1]
    x1, x2 = x[..., : hd // 2].float(), x[..., hd // 2:].float()
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # broadcast over heads
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


if triton is not None:

    @triton.jit
    def _rope_kernel(X, COS, SIN, Y, T, H, HALF,
                     stride_xb, stride_xt, stride_xh, stride_xd,
                     stride_yb, stride_yt, stride_yh, stride_yd,
                     stride_cb, stride_ct,
                     BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
        # one program per (b, t): cos/sin are loaded once and reused for every head
        pid = tl.program_id(0)
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

    def _rope_launch(x, cos, sin, backward):
        B, T, H, hd = x.shape
        assert hd % 2 == 0 and cos.shape[-2:] == (T, hd // 2) and cos.shape[0] in (1, B), "cos/sin must be (B or 1, T, hd/2)"
        y = torch.empty((B, T, H, hd), device=x.device, dtype=x.dtype)
        stride_cb = cos.stride(0) if cos.shape[0] > 1 else 0
        _rope_kernel[(B * T,)](x, cos, sin, y, T, H, hd // 2, *x.stride(), *y.stride(), stride_cb, cos.stride(1),
                               BACKWARD=backward, BLOCK_H=triton.next_power_of_2(H),
                               BLOCK_HALF=triton.next_power_of_2(hd // 2))
        return y

    class _RoPE(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, cos, sin):
            cos = cos.float().contiguous()
            sin = sin.float().contiguous()
            ctx.save_for_backward(cos, sin)
            return _rope_launch(x, cos, sin, backward=False)

        @staticmethod
        def backward(ctx, dy):
            cos, sin = ctx.saved_tensors
            return _rope_launch(dy, cos, sin, backward=True), None, None


def apply_rope(x, cos, sin, impl="torch"):
    """x: (B, T, H, hd); cos/sin: fp32 (B or 1, T, hd/2). out = cat(x1*cos - x2*sin, x2*cos + x1*sin)."""
    if _check_impl(impl):
        return _RoPE.apply(x, cos, sin)
    return _apply_rope_torch(x, cos, sin)


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

    class _SwiGLU(torch.autograd.Function):
        @staticmethod
        def forward(ctx, gate, up):
            assert gate.shape == up.shape
            gate = gate.contiguous()
            up = up.contiguous()
            y = torch.empty_like(gate)
            n = gate.numel()
            _swiglu_fwd_kernel[(triton.cdiv(n, _SWIGLU_BLOCK),)](gate, up, y, n, BLOCK=_SWIGLU_BLOCK)
            ctx.save_for_backward(gate, up)
            return y

        @staticmethod
        def backward(ctx, dy):
            gate, up = ctx.saved_tensors
            dy = dy.contiguous()
            dg = torch.empty_like(gate)
            du = torch.empty_like(up)
            n = gate.numel()
            _swiglu_bwd_kernel[(triton.cdiv(n, _SWIGLU_BLOCK),)](gate, up, dy, dg, du, n, BLOCK=_SWIGLU_BLOCK)
            return dg, du


def swiglu(gate, up, impl="torch"):
    """silu(gate) * up, elementwise."""
    if _check_impl(impl):
        return _SwiGLU.apply(gate, up)
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


def _ce_row_scale(targets, ignore_index, reduction, grad):
    # d(total loss)/d(per-token loss): 1/n_valid (mean), 1 (sum) or grad[i] (none); 0 when ignored
    valid = (targets != ignore_index).float()
    if reduction == "mean":
        return valid * (grad / valid.sum().clamp(min=1))
    if reduction == "sum":
        return valid * grad
    return valid * grad.float()


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
            _ce_grad_row(LOGITS_row, DLOGITS + row * stride_dl, target, lse, scale, V, z_loss, softcap, HAS_SOFTCAP, BLOCK_V)

    @triton.jit
    def _ce_bwd_kernel(LOGITS, TARGETS, LSE, SCALE, DLOGITS, stride_l, stride_dl, V, ignore_index, z_loss, softcap,
                       HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        target = tl.load(TARGETS + row)
        scale = tl.where(target != ignore_index, tl.load(SCALE + row), 0.0)
        _ce_grad_row(LOGITS + row * stride_l, DLOGITS + row * stride_dl, target, tl.load(LSE + row), scale,
                     V, z_loss, softcap, HAS_SOFTCAP, BLOCK_V)

    def _ce_block_v(V):
        return 128 if INTERPRET else min(4096, triton.next_power_of_2(V))

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
            HAS_SOFTCAP=softcap is not None, WRITE_GRAD=write_grad, BLOCK_V=BLOCK_V,
            num_warps=1 if INTERPRET else (8 if BLOCK_V >= 2048 else 4),
        )
        return loss, lse

    class _CrossEntropy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, logits, targets, ignore_index, reduction, z_loss, softcap):
            if logits.stride(-1) != 1:
                logits = logits.contiguous()
            targets = targets.contiguous()
            loss, lse = _ce_fwd_triton(logits, targets, ignore_index, z_loss, softcap)
            ctx.save_for_backward(logits, targets, lse)
            ctx.args = (ignore_index, reduction, z_loss, softcap)
            return _reduce_loss(loss, targets != ignore_index, reduction)

        @staticmethod
        def backward(ctx, grad):
            logits, targets, lse = ctx.saved_tensors
            ignore_index, reduction, z_loss, softcap = ctx.args
            N, V = logits.shape
            scale = _ce_row_scale(targets, ignore_index, reduction, grad).expand(N).contiguous()
            dlogits = torch.empty_like(logits)
            BLOCK_V = _ce_block_v(V)
            _ce_bwd_kernel[(N,)](
                logits, targets, lse, scale, dlogits, logits.stride(0), dlogits.stride(0), V, ignore_index,
                float(z_loss), float(softcap) if softcap is not None else 1.0,
                HAS_SOFTCAP=softcap is not None, BLOCK_V=BLOCK_V,
                num_warps=1 if INTERPRET else (8 if BLOCK_V >= 2048 else 4),
            )
            return dlogits, None, None, None, None, None


def cross_entropy(logits, targets, ignore_index=-100, reduction="mean", z_loss=0.0, softcap=None, impl="torch"):
    """logits (N, V) any float dtype (computed in fp32), targets (N,) long. softcap: logits ->
    softcap * tanh(logits / softcap) first. z_loss adds z_loss * lse^2 per non-ignored token.
    reduction: "mean" over non-ignored tokens (0 if none), "sum", or "none" (0 at ignored)."""
    if _check_impl(impl):
        assert reduction in ("mean", "sum", "none"), f"unknown reduction {reduction!r}"
        return _CrossEntropy.apply(logits, targets, ignore_index, reduction, z_loss, softcap)
    return _cross_entropy_torch(logits, targets, ignore_index, reduction, z_loss, softcap)


# -----------------------------------------------------------------------------
# Fused linear + cross-entropy: the LM head without ever holding (N, V) logits

def _ce_chunk(logits, targets, ignore_index, z_loss, softcap, scale, impl):
    """Per-token loss of one chunk and, if scale (per-row dL/dloss_i) is given, dL/dlogits.
    The chunk's logits are a temporary, so the triton path writes the gradient over them."""
    if impl == "triton":
        if scale is None:
            loss, _ = _ce_fwd_triton(logits, targets, ignore_index, z_loss, softcap)
            return loss, None
        loss, _ = _ce_fwd_triton(logits, targets, ignore_index, z_loss, softcap, dlogits=logits, scale=scale)
        return loss, logits
    # torch: autograd through the reference CE, restricted to this chunk
    with torch.enable_grad():
        logits = logits.detach().requires_grad_(scale is not None)
        loss = _cross_entropy_torch(logits, targets, ignore_index, "none", z_loss, softcap)
        if scale is None:
            return loss.detach(), None
        (dlogits,) = torch.autograd.grad(loss, logits, grad_outputs=scale)
    return loss.detach(), dlogits


class _LinearCrossEntropy(torch.autograd.Function):
    # For "mean"/"sum" the gradient of every chunk is known up to the (scalar) upstream grad, so it
    # is computed during forward and only rescaled in backward: one logits matmul in total. For
    # "none" the per-token upstream grads are only known in backward, which then recomputes the
    # chunk logits. Either way only one (chunk, V) block of logits exists at a time.

    @staticmethod
    def forward(ctx, x, weight, targets, ignore_index, reduction, z_loss, softcap, chunk_size, impl):
        dev = x.device.type
        # honour autocast explicitly (backward runs outside it): matmuls in the autocast dtype
        if torch.is_autocast_enabled(dev):
            cdt = torch.get_autocast_dtype(dev)
        else:
            cdt = torch.promote_types(x.dtype, weight.dtype)
        N = x.shape[0]
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        precompute = needs_grad and reduction in ("mean", "sum")
        with torch.autocast(dev, enabled=False):
            xc, wc = x.to(cdt), weight.to(cdt)
            valid = targets != ignore_index
            scale = _ce_row_scale(targets, ignore_index, reduction, torch.ones((), device=x.device)).expand(N).contiguous()
            loss = torch.empty(N, device=x.device, dtype=torch.float32)
            if precompute:
                dx = torch.empty(x.shape, device=x.device, dtype=cdt)
                dw = torch.zeros(weight.shape, device=x.device, dtype=torch.float32)
            for s in range(0, N, chunk_size):
                e = min(s + chunk_size, N)
                logits = xc[s:e] @ wc.T
                loss[s:e], dlogits = _ce_chunk(logits, targets[s:e], ignore_index, z_loss, softcap,
                                               scale[s:e] if precompute else None, impl)
                if precompute:
                    dlogits = dlogits.to(cdt)
                    dx[s:e] = dlogits @ wc
                    dw += (dlogits.T @ xc[s:e]).float()  # fp32 accumulation across chunks
        if precompute:
            ctx.save_for_backward(dx, dw)
        else:
            ctx.save_for_backward(x, weight, targets)
        ctx.precompute = precompute
        ctx.args = (ignore_index, z_loss, softcap, chunk_size, impl, cdt, x.dtype, weight.dtype)
        return _reduce_loss(loss, valid, reduction)

    @staticmethod
    def backward(ctx, grad):
        ignore_index, z_loss, softcap, chunk_size, impl, cdt, x_dtype, w_dtype = ctx.args
        if ctx.precompute:
            dx, dw = ctx.saved_tensors
            return (dx * grad).to(x_dtype), (dw * grad).to(w_dtype), None, None, None, None, None, None, None
        x, weight, targets = ctx.saved_tensors  # reduction == "none": recompute chunk by chunk
        N = x.shape[0]
        with torch.autocast(x.device.type, enabled=False):
            xc, wc = x.to(cdt), weight.to(cdt)
            scale = _ce_row_scale(targets, ignore_index, "none", grad).contiguous()
            dx = torch.empty(x.shape, device=x.device, dtype=cdt)
            dw = torch.zeros(weight.shape, device=x.device, dtype=torch.float32)
            for s in range(0, N, chunk_size):
                e = min(s + chunk_size, N)
                logits = xc[s:e] @ wc.T
                _, dlogits = _ce_chunk(logits, targets[s:e], ignore_index, z_loss, softcap, scale[s:e], impl)
                dlogits = dlogits.to(cdt)
                dx[s:e] = dlogits @ wc
                dw += (dlogits.T @ xc[s:e]).float()
        return dx.to(x_dtype), dw.to(w_dtype), None, None, None, None, None, None, None


def linear_cross_entropy(x, weight, targets, ignore_index=-100, reduction="mean", z_loss=0.0, softcap=None,
                         chunk_size=4096, impl="torch"):
    """== cross_entropy(x @ weight.T, targets, ...) for x (N, d), weight (V, d), but processed
    chunk_size tokens at a time so memory is O(chunk_size * V) instead of O(N * V)."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"unknown reduction {reduction!r}")
    _check_impl(impl)
    return _LinearCrossEntropy.apply(x, weight, targets, ignore_index, reduction, z_loss, softcap, chunk_size, impl)
