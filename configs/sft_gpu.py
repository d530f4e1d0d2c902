# SFT on one or more GPUs: a real chat dataset, full fine-tuning, packed rows.
# $ python sft.py configs/sft_gpu.py --init_from=out/pretrain_gpu/ckpt.pt --data=path/to/chats.jsonl
# $ torchrun --nproc_per_node=8 sft.py configs/sft_gpu.py --data=...          (DDP; --parallel=fsdp for FSDP2)
# global batch = batch_size * grad_accum * world_size rows of max_seq_len tokens (here 64 x 2048 on 8 GPUs)
init_from = "out/pretrain/ckpt.pt"
out_dir = "out/sft_gpu"
data = "tasks"            # replace with local .jsonl/.parquet files or a hub dataset name
val_size = 500
packing = True
max_seq_len = 2048
batch_size = 8
grad_accum = 1
max_steps = 2000
lr = 2e-5                 # ~0.1x the pretraining peak for full fine-tuning at scale
min_lr = 2e-6
warmup_steps = 60         # ~3%
weight_decay = 0.0
eval_interval = 250
eval_accuracy_size = 500
kernels = "auto"          # Triton kernels on CUDA, document-masked attention for packed rows
compile = True
