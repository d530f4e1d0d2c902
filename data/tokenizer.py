"""
Byte-level BPE tokenizer: a small trainer in pure Python, and a thin wrapper around
tiktoken for fast encoding/decoding.

- train_bpe() learns tiktoken-style mergeable ranks (token bytes -> rank) from text.
- Tokenizer wraps a tiktoken.Encoding and adds our chat special tokens, or holds an HF
  model's tokenizer with the ids its chat template needs (data/hf_tokenizer.py).
- get_tokenizer(name) returns the bundled default tokenizer, one loaded from a
  .tiktoken file, one of OpenAI's named encodings (those need a download), or the
  tokenizer of a local HF model directory.

Train the bundled default (on the embedded stdlib corpus, see data/corpus.py):
$ python -m data.tokenizer --vocab_size=8192 --out=data/tokenizer/default.tiktoken
"""

import argparse
import base64
import functools
import heapq
import os
import time
import unicodedata
from collections import Counter, defaultdict

import regex  # the `re` module has no \p{L}/\p{N} classes; `regex` comes with tiktoken
import tiktoken

# GPT-4's (cl100k_base) pre-tokenisation pattern, except that numbers are split into
# single digits (\p{N} instead of \p{N}{1,3}+): a small vocab should not spend
# tokens on arbitrary 1-3 digit groups, and single digits make arithmetic regular.
GPT4_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
                r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")

# appended after the mergeable ranks, in this order. <|endoftext|> doubles as the
# BOS / document separator token.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

DEFAULT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tokenizer", "default.tiktoken")

# -----------------------------------------------------------------------------
# training


def train_bpe(texts, vocab_size, pattern=GPT4_PATTERN, verbose=False):
    """
    Train a byte-level BPE on an iterable of strings. Returns tiktoken-style
    mergeable ranks {token bytes: rank}: the 256 single bytes get ranks 0..255,
    then one rank per merge, until there are vocab_size - len(SPECIAL_TOKENS).

    Rules (a naive BPE following them gives identical ranks):
    - text is split into chunks by `pattern`; pairs never cross chunk boundaries
    - pairs are counted over all (overlapping) adjacent positions, weighted by
      how often the chunk occurs
    - the most frequent pair is merged; ties go to the smallest (left id, right id)
    - a merge is applied left to right, non-overlapping, in every chunk
    - if the merged bytes already are a token (two different pairs can spell the
      same bytes), the existing id is reused and no new rank is used up
    """
    n_ranks = vocab_size - len(SPECIAL_TOKENS)
    if n_ranks < 256:
        raise ValueError(f"vocab_size={vocab_size} is too small: byte-level BPE needs 256 byte tokens "
                         f"plus {len(SPECIAL_TOKENS)} special tokens, so at least {256 + len(SPECIAL_TOKENS)}")
    t0 = time.time()
    # pre-tokenise and count unique chunks: training cost then scales with the
    # number of distinct chunks, not with the size of the text
    compiled = regex.compile(pattern)
    chunk_counts = Counter()
    for text in texts:
        chunk_counts.update(compiled.findall(text))
    # single-byte chunks have no pairs and can never change, so drop them
    chunks = [list(c.encode("utf-8")) for c in chunk_counts]
    freqs = list(chunk_counts.values())
    keep = [i for i, ids in enumerate(chunks) if len(ids) > 1]
    chunks = [chunks[i] for i in keep]
    freqs = [freqs[i] for i in keep]
    if verbose:
        print(f"pre-tokenised into {len(chunks):,} distinct chunks in {time.time() - t0:.1f}s")

    # pair -> weighted count, and pair -> ids of chunks that contain (or once
    # contained) it. The index is only ever added to; a stale entry just costs
    # a quick scan of a chunk that turns out not to contain the pair any more.
    pair_counts = defaultdict(int)
    where = defaultdict(set)
    for i, ids in enumerate(chunks):
        f = freqs[i]
        for p in zip(ids, ids[1:]):
            pair_counts[p] += f
            where[p].add(i)
    # max-heap via negated counts; ties pop the smallest pair tuple. Entries go
    # stale when a count changes; we push the new count and skip stale ones on pop.
    heap = [(-c, p) for p, c in pair_counts.items()]
    heapq.heapify(heap)

    ranks = {bytes([i]): i for i in range(256)}
    id_to_bytes = [bytes([i]) for i in range(256)]
    n_steps = 0
    while len(ranks) < n_ranks:
        # pop the best pair whose heap entry is still current
        while heap:
            negc, pair = heapq.heappop(heap)
            if negc == -pair_counts.get(pair, 0) and negc < 0:
                break
        else:
            raise ValueError(f"the training text ran out of pairs to merge after {len(ranks)} tokens, "
                             f"before reaching vocab_size={vocab_size}; train on more text or lower vocab_size")
        a, b = pair
        new_bytes = id_to_bytes[a] + id_to_bytes[b]
        new_id = ranks.get(new_bytes)
        if new_id is None:
            new_id = len(ranks)
            ranks[new_bytes] = new_id
            id_to_bytes.append(new_bytes)
        # apply the merge to the affected chunks only, updating pair counts by
        # removing each such chunk's old pairs and adding its new ones
        changed = set()
        for i in where.pop(pair):
            ids = chunks[i]
            n = len(ids)
            new = []
            j = 0
            while j < n:
                if j < n - 1 and ids[j] == a and ids[j + 1] == b:
                    new.append(new_id)
                    j += 2
                else:
                    new.append(ids[j])
                    j += 1
            if len(new) == n:
                continue  # stale index entry
            f = freqs[i]
            for p in zip(ids, ids[1:]):
                pair_counts[p] -= f
                changed.add(p)
            for p in zip(new, new[1:]):
                pair_counts[p] += f
                changed.add(p)
                where[p].add(i)
            chunks[i] = new
        for p in changed:
            c = pair_counts[p]
            if c > 0:
                heapq.heappush(heap, (-c, p))
            else:
                del pair_counts[p]
        n_steps += 1
        if verbose and n_steps % 1000 == 0:
            print(f"merge {n_steps}: {len(ranks)} tokens, {time.time() - t0:.1f}s, "
                  f"last {new_bytes!r} (count {-negc})")
    return ranks


# -----------------------------------------------------------------------------
# rank files (tiktoken's format: base64(token bytes) SPACE rank, one per line)


def save_ranks(ranks, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(base64.b64encode(token).decode("ascii") + " " + str(rank) + "\n")
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written tokenizer


def load_ranks(path):
    """Read a .tiktoken rank file; checks that ranks are exactly 0..n-1."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer file {path!r} does not exist")
    ranks = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except Exception as e:
                raise ValueError(f"{path}:{lineno}: expected 'BASE64_TOKEN RANK', got {line[:80]!r}") from e
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks must be the distinct integers 0..{len(ranks) - 1} (one per token); "
                         f"the file has duplicate tokens, duplicate ranks or gaps")
    return ranks


# -----------------------------------------------------------------------------
# the tokenizer


class Tokenizer:
    """
    A tiktoken.Encoding (or data.hf_tokenizer.SentencePieceBPE, which has the same methods) plus the ids every
    stage needs, taken from the tokenizer and chat template of the checkpoint, never from ChatML names:

      end_of_turn_id  closes an assistant turn (ChatML <|im_end|>, Llama 3 <|eot_id|>, Mistral </s>): trained in
                      SFT; the position the reward model reads its score at
      stop_ids        generation stops on any of them: end_of_turn_id, then generation_config.json's eos list
      pad_id          fills batches; pad positions are never attended to or trained, so any id is safe. Families
                      without a pad token (Llama 3, Mistral) get a token the model never produces: Llama 3.1's
                      <|finetune_right_pad_id|>, a reserved special token, or <unk>
      bos_id          put before every pretraining document (None when the family has no BOS, e.g. Qwen)
      eot_id          the end-of-text token (<|endoftext|>, <|end_of_text|>, </s>). Pretraining's document
                      separator is bos_id, or eot_id where bos_id is None
      chat_template   the data.chat.ChatTemplate that data.chat.render / render_prompt use (None: the checkpoint
                      ships none, and rendering a conversation is refused)
      im_start_id, im_end_id  ChatML's tokens where the tokenizer has them (else None)

    The repo's own tokenizer (default, .tiktoken files, tiktoken names) has SPECIAL_TOKENS appended and renders
    ChatML with a leading <|endoftext|> (BOS): the ids above are <|endoftext|>, <|im_end|>, <|pad|>.
    """

    def __init__(self, name, enc, *, hf=None, chat_template=None, bos=None, eos=None, pad=None, unk=None):
        from data import chat
        self.name = name  # what get_tokenizer was given; stored in checkpoints
        self.enc = enc
        self.vocab_size = enc.n_vocab  # includes the special tokens
        self.hf = hf  # what export needs from an HF tokenizer (None for the repo's own)
        self.chat_template_error = None  # why an HF checkpoint's template was refused, if it was
        if hf is None:
            self.normalizer, self.in_text = None, frozenset()
            self.eot_id = self.token_id("<|endoftext|>")
            self.bos_id = self.eot_id
            self.im_start_id = self.token_id("<|im_start|>")
            self.im_end_id = self.token_id("<|im_end|>")
            self.pad_id = self.token_id("<|pad|>")
            self.unk_id = None
            self.end_of_turn_id = self.im_end_id
            self.stop_ids = (self.im_end_id, self.eot_id)
            self.chat_template = chat.CHATML if chat_template is None else chat_template
            return
        self.normalizer = hf.get("normalizer")
        # non-special added tokens (Qwen3's <think>) are matched in text like HF does; special ones never are
        self.in_text = frozenset(a["content"] for a in hf["added"] if not a["special"])
        specials = enc.special_tokens_set

        def first(*names):
            return next((self.token_id(n) for n in names if n is not None and n in specials), None)

        self.chat_template = chat_template
        self.bos_id = first(bos)
        self.unk_id = first(unk)
        eos_id = first(eos)
        self.eot_id = first("<|endoftext|>", "<|end_of_text|>", "</s>", eos)
        self.im_start_id = first("<|im_start|>")
        self.im_end_id = first("<|im_end|>")
        family_eot = chat_template.end_of_turn if chat_template is not None else None
        self.end_of_turn_id = first(family_eot, eos, "<|eot_id|>", "<|im_end|>", "</s>", "<|endoftext|>",
                                    "<|end_of_text|>")
        reserved = sorted((i, s) for s, i in enc._special_tokens.items() if "reserved" in s)
        self.pad_id = first(pad, "<|finetune_right_pad_id|>", reserved[0][1] if reserved else None, unk,
                            "<|endoftext|>", "<|end_of_text|>", eos)
        stops = [self.end_of_turn_id] + list(hf.get("gen_eos") or []) + ([] if hf.get("gen_eos") else [eos_id])
        self.stop_ids = tuple(dict.fromkeys(i for i in stops if i is not None))
        if self.end_of_turn_id is None:
            raise ValueError(f"{name}: the tokenizer has no end-of-turn token: no eos_token in tokenizer_config.json, "
                             f"no chat template naming one, and none of <|eot_id|>, <|im_end|>, </s>, <|endoftext|>")

    def encode(self, text):
        # special tokens typed by a user ("<|im_end|>") are plain text, never the special token, so user data
        # can't inject control tokens. An HF tokenizer's non-special added tokens are matched, as HF does.
        if self.normalizer:
            text = unicodedata.normalize(self.normalizer, text)
        if self.in_text:
            return self.enc.encode(text, allowed_special=self.in_text, disallowed_special=())
        return self.enc.encode_ordinary(text)

    def encode_run(self, text, at_start):
        """encode() of a piece of text that a chat template puts after other tokens (at_start=False): a
        SentencePiece-style tokenizer prepends its "▁" depending on where a text segment starts."""
        if isinstance(self.enc, tiktoken.Encoding):
            return self.encode(text)
        return self.enc.encode(text, allowed_special=self.in_text, at_start=at_start)

    def encode_batch(self, texts, num_threads=8):
        texts = list(texts)
        if self.normalizer:
            texts = [unicodedata.normalize(self.normalizer, t) for t in texts]
        if self.in_text:
            return self.enc.encode_batch(texts, num_threads=num_threads, allowed_special=self.in_text,
                                         disallowed_special=())
        return self.enc.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode(self, ids):
        """Text of token ids. An id beyond the tokenizer (a model's embedding is often padded past it, and an
        untrained model can sample those rows) decodes as U+FFFD rather than failing."""
        ids = list(ids)
        bad = [j for j, i in enumerate(ids) if i >= self.enc.n_vocab]
        if bad:  # decode the runs of valid ids between them, so multi-byte characters stay whole
            cuts = [-1] + bad + [len(ids)]
            return "\ufffd".join(self.enc.decode(ids[a + 1:b], errors="replace") for a, b in zip(cuts, cuts[1:]))
        return self.enc.decode(ids, errors="replace")

    def decode_reply(self, ids):
        """The text of a generated reply: its tokens up to the first stop token (which is not part of the text)."""
        ids = list(ids)
        end = next((i for i, t in enumerate(ids) if t in self.stop_ids), len(ids))
        return self.decode(ids[:end])

    def decode_bytes(self, ids):
        return self.enc.decode_bytes(list(ids))

    def decode_token(self, i):
        """One token as text (a special token's name)."""
        return self.enc.decode_single_token_bytes(i).decode("utf-8", errors="replace")

    def token_id(self, special):
        if special not in self.enc.special_tokens_set:
            raise KeyError(f"{special!r} is not a special token of tokenizer {self.name!r}; "
                           f"it has {sorted(self.enc.special_tokens_set)}")
        return self.enc.encode_single_token(special)

    def __repr__(self):
        t = self.chat_template.name if self.chat_template is not None else None
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, chat_template={t!r})"


def _from_ranks(name, ranks):
    n = max(ranks.values()) + 1
    specials = {s: n + i for i, s in enumerate(SPECIAL_TOKENS)}
    enc = tiktoken.Encoding(name, pat_str=GPT4_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    return Tokenizer(name, enc)


@functools.lru_cache(maxsize=None)
def get_tokenizer(name="default"):
    """
    a local HF model directory     -> its tokenizer.json / tokenizer.model, tokenizer_config.json (chat template,
                                      bos/eos/pad) and generation_config.json (stop ids): data/hf_tokenizer.py.
                                      Named by its absolute path, which is what checkpoints store
    "default"                      -> the bundled data/tokenizer/default.tiktoken
    path to a .tiktoken file       -> that file (trained with GPT4_PATTERN) + SPECIAL_TOKENS
    "gpt2", "cl100k_base", ...     -> tiktoken's named encoding + our chat specials
                                      (needs the encoding files: downloaded or cached)
    """
    name = str(name)
    if os.path.isdir(name) or os.path.basename(name) in ("tokenizer.json", "tokenizer.model"):
        from data.hf_tokenizer import load_hf_tokenizer
        return load_hf_tokenizer(name)
    if name == "default":
        if not os.path.isfile(DEFAULT_PATH):
            raise FileNotFoundError(f"the bundled tokenizer {DEFAULT_PATH} is missing; regenerate it with "
                                    f"`python -m data.tokenizer --vocab_size=8192 "
                                    f"--out={os.path.relpath(DEFAULT_PATH)}`")
        return _from_ranks(name, load_ranks(DEFAULT_PATH))
    if name.endswith(".tiktoken") or os.path.sep in name or os.path.isfile(name):
        return _from_ranks(name, load_ranks(name))
    if name not in tiktoken.list_encoding_names():
        raise ValueError(f"unknown tokenizer {name!r}: use 'default', a path to a .tiktoken file, "
                         f"or one of tiktoken's encodings {tiktoken.list_encoding_names()}")
    try:
        base = tiktoken.get_encoding(name)
    except Exception as e:
        raise RuntimeError(
            f"could not load tiktoken encoding {name!r}: its encoding files could not be fetched ({e}). "
            f"If this machine is offline, download them elsewhere and point TIKTOKEN_CACHE_DIR at them, "
            f"or use tokenizer 'default' or a path to a .tiktoken file, which work offline.") from e
    # keep the encoding's own <|endoftext|> (and other specials), add ours after n_vocab
    specials = dict(base._special_tokens)
    n = base.n_vocab
    for s in SPECIAL_TOKENS:
        if s not in specials:
            specials[s] = n
            n += 1
    enc = tiktoken.Encoding(name, pat_str=base._pat_str, mergeable_ranks=base._mergeable_ranks,
                            special_tokens=specials)
    return Tokenizer(name, enc)


# -----------------------------------------------------------------------------

if __name__ == "__main__":
    from data.corpus import embedded_documents

    parser = argparse.ArgumentParser(description="train a BPE tokenizer on the embedded stdlib corpus")
    parser.add_argument("--vocab_size", type=int, default=8192, help="total, including the special tokens")
    parser.add_argument("--out", type=str, default=os.path.relpath(DEFAULT_PATH))
    parser.add_argument("--max_bytes", type=int, default=8_000_000, help="how much corpus text to train on")
    args = parser.parse_args()

    docs = embedded_documents(max_bytes=args.max_bytes)
    # hold out every 20th document to measure compression on text not trained on
    train_docs = [d for i, d in enumerate(docs) if i % 20 != 0]
    held_docs = [d for i, d in enumerate(docs) if i % 20 == 0]
    n_bytes = sum(len(d.encode("utf-8")) for d in train_docs)
    print(f"training on {len(train_docs)} documents, {n_bytes / 1e6:.2f} MB")
    t0 = time.time()
    ranks = train_bpe(train_docs, args.vocab_size, verbose=True)
    dt = time.time() - t0
    save_ranks(ranks, args.out)
    print(f"trained vocab_size={args.vocab_size} in {dt:.1f}s, saved {args.out}")

    tok = _from_ranks(args.out, load_ranks(args.out))
    for split, ds in [("train", train_docs), ("held-out", held_docs)]:
        nb = sum(len(d.encode("utf-8")) for d in ds)
        nt = sum(len(ids) for ids in tok.encode_batch(ds))
        print(f"compression on {split}: {nb / nt:.3f} bytes/token ({nb:,} bytes, {nt:,} tokens)")
