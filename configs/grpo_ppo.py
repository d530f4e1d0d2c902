# PPO, InstructGPT's RLHF step (as TRL's PPOTrainer): the learned reward of reward.py, a critic started from that
# reward model, the KL to the SFT policy in the per-token reward, GAE advantages, several optimizer steps per batch.
# python grpo.py configs/grpo_ppo.py          (after python sft.py && python reward.py)
out_dir = "out/ppo"
advantage_estimator = "gae"
reward_funcs = ()                  # the learned reward only (reward_funcs=('exact',) would add the verifier)
reward_model = "out/reward/ckpt.pt"
value_model = "reward"
missing_eos_penalty = 1.0          # a reply cut off at max_new_tokens: the reward model would score it as finished
num_generations = 1                # no groups: the critic is the baseline
prompts_per_step = 128             # 128 completions per step, as GRPO's 8 prompts x 16
dynamic_sampling = False
kl_coef = 0.05
kl_estimator = "k1"
gamma = 1.0
lam = 0.95
loss_type = "dapo"                 # TRL's PPO: the mean over every token of a minibatch
num_ppo_epochs = 4
num_mini_batches = 2
vf_coef = 0.1
cliprange_value = 0.2
