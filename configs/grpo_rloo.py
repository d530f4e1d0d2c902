# RLOO (Ahmadian et al. 2024): each completion's baseline is the mean score of the other G - 1 completions of its
# prompt; the KL to the reference is in the reward (summed over the completion), as in TRL's RLOO.
# python grpo.py configs/grpo_rloo.py
out_dir = "out/rloo"
advantage_estimator = "rloo"
num_generations = 16
prompts_per_step = 8
kl_coef = 0.05
