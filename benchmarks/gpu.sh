#!/usr/bin/env bash
# The GPU checks and benchmarks of docs/benchmarks.md "On a GPU" as one command, for a machine
# with one CUDA device and PyTorch (about 6 minutes on one H200; each step has its own limit).
#
#   bash benchmarks/gpu.sh [OUT_DIR]    # log, device facts and result JSONs go to OUT_DIR
#                                       # (default: benchmarks/results)
#
# Uses the installed crossint, else this checkout's src/ (its dependencies must be installed).
# nccl under torchrun needs two GPUs: it is not checked here.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results}
mkdir -p "$out"
python3 -c "import crossint" 2>/dev/null || export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

python3 - <<'EOF' | tee "$out/gpu_device.txt"
import torch, transformers
print("torch", torch.__version__, "transformers", transformers.__version__)
print("device", torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).total_memory >> 30, "GiB")
EOF

step() {  # step SECONDS COMMAND...: run with a time limit, logging what it prints
    local limit=$1
    shift
    echo "== $* (limit ${limit} s)" | tee -a "$out/gpu.log"
    timeout "$limit" "$@" 2>&1 | tee -a "$out/gpu.log"
    echo "== exit ${PIPESTATUS[0]}" | tee -a "$out/gpu.log"
}

step 240 python3 -m pytest -q -p no:cacheprovider -rs tests -k cuda
step 120 python3 benchmarks/train_throughput.py --device cuda
step 120 python3 benchmarks/train_throughput.py --device cuda --autocast bfloat16
step 240 python3 benchmarks/train_throughput.py --device cuda --autocast bfloat16 \
    --shape 4,2048,65536,64,4096
step 150 python3 benchmarks/interactions.py --only penalty --device cuda
step 120 python3 benchmarks/harvest_overhead.py --device cuda --model-dtype bfloat16 --repeats 11
if [ "$out" != benchmarks/results ]; then
    cp benchmarks/results/*cuda*.json "$out"/ 2>/dev/null
fi
ls "$out"
