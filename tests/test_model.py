"""model.py against independent references: hand-built MHA, closed forms, naive loops."""

import math
import os

import pytest
import torch
import torch.nn.functional as F

from checkpoint import checkpoint_dict, load_checkpoint, load_model, save_checkpoint
from generation import sample_next
from model import ModelConfig, MoE, Transformer, rope_cache, rope_frequencies
from optim import lr_at
import kernels


def small(**kw):
    base = dict(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, max_seq_len=64, kernels="torch")
    return ModelConfig(**{**base, **kw})


def naive_attention(q, k, v):
    """Causal softmax attention with explicit masking; q, k, v (B, H, T, hd), same head count."""
    T = q.shape[2]
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    return s.softmax(-1) @ v


def test_gqa_equals_mha_with_repeated_kv_heads():
    torch.manual_seed(0)
    gqa = Transformer(small(n_kv_head=2)).blocks[0].attn
    mha = Transformer(small(n_kv_head=4)).blocks[0].attn
    hd = gqa.head_dim
    with torch.no_grad():
        mha.q_proj.weight.copy_(gqa.q_proj.weight)
        mha.o_proj.weight.copy_(gqa.o_proj.weight)
        for name in ("k_proj", "v_proj"):  # kv head j serves query heads 2j and 2j+1
            w = getattr(gqa, name).weight.view(2, hd, -1)
            getattr(mha, name).weight.copy_(w.repeat_interleave(2, dim=0).reshape(4 * hd, -1))
    x = torch.randn(2, 10, 32)
    cos, sin = rope_cache(small(), 10)
    torch.testing.assert_close(gqa(x, cos[None], sin[None]), mha(x, cos[None], sin[None]))

    # and the MHA path against the naive formula
    q = mha.q_proj(x).view(2, 10, 4, hd)
    k = mha.k_proj(x).view(2, 10, 4, hd)
    v = mha.v_proj(x).view(2, 10, 4, hd).transpose(1, 2)
    q = kernels.apply_rope(q, cos[None], sin[None]).transpose(1, 2)
    k = kernels.apply_rope(k, cos[None], sin[None]).transpose(1, 2)
    ref = mha.o_proj(naive_attention(q, k, v).transpose(1, 2).reshape(2, 10, -1))
    torch.testing.assert_close(mha(x, cos[None], sin[None]), ref)


def naive_rope(x, pos, inv_freq):
    """Half-split rotation of one vector x (hd,) at integer position pos, written out pair by pair."""
    half = x.shape[0] // 2
    out = x.clone()
    for i in range(half):
        a = pos * inv_freq[i]
        out[i] = x[i] * math.cos(a) - x[i + half] * math.sin(a)
        out[i + half] = x[i + half] * math.cos(a) + x[i] * math.sin(a)
    return out


@pytest.mark.parametrize("scaling", [None, "linear", "ntk", "yarn"])
def test_rope_scores_depend_only_on_relative_position(scaling):
    cfg = small(rope_scaling=scaling, rope_factor=4.0, rope_original_max_seq_len=16)
    cos, sin = rope_cache(cfg, 64)
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, cfg.head_dim), torch.randn(1, 1, 1, cfg.head_dim)

    def score(m, n):
        qm = kernels.apply_rope(q, cos[None, m:m + 1], sin[None, m:m + 1])
        kn = kernels.apply_rope(k, cos[None, n:n + 1], sin[None, n:n + 1])
        return (qm * kn).sum().item()

    for m, n in [(5, 2), (9, 9), (3, 20)]:
        for shift in (1, 7, 30):
            assert score(m, n) == pytest.approx(score(m + shift, n + shift), rel=1e-4, abs=1e-5)
    # the rotation is the documented half-split pairing
    inv_freq, mscale = rope_frequencies(cfg)
    got = kernels.apply_rope(q, cos[None, 11:12], sin[None, 11:12]).flatten()
    torch.testing.assert_close(got, naive_rope(q.flatten(), 11, inv_freq.tolist()) * mscale, rtol=1e-4, atol=1e-5)


def test_rope_scaling_frequencies():
    hd, base, s = 8, 10000.0, 4.0  # small(): n_embd 32 / 4 heads
    plain = 1.0 / base ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    lin, _ = rope_frequencies(small(rope_scaling="linear", rope_factor=s))
    torch.testing.assert_close(lin.double(), plain / s)
    ntk, _ = rope_frequencies(small(rope_scaling="ntk", rope_factor=s))
    base2 = base * s ** (hd / (hd - 2))
    torch.testing.assert_close(ntk.double(), 1.0 / base2 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    assert ntk[0] == pytest.approx(plain[0].item())           # highest frequency untouched
    assert ntk[-1] == pytest.approx(plain[-1].item() / s, rel=0.3)  # lowest ~ interpolated
    yarn, mscale = rope_frequencies(small(rope_scaling="yarn", rope_factor=s, rope_original_max_seq_len=4096))
    assert yarn[0] == pytest.approx(plain[0].item())           # fast dims extrapolate
    assert yarn[-1] == pytest.approx(plain[-1].item() / s)      # slow dims interpolate
    assert mscale == pytest.approx(0.1 * math.log(s) + 1)


def test_forward_loss_matches_cross_entropy_with_ignore_index():
    torch.manual_seed(0)
    m = Transformer(small())
    idx = torch.randint(0, 97, (3, 12))
    targets = torch.randint(0, 97, (3, 12))
    targets[0, :5] = -100
    targets[2, 7:] = -100
    logits, _ = m(idx)
    ref = F.cross_entropy(logits.view(-1, 97), targets.view(-1), ignore_index=-100)
    _, loss = m(idx, targets)
    torch.testing.assert_close(loss, ref)
    _, per_tok = m(idx, targets, reduction="none")
    assert per_tok.shape == (3, 12) and (per_tok[targets == -100] == 0).all()
    torch.testing.assert_close(per_tok.sum() / (targets != -100).sum(), ref)
    last, _ = m(idx, last_only=True)
    torch.testing.assert_close(last[:, 0], logits[:, -1])


def test_per_token_logprobs_are_exact_under_z_loss_in_training_mode():
    # reduction="none" is what DPO, GRPO and the reward stage read as log-probs: z-loss (a regulariser of the
    # training loss) must not leak into them, while the mean loss does carry it
    torch.manual_seed(0)
    m = Transformer(small(z_loss=0.1)).train()
    idx, targets = torch.randint(0, 97, (2, 10)), torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        logits, _ = m(idx)
        logp = F.log_softmax(logits.double(), -1).gather(-1, targets[..., None]).squeeze(-1)
        _, nll = m(idx, targets, reduction="none")
        torch.testing.assert_close(-nll.double(), logp, rtol=0, atol=1e-5)
        _, mean = m(idx, targets)
        z = 0.1 * (torch.logsumexp(logits.double(), -1) ** 2).mean()
        torch.testing.assert_close(mean.double(), -logp.mean() + z, rtol=0, atol=1e-4)


def test_kv_cache_greedy_equals_full_recompute():
    torch.manual_seed(0)
    m = Transformer(small()).eval()
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8], [9]]
    out = m.generate(prompts, max_new_tokens=10, temperature=0)
    for row, p in enumerate(prompts):
        seq = list(p)
        for _ in range(10):  # no cache, no padding: the whole forward each step
            logits, _ = m(torch.tensor([seq]))
            seq.append(int(logits[0, -1].argmax()))
        assert out["tokens"][row].tolist() == seq[len(p):], f"row {row}"
        # recorded log-probs are those of the full forward
        logits, _ = m(torch.tensor([seq[:-1]]))
        ref_lp = F.log_softmax(logits[0, len(p) - 1:], -1).gather(1, torch.tensor(seq[len(p):])[:, None]).squeeze(1)
        torch.testing.assert_close(out["logprobs"][row], ref_lp, rtol=1e-4, atol=1e-4)


def test_generate_stops_and_pads():
    torch.manual_seed(0)
    m = Transformer(small()).eval()
    greedy = m.generate([[3, 4]], max_new_tokens=8, temperature=0)["tokens"][0].tolist()
    stop = greedy[2]
    first = greedy.index(stop)
    out = m.generate([[3, 4], [3, 4]], max_new_tokens=8, temperature=0, stop_tokens=[stop], pad_id=0)
    assert out["lengths"].tolist() == [first + 1, first + 1]
    assert out["tokens"].shape[1] == first + 1  # everything stopped: no wasted steps
    assert out["tokens"][0].tolist() == greedy[:first + 1]


def test_sampling_filters():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]]).repeat(2000, 1)
    tok, _ = sample_next(logits, temperature=1.0, top_k=2, generator=g)
    assert set(tok.tolist()) == {3, 4}
    p = torch.softmax(logits[0], -1)  # p4 = 0.636, p3 = 0.234: top_p 0.7 keeps {4, 3}, 0.5 keeps {4}
    assert set(sample_next(logits, 1.0, top_p=0.7, generator=g)[0].tolist()) == {3, 4}
    assert set(sample_next(logits, 1.0, top_p=0.5, generator=g)[0].tolist()) == {4}
    assert p[4] > 0.5
    # repetition penalty: a seen positive logit is divided, so 4.0 / 3 < 3.0 and greedy picks 3
    seen = torch.zeros(1, 5, dtype=torch.bool)
    seen[0, 4] = True
    tok, lp = sample_next(logits[:1], temperature=0, repetition_penalty=3.0, seen=seen)
    assert tok.item() == 3
    assert lp.item() == pytest.approx(math.log(p[3].item()), rel=1e-5)  # log-prob of the raw model
    # empirical frequencies follow softmax(logits / T)
    tok, _ = sample_next(torch.tensor([[0.0, math.log(3.0)]]).repeat(20000, 1), temperature=1.0, generator=g)
    assert tok.float().mean().item() == pytest.approx(0.75, abs=0.02)


def test_moe_equals_naive_per_token_loop():
    torch.manual_seed(0)
    cfg = small(n_experts=4, n_experts_per_tok=2, n_shared_experts=1, moe_ffn_hidden=16)
    moe = MoE(cfg, "torch")
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    moe.expert_bias.copy_(torch.tensor([0.0, 0.5, -0.5, 0.0]))  # bias changes selection, not weights
    x = torch.randn(2, 7, 32)
    out = moe(x)
    ref = torch.zeros_like(x)
    for b in range(2):
        for t in range(7):
            xt = x[b, t]
            probs = torch.softmax(moe.router.weight @ xt, -1)
            chosen = torch.topk(probs + moe.expert_bias, 2).indices
            w = probs[chosen] / probs[chosen].sum()
            for e, we in zip(chosen.tolist(), w):
                h = F.silu(moe.w_gate[e] @ xt) * (moe.w_up[e] @ xt)
                ref[b, t] += we * (moe.w_down[e] @ h)
            ref[b, t] += moe.shared(xt)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # Switch aux loss: E * sum_i f_i P_i
    flat = x.view(-1, 32)
    probs = torch.softmax(flat @ moe.router.weight.t(), -1)
    chosen = torch.topk(probs + moe.expert_bias, 2).indices
    f = torch.stack([(chosen == e).sum() for e in range(4)]).float() / (14 * 2)
    assert moe.aux_loss.item() == pytest.approx((4 * (f * probs.mean(0)).sum()).item(), rel=1e-5)


def test_moe_bias_update_moves_towards_balance():
    torch.manual_seed(0)
    m = Transformer(small(n_experts=4, moe_bias_update_rate=0.01))
    x = torch.randint(0, 97, (4, 16))
    m(x, x)
    moe = m.moe_layers()[0]
    load = moe.expert_load.clone()
    loads = m.update_moe_bias()
    expected = 0.01 * torch.sign(load.mean() - load)
    torch.testing.assert_close(moe.expert_bias, expected)
    torch.testing.assert_close(loads[0], load / load.sum())
    assert moe.expert_load.sum() == 0


def test_num_params_closed_form():
    # Qwen3-8B shapes (the check from the training notes): 8,190,427,136 without norm weights
    cfg = ModelConfig(vocab_size=151936, n_layer=36, n_head=32, n_kv_head=8, n_embd=4096, ffn_hidden=12288,
                      max_seq_len=16, tie_embeddings=False, kernels="torch")
    with torch.device("meta"):
        m = Transformer(cfg)
    norms = 36 * 2 * 4096 + 4096
    assert m.num_params() - norms == 8_190_427_136
    assert m.num_params(exclude_embeddings=True) - norms == 8_190_427_136 - 2 * 151936 * 4096
    # a small tied model by hand: embeddings once, q/k/v/o, SwiGLU, norms
    cfg = small(ffn_hidden=48)
    d, hd = 32, 8
    per_layer = d * 4 * hd + 2 * d * 2 * hd + 4 * hd * d + 3 * d * 48 + 2 * d
    assert Transformer(cfg).num_params() == 97 * d + 2 * per_layer + d
    # MoE: active counts top-k of the routed experts
    moe = small(n_experts=8, n_experts_per_tok=2, moe_ffn_hidden=16, first_k_dense=1)
    m = Transformer(moe)
    expert = 3 * d * 16
    assert m.num_params() - m.num_params(active_only=True) == 6 * expert
    # FLOPs by hand: 6 x every matmul weight one token passes through, + 12 * L * H * hd * T attention.
    # attention 3072 = q 32x32 + k, v 2 x 32x16 + o 32x32; dense MLP (ffn 128) 3 x 32x128; router 32x8;
    # two active experts 2 x 3 x 32x16; lm_head 97x32 (tied, but still a matmul)
    weights = 3072 + 3 * 32 * 128 + 3072 + 32 * 8 + 2 * 3 * 32 * 16 + 97 * 32
    assert m.flops_per_token(64) == 6 * weights + 12 * 2 * 4 * 8 * 64



def test_flops_of_packed_sequences_forward_only_and_lora_by_hand():
    from lora import apply_lora
    m = Transformer(small(ffn_hidden=48))
    attn, mlp, head = 32 * 32 + 2 * 32 * 16 + 32 * 32, 3 * 32 * 48, 97 * 32  # per layer; the tied head once
    W = 2 * (attn + mlp) + head
    A = 2 * 4 * 8  # n_layer * n_head * head_dim
    # two documents of 3 and 5 tokens: each attends over its own length (3^2 + 5^2), not over 8
    assert float(m.flops([3, 5], backward=False)) == 2 * W * 8 + 4 * A * (9 + 25)
    assert float(m.flops([3, 5])) == 6 * W * 8 + 12 * A * (9 + 25)
    assert float(m.flops([64])) == m.flops_per_token(64) * 64
    # LoRA on q and v (r=2): the base weights and the head are frozen, so their backward is the input gradient
    # only (2 instead of 4 per weight); the adapters, d x r + r x out per target, are trained
    apply_lora(m, targets=("q", "v"), r=2)
    lora = 2 * ((32 * 2 + 2 * 32) + (32 * 2 + 2 * 16))
    W_lora = W + lora
    assert float(m.flops([3, 5])) == pytest.approx((2 * W_lora + 4 * lora + 2 * W) * 8 + 12 * A * 34, rel=1e-12)
    assert float(m.flops([3, 5], frozen=False)) == 6 * W_lora * 8 + 12 * A * 34


def test_checkpoint_roundtrip_is_atomic(tmp_path):
    torch.manual_seed(0)
    m = Transformer(small(qk_norm=True, n_experts=2, n_experts_per_tok=1))
    path = str(tmp_path / "sub" / "ckpt.pt")
    save_checkpoint(path, checkpoint_dict(m, "default", step=7))
    assert os.listdir(tmp_path / "sub") == ["ckpt.pt"]  # no temp file left behind
    ck = load_checkpoint(path)  # weights_only=True
    assert ck["step"] == 7 and ck["tokenizer"] == "default"
    m2, _ = load_model(ck)
    x = torch.randint(0, 97, (2, 9))
    torch.testing.assert_close(m.eval()(x)[0], m2.eval()(x)[0])


def test_lr_schedules():
    assert lr_at(0, 100, 1.0, warmup_steps=10) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, warmup_steps=10) == pytest.approx(1.0)
    assert lr_at(55, 100, 1.0, warmup_steps=10, min_lr=0.1) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 2)))
    assert lr_at(100, 100, 1.0, warmup_steps=10, min_lr=0.1) == pytest.approx(0.1)
    assert lr_at(50, 100, 1.0, 0, 0.0, "wsd", decay_fraction=0.2) == 1.0
    assert lr_at(90, 100, 1.0, 0, 0.0, "wsd", decay_fraction=0.2) == pytest.approx(0.5)


def test_configurator_rejects_bad_keys_and_types(tmp_path):
    from configs import configure
    g = dict(n_layer=4, lr=1e-3, compile=False, out_dir="out", betas=(0.9, 0.95), ffn_hidden=None)
    configure(g, ["--n_layer=8", "--lr=1", "--out_dir=out/x", "--betas=(0.8,0.9)", "--ffn_hidden=128"])
    assert g["n_layer"] == 8 and g["lr"] == 1.0 and isinstance(g["lr"], float) and g["out_dir"] == "out/x"
    assert g["betas"] == (0.8, 0.9) and g["ffn_hidden"] == 128
    with pytest.raises(SystemExit, match="unknown key 'n_layr'.*Did you mean n_layer"):
        configure(g, ["--n_layr=3"])
    with pytest.raises(SystemExit, match="'n_layer' .* expects int"):
        configure(g, ["--n_layer=2.5"])
    with pytest.raises(SystemExit, match="expects bool"):
        configure(g, ["--compile=1"])
    cfg = tmp_path / "c.py"
    cfg.write_text("import math\nn_layer = 2\nlearning_rate = 0.1\n")
    with pytest.raises(SystemExit, match=r"unknown key 'learning_rate' \(in .*c.py\)"):
        configure(g, [str(cfg)])


FSDP_GENERATE = '''
import sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
from distributed import parallelize
from model import ModelConfig, Transformer
dist.init_process_group("gloo")
torch.manual_seed(0)
m = Transformer(ModelConfig(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, max_seq_len=64, kernels="torch"))
ref = m.generate([[1, 2, 3], [4, 5]], 8, temperature=0)["tokens"]
m = parallelize(m, "fsdp", torch.device("cpu"))
rank = dist.get_rank()
out = m.generate([[1, 2, 3], [4, 5]], 8 if rank == 0 else 3, temperature=0)["tokens"]  # ranks decode unequal steps
assert torch.equal(out, ref[:, :out.shape[1]]), (rank, out, ref)
x = torch.randint(0, 97, (2, 8))
_, loss = m(x, x)  # training forward still works after generation
loss.backward()
ok = torch.ones(1)
dist.all_reduce(ok)  # every rank got here
if rank == 0:
    print(f"ok on {int(ok.item())} ranks")
dist.barrier()  # leave together, or gloo may abort at exit ("terminate called without an active exception")
dist.destroy_process_group()
'''


def test_generate_under_fsdp_matches_unsharded(tmp_path):
    from conftest import ROOT, run_script
    script = tmp_path / "fsdp_generate.py"
    script.write_text(FSDP_GENERATE)
    out = run_script(["torchrun", "--standalone", "--nproc_per_node=2", str(script), ROOT], timeout=300)
    assert "ok on 2 ranks" in out
