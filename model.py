"""
The one decoder-only transformer every stage shares.

Llama-family block: pre-norm RMSNorm on the inputs of attention and MLP, a final
norm before the head, rotary position embeddings, grouped-query attention and a
SwiGLU MLP, no biases by default; optionally a mixture-of-experts MLP. Also here: the
reward model's architecture (the transformer with a scalar head), parameter and FLOP counting,
and the cached forward that generation.py drives. Around it, each in its own module:
generation.py (KV cache, sampling), lora.py, checkpoint.py (save, the one loader),
distributed.py (process setup, DDP/FSDP2), optim.py (AdamW, LR schedules).

The hot ops (attention, RMSNorm, RoPE, SwiGLU, cross-entropy) go through
kernels.py, which has a plain PyTorch reference for each and a Triton kernel for
CUDA; `ModelConfig.kernels` ("auto" | "triton" | "torch") picks one in one place.

RoPE convention: half-split, as in Llama/HF — dimension i is paired with
dimension i + head_dim/2 (not adjacent pairs as in the original paper). Weights
imported from an interleaved-pair model must have their q/k rows permuted.
"""

import math
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import generation
import kernels


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    n_layer: int = 6
    n_head: int = 6
    n_kv_head: int = 6             # = n_head: MHA; 1: MQA; in between: GQA
    n_embd: int = 384
    head_dim: Optional[int] = None  # per-head size of q/k/v; None: n_embd // n_head (Qwen3 sets it, != n_embd / n_head)
    ffn_hidden: Optional[int] = None  # SwiGLU hidden size; None: 8/3 * n_embd rounded up to ffn_multiple_of
    ffn_multiple_of: int = 64
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    rope_scaling: Optional[str] = None   # None | "linear" | "ntk" | "yarn" | "llama3"
    rope_factor: float = 1.0             # context extension factor s (new length / original length)
    rope_original_max_seq_len: Optional[int] = None  # the length the model was trained at (yarn, llama3)
    rope_low_freq_factor: float = 1.0    # llama3: wavelengths above original / low_freq_factor are interpolated by s
    rope_high_freq_factor: float = 4.0   # llama3: wavelengths below original / high_freq_factor are left alone
    rope_beta_fast: float = 32.0         # yarn: dimensions rotating more than beta_fast times extrapolate
    rope_beta_slow: float = 1.0          # yarn: dimensions rotating less than beta_slow times interpolate
    rope_truncate: bool = True           # yarn: round the ramp's ends to whole dimensions (HF's default)
    rope_attention_factor: Optional[float] = None  # yarn: scale of cos/sin; None: 0.1 * ln(s) + 1
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    qkv_bias: bool = False         # Qwen-style bias on q/k/v only
    qk_norm: bool = False          # RMSNorm on q and k per head, before RoPE
    dropout: float = 0.0
    init_std: float = 0.02
    logit_softcap: Optional[float] = None  # softcap * tanh(logits / softcap) on the output logits
    z_loss: float = 0.0            # coefficient of logsumexp^2 added to the training loss
    # mixture of experts (n_experts = 0: dense model)
    n_experts: int = 0
    n_experts_per_tok: int = 2     # top-k
    norm_topk_prob: bool = True    # renormalise the chosen k gate weights to sum 1 (False: raw softmax probs, Qwen-MoE)
    n_shared_experts: int = 0      # always-on experts (DeepSeekMoE)
    shared_ffn_hidden: Optional[int] = None  # hidden size of the shared MLP; None: n_shared_experts * moe_ffn_hidden
    shared_expert_gate: bool = False     # Qwen2-MoE: shared output * sigmoid(Linear(d, 1)(x)) per token
    moe_ffn_hidden: Optional[int] = None  # hidden size of one expert; None: ffn_hidden
    first_k_dense: int = 0         # the first k layers keep a dense MLP
    moe_aux_loss_coef: float = 0.01      # Switch-style load-balancing loss; 0 disables it
    moe_bias_update_rate: float = 0.0    # DeepSeek aux-loss-free balancing: gamma of the per-expert bias update
    kernels: str = "auto"          # "auto" (Triton on CUDA) | "triton" | "torch"

    def __post_init__(self):
        # shape mistakes are config errors (ValueError), never silently "fixed"
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head} "
                                 f"(or set head_dim explicitly)")
            self.head_dim = self.n_embd // self.n_head
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} must be divisible by n_kv_head={self.n_kv_head}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.ffn_hidden is None:
            h = int(8 * self.n_embd / 3)
            self.ffn_hidden = self.ffn_multiple_of * math.ceil(h / self.ffn_multiple_of)
        if self.moe_ffn_hidden is None:
            self.moe_ffn_hidden = self.ffn_hidden
        if self.shared_ffn_hidden is None:
            self.shared_ffn_hidden = self.n_shared_experts * self.moe_ffn_hidden
        if self.rope_scaling not in (None, "linear", "ntk", "yarn", "llama3"):
            raise ValueError(f"unknown rope_scaling {self.rope_scaling!r}: use None, linear, ntk, yarn or llama3")
        if self.rope_scaling == "llama3" and not self.rope_low_freq_factor < self.rope_high_freq_factor:
            raise ValueError(f"llama3 RoPE needs rope_low_freq_factor={self.rope_low_freq_factor} < "
                             f"rope_high_freq_factor={self.rope_high_freq_factor}")
        if self.n_experts and not 0 < self.n_experts_per_tok <= self.n_experts:
            raise ValueError(f"n_experts_per_tok={self.n_experts_per_tok} must be in 1..n_experts={self.n_experts}")
        if self.shared_expert_gate and not self.n_shared_experts:
            raise ValueError("shared_expert_gate=True needs a shared expert: set n_shared_experts >= 1")

    @classmethod
    def from_dict(cls, d):
        """A config from a checkpoint's model_config; keys it lacks (older checkpoints) take the defaults, which
        are the behaviour of the model.py that wrote it."""
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}: the checkpoint was written by another "
                             f"version of model.py")
        return cls(**d)


# -----------------------------------------------------------------------------
# rotary embeddings

def rope_frequencies(cfg: ModelConfig):
    """Inverse frequencies (head_dim/2,) in fp32 and the attention scale for cos/sin, with context-extension scaling.
    linear, yarn and llama3 follow transformers' modeling_rope_utils (the formulas HF checkpoints were trained with);
    ntk is the static NTK-aware base stretch, which HF does not have (its "dynamic" NTK depends on the length)."""
    hd, base, s = cfg.head_dim, cfg.rope_theta, cfg.rope_factor
    if cfg.rope_scaling == "ntk":  # NTK-aware: stretch the base so the lowest frequency is interpolated by s
        base = base * s ** (hd / (hd - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    mscale = 1.0
    if cfg.rope_scaling == "linear":  # position interpolation: m -> m / s
        inv_freq = inv_freq / s
    elif cfg.rope_scaling == "yarn":
        # per-frequency ramp: dimensions that rotate many times over the original context are left alone
        # (extrapolate), those that rotate less than once are interpolated by s, a linear ramp in between
        orig = cfg.rope_original_max_seq_len or cfg.max_seq_len
        def dim_of(n_rot):  # the dimension index that completes n_rot rotations over orig positions
            return hd * math.log(orig / (n_rot * 2 * math.pi)) / (2 * math.log(base))
        low, high = dim_of(cfg.rope_beta_fast), dim_of(cfg.rope_beta_slow)
        if cfg.rope_truncate:
            low, high = math.floor(low), math.ceil(high)
        # the upper bound is clamped to hd - 1 (not hd/2 - 1), as in the YaRN reference and transformers
        low, high = max(low, 0), min(high, hd - 1)
        if low == high:
            high += 0.001  # no division by zero
        ramp = ((torch.arange(hd // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        inv_freq = inv_freq / s * ramp + inv_freq * (1 - ramp)
        mscale = cfg.rope_attention_factor
        if mscale is None:
            mscale = 0.1 * math.log(s) + 1.0 if s > 1 else 1.0  # attention temperature sqrt(1/t)
    elif cfg.rope_scaling == "llama3":
        # Llama 3.1: wavelengths longer than orig / low_freq_factor are interpolated by s, those shorter than
        # orig / high_freq_factor are left alone, and a smooth blend in between
        orig = cfg.rope_original_max_seq_len or cfg.max_seq_len
        lo, hi = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = ((orig / wavelen - lo) / (hi - lo)).clamp(0, 1)
        inv_freq = (1 - smooth) * inv_freq / s + smooth * inv_freq
    return inv_freq.float(), mscale


def rope_cache(cfg: ModelConfig, length, device=None):
    inv_freq, mscale = rope_frequencies(cfg)
    t = torch.arange(length, dtype=torch.float32)
    angles = torch.outer(t, inv_freq)
    return (angles.cos() * mscale).to(device), (angles.sin() * mscale).to(device)


# -----------------------------------------------------------------------------
# layers

class RMSNorm(nn.Module):
    def __init__(self, dim, eps, impl):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.impl = eps, impl

    def forward(self, x):
        return kernels.rms_norm(x, self.weight, self.eps, impl=self.impl)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, impl):
        super().__init__()
        hd = cfg.head_dim
        self.n_head, self.n_kv_head, self.head_dim, self.impl = cfg.n_head, cfg.n_kv_head, hd, impl
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_head * hd, cfg.n_embd, bias=False)
        self.q_norm = RMSNorm(hd, cfg.norm_eps, impl) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, cfg.norm_eps, impl) if cfg.qk_norm else None
        self.dropout = cfg.dropout

    def forward(self, x, cos, sin, doc_ids=None, cache=None, layer=None, cache_pos=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = kernels.apply_rope(q, cos, sin, impl=self.impl).transpose(1, 2)  # (B, H, T, hd)
        k = kernels.apply_rope(k, cos, sin, impl=self.impl).transpose(1, 2)
        v = v.transpose(1, 2)
        if cache is None:
            y = kernels.attention(q, k, v, causal=True, doc_ids=doc_ids, impl=self.impl)
        else:
            # generation: write this chunk's K/V into the cache at cache_pos, then attend over the cache.
            # enable_gqa lets SDPA read each K/V head for its group of query heads without repeating it.
            # Prefill and decode are told apart by cache_pos (None: prefill), not by T: a batch of one-token
            # prompts is a prefill with T == 1.
            kc, vc = cache.k[layer], cache.v[layer]
            if cache_pos is not None:  # decode: one token per row, the whole (static-shape) buffer under the mask
                assert T == 1, f"a decode step writes one token per row, got {T}"
                kc.index_copy_(2, cache_pos.view(1), k)
                vc.index_copy_(2, cache_pos.view(1), v)
                mask = cache.valid[:, None, None, :]
            else:  # prefill from slot 0: causal over the prompt, pads masked (a row always sees itself, so no NaN)
                kc[:, :, :T], vc[:, :, :T] = k, v
                kc, vc = kc[:, :, :T], vc[:, :, :T]
                causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
                mask = (causal & cache.valid[:, None, None, :T]) | torch.eye(T, dtype=torch.bool, device=x.device)
            y = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, enable_gqa=True)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return F.dropout(self.o_proj(y), self.dropout, self.training)


class MLP(nn.Module):
    def __init__(self, dim, hidden, dropout, impl):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.dropout, self.impl = dropout, impl

    def forward(self, x):
        h = kernels.swiglu(self.gate_proj(x), self.up_proj(x), impl=self.impl)
        return F.dropout(self.down_proj(h), self.dropout, self.training)


class MoE(nn.Module):
    """Top-k routed experts (+ optional shared experts).

    Routing: softmax router probabilities, top-k, gate weights renormalised over the chosen k (norm_topk_prob;
    without it the gate weights are the raw softmax probabilities, as in Qwen2-MoE / Qwen3-MoE configs that say so).
    Shared experts: one always-on MLP of n_shared_experts * moe_ffn_hidden (or shared_ffn_hidden) units; with
    shared_expert_gate (Qwen2-MoE) its output is scaled per token by sigmoid(shared_gate(x)), shared_gate: d -> 1.
    Balancing: the Switch auxiliary loss E * sum_i f_i * P_i (returned in self.aux_loss), and/or
    DeepSeek's aux-loss-free scheme: a per-expert bias added to the scores for *selection only*,
    nudged after each optimizer step towards equal load (see Transformer.update_moe_bias).
    Dispatch sorts the (token, expert) assignments by expert and runs each expert once on its
    contiguous slice (kernels.moe_experts: one grouped GEMM on CUDA, else a loop over experts, never over tokens)."""

    def __init__(self, cfg: ModelConfig, impl):
        super().__init__()
        E, d, h = cfg.n_experts, cfg.n_embd, cfg.moe_ffn_hidden
        self.n_experts, self.top_k, self.impl = E, cfg.n_experts_per_tok, impl
        self.router = nn.Linear(d, E, bias=False)
        # experts as stacked weights (E, out, in): one tensor each, ready for a grouped matmul
        self.w_gate = nn.Parameter(torch.empty(E, h, d))
        self.w_up = nn.Parameter(torch.empty(E, h, d))
        self.w_down = nn.Parameter(torch.empty(E, d, h))
        self.norm_topk_prob = cfg.norm_topk_prob
        self.shared = MLP(d, cfg.shared_ffn_hidden, 0.0, impl) if cfg.n_shared_experts else None
        self.shared_gate = nn.Linear(d, 1, bias=False) if cfg.shared_expert_gate else None
        self.register_buffer("expert_bias", torch.zeros(E), persistent=True)
        self.register_buffer("expert_load", torch.zeros(E), persistent=False)  # tokens routed since last bias update
        self.dropout = cfg.dropout
        self.aux_loss = None

    def route(self, x):
        """x (N, d) -> expert indices (N, k), gate weights (N, k), router probs (N, E)."""
        probs = F.softmax(self.router(x).float(), dim=-1)
        _, idx = torch.topk(probs + self.expert_bias, self.top_k, dim=-1)  # bias steers selection only
        weights = probs.gather(1, idx)
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        return idx, weights, probs

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        N, k, E = x.shape[0], self.top_k, self.n_experts
        idx, weights, probs = self.route(x)
        flat = idx.flatten()                                  # (N*k,) expert of each assignment
        counts = torch.bincount(flat, minlength=E)
        if self.training:
            f = counts.float() / (N * k)                      # fraction of assignments per expert
            self.aux_loss = E * (f * probs.mean(0)).sum()
            self.expert_load += counts.detach().float()
        order = torch.argsort(flat, stable=True)
        token = order // k                                    # which token each sorted assignment came from
        gate = weights.flatten()[order].unsqueeze(1).to(x.dtype)
        # every expert's rows at once: a grouped GEMM on CUDA (bf16), a loop over experts elsewhere (kernels.py)
        y = kernels.moe_experts(x[token], counts, self.w_gate, self.w_up, self.w_down, impl=self.impl)
        out = torch.zeros_like(x).index_add_(0, token, (y * gate).to(x.dtype))
        if self.shared is not None:
            shared = self.shared(x)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(x)) * shared
            out = out + shared
        return F.dropout(out, self.dropout, self.training).view(shape)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx, impl):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.n_embd, cfg.norm_eps, impl)
        self.attn = Attention(cfg, impl)
        self.mlp_norm = RMSNorm(cfg.n_embd, cfg.norm_eps, impl)
        moe = cfg.n_experts > 0 and layer_idx >= cfg.first_k_dense
        self.mlp = MoE(cfg, impl) if moe else MLP(cfg.n_embd, cfg.ffn_hidden, cfg.dropout, impl)

    def forward(self, x, cos, sin, doc_ids=None, cache=None, layer=None, cache_pos=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, doc_ids, cache, layer, cache_pos)
        return x + self.mlp(self.mlp_norm(x))


# -----------------------------------------------------------------------------
# the model

class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        impl = kernels.resolve_impl(cfg.kernels, "cuda" if torch.cuda.is_available() else "cpu")
        self.impl = impl
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList([Block(cfg, i, impl) for i in range(cfg.n_layer)])
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps, impl)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.activation_checkpointing = False  # set by the training script
        self.apply(self._init_weights)
        # GPT-2: scale the init of projections that write into the residual stream by 1/sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "w_down")):
                nn.init.normal_(p, 0.0, cfg.init_std / math.sqrt(2 * cfg.n_layer))
        cos, sin = rope_cache(cfg, cfg.max_seq_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def _init_weights(self, m):
        std = self.config.init_std
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, std)
        elif isinstance(m, MoE):
            for p in (m.w_gate, m.w_up, m.w_down):
                nn.init.normal_(p, 0.0, std)

    def _rope(self, positions, T, device):
        if positions is None:
            if T > self.rope_cos.shape[0]:
                raise ValueError(f"sequence length {T} exceeds max_seq_len={self.config.max_seq_len}")
            return self.rope_cos[None, :T], self.rope_sin[None, :T]
        return self.rope_cos[positions], self.rope_sin[positions]  # per-row positions: (B, T, hd/2)

    def forward(self, idx, targets=None, *, positions=None, doc_ids=None, reduction="mean",
                temperature=1.0, last_only=False, return_hidden=False):
        """idx (B, T) token ids. Returns (logits, loss).

        targets (B, T), -100 = ignore: the loss is computed by the fused linear + cross-entropy, which
        never materialises the (B*T, vocab) logits, so logits is returned as None. reduction "mean"
        (per target token), "sum" (for normalising over a whole optimizer step) or "none" (per-token
        loss, i.e. minus the log-prob of each target, 0 where ignored — the preference/RL stages use it; it never
        includes z-loss or the MoE aux loss: callers add model.moe_aux_loss() to their own objective).
        temperature divides the logits before the softmax (RL log-probs of tempered sampling).
        positions (B, T): per-token RoPE positions (packed sequences restart at 0 per document);
        doc_ids (B, T): tokens attend only within their own document.
        last_only: logits of the last position only, (B, 1, V). return_hidden: (final-normed hidden, None).
        With MoE layers in training, the Switch aux loss (times moe_aux_loss_coef) is added to the loss."""
        B, T = idx.shape
        cos, sin = self._rope(positions, T, idx.device)
        x = self.tok_emb(idx)
        for block in self.blocks:
            if self.activation_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, doc_ids, use_reentrant=False)
            else:
                x = block(x, cos, sin, doc_ids)
        x = self.norm(x)
        if return_hidden:
            return x, None
        cfg = self.config
        if targets is None:
            x = x[:, -1:] if last_only else x
            logits = self.lm_head(x).float()
            if cfg.logit_softcap:
                logits = cfg.logit_softcap * torch.tanh(logits / cfg.logit_softcap)
            return logits / temperature, None
        if temperature != 1.0:
            assert not cfg.logit_softcap, "temperature with logit_softcap is not supported in the fused loss"
            x = x / temperature  # (x / t) @ W^T == logits / t
        x, targets = x.reshape(B * T, -1), targets.reshape(B * T)
        # Post-training batches are mostly ignored positions (prompts, padding): run the head only on
        # the rows that have a target. That needs one host sync, so not under torch.compile, where a
        # data-dependent shape would break the graph (the loss ignores those rows either way).
        keep = targets != -100
        sparse = not torch.compiler.is_compiling() and not bool(keep.all())
        rows = keep.nonzero().squeeze(1) if sparse else None
        loss = kernels.linear_cross_entropy(
            x[rows] if sparse else x, self.lm_head.weight, targets[rows] if sparse else targets, ignore_index=-100,
            # z-loss is a training regulariser of the mean/sum loss; "none" returns log-probs, which must be exact
            reduction=reduction, z_loss=cfg.z_loss if self.training and reduction != "none" else 0.0,
            softcap=cfg.logit_softcap,
            impl=self.impl)
        if reduction == "none":
            if sparse:
                loss = torch.zeros(B * T, dtype=loss.dtype, device=loss.device).index_put((rows,), loss)
            return None, loss.view(B, T)
        aux = self.moe_aux_loss()
        if aux is not None and cfg.moe_aux_loss_coef > 0:
            # "sum" losses are later divided by the step's token count: scale the aux term to match
            n = (targets != -100).sum() if reduction == "sum" else 1
            loss = loss + cfg.moe_aux_loss_coef * aux * n
        return None, loss

    # --- mixture-of-experts bookkeeping ---

    def moe_layers(self):
        return [b.mlp for b in self.blocks if isinstance(b.mlp, MoE)]

    def moe_aux_loss(self):
        losses = [m.aux_loss for m in self.moe_layers() if m.training and m.aux_loss is not None]
        return torch.stack(losses).mean() if losses else None

    @torch.no_grad()
    def update_moe_bias(self):
        """Call after each optimizer step. Returns per-layer expert load fractions (for logging) and,
        with moe_bias_update_rate > 0, moves each expert's selection bias by gamma * sign(mean - load)."""
        loads = []
        for m in self.moe_layers():
            load = m.expert_load.clone()
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(load)  # balance on the global load, identically on every rank
            if self.config.moe_bias_update_rate > 0 and load.sum() > 0:
                m.expert_bias += self.config.moe_bias_update_rate * torch.sign(load.mean() - load)
            m.expert_load.zero_()
            loads.append(load / load.sum().clamp(min=1))
        return torch.stack(loads) if loads else None

    # --- counting ---

    def num_params(self, exclude_embeddings=False, active_only=False):
        """Total parameter count. exclude_embeddings drops the token embedding (and an untied lm_head);
        active_only counts only top-k of the routed experts per MoE layer (what one token uses)."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a tied weight once
        if exclude_embeddings:
            n -= self.tok_emb.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.lm_head.weight.numel()
        if active_only:
            for m in self.moe_layers():
                per_expert = m.w_gate[0].numel() + m.w_up[0].numel() + m.w_down[0].numel()
                n -= per_expert * (m.n_experts - m.top_k)
        return n

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (forward + backward) of full sequences of seq_len: 6 per weight of every
        matmul a token passes through (active experts only, the lm_head included, the embedding lookup not)
        plus the attention scores and values, 12 * n_layer * n_head * head_dim * seq_len (full-matrix
        convention of nanoGPT/PaLM; causal masking halves the real work). Assumes every weight is trained."""
        return float(self.flops([seq_len], backward=True, frozen=False)) / seq_len

    def flops(self, seq_lengths, backward=True, frozen=True):
        """Model FLOPs of one pass over sequences of these lengths, for MFU. Each sequence attends over itself
        only: a packed document counts as its own sequence, and padding counts for nothing (it is not the
        model's work, so padded batches show as lower MFU). Per token: 2 FLOPs per matmul weight forward; the
        backward adds 4 for a trained weight (input and weight gradients) and 2 for a frozen one (the input
        gradient only, e.g. LoRA's base weights) -- frozen=False counts every weight as trained; attention
        4 * n_layer * n_head * head_dim * the sequence's length forward, 3x that with the backward. Without an
        lm_head (a reward model or critic) the head is its one output per token. Returns a float64 0-d tensor
        on seq_lengths' device (no host sync when they are on the GPU)."""
        lengths = torch.as_tensor(seq_lengths).double()
        # the per-token constants walk every parameter: computed once per set of trained weights (the stages
        # call this every step; LoRA or a frozen head changes the set)
        key = (backward, frozen, tuple(p.requires_grad for p in self.parameters()))
        cache = self.__dict__.setdefault("_flops_consts", {})
        if key not in cache:
            cache[key] = self._flops_per_token_consts(backward, frozen)
        matmul, attn = cache[key]
        return matmul * lengths.sum() + attn * (lengths * lengths).sum()

    def _flops_per_token_consts(self, backward, frozen):
        """(FLOPs per token of the matmuls, per token and position of attention) for flops()."""
        cfg = self.config
        is_norm = lambda name: name.endswith("norm.weight") or "_norm." in name  # noqa: E731
        body = self.num_params(exclude_embeddings=True, active_only=True)  # every weight but the embedding/head
        body -= sum(p.numel() for name, p in self.named_parameters() if is_norm(name))
        head_w = self.lm_head.weight if self.lm_head is not None else None
        head = cfg.vocab_size * cfg.n_embd if head_w is not None else cfg.n_embd
        matmul = 2 * (body + head)
        if backward:
            weights = [p for name, p in self.named_parameters()
                       if not name.startswith(("tok_emb.", "lm_head.")) and not is_norm(name)]
            frozen_body = body * sum(p.numel() for p in weights if not p.requires_grad) / max(
                sum(p.numel() for p in weights), 1)  # MoE: the active experts taken as frozen as the rest
            frozen_head = head if head_w is not None and not head_w.requires_grad else 0
            matmul += 4 * (body + head) - (2 * (frozen_body + frozen_head) if frozen else 0)
        return matmul, 4 * cfg.n_layer * cfg.n_head * cfg.head_dim * (3 if backward else 1)

    # --- generation ---

    def forward_cached(self, idx, positions, cache, cache_pos):
        """Generation's forward: idx (B, T) at RoPE positions (B, T), keys/values written into the KV cache
        (a prefill from slot 0 when cache_pos is None, else one decode token at slot cache_pos); returns the
        fp32 logits of the last position (B, V)."""
        cos, sin = self._rope(positions, idx.shape[1], idx.device)
        x = self.tok_emb(idx)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache=cache, layer=i, cache_pos=cache_pos)
        logits = self.lm_head(self.norm(x[:, -1])).float()
        if self.config.logit_softcap:
            logits = self.config.logit_softcap * torch.tanh(logits / self.config.logit_softcap)
        return logits

    def generate(self, prompts, max_new_tokens, **kw):
        """Batched KV-cache sampling: generation.generate(self, prompts, max_new_tokens, ...)."""
        return generation.generate(self, prompts, max_new_tokens, **kw)


# -----------------------------------------------------------------------------
# reward model: the transformer with a scalar head (trained by reward.py, read by grpo.py)

class RewardModel(nn.Module):
    """r(conversation) = score_head(final-normed hidden state at the last token of the response, its
    <|im_end|>); the head's output at any other position means nothing for a reward model. The LM head is
    dropped: a reward model never uses it (an untied one would be an unused parameter under DDP).
    The same class is PPO's critic (grpo.py, advantage_estimator="gae"): a value model whose head is read at
    every position, V(s_t) of each prefix; it starts from a reward model (TRL, InstructGPT) or from the policy."""

    def __init__(self, transformer: Transformer):
        super().__init__()
        transformer.lm_head = None  # a tied weight lives on in tok_emb
        self.transformer = transformer
        self.config = transformer.config
        self.score_head = nn.Linear(transformer.config.n_embd, 1)
        nn.init.zeros_(self.score_head.weight)  # all rewards start at 0: the first Bradley-Terry loss is log 2
        nn.init.zeros_(self.score_head.bias)

    @property
    def blocks(self):  # what parallelize(..., "fsdp") shards
        return self.transformer.blocks

    def moe_layers(self):
        return self.transformer.moe_layers()

    def moe_aux_loss(self):
        return self.transformer.moe_aux_loss()

    def update_moe_bias(self):
        return self.transformer.update_moe_bias()

    def flops(self, seq_lengths, backward=True, frozen=True):  # Transformer.flops; the head is one output
        return self.transformer.flops(seq_lengths, backward, frozen)

    def forward(self, idx, end_idx=None, *, positions=None, doc_ids=None):
        """idx (B, T), end_idx (B,) index of each row's final response token -> rewards (B,) fp32; end_idx None:
        the head at every position, (B, T) fp32 (a critic's values). Right padding needs nothing else (causal
        attention never looks ahead); left padding needs positions (counting from each row's first real token)
        and doc_ids separating the pads."""
        h, _ = self.transformer(idx, positions=positions, doc_ids=doc_ids, return_hidden=True)
        if end_idx is not None:
            h = h[torch.arange(idx.shape[0], device=idx.device), end_idx]
        return self.score_head(h).squeeze(-1).float()
