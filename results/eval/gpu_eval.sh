#!/usr/bin/env bash
# The recorded evaluation behind results/eval/README.md, run on one GPU in two device calls:
#
#   stage `setup` (call 1): install the carried Python packages, unpack the local evaluation data, keep the
#       first part of the baseline GGUF, and start `ours` in the background (setsid: it outlives the call).
#   stage `ours` (background): train small-engram-moe with engram-train (the recipe of
#       results/train_gpu/run.sh: 400 steps, batch 16 x 512 tokens, embedded corpus, bf16, seed 0), then
#       evaluate it, one process per suite, all at once.
#   stage `finish` (call 2): join the GGUF, convert it (engram-evaluate convert-gguf), evaluate the
#       SmolLM2-135M-Instruct baseline the same way, wait for `ours`, and pack everything into $OUT.
#
# Suites and settings (the same for both models; engram-evaluate = lm-eval 0.4.13 on local data):
#   mmlu         5-shot (the paper's setting), all 14,042 questions, log-likelihood of A/B/C/D
#   BBH          3-shot answer-only (not the paper's chain of thought: CoT generations do not fit the device
#                time), all 6,511 items, generations capped at MAX_BBH_TOKS tokens; BBH_TASK picks the
#                variant: bbh_fewshot_strip (default; ours, the answer stripped before exact match) or
#                lm-eval's own bbh_fewshot (the recorded run used it: it scores " False" != "False", so 0)
#   humaneval    0-shot greedy pass@1, all 164 problems, generations capped at MAX_HE_TOKS tokens
#   niah         RULER niah_single_1, niah_multikey_2, niah_multikey_3 at 4,096 tokens, NIAH_LIMIT per task
# Carried (ignored) inputs: .evalcarry/site312.tar.xz (lm-eval 0.4.13 with only the mmlu, bbh, humaneval
# and ruler task folders, datasets, transformers 5.24, gguf, nltk, wonderwords, ...), eval-data.tar.xz
# (engram-evaluate prepare-data), smol.gguf.xz.part-a; .evalcarry2/smol.gguf.xz.part-b.
# A CPU dry run of the same steps: DEVICE=cpu STEPS=2 LIMIT=2 BS=2 MMLU_SHOTS=0 NIAH_LEN=512 MAX_HE_TOKS=16 \
#   W=/tmp/dry CARRY=... CARRY2=... bash results/eval/gpu_eval.sh setup|finish
set -euo pipefail
STAGE=${1:?usage: gpu_eval.sh setup|ours|finish}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
W=${W:-/tmp/engram_eval}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-400}
BATCH=${BATCH:-16}
LIMIT=${LIMIT:-}
NIAH_LIMIT=${NIAH_LIMIT:-100}
MAX_BBH_TOKS=${MAX_BBH_TOKS:-32}
MAX_HE_TOKS=${MAX_HE_TOKS:-512}
MMLU_SHOTS=${MMLU_SHOTS:-5}
BBH_TASK=${BBH_TASK:-bbh_fewshot_strip}
NIAH_LEN=${NIAH_LEN:-4096}
SUITES=${SUITES:-mmlu bbh humaneval niah}  # which suites to run (e.g. SUITES=mmlu to re-run one alone)
BS=${BS:-}  # one batch size for every suite (dry runs); default: 8 MMLU, 64 BBH and HumanEval, 32 NIAH
# Time plan (seconds): `ours` must end OURS_BUDGET after setup; `finish` packs by FINISH_BUDGET. A suite still
# running then is stopped (its results are missing, and the log says so) so the call always returns its files.
OURS_BUDGET=${OURS_BUDGET:-600}
FINISH_BUDGET=${FINISH_BUDGET:-540}
CARRY=${CARRY:-$REPO/.evalcarry}
CARRY2=${CARRY2:-$REPO/.evalcarry2}

export PYTHONPATH="$W/site:$REPO" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
# Eight evaluations share one GPU: the recorded run's baseline MMLU (batch 32, 5-shot prompts up to ~3k
# tokens, fp32 attention) ran out of memory beside the others; batch 8 and expandable segments since.
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_DATASETS_CACHE="$W/hf-datasets" HF_MODULES_CACHE="$W/hf-modules"
# RULER's module imports NLTK and asks for `punkt_tab`, which only its essay haystacks use; there is no
# network here, so an empty entry stops the download attempt.
export NLTK_DATA="$W/nltk_data"

evaluate_model() {  # NAME MODEL_DIR SECONDS: the four suites in parallel (each stopped after SECONDS), merged
  local name=$1 model=$2 secs=$3
  local dir="$W/$name" lim=()
  mkdir -p "$dir"
  [ -n "$LIMIT" ] && lim=(--limit "$LIMIT")
  echo "$name: suites get $secs s"
  local common=(run "$model" --data-dir "$W/eval-data" --device "$DEVICE" --dtype auto --bootstrap-iters 1000)
  local ev=(timeout -k 5 "$secs" "$PY" -m engram_moe.cli.evaluate)
  if [[ " $SUITES " == *" mmlu "* ]]; then
    "${ev[@]}" "${common[@]}" "${lim[@]}" --tasks mmlu --num-fewshot "$MMLU_SHOTS" --batch-size "${BS:-8}" \
      --max-length 4096 --output-dir "$dir/mmlu" >"$dir/mmlu.log" 2>&1 &
  fi
  if [[ " $SUITES " == *" bbh "* ]]; then
    "${ev[@]}" "${common[@]}" "${lim[@]}" --tasks "$BBH_TASK" --batch-size "${BS:-64}" \
      --max-gen-toks "$MAX_BBH_TOKS" --max-length 4096 --output-dir "$dir/bbh" >"$dir/bbh.log" 2>&1 &
  fi
  if [[ " $SUITES " == *" humaneval "* ]]; then
    "${ev[@]}" "${common[@]}" "${lim[@]}" --tasks humaneval --batch-size "${BS:-64}" \
      --max-gen-toks "$MAX_HE_TOKS" --max-length 4096 --confirm-run-unsafe-code --output-dir "$dir/humaneval" \
      >"$dir/humaneval.log" 2>&1 &
  fi
  if [[ " $SUITES " == *" niah "* ]]; then
    "${ev[@]}" "${common[@]}" --limit "${LIMIT:-$NIAH_LIMIT}" --tasks niah --batch-size "${BS:-32}" \
      --max-seq-lengths "$NIAH_LEN" --max-length 4096 --output-dir "$dir/niah" >"$dir/niah.log" 2>&1 &
  fi
  local failed=0
  for job in $(jobs -p); do wait "$job" || failed=1; done
  local parts=()
  for suite in $SUITES; do
    [ -f "$dir/$suite/results.json" ] && parts+=("$dir/$suite/results.json") || echo "$name: $suite has no results"
  done
  "$PY" -m engram_moe.cli.evaluate merge "$dir/all" "${parts[@]}" >"$dir/merge.log" 2>&1 || failed=1
  return $failed
}

case "$STAGE" in
setup)
  mkdir -p "$W/site" "$W/gguf" "$NLTK_DATA/tokenizers/punkt_tab"
  tar -C "$W/site" -xJf "$CARRY/site312.tar.xz"
  tar -C "$W" -xJf "$CARRY/eval-data.tar.xz"
  cp "$CARRY/smol.gguf.xz.part-a" "$W/gguf/"
  echo $(( $(date +%s) + OURS_BUDGET )) >"$W/ours.deadline"
  "$PY" - <<'PY'
import torch, transformers, lm_eval, datasets, engram_moe
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
print("transformers", transformers.__version__, "lm_eval", lm_eval.__version__, "datasets", datasets.__version__)
PY
  setsid nohup bash "$REPO/results/eval/gpu_eval.sh" ours >"$W/ours.log" 2>&1 </dev/null &
  sleep 5
  tail -n 5 "$W/ours.log" || true
  ;;
ours)
  start=$(date +%s)
  "$PY" "$REPO/scripts/train.py" --model small-engram-moe --output-dir "$W/train/small-engram-moe" --seq-len 512 \
    --batch-size "$BATCH" --max-steps "$STEPS" --lr 2e-3 --warmup-steps 40 --eval-every 100 --save-every 0 \
    --log-every 10 --bf16 --seed 0 --no-progress --no-plot $([ "$DEVICE" = cpu ] && echo --cpu)
  echo "trained in $(( $(date +%s) - start )) s"
  left=$(( $(cat "$W/ours.deadline" 2>/dev/null || echo $(( $(date +%s) + OURS_BUDGET ))) - $(date +%s) ))
  evaluate_model ours "$W/train/small-engram-moe/final" $(( left > 60 ? left : 60 )) || echo "ours: a suite failed"
  echo "ours finished after $(( $(date +%s) - start )) s"
  touch "$W/ours.done"
  ;;
finish)
  start=$(date +%s)
  cat "$W/gguf/smol.gguf.xz.part-a" "$CARRY2/smol.gguf.xz.part-b" | xz -d >"$W/gguf/SmolLM2-135M-Instruct.Q4_1.gguf"
  "$PY" -m engram_moe.cli.evaluate convert-gguf "$W/gguf/SmolLM2-135M-Instruct.Q4_1.gguf" --out "$W/smollm2-135m"
  evaluate_model baseline "$W/smollm2-135m" $(( FINISH_BUDGET - 20 - ($(date +%s) - start) )) \
    || echo "baseline: a suite failed"
  echo "baseline finished after $(( $(date +%s) - start )) s"
  while [ ! -f "$W/ours.done" ] && [ $(( $(date +%s) - start )) -lt "$FINISH_BUDGET" ]; do sleep 2; done
  [ -f "$W/ours.done" ] || echo "ours did not finish in time"
  final="$W/train/small-engram-moe/final"
  "$PY" -m engram_moe.cli.evaluate card "$final" --results "$W/ours/all/results.json" --out "$W/ours/MODEL_CARD.md" \
    --model-id engram-moe/small-engram-moe-400steps || true
  mkdir -p "$W/pack/train"
  cp "$final/config.json" "$final/train_config.json" "$W/train/small-engram-moe/summary.json" "$W/pack/train/" || true
  cp "$W/train/small-engram-moe/metrics.jsonl" "$W/pack/train/" 2>/dev/null || true
  for name in ours baseline; do
    mkdir -p "$W/pack/$name"
    cp -r "$W/$name/all" "$W/$name/MODEL_CARD.md" "$W/pack/$name/" 2>/dev/null || true
    for suite in mmlu bbh humaneval niah; do
      mkdir -p "$W/pack/$name/$suite"
      cp "$W/$name/$suite/results.json" "$W/$name/$suite/summary.md" "$W/pack/$name/$suite/" 2>/dev/null || true
      tail -n 40 "$W/$name/$suite.log" >"$W/pack/$name/$suite/log.txt" 2>/dev/null || true
    done
  done
  cp "$W/ours.log" "$W/pack/" 2>/dev/null || true
  "$PY" -c "import json, torch; print(json.dumps({'gpu': torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu', 'torch': torch.__version__}))" >"$W/pack/env.json"
  tar -C "$W/pack" -czf "${OUT:-$W}/eval_gpu.tar.gz" .
  "$PY" -m engram_moe.cli.evaluate table "$W/ours/all" "$W/baseline/all" --names small-engram-moe,SmolLM2-135M || true
  echo "finish took $(( $(date +%s) - start )) s"
  ;;
*)
  echo "unknown stage $STAGE" >&2
  exit 2
  ;;
esac
