# Reward model on UltraFeedback-binarized (HuggingFaceH4/ultrafeedback_binarized, downloaded through
# `datasets`; splits train_prefs / test_prefs) for GPU users. Start from an SFT model of a few hundred
# million parameters or more; the tiny CPU models of the embedded chain cannot judge open-ended replies.
# python reward.py configs/reward_ultrafeedback.py --init_from=out/sft/ckpt.pt
# torchrun --standalone --nproc_per_node=8 reward.py configs/reward_ultrafeedback.py
# Offline: --data=uf_train.parquet --val_data=uf_test.parquet (the same schema)
data = "HuggingFaceH4/ultrafeedback_binarized"
train_split = "train_prefs"
val_data = "HuggingFaceH4/ultrafeedback_binarized"
val_split = "test_prefs"
max_val_records = 2000
max_len = 1024                 # longer pairs are dropped (counted in the log), never cut
center_coef = 0.01             # keep rewards near 0: grpo.py compares them across prompts
batch_size = 8                 # pairs per GPU per micro-batch: 16 sequences
grad_accum = 4                 # x 8 GPUs: 256 pairs per step
num_epochs = 1.0               # reward models overfit after one epoch
lr = 5e-6
min_lr = 5e-7
warmup_steps = 20
weight_decay = 0.0
activation_checkpointing = True
eval_interval = 50
log_interval = 10
