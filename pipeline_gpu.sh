#!/usr/bin/env bash
# GPU recipe, in the style of nanochat's speedrun: one script from raw web text to a report card.
#
#   UNMEASURED. This recipe has not been run yet: no wall time, loss or benchmark score for it exists, and
#   none may be quoted until a run has produced one (the report it writes is the record).
#
#   bash pipeline_gpu.sh                       # one node; NPROC defaults to the number of GPUs
#   MAX_STEPS=2000 bash pipeline_gpu.sh        # a shorter pretraining run (the full one is ~10B tokens)
#
#   1. FineWeb-Edu (sample-10BT) downloaded (resumable: huggingface_hub skips the files it has) and tokenised
#      with the GPT-2 tokenizer by data/prepare.py --sharded (one resumable shard per parquet file, a progress
#      line, then joined into data/bin/fineweb-edu/train.bin and val.bin)
#   2. pretraining a GPT-2-small-class model (124M, configs/gpt2_small.py) under torchrun     -> out/gpt2_small
#   3. eval.py on the base model: val bits per byte, ARC-Easy/Challenge, HellaSwag, MMLU (5-shot), GSM8K (5-shot)
#   4. SFT on a public chat mix: SmolTalk (HuggingFaceTB/smol-smoltalk) plus GSM8K's training problems as
#      conversations ending in "#### N", so the model learns the answer format RL rewards        -> out/sft_gpu
#   5. RL on GSM8K: GRPO (configs/grpo_gsm8k.py: Dr. GRPO loss, clip-higher, k3 KL with beta 0.04, the
#      "#### N" reward), from the SFT model                                                       -> out/grpo_gsm8k
#   6. eval.py on the SFT and RL models (the benchmarks above and GSM8K zero-shot through the chat template)
#   7. report.py: out/report/report.md, every stage's curves and the summary table
# Needs the network (hub datasets, the GPT-2 tokenizer files) and about 60 GB of disk for the data.
set -euo pipefail
cd "$(dirname "$0")"
NPROC=${NPROC:-$(nvidia-smi -L | wc -l)}
MAX_STEPS=${MAX_STEPS:-19073}                # configs/gpt2_small.py: ~10B tokens at 524,288 tokens/step
GRAD_ACCUM=$(( 16 / NPROC > 0 ? 16 / NPROC : 1 ))  # keep 32 x 1024 x 16 = 524,288 tokens/step on 1-8 GPUs
RAW=${RAW:-data/raw/fineweb-edu}
DATA=data/bin/fineweb-edu
REPORT_DIR=out/report
RUN="torchrun --standalone --nproc_per_node=$NPROC"
# configs/grpo_gsm8k.py's system prompt, which RL trained with
SYSTEM="Solve the math problem step by step. End your reply with the final answer on its own line, \
written as '#### <number>'."
BENCH=val,arc_easy,arc_challenge,hellaswag,mmlu,gsm8k
t0=$(date +%s)

# 1. data
python - "$RAW" <<'EOF'
import sys
from huggingface_hub import snapshot_download
snapshot_download("HuggingFaceFW/fineweb-edu", repo_type="dataset", allow_patterns="sample/10BT/*",
                  local_dir=sys.argv[1])
EOF
[ -f $DATA/meta.json ] || python -m data.prepare --source=$RAW/sample/10BT --out=$DATA --tokenizer=gpt2 --sharded

# 2. pretraining
$RUN pretrain.py configs/gpt2_small.py --max_steps=$MAX_STEPS --grad_accum=$GRAD_ACCUM

# 3. the base model on the benchmarks
$RUN eval.py --ckpt=out/gpt2_small/ckpt.pt --evals=$BENCH --val_data=$DATA --stage=eval_base --report_dir=$REPORT_DIR

# 4. SFT on a public chat mix
python - <<'EOF'
import json, random
from data.chat import BadRecord, to_chat_messages
from data.records import iter_records
from data.rewards import gsm8k_example
rows, bad = [], 0
for _, _, r in iter_records("HuggingFaceTB/smol-smoltalk", split="train"):
    try:
        rows.append(dict(messages=to_chat_messages(r)))
    except BadRecord:
        bad += 1  # e.g. an empty turn: skipped and counted
for _, _, r in iter_records("openai/gsm8k", split="train", config="main"):
    ex = gsm8k_example(r)  # the worked solution already ends in "#### N"
    rows.append(dict(messages=[{"role": "user", "content": ex["prompt"]},
                               {"role": "assistant", "content": r["answer"]}]))
random.Random(0).shuffle(rows)
with open("data/sft_mix.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
print(f"data/sft_mix.jsonl: {len(rows):,} conversations ({bad} unusable SmolTalk records skipped)")
EOF
$RUN sft.py configs/sft_gpu.py --init_from=out/gpt2_small/ckpt.pt --data=data/sft_mix.jsonl --max_seq_len=1024

# 5. RL on GSM8K
$RUN grpo.py configs/grpo_gsm8k.py --init_from=out/sft_gpu/ckpt.pt --out_dir=out/grpo_gsm8k

# 6. the chat models on the benchmarks
for s in sft_gpu grpo_gsm8k; do
    $RUN eval.py --ckpt=out/$s/ckpt.pt --evals=$BENCH,gsm8k_chat --system_prompt="$SYSTEM" --val_data=$DATA \
        --stage=eval_$s --report_dir=$REPORT_DIR
done

# 7. the report
python report.py --report_dir=$REPORT_DIR
echo "pipeline_gpu done in $(( $(date +%s) - t0 ))s; report: $REPORT_DIR/report.md"
