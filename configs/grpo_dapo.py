# DAPO (Yu et al. 2025) on top of GRPO: clip-higher, dynamic sampling, token-level loss averaging,
# soft overlong punishment, and no KL term.
# python grpo.py configs/grpo_dapo.py
epsilon = 0.2
epsilon_high = 0.28
dynamic_sampling = True
max_sampling_rounds = 3
loss_type = "dapo"
overlong_buffer = 4          # of max_new_tokens = 16
overlong_penalty = 1.0
beta = 0.0
