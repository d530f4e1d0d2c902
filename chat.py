"""
Chat with a checkpoint in the terminal, streaming the reply token by token.

$ python chat.py                                         # interactive, out/sft/ckpt.pt
$ python chat.py --ckpt=out/dpo/ckpt.pt --temperature=0.7 --top_p=0.9
$ python chat.py --prompt="What is 12 + 30?" --temperature=0  # one reply, then exit
$ python chat.py --ckpt=out/sft_lora/ckpt.pt                # adapter checkpoints work too (base + adapters)

Interactive commands: /reset starts a new conversation, /exit (or Ctrl-D) quits. The conversation is
rendered with the same ChatML template the post-training stages train on (data/chat.py); when it
no longer fits in the model's context, the oldest turns are dropped (the system prompt is kept).
"""

import sys

import torch

from checkpoint import load_model
from data.chat import render_prompt
from data.tokenizer import get_tokenizer
from distributed import setup_distributed

# -----------------------------------------------------------------------------
# config
ckpt = "out/sft/ckpt.pt"
prompt = ""                # one-shot: answer this and exit
system = ""                # optional system prompt
temperature = 0.8          # 0 = greedy
top_k = 50                 # 0 = off
top_p = 0.95               # 1.0 = off
repetition_penalty = 1.0
max_new_tokens = 256
seed = 1337
device = "auto"            # auto | cpu | cuda
kernels = "auto"
_choices = dict(device=("auto", "cpu", "cuda"), kernels=("auto", "triton", "torch"))
_ranges = dict(temperature="[0, inf)", top_k="[0, inf)", top_p="(0, 1]", repetition_penalty="(0, inf)",
               max_new_tokens="[1, inf)")


class Stream:
    """generate()'s per-step callback: print the new text as soon as it decodes cleanly. Decoding the
    whole reply each time (not token by token) keeps multi-byte characters split across tokens intact."""

    def __init__(self, tok):
        self.tok, self.ids, self.printed = tok, [], 0

    def __call__(self, tokens):
        t = int(tokens[0])
        if t in self.tok.stop_ids or t == self.tok.pad_id:
            return
        self.ids.append(t)
        text = self.tok.decode(self.ids)
        if not text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            sys.stdout.write(text[self.printed:])
            sys.stdout.flush()
            self.printed = len(text)


if __name__ == "__main__":
    from configs import configure
    configure(globals())
    _, _, _, device, autocast = setup_distributed(device)
    try:
        model, state = load_model(ckpt, device, kernels=kernels)
    except FileNotFoundError:
        raise SystemExit(f"chat: checkpoint {ckpt} not found; run `python sft.py` first or pass --ckpt=PATH")
    except ValueError as e:  # e.g. a reward model
        raise SystemExit(f"chat: {e}")
    model.eval()
    tok = get_tokenizer(state["tokenizer"])
    generator = torch.Generator(device=device).manual_seed(seed)

    def reply(messages):
        ids = render_prompt(messages, tok)
        keep = 1 if messages and messages[0]["role"] == "system" else 0
        while len(ids) + 16 > model.config.max_seq_len and len(messages) > keep + 1:
            messages[keep:keep + 2] = []  # drop the oldest user/assistant exchange
            ids = render_prompt(messages, tok)
        budget = min(max_new_tokens, model.config.max_seq_len - len(ids))
        if budget <= 0:
            raise SystemExit(f"chat: the prompt ({len(ids)} tokens) does not fit in "
                             f"max_seq_len={model.config.max_seq_len}")
        stream = Stream(tok)
        with torch.no_grad(), autocast:
            model.generate([ids], budget, temperature=temperature, top_k=top_k or None, top_p=top_p,
                           repetition_penalty=repetition_penalty, stop_tokens=tok.stop_ids,
                           pad_id=tok.pad_id, generator=generator, callback=stream)
        sys.stdout.write("\n")
        return tok.decode(stream.ids)


    messages = [{"role": "system", "content": system}] if system else []
    if prompt:
        reply(messages + [{"role": "user", "content": prompt}])
        sys.exit(0)

    print(f"chatting with {ckpt} ({model.num_params() / 1e6:.1f}M params); "
          f"/reset for a new conversation, /exit to quit")
    while True:
        try:
            user = input("\n>>> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            break
        if user in ("/exit", "/quit"):
            break
        if user == "/reset":
            messages = messages[:1] if system else []
            print("(new conversation)")
            continue
        if not user:
            continue
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": reply(messages) or " "})
