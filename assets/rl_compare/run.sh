#!/usr/bin/env bash
# PPO vs GRPO vs RLOO from the pipeline's out/sft (and out/reward for PPO), 128 completions per step for all
# three (no dynamic sampling), 30 steps; seeds 1337, 1, 2; torch 2.13 CPU
cd "$(dirname "$0")/../.."   # the repo root, after bash pipeline.sh (its out/sft, out/reward)
L=out/rlcmp/logs; mkdir -p $L

mkdir -p out/rlcmp && cp out/sft/ckpt.pt out/rlcmp/sft.pt && cp out/reward/ckpt.pt out/rlcmp/reward.pt
C="--init_from=out/rlcmp/sft.pt --max_steps=30 --eval_interval=0 --ckpt_interval=0 --log_interval=5 --dynamic_sampling=False --report_dir=out/rlcmp/report"
for s in 1337 1 2; do
  WANDB_MODE=disabled python grpo.py --seed=$s $C --out_dir=out/rlcmp/grpo_s$s > $L/rl_grpo_s$s.log 2>&1
  WANDB_MODE=disabled python grpo.py configs/grpo_rloo.py --seed=$s $C --out_dir=out/rlcmp/rloo_s$s > $L/rl_rloo_s$s.log 2>&1
  WANDB_MODE=disabled python grpo.py configs/grpo_ppo.py --seed=$s $C --reward_model=out/rlcmp/reward.pt --out_dir=out/rlcmp/ppo_s$s > $L/rl_ppo_s$s.log 2>&1
done

