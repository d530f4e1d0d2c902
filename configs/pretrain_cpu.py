# The CPU default, spelled out (identical to running `python pretrain.py` with no arguments):
# a 3M-parameter GQA model on the embedded Python-stdlib corpus, a few minutes on a laptop.
out_dir = "out/pretrain"
data = "embedded"
n_layer = 4
n_head = 6
n_kv_head = 2
n_embd = 192
seq_len = 256
batch_size = 16
grad_accum = 1
max_steps = 300
lr = 3e-3
min_lr = 3e-4
warmup_steps = 30
eval_interval = 100
ckpt_interval = 100
