# A ~1.1B-parameter Llama-style GQA model (16 layers, d=2048, 32 heads / 8 KV heads, rope 500k; 0.97B
# non-embedding + 0.10B tied GPT-2 embedding) at seq 2048, sharded with FSDP2 over one or more 8-GPU nodes.
#   python -m data.prepare --source=fineweb-edu --out=data/bin/fineweb-edu --tokenizer=gpt2
#   torchrun --standalone --nproc_per_node=8 pretrain.py configs/llama_1b.py
out_dir = "out/llama_1b"
data = "data/bin/fineweb-edu"
tokenizer = "gpt2"
n_layer = 16
n_head = 32
n_kv_head = 8
n_embd = 2048
ffn_hidden = 8192
seq_len = 2048
rope_theta = 500000.0
tie_embeddings = True
batch_size = 8             # x 2048 x 4 accum x 8 GPUs = 524,288 tokens/step
grad_accum = 4
max_steps = 40000          # ~21B tokens
lr = 3e-4
min_lr = 3e-5
warmup_steps = 2000
lr_schedule = "wsd"        # stop or continue anywhere; anneal over the last 20%
parallel = "fsdp"
compile = True
activation_checkpointing = True
log_interval = 10
eval_interval = 1000
ckpt_interval = 2000
sample_prompts = ("The meaning of life is",)
