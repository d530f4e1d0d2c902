"""
Hugging Face model directories in and out: config.json <-> ModelConfig, HF weight names <-> ours.

    python hf.py export --ckpt=out/sft/ckpt.pt --out=out/hf/sft [--dtype=bfloat16]   # any LM checkpoint
    python hf.py import --hf=models/Qwen2.5-0.5B-Instruct --out=out/qwen/ckpt.pt     # optional, see below
    python hf.py info --hf=models/Qwen2.5-0.5B-Instruct                               # what it maps to, or why not

Import needs no command: a local HF directory (config.json + model.safetensors, or shards with
model.safetensors.index.json) works wherever a checkpoint path does, because checkpoint.load_model calls load_hf
here. `import` only writes a repo checkpoint (ckpt.pt) of it. Export writes config.json, model.safetensors and
generation_config.json that transformers.AutoModelForCausalLM.from_pretrained loads with our logits, plus the
tokenizer (copied verbatim when the checkpoint's tokenizer is an HF directory). Adapter checkpoints are merged first.

Families: llama (incl. Llama-3.1 rope_type llama3), mistral, qwen2 (q/k/v bias), qwen3 (QK-norm, explicit head_dim),
mixtral, qwen2_moe (gated shared expert, norm_topk_prob true or false), qwen3_moe. HF's Llama-family RoPE rotates
halves, as model.py does, so no q/k permutation is needed. MoE experts are read in both layouts: the per-expert one
(experts.{i}.gate_proj / w1 ...: what transformers 5.24 save_pretrained writes, and what published checkpoints
hold) and transformers 5's fused in-memory one (experts.gate_up_proj (E, 2h, d), experts.down_proj (E, d, h));
export writes the per-expert one.

What the repo cannot represent is refused with the config field and value named, never loaded approximately: an
active sliding window shorter than the context, MLA and other model types, unknown or "dynamic" rope_type,
partial rotary, biases other than q/k/v, activations other than SiLU, quantized weights, MoE on every n-th layer.
Export refuses what HF cannot represent: static "ntk" RoPE, logit_softcap, ungated shared experts, a nonzero
aux-loss-free expert_bias, reward models (our score head has a bias and reads the final response token, which
HF's *ForSequenceClassification does not), and architecture combinations no HF family has.

Loading: the model is built on the meta device, then every parameter is allocated on the target device in the
target dtype (bf16 on CUDA, fp32 on CPU unless dtype says otherwise) and filled tensor by tensor from the
memory-mapped safetensors files, so host memory holds one tensor at a time. With fsdp=True (under torchrun) the
meta model is sharded first (FSDP2 fully_shard per block, then the root) and each rank reads only the rows of its
own shard: no rank ever holds a full copy. safetensors (the package) reads the files: no pickle, no code runs.
"""

import argparse
import json
import math
import os
import resource
import shutil
import time
from dataclasses import asdict, fields

import torch

from model import ModelConfig, Transformer, rope_cache

# model_type -> the architecture name transformers registers for it
FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
            "qwen3_moe": "Qwen3MoeForCausalLM"}
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")
QWEN_FAMILIES = ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe")  # sliding window only with use_sliding_window
DEFAULT_THETA = {"mixtral": 1e6}  # transformers' default_theta when a config has none (else 10000)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "added_tokens.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


class UnsupportedConfig(ValueError):
    """A model the repo cannot represent exactly (import) or HF cannot (export)."""


def is_hf_dir(path):
    """A local HF model directory: config.json beside model.safetensors or a safetensors index."""
    return (isinstance(path, str) and os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))
            and any(os.path.isfile(os.path.join(path, f))
                    for f in ("model.safetensors", "model.safetensors.index.json")))


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def as_dtype(dtype, device):
    """None: bf16 on CUDA, fp32 elsewhere; a torch.dtype or its name ('bfloat16', 'bf16', ...)."""
    if dtype is None:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


# -----------------------------------------------------------------------------
# config.json -> ModelConfig

def config_from_hf(hf, where="config.json", max_seq_len=None):
    """The ModelConfig fields of an HF config dict, or UnsupportedConfig naming the field that has no exact
    equivalent. max_seq_len: the context the model will be run at (default max_position_embeddings); a sliding
    window is only a refusal when it is shorter than that."""
    def refuse(field, why, value=None):
        value = hf.get(field) if value is None else value
        raise UnsupportedConfig(f"{where}: {field}={value!r}: {why}")

    mt = hf.get("model_type")
    if mt not in FAMILIES:
        why = f"not a supported model family (supported: {', '.join(FAMILIES)})"
        if "kv_lora_rank" in hf or "q_lora_rank" in hf:
            why = "multi-head latent attention (MLA, kv_lora_rank) is not implemented; " + why
        refuse("model_type", why)
    if hf.get("quantization_config"):
        refuse("quantization_config", "quantized weights are not supported; use the unquantized checkpoint",
               hf["quantization_config"].get("quant_method", "set"))
    if hf.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "the repo's MLP is SwiGLU (silu)")
    if hf.get("mlp_bias"):
        refuse("mlp_bias", "the repo's MLP has no biases")
    if mt == "qwen2":
        qkv_bias = True  # Qwen2 always has q/k/v biases (and none on o_proj)
    elif mt == "qwen2_moe":
        qkv_bias = bool(hf.get("qkv_bias", True))
    else:
        if hf.get("attention_bias"):
            refuse("attention_bias", "biases on q/k/v and o_proj; the repo has q/k/v biases only (qkv_bias)")
        qkv_bias = False
    d, n_head = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or None
    if head_dim is None and d % n_head:
        refuse("hidden_size", f"not divisible by num_attention_heads={n_head} and no head_dim given")
    n_ctx = max_seq_len or hf["max_position_embeddings"]

    # sliding window: a no-op when the window covers the whole context
    window = hf.get("sliding_window")
    active = bool(window)
    if mt == "llama":
        active = False  # Llama has no sliding-window attention
    elif mt in QWEN_FAMILIES:
        active = active and bool(hf.get("use_sliding_window"))
        if active and hf.get("layer_types") is not None:
            active = "sliding_attention" in hf["layer_types"]
    for t in hf.get("layer_types") or []:
        if t not in ("full_attention", "sliding_attention"):
            refuse("layer_types", f"layer type {t!r} is not supported")
    if active and window < n_ctx:
        flag = " (use_sliding_window=true)" if mt in QWEN_FAMILIES else ""
        refuse("sliding_window", f"sliding-window attention is active{flag} and the window is shorter than the "
               f"context max_seq_len={n_ctx}; the repo has full causal attention only. Run with "
               f"max_seq_len <= {window} (load_model(..., max_seq_len={window})) to stay inside the window")

    # RoPE: transformers 5 writes rope_parameters (rope_theta inside); older configs rope_theta + rope_scaling,
    # and the legacy rope_scaling takes precedence, as in transformers
    rp = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    if any(isinstance(v, dict) for v in rp.values()):
        refuse("rope_parameters", "per-layer-type RoPE parameters are not supported", sorted(rp))
    theta = rp.get("rope_theta", hf.get("rope_theta", DEFAULT_THETA.get(mt, 10000.0)))
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    prf = rp.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if prf != 1.0:
        refuse("partial_rotary_factor", "RoPE on part of each head is not supported", prf)
    rope = dict(rope_theta=float(theta))
    orig = rp.get("original_max_position_embeddings") or hf["max_position_embeddings"]
    if rope_type == "default":
        pass
    elif rope_type == "linear":
        rope.update(rope_scaling="linear", rope_factor=float(rp["factor"]))
    elif rope_type == "llama3":
        rope.update(rope_scaling="llama3", rope_factor=float(rp["factor"]), rope_original_max_seq_len=orig,
                    rope_low_freq_factor=float(rp["low_freq_factor"]),
                    rope_high_freq_factor=float(rp["high_freq_factor"]))
    elif rope_type == "yarn":
        factor = rp.get("factor") or hf["max_position_embeddings"] / orig
        attention_factor = rp.get("attention_factor")
        mscale, mscale_all_dim = rp.get("mscale"), rp.get("mscale_all_dim")
        if attention_factor is None and mscale and mscale_all_dim:  # as transformers computes it (DeepSeek style)
            def get_mscale(s, m):
                return 0.1 * m * math.log(s) + 1.0 if s > 1 else 1.0
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        rope.update(rope_scaling="yarn", rope_factor=float(factor), rope_original_max_seq_len=orig,
                    rope_beta_fast=float(rp.get("beta_fast") or 32), rope_beta_slow=float(rp.get("beta_slow") or 1),
                    rope_truncate=bool(rp.get("truncate", True)),
                    rope_attention_factor=None if attention_factor is None else float(attention_factor))
    elif rope_type == "dynamic":
        refuse("rope_type", "dynamic NTK recomputes the frequencies from the current length; the repo's RoPE is "
               "static (its 'ntk' setting is the static variant, a different function)", rope_type)
    else:
        refuse("rope_type", "unknown RoPE scaling; supported: default, linear, yarn, llama3", rope_type)

    cfg = dict(vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=n_head,
               n_kv_head=hf.get("num_key_value_heads") or n_head, n_embd=d, head_dim=head_dim,
               ffn_hidden=hf["intermediate_size"], max_seq_len=n_ctx, norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
               tie_embeddings=bool(hf.get("tie_word_embeddings", False)), qkv_bias=qkv_bias,
               qk_norm=mt in ("qwen3", "qwen3_moe"), dropout=0.0, init_std=hf.get("initializer_range", 0.02),
               **rope)
    if mt in MOE_FAMILIES:
        n_experts = hf.get("num_local_experts") or hf.get("num_experts")
        cfg.update(n_experts=n_experts, n_experts_per_tok=hf["num_experts_per_tok"],
                   moe_aux_loss_coef=hf.get("router_aux_loss_coef", 0.001))
        if mt == "mixtral":
            cfg.update(moe_ffn_hidden=hf["intermediate_size"], norm_topk_prob=True)
        else:
            cfg.update(moe_ffn_hidden=hf["moe_intermediate_size"], norm_topk_prob=bool(hf.get("norm_topk_prob")))
            if hf.get("decoder_sparse_step", 1) != 1:
                refuse("decoder_sparse_step", "MoE on every n-th layer; the repo has MoE on every layer after the "
                       "first first_k_dense")
            dense = sorted(hf.get("mlp_only_layers") or [])
            if dense != list(range(len(dense))):
                refuse("mlp_only_layers", "dense layers other than the first k (first_k_dense) are not supported")
            cfg["first_k_dense"] = len(dense)
        if mt == "qwen2_moe":
            cfg.update(n_shared_experts=1, shared_ffn_hidden=hf["shared_expert_intermediate_size"],
                       shared_expert_gate=True)
    return cfg


# -----------------------------------------------------------------------------
# weight names

class SafetensorsDir:
    """The tensors of a model.safetensors, or of the shards a model.safetensors.index.json lists, opened
    memory-mapped (nothing is read until a tensor or a slice of one is asked for)."""

    def __init__(self, path):
        from safetensors import safe_open
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            weight_map = read_json(index)["weight_map"]
        elif os.path.isfile(os.path.join(path, "model.safetensors")):
            weight_map = None
        else:
            raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json (a "
                                    f"pytorch_model.bin is a pickle, which is not read: convert it to safetensors)")
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        self.handles, self.file_of = {}, {}
        for f in files:
            if not os.path.isfile(os.path.join(path, f)):
                raise FileNotFoundError(f"{index}: lists shard {f}, which is not in {path}")
            self.handles[f] = safe_open(os.path.join(path, f), framework="pt")
            for k in self.handles[f].keys():
                self.file_of[k] = f
        if weight_map:
            missing = [k for k in weight_map if k not in self.file_of]
            if missing:
                raise ValueError(f"{index}: tensors {missing[:3]} are not in the shards it names")

    def keys(self):
        return self.file_of.keys()

    def slice(self, key):
        return self.handles[self.file_of[key]].get_slice(key)

    def shape(self, key):
        return tuple(self.slice(key).get_shape())


def _layer_names(cfg, model_type, i, keys):
    """{our name: source} for layer i. A source is ("tensor", hf_name), ("stack", [hf names, one per expert]) or
    ("fused", hf_name, lo, hi): rows lo:hi of the second dimension of a fused (E, 2h, d) gate_up_proj."""
    p, q = f"blocks.{i}.", f"model.layers.{i}."
    names = {p + "attn_norm.weight": q + "input_layernorm.weight", p + "mlp_norm.weight": q +
             "post_attention_layernorm.weight"}
    for proj in ("q", "k", "v", "o"):
        names[f"{p}attn.{proj}_proj.weight"] = f"{q}self_attn.{proj}_proj.weight"
    if cfg.qkv_bias:
        for proj in ("q", "k", "v"):
            names[f"{p}attn.{proj}_proj.bias"] = f"{q}self_attn.{proj}_proj.bias"
    if cfg.qk_norm:
        names[p + "attn.q_norm.weight"] = q + "self_attn.q_norm.weight"
        names[p + "attn.k_norm.weight"] = q + "self_attn.k_norm.weight"
    sources = {k: ("tensor", v) for k, v in names.items()}
    if cfg.n_experts == 0 or i < cfg.first_k_dense:
        for proj in ("gate", "up", "down"):
            sources[f"{p}mlp.{proj}_proj.weight"] = ("tensor", f"{q}mlp.{proj}_proj.weight")
        return sources
    E, h = cfg.n_experts, cfg.moe_ffn_hidden
    if model_type == "mixtral" and q + "mlp.experts.gate_up_proj" not in keys:  # Mixtral's published layout
        m = q + "block_sparse_moe."
        sources[p + "mlp.router.weight"] = ("tensor", m + "gate.weight")
        for ours, theirs in (("w_gate", "w1"), ("w_up", "w3"), ("w_down", "w2")):
            sources[p + "mlp." + ours] = ("stack", [f"{m}experts.{e}.{theirs}.weight" for e in range(E)])
    else:
        m = q + "mlp."
        sources[p + "mlp.router.weight"] = ("tensor", m + "gate.weight")
        if m + "experts.gate_up_proj" in keys:  # transformers 5's fused layout
            sources[p + "mlp.w_gate"] = ("fused", m + "experts.gate_up_proj", 0, h)
            sources[p + "mlp.w_up"] = ("fused", m + "experts.gate_up_proj", h, 2 * h)
            sources[p + "mlp.w_down"] = ("tensor", m + "experts.down_proj")
        else:
            for proj in ("gate", "up", "down"):
                sources[f"{p}mlp.w_{proj}"] = ("stack", [f"{m}experts.{e}.{proj}_proj.weight" for e in range(E)])
    if cfg.n_shared_experts:
        for proj in ("gate", "up", "down"):
            sources[f"{p}mlp.shared.{proj}_proj.weight"] = ("tensor", f"{m}shared_expert.{proj}_proj.weight")
    if cfg.shared_expert_gate:
        sources[p + "mlp.shared_gate.weight"] = ("tensor", m + "shared_expert_gate.weight")
    return sources


def weight_sources(cfg, model_type, keys=()):
    """{our parameter name: its source in the HF files} (see _layer_names). keys: the HF file's tensor names,
    which choose between the per-expert and the fused MoE layouts."""
    keys = set(keys)
    sources = {"tok_emb.weight": ("tensor", "model.embed_tokens.weight"),
               "norm.weight": ("tensor", "model.norm.weight")}
    if not cfg.tie_embeddings:
        sources["lm_head.weight"] = ("tensor", "lm_head.weight")
    for i in range(cfg.n_layer):
        sources.update(_layer_names(cfg, model_type, i, keys))
    return sources


def _hf_names(source):
    return source[1] if source[0] == "stack" else [source[1]]


def check_weights(reader, sources, shapes, where):
    """Every tensor we need is there with the right shape, and nothing is left over (a leftover is a weight the
    repo cannot represent, e.g. an o_proj bias). Runs before anything is allocated."""
    used = set()
    for ours, src in sources.items():
        want = shapes[ours]
        for name in _hf_names(src):
            if name not in reader.file_of:
                raise ValueError(f"{where}: tensor {name} (for {ours}) is missing from the safetensors files")
            used.add(name)
        if src[0] == "stack":
            got = [reader.shape(n) for n in src[1]]
            bad = [(n, s) for n, s in zip(src[1], got) if s != tuple(want[1:])]
            if bad:
                raise ValueError(f"{where}: {bad[0][0]} has shape {bad[0][1]}, expected {tuple(want[1:])} "
                                 f"from config.json")
        elif src[0] == "fused":
            got, exp = reader.shape(src[1]), (want[0], 2 * want[1], want[2])
            if got != exp:
                raise ValueError(f"{where}: {src[1]} has shape {got}, expected {exp} (experts, 2 * "
                                 f"moe_intermediate_size, hidden_size)")
        elif reader.shape(src[1]) != tuple(want):
            raise ValueError(f"{where}: {src[1]} has shape {reader.shape(src[1])}, expected {tuple(want)} from "
                             f"config.json")
    # a tied lm_head.weight (some files keep a copy) and rotary inv_freq buffers carry nothing of their own
    # (with tie_word_embeddings HF uses the embedding and ignores a stored lm_head.weight; so do we)
    left = [k for k in reader.keys() if k not in used and k != "lm_head.weight" and not k.endswith("inv_freq")]
    if left:
        raise UnsupportedConfig(f"{where}: the safetensors files hold weights the repo cannot represent "
                                f"({len(left)}: {', '.join(sorted(left)[:4])}{', ...' if len(left) > 4 else ''})")


def read_rows(reader, src, start=None, stop=None):
    """Rows start:stop of dimension 0 of our parameter (all rows by default), read from the HF files: only those
    rows are read from disk (an FSDP rank reads its own shard)."""
    if src[0] == "stack":
        names = src[1][start:stop]
        return torch.stack([reader.slice(n)[:] for n in names]) if names else None
    sl = reader.slice(src[1])
    if start is None:
        start, stop = 0, sl.get_shape()[0]
    if src[0] == "fused":
        return sl[start:stop, src[2]:src[3]]
    return sl[start:stop]


# -----------------------------------------------------------------------------
# import

def read_hf_config(path):
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"HF model directory {path} not found")
    return read_json(os.path.join(path, "config.json"))


def hf_model_config(path, **overrides):
    """The ModelConfig an HF directory maps to; overrides replace fields that do not change the weights."""
    hf = read_hf_config(path)
    unknown = set(overrides) - {f.name for f in fields(ModelConfig)}
    if unknown:
        raise ValueError(f"unknown model config overrides {sorted(unknown)}")
    cfg = config_from_hf(hf, os.path.join(path, "config.json"), overrides.get("max_seq_len"))
    return ModelConfig(**{**cfg, **overrides}), hf


def _shard_rows(p, local):
    """(start, stop) of the dimension-0 rows of the full parameter that `local` holds: all rows for a plain
    tensor; for an FSDP2 DTensor (Shard(0) on a 1-D mesh) rank r holds torch.chunk's r-th chunk."""
    if type(p).__name__ != "DTensor":
        return 0, p.shape[0]
    assert len(p.placements) == 1 and getattr(p.placements[0], "dim", None) == 0, \
        f"expected FSDP2's Shard(0) placement, got {p.placements}"
    n, world, rank = p.shape[0], p.device_mesh.size(), p.device_mesh.get_local_rank()
    chunk = math.ceil(n / world)
    start = min(rank * chunk, n)
    stop = min(start + chunk, n)
    assert local.shape[0] == stop - start, (p.shape, local.shape, start, stop)
    return start, stop


def peak_host_memory_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # ru_maxrss is in KiB on Linux


def load_hf(path, device="cpu", dtype=None, fsdp=False, verbose=True, **overrides):
    """A Transformer with the weights of a local HF model directory, and its ckpt dict (model_config,
    tokenizer = the directory's absolute path, hf_config = its config.json). dtype: the weights' dtype (None:
    bf16 on CUDA, fp32 otherwise); fsdp: shard with FSDP2 (under torchrun) before any weight is read, each rank
    reading only its shard. overrides: model config fields that do not change the weights (kernels, max_seq_len,
    dropout, z_loss, moe_aux_loss_coef, ...). Prints the load time and peak host memory."""
    t0 = time.perf_counter()
    path = os.path.abspath(path)
    cfg, hf = hf_model_config(path, **overrides)
    device, dtype = torch.device(device), as_dtype(dtype, device)
    reader = SafetensorsDir(path)
    sources = weight_sources(cfg, hf["model_type"], reader.keys())
    with torch.device("meta"):
        model = Transformer(cfg)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert set(shapes) == set(sources), (set(shapes) ^ set(sources))
    check_weights(reader, sources, shapes, path)
    model.to(dtype)  # still on meta: nothing allocated yet
    if fsdp:
        from distributed import parallelize
        parallelize(model, "fsdp", device)
    model.to_empty(device=device)  # allocates each parameter (under FSDP: each rank's shard only)
    if cfg.tie_embeddings and model.lm_head.weight is not model.tok_emb.weight:
        model.lm_head.weight = model.tok_emb.weight  # to_empty allocates a tied weight twice: tie it again
    with torch.no_grad():
        for name, p in model.named_parameters():
            local = p.to_local() if type(p).__name__ == "DTensor" else p
            start, stop = _shard_rows(p, local)
            if stop > start:
                local.copy_(read_rows(reader, sources[name], start, stop).to(device=device, dtype=dtype))
        # buffers: RoPE tables recomputed (fp32), MoE bookkeeping zero (HF has no aux-free expert bias)
        model.rope_cos, model.rope_sin = rope_cache(cfg, cfg.max_seq_len, device)
        for m in model.moe_layers():
            m.expert_bias, m.expert_load = torch.zeros_like(m.expert_bias), torch.zeros_like(m.expert_load)
    seconds, peak = time.perf_counter() - t0, peak_host_memory_gib()
    if fsdp:  # a collective like the sharding itself (a plain load may run on one rank alone)
        stats = torch.tensor([seconds, peak], dtype=torch.float64,
                             device=device if device.type == "cuda" else "cpu")
        torch.distributed.all_reduce(stats, op=torch.distributed.ReduceOp.MAX)
        seconds, peak = stats.tolist()
        verbose = verbose and torch.distributed.get_rank() == 0
    if verbose:
        print(f"loaded HF {hf['model_type']} model {path}: {model.num_params() / 1e6:.2f}M params, {dtype}, "
              f"{'FSDP-sharded, ' if fsdp else ''}{device}, {seconds:.1f}s, peak host memory (max RSS"
              f"{', max over ranks' if fsdp else ''}) {peak:.2f} GiB")
    return model, dict(model_config=asdict(cfg), tokenizer=path, hf_config=hf)


def hf_checkpoint(path):
    """An HF directory as a repo checkpoint dict (what load_checkpoint returns): model_config, the full state
    dict under our names (in the files' dtype), tokenizer = the directory, hf_config."""
    path = os.path.abspath(path)
    cfg, hf = hf_model_config(path)
    reader = SafetensorsDir(path)
    sources = weight_sources(cfg, hf["model_type"], reader.keys())
    with torch.device("meta"):
        model = Transformer(cfg)
    check_weights(reader, sources, {n: tuple(p.shape) for n, p in model.named_parameters()}, path)
    state = {name: read_rows(reader, src) for name, src in sources.items()}
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["tok_emb.weight"]
    for m_name, m in model.named_modules():
        if hasattr(m, "expert_bias"):
            state[f"{m_name}.expert_bias"] = torch.zeros(cfg.n_experts)
    return dict(model_config=asdict(cfg), model=state, tokenizer=path, hf_config=hf)


# -----------------------------------------------------------------------------
# export

def hf_family(cfg, preferred=None):
    """The HF model_type that represents cfg exactly (preferred, e.g. the family it was imported from, if it
    fits), or UnsupportedConfig naming the setting HF cannot represent."""
    def refuse(field, why):
        raise UnsupportedConfig(f"model config {field}={getattr(cfg, field)!r}: {why}")
    if cfg.rope_scaling == "ntk":
        refuse("rope_scaling", "static NTK-aware RoPE has no HF equivalent (HF's 'dynamic' NTK is a different "
               "function); it cannot be exported")
    if cfg.logit_softcap:
        refuse("logit_softcap", "none of the supported HF families soft-caps its logits")
    if cfg.n_shared_experts and not cfg.shared_expert_gate:
        refuse("n_shared_experts", "ungated shared experts have no HF family among the supported ones "
               "(Qwen2-MoE's shared expert has a sigmoid gate: shared_expert_gate=True)")
    if cfg.n_experts == 0:
        fits = {"llama": not cfg.qkv_bias and not cfg.qk_norm, "mistral": not cfg.qkv_bias and not cfg.qk_norm,
                "qwen2": cfg.qkv_bias and not cfg.qk_norm, "qwen3": cfg.qk_norm and not cfg.qkv_bias}
        if not any(fits.values()):
            refuse("qkv_bias", "q/k/v biases together with qk_norm: no HF family has both")
        default = "qwen3" if cfg.qk_norm else "qwen2" if cfg.qkv_bias else "llama"
    else:
        fits = {"mixtral": not (cfg.qkv_bias or cfg.qk_norm or cfg.n_shared_experts or cfg.first_k_dense)
                and cfg.norm_topk_prob,
                "qwen3_moe": cfg.qk_norm and not cfg.qkv_bias and not cfg.n_shared_experts,
                "qwen2_moe": not cfg.qk_norm and cfg.shared_expert_gate}
        if not any(fits.values()):
            raise UnsupportedConfig(
                f"model config (qkv_bias={cfg.qkv_bias}, qk_norm={cfg.qk_norm}, n_shared_experts="
                f"{cfg.n_shared_experts}, first_k_dense={cfg.first_k_dense}, norm_topk_prob={cfg.norm_topk_prob}): "
                f"no HF MoE family has this combination (mixtral: no biases, no QK-norm, no shared or dense layers, "
                f"renormalised top-k; qwen3_moe: QK-norm, no shared expert; qwen2_moe: gated shared expert)")
        default = next(f for f in ("mixtral", "qwen3_moe", "qwen2_moe") if fits[f])
    return preferred if fits.get(preferred) else default


def config_to_hf(cfg, model_type, dtype, token_ids=None):
    """config.json for cfg as model_type (from hf_family). token_ids: bos/eos/pad ids to record."""
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    orig = cfg.rope_original_max_seq_len or cfg.max_seq_len
    if cfg.rope_scaling == "linear":
        rope.update(rope_type="linear", factor=cfg.rope_factor)
    elif cfg.rope_scaling == "llama3":
        rope.update(rope_type="llama3", factor=cfg.rope_factor, low_freq_factor=cfg.rope_low_freq_factor,
                    high_freq_factor=cfg.rope_high_freq_factor, original_max_position_embeddings=orig)
    elif cfg.rope_scaling == "yarn":
        rope.update(rope_type="yarn", factor=cfg.rope_factor, original_max_position_embeddings=orig)
        # only what differs from transformers' defaults, so an imported config comes back as it was
        for key, value, default in (("beta_fast", cfg.rope_beta_fast, 32.0), ("beta_slow", cfg.rope_beta_slow, 1.0),
                                    ("truncate", cfg.rope_truncate, True),
                                    ("attention_factor", cfg.rope_attention_factor, None)):
            if value != default:
                rope[key] = value
    dtype_name = str(dtype).removeprefix("torch.")
    hf = dict(architectures=[FAMILIES[model_type]], model_type=model_type, vocab_size=cfg.vocab_size,
              hidden_size=cfg.n_embd, intermediate_size=cfg.ffn_hidden, num_hidden_layers=cfg.n_layer,
              num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
              max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, hidden_act="silu",
              tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std, attention_dropout=0.0,
              # transformers 5 reads rope_parameters; older readers (transformers 4, vLLM, llama.cpp's converter)
              # read rope_theta and rope_scaling: both are written and agree
              rope_parameters=rope, rope_theta=cfg.rope_theta,
              rope_scaling=rope if cfg.rope_scaling else None, use_cache=True, dtype=dtype_name,
              torch_dtype=dtype_name, **(token_ids or {}))
    # head_dim: the families whose configs always carry it, and any other when it is not hidden / heads
    # (transformers reads it there too); left out otherwise, as transformers' own configs leave it out
    if model_type in ("llama", "mistral", "qwen3", "qwen3_moe") or cfg.head_dim != cfg.n_embd // cfg.n_head:
        hf["head_dim"] = cfg.head_dim
    if model_type in ("llama", "qwen3", "qwen3_moe"):
        hf["attention_bias"] = False
    if model_type == "llama":
        hf["mlp_bias"] = False
    if model_type in ("mistral", "mixtral"):
        hf["sliding_window"] = None
    if model_type in QWEN_FAMILIES:
        hf.update(use_sliding_window=False, sliding_window=None)
    if model_type in MOE_FAMILIES:
        hf.update(num_experts_per_tok=cfg.n_experts_per_tok, router_aux_loss_coef=cfg.moe_aux_loss_coef,
                  output_router_logits=False)
    if model_type == "mixtral":
        hf.update(num_local_experts=cfg.n_experts, intermediate_size=cfg.moe_ffn_hidden, router_jitter_noise=0.0)
    if model_type in ("qwen2_moe", "qwen3_moe"):
        hf.update(num_experts=cfg.n_experts, moe_intermediate_size=cfg.moe_ffn_hidden,
                  norm_topk_prob=cfg.norm_topk_prob, decoder_sparse_step=1,
                  mlp_only_layers=list(range(cfg.first_k_dense)))
    if model_type == "qwen2_moe":
        hf.update(shared_expert_intermediate_size=cfg.shared_ffn_hidden, qkv_bias=cfg.qkv_bias)
    return hf


def state_dict_to_hf(state, cfg, model_type):
    """Our state dict -> {HF name: tensor} in the per-expert layout save_pretrained writes; a tied lm_head is
    left out (HF ties it to the embedding, as save_pretrained does)."""
    out = {}
    for ours, src in weight_sources(cfg, model_type, keys=()).items():
        t = state[ours]
        if src[0] == "stack":
            for e, name in enumerate(src[1]):
                out[name] = t[e].contiguous()
        else:
            out[src[1]] = t.contiguous()
    return out


def write_tokenizer(tokenizer_name, out_dir):
    """The tokenizer files of the export. An HF directory's files are copied verbatim; the repo's own tokenizer
    is converted by the tokenizer module. Returns the files written (names), for the log."""
    if os.path.isdir(tokenizer_name):
        copied = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(tokenizer_name, f))]
        for f in copied:
            shutil.copyfile(os.path.join(tokenizer_name, f), os.path.join(out_dir, f))
        return copied
    # the repo's tiktoken tokenizer -> tokenizer.json + tokenizer_config.json (with the chat template)
    from data.hf_tokenizer import save_hf_tokenizer
    from data.tokenizer import get_tokenizer
    before = set(os.listdir(out_dir))
    save_hf_tokenizer(get_tokenizer(tokenizer_name), out_dir)
    return sorted(set(os.listdir(out_dir)) - before)


def _repo_token_ids(tokenizer_name):
    """bos/eos/pad ids of the repo's tokenizer for config.json and generation_config.json: its stop ids (a chat
    model ends its turn with <|im_end|>, documents end with <|endoftext|>: both stop generation)."""
    from data.hf_tokenizer import hf_token_ids
    from data.tokenizer import get_tokenizer
    return hf_token_ids(get_tokenizer(tokenizer_name))


def export_hf(source, out_dir, dtype=None, verbose=True):
    """Write the HF directory of a language-model checkpoint (a file, a directory holding ckpt.pt, an adapter
    checkpoint, or an HF directory): config.json, model.safetensors, generation_config.json and the tokenizer
    files. dtype: of the written weights (None: as the checkpoint holds them). Refuses (UnsupportedConfig) what
    HF cannot represent, before writing anything."""
    from safetensors.torch import save_file
    from checkpoint import load_model
    from lora import lora_modules, merge_lora
    from model import RewardModel
    if os.path.isdir(out_dir) and os.listdir(out_dir):  # never overwrite (or read while writing) a model
        raise FileExistsError(f"export: {out_dir} exists and is not empty; choose a new or empty directory")
    load_dtype = None  # a repo checkpoint: as stored (adapters are merged at that precision, then converted)
    if is_hf_dir(source):  # an HF directory: the dtype of its files, so the round trip is lossless
        reader = SafetensorsDir(source)
        load_dtype = SAFETENSORS_DTYPES[reader.slice(next(iter(reader.keys()))).get_dtype()]
    try:
        model, ckpt = load_model(source, "cpu", dtype=load_dtype)
    except ValueError as e:
        if "reward model" in str(e):
            raise UnsupportedConfig(f"{source} is a reward model: its score head (a Linear with a bias, read at "
                                    f"the final response token) has no exact HF equivalent; export the language "
                                    f"model it was trained from instead") from e
        raise
    assert not isinstance(model, RewardModel)
    if lora_modules(model):
        merge_lora(model)
    if dtype is not None:
        model.to(as_dtype(dtype, "cpu"))
    cfg = model.config
    tokenizer = ckpt["tokenizer"]
    hf_src = tokenizer if os.path.isfile(os.path.join(str(tokenizer), "config.json")) else None
    src_config = read_json(os.path.join(hf_src, "config.json")) if hf_src else {}
    model_type = hf_family(cfg, preferred=src_config.get("model_type"))
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    for k, v in state.items():
        if k.endswith("expert_bias") and bool(v.any()):
            raise UnsupportedConfig(f"{k} is nonzero (aux-loss-free balancing, moe_bias_update_rate="
                                    f"{cfg.moe_bias_update_rate}): HF routers have no selection bias, so the "
                                    f"exported model would route differently")
    tensors = state_dict_to_hf(state, cfg, model_type)
    dtypes = {t.dtype for t in tensors.values()}
    assert len(dtypes) == 1, f"mixed parameter dtypes {dtypes}"
    if hf_src:  # the ids of the HF tokenizer the model came with
        token_ids = {k: src_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in src_config}
    else:
        token_ids = _repo_token_ids(tokenizer)
    hf_config = config_to_hf(cfg, model_type, dtypes.pop(), token_ids)

    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    gen_src = os.path.join(hf_src, "generation_config.json") if hf_src else None
    if gen_src and os.path.isfile(gen_src):
        shutil.copyfile(gen_src, os.path.join(out_dir, "generation_config.json"))
    else:
        with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
            json.dump({k: v for k, v in token_ids.items()}, f, indent=2)
    tok_files = write_tokenizer(tokenizer, out_dir)
    if verbose:
        print(f"exported {source} -> {out_dir}: {FAMILIES[model_type]}, {len(tensors)} tensors "
              f"({sum(t.numel() for t in tensors.values()) / 1e6:.2f}M params, {hf_config['dtype']}), "
              f"tokenizer files: {', '.join(tok_files) or 'none'}")
    return out_dir


# -----------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description="Hugging Face model directories in and out (see the module docstring)")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="a repo checkpoint -> an HF model directory")
    e.add_argument("--ckpt", required=True, help="checkpoint file, directory holding ckpt.pt, or adapter checkpoint")
    e.add_argument("--out", required=True, help="output directory")
    e.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="weights' dtype (default: as stored)")
    i = sub.add_parser("import", help="an HF model directory -> a repo checkpoint (ckpt.pt)")
    i.add_argument("--hf", required=True, help="local HF model directory")
    i.add_argument("--out", required=True, help="checkpoint path to write, e.g. out/qwen/ckpt.pt")
    i.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    n = sub.add_parser("info", help="print the model config an HF directory maps to, or why it cannot")
    n.add_argument("--hf", required=True)
    args = p.parse_args(argv)
    try:
        if args.cmd == "export":
            export_hf(args.ckpt, args.out, args.dtype)
        elif args.cmd == "import":
            from checkpoint import checkpoint_dict, save_checkpoint
            model, ckpt = load_hf(args.hf, "cpu", args.dtype)
            save_checkpoint(args.out, checkpoint_dict(model, ckpt["tokenizer"]))
            print(f"wrote {args.out}")
        else:
            cfg, hf = hf_model_config(args.hf)
            print(f"{hf['model_type']} ({', '.join(hf.get('architectures') or [])}) -> ModelConfig:")
            for k, v in asdict(cfg).items():
                print(f"  {k} = {v!r}")
    except (UnsupportedConfig, FileNotFoundError, FileExistsError, ValueError) as err:
        raise SystemExit(f"hf.py {args.cmd}: {err}")


if __name__ == "__main__":
    main()
