#!/usr/bin/env bash
# One-GPU training comparison behind results/train_gpu/README.md: small-engram-moe against small-moe (the same
# backbone without Engram), same data (the embedded corpus, SmolLM2 tokenizer), batch, steps, LR and seed.
# Run from the repository root:  bash results/train_gpu/run.sh
# Writes <model>_summary.json, <model>_metrics.jsonl, env.json and comparison.json into $OUT.
set -euo pipefail
OUT=${OUT:-results/train_gpu}
WORK=${WORK:-/tmp/engram_train_gpu}
STEPS=${STEPS:-400}
BATCH=${BATCH:-16}
EVAL_EVERY=${EVAL_EVERY:-100}
PNG=${PNG:-1}
PY=${PYTHON:-python3}
mkdir -p "$OUT" "$WORK"
"$PY" - >"$OUT/env.json" <<'PYEOF'
import json, platform, accelerate, torch, transformers
print(json.dumps({
    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
    "accelerate": accelerate.__version__, "python": platform.python_version(),
}, indent=2))
PYEOF
cat "$OUT/env.json"
for model in small-moe small-engram-moe; do
  "$PY" scripts/train.py --model "$model" --output-dir "$WORK/$model" --seq-len 512 --batch-size "$BATCH" \
    --max-steps "$STEPS" --lr 2e-3 --warmup-steps 40 --eval-every "$EVAL_EVERY" --save-every 0 --log-every 10 \
    --bf16 --seed 0 --no-progress --no-plot
  cp "$WORK/$model/summary.json" "$OUT/${model}_summary.json"
  cp "$WORK/$model/metrics.jsonl" "$OUT/${model}_metrics.jsonl"
done
"$PY" -m engram_moe.training.compare --run "small-engram-moe=$OUT/small-engram-moe" --run "small-moe=$OUT/small-moe" \
  --baseline small-moe --json "$OUT/comparison.json" $([ "$PNG" = 1 ] && echo --png "$OUT/loss_curves.png")
