#!/usr/bin/env bash
# The first GPU run, in one call: about 5 minutes on one H100/H200 (see bench/gpu_check.py for the sections).
#
#   bash bench/gpu_check.sh OUT_DIR COMMIT                         # all sections
#   bash bench/gpu_check.sh OUT_DIR COMMIT --only tests,attention  # rerun some sections:
#                                 env, tests, attention, flce, pretrain, rollout
#   bash bench/gpu_check.sh OUT_DIR COMMIT --dry-run               # on the CPU, tiny shapes: checks the script itself
#
# OUT_DIR receives <section>.json (written as results come in), autotune.json and gpu_check.log. COMMIT is
# recorded in every file: the GPU machine may have no .git. The machine's own python is used (PYTHON=... to
# choose another); it needs torch and triton, not datasets or wandb.
set -euo pipefail
if [ $# -lt 2 ] || [[ "$1" == --* ]] || [[ "$2" == --* ]]; then
  echo "usage: bash bench/gpu_check.sh OUT_DIR COMMIT [--only SECTION[,SECTION...]] [--dry-run]" >&2
  exit 2
fi
OUT_DIR=$1
COMMIT=$2
shift 2
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" -u bench/gpu_check.py --out "$OUT_DIR" --commit "$COMMIT" "$@"
