# KTO on trl-lib/kto-mix-14k (downloaded through `datasets`; splits train / test, 13,500 / 1,500 examples in
# TRL's unpaired conversational layout: prompt and completion as message lists, label a bool), for GPU users
# with an SFT model of a few hundred million parameters or more.
# python dpo.py configs/dpo_kto.py --init_from=out/sft/ckpt.pt
# torchrun --standalone --nproc_per_node=8 dpo.py configs/dpo_kto.py
# Paired data works too, unpaired (chosen desirable, rejected undesirable):
#   --data=HuggingFaceH4/ultrafeedback_binarized --train_split=train_prefs --val_data=... --val_split=test_prefs
# The log warns when desirable_weight * n_desirable / (undesirable_weight * n_undesirable) leaves [1, 4/3], and
# says which weights bring it back.
data = "trl-lib/kto-mix-14k"
train_split = "train"
val_data = "trl-lib/kto-mix-14k"
val_split = "test"
max_val_records = 1000
max_len = 1024
loss_type = "kto"
beta = 0.1
desirable_weight = 1.0
undesirable_weight = 1.0
precompute_ref_logprobs = True  # one model in memory during training (the mismatched pairs of every batch too)
eval_tasks = 0                 # the bundled task check means nothing for this data
batch_size = 8                 # examples per GPU per micro-batch (z0 comes from these 8 mismatched pairs)
grad_accum = 2                 # x 8 GPUs: 128 examples per step
num_epochs = 1.0
lr = 5e-7
min_lr = 0.0
warmup_steps = 10              # ~10% of the ~105 steps
activation_checkpointing = True
eval_interval = 25
log_interval = 5
