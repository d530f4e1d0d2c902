"""hf.py against transformers (a test-time reference only): tiny random models of every supported family are
built with transformers' own config classes, every weight randomised (norms and biases too), saved with
save_pretrained, imported, and compared: logits, greedy KV-cache generation, parameter counts; then exported
back and loaded with transformers (logits equal, tensors bitwise equal). Nothing is downloaded."""

import json
import math
import os
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

import hf  # noqa: E402
from checkpoint import checkpoint_dict, load_checkpoint, load_model, save_checkpoint  # noqa: E402
from model import ModelConfig, Transformer, rope_frequencies  # noqa: E402

BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
VARIANTS = {
    "llama": ("LlamaConfig", {}),
    "llama3_rope": ("LlamaConfig", dict(head_dim=16, rope_parameters=dict(
        rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=32))),
    "qwen2_tied": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen2_yarn": ("Qwen2Config", dict(rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                                             original_max_position_embeddings=32))),
    "qwen3": ("Qwen3Config", dict(head_dim=16)),  # head_dim != hidden / heads = 8
    "mistral": ("MistralConfig", dict(sliding_window=None)),  # v0.2+ ship no window
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(MOE, shared_expert_intermediate_size=24, norm_topk_prob=False,
                                          num_hidden_layers=3, mlp_only_layers=[0])),
    "qwen2_moe_norm_topk": ("Qwen2MoeConfig", dict(MOE, shared_expert_intermediate_size=24, norm_topk_prob=True)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(MOE, head_dim=16, norm_topk_prob=True)),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The models here are tiny: a second intra-op thread only adds synchronisation (on a busy 2-core machine,
    100x: a 32x32 matmul waits for the other thread)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def randomise_(model, seed=0):
    """Every parameter random, norms around 1 and biases around 0 but never at their default init, so a wrong
    mapping of any of them changes the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:  # (out, in) matrices and (E, out, in) expert stacks
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
    return model


def build_hf(variant, path, **extra):
    cls, kw = VARIANTS[variant]
    cfg = getattr(transformers, cls)(**{**BASE, **kw, **extra})
    torch.manual_seed(0)
    model = randomise_(transformers.AutoModelForCausalLM.from_config(cfg)).eval()
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """variant -> (HF model, its save_pretrained directory), built once per module."""
    root = tmp_path_factory.mktemp("hf")
    return {v: (build_hf(v, str(root / v)), str(root / v)) for v in VARIANTS}


def left_padded(prompts, pad=0):
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), P, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):], mask[i, P - len(p):] = torch.tensor(p), 1
    return ids, mask


def hf_greedy(model, prompts, n):
    ids, mask = left_padded(prompts)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_import_matches_transformers(hf_dirs, variant):
    ref, path = hf_dirs[variant]
    ours, ckpt = load_model(path, "cpu", kernels="torch")
    ours.eval()
    assert ckpt["tokenizer"] == os.path.abspath(path) and ckpt["model_config"]["vocab_size"] == 96
    assert ours.num_params() == sum(p.numel() for p in ref.parameters())
    assert next(ours.parameters()).dtype == torch.float32  # CPU default
    x = torch.randint(0, 96, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(x).logits
        got, _ = ours(x)
    diff = (got - want).abs().max().item()
    print(f"{variant}: fp32 max abs logits difference {diff:.3g} (logits std {want.std().item():.3g})")
    assert diff < 1e-4
    # greedy KV-cache generation: prompts of different lengths (HF left-padded with an attention mask), and a
    # batch whose prompts are all one token long (the prefill is then T == 1)
    for prompts in ([[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [9]], [[3], [17], [42]]):
        mine = ours.generate(prompts, 20, temperature=0)["tokens"]
        assert torch.equal(mine, hf_greedy(ref, prompts, 20)), (variant, prompts)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_round_trip_is_lossless(hf_dirs, tmp_path, variant):
    ref, path = hf_dirs[variant]
    for f in ("tokenizer.json", "tokenizer_config.json"):  # stand-ins: the export copies them byte for byte
        with open(os.path.join(path, f), "w") as fh:
            fh.write(json.dumps({"file": f, "variant": variant}))
    out = str(tmp_path / "export")
    hf.export_hf(path, out, verbose=False)
    a, b = load_file(os.path.join(path, "model.safetensors")), load_file(os.path.join(out, "model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        with open(os.path.join(path, f), "rb") as x, open(os.path.join(out, f), "rb") as y:
            assert x.read() == y.read(), f
    # an equivalent config: transformers parses both to the same settings
    c1 = transformers.AutoConfig.from_pretrained(path).to_dict()
    c2 = transformers.AutoConfig.from_pretrained(out).to_dict()
    differ = {k: (c1.get(k), c2.get(k)) for k in set(c1) | set(c2)
              if k not in ("transformers_version", "_name_or_path") and c1.get(k) != c2.get(k)}
    assert not differ, differ
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    x = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(back(x).logits, ref(x).logits)


def test_mistral_window_covered_by_the_context_is_not_a_refusal(tmp_path):
    # a 4096 window with max_position_embeddings 32768 (Mistral v0.1) is active: refused at the full context,
    # accepted when the run's context fits inside the window
    ref = build_hf("mistral", str(tmp_path), sliding_window=64, max_position_embeddings=256)
    with pytest.raises(hf.UnsupportedConfig, match="sliding_window=64"):
        load_model(str(tmp_path), kernels="torch")
    ours, _ = load_model(str(tmp_path), kernels="torch", max_seq_len=64)
    x = torch.randint(0, 96, (2, 64))
    with torch.no_grad():
        assert (ours(x)[0] - ref(x).logits).abs().max() < 1e-4


def test_fused_and_sharded_layouts(hf_dirs, tmp_path):
    # transformers 5's in-memory layout (experts.gate_up_proj (E, 2h, d), experts.down_proj (E, d, h)) written
    # as it is, and a save_pretrained sharded into several files with model.safetensors.index.json
    x = torch.randint(0, 96, (2, 24))
    for variant in ("mixtral", "qwen3_moe"):
        ref, path = hf_dirs[variant]
        fused = tmp_path / f"fused_{variant}"
        fused.mkdir()
        shutil.copy(os.path.join(path, "config.json"), fused)
        state = {k: v.contiguous() for k, v in ref.state_dict().items() if k != "lm_head.weight" or
                 not ref.config.tie_word_embeddings}
        assert any(k.endswith("experts.gate_up_proj") for k in state)
        save_file(state, str(fused / "model.safetensors"), metadata={"format": "pt"})
        ours, _ = load_model(str(fused), kernels="torch")
        with torch.no_grad():
            assert (ours(x)[0] - ref(x).logits).abs().max() < 1e-4, variant
    ref, _ = hf_dirs["qwen2_moe"]
    ref.save_pretrained(str(tmp_path / "sharded"), max_shard_size="20KB")
    assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path / "sharded") if f.endswith(".safetensors")]) > 1
    ours, _ = load_model(str(tmp_path / "sharded"), kernels="torch")
    with torch.no_grad():
        assert (ours(x)[0] - ref(x).logits).abs().max() < 1e-4
    # load_checkpoint gives the same weights as a checkpoint dict, in the files' dtype
    ckpt = load_checkpoint(str(tmp_path / "sharded"))
    assert ckpt["tokenizer"] == str(tmp_path / "sharded") and ckpt["model"]["tok_emb.weight"].dtype == torch.float32
    plain, _ = load_model(ckpt, kernels="torch")
    with torch.no_grad():
        assert torch.equal(plain(x)[0], ours(x)[0])


def test_dtype_and_refused_weights(hf_dirs, tmp_path):
    _, path = hf_dirs["qwen2_tied"]
    m, _ = load_model(path, "cpu", dtype="bfloat16")
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16} and m.rope_cos.dtype == torch.float32
    assert m.lm_head.weight is m.tok_emb.weight
    ref = load_file(os.path.join(path, "model.safetensors"))
    assert torch.equal(m.blocks[1].attn.k_proj.bias, ref["model.layers.1.self_attn.k_proj.bias"].bfloat16())
    # a tensor the repo cannot represent (an o_proj bias) is refused, not dropped
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    ref["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(32)
    save_file(ref, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(hf.UnsupportedConfig, match="o_proj.bias"):
        load_model(str(bad))
    with pytest.raises(ValueError, match="not a reward model"):
        load_model(path, kind="reward")


def cfg_dict(variant, **kw):
    cls, base_kw = VARIANTS[variant]
    return getattr(transformers, cls)(**{**BASE, **base_kw, **kw}).to_dict()


@pytest.mark.parametrize("hf_config, match", [
    (dict(cfg_dict("mistral"), sliding_window=4096, max_position_embeddings=32768), "sliding_window=4096"),
    (dict(cfg_dict("qwen2_tied", use_sliding_window=True, sliding_window=16, max_window_layers=0)),
     "sliding_window=16"),
    (dict(cfg_dict("llama"), rope_parameters=dict(rope_type="dynamic", rope_theta=1e4, factor=2.0)),
     "rope_type='dynamic'"),
    (dict(cfg_dict("llama"), rope_parameters=dict(rope_type="longrope", rope_theta=1e4)), "rope_type='longrope'"),
    (dict(cfg_dict("llama"), model_type="deepseek_v3", kv_lora_rank=512), "model_type='deepseek_v3'.*MLA"),
    (dict(cfg_dict("llama"), model_type="gemma2"), "model_type='gemma2'"),
    (dict(cfg_dict("llama"), attention_bias=True), "attention_bias=True"),
    (dict(cfg_dict("llama"), mlp_bias=True), "mlp_bias=True"),
    (dict(cfg_dict("llama"), hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(cfg_dict("llama"), partial_rotary_factor=0.5), "partial_rotary_factor=0.5"),
    (dict(cfg_dict("qwen3_moe"), decoder_sparse_step=2), "decoder_sparse_step=2"),
    (dict(cfg_dict("qwen3_moe"), mlp_only_layers=[1]), r"mlp_only_layers=\[1\]"),
    (dict(cfg_dict("llama"), quantization_config=dict(quant_method="gptq")), "quantization_config='gptq'"),
])
def test_unsupported_configs_are_refused(hf_config, match):
    with pytest.raises(hf.UnsupportedConfig, match=match):
        hf.config_from_hf(hf_config)


def test_inactive_sliding_windows_are_accepted():
    # Qwen2.5 ships sliding_window with use_sliding_window false; Qwen2-MoE writes sliding_window 0
    c = cfg_dict("qwen2_tied")
    c.update(sliding_window=32768, use_sliding_window=False, max_position_embeddings=32768)
    assert hf.config_from_hf(c)["max_seq_len"] == 32768
    assert hf.config_from_hf(dict(cfg_dict("qwen2_moe"), sliding_window=0))["shared_expert_gate"]
    # legacy (transformers 4) rope fields: rope_theta at the top, rope_scaling with "type"
    legacy = {k: v for k, v in cfg_dict("llama").items() if k != "rope_parameters"}
    legacy.update(rope_theta=500000.0, rope_scaling=dict(type="linear", factor=2.0))
    got = hf.config_from_hf(legacy)
    assert (got["rope_theta"], got["rope_scaling"], got["rope_factor"]) == (500000.0, "linear", 2.0)


ROPE_CASES = [  # (head_dim, theta, rope parameters, max_position_embeddings)
    (128, 1e6, dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32768), 131072),  # Qwen2.5
    # long original context: the upper correction bound passes head_dim/2 - 1 (the old clamp was wrong there)
    (128, 1e4, dict(rope_type="yarn", factor=2.0, original_max_position_embeddings=65536), 131072),
    (64, 1e4, dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=4096, truncate=False,
                   beta_fast=16, beta_slow=2), 32768),
    (64, 1e4, dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=4096, attention_factor=1.5), 32768),
    (64, 1e4, dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=4096, mscale=1.0,
                   mscale_all_dim=0.5), 32768),
    (128, 5e5, dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192), 131072),  # Llama 3.1
    (64, 1e4, dict(rope_type="linear", factor=4.0), 8192),
]


@pytest.mark.parametrize("head_dim, theta, params, max_pos", ROPE_CASES)
def test_rope_frequencies_match_transformers(head_dim, theta, params, max_pos):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    c = transformers.LlamaConfig(**{**BASE, "num_attention_heads": 2, "num_key_value_heads": 2,
                                    "max_position_embeddings": max_pos}, head_dim=head_dim,
                                 rope_parameters=dict(params, rope_theta=theta))
    want, want_scale = ROPE_INIT_FUNCTIONS[params["rope_type"]](c, "cpu")
    cfg = ModelConfig(**{**hf.config_from_hf(c.to_dict()), "max_seq_len": 16})
    got, scale = rope_frequencies(cfg)
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=0)
    assert scale == pytest.approx(want_scale, rel=1e-6)
    if params.get("original_max_position_embeddings") == 65536:  # the case the clamp fix is about:
        high = math.ceil(head_dim * math.log(65536 / (2 * math.pi)) / (2 * math.log(theta)))
        assert head_dim // 2 - 1 < high < head_dim - 1  # the old clamp to head_dim/2 - 1 changed the ramp here


# -----------------------------------------------------------------------------
# export of the repo's own checkpoints

EXPORT_CASES = {  # repo model config -> the HF family it must export as
    "llama": (dict(), "llama"),
    "qwen2": (dict(qkv_bias=True, tie_embeddings=False), "qwen2"),
    "qwen3": (dict(qk_norm=True, head_dim=16), "qwen3"),
    "yarn": (dict(rope_scaling="yarn", rope_factor=4.0, rope_original_max_seq_len=16), "llama"),
    "mixtral": (dict(n_experts=4, moe_ffn_hidden=16, tie_embeddings=False), "mixtral"),
    "qwen2_moe": (dict(n_experts=4, moe_ffn_hidden=16, n_shared_experts=1, shared_ffn_hidden=24,
                       shared_expert_gate=True, norm_topk_prob=False, first_k_dense=1), "qwen2_moe"),
    "qwen3_moe": (dict(n_experts=4, moe_ffn_hidden=16, qk_norm=True, first_k_dense=1), "qwen3_moe"),
}


def repo_checkpoint(path, **kw):
    from conftest import tiny_config
    torch.manual_seed(0)
    model = Transformer(tiny_config(n_layer=3, n_embd=32, **kw))
    for name, p in model.named_parameters():  # every weight random, norms too
        with torch.no_grad():
            p.copy_(torch.rand_like(p) + 0.5 if name.endswith("norm.weight") else torch.randn_like(p) * 0.3)
    save_checkpoint(path, checkpoint_dict(model, "default", step=0))
    return model.eval()


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_export_loads_in_transformers_with_our_logits(tmp_path, case):
    kw, family = EXPORT_CASES[case]
    ours = repo_checkpoint(str(tmp_path / "ckpt.pt"), **kw)
    hf.export_hf(str(tmp_path / "ckpt.pt"), str(tmp_path / "hf"), verbose=False)
    config = json.load(open(tmp_path / "hf" / "config.json"))
    assert config["model_type"] == family
    gen = json.load(open(tmp_path / "hf" / "generation_config.json"))
    from data.tokenizer import get_tokenizer
    tok = get_tokenizer("default")
    assert gen["eos_token_id"] == [tok.im_end_id, tok.eot_id] and config["pad_token_id"] == tok.pad_id
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert sum(p.numel() for p in theirs.parameters()) == ours.num_params()
    x = torch.randint(0, ours.config.vocab_size, (2, 32))
    with torch.no_grad():
        diff = (theirs(x).logits - ours(x)[0]).abs().max().item()
    assert diff < 1e-4, diff


def test_export_merges_adapters_and_converts_dtype(tmp_path):
    from lora import apply_lora, lora_state_dict, merge_lora
    from dataclasses import asdict
    base = repo_checkpoint(str(tmp_path / "base.pt"))
    lora = dict(targets=("q", "v", "down"), r=4, alpha=8)
    apply_lora(base, **lora)
    with torch.no_grad():
        for n, p in base.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.3)
    save_checkpoint(str(tmp_path / "adapter.pt"), dict(model_config=asdict(base.config), tokenizer="default",
                                                       base_checkpoint=str(tmp_path / "base.pt"), lora=lora,
                                                       lora_state=lora_state_dict(base)))
    merged = merge_lora(base)
    hf.main(["export", f"--ckpt={tmp_path / 'adapter.pt'}", f"--out={tmp_path / 'hf'}", "--dtype=bfloat16"])
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    w = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert {t.dtype for t in w.values()} == {torch.bfloat16}
    assert torch.equal(w["model.layers.1.self_attn.q_proj.weight"], merged.blocks[1].attn.q_proj.weight.bfloat16())
    x = torch.randint(0, merged.config.vocab_size, (2, 16))
    with torch.no_grad():
        ref = Transformer(merged.config)
        ref.load_state_dict({k: v.bfloat16().float() for k, v in merged.state_dict().items()})
        assert (theirs(x).logits - ref.eval()(x)[0]).abs().max() < 1e-4


@pytest.mark.parametrize("kw, match", [
    (dict(rope_scaling="ntk", rope_factor=2.0), "rope_scaling='ntk'"),
    (dict(logit_softcap=30.0), "logit_softcap=30.0"),
    (dict(n_experts=4, n_shared_experts=1), "n_shared_experts=1"),
    (dict(n_experts=4, qkv_bias=True, qk_norm=True), "no HF MoE family"),
    (dict(qkv_bias=True, qk_norm=True), "qkv_bias=True"),
])
def test_export_refuses_what_hf_cannot_represent(tmp_path, kw, match):
    repo_checkpoint(str(tmp_path / "ckpt.pt"), **kw)
    with pytest.raises(hf.UnsupportedConfig, match=match):
        hf.export_hf(str(tmp_path / "ckpt.pt"), str(tmp_path / "hf"))
    assert not os.path.exists(tmp_path / "hf")  # refused before anything is written


def test_export_refuses_expert_bias_and_reward_models(tmp_path):
    from model import RewardModel
    m = repo_checkpoint(str(tmp_path / "moe.pt"), n_experts=4, moe_bias_update_rate=0.01)
    m.moe_layers()[0].expert_bias[1] = 0.01
    save_checkpoint(str(tmp_path / "moe.pt"), checkpoint_dict(m, "default"))
    with pytest.raises(hf.UnsupportedConfig, match="expert_bias is nonzero"):
        hf.export_hf(str(tmp_path / "moe.pt"), str(tmp_path / "hf"))
    rm = RewardModel(repo_checkpoint(str(tmp_path / "lm.pt")))
    save_checkpoint(str(tmp_path / "rm.pt"), checkpoint_dict(rm, "default"))
    with pytest.raises(hf.UnsupportedConfig, match="reward model"):
        hf.export_hf(str(tmp_path / "rm.pt"), str(tmp_path / "hf"))


def test_checkpoints_without_the_new_config_keys_load_as_before(tmp_path):
    # a checkpoint written before head_dim / norm_topk_prob / shared_expert_gate / rope_* existed
    m = repo_checkpoint(str(tmp_path / "ckpt.pt"), n_experts=4, n_shared_experts=1)
    ckpt = torch.load(str(tmp_path / "ckpt.pt"), weights_only=True)
    new = ("head_dim", "norm_topk_prob", "shared_ffn_hidden", "shared_expert_gate", "rope_low_freq_factor",
           "rope_high_freq_factor", "rope_beta_fast", "rope_beta_slow", "rope_truncate", "rope_attention_factor")
    ckpt["model_config"] = {k: v for k, v in ckpt["model_config"].items() if k not in new}
    save_checkpoint(str(tmp_path / "old.pt"), ckpt)
    old, _ = load_model(str(tmp_path / "old.pt"))
    assert old.config == m.config
    x = torch.randint(0, m.config.vocab_size, (2, 8))
    with torch.no_grad():
        assert torch.equal(old.eval()(x)[0], m(x)[0])


def test_round_trip_keeps_bf16(hf_dirs, tmp_path):
    ref, _ = hf_dirs["qwen2_moe"]
    src, out = str(tmp_path / "bf16"), str(tmp_path / "out")
    ref.to(torch.bfloat16).save_pretrained(src)
    ref.float()
    m, _ = load_model(src, "cpu", dtype="bfloat16")
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    hf.export_hf(src, out, verbose=False)
    a, b = load_file(os.path.join(src, "model.safetensors")), load_file(os.path.join(out, "model.safetensors"))
    assert sorted(a) == sorted(b) and all(a[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k]) for k in a)


FSDP_LOAD = r'''
import os, sys, torch
sys.path.insert(0, sys.argv[1])
import torch.distributed as dist
from checkpoint import load_model
from distributed import setup_distributed
ddp, rank, world, device, _ = setup_distributed("cpu")
torch.set_num_threads(1)
sharded, ckpt = load_model(sys.argv[2], device, fsdp=True, kernels="torch")
# each rank holds its half of every parameter, never the whole
for name, p in sharded.named_parameters():
    assert type(p).__name__ == "DTensor", name
    assert p.to_local().shape[0] == -(-p.shape[0] // world) or rank == world - 1, (name, p.shape, p.to_local().shape)
full, _ = load_model(sys.argv[2], device, kernels="torch")
x = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    got, want = sharded(x)[0], full(x)[0]
assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
# and its generation (generate gathers the shards once)
assert torch.equal(sharded.generate([[1, 2, 3], [4]], 8, temperature=0)["tokens"],
                   full.generate([[1, 2, 3], [4]], 8, temperature=0)["tokens"])
ok = torch.ones(1)
dist.all_reduce(ok)
if rank == 0:
    print(f"fsdp load ok on {int(ok.item())} ranks")
dist.barrier()
dist.destroy_process_group()
'''


def test_fsdp_load_reads_only_each_ranks_shard(hf_dirs, tmp_path):
    from conftest import ROOT, run_script
    _, path = hf_dirs["qwen2_moe"]
    script = tmp_path / "fsdp_load.py"
    script.write_text(FSDP_LOAD)
    out = run_script(["torchrun", "--standalone", "--nproc_per_node=2", str(script), ROOT, path], timeout=300)
    assert "fsdp load ok on 2 ranks" in out and "FSDP-sharded" in out and "peak host memory" in out
