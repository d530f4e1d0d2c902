"""
Generation: batched sampling with a KV cache, and the samplers.

generate(model, prompts, ...) left-pads a batch of prompts of any lengths (each row gets its own RoPE
positions), prefills the cache in one forward, then decodes one token per row per step with static shapes
(the whole cache buffer under a validity mask), which is what torch.compile / CUDA graphs need. It records
the log-prob of every sampled token under the raw model, which is what the RL stage's training forward
must reproduce. Transformer.generate(...) is this function.
"""

import torch
import torch.nn.functional as F

from distributed import fsdp_gathered


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


@torch.no_grad()
def generate(model, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
             repetition_penalty=1.0, stop_tokens=(), pad_id=0, generator=None, callback=None):
    """Batched sampling from a Transformer with a KV cache. prompts: a list of token-id lists (any lengths;
    they are left-padded, and each row gets its own positions) or a (B, P) tensor.
    temperature 0 is greedy. A row stops after emitting a token in stop_tokens; later slots are pad_id.
    Returns dict(tokens=(B, N) new tokens, lengths=(B,) new tokens per row incl. the stop token,
    logprobs=(B, N) log-prob of each sampled token under softmax(logits / temperature) of the raw
    model — before top-k/top-p/penalty — which is what a training forward at that temperature gives).
    callback(tokens): if given, called after every sampling step with the (B,) tensor of tokens just
    sampled (pad_id in rows already finished) — for streaming output (chat.py)."""
    with fsdp_gathered(model):  # a no-op unless FSDP2-sharded
        device = model.tok_emb.weight.device
        if torch.is_tensor(prompts):
            prompts = prompts.tolist()
        B, P = len(prompts), max(len(p) for p in prompts)
        assert min(len(p) for p in prompts) > 0, "every prompt needs at least one token"
        total = P + max_new_tokens
        if total > model.config.max_seq_len:
            raise ValueError(f"prompt ({P}) + max_new_tokens ({max_new_tokens}) exceeds "
                             f"max_seq_len={model.config.max_seq_len}")
        idx = torch.full((B, P), pad_id, dtype=torch.long, device=device)
        n_pad = torch.tensor([P - len(p) for p in prompts], device=device)
        for b, p in enumerate(prompts):
            idx[b, P - len(p):] = torch.tensor(p, device=device)
        cache = KVCache(model.config, B, total, device, model.tok_emb.weight.dtype if device.type == "cpu" else
                        (torch.bfloat16 if torch.is_autocast_enabled("cuda") else model.tok_emb.weight.dtype))
        cache.valid[:, :P] = torch.arange(P, device=device)[None] >= n_pad[:, None]
        positions = (torch.arange(P, device=device)[None] - n_pad[:, None]).clamp(min=0)
        stop = torch.tensor(list(stop_tokens) or [-1], device=device)
        seen = None
        if repetition_penalty != 1.0:
            seen = torch.zeros(B, model.config.vocab_size, dtype=torch.bool, device=device)
            seen.scatter_(1, idx, cache.valid[:, :P])
        out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
        logprobs = torch.zeros(B, max_new_tokens, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        lengths = torch.full((B,), max_new_tokens, dtype=torch.long, device=device)

        logits = model.forward_cached(idx, positions, cache, None)  # prefill
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
            logits = model.forward_cached(tok[:, None], pos[:, None], cache, slots[t])
        n = int(lengths.max()) if bool(done.all()) else out.shape[1]
        return dict(tokens=out[:, :n], lengths=lengths, logprobs=logprobs[:, :n])


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
        # the nucleus is the smallest prefix (by descending probability) whose mass reaches top_p: a token is
        # dropped once the tokens before it already hold top_p (>=, so a prefix that lands exactly on top_p stops
        # there). stable: equal probabilities keep the order of their ids, so the choice among ties is determined
        sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
        probs = sorted_logits.softmax(-1)
        remove = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    # inverse-CDF sampling, one uniform per row: exact, and ~30x faster than torch.multinomial on CPU
    cdf = logits.softmax(-1).double().cumsum(-1)
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]
    tok = torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=cdf.shape[-1] - 1)
    return tok, F.log_softmax(raw / temperature, -1).gather(1, tok[:, None]).squeeze(1)
