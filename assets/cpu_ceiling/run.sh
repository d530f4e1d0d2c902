#!/bin/bash
# The CPU-ceiling measurements of the README (issue 16), in order; NANOGPT=path of a karpathy/nanoGPT checkout.
#   NANOGPT=../nanoGPT bash assets/cpu_ceiling/run.sh > assets/cpu_ceiling/run.log 2>&1
set -e
cd "$(dirname "$0")"
echo "=== $(date -u +%F) | $(python -c 'import torch; print("torch", torch.__version__)') | $(nproc) cores | load $(cut -d' ' -f1 /proc/loadavg)"
echo "=== fp32 GEMM peak"; python gemm_peak.py
echo "=== one profiled step of each model, one process, glibc keeping freed memory (MALLOPT=1)"
MALLOPT=1 python profile_both.py 2>&1 | grep -v -E "USDT|number of parameters"
echo "=== interleaved steps: plain / fused projections / nanoGPT, MALLOPT=1, 16 steps"
MALLOPT=1 N=16 python interleaved_fused.py 2>&1 | grep -v "number of parameters"
echo "=== the same on glibc's defaults"
N=16 python interleaved_fused.py 2>&1 | grep -v "number of parameters"
