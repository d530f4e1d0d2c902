# GPT-2-small-sized (124M with the GPT-2 tokenizer; 12 layers, d=768, 12 heads) on FineWeb-Edu, for one 8-GPU node.
# Prepare the data once:  python -m data.prepare --source=fineweb-edu --out=data/bin/fineweb-edu --tokenizer=gpt2
# Then:                   torchrun --standalone --nproc_per_node=8 pretrain.py configs/gpt2_small.py
out_dir = "out/gpt2_small"
data = "data/bin/fineweb-edu"
tokenizer = "gpt2"
n_layer = 12
n_head = 12
n_kv_head = 12             # MHA, as GPT-2
n_embd = 768
seq_len = 1024
batch_size = 32            # x 1024 tokens x 2 accum x 8 GPUs = 524,288 tokens/step (GPT-3 small's batch)
grad_accum = 2
max_steps = 19073          # ~10B tokens
lr = 6e-4
min_lr = 6e-5
warmup_steps = 700
weight_decay = 0.1
compile = True
log_interval = 10
eval_interval = 500
eval_iters = 50
ckpt_interval = 2000
sample_prompts = ("The meaning of life is", "In 1905, Einstein")
