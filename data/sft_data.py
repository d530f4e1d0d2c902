"""
Supervised fine-tuning batches: conversations -> (inputs, targets) examples -> micro-batches.

Two ways to batch (sft.py's `packing`):
- padding: conversations of similar length are grouped into a micro-batch (sorted within
  shuffled chunks, so little compute goes to padding) and right-padded; pads are ignored targets.
- packing: conversations are laid end to end in rows of exactly max_seq_len tokens. Each token
  gets its position within its own conversation (RoPE restarts at 0) and a document id, and
  attention is masked to the document, so a packed row computes exactly what the conversations
  would compute one by one — the summed loss and its gradient are the same (tests/test_sft.py).
  The unused tail of a row is padding with a document id of its own and ignored targets.

A micro-batch is a dict of (B, T) long tensors: idx, targets (-100 = not trained), and for packing
positions and doc_ids. Every rank builds the same global sequence of micro-batches from the same
seed and takes its own share, so no sampler state has to be synchronised.
"""

import random

import torch

from data.chat import labels_from_mask, render


def tokenize_conversations(conversations, tokenizer, max_seq_len):
    """Render each conversation and turn it into (inputs, targets) of at most max_seq_len tokens.
    Longer conversations are cut at max_seq_len (a cut assistant reply then has no <|im_end|> target);
    any left with no trained token are dropped. Returns (examples, n_truncated, n_dropped)."""
    examples, n_trunc, n_drop = [], 0, 0
    for msgs in conversations:
        ids, mask = render(msgs, tokenizer)
        if len(ids) > max_seq_len + 1:
            ids, mask = ids[:max_seq_len + 1], mask[:max_seq_len + 1]
            n_trunc += 1
        inputs, targets = labels_from_mask(ids, mask)
        if all(t == -100 for t in targets):
            n_drop += 1
            continue
        examples.append((inputs, targets))
    return examples, n_trunc, n_drop


def padded_batches(lengths, batch_size, rng, group_chunks=64):
    """One epoch of micro-batches (lists of example indices), length-grouped: shuffle, sort each chunk
    of batch_size * group_chunks examples by length, cut into batches, shuffle the batch order."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    chunk = batch_size * group_chunks
    for c in range(0, len(order), chunk):
        part = sorted(order[c:c + chunk], key=lambda i: -lengths[i])
        batches += [part[b:b + batch_size] for b in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def packed_rows(lengths, max_seq_len, rng):
    """One epoch of packed rows (lists of example indices whose lengths sum to <= max_seq_len):
    shuffle, then fill rows greedily in order, starting a new row when the next example does not fit."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    rows, row, used = [], [], 0
    for i in order:
        if row and used + lengths[i] > max_seq_len:
            rows.append(row)
            row, used = [], 0
        row.append(i)
        used += lengths[i]
    if row:
        rows.append(row)
    return rows


def collate_padded(examples, pad_id):
    """Right-padded rows; lengths (B,) is each conversation's own length (NEFTune scales its noise by it), and
    so are seq_lengths, the sequences the model attends over (what its FLOPs count: model.flops)."""
    T = max(len(x) for x, _ in examples)
    idx = torch.full((len(examples), T), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), T), -100, dtype=torch.long)
    for b, (x, y) in enumerate(examples):
        idx[b, :len(x)] = torch.tensor(x)
        targets[b, :len(y)] = torch.tensor(y)
    lengths = torch.tensor([len(x) for x, _ in examples])
    return dict(idx=idx, targets=targets, lengths=lengths, seq_lengths=lengths)


def collate_packed(rows, max_seq_len, pad_id):
    """rows: list of lists of (inputs, targets) examples, each list fitting in max_seq_len. seq_lengths: every
    packed document's length (each attends over itself only; the padding tails are not counted)."""
    B, T = len(rows), max_seq_len
    idx = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), -100, dtype=torch.long)
    positions = torch.zeros((B, T), dtype=torch.long)
    doc_ids = torch.zeros((B, T), dtype=torch.long)
    for b, row in enumerate(rows):
        t = 0
        for d, (x, y) in enumerate(row):
            n = len(x)
            assert t + n <= T, f"packed row of {t + n} tokens exceeds max_seq_len={T}"
            idx[b, t:t + n], targets[b, t:t + n] = torch.tensor(x), torch.tensor(y)
            positions[b, t:t + n] = torch.arange(n)
            doc_ids[b, t:t + n] = d
            t += n
        doc_ids[b, t:] = len(row)        # the padding tail is a document of its own
        positions[b, t:] = torch.arange(T - t)
    seq_lengths = torch.tensor([len(x) for row in rows for x, _ in row])
    return dict(idx=idx, targets=targets, positions=positions, doc_ids=doc_ids, seq_lengths=seq_lengths)


def micro_batches(examples, batch_size, max_seq_len, pad_id, packing=True, seed=0, start=0):
    """Endless micro-batches over shuffled epochs: batch_size packed rows, or batch_size padded
    conversations. Deterministic in seed, so every rank draws the same sequence. start: skip that many
    micro-batches first (a resumed run continues the sequence exactly; skipped ones are not collated)."""
    rng = random.Random(seed)
    lengths = [len(x) for x, _ in examples]
    n = 0
    while True:
        if packing:
            rows = packed_rows(lengths, max_seq_len, rng)
            groups = [rows[r:r + batch_size] for r in range(0, len(rows), batch_size)]
        else:
            groups = padded_batches(lengths, batch_size, rng)
        for group in groups:
            n += 1
            if n <= start:
                continue
            if packing:
                yield collate_packed([[examples[i] for i in row] for row in group], max_seq_len, pad_id)
            else:
                yield collate_padded([examples[i] for i in group], pad_id)
