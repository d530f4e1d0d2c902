# REINFORCE++ (Hu 2025): one completion per prompt, no critic and no group; the per-token KL is in the reward and
# the returns are normalised over the whole global batch.
# python grpo.py configs/grpo_reinforce_pp.py
out_dir = "out/reinforce_pp"
advantage_estimator = "reinforce++"
num_generations = 1
prompts_per_step = 128
dynamic_sampling = False
kl_coef = 0.05
kl_estimator = "k1"
gamma = 1.0
loss_type = "dapo"
