"""
HF tokenizers in and out (data/hf_tokenizer.py). The reference is the `tokenizers` library itself, on tokenizer.json
files trained here (tests/hf_tokenizers.py), and transformers' own tiktoken -> tokenizer.json converter for Llama 3's
tokenizer.model; nothing is downloaded.
"""

import base64
import importlib
import json
import os
import random

import pytest
from tokenizers import Tokenizer as HFTokenizer

from data.hf_tokenizer import LLAMA3_PATTERN, save_hf_tokenizer
from data.tokenizer import DEFAULT_PATH, GPT4_PATTERN, get_tokenizer
from hf_tokenizers import (LLAMA_SPECIALS, QWEN_SPECIALS, byte_level_tokenizer, family_dir, sentencepiece_tokenizer,
                           template, write_dir)


def parity_corpus(seed=0):
    """Unicode, code, digits, whitespace runs and special-token strings."""
    rng = random.Random(seed)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "kernels.py"), encoding="utf-8") as f:  # code not in the training text
        code = f.read()
    texts = [code[i:i + rng.randint(1, 300)] for i in (rng.randrange(len(code)) for _ in range(40))]
    ranges = [(0x20, 0x7E), (0, 0x7F), (0x80, 0x2FF), (0x300, 0x36F), (0x370, 0x52F), (0x3040, 0x30FF),
              (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x1F300, 0x1FAFF), (0x200B, 0x200F), (0xE000, 0xF8FF)]
    for _ in range(40):
        texts.append("".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(rng.randint(1, 60))))
    texts += ["1234567890", "3.14159 2.71828", "1,000,000.00", "x = 12345678901234567890;", "٣٤٥ ⅷ ½",
              "   ", "\t\t\t", "\n\n\n", " \n \n ", "a  b   c    d", "\r\n\r\n", "x   ", "   x", "\u00a0\u3000 \u2003",
              "trailing space \n", "  \n\n  \tmixed\t \n", "",
              "<|im_end|>", "<|endoftext|>hello", "a<|im_start|>b", "<think>x</think>", "[INST] hi [/INST]", "<s></s>",
              "<|eot_id|><|begin_of_text|>", "<unk>", "<0x41>", "\u2581 spaced",
              "e\u0301 A\u030a \u1100\u1161 ﬁ \u212b"]  # NFC-sensitive: decomposed accents, jamo, compatibility chars
    return texts


def reference(path):
    """The `tokenizers` library on the same file, with special tokens in text encoded as text (like ours)."""
    hf = HFTokenizer.from_file(os.path.join(path, "tokenizer.json"))
    hf.encode_special_tokens = True
    return hf


def assert_parity(ours, hf, texts):
    for t in texts:
        want = hf.encode(t, add_special_tokens=False).ids
        assert ours.encode(t) == want, f"encode({t!r})"
        assert ours.decode(want) == hf.decode(want, skip_special_tokens=False), f"decode of {t!r}"
    assert ours.encode_batch(texts) == [ours.encode(t) for t in texts]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_tokenizers")
    out = {f: family_dir(root / f, f) for f in ("qwen3", "llama3", "mistral-sp")}
    out["gpt2"] = write_dir(root / "gpt2", byte_level_tokenizer("gpt2", specials=["<|endoftext|>"]),
                            {"eos_token": "<|endoftext|>"})
    out["metaspace"] = write_dir(root / "metaspace", sentencepiece_tokenizer("metaspace"),
                                 {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                                  "chat_template": template("mistral-v0.3-instruct.jinja")})
    return out


@pytest.mark.parametrize("name", ["qwen3", "llama3", "gpt2", "mistral-sp", "metaspace"])
def test_encoding_equals_tokenizers(dirs, name):
    # qwen3: Qwen2's regex + NFC + specials + non-special <think>; llama3: Llama 3's regex; gpt2: ByteLevel's own
    # regex; mistral-sp / metaspace: SentencePiece-style BPE with byte fallback (its own encoder)
    ours = get_tokenizer(dirs[name])
    assert_parity(ours, reference(dirs[name]), parity_corpus())


def test_special_token_strings_stay_text(dirs):
    ours = get_tokenizer(dirs["qwen3"])
    hf = HFTokenizer.from_file(os.path.join(dirs["qwen3"], "tokenizer.json"))  # HF's default: specials matched
    im_end = ours.token_id("<|im_end|>")
    assert hf.encode("<|im_end|>", add_special_tokens=False).ids == [im_end]  # how HF differs: a control token
    assert im_end not in ours.encode("<|im_end|>") and ours.decode(ours.encode("<|im_end|>")) == "<|im_end|>"
    # a non-special added token is matched by both, as the model saw it in training
    think = ours.token_id("<think>")
    assert ours.encode("<think>") == hf.encode("<think>", add_special_tokens=False).ids == [think]


def test_ids_come_from_the_checkpoint(dirs):
    q = get_tokenizer(dirs["qwen3"])
    t = q.token_id
    assert (q.chat_template.name, q.bos_id, q.eot_id) == ("qwen3", None, t("<|endoftext|>"))
    assert (q.end_of_turn_id, q.pad_id, q.im_start_id, q.im_end_id) == (t("<|im_end|>"), t("<|endoftext|>"),
                                                                          t("<|im_start|>"), t("<|im_end|>"))
    assert q.stop_ids == (t("<|im_end|>"), t("<|endoftext|>"))  # generation_config.json's eos list
    ll = get_tokenizer(dirs["llama3"])
    t = ll.token_id
    assert (ll.chat_template.name, ll.bos_id, ll.eot_id) == ("llama3", t("<|begin_of_text|>"), t("<|end_of_text|>"))
    assert ll.end_of_turn_id == t("<|eot_id|>") and ll.im_end_id is None
    assert ll.stop_ids == (t("<|eot_id|>"), t("<|end_of_text|>"), t("<|eom_id|>"))
    assert ll.pad_id == t("<|finetune_right_pad_id|>")  # Llama 3 has no pad token: one it never produces
    m = get_tokenizer(dirs["mistral-sp"])
    t = m.token_id
    assert (m.chat_template.name, m.bos_id, m.eot_id, m.end_of_turn_id) == ("mistral", t("<s>"), t("</s>"), t("</s>"))
    assert m.stop_ids == (t("</s>"),) and m.pad_id == t("<unk>")
    g = get_tokenizer(dirs["gpt2"])
    assert g.chat_template is None and g.end_of_turn_id == g.eot_id == g.token_id("<|endoftext|>")
    with pytest.raises(ValueError, match="no chat template"):
        from data.chat import render
        render([{"role": "user", "content": "hi"}], g)


def test_get_tokenizer_accepts_paths(dirs, monkeypatch):
    path = dirs["qwen3"]
    monkeypatch.chdir(os.path.dirname(path))
    tok = get_tokenizer(os.path.join(".", os.path.basename(path)))
    assert tok.name == os.path.abspath(path)  # what a checkpoint stores
    again = get_tokenizer(tok.name)
    file_path = get_tokenizer(os.path.join(path, "tokenizer.json"))
    text = "def f(x):\n    return x + 12345  # café"
    assert tok.encode(text) == again.encode(text) == file_path.encode(text)


def _write_tiktoken(path, ranks):
    with open(path, "w") as f:
        for b, r in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(base64.b64encode(b).decode() + f" {r}\n")


def test_llama3_tokenizer_model(tmp_path):
    # Meta's layout: a tiktoken rank file, Llama 3's regex, 256 special tokens after the ranks. The reference is
    # transformers' own converter (all splits of every token as merges) run by `tokenizers`.
    hf_trained = byte_level_tokenizer("llama3")
    from data.hf_tokenizer import UNICODE_TO_BYTE
    ranks = {bytes(UNICODE_TO_BYTE[c] for c in piece): i for piece, i in hf_trained.get_vocab().items()}
    d = tmp_path / "meta"
    d.mkdir()
    _write_tiktoken(str(d / "tokenizer.model"), ranks)
    ours = get_tokenizer(str(d))
    n = len(ranks)
    assert (ours.bos_id, ours.eot_id, ours.end_of_turn_id) == (n, n + 1, n + 9)  # <|begin_of_text|>, ..., <|eot_id|>
    assert ours.vocab_size == n + 256 and ours.chat_template is None
    from data.hf_tokenizer import LLAMA3_SPECIALS
    converter = importlib.import_module("transformers.convert_slow_tokenizer").TikTokenConverter
    ref = converter(vocab_file=str(d / "tokenizer.model"), pattern=LLAMA3_PATTERN,
                    extra_special_tokens=LLAMA3_SPECIALS).converted()
    ref.encode_special_tokens = True
    texts = parity_corpus(1)
    for t in texts:
        assert ours.encode(t) == ref.encode(t, add_special_tokens=False).ids, t
    # the converted tokenizer.json (the HF layout of Llama 3: every split listed, ignore_merges) loads too
    conv = tmp_path / "converted"
    conv.mkdir()
    ref.save(str(conv / "tokenizer.json"))
    (conv / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>",
                                                            "eos_token": "<|eot_id|>"}))
    assert [get_tokenizer(str(conv)).encode(t) for t in texts] == [ours.encode(t) for t in texts]


def test_export_default_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from data.chat import render, render_prompt, render_text
    tok = get_tokenizer("default")
    out = str(tmp_path / "export")
    save_hf_tokenizer(tok, out)
    hf = reference(out)
    assert_parity(tok, hf, parity_corpus(2))
    assert hf.get_vocab_size() == tok.vocab_size
    assert [hf.token_to_id(s) for s in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>")] == \
        [tok.eot_id, tok.im_start_id, tok.im_end_id, tok.pad_id]
    auto = AutoTokenizer.from_pretrained(out)
    for t in parity_corpus(2):
        if "<|" not in t:  # transformers matches special tokens in text (see test_special_token_strings_stay_text)
            assert auto(t, add_special_tokens=False)["input_ids"] == tok.encode(t), t
    conv = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2 + 2? é"},
            {"role": "assistant", "content": "It is 4.\nDone."}, {"role": "user", "content": "And 3 + 5?"}]
    for msgs, gen in ((conv[:3], False), (conv, True)):
        assert auto.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen) == \
            render_text(msgs, tok, add_generation_prompt=gen)
        assert auto.apply_chat_template(msgs, add_generation_prompt=gen)["input_ids"] == \
            render(msgs, tok, add_generation_prompt=gen)[0]
    assert auto.apply_chat_template(conv, add_generation_prompt=True)["input_ids"] == render_prompt(conv, tok)
    cfg = json.load(open(os.path.join(out, "tokenizer_config.json")))
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"]) == ("<|endoftext|>", "<|im_end|>", "<|pad|>")
    # and back: the exported directory is an HF checkpoint tokenizer like any other
    back = get_tokenizer(out)
    assert back.chat_template.name == "chatml" and render(conv, back) == render(conv, tok)
    assert (back.bos_id, back.end_of_turn_id, back.pad_id) == (tok.bos_id, tok.end_of_turn_id, tok.pad_id)


@pytest.mark.parametrize("name", ["qwen3", "llama3", "mistral-sp", "metaspace"])
def test_hf_tokenizer_exports_back_losslessly(dirs, name, tmp_path):
    src = dirs[name]
    out = str(tmp_path / "out")
    save_hf_tokenizer(get_tokenizer(src), out)
    a, b = (json.load(open(os.path.join(d, "tokenizer.json"), encoding="utf-8")) for d in (src, out))
    assert b["model"]["vocab"] == a["model"]["vocab"]
    assert [tuple(m) for m in b["model"]["merges"]] == [tuple(m) for m in a["model"]["merges"]]
    assert [(t["id"], t["content"], t["special"]) for t in b["added_tokens"]] == \
        [(t["id"], t["content"], t["special"]) for t in a["added_tokens"]]
    for key in ("normalizer", "pre_tokenizer", "decoder", "post_processor"):
        assert b[key] == a[key], key
    ca, cb = (json.load(open(os.path.join(d, "tokenizer_config.json"))) for d in (src, out))
    assert cb["chat_template"] == ca["chat_template"]
    assert_parity(get_tokenizer(out), reference(src), parity_corpus(3))


def _mutated(tmp_path, src, edit, config=None):
    j = json.load(open(os.path.join(src, "tokenizer.json"), encoding="utf-8"))
    edit(j)
    d = tmp_path / "bad"
    d.mkdir(exist_ok=True)
    with open(d / "tokenizer.json", "w", encoding="utf-8") as f:
        json.dump(j, f)
    with open(d / "tokenizer_config.json", "w") as f:
        json.dump(config or {"eos_token": "<|endoftext|>"}, f)
    return str(d)


def _swap_merges(j):
    m = j["model"]["merges"]
    m[10], m[20] = m[20], m[10]


def _drop_byte(j):
    v = j["model"]["vocab"]
    del v["Ā"]  # byte 0


def _drop_merge(j):
    j["model"]["merges"].pop(5)


@pytest.mark.parametrize("edit, message", [
    (lambda j: j["model"].update(type="WordPiece"), "model.type is 'WordPiece'"),
    (lambda j: j.update(normalizer={"type": "NFKC"}), "normalizer 'NFKC' is not supported"),
    (lambda j: j["pre_tokenizer"]["pretokenizers"][0].update(pattern={"String": " "}), "plain string"),
    (lambda j: j["pre_tokenizer"]["pretokenizers"][0].update(behavior="Removed"), "behavior='Removed'"),
    (lambda j: j["pre_tokenizer"]["pretokenizers"][1].update(add_prefix_space=True), "add_prefix_space=true"),
    (lambda j: j["pre_tokenizer"]["pretokenizers"].insert(1, {"type": "Digits", "individual_digits": True}),
     "'Digits' is not supported"),
    (lambda j: j["pre_tokenizer"]["pretokenizers"][0].update(pattern={"Regex": r"\p{L}+"}), "does not match every"),
    (lambda j: j["added_tokens"][0].update(lstrip=True), "lstrip=true"),
    (lambda j: j["model"].update(dropout=0.1), "model.dropout"),
    (_swap_merges, "not the token-id order"),
    (_drop_byte, "single-byte tokens"),
    (_drop_merge, "not a listed merge"),
])
def test_unsupported_tokenizer_json_is_refused(dirs, tmp_path, edit, message):
    bad = _mutated(tmp_path, dirs["qwen3"], edit)
    with pytest.raises(ValueError, match=message) as e:
        get_tokenizer(bad)
    assert os.path.join(bad, "tokenizer.json") in str(e.value)  # names the file


def test_unsupported_directories_are_refused(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor tokenizer.model"):
        get_tokenizer(str(empty))
    sp = tmp_path / "sp"
    sp.mkdir()
    (sp / "tokenizer.model").write_bytes(b"\n\x0e\n\x05<unk>\x15\x00\x00\x00\x00\x18\x02")  # a SentencePiece protobuf
    with pytest.raises(ValueError, match="not a tiktoken rank file"):
        get_tokenizer(str(sp))


def test_unknown_chat_template_is_refused(dirs, tmp_path):
    from data.chat import render
    d = _mutated(tmp_path, dirs["qwen3"], lambda j: None,
                 {"eos_token": "<|im_end|>", "chat_template": template("qwen3.jinja").replace("<think>\\n", "<think>")})
    tok = get_tokenizer(d)  # the tokenizer still loads (pretraining needs no template) ...
    assert tok.chat_template is None
    with pytest.raises(ValueError, match="not one the repo renders.*looks like qwen3"):
        render([{"role": "user", "content": "hi"}], tok)  # ... but no conversation is rendered by guess
    out = str(tmp_path / "out")
    save_hf_tokenizer(tok, out)  # and export keeps the checkpoint's template as it was
    written = json.load(open(os.path.join(out, "tokenizer_config.json")))["chat_template"]
    assert written == json.load(open(os.path.join(d, "tokenizer_config.json")))["chat_template"]


def test_tiktoken_file_with_gpt4_pattern_roundtrips(tmp_path):
    # the repo's own rank file -> transformers' converter -> our loader: the same encoding as the default tokenizer
    converter = importlib.import_module("transformers.convert_slow_tokenizer").TikTokenConverter
    ref = converter(vocab_file=DEFAULT_PATH, pattern=GPT4_PATTERN,
                    extra_special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]).converted()
    d = tmp_path / "conv"
    d.mkdir()
    ref.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    ours, default = get_tokenizer(str(d)), get_tokenizer("default")
    for t in parity_corpus(4):
        assert ours.encode(t) == default.encode(t)
    assert [ours.token_id(s) for s in QWEN_SPECIALS] == [default.eot_id, default.im_start_id, default.im_end_id]


def test_llama_specials_match_meta_layout():
    from data.hf_tokenizer import LLAMA3_SPECIALS
    assert LLAMA3_SPECIALS[:len(LLAMA_SPECIALS)] == LLAMA_SPECIALS and len(LLAMA3_SPECIALS) == 256
