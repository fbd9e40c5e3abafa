#!/usr/bin/env bash
# Two-GPU version of run.sh (not run yet: needs a machine with 2 GPUs). Every Engram table is row-sharded over
# the 2 processes (All-to-All lookups); the backbone is data-parallel (DDP). Per-device batch 8 x 2 GPUs keeps
# the global batch of the 1-GPU run (16), so the losses are comparable with run.sh's.
# Run from the repository root:  bash results/train_gpu/run_2gpu.sh
set -euo pipefail
OUT=${OUT:-results/train_gpu/2gpu}
WORK=${WORK:-/tmp/engram_train_2gpu}
STEPS=${STEPS:-400}
mkdir -p "$OUT" "$WORK"
for model in small-moe small-engram-moe; do
  accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision bf16 --dynamo_backend no \
    scripts/train.py --model "$model" --output-dir "$WORK/$model" --seq-len 512 --batch-size 8 \
    --max-steps "$STEPS" --lr 2e-3 --warmup-steps 40 --eval-every 100 --save-every 200 --log-every 10 \
    --bf16 --seed 0 --no-progress --no-plot
  cp "$WORK/$model/summary.json" "$OUT/${model}_summary.json"
  cp "$WORK/$model/metrics.jsonl" "$OUT/${model}_metrics.jsonl"
done
python3 -m engram_moe.training.compare --run "small-engram-moe=$OUT/small-engram-moe" --run "small-moe=$OUT/small-moe" \
  --baseline small-moe --json "$OUT/comparison.json" --png "$OUT/loss_curves.png"
