"""
Tokenizer tests. References are independent of data/tokenizer.py: hand-worked
merges, a naive recount-every-step BPE trainer, a naive lowest-rank BPE encoder,
and tiktoken's own rank-file loader.
"""

import base64
import random
from collections import Counter

import pytest
import regex
import tiktoken
import tiktoken.load

from data import tokenizer as tk
from data.tokenizer import GPT4_PATTERN, SPECIAL_TOKENS, get_tokenizer, load_ranks, save_ranks, train_bpe


@pytest.fixture
def fresh_cache():
    # get_tokenizer is lru_cached; tests that monkeypatch tiktoken must not see
    # (or leave behind) cached tokenizers
    get_tokenizer.cache_clear()
    yield
    get_tokenizer.cache_clear()


def random_unicode(rng, n):
    # a mix of ranges that tend to break tokenizers: ASCII incl. control chars,
    # Latin-1, combining marks, CJK, emoji (4-byte UTF-8), ZWJ, BOM, private use
    ranges = [(0, 0x7F), (0x80, 0xFF), (0x300, 0x36F), (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF),
              (0x200D, 0x200D), (0xFEFF, 0xFEFF), (0xE000, 0xF8FF), (0x10000, 0x10FFFF)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(ranges)
        cp = rng.randint(lo, hi)
        if 0xD800 <= cp <= 0xDFFF:  # surrogates are not valid in UTF-8 text
            cp = 0x41
        out.append(chr(cp))
    return "".join(out)


def test_default_layout():
    tok = get_tokenizer("default")
    assert tok.name == "default"
    assert tok.vocab_size == 8192
    # specials come right after the 8188 mergeable ranks, in SPECIAL_TOKENS order
    assert [tok.eot_id, tok.im_start_id, tok.im_end_id, tok.pad_id] == [8188, 8189, 8190, 8191]
    assert tok.bos_id == tok.eot_id
    # every single byte is a token, so any byte string is representable
    ranks = tiktoken.load.load_tiktoken_bpe(tk.DEFAULT_PATH)
    assert len(ranks) == 8188 and all(ranks[bytes([i])] == i for i in range(256))


def test_roundtrip_unicode():
    tok = get_tokenizer("default")
    rng = random.Random(0)
    texts = [random_unicode(rng, rng.randint(0, 300)) for _ in range(200)]
    texts += ["", " ", "\n\n\t  \r\n", "e\u0301\u0302", "👩‍👩‍👧‍👦", "日本語のテキスト", "\x00\x01\x7f",
              "def f(x):\n    return x  # ok\n", "<|endoftext|><|im_start|>user"]
    for t in texts:
        assert tok.decode(tok.encode(t)) == t
    assert [tok.decode(ids) for ids in tok.encode_batch(texts)] == texts


def test_decode_bytes_raw_and_invalid_utf8():
    tok = get_tokenizer("default")
    rng = random.Random(1)
    for _ in range(50):
        raw = bytes(rng.randrange(256) for _ in range(rng.randint(1, 40)))
        ids = [tok.enc.encode_single_token(bytes([b])) for b in raw]
        assert tok.decode_bytes(ids) == raw
        assert tok.decode(ids) == raw.decode("utf-8", errors="replace")
    # a lone continuation byte / truncated sequence decodes with U+FFFD
    assert tok.decode([tok.enc.encode_single_token(b"\x80")]) == "\ufffd"


def test_special_tokens():
    tok = get_tokenizer("default")
    for s in SPECIAL_TOKENS:
        assert tok.enc.encode(s, allowed_special="all") == [tok.token_id(s)]
        assert tok.decode([tok.token_id(s)]) == s
    ids = tok.enc.encode("<|im_start|>user\nhi<|im_end|>", allowed_special="all")
    assert ids[0] == tok.im_start_id and ids[-1] == tok.im_end_id
    with pytest.raises(KeyError, match="not a special token"):
        tok.token_id("<|nope|>")


def test_special_text_in_user_input_is_plain_text():
    tok = get_tokenizer("default")
    specials = {tok.token_id(s) for s in SPECIAL_TOKENS}
    for s in SPECIAL_TOKENS:
        ids = tok.encode(f"a {s} b")
        assert not specials & set(ids)
        assert len(ids) > 3
        assert tok.decode(ids) == f"a {s} b"


def test_digits_are_split():
    tok = get_tokenizer("default")
    ids = tok.encode("12345")
    assert [tok.decode([i]) for i in ids] == ["1", "2", "3", "4", "5"]
    assert len(tok.encode("x = 1000000")) >= 7


# -----------------------------------------------------------------------------
# training


def test_train_bpe_hand_example():
    # the classic "aaabdaaabac" example, worked by hand (pairs counted overlapping):
    # 1. (a,a) x4 -> "aa"                 [aa a b d aa a b a c]
    # 2. (a,b) x2 ties (aa,a) x2; (97,98) < (256,97) -> "ab"   [aa ab d aa ab a c]
    # 3. (aa,ab) x2 -> "aaab"             [aaab d aaab a c]
    # 4. all count 1; smallest pair is (a,c) = (97,99) -> "ac"
    ranks = train_bpe(["aaabdaaabac"], 256 + 4 + len(SPECIAL_TOKENS), pattern=r".+")
    merged = {t: r for t, r in ranks.items() if r >= 256}
    assert merged == {b"aa": 256, b"ab": 257, b"aaab": 258, b"ac": 259}
    assert all(ranks[bytes([i])] == i for i in range(256))


def test_train_bpe_hand_example_gpt4_pattern():
    # GPT4_PATTERN splits "ab ab ab cd" into "ab", " ab", " ab", " cd": no pair
    # crosses a chunk boundary (so never (b, space)).
    # 1. (a,b) x3 -> "ab";  2. (space,ab) x2 -> " ab";
    # 3. (space,c) x1 ties (c,d) x1; (32,99) < (99,100) -> " c";  4. (" c",d) -> " cd"
    ranks = train_bpe(["ab ab ab cd"], 260 + len(SPECIAL_TOKENS))
    merged = {t: r for t, r in ranks.items() if r >= 256}
    assert merged == {b"ab": 256, b" ab": 257, b" c": 258, b" cd": 259}


def test_train_bpe_errors():
    with pytest.raises(ValueError, match="too small"):
        train_bpe(["hello"], 100)
    # digits are single-character chunks under GPT4_PATTERN, so nothing can merge
    with pytest.raises(ValueError, match="ran out of pairs"):
        train_bpe(["12 34 56"], 300)


def naive_bpe(texts, vocab_size, pattern):
    """Reference trainer: recount every pair over every chunk occurrence at every step."""
    chunks = [list(c.encode("utf-8")) for t in texts for c in regex.findall(pattern, t)]
    ranks = {bytes([i]): i for i in range(256)}
    vocab = {i: bytes([i]) for i in range(256)}
    while len(ranks) < vocab_size - len(SPECIAL_TOKENS):
        counts = Counter()
        for ids in chunks:
            for i in range(len(ids) - 1):
                counts[(ids[i], ids[i + 1])] += 1
        best = max(counts.values())
        a, b = min(p for p, c in counts.items() if c == best)
        token = vocab[a] + vocab[b]
        if token not in ranks:  # the same bytes via a different pair reuse the id
            ranks[token] = len(ranks)
            vocab[ranks[token]] = token
        new_id = ranks[token]
        for k, ids in enumerate(chunks):
            out, i = [], 0
            while i < len(ids):
                if i + 1 < len(ids) and ids[i] == a and ids[i + 1] == b:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(ids[i])
                    i += 1
            chunks[k] = out
    return ranks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_train_bpe_matches_naive(seed):
    rng = random.Random(seed)
    # a small alphabet makes lots of repeated pairs, ties and long merges;
    # "é" and "日" are multi-byte, digits/punctuation exercise the pattern
    alphabet = "aaabbc  \n\té日1,."
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(20, 300))) for _ in range(30)]
    vocab_size = 256 + 150 + len(SPECIAL_TOKENS)
    assert train_bpe(texts, vocab_size) == naive_bpe(texts, vocab_size, GPT4_PATTERN)


def naive_encode(text, ranks):
    """Reference encoder: within each regex chunk, repeatedly merge the adjacent
    pair whose concatenation has the lowest rank (leftmost on ties)."""
    out = []
    for chunk in regex.findall(GPT4_PATTERN, text):
        parts = [bytes([b]) for b in chunk.encode("utf-8")]
        while len(parts) > 1:
            cands = [(ranks.get(parts[i] + parts[i + 1], float("inf")), i) for i in range(len(parts) - 1)]
            r, i = min(cands)
            if r == float("inf"):
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        out += [ranks[p] for p in parts]
    return out


def test_encoding_matches_naive_encoder():
    # checks both that tiktoken's regex engine splits exactly like the `regex`
    # module used in training, and that the ranks are applied as BPE merges
    tok = get_tokenizer("default")
    ranks = load_ranks(tk.DEFAULT_PATH)
    rng = random.Random(3)
    texts = ["import os\n\ndef main(argv=None):\n    \"\"\"Run it.\"\"\"\n    return 0\n\n\n",
             "It's 3.14159 -- we'll see, they're done!  \t trailing   \n", "   \n\n  x", "a\r\n\r\nb  "]
    texts += [random_unicode(rng, 100) for _ in range(20)]
    words = ["the", " function", "return", "self", ".", "(", ")", " ", "\n", "    ", "x1", "don't", "é"]
    texts += ["".join(rng.choice(words) for _ in range(100)) for _ in range(20)]
    for t in texts:
        assert tok.encode(t) == naive_encode(t, ranks)


def test_save_load_roundtrip(tmp_path):
    ranks = train_bpe(["the cat sat on the mat with the hat " * 5], 272)
    path = str(tmp_path / "tiny.tiktoken")
    save_ranks(ranks, path)
    assert tiktoken.load.load_tiktoken_bpe(path) == ranks  # tiktoken's own reader
    assert load_ranks(path) == ranks
    # the file format by hand: base64 token, space, rank
    first = open(path).readline().split()
    assert base64.b64decode(first[0]) == b"\x00" and first[1] == "0"
    tok = get_tokenizer(path)
    assert tok.vocab_size == 272 and tok.eot_id == 268
    assert tok.decode(tok.encode("the hat")) == "the hat"
    assert len(tok.encode(" the")) == 1


def test_load_ranks_errors(tmp_path):
    p = tmp_path / "gap.tiktoken"
    p.write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i if i < 100 else i + 1}\n"
                         for i in range(256)))
    with pytest.raises(ValueError, match="gap.tiktoken.*0..255"):
        load_ranks(str(p))
    p.write_text("AA== 0\nnot-a-valid-line\n")
    with pytest.raises(ValueError, match="gap.tiktoken:2"):
        load_ranks(str(p))
    with pytest.raises(FileNotFoundError, match="missing.tiktoken"):
        get_tokenizer(str(tmp_path / "missing.tiktoken"))


def test_named_encoding_offline_error(monkeypatch, fresh_cache):
    def offline(name):
        raise ConnectionError("network is unreachable")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(RuntimeError, match="could not be fetched") as e:
        get_tokenizer("gpt2")
    assert "TIKTOKEN_CACHE_DIR" in str(e.value) and "'default'" in str(e.value)
    with pytest.raises(ValueError, match="unknown tokenizer"):
        get_tokenizer("gpt5")


def test_named_encoding_adds_chat_specials(monkeypatch, fresh_cache):
    # a stand-in for e.g. gpt2: 256 byte ranks + its own <|endoftext|> at 256
    fake = tiktoken.Encoding("fake", pat_str=GPT4_PATTERN, mergeable_ranks={bytes([i]): i for i in range(256)},
                             special_tokens={"<|endoftext|>": 256})
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: fake)
    tok = get_tokenizer("gpt2")
    assert tok.name == "gpt2"
    assert tok.eot_id == tok.bos_id == 256  # reuses the encoding's own <|endoftext|>
    assert (tok.im_start_id, tok.im_end_id, tok.pad_id) == (257, 258, 259)
    assert tok.vocab_size == 260
    assert tok.encode("hi") == [104, 105]


def test_default_tokenizer_stage_ids():
    # the ids the stages use, for the repo's own tokenizer: ChatML's, with <|endoftext|> as BOS/separator
    tok = get_tokenizer("default")
    n = tok.vocab_size - len(SPECIAL_TOKENS)  # the specials come after the ranks, in SPECIAL_TOKENS' order
    assert (tok.eot_id, tok.im_start_id, tok.im_end_id, tok.pad_id) == (n, n + 1, n + 2, n + 3)
    assert tok.bos_id == tok.eot_id and tok.end_of_turn_id == tok.im_end_id
    assert tok.stop_ids == (tok.im_end_id, tok.eot_id)
    assert tok.chat_template.name == "chatml" and tok.unk_id is None
