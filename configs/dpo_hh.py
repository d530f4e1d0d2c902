# DPO on Anthropic HH-RLHF (Anthropic/hh-rlhf, downloaded through `datasets`): full "\n\nHuman: ...
# \n\nAssistant: ..." transcripts split at the last assistant turn. Records that do not parse (e.g.
# an empty reply) are skipped and counted in the log (skip_bad).
# python dpo.py configs/dpo_hh.py --init_from=out/sft/ckpt.pt
data = "Anthropic/hh-rlhf"
train_split = "train"
val_data = "Anthropic/hh-rlhf"
val_split = "test"
skip_bad = True
max_val_records = 1000
max_len = 1024
beta = 0.1
rpo_alpha = 0.0                # pure DPO (the default adds an NLL term for the near-identical task pairs)
precompute_ref_logprobs = True
eval_tasks = 0
batch_size = 8
grad_accum = 2
num_epochs = 1.0
lr = 5e-7
min_lr = 0.0
warmup_steps = 50
activation_checkpointing = True
