# DPO on UltraFeedback-binarized (HuggingFaceH4/ultrafeedback_binarized, downloaded through `datasets`;
# splits train_prefs / test_prefs), the Zephyr recipe (beta 0.1, LR 5e-7, one epoch, batch 128) for
# GPU users with an SFT model of a few hundred million parameters or more.
# python dpo.py configs/dpo_ultrafeedback.py --init_from=out/sft/ckpt.pt
# torchrun --standalone --nproc_per_node=8 dpo.py configs/dpo_ultrafeedback.py
# Other losses: --loss_type=ipo --beta=0.5 | --loss_type=simpo --beta=2.5 --simpo_gamma=1.4 --lr=8e-7 |
#               --loss_type=orpo --orpo_lambda=0.1 --lr=5e-6 (ORPO starts from the base model, no SFT)
# Offline: --data=uf_train.parquet --val_data=uf_test.parquet (the same schema)
data = "HuggingFaceH4/ultrafeedback_binarized"
train_split = "train_prefs"
val_data = "HuggingFaceH4/ultrafeedback_binarized"
val_split = "test_prefs"
max_val_records = 1000
max_len = 1024
loss_type = "sigmoid"
beta = 0.1
rpo_alpha = 0.0                # pure DPO (the default adds an NLL term for the near-identical task pairs)
precompute_ref_logprobs = True  # one model in memory during training
eval_tasks = 0                 # the bundled task check means nothing for this data
batch_size = 8                 # pairs per GPU per micro-batch: 16 sequences in one forward
grad_accum = 2                 # x 8 GPUs: 128 pairs per step
num_epochs = 1.0
lr = 5e-7
min_lr = 0.0
warmup_steps = 50              # ~10% of the ~480 steps
activation_checkpointing = True
eval_interval = 100
log_interval = 10
