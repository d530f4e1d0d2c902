# A few GRPO steps of a tiny run on the CPU (tests/test_grpo.py uses it with the tiny_ckpt fixture):
# python grpo.py configs/grpo_tiny.py --init_from=PATH --out_dir=/tmp/grpo_tiny
n_train = 64
num_generations = 4
prompts_per_step = 2
max_new_tokens = 8
max_steps = 2
micro_batch_size = 4
eval_interval = 0
eval_size = 8
eval_batch_size = 8
eval_samples = 0
kernels = "torch"
