"""
Hugging Face tokenizers in and out, with neither `tokenizers` nor `transformers` (they are test-time references).

In:  load_hf_tokenizer(dir) reads a local HF model directory and returns a data.tokenizer.Tokenizer:
  - tokenizer.json with a byte-level BPE (GPT-2's byte<->unicode map; Qwen2/2.5/3, Llama 3, GPT-2 style
    pre-tokenizers) becomes a tiktoken Encoding: ranks = token ids, the pre-tokenizer's regex as tiktoken's
    pattern, added tokens as tiktoken specials, an NFC normalizer applied before encoding.
  - Llama 3's tiktoken-format tokenizer.model (base64 token, rank per line) is a tiktoken rank file already.
  - a SentencePiece-style BPE in tokenizer.json (Mistral/Mixtral, Llama 2: "▁" for spaces, <0xXX> byte
    fallback) is a different algorithm a tiktoken Encoding cannot hold (its units are characters, not bytes,
    and the prepended "▁" depends on where a text segment starts): SentencePieceBPE below encodes it exactly
    like `tokenizers`, in pure Python (slower than tiktoken; fine for chat data, slow for pretraining corpora).
  Anything else (other model types, normalizers, pre-tokenizers, flags) is refused with the field named.
  tokenizer_config.json gives bos/eos/pad and the chat template, generation_config.json the stop ids.

Out: save_hf_tokenizer(tok, out_dir) writes tokenizer.json + tokenizer_config.json (with the chat template as
  jinja) that `tokenizers` / transformers load and that encode exactly like tok.

Why tiktoken's BPE equals HF's BPE here: tiktoken merges, at each step, the adjacent pair whose concatenation has
the lowest rank; HF's BPE merges the adjacent pair with the lowest merge index, only for pairs in its merge list.
With rank = token id the two agree when (checked at load, refused otherwise) the merge list is in token-id order
and, for every token, the pair tiktoken builds it from (its BPE on the token's own bytes, stopped before the
token's rank: the only pair it ever uses for that token) is a listed merge; a token that BPE cannot build from its
own bytes, which tiktoken emits only for a piece that is exactly it, needs HF's ignore_merges=true, which does the
same. BPEs trained with `tokenizers`, and files made from tiktoken rank files (as Qwen's and Llama 3's were:
transformers' converter lists every split of every token) satisfy it; the tests check the encodings on unicode,
code, digits and whitespace against `tokenizers` for both kinds (the real models' files are not downloaded).

How our encode() differs from HF's tokenizer(text): special added tokens ("<|im_end|>", "<|eot_id|>", "[INST]")
typed in the text are plain text, never control tokens, so user data cannot inject them (HF matches them; with
`tokenizer.encode_special_tokens = True` it matches us). Non-special added tokens (Qwen3's "<think>", "<tool_call>")
are matched in text like HF does: the model was trained to see them as one token. No BOS or other post-processor
tokens are added (the chat template and pretraining add BOS explicitly).
"""

import base64
import heapq
import json
import os

import regex
import tiktoken

# GPT-2's ByteLevel pre-tokenizer regex (tokenizers' ByteLevel with use_regex=true)
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Llama 3's (meta-llama/llama-models tokenizer.py); the HF tokenizer.json holds the same one
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                  r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
# Llama 3.1's special tokens after the 128000 ranks, for a tokenizer.model without a tokenizer_config.json
LLAMA3_SPECIALS = (["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
                   + [f"<|reserved_special_token_{i}|>" for i in range(3, 248)])
# one character of each kind a pre-tokenizer regex must cover (tiktoken silently drops unmatched text)
PROBE_TEXT = "Hello, world! It's 3.14 x_y+=1;\t\n\r\n  \u00a0é日本語 \U0001F600 \u0301\u200d\ufeff\x00\x7f ١٢ ⅷ  \n"


def bytes_to_unicode():
    """GPT-2's map from the 256 byte values to printable unicode characters (the byte-level vocab alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


BYTE_TO_UNICODE = bytes_to_unicode()
UNICODE_TO_BYTE = {c: b for b, c in BYTE_TO_UNICODE.items()}


def _refuse(where, msg):
    raise ValueError(f"{where}: {msg}")


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-download or re-export the file") from None


def _merge_pairs(merges, where):
    """tokenizers writes merges as [a, b] pairs (>= 0.20) or as "a b" strings (older)."""
    out = []
    for k, m in enumerate(merges):
        if isinstance(m, str):
            parts = m.split(" ")
        else:
            parts = list(m)
        if len(parts) != 2:
            _refuse(where, f"model.merges[{k}] = {m!r} is not a pair of tokens")
        out.append((parts[0], parts[1]))
    return out


def _added_tokens(tj, where):
    """The added_tokens list of a tokenizer.json, checked for flags our encoding does not reproduce."""
    added = []
    for a in tj.get("added_tokens") or []:
        for flag in ("lstrip", "rstrip", "single_word"):
            if a.get(flag):
                _refuse(where, f"added token {a['content']!r} (id {a['id']}) has {flag}=true: HF then also strips or "
                               f"requires whitespace around it when it appears in text, which this repo does not "
                               f"reproduce; set it to false in tokenizer.json if the model does not rely on it")
        added.append({"id": int(a["id"]), "content": a["content"], "special": bool(a.get("special", False))})
    ids = [a["id"] for a in added]
    if len(set(ids)) != len(ids):
        _refuse(where, "added_tokens has two tokens with the same id")
    return added


def _check_model(model, where, byte_fallback):
    if model.get("type") != "BPE":
        _refuse(where, f"model.type is {model.get('type')!r}: only BPE models (byte-level, or SentencePiece-style "
                       f"with byte fallback) are supported; WordPiece/Unigram/WordLevel tokenizers are refused")
    if model.get("dropout") not in (None, 0, 0.0):
        _refuse(where, f"model.dropout is {model['dropout']}: BPE dropout makes encoding random; set it to null")
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key) not in (None, ""):
            _refuse(where, f"model.{key} is {model[key]!r}: only BPEs without subword prefixes/suffixes are supported")
    if bool(model.get("byte_fallback", False)) != byte_fallback:
        _refuse(where, f"model.byte_fallback is {model.get('byte_fallback')}: a byte-level BPE has no byte fallback, "
                       f"a SentencePiece-style BPE (\u2581 for spaces) must have it")


# -----------------------------------------------------------------------------
# byte-level BPE -> tiktoken


def _byte_level_pattern(pre, where):
    """The one regex of a byte-level pre-tokenizer: Split(Regex, Isolated) + ByteLevel(use_regex=false),
    or ByteLevel(use_regex=true) alone (GPT-2's regex)."""
    if pre is None:
        _refuse(where, "pre_tokenizer is null; a byte-level BPE needs a ByteLevel pre-tokenizer")
    steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    pattern, byte_level = None, False
    for s in steps:
        kind = s.get("type")
        if kind == "Split" and not byte_level:
            if pattern is not None:
                _refuse(where, "pre_tokenizer has two Split steps; tiktoken holds one regex")
            if "Regex" not in s.get("pattern", {}):
                _refuse(where, f"pre_tokenizer Split pattern {s.get('pattern')!r} is a plain string, not a Regex")
            if s.get("behavior") != "Isolated" or s.get("invert"):
                _refuse(where, f"pre_tokenizer Split has behavior={s.get('behavior')!r} invert={s.get('invert')}; "
                               f"only behavior 'Isolated' with invert false (each regex match is a piece) is supported")
            pattern = s["pattern"]["Regex"]
        elif kind == "ByteLevel" and not byte_level:
            if s.get("add_prefix_space"):
                _refuse(where, "pre_tokenizer ByteLevel has add_prefix_space=true, which is not supported")
            if s.get("use_regex", True):
                if pattern is not None:
                    _refuse(where, "pre_tokenizer has a Split regex and a ByteLevel with use_regex=true (two regexes); "
                                   "tiktoken holds one")
                pattern = GPT2_PATTERN
            byte_level = True
        else:
            _refuse(where, f"pre_tokenizer step {kind!r} is not supported (supported: Split(Regex, Isolated) followed "
                           f"by ByteLevel, or ByteLevel alone)")
    if not byte_level:
        _refuse(where, "pre_tokenizer has no ByteLevel step")
    # tiktoken keeps only regex matches: text the pattern does not match would silently vanish
    covered = "".join(regex.findall(pattern, PROBE_TEXT))
    if covered != PROBE_TEXT:
        _refuse(where, f"the pre_tokenizer regex {pattern!r} does not match every character (it skips some of "
                       f"{PROBE_TEXT!r}); HF keeps unmatched text as pieces, tiktoken would drop it")
    return pattern


def _normalizer(norm, where):
    if norm is None:
        return None
    if norm.get("type") == "Sequence" and len(norm.get("normalizers", [])) == 1:
        norm = norm["normalizers"][0]
    if norm.get("type") == "NFC":
        return "NFC"
    _refuse(where, f"normalizer {norm.get('type')!r} is not supported for a byte-level BPE (supported: none, NFC)")


def _bpe_parts(token, ranks, max_rank):
    """tiktoken's BPE of `token`'s bytes using only ranks below max_rank (what it has before making `token`)."""
    parts = [token[i:i + 1] for i in range(len(token))]
    get = ranks.get
    pair = [get(parts[i] + parts[i + 1], max_rank) for i in range(len(parts) - 1)]
    while pair:
        best = min(pair)
        if best >= max_rank:
            break
        i = pair.index(best)  # leftmost on ties, like tiktoken
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
        del pair[i]
        if i > 0:
            pair[i - 1] = get(parts[i - 1] + parts[i], max_rank)
        if i < len(pair):
            pair[i] = get(parts[i] + parts[i + 1], max_rank)
    return parts


# byte-level piece -> bytes: map each alphabet character to the latin-1 character of its byte value; anything
# else is deleted (< U+0180) or fails latin-1 encoding, so a length check catches non-byte-level pieces
_TO_LATIN1 = {**{cp: None for cp in range(0x180)}, **{ord(c): chr(b) for c, b in UNICODE_TO_BYTE.items()}}


def _piece_bytes(piece):
    try:
        b = piece.translate(_TO_LATIN1).encode("latin-1")
    except UnicodeEncodeError:
        return None
    return b if len(b) == len(piece) else None


def byte_level_ranks(vocab, merges, added, where, ignore_merges=False):
    """tiktoken ranks {token bytes: id} from a byte-level BPE's vocab and merges, after checking that tiktoken's
    rank-order BPE reproduces the merge list exactly (see the module docstring)."""
    added_ids = {a["content"]: a["id"] for a in added}
    ranks, piece_of = {}, {}
    for piece, i in vocab.items():
        if piece in added_ids:
            if added_ids[piece] != i:
                _refuse(where, f"{piece!r} is id {i} in model.vocab but id {added_ids[piece]} in added_tokens")
            continue  # an added token inside the vocab (tokenizers' trainer puts special tokens there)
        b = _piece_bytes(piece)
        if b is None:
            _refuse(where, f"model.vocab token {piece!r} (id {i}) has a character outside the byte-level alphabet "
                           f"(GPT-2's byte<->unicode map); this is not a byte-level BPE")
        if b in ranks:
            _refuse(where, f"model.vocab tokens {piece_of[b]!r} and {piece!r} are the same bytes")
        ranks[b] = i
        piece_of[b] = piece
    missing = [i for i in range(256) if bytes([i]) not in ranks]
    if missing:
        _refuse(where, f"model.vocab lacks the single-byte tokens for {len(missing)} byte values ({missing[:8]}...); "
                       f"tiktoken needs all 256 (train with initial_alphabet=ByteLevel.alphabet())")
    pairs, last_id = set(), -1
    for k, (a, b) in enumerate(_merge_pairs(merges, where)):
        if vocab.get(a) is None or vocab.get(b) is None or vocab.get(a + b) is None:
            _refuse(where, f"model.merges[{k}] = ({a!r}, {b!r}): a part or the merged token is not in model.vocab")
        ba, bb = _piece_bytes(a), _piece_bytes(b)
        t = ba + bb
        if ranks[t] < last_id:
            _refuse(where, f"model.merges[{k}] makes {piece_of[t]!r} (id {ranks[t]}) after a merge that made id "
                           f"{last_id}: the merge order is not the token-id order, so tiktoken (which ranks merges "
                           f"by token id) cannot reproduce it")
        last_id = ranks[t]
        pairs.add((ba, bb))
    for t, i in ranks.items():
        if len(t) < 2:
            continue
        parts = [t[:1], t[1:]] if len(t) == 2 else _bpe_parts(t, ranks, i)  # two bytes: the only way to build it
        if len(parts) == 2:
            if (parts[0], parts[1]) not in pairs:
                _refuse(where, f"token {piece_of[t]!r} (id {i}): tiktoken's rank-order BPE builds it from "
                               f"{[piece_of[p] for p in parts]}, which is not a listed merge in model.merges, so "
                               f"tiktoken and HF would encode some text differently")
        elif not ignore_merges:
            _refuse(where, f"token {piece_of[t]!r} (id {i}) cannot be built by merges from its own bytes (tiktoken's "
                           f"BPE stops at {[piece_of[p] for p in parts]}), so tiktoken emits it only for a piece that "
                           f"is exactly it; HF does that too only with model.ignore_merges=true, which this file does "
                           f"not set")
    return ranks


def canonical_merges(ranks):
    """HF merges equivalent to tiktoken ranks: for each token, the pair tiktoken's BPE makes it from (its BPE on
    the token's own bytes, stopped before its rank), in rank order. A token tiktoken can only emit whole (its BPE
    ends in 3+ parts) gets no merge; ignore_merges=true then emits it whole, like tiktoken does."""
    out = []
    for t, r in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(t) > 1:
            parts = _bpe_parts(t, ranks, r)
            if len(parts) == 2:
                out.append(parts)
    return out


def _check_pattern_compiles(pattern, where):
    try:
        tiktoken.Encoding("probe", pat_str=pattern, mergeable_ranks={bytes([i]): i for i in range(256)},
                          special_tokens={})
    except Exception as e:
        _refuse(where, f"tiktoken cannot compile the pre_tokenizer regex {pattern!r}: {e}")


# -----------------------------------------------------------------------------
# SentencePiece-style BPE (Mistral/Mixtral, Llama 2): its own encoder


BYTE_PIECES = {f"<0x{b:02X}>": b for b in range(256)}


class SentencePieceBPE:
    """
    tokenizers' BPE with byte fallback over characters, after the SentencePiece-style normalization
    (Prepend "▁" + Replace " " -> "▁" normalizers, or a Metaspace pre-tokenizer with prepend_scheme
    always/first/never and split true/false). Duck-types the parts of tiktoken.Encoding that Tokenizer uses.

    Per text segment (the text between added tokens, as HF splits it): normalize; split into words (Metaspace
    split=true) or keep one word; each character is its vocab id, or its UTF-8 bytes as <0xXX> tokens; then
    repeatedly merge the adjacent pair with the lowest merge index (leftmost on ties), exactly tokenizers' order.
    """

    def __init__(self, name, tj, where):
        model = tj["model"]
        _check_model(model, where, byte_fallback=True)
        self.name = name
        self.vocab = dict(model["vocab"])
        self.id_to_piece = {i: p for p, i in self.vocab.items()}
        missing = [p for p in BYTE_PIECES if p not in self.vocab]
        if missing:
            _refuse(where, f"model.vocab lacks the byte-fallback tokens {missing[:4]}...; all 256 <0xXX> are needed")
        self.byte_ids = [self.vocab[f"<0x{b:02X}>"] for b in range(256)]
        self.ignore_merges = bool(model.get("ignore_merges", False))
        self.merges = {}  # (left id, right id) -> (merge index, new id); a repeated pair keeps its last index
        for k, (a, b) in enumerate(_merge_pairs(model["merges"], where)):
            if a not in self.vocab or b not in self.vocab or a + b not in self.vocab:
                _refuse(where, f"model.merges[{k}] = ({a!r}, {b!r}): a part or the merged token is not in model.vocab")
            self.merges[(self.vocab[a], self.vocab[b])] = (k, self.vocab[a + b])
        self.added = _added_tokens(tj, where)
        for a in self.added:
            if a["content"] in self.vocab and self.vocab[a["content"]] != a["id"]:
                _refuse(where, f"{a['content']!r} is id {self.vocab[a['content']]} in model.vocab but {a['id']} in "
                               f"added_tokens")
            self.id_to_piece.setdefault(a["id"], a["content"])
        self._special_tokens = {a["content"]: a["id"] for a in self.added}
        self.special_tokens_set = set(self._special_tokens)
        self.n_vocab = max(self.id_to_piece) + 1
        self.max_token_value = self.n_vocab - 1
        # normalization: Prepend/Replace normalizers (Prepend: every non-empty segment) and/or a Metaspace
        # pre-tokenizer (its prepend_scheme "first": only a segment at the start of the text)
        self.split_words = False
        norm, pre = tj.get("normalizer"), tj.get("pre_tokenizer")
        steps = [] if norm is None else (norm["normalizers"] if norm.get("type") == "Sequence" else [norm])
        self.norm_steps = []
        for s in steps:
            if s.get("type") == "Prepend" and s.get("prepend") == "\u2581":
                self.norm_steps.append("prepend")
            elif s.get("type") == "Replace" and s.get("pattern") == {"String": " "} and s.get("content") == "\u2581":
                self.norm_steps.append("replace")
            else:
                _refuse(where, f"normalizer step {s!r} is not supported for a SentencePiece-style BPE (supported: "
                               f"Prepend('\u2581'), Replace(' ', '\u2581'))")
        self.metaspace = None
        if pre is not None:
            if pre.get("type") != "Metaspace" or pre.get("replacement", "\u2581") != "\u2581":
                _refuse(where, f"pre_tokenizer {pre.get('type')!r} is not supported for a SentencePiece-style BPE "
                               f"(supported: none, or Metaspace with replacement '\u2581')")
            scheme = pre.get("prepend_scheme")
            if scheme is None:  # tokenizers < 0.15 wrote add_prefix_space
                scheme = "always" if pre.get("add_prefix_space", True) else "never"
            if scheme not in ("always", "first", "never"):
                _refuse(where, f"pre_tokenizer Metaspace prepend_scheme {scheme!r} is not supported")
            self.metaspace = scheme
            self.split_words = bool(pre.get("split", True))
        if norm is None and pre is None:
            _refuse(where, "a SentencePiece-style BPE with neither a normalizer nor a Metaspace pre-tokenizer")
        dec = tj.get("decoder") or {}
        dec_steps = dec.get("decoders", []) if dec.get("type") == "Sequence" else [dec]
        self.strip_leading_space = any((d.get("type") == "Strip" and d.get("content") == " " and d.get("start") == 1)
                                       or (d.get("type") == "Metaspace" and d.get("prepend_scheme", "always") != "never"
                                           and d.get("add_prefix_space", True))
                                       for d in dec_steps)
        self._matcher = None  # (allowed added tokens, their regex)

    # --- encoding
    def _segment(self, text, at_start):
        if not text:
            return []
        for step in self.norm_steps:
            text = "\u2581" + text if step == "prepend" else text.replace(" ", "\u2581")
        if self.metaspace is not None:
            text = text.replace(" ", "\u2581")
            if not text.startswith("\u2581") and (self.metaspace == "always" or
                                                   (self.metaspace == "first" and at_start)):
                text = "\u2581" + text
        if not text:
            return []
        if self.split_words:  # MergedWithNext: each "▁" starts a new word
            words, start = [], 0
            for i in range(1, len(text)):
                if text[i] == "\u2581":
                    words.append(text[start:i])
                    start = i
            words.append(text[start:])
        else:
            words = [text]
        out = []
        for w in words:
            out += self._bpe_word(w)
        return out

    def _bpe_word(self, word):
        if self.ignore_merges and word in self.vocab:
            return [self.vocab[word]]
        ids = []
        for ch in word:
            i = self.vocab.get(ch)
            if i is not None:
                ids.append(i)
            else:
                ids += [self.byte_ids[b] for b in ch.encode("utf-8")]
        n = len(ids)
        if n < 2:
            return ids
        # doubly linked list over symbols + a heap of (merge index, position, new id), like tokenizers' Word
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        alive = [True] * n
        heap = []
        for i in range(n - 1):
            m = self.merges.get((ids[i], ids[i + 1]))
            if m is not None:
                heap.append((m[0], i, m[1]))
        heapq.heapify(heap)
        while heap:
            rank, pos, new_id = heapq.heappop(heap)
            if not alive[pos] or nxt[pos] >= n:
                continue
            right = nxt[pos]
            m = self.merges.get((ids[pos], ids[right]))
            if m is None or m[1] != new_id:
                continue  # a stale entry: one of the two symbols changed since it was pushed
            ids[pos] = new_id
            alive[right] = False
            nxt[pos] = nxt[right]
            if nxt[pos] < n:
                prev[nxt[pos]] = pos
            if prev[pos] >= 0:
                m = self.merges.get((ids[prev[pos]], ids[pos]))
                if m is not None:
                    heapq.heappush(heap, (m[0], prev[pos], m[1]))
            if nxt[pos] < n:
                m = self.merges.get((ids[pos], ids[nxt[pos]]))
                if m is not None:
                    heapq.heappush(heap, (m[0], pos, m[1]))
        return [ids[i] for i in range(n) if alive[i]]

    def encode(self, text, allowed_special=(), disallowed_special=(), at_start=True):
        """Encode text; added tokens in `allowed_special` found in it are matched (split out first, as HF does),
        all others are plain text."""
        allowed = frozenset(allowed_special) & self.special_tokens_set
        out = []
        if allowed:
            if self._matcher is None or self._matcher[0] != allowed:  # longest first, like HF's added vocabulary
                self._matcher = (allowed, regex.compile("|".join(regex.escape(s) for s in
                                                                 sorted(allowed, key=len, reverse=True))))
            pat = self._matcher[1]
            pos = 0
            for m in pat.finditer(text):
                out += self._segment(text[pos:m.start()], at_start and pos == 0)
                out.append(self._special_tokens[m.group()])
                pos = m.end()
            out += self._segment(text[pos:], at_start and pos == 0)
            return out
        return self._segment(text, at_start)

    def encode_ordinary(self, text):
        return self._segment(text, True)

    def encode_batch(self, texts, num_threads=8, allowed_special=(), disallowed_special=()):
        return [self.encode(t, allowed_special) for t in texts]

    def encode_ordinary_batch(self, texts, num_threads=8):
        return [self.encode_ordinary(t) for t in texts]

    def encode_single_token(self, piece):
        if piece in self._special_tokens:
            return self._special_tokens[piece]
        return self.vocab[piece]

    # --- decoding: pieces with "▁" -> " ", <0xXX> -> that byte, the leading space of the prepend stripped
    def decode_single_token_bytes(self, i):
        piece = self.id_to_piece[i]
        if piece in BYTE_PIECES and self.vocab.get(piece) == i:
            return bytes([BYTE_PIECES[piece]])
        if piece in self._special_tokens:
            return piece.encode("utf-8")
        return piece.replace("\u2581", " ").encode("utf-8")

    def decode_bytes(self, ids):
        out = b"".join(self.decode_single_token_bytes(i) for i in ids)
        if self.strip_leading_space and out.startswith(b" "):
            out = out[1:]
        return out

    def decode(self, ids, errors="replace"):
        return self.decode_bytes(ids).decode("utf-8", errors=errors)


# -----------------------------------------------------------------------------
# reading a model directory


def read_tokenizer_json(path):
    """A tokenizer.json -> (encoding, info). encoding is a tiktoken.Encoding (byte-level BPE) or a
    SentencePieceBPE; info holds what export needs back (normalizer, post_processor, flags, added tokens)."""
    tj = _read_json(path)
    where = path
    model = tj.get("model") or {}
    added = _added_tokens(tj, where)
    pre = tj.get("pre_tokenizer")
    pre_types = [s.get("type") for s in (pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence"
                                         else [pre] if pre else [])]
    info = {"added": added, "post_processor": tj.get("post_processor"), "ignore_merges": model.get("ignore_merges"),
            # added tokens that tokenizers' trainer also put into model.vocab (written back there on export)
            "in_vocab": {a["content"]: a["id"] for a in added
                         if (model.get("vocab") or {}).get(a["content"]) == a["id"]}}
    if "ByteLevel" in pre_types:
        _check_model(model, where, byte_fallback=False)
        pattern = _byte_level_pattern(pre, where)
        _check_pattern_compiles(pattern, where)
        normalizer = _normalizer(tj.get("normalizer"), where)
        dec = tj.get("decoder")
        if not dec or dec.get("type") != "ByteLevel":
            _refuse(where, f"decoder is {dec and dec.get('type')!r}; a byte-level BPE needs the ByteLevel decoder")
        ranks = byte_level_ranks(model["vocab"], model["merges"], added, where, bool(model.get("ignore_merges")))
        specials = {a["content"]: a["id"] for a in added}
        clash = set(specials.values()) & set(ranks.values())
        if clash:
            _refuse(where, f"added token ids {sorted(clash)[:5]} are also ids of ordinary vocab tokens")
        name = os.path.basename(os.path.dirname(os.path.abspath(path))) or "hf"
        enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
        info.update(kind="byte_level", pattern=pattern, normalizer=normalizer,
                    json={"pre_tokenizer": pre, "decoder": dec})  # written back as they were on export
        return enc, info
    if model.get("byte_fallback") or any(t == "Metaspace" for t in pre_types):
        enc = SentencePieceBPE(os.path.basename(os.path.dirname(os.path.abspath(path))), tj, where)
        info.update(kind="sentencepiece", normalizer=None, json={k: tj.get(k) for k in
                                                                  ("normalizer", "pre_tokenizer", "decoder", "model")})
        return enc, info
    _refuse(where, f"model.type {model.get('type')!r} with pre_tokenizer {pre_types or None}: neither a byte-level "
                   f"BPE (ByteLevel pre-tokenizer) nor a SentencePiece-style BPE (byte_fallback / Metaspace); not "
                   f"supported")


def _is_tiktoken_file(path):
    with open(path, "rb") as f:
        head = f.read(4096)
    try:
        line = head.split(b"\n", 1)[0].decode("ascii").split()
        base64.b64decode(line[0], validate=True)
        int(line[1])
        return len(line) == 2
    except Exception:
        return False


def _token_content(v):
    """tokenizer_config.json writes a token as a string or as {"content": ...}."""
    if isinstance(v, dict):
        return v.get("content")
    return v


def _chat_template_text(path, cfg):
    """The chat template as transformers finds it: chat_template.jinja beside tokenizer_config.json wins,
    else tokenizer_config.json's chat_template (a string, or a list of named templates: the 'default' one)."""
    jinja = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read(), jinja
    t = cfg.get("chat_template")
    if isinstance(t, list):
        named = {d.get("name"): d.get("template") for d in t}
        t = named.get("default")
    return t, os.path.join(path, "tokenizer_config.json")


def load_hf_tokenizer(path):
    """A local HF model directory (or its tokenizer.json / tokenizer.model) -> data.tokenizer.Tokenizer named by the
    directory's absolute path (what checkpoints store; get_tokenizer(that path) loads it again)."""
    from data import chat
    from data.tokenizer import Tokenizer
    path = os.path.abspath(path)
    if os.path.isfile(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"HF model directory {path!r} does not exist")
    cfg_path = os.path.join(path, "tokenizer_config.json")
    cfg = _read_json(cfg_path) if os.path.isfile(cfg_path) else {}
    tj_path, tm_path = os.path.join(path, "tokenizer.json"), os.path.join(path, "tokenizer.model")
    if os.path.isfile(tj_path):
        enc, info = read_tokenizer_json(tj_path)
    elif os.path.isfile(tm_path):
        if not _is_tiktoken_file(tm_path):
            raise ValueError(f"{tm_path} is not a tiktoken rank file (base64 token, rank per line); it looks like a "
                             f"SentencePiece model, which this repo reads only from a tokenizer.json (save one with "
                             f"transformers: AutoTokenizer.from_pretrained(dir).save_pretrained(dir))")
        from data.tokenizer import load_ranks
        ranks = load_ranks(tm_path)
        added = [{"id": int(i), "content": d["content"], "special": bool(d.get("special", True))}
                 for i, d in (cfg.get("added_tokens_decoder") or {}).items()]
        if not added:  # Meta's own layout (no tokenizer_config.json): Llama 3.1's 256 special tokens after the ranks
            n = len(ranks)
            added = [{"id": n + i, "content": s, "special": True} for i, s in enumerate(LLAMA3_SPECIALS)]
            cfg = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", **cfg}
        specials = {a["content"]: a["id"] for a in added}
        enc = tiktoken.Encoding(os.path.basename(path), pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                special_tokens=specials)
        info = {"kind": "byte_level", "added": added, "pattern": LLAMA3_PATTERN, "normalizer": None,
                "post_processor": None, "ignore_merges": True}
    else:
        raise FileNotFoundError(f"{path} has neither tokenizer.json nor tokenizer.model; an HF model directory needs "
                                f"one of them")
    names = {a["id"]: a["content"] for a in info["added"]}
    contents = set(names.values())

    def config_token(key):
        t = _token_content(cfg.get(key))
        if t is not None and t not in contents:
            raise ValueError(f"{cfg_path}: {key} {t!r} is not an added token of the tokenizer")
        return t

    # the chat template: recognised from its text (never guessed); None when the checkpoint ships none
    text, where = _chat_template_text(path, cfg)
    template, template_error = None, None
    if text:
        try:
            template = chat.template_from_text(text, where)
        except ValueError as e:  # refused when a conversation is rendered; pretraining needs no template
            template_error = str(e)
    # generation_config.json's eos list (and config.json's as a fallback) are the ids generation stops on
    gen_eos = []
    for fname in ("generation_config.json", "config.json"):
        p = os.path.join(path, fname)
        if os.path.isfile(p):
            e = _read_json(p).get("eos_token_id")
            if e is not None:
                gen_eos = [int(x) for x in (e if isinstance(e, list) else [e])]
                break
    tok = Tokenizer(path, enc, hf=dict(info, config=cfg, gen_eos=gen_eos, chat_template_text=text),
                    chat_template=template,
                    bos=config_token("bos_token"), eos=config_token("eos_token"), pad=config_token("pad_token"),
                    unk=config_token("unk_token"))
    tok.chat_template_error = template_error
    return tok


# -----------------------------------------------------------------------------
# export


def _byte_piece(b):
    return "".join(BYTE_TO_UNICODE[x] for x in b)


def tokenizer_json(tok):
    """The HF tokenizer.json dict of a tiktoken-backed (byte-level) or SentencePiece-style Tokenizer."""
    hf = tok.hf or {}
    added = hf.get("added") or [{"id": i, "content": s, "special": True}
                                for s, i in sorted(tok.enc._special_tokens.items(), key=lambda kv: kv[1])]
    added_json = [{"id": a["id"], "content": a["content"], "single_word": False, "lstrip": False, "rstrip": False,
                   "normalized": False, "special": a["special"]} for a in sorted(added, key=lambda a: a["id"])]
    if isinstance(tok.enc, SentencePieceBPE):
        j = hf["json"]
        return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added_json,
                "normalizer": j["normalizer"], "pre_tokenizer": j["pre_tokenizer"],
                "post_processor": hf.get("post_processor"), "decoder": j["decoder"], "model": j["model"]}
    ranks = tok.enc._mergeable_ranks
    vocab = {_byte_piece(b): r for b, r in ranks.items()}
    vocab = dict(sorted({**vocab, **hf.get("in_vocab", {})}.items(), key=lambda kv: kv[1]))
    merges = [[_byte_piece(a), _byte_piece(b)] for a, b in canonical_merges(ranks)]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    normalizer = {"type": tok.normalizer} if tok.normalizer else None
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added_json,
        "normalizer": normalizer,
        "pre_tokenizer": hf.get("json", {}).get("pre_tokenizer") or {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": tok.enc._pat_str}, "behavior": "Isolated", "invert": False},
            byte_level]},
        "post_processor": hf.get("post_processor"),
        "decoder": hf.get("json", {}).get("decoder") or byte_level,
        # tiktoken emits a regex piece that is itself a token whole: ignore_merges=true does the same in HF (an HF
        # tokenizer loaded with ignore_merges=false was checked to build every token by merges, so it keeps its flag)
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": bool(hf.get("ignore_merges", True)), "vocab": vocab, "merges": merges},
    }


def hf_token_ids(tok):
    """bos/eos/pad ids for config.json / generation_config.json: eos is the list generation stops on."""
    return {"bos_token_id": tok.bos_id, "eos_token_id": list(tok.stop_ids), "pad_token_id": tok.pad_id}


def chat_template_text(tok):
    """The chat template text to write for tok: the checkpoint's own (even one this repo refused to render), or the
    repo's ChatML for its own tokenizer; None if there is none."""
    if tok.chat_template is not None:
        return tok.chat_template.jinja
    return (tok.hf or {}).get("chat_template_text")


def save_hf_tokenizer(tok, out_dir):
    """Write tokenizer.json, tokenizer_config.json (with the chat template as jinja) and special_tokens_map.json
    into out_dir, for transformers / vLLM / llama.cpp's converter. An HF tokenizer keeps its own config (bos/eos/pad
    as it shipped them); the repo's own gets bos <|endoftext|>, eos <|im_end|>, pad <|pad|>. Returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    tj = tokenizer_json(tok)
    hf = tok.hf or {}

    def name(i):
        return None if i is None else tok.decode_token(i)

    ours = {"bos_token": name(tok.bos_id), "eos_token": name(tok.end_of_turn_id), "pad_token": name(tok.pad_id),
            "clean_up_tokenization_spaces": False, "tokenizer_class": "PreTrainedTokenizerFast"}
    if tok.unk_id is not None:
        ours["unk_token"] = name(tok.unk_id)
    if hf:  # as the checkpoint shipped it
        cfg = {k: v for k, v in hf["config"].items() if k not in ("added_tokens_decoder", "chat_template")}
        cfg["tokenizer_class"] = cfg.get("tokenizer_class") or ours["tokenizer_class"]
    else:  # the repo's own: nothing is added automatically, the template writes the BOS
        cfg = {**ours, "add_bos_token": False, "add_eos_token": False, "model_max_length": int(1e30)}
    cfg["added_tokens_decoder"] = {str(a["id"]): {k: a[k] for k in ("content", "lstrip", "normalized", "rstrip",
                                                                   "single_word", "special")}
                                   for a in tj["added_tokens"]}
    template = chat_template_text(tok)
    if template is not None:
        cfg["chat_template"] = template
    special_map = {k: cfg[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if cfg.get(k) is not None}
    paths = []
    for fname, obj in (("tokenizer.json", tj), ("tokenizer_config.json", cfg),
                       ("special_tokens_map.json", special_map)):
        p = os.path.join(out_dir, fname)
        with open(p + ".tmp", "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False, indent=2 if fname != "tokenizer.json" else None)
        os.replace(p + ".tmp", p)  # atomic: a crash never leaves a half-written file
        paths.append(p)
    # transformers prefers chat_template.jinja over tokenizer_config.json's template: keep one there in step
    jinja = os.path.join(out_dir, "chat_template.jinja")
    if os.path.exists(jinja) and template is not None:
        with open(jinja, "w", encoding="utf-8") as f:
            f.write(template)
        paths.append(jinja)
    return paths
