"""Every post-training stage resumes exactly: a run halted at step k (halt_at_step) and continued with
init_from="resume" logs the same lines, step for step, as the run that was never interrupted."""

import re

import pytest

from conftest import run_script

SFT = ["sft.py", "--n_train=200", "--val_size=8", "--eval_accuracy_size=4", "--eval_samples=0", "--eval_interval=0",
       "--batch_size=2", "--max_steps=6", "--neftune_alpha=5.0", "--kernels=torch"]  # NEFTune: the RNG must resume
STAGES = {
    "sft": SFT,
    "sft_lora": SFT + ["--lora_r=4", "--lora_dropout=0.1"],  # adapter checkpoints, and LoRA dropout's RNG
    "reward": ["reward.py", "--task_pairs=48", "--task_val_pairs=8", "--batch_size=4", "--max_steps=6",
               "--eval_interval=100", "--kernels=torch"],
    # on-policy pairs sampled from the initial policy: saved with the checkpoint, not resampled
    "dpo": ["dpo.py", "--task_pairs=32", "--task_val_pairs=8", "--sampled_pairs=8", "--num_samples=2",
            "--eval_tasks=0", "--batch_size=4", "--max_steps=6", "--eval_interval=100", "--kernels=torch"],
    # KTO: unpaired task examples, mismatched pairs of each batch for z0, with the reference precomputed again on
    # resume (the mismatched pairs of the batches still to come)
    "dpo_kto": ["dpo.py", "--loss_type=kto", "--task_pairs=16", "--task_val_pairs=4", "--sampled_pairs=4",
                "--num_samples=1", "--eval_tasks=0", "--batch_size=4", "--max_steps=6", "--eval_interval=100",
                "--precompute_ref_logprobs=True", "--lr=1e-3", "--kernels=torch"],
    # dynamic sampling (each rank's place in its prompt stream), the sampling generator, a reloaded reference
    "grpo": ["grpo.py", "configs/grpo_tiny.py", "--max_steps=4", "--dynamic_sampling=True", "--beta=0.1",
             "--num_ppo_epochs=2"],
    # the KL in the reward, minibatches (shuffled by the CPU RNG), GSPO's sequence ratio
    "rloo": ["grpo.py", "configs/grpo_tiny.py", "--max_steps=4", "--advantage_estimator=rloo", "--kl_coef=0.1",
             "--dynamic_sampling=False", "--num_mini_batches=2", "--importance_sampling_level=sequence"],
    # the critic and its optimizer, the adaptive KL coefficient, epochs x minibatches, the ptx stream
    "ppo": ["grpo.py", "configs/grpo_tiny.py", "--max_steps=4", "--advantage_estimator=gae", "--value_model=policy",
            "--num_generations=1", "--prompts_per_step=4", "--dynamic_sampling=False", "--kl_coef=0.05",
            "--kl_target=0.01", "--kl_horizon=100", "--num_ppo_epochs=2", "--num_mini_batches=2", "--ptx_coef=0.5",
            "--ptx_batch_size=2", "--lr=1e-3"],
}
HALT = {"sft": 3, "sft_lora": 3, "reward": 3, "dpo": 3, "grpo": 2, "rloo": 2, "ppo": 2, "dpo_kto": 3}
TIMING = re.compile(r"(gen )?tok/s [\d,.]+|mfu ([\d.]+%|n/a)|eta \d+m\d+s|\(\d+s\)")


def step_lines(log):
    """Each training log line by step, with the timing fields (tok/s, eta) taken out."""
    return {int(m.group(1)): TIMING.sub("", line) for line in log.splitlines()
            if (m := re.match(r"step (\d+)/\d+ \| loss", line))}


@pytest.mark.parametrize("stage", list(STAGES))
def test_resumed_run_logs_what_the_uninterrupted_run_logged(stage, tiny_ckpt, tmp_path):
    args = STAGES[stage] + ["--log_interval=1"]
    full = step_lines(run_script(args + [f"--init_from={tiny_ckpt}", f"--out_dir={tmp_path / 'full'}"]))
    halted = run_script(args + [f"--init_from={tiny_ckpt}", f"--out_dir={tmp_path / 'b'}",
                                f"--halt_at_step={HALT[stage]}"])
    assert "halted at step" in halted
    resumed = step_lines(run_script(args + ["--init_from=resume", f"--out_dir={tmp_path / 'b'}"]))
    assert sorted(resumed) == [s for s in sorted(full) if s > HALT[stage]], (sorted(resumed), sorted(full))
    for s in resumed:
        assert resumed[s] == full[s], f"step {s}:\n  resumed: {resumed[s]}\n  full:    {full[s]}"
