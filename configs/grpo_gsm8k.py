# GRPO on GSM8K (openai/gsm8k "main", downloaded through `datasets`) for GPU users, with the
# "#### <number>" answer reward. Needs an SFT model that can already do some grade-school math
# (a few hundred million parameters and up); the tiny CPU models of the embedded chain cannot.
# torchrun --nproc_per_node=8 grpo.py configs/grpo_gsm8k.py --init_from=out/sft/ckpt.pt
# Offline: --data_path=gsm8k_train.jsonl --eval_data_path=gsm8k_test.jsonl (same schema: question, answer)
dataset = "gsm8k"
system_prompt = ("Solve the math problem step by step. End your reply with the final answer "
                 "on its own line, written as '#### <number>'.")
reward_funcs = ("gsm8k",)
num_generations = 8
prompts_per_step = 64          # 512 completions per step, over all ranks
max_new_tokens = 384
temperature = 1.0
top_p = 1.0
beta = 0.04
epsilon = 0.2
epsilon_high = 0.28
loss_type = "dr_grpo"
scale_rewards = False
num_ppo_epochs = 1
max_steps = 300
micro_batch_size = 16
lr = 1e-6
min_lr = 1e-6
warmup_steps = 10
grad_clip = 1.0
eval_interval = 50
eval_size = 1319               # the whole test split
eval_batch_size = 256
eval_samples = 1
log_interval = 1
