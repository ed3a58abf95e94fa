#!/usr/bin/env bash
# GPU check (docs/benchmarks.md, "GPU check"): the sampling kernel, rollout throughput and one LoRA GRPO step at
# LLaDA-8B shapes, then FSDP2 through the Trainer on a tiny recipe, each part under its own time limit (about 6
# minutes in all on one H200-class GPU).
# Each part prints its table when it finishes; the log goes to bench/results/gpu_check.log and the results to
# bench/results/gpu_check.json. Without a CUDA device it says so and exits 0.
#
#   bash bench/gpu_check.sh                 # PYTHON=... to use another interpreter than .venv/bin/python
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
LOG=bench/results/gpu_check.log
JSON=bench/results/gpu_check.json
mkdir -p bench/results

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device: nothing to check"
    exit 0
fi
rm -f "$JSON"
: > "$LOG"
status=0
# part and its limit in seconds (an 8B model is built in each of the last two)
for spec in kernel:60 rollout:150 grpo:120; do
    part="${spec%%:*}"
    limit="${spec##*:}"
    echo "== $part (limit ${limit}s)" | tee -a "$LOG"
    timeout -k 10 "$limit" "$PY" -u bench/gpu_check.py "$part" --json "$JSON" 2>&1 | tee -a "$LOG"
    rc="${PIPESTATUS[0]}"
    if [ "$rc" -ne 0 ]; then
        echo "== $part failed (exit $rc; 124 = over its ${limit}s limit)" | tee -a "$LOG"
        status=1
    fi
done
# FSDP2 through the Trainer (accelerate runs FSDP on GPUs only): a tiny SFT + GRPO recipe on min(2, GPUs) processes
echo "== fsdp2 (limit 240s)" | tee -a "$LOG"
timeout -k 10 240 "$PY" -u bench/fsdp2_check.py --json "$JSON" 2>&1 | tee -a "$LOG"
rc="${PIPESTATUS[0]}"
if [ "$rc" -ne 0 ]; then
    echo "== fsdp2 failed (exit $rc; 124 = over its 240s limit)" | tee -a "$LOG"
    status=1
fi
echo "log: $LOG; results: $JSON"
exit "$status"
