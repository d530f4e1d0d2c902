#!/usr/bin/env bash
# The whole pipeline on the embedded default, on a CPU, in one command:
#
#   bash pipeline.sh
#
#   pretrain -> SFT -> reward model -> DPO -> RL (GRPO) -> eval -> report
#
# Every stage runs with its defaults (no arguments), on the bundled tokenizer and the embedded data:
#   pretrain.py  3M-parameter model on the Python standard library's source    -> out/pretrain/ckpt.pt
#   sft.py       the task family (data/tasks.py), from out/pretrain/ckpt.pt     -> out/sft/ckpt.pt
#   reward.py    Bradley-Terry reward model on (correct, wrong) answers, from out/sft/ckpt.pt -> out/reward/ckpt.pt
#   dpo.py       sigmoid DPO on the same pairs, from out/sft/ckpt.pt            -> out/dpo/ckpt.pt
#   grpo.py      RL from out/sft/ckpt.pt (grpo.py's default, where its settings were tuned), not from the DPO
#                model: GRPO, group-normalised advantages A = (r - mean) / (std + eps) over G=16 samples per
#                prompt, the exact-answer reward (rule-based; the reward model is not used), no KL term (beta=0)
#                                                                               -> out/grpo/ckpt.pt
#   eval.py      the RL model: val loss / bits per byte on the embedded corpus, task exact match, and the
#                standard benchmarks, which need their hub datasets: where those cannot be loaded (offline)
#                the report marks them unmeasured (HF_HUB_OFFLINE=1 makes that fail fast instead of retrying)
#   report.py    out/report/report.md with every stage's summary, plots and the summary table
#
# Stages and checkpoints go to out/ (as each script's defaults); a rerun overwrites them, and replaces each
# stage's entry in the report rather than adding another.
set -euo pipefail
cd "$(dirname "$0")"
REPORT_DIR=out/report
t0=$(date +%s)
stage() {  # run one stage, timing it
    local s=$(date +%s)
    echo "=== $* ==="
    "$@"
    echo "=== $2: $(( $(date +%s) - s ))s ==="
}
stage python pretrain.py
stage python sft.py
stage python reward.py
stage python dpo.py
stage python grpo.py
stage python eval.py --ckpt=out/grpo/ckpt.pt --evals=val,tasks,arc_easy,arc_challenge,hellaswag,mmlu,gsm8k \
    --missing_ok=True --limit=500 --max_new_tokens=64 --report_dir=$REPORT_DIR
python report.py --report_dir=$REPORT_DIR
echo "pipeline done in $(( $(date +%s) - t0 ))s; report: $REPORT_DIR/report.md"
