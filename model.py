"""
The one decoder-only transformer every stage shares.

Llama-family block: pre-norm RMSNorm on the inputs of attention and MLP, a final
norm before the head, rotary position embeddings, grouped-query attention and a
SwiGLU MLP, no biases by default; optionally a mixture-of-experts MLP. Also here:
KV-cache generation, LoRA adapters, parameter/FLOP counting and checkpoint I/O.

The hot ops (attention, RMSNorm, RoPE, SwiGLU, cross-entropy) go through
kernels.py, which has a plain PyTorch reference for each and a Triton kernel for
CUDA; `ModelConfig.kernels` ("auto" | "triton" | "torch") picks one in one place.

RoPE convention: half-split, as in Llama/HF — dimension i is paired with
dimension i + head_dim/2 (not adjacent pairs as in the original paper). Weights
imported from an interleaved-pair model must have their q/k rows permuted.
"""

import math
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    n_layer: int = 6
    n_head: int = 6
    n_kv_head: int = 6             # = n_head: MHA; 1: MQA; in between: GQA
    n_embd: int = 384
    ffn_hidden: Optional[int] = None  # SwiGLU hidden size; None: 8/3 * n_embd rounded up to ffn_multiple_of
    ffn_multiple_of: int = 64
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    rope_scaling: Optional[str] = None   # None | "linear" | "ntk" | "yarn"
    rope_factor: float = 1.0             # context extension factor s (new length / original length)
    rope_original_max_seq_len: Optional[int] = None  # the length the model was trained at (yarn)
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
    n_shared_experts: int = 0      # always-on experts (DeepSeekMoE)
    moe_ffn_hidden: Optional[int] = None  # hidden size of one expert; None: ffn_hidden
    first_k_dense: int = 0         # the first k layers keep a dense MLP
    moe_aux_loss_coef: float = 0.01      # Switch-style load-balancing loss; 0 disables it
    moe_bias_update_rate: float = 0.0    # DeepSeek aux-loss-free balancing: gamma of the per-expert bias update
    kernels: str = "auto"          # "auto" (Triton on CUDA) | "triton" | "torch"

    def __post_init__(self):
        assert self.n_embd % self.n_head == 0, f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}"
        assert self.n_head % self.n_kv_head == 0, f"n_head={self.n_head} must be divisible by n_kv_head={self.n_kv_head}"
        assert (self.n_embd // self.n_head) % 2 == 0, "head_dim must be even for RoPE"
        if self.ffn_hidden is None:
            h = int(8 * self.n_embd / 3)
            self.ffn_hidden = self.ffn_multiple_of * math.ceil(h / self.ffn_multiple_of)
        if self.moe_ffn_hidden is None:
            self.moe_ffn_hidden = self.ffn_hidden
        assert self.rope_scaling in (None, "linear", "ntk", "yarn"), f"unknown rope_scaling {self.rope_scaling!r}"
        if self.n_experts:
            assert 0 < self.n_experts_per_tok <= self.n_experts

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        assert not unknown, f"unknown model config keys {sorted(unknown)}"
        return cls(**d)


# -----------------------------------------------------------------------------
# rotary embeddings

def rope_frequencies(cfg: ModelConfig):
    """Inverse frequencies (head_dim/2,) in fp32 and the attention scale for cos/sin, with context-extension scaling."""
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
        beta_fast, beta_slow = 32.0, 1.0
        def dim_of(n_rot):  # the dimension index that completes n_rot rotations over orig positions
            return hd * math.log(orig / (n_rot * 2 * math.pi)) / (2 * math.log(base))
        low, high = max(math.floor(dim_of(beta_fast)), 0), min(math.ceil(dim_of(beta_slow)), hd // 2 - 1)
        ramp = ((torch.arange(hd // 2, dtype=torch.float64) - low) / max(high - low, 1e-3)).clamp(0, 1)
        inv_freq = inv_freq / s * ramp + inv_freq * (1 - ramp)
        mscale = 0.1 * math.log(s) + 1.0 if s > 1 else 1.0  # attention temperature sqrt(1/t)
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


class KVCache:
    """Preallocated keys/values for generation: (n_layer, B, n_kv_head, max_len, head_dim).

    `valid[b, j]` says whether cache slot j of row b holds a real token (left padding is invalid).
    Decode steps attend over the whole buffer under that mask, so every step has the same
    shapes, which is what torch.compile / CUDA graphs need."""

    def __init__(self, cfg, batch_size, max_len, device, dtype):
        shape = (cfg.n_layer, batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.max_len = max_len


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
            kc, vc = cache.k[layer], cache.v[layer]
            if T == 1:  # decode: one token per row, the whole (static-shape) buffer under the validity mask
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

    Routing: softmax router probabilities, top-k, gate weights renormalised over the chosen k.
    Balancing: the Switch auxiliary loss E * sum_i f_i * P_i (returned in self.aux_loss), and/or
    DeepSeek's aux-loss-free scheme: a per-expert bias added to the scores for *selection only*,
    nudged after each optimizer step towards equal load (see Transformer.update_moe_bias).
    Dispatch sorts the (token, expert) assignments by expert and runs each expert once on its
    contiguous slice — a loop over experts, never over tokens."""

    def __init__(self, cfg: ModelConfig, impl):
        super().__init__()
        E, d, h = cfg.n_experts, cfg.n_embd, cfg.moe_ffn_hidden
        self.n_experts, self.top_k, self.impl = E, cfg.n_experts_per_tok, impl
        self.router = nn.Linear(d, E, bias=False)
        # experts as stacked weights (E, out, in): one tensor each, ready for a grouped matmul
        self.w_gate = nn.Parameter(torch.empty(E, h, d))
        self.w_up = nn.Parameter(torch.empty(E, h, d))
        self.w_down = nn.Parameter(torch.empty(E, d, h))
        self.shared = MLP(d, h * cfg.n_shared_experts, 0.0, impl) if cfg.n_shared_experts else None
        self.register_buffer("expert_bias", torch.zeros(E), persistent=True)
        self.register_buffer("expert_load", torch.zeros(E), persistent=False)  # tokens routed since last bias update
        self.dropout = cfg.dropout
        self.aux_loss = None

    def route(self, x):
        """x (N, d) -> expert indices (N, k), renormalised gate weights (N, k), router probs (N, E)."""
        probs = F.softmax(self.router(x).float(), dim=-1)
        _, idx = torch.topk(probs + self.expert_bias, self.top_k, dim=-1)  # bias steers selection only
        weights = probs.gather(1, idx)
        return idx, weights / weights.sum(-1, keepdim=True), probs

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
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n == 0:
                continue
            t = token[start:start + n]
            xe = x[t]
            he = kernels.swiglu(xe @ self.w_gate[e].t(), xe @ self.w_up[e].t(), impl=self.impl)
            out.index_add_(0, t, (he @ self.w_down[e].t()) * gate[start:start + n])
            start += n
        if self.shared is not None:
            out = out + self.shared(x)
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
        loss, i.e. minus the log-prob of each target, 0 where ignored — the preference/RL stages use it).
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
            reduction=reduction, z_loss=cfg.z_loss if self.training else 0.0, softcap=cfg.logit_softcap,
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
        """Training FLOPs per token (forward + backward): 6 per weight of every matmul a token passes
        through (active experts only, the lm_head included, the embedding lookup not) plus the attention
        scores and values, 12 * n_layer * n_head * head_dim * seq_len (full-matrix convention of
        nanoGPT/PaLM; causal masking halves the real work)."""
        cfg = self.config
        n = self.num_params(exclude_embeddings=True, active_only=True) + cfg.vocab_size * cfg.n_embd
        n -= sum(p.numel() for name, p in self.named_parameters() if name.endswith("norm.weight") or "_norm." in name)
        return 6 * n + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len

    # --- generation ---

    def _step(self, idx, positions, cache, cache_pos):
        cos, sin = self._rope(positions, idx.shape[1], idx.device)
        x = self.tok_emb(idx)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache=cache, layer=i, cache_pos=cache_pos)
        logits = self.lm_head(self.norm(x[:, -1])).float()
        if self.config.logit_softcap:
            logits = self.config.logit_softcap * torch.tanh(logits / self.config.logit_softcap)
        return logits

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 repetition_penalty=1.0, stop_tokens=(), pad_id=0, generator=None, callback=None):
        """Batched sampling with a KV cache. prompts: a list of token-id lists (any lengths; they are
        left-padded, and each row gets its own positions) or a (B, P) tensor.
        temperature 0 is greedy. A row stops after emitting a token in stop_tokens; later slots are pad_id.
        Returns dict(tokens=(B, N) new tokens, lengths=(B,) new tokens per row incl. the stop token,
        logprobs=(B, N) log-prob of each sampled token under softmax(logits / temperature) of the raw
        model — before top-k/top-p/penalty — which is what a training forward at that temperature gives).
        callback(tokens): if given, called after every sampling step with the (B,) tensor of tokens just
        sampled (pad_id in rows already finished) — for streaming output (chat.py)."""
        with fsdp_gathered(self):  # a no-op unless FSDP2-sharded
            device = self.tok_emb.weight.device
            if torch.is_tensor(prompts):
                prompts = prompts.tolist()
            B, P = len(prompts), max(len(p) for p in prompts)
            assert min(len(p) for p in prompts) > 0, "every prompt needs at least one token"
            total = P + max_new_tokens
            if total > self.config.max_seq_len:
                raise ValueError(f"prompt ({P}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len={self.config.max_seq_len}")
            idx = torch.full((B, P), pad_id, dtype=torch.long, device=device)
            n_pad = torch.tensor([P - len(p) for p in prompts], device=device)
            for b, p in enumerate(prompts):
                idx[b, P - len(p):] = torch.tensor(p, device=device)
            cache = KVCache(self.config, B, total, device, self.tok_emb.weight.dtype if device.type == "cpu" else
                            (torch.bfloat16 if torch.is_autocast_enabled("cuda") else self.tok_emb.weight.dtype))
            cache.valid[:, :P] = torch.arange(P, device=device)[None] >= n_pad[:, None]
            positions = (torch.arange(P, device=device)[None] - n_pad[:, None]).clamp(min=0)
            stop = torch.tensor(list(stop_tokens) or [-1], device=device)
            seen = None
            if repetition_penalty != 1.0:
                seen = torch.zeros(B, self.config.vocab_size, dtype=torch.bool, device=device)
                seen.scatter_(1, idx, cache.valid[:, :P])
            out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
            logprobs = torch.zeros(B, max_new_tokens, device=device)
            done = torch.zeros(B, dtype=torch.bool, device=device)
            lengths = torch.full((B,), max_new_tokens, dtype=torch.long, device=device)

            logits = self._step(idx, positions, cache, None)  # prefill
            pos = positions[:, -1]
            slots = torch.arange(P, total, device=device)  # made once: torch.tensor(..., device=cuda) per step syncs
            for t in range(max_new_tokens):
                tok, lp = sample_next(logits, temperature, top_k, top_p, repetition_penalty, seen, generator)
                tok = torch.where(done, torch.full_like(tok, pad_id), tok)
                out[:, t], logprobs[:, t] = tok, lp.masked_fill(done, 0.0)
                if callback is not None:
                    callback(tok)
                if seen is not None:
                    seen.scatter_(1, tok[:, None], True)
                hit = torch.isin(tok, stop) & ~done
                lengths = torch.where(hit, torch.full_like(lengths, t + 1), lengths)
                done = done | hit
                if t == max_new_tokens - 1 or ((t % 8 == 7 or device.type == "cpu") and bool(done.all())):
                    break  # checking done.all() syncs with the GPU, so only every 8 steps there
                pos = pos + 1
                cache.valid[:, P + t] = True
                logits = self._step(tok[:, None], pos[:, None], cache, slots[t])
            n = int(lengths.max()) if bool(done.all()) else out.shape[1]
            return dict(tokens=out[:, :n], lengths=lengths, logprobs=logprobs[:, :n])


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


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0, seen=None, generator=None):
    """logits (B, V) fp32 -> (token (B,), log-prob of it under softmax(logits / temperature))."""
    raw = logits
    if seen is not None and repetition_penalty != 1.0:  # CTRL-style: shrink the logits of tokens already seen
        penalised = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if temperature == 0:
        tok = logits.argmax(-1)
        return tok, F.log_softmax(raw, -1).gather(1, tok[:, None]).squeeze(1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    # inverse-CDF sampling, one uniform per row: exact, and ~30x faster than torch.multinomial on CPU
    cdf = logits.softmax(-1).double().cumsum(-1)
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]
    tok = torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=cdf.shape[-1] - 1)
    return tok, F.log_softmax(raw / temperature, -1).gather(1, tok[:, None]).squeeze(1)


# -----------------------------------------------------------------------------
# reward model: the transformer with a scalar head (trained by reward.py, read by grpo.py)

class RewardModel(nn.Module):
    """r(conversation) = score_head(final-normed hidden state at the last token of the response, its
    <|im_end|>); the head's output at any other position means nothing. The LM head is dropped: a
    reward model never uses it (an untied one would be an unused parameter under DDP)."""

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

    def update_moe_bias(self):
        return self.transformer.update_moe_bias()

    def forward(self, idx, end_idx, *, positions=None, doc_ids=None):
        """idx (B, T), end_idx (B,) index of each row's final response token -> rewards (B,) fp32.
        Right padding needs nothing else (causal attention never looks ahead); left padding needs
        positions (counting from each row's first real token) and doc_ids separating the pads."""
        h, _ = self.transformer(idx, positions=positions, doc_ids=doc_ids, return_hidden=True)
        h = h[torch.arange(idx.shape[0], device=idx.device), end_idx]
        return self.score_head(h).squeeze(-1).float()

    @classmethod
    def from_checkpoint(cls, ckpt, device="cpu", **overrides):
        """A reward model saved by reward.py (a checkpoint_dict of a RewardModel), from a dict or path."""
        if isinstance(ckpt, str):
            ckpt = load_checkpoint(ckpt)
        if "score_head.weight" not in ckpt["model"]:
            raise ValueError("not a reward-model checkpoint (it has no score_head): train one with `python reward.py`, "
                             "or put a fresh head on a language model with RewardModel(model_from_checkpoint(path))")
        model = cls(Transformer(ModelConfig.from_dict({**ckpt["model_config"], **overrides})))
        model.load_state_dict(ckpt["model"])
        return model.to(device)

    @torch.no_grad()
    def score(self, messages_list, tokenizer, batch_size=32):
        """Rewards (N,) fp32, on the model's device, of conversations (lists of {"role", "content"}) that
        end with the assistant reply to score, rendered with the ChatML template of data/chat.py and read
        at that reply's <|im_end|>. A conversation longer than max_seq_len loses its start, not its end."""
        from data.chat import render
        device, was_training = self.score_head.weight.device, self.training
        self.eval()
        seqs = []
        for i, msgs in enumerate(messages_list):
            if not msgs or msgs[-1]["role"] != "assistant":
                raise ValueError(f"conversation {i}: score() needs conversations ending with the assistant reply to score")
            ids = render(msgs, tokenizer)[0]
            end = len(ids) - 1 - ids[::-1].index(tokenizer.im_end_id)
            seqs.append(ids[:end + 1][-self.config.max_seq_len:])
        out = []
        for b in range(0, len(seqs), batch_size):
            chunk = seqs[b:b + batch_size]
            idx = torch.full((len(chunk), max(map(len, chunk))), tokenizer.pad_id, dtype=torch.long)
            for j, s in enumerate(chunk):
                idx[j, :len(s)] = torch.tensor(s)
            out.append(self(idx.to(device), torch.tensor([len(s) - 1 for s in chunk], device=device)))
        self.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, device=device)



# dense bf16 peak FLOP/s of one device (vendor spec sheets, without sparsity), for MFU
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12,
                   "A800": 312e12, "L40S": 362e12, "4090": 165e12}


def device_peak_flops(device_name):
    """The dense bf16 peak of a device named like torch.cuda.get_device_name(), or None if unknown."""
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in device_name), None)


# -----------------------------------------------------------------------------
# LoRA: h = W0 x + (alpha / r) * B A x, A random, B zero, W0 frozen

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


def apply_lora(model, targets=("q", "k", "v", "o", "gate", "up", "down"), r=8, alpha=16, dropout=0.0, rslora=False):
    """Wrap the target linear layers (short names from LORA_TARGETS, or "all") in LoRALinear and freeze
    everything else. Returns the list of wrapped module names."""
    if targets == "all" or targets == ("all",):
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


# -----------------------------------------------------------------------------
# checkpoints

def unwrap(model):
    """The plain module behind DDP / torch.compile wrappers (FSDP2 shards in place, no wrapper)."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod")
    return model


def model_state_dict(model):
    """A full, unsharded, CPU state dict on every rank, for DDP, FSDP2 and plain models alike."""
    model = unwrap(model)
    if _is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def save_checkpoint(path, state):
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, map_location="cpu"):
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} not found")
    return torch.load(path, map_location=map_location, weights_only=True)


def model_from_checkpoint(ckpt, device="cpu", **overrides):
    """Build a Transformer from a checkpoint dict (or path) written by any stage.
    overrides replace model config fields that do not change the weights (kernels, dropout, ...)."""
    if isinstance(ckpt, str):
        ckpt = load_checkpoint(ckpt)
    if "lora_state" in ckpt:
        # adapter-only checkpoint (sft.py with lora_r > 0): the base checkpoint it names plus the adapters,
        # returned with LoRA applied (unmerged); merge_lora(model) gives a plain model
        model = model_from_checkpoint(ckpt["base_checkpoint"], "cpu", **overrides)
        runtime = ("kernels", "dropout")  # settings that do not change the weights may differ
        if {k: v for k, v in asdict(model.config).items() if k not in runtime} != \
                {k: v for k, v in ckpt["model_config"].items() if k not in runtime}:
            raise ValueError(f"base checkpoint {ckpt['base_checkpoint']} does not have the model config the adapters were trained on")
        apply_lora(model, **ckpt["lora"])
        missing, unexpected = model.load_state_dict(ckpt["lora_state"], strict=False)
        assert not unexpected and not [k for k in missing if "lora_" in k], f"adapter keys do not match: {unexpected or missing}"
        return model.to(device)
    cfg = ModelConfig.from_dict({**ckpt["model_config"], **overrides})
    model = Transformer(cfg)
    model.load_state_dict(ckpt["model"])
    return model.to(device)


def checkpoint_dict(model, tokenizer_name, **extra):
    """What every stage saves: model config, full weights, the tokenizer it was trained with, and any
    training state passed in extra (optimizer, step, data position, RNG states, ...)."""
    return dict(model_config=asdict(unwrap(model).config), model=model_state_dict(model),
                tokenizer=tokenizer_name, **extra)


# -----------------------------------------------------------------------------
# training plumbing every stage shares: optimizer, LR schedule, data-parallel wrapping

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
    assert schedule == "cosine", f"unknown lr schedule {schedule!r}: use cosine, wsd or constant"
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


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


def _is_sharded(model):
    return any(type(p).__name__ == "DTensor" for p in unwrap(model).parameters())


def optimizer_state_dict(model, optimizer):
    """The optimizer state in a form that reloads exactly. Under FSDP2 each sharded state tensor is
    gathered to its full value (a collective: call it on every rank), so any world size can reload it."""
    state = optimizer.state_dict()
    if _is_sharded(model):
        state["state"] = {i: {k: v.full_tensor().cpu() if type(v).__name__ == "DTensor" else v for k, v in s.items()}
                          for i, s in state["state"].items()}
    return state


def load_optimizer_state(model, optimizer, state):
    if _is_sharded(model):  # shard each full state tensor the way its parameter is sharded
        from torch.distributed.tensor import distribute_tensor
        params = [p for group in optimizer.param_groups for p in group["params"]]
        state["state"] = {i: {k: distribute_tensor(v.to(params[i].device), params[i].device_mesh, params[i].placements)
                              if torch.is_tensor(v) and v.shape == params[i].shape else v for k, v in s.items()}
                          for i, s in state["state"].items()}
    optimizer.load_state_dict(state)


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
