"""
Tiny Hugging Face tokenizer directories built inside the tests with the `tokenizers` library (nothing downloaded),
in the layouts real checkpoints use: byte-level BPEs with Qwen2's pre-tokenizer (NFC + single digits), Llama 3's
(no normalizer, digits in groups of 3) and GPT-2's (ByteLevel with its built-in regex); SentencePiece-style BPEs
like Mistral's (byte fallback, "▁" for spaces) in the legacy (Prepend normalizer) and the Metaspace layout.
Trained on a fixed, seeded text; special tokens, non-special added tokens, tokenizer_config.json (bos/eos/pad,
chat template from tests/fixtures/chat_templates/) and generation_config.json as the families ship them.
"""

import json
import os
import random

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATES = os.path.join(ROOT, "tests", "fixtures", "chat_templates")

# the Split regexes of Qwen2's and Llama 3's tokenizer.json
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                 r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                  r"""\s*[\r\n]+|\s+(?!\S)|\s+""")

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
MISTRAL_SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]
BYTE_PIECES = [f"<0x{b:02X}>" for b in range(256)]

# the training text: fixed snippets (code, prose, other scripts, numbers, whitespace) combined by a seeded RNG, so
# the tokenizers are the same in every run and do not change when the repo's files do
SNIPPETS = [
    "def forward(self, x, mask=None):\n    return self.proj(torch.softmax(x @ x.T, dim=-1))\n",
    "for i in range(len(items)):\n        if items[i] is None:\n            continue\n",
    "class Config:\n    n_layer: int = 12\n    n_head: int = 8\n    dropout: float = 0.0\n",
    "import os\nimport json\n\nwith open(path, 'w') as f:\n    json.dump(obj, f, indent=2)\n",
    "x = [a + b for a, b in zip(xs, ys)]  # pairwise sums\n", "if __name__ == \"__main__\":\n    main()\n",
    "The quick brown fox jumps over the lazy dog. ", "It's what they'd've wanted, isn't it? ",
    "Language models predict the next token from the ones before it. ", "We'll see; they're done!  ",
    "Ünïcödé façade naïve café Ångström résumé ", "日本語のテキストです。", "中文文本，测试。", "한국어 텍스트 ",
    "Ελληνικά κείμενο ", "русский текст ", "emoji 😀🎉👍🏽 ", "✓ → ∑ x² ½ ", "١٢٣ ", "12345 ", "3.14159 ",
    "1,000,000 ", "0x1F ", "2024-07-26 ", "\t\t", "    ", "\n\n", "\r\n", "  \n", " ",
]


SYLLABLES = ["ka", "to", "ri", "en", "an", "th", "er", "in", "on", "st", "qu", "ing", "ed", "ly", "é", "ö", "日", "本"]


def training_text(n_docs=40, seed=0):
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        parts = []
        for _ in range(400):
            if rng.random() < 0.5:
                parts.append(rng.choice(SNIPPETS))
            else:  # made-up words, so there is plenty to merge
                word = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4)))
                parts.append(rng.choice(["", " ", " ", "_", "."]) + rng.choice([word, word, word.title()]))
        docs.append("".join(parts))
    return docs


def byte_level_tokenizer(style, vocab_size=1500, specials=(), added=()):
    """A byte-level BPE trained on training_text(): style 'qwen' (Split(Qwen2 regex) + ByteLevel, NFC),
    'llama3' (Split(Llama 3 regex) + ByteLevel), 'gpt2' (ByteLevel with its own regex)."""
    tok = Tokenizer(models.BPE())
    if style == "qwen":
        tok.normalizer = normalizers.NFC()
    if style in ("qwen", "llama3"):
        pattern = QWEN2_PATTERN if style == "qwen" else LLAMA3_PATTERN
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=list(specials), show_progress=False)
    tok.train_from_iterator(training_text(), trainer)
    if added:
        tok.add_tokens(list(added))  # non-special added tokens (Qwen3's <think>)
    return tok


def sentencepiece_tokenizer(layout, vocab_size=1200):
    """A SentencePiece-style BPE like Mistral's: byte fallback with <0xXX> pieces in the vocab, a small alphabet
    (so other characters fall back to bytes), "▁" for spaces. layout 'legacy': Prepend("▁") + Replace(" ", "▁")
    normalizers and no pre-tokenizer; 'metaspace': Metaspace(prepend_scheme="first", split=False)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    # the alphabet is exactly printable ASCII, "▁", tab, newline and a few others (the rest falls back to bytes);
    # limiting it to the initial alphabet keeps training deterministic (a frequency cut-off breaks ties at random)
    alphabet = [chr(c) for c in range(0x21, 0x7F)] + list("\u2581\t\néü日本語")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=MISTRAL_SPECIALS + BYTE_PIECES,
                                  initial_alphabet=alphabet, limit_alphabet=len(alphabet), show_progress=False)
    tok.train_from_iterator(training_text(), trainer)
    j = json.loads(tok.to_str())
    j["added_tokens"] = [a for a in j["added_tokens"] if a["content"] not in BYTE_PIECES]  # plain vocab pieces
    if layout == "legacy":
        j["normalizer"] = {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
        j["pre_tokenizer"] = None
    else:
        j["normalizer"] = None
        j["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False}
    j["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"},
        {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    return Tokenizer.from_str(json.dumps(j))


def template(name):
    with open(os.path.join(TEMPLATES, name), encoding="utf-8") as f:
        return f.read()


def write_dir(path, tok, config, generation_config=None):
    """tokenizer.json + tokenizer_config.json (+ generation_config.json), as a checkpoint ships them."""
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", **config}, f)
    if generation_config is not None:
        with open(os.path.join(path, "generation_config.json"), "w") as f:
            json.dump(generation_config, f)
    return str(path)


def family_dir(path, family):
    """A tokenizer directory like the family's instruct checkpoints: its special tokens, bos/eos/pad,
    generation_config.json eos list and published chat template."""
    t2 = {"qwen2.5": "qwen2.5-instruct.jinja", "qwen3": "qwen3.jinja", "llama3": "llama-3.1-instruct.jinja",
          "mistral": "mistral-v0.3-instruct.jinja", "mistral-sp": "mistral-v0.3-instruct.jinja"}[family]
    if family.startswith("qwen"):
        tok = byte_level_tokenizer("qwen", specials=QWEN_SPECIALS,
                                   added=["<think>", "</think>"] if family == "qwen3" else [])
        return write_dir(path, tok, {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                                     "chat_template": template(t2)},
                         {"eos_token_id": [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]})
    if family == "llama3":
        tok = byte_level_tokenizer("llama3", specials=LLAMA_SPECIALS)
        ids = [tok.token_to_id(s) for s in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")]
        return write_dir(path, tok, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                                     "chat_template": template(t2)},
                         {"bos_token_id": tok.token_to_id("<|begin_of_text|>"), "eos_token_id": ids})
    if family == "mistral":  # Mistral's template on a byte-level tokenizer: the template logic alone
        tok = byte_level_tokenizer("qwen", specials=MISTRAL_SPECIALS)
    else:
        tok = sentencepiece_tokenizer("legacy")
    return write_dir(path, tok, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                                 "chat_template": template(t2)})
