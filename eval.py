"""
Evaluation: any language-model checkpoint on held-out loss and bits per byte, the task family, and standard
benchmarks in lm-evaluation-harness's conventions, so the numbers compare with published ones.

$ python eval.py --ckpt=out/sft/ckpt.pt                   # val loss/bpb (embedded corpus) + task exact match, CPU
$ python eval.py --ckpt=out/gpt2_small/ckpt.pt --evals=val,arc_easy,arc_challenge,hellaswag,mmlu,gsm8k \
      --val_data=data/bin/fineweb-edu                     # the standard benchmarks (hub datasets)
$ python eval.py --evals=mmlu,gsm8k --bench_data=benchmarks/ --limit=100    # local files, a quick look
$ python eval.py --ckpt=out/grpo/ckpt.pt --evals=gsm8k_chat --system_prompt="..."   # a chat model, zero-shot
$ torchrun --standalone --nproc_per_node=8 eval.py --ckpt=... --evals=...   # each rank takes every 8th example

Evaluations (evals, comma-separated):
  val            next-token loss on non-overlapping windows of a token file (data/prepare.py's format: a
                 directory with val.bin, or a .bin file; "embedded" = data/bin/embedded) or of a text corpus
                 (.txt/.jsonl/.json/.parquet, text_field), and bits per byte = nats / ln 2 / UTF-8 bytes of the
                 text the target tokens decode to, which compares across tokenizers. Special tokens (the
                 document separator) are targets of the loss but not text: bpb leaves them out.
  tasks          greedy exact match on held-out questions of the task family (data.tasks.exact_match)
  arc_easy, arc_challenge, hellaswag, mmlu
                 multiple choice by log-likelihood: acc = argmax of the summed log-probs of the choices,
                 acc_norm = argmax of log-prob / characters of the choice (not for MMLU: acc only)
  gsm8k          lm-eval's `gsm8k`: 5-shot "Question: ...\nAnswer: ..." with the reference solutions, greedy
                 until "Question:"; exact match by its strict ("#### N") and flexible (last number) filters
  gsm8k_chat     zero-shot through the checkpoint's chat template (for chat models), the same filters
Prompts, few-shot examples and filters: data/benchmarks.py. Model output is parsed, never executed.

Log-likelihoods follow lm-eval's tokenisation: context + continuation is encoded whole and the continuation is
what follows the context's own encoding (a trailing space of the context moves to the continuation), so
" Paris" after "Answer:" is scored as the model would write it. Rows are right-padded and scored in batches
(batch_size rows per forward); choices whose model input is identical (MMLU's " A"/" B"/" C"/" D") share one
forward. Generation is batched with the KV cache. With bos=True every context starts with the tokenizer's BOS,
which this repo's models saw before every pretraining document (lm-eval adds whatever the HF tokenizer adds:
BOS for Llama, nothing for GPT-2 or Qwen; bos=False matches it on a tokenizer that adds nothing).

Under torchrun each rank evaluates examples[rank::world_size] and the counts are summed over ranks. Writes the
results (and, with log_examples, every example's choices or completion) as JSON to `out`, and the summary into
the report (report.py, stage `stage`). A benchmark whose data cannot be loaded stops the run before any work,
or with missing_ok=True is reported as unmeasured.
"""

import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

EVALS = ("val", "tasks", "arc_easy", "arc_challenge", "hellaswag", "mmlu", "gsm8k", "gsm8k_chat")

# -----------------------------------------------------------------------------
# pure functions (tests/test_eval.py checks them against hand computations, naive loops and lm-eval)


class Progress:
    """A progress line on stderr: done/total, rate and time left. Redrawn in place on a terminal; in a log
    file (CI) one line per 10%. Disabled on ranks other than 0."""

    def __init__(self, total, desc, enabled=True):
        self.total, self.desc, self.enabled = max(total, 1), desc, enabled
        self.n, self.t0, self.t_draw, self.next_tenth = 0, time.time(), 0.0, 1
        self.tty = sys.stderr.isatty()

    def update(self, n=1):
        self.n += n
        if not self.enabled:
            return
        now = time.time()
        tenth = self.n * 10 // self.total
        due = now - self.t_draw > 0.2 if self.tty else tenth >= self.next_tenth
        if due or self.n >= self.total:
            self.t_draw, self.next_tenth = now, tenth + 1
            rate = self.n / max(now - self.t0, 1e-9)
            left = (self.total - self.n) / max(rate, 1e-9)
            line = (f"{self.desc}: {self.n}/{self.total} ({self.n / self.total:.0%}) | {now - self.t0:.0f}s elapsed, "
                    f"{left:.0f}s left")
            sys.stderr.write(("\r" + line + " " * 8) if self.tty else line + "\n")
            sys.stderr.flush()

    def close(self):
        if self.enabled and self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


def encode_choices(tok, context, continuations, bos_id=None):
    """lm-eval's tokenisation of (context, continuation) pairs: trailing whitespace of the context moves to the
    continuation; context + continuation is encoded whole, and the continuation's ids are what follows the
    encoding of the context alone. bos_id, if not None, starts the context (an empty context is then [bos_id]).
    Returns (context ids, [continuation ids, ...])."""
    n_space = len(context) - len(context.rstrip())
    if n_space:
        context, continuations = context[:-n_space], [context[-n_space:] + c for c in continuations]
    prefix = [bos_id] if bos_id is not None else []
    if not context:
        if not prefix:
            raise ValueError("an empty context needs a BOS token to condition on: set bos=True")
        return prefix, [tok.encode(c) for c in continuations]
    ctx = tok.encode(context)
    return prefix + ctx, [tok.encode(context + c)[len(ctx):] for c in continuations]


@torch.no_grad()
def loglikelihoods(model, requests, batch_size=32, progress=None):
    """[(sum of log-probs of the continuation given the context, whether it is the greedy continuation)] for
    requests [(context ids, continuation ids)]. As lm-eval: context + continuation is left-truncated to
    max_seq_len + 1 tokens and the model reads all but the last. Requests with the same model input share a
    row; rows are sorted by length, right-padded (a causal model's real positions never see the padding) and run
    batch_size at a time; the head runs only at the positions that predict a continuation token."""
    max_len = model.config.max_seq_len
    device = next(model.parameters()).device
    cap = getattr(model.config, "logit_softcap", None)
    rows, where = {}, []  # model input -> row index; per request: (row, first position, continuation)
    for ctx, cont in requests:
        if not cont:
            raise ValueError("a continuation must have at least one token")
        if len(cont) > max_len:
            raise ValueError(f"a continuation of {len(cont)} tokens does not fit max_seq_len={max_len}")
        full = (list(ctx) + list(cont))[-(max_len + 1):]
        key = tuple(full[:-1])
        where.append((rows.setdefault(key, len(rows)), len(key) - len(cont), list(cont)))
    inputs = list(rows)
    users = [[] for _ in inputs]
    for i, (r, _, _) in enumerate(where):
        users[r].append(i)
    order = sorted(range(len(inputs)), key=lambda r: -len(inputs[r]))
    out = [None] * len(requests)
    for b in range(0, len(order), batch_size):
        batch = order[b:b + batch_size]
        x = torch.zeros(len(batch), len(inputs[batch[0]]), dtype=torch.long)
        for j, r in enumerate(batch):
            x[j, :len(inputs[r])] = torch.tensor(inputs[r])
        hidden, _ = model(x.to(device), return_hidden=True)
        sel_row, sel_pos, targets, owner = [], [], [], []
        for j, r in enumerate(batch):
            for i in users[r]:
                _, start, cont = where[i]
                sel_row += [j] * len(cont)
                sel_pos += range(start, start + len(cont))
                targets += cont
                owner += [i] * len(cont)
        with torch.autocast(device.type, enabled=False):  # the head in fp32: few positions, exact scores
            logits = F.linear(hidden[sel_row, sel_pos].float(), model.lm_head.weight.float())
        if cap:
            logits = cap * torch.tanh(logits / cap)
        logp = F.log_softmax(logits, dim=-1)
        tgt = torch.tensor(targets, device=logp.device)
        lp = logp.gather(1, tgt[:, None]).squeeze(1).double().tolist()
        greedy = (logp.argmax(-1) == tgt).tolist()
        for i, v, g in zip(owner, lp, greedy):
            s, all_greedy = out[i] or (0.0, True)
            out[i] = (s + v, all_greedy and g)
        if progress is not None:
            progress.update(sum(len(users[r]) for r in batch))
    return out


def score_multiple_choice(model, tok, prompts, choices, bos=True, batch_size=32, progress=None):
    """Per document (context, continuations) and its choice texts -> dict(lls, pred, pred_norm): the
    log-likelihood of each continuation, its argmax (acc) and the argmax of log-likelihood / characters of the
    choice text (acc_norm, lm-eval's normalisation). Ties go to the first choice, as numpy's argmax."""
    bos_id = tok.bos_id if bos else None
    requests, spans = [], []
    for ctx, conts in prompts:
        ctx_ids, cont_ids = encode_choices(tok, ctx, conts, bos_id)
        spans.append((len(requests), len(conts)))
        requests += [(ctx_ids, c) for c in cont_ids]
    lls = [ll for ll, _ in loglikelihoods(model, requests, batch_size, progress)]
    out = []
    for (start, n), texts in zip(spans, choices):
        doc_lls = lls[start:start + n]
        normed = [ll / len(t) for ll, t in zip(doc_lls, texts)]
        out.append(dict(lls=doc_lls, pred=max(range(n), key=doc_lls.__getitem__),
                        pred_norm=max(range(n), key=normed.__getitem__)))
    return out


class _AllStopped(Exception):
    """Raised from generate()'s callback once every row of the batch has hit a stop string."""


@torch.no_grad()
def generate_until(model, tok, prompts, max_new_tokens, stop_strings=(), stop_ids=(), batch_size=32, progress=None):
    """Greedy completion of each token-id prompt, as text: up to (not including) the first of stop_strings; a row
    also stops at any token of stop_ids (not part of the text; other special tokens are dropped from it, as HF's
    decode(skip_special_tokens=True)). As lm-eval, a prompt is left-truncated to max_seq_len - max_new_tokens.
    Batched and KV-cached (generation.generate); a batch stops as soon as every row has hit a stop."""
    max_len = model.config.max_seq_len
    if max_new_tokens >= max_len:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in max_seq_len={max_len}")
    keep = max_len - max_new_tokens
    stop_ids = tuple(stop_ids)
    specials = {tok.enc.encode_single_token(s) for s in tok.enc.special_tokens_set}
    stops = [s.encode("utf-8") for s in stop_strings]
    tail_len = max((len(s) for s in stops), default=1) - 1
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # like lengths together: less padding
    texts = [None] * len(prompts)
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        ids, tails, done = [[] for _ in idx], [b""] * len(idx), [False] * len(idx)

        def on_token(t):
            for r, x in enumerate(t.tolist()):
                if done[r]:
                    continue
                if x in stop_ids:
                    done[r] = True
                    continue
                ids[r].append(x)
                if x in specials:  # not text (dropped from it below): cannot be part of a stop string
                    continue
                window = tails[r] + tok.decode_bytes([x])
                done[r] = any(s in window for s in stops)
                tails[r] = window[-tail_len:] if tail_len else b""
            if all(done):
                raise _AllStopped

        try:
            model.generate([list(prompts[i])[-keep:] for i in idx], max_new_tokens, temperature=0.0,
                           stop_tokens=stop_ids, pad_id=tok.pad_id, callback=on_token)
        except _AllStopped:
            pass
        for i, row in zip(idx, ids):
            text = tok.decode([t for t in row if t not in specials])
            for s in stop_strings:
                text = text.split(s)[0]
            texts[i] = text
        if progress is not None:
            progress.update(len(idx))
    return texts


def token_byte_lengths(tok, n):
    """UTF-8 bytes of the text of each token id < n: 0 for special tokens and ids the tokenizer lacks
    (the embedding's padding rows)."""
    specials = {tok.enc.encode_single_token(s) for s in tok.enc.special_tokens_set}
    lengths = []
    for i in range(n):
        try:
            lengths.append(0 if i in specials else len(tok.decode_bytes([i])))
        except (KeyError, ValueError):
            lengths.append(0)
    return torch.tensor(lengths, dtype=torch.long)


@torch.no_grad()
def loss_and_bpb(model, tokens, seq_len, token_bytes, batch_size=32, rank=0, world_size=1, progress=None):
    """Next-token loss over the non-overlapping windows of seq_len + 1 tokens of a 1-D token array (window i
    starts at i * seq_len, as pretrain.py's validation), per target token; and bits per byte: the nats of the
    targets that are text (token_bytes > 0) / ln 2 / their UTF-8 bytes. Each rank takes windows[rank::world_size];
    the sums are all-reduced. Returns dict(loss, bpb, tokens, bytes)."""
    device = next(model.parameters()).device
    token_bytes = token_bytes.to(device)
    n_windows = (len(tokens) - 1) // seq_len
    if n_windows < 1:
        raise ValueError(f"{len(tokens)} tokens are fewer than one window of seq_len + 1 = {seq_len + 1}")
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # nats, targets, nats of text targets, bytes
    mine = list(range(rank, n_windows, world_size))
    for i in range(0, len(mine), batch_size):
        x = torch.stack([torch.from_numpy(np.asarray(tokens[w * seq_len:w * seq_len + seq_len + 1], dtype=np.int64))
                         for w in mine[i:i + batch_size]]).to(device)
        _, nll = model(x[:, :-1], x[:, 1:], reduction="none")
        nbytes = token_bytes[x[:, 1:]]
        sums += torch.stack([nll.double().sum(), torch.tensor(float(nll.numel()), device=device),
                             (nll.double() * (nbytes > 0)).sum(), nbytes.double().sum()])
        if progress is not None:
            progress.update(x.shape[0])
    if world_size > 1:
        dist.all_reduce(sums)
    nats, n, text_nats, n_bytes = sums.tolist()
    return dict(loss=nats / n, bpb=text_nats / math.log(2) / max(n_bytes, 1), tokens=int(n), bytes=int(n_bytes))


def gather(rows, world_size):
    """Under torchrun: every rank's list, concatenated (rank 0's first); else rows."""
    if world_size == 1:
        return rows
    parts = [None] * world_size
    dist.all_gather_object(parts, rows)
    return [r for p in parts for r in p]


def summed(values, device, world_size):
    """Sum a list of floats over ranks."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world_size > 1:
        dist.all_reduce(t)
    return t.tolist()


# -----------------------------------------------------------------------------
# config
ckpt = "out/grpo/ckpt.pt"   # a checkpoint file, a directory holding ckpt.pt (or an HF model directory, once
                            # checkpoint.load_model reads them)
evals = "val,tasks"         # comma-separated from: val, tasks, arc_easy, arc_challenge, hellaswag, mmlu, gsm8k,
                            # gsm8k_chat
# val: held-out loss and bits per byte
val_data = "embedded"       # "embedded" | a data/prepare.py directory (val.bin) or .bin file | text files
val_tokens = 1048576        # score at most this many tokens (-1: all)
seq_len = 0                 # window length (0: the model's max_seq_len)
text_field = "text"         # text corpus: the field holding each document
# tasks: the task family
tasks_size = 500            # held-out questions (the first of data.tasks' test split, seed 0)
tasks_max_new_tokens = 32
# benchmarks
bench_data = ""             # "" = the hub datasets (via `datasets`); else a directory of local files in the
                            # hub schema: {bench_data}/{name}/{split}.jsonl (data/benchmarks.py)
missing_ok = False          # a benchmark whose data cannot be loaded is reported unmeasured instead of stopping
limit = -1                  # at most this many documents per benchmark (MMLU: per subject); -1 = all
num_fewshot = -1            # -1: each benchmark's default (ARC/HellaSwag 0, MMLU 5, GSM8K 5)
bos = True                  # start every context with the tokenizer's BOS (see above)
max_new_tokens = 256        # GSM8K generation budget (lm-eval's max_gen_toks)
system_prompt = ""          # gsm8k_chat: a system message before the question ("" = none)
batch_size = 32             # rows per forward (val, multiple choice) and per generate call
# output
out = ""                    # results JSON ("" = out/eval/{stage}.json)
log_examples = True         # keep every example's choices / completion in the results JSON
report_dir = "out/report"   # the report this evaluation's summary goes into ("" = none)
stage = "eval"              # its name there (e.g. eval_base, eval_sft to evaluate several checkpoints)
# system
device = "auto"             # auto | cpu | cuda
kernels = "auto"            # auto | triton | torch
_choices = dict(device=("auto", "cpu", "cuda"), kernels=("auto", "triton", "torch"))
_ranges = dict(val_tokens="[1, inf) or -1", seq_len="[1, inf) or 0", tasks_size="[1, inf)",
               tasks_max_new_tokens="[1, inf)", limit="[1, inf) or -1", num_fewshot="[0, inf) or -1",
               max_new_tokens="[1, inf)", batch_size="[1, inf)")

if __name__ == "__main__":
    from configs import configure
    config = configure(globals())
    wanted = [e.strip() for e in evals.split(",") if e.strip()]
    unknown = [e for e in wanted if e not in EVALS]
    if unknown or not wanted:
        raise SystemExit(f"config error: evals={evals!r}: unknown {unknown}; choose from {', '.join(EVALS)}")
    from distributed import setup_distributed, teardown_distributed
    ddp, rank, world_size, device, autocast = setup_distributed(device)
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    t0 = time.time()

    from checkpoint import load_model
    from data import benchmarks, tasks
    from data.chat import BadRecord, render_prompt
    from data.records import DataError
    from data.tokenizer import get_tokenizer
    from lora import lora_modules, merge_lora

    # -----------------------------------------------------------------------------
    # model and tokenizer
    try:
        model, ckpt_meta = load_model(ckpt, "cpu", kernels=kernels)
    except FileNotFoundError as e:
        raise SystemExit(f"eval: {e}. Pass --ckpt=PATH (a checkpoint file or a directory holding ckpt.pt).")
    except ValueError as e:  # e.g. a reward model
        raise SystemExit(f"eval: {e}")
    if lora_modules(model):
        merge_lora(model)  # an adapter checkpoint: evaluate the merged model (the same function, faster)
    model.to(device).eval()
    tok = get_tokenizer(ckpt_meta["tokenizer"])
    cfg = model.config
    chat_evals = [e for e in wanted if e in ("tasks", "gsm8k_chat")]
    if chat_evals and getattr(tok, "chat_template", "ChatML") is None:  # they prompt through the chat template
        raise SystemExit(f"eval: {', '.join(chat_evals)} need a chat template, and "
                         f"{getattr(tok, 'chat_template_error', None) or f'tokenizer {tok.name} has none'}")
    log(f"eval {ckpt}: {model.num_params() / 1e6:.2f}M params, tokenizer {tok.name}, max_seq_len {cfg.max_seq_len}, "
        f"device {device} x {world_size} | {', '.join(wanted)}")

    # -----------------------------------------------------------------------------
    # data: everything is loaded (rank 0, then shared) before any evaluation runs, so a missing file stops
    # the run at once rather than after an hour of MMLU
    def load_all():
        data, unmeasured, hub_down = {}, {}, None
        if "val" in wanted:
            from data.prepare import load_tokens, prepare, read_header
            source = os.path.join("data", "bin", "embedded") if val_data == "embedded" else val_data
            if val_data == "embedded" and not os.path.exists(os.path.join(source, "val.bin")):
                prepare("embedded", source, tokenizer=tok.name, val_fraction=0.02)  # what pretrain.py makes
            path = os.path.join(source, "val.bin") if os.path.isdir(source) and \
                os.path.exists(os.path.join(source, "val.bin")) else source
            n_max = None if val_tokens < 0 else val_tokens + 1
            if path.endswith(".bin"):
                meta = os.path.join(os.path.dirname(path), "meta.json")
                made_with = json.load(open(meta)).get("tokenizer") if os.path.exists(meta) else None
                if made_with is not None and made_with != tok.name:
                    raise DataError(f"{path} was tokenised with {made_with!r}, the checkpoint uses {tok.name!r}: "
                                    f"pass the text corpus as --val_data (bpb compares across tokenizers), or "
                                    f"prepare it with --tokenizer={tok.name}")
                if read_header(path)[1] > cfg.vocab_size:
                    raise DataError(f"{path} has token ids up to vocab size {read_header(path)[1]}, more than the "
                                    f"model's {cfg.vocab_size}: it was made with another tokenizer")
                tokens = np.asarray(load_tokens(path)[:n_max])
            else:  # a text corpus: each document preceded by the separator, as data/prepare.py writes them
                from data.records import iter_records, local_files, read_records
                if local_files(source) is None:
                    raise DataError(f"val_data {source!r} is neither a token file/directory nor local text files")
                sep = tok.bos_id if tok.bos_id is not None else tok.eot_id
                ids = []

                def text_of(rec):
                    if not isinstance(rec, dict) or not isinstance(rec.get(text_field), str):
                        raise BadRecord(f"no string field {text_field!r} (set --text_field)")
                    return rec[text_field]
                for text in read_records(iter_records(source), text_of):
                    ids += [sep] + tok.encode(text)
                    if n_max is not None and len(ids) >= n_max:
                        break
                tokens = np.asarray(ids[:n_max], dtype=np.int64)
            data["val"] = dict(tokens=tokens, source=path)
        if "tasks" in wanted:
            data["tasks"] = tasks.generate(tasks_size, "test", seed=0)
        for name in [e for e in wanted if e in benchmarks.BENCHMARKS]:
            if hub_down and not bench_data:
                unmeasured[name] = f"not loaded: the hub was unreachable for {hub_down}"
                log(f"{name}: unmeasured ({unmeasured[name]})")
                continue
            try:
                data[name] = benchmarks.load_benchmark(name, bench_data, None if num_fewshot < 0 else num_fewshot,
                                                       None if limit < 0 else limit)
            except (DataError, FileNotFoundError) as e:
                if not missing_ok:
                    raise
                unmeasured[name] = f"data not loadable: {str(e).splitlines()[0][:300]}"
                if isinstance(e.__cause__, ConnectionError):  # offline: the other hub datasets would fail too
                    hub_down = hub_down or name
                log(f"{name}: unmeasured ({unmeasured[name]})")
        return data, unmeasured

    err, payload = None, None
    if master:
        try:
            payload = load_all()
        except (BadRecord, DataError, FileNotFoundError, ValueError) as e:
            err = f"eval: {e}"
    if ddp:
        box = [err, payload]
        dist.broadcast_object_list(box, src=0)
        err, payload = box
    if err is not None:
        teardown_distributed(ddp)
        raise SystemExit(err + ("\n(missing_ok=True reports benchmarks whose data cannot be loaded as unmeasured)"
                                if "could not open dataset" in err else ""))
    data, unmeasured = payload

    # -----------------------------------------------------------------------------
    # the evaluations
    results = {name: dict(unmeasured=why) for name, why in unmeasured.items()}
    examples = {}
    stop_chat = getattr(tok, "stop_ids", None) or tuple(i for i in (tok.im_end_id, tok.eot_id) if i is not None)
    with autocast:
        if "val" in data:
            L = seq_len or cfg.max_seq_len
            tokens = data["val"]["tokens"]
            bar = Progress((len(tokens) - 1) // L // world_size, "val windows", master)
            r = loss_and_bpb(model, tokens, L, token_byte_lengths(tok, cfg.vocab_size), batch_size, rank,
                             world_size, bar)
            bar.close()
            results["val"] = dict(**r, seq_len=L, source=data["val"]["source"])
            log(f"val: loss {r['loss']:.4f} | bpb {r['bpb']:.4f} | {r['tokens']:,} tokens, {r['bytes']:,} bytes "
                f"({data['val']['source']})")
        if "tasks" in data:
            acc, per_task = tasks.exact_match(model, tok, data["tasks"], tasks_max_new_tokens, batch_size=batch_size,
                                              rank=rank, world_size=world_size)
            results["tasks"] = dict(accuracy=acc, per_task=per_task, n=len(data["tasks"]))
            log(f"tasks: exact match {acc:.1%} (" + " ".join(f"{t} {a:.0%}" for t, a in per_task.items()) + ")")

        for name in [e for e in wanted if e in benchmarks.MULTIPLE_CHOICE and e in data]:
            d = data[name]
            prompts = benchmarks.multiple_choice_prompts(name, d["docs"], d["pool"], d["k"])
            idx = list(range(rank, len(d["docs"]), world_size))
            bar = Progress(sum(len(prompts[i][1]) for i in idx), f"{name} choices", master)
            scored = score_multiple_choice(model, tok, [prompts[i] for i in idx],
                                           [d["docs"][i]["choices"] for i in idx], bos, batch_size, bar)
            bar.close()
            rows = [dict(index=i, gold=d["docs"][i]["gold"], **s,
                         **({"subject": d["docs"][i]["subject"]} if name == "mmlu" else {}))
                    for i, s in zip(idx, scored)]
            acc, acc_norm, n = summed([sum(r["pred"] == r["gold"] for r in rows),
                                       sum(r["pred_norm"] == r["gold"] for r in rows), len(rows)], device, world_size)
            rows = sorted(gather(rows, world_size), key=lambda r: r["index"])
            res = dict(acc=acc / n, n=int(n), num_fewshot=d["k"])
            if name == "mmlu":  # lm-eval's mmlu: the mean over all questions (weight_by_size)
                subjects = sorted({r["subject"] for r in rows})
                res["per_subject"] = {s: float(np.mean([r["pred"] == r["gold"] for r in rows if r["subject"] == s]))
                                      for s in subjects}
            else:
                res["acc_norm"] = acc_norm / n
            results[name] = res
            examples[name] = rows
            log(f"{name}: acc {res['acc']:.4f}" + (f" | acc_norm {res['acc_norm']:.4f}" if "acc_norm" in res else "")
                + f" | {int(n)} documents, {d['k']}-shot")

        for name in [e for e in wanted if e in ("gsm8k", "gsm8k_chat") and e in data]:
            d = data[name]
            idx = list(range(rank, len(d["docs"]), world_size))
            if name == "gsm8k":
                texts = benchmarks.gsm8k_prompts(d["docs"], d["pool"], d["k"])
                prefix = [tok.bos_id] if bos and tok.bos_id is not None else []
                prompts = [prefix + tok.encode(texts[i]) for i in idx]
                stop_strings, stop_ids = benchmarks.GSM8K_STOP, tuple({tok.eot_id, *stop_chat} - {None})
            else:
                prompts = [render_prompt(benchmarks.gsm8k_chat_messages(d["docs"][i], system_prompt), tok) for i in idx]
                stop_strings, stop_ids = (), stop_chat
            bar = Progress(len(idx), f"{name} generations", master)
            try:
                completions = generate_until(model, tok, prompts, max_new_tokens, stop_strings, stop_ids, batch_size,
                                             bar)
            except ValueError as e:
                raise SystemExit(f"eval: {name}: {e}; lower --max_new_tokens")
            bar.close()
            rows = []
            for i, c in zip(idx, completions):
                rows.append(dict(index=i, completion=c, **benchmarks.gsm8k_score(c, d["docs"][i]["answer"])))
            strict, flexible, n = summed([sum(r["strict"] for r in rows), sum(r["flexible"] for r in rows), len(rows)],
                                         device, world_size)
            results[name] = dict(exact_match_strict=strict / n, exact_match_flexible=flexible / n, n=int(n),
                                 num_fewshot=d["k"])
            examples[name] = sorted(gather(rows, world_size), key=lambda r: r["index"])
            log(f"{name}: exact match strict {strict / n:.4f} | flexible {flexible / n:.4f} | {int(n)} questions, "
                f"{d['k']}-shot")

    # -----------------------------------------------------------------------------
    # results JSON and the report
    wall = time.time() - t0
    if master:
        from report import run_setup, write_summary
        setup = run_setup(device, world_size)
        out_path = out or os.path.join("out", "eval", f"{stage}.json")
        doc = dict(ckpt=ckpt, tokenizer=tok.name, params=model.num_params(), setup=setup, config=config,
                   wall_time=wall, results=results, **({"examples": examples} if log_examples else {}))
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        with open(out_path + ".tmp", "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(out_path + ".tmp", out_path)
        log(f"wrote {out_path}")
        if report_dir:
            headline = {}
            for name in wanted:
                r = results.get(name, {})
                if "unmeasured" in r:
                    headline[f"{name}"] = "unmeasured"
                    continue
                for k in ("loss", "bpb", "accuracy", "acc", "acc_norm", "exact_match_strict", "exact_match_flexible"):
                    if k in r:
                        headline[f"{name} {k}"] = r[k]
            path = write_summary(report_dir, stage, dict(setup=setup, ckpt=ckpt, params=model.num_params(),
                                                         wall_time=wall, after=headline, results=out_path))
            log(f"report: {path}")
    log(f"done in {wall:.0f}s")
    teardown_distributed(ddp)
