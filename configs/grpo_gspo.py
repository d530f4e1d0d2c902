# GSPO (Zheng et al. 2025): one length-normalised importance ratio per completion, (pi(y) / pi_old(y))^(1/|y|), with
# its own, much narrower clip range. It only differs from GRPO off-policy, so each batch serves 2 minibatch steps.
# python grpo.py configs/grpo_gspo.py
out_dir = "out/gspo"
importance_sampling_level = "sequence"
epsilon = 3e-4
epsilon_high = 4e-4
num_mini_batches = 2
