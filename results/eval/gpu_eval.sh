#!/usr/bin/env bash
# The recorded evaluation behind results/eval/README.md, run on one GPU in three or four device calls with
# the machine kept warm in between. Everything heavy runs in the background (setsid: it outlives a call), so
# no suite is bound by one call's 10-minute limit; every suite stops at one deadline, TOTAL_BUDGET after
# `setup`.
#
#   stage `setup` (call 1, carry .evalcarry): install the carried Python packages, unpack the local evaluation
#       data, keep the first part of the baseline GGUF, and start `ours` in the background.
#   stage `ours` (background): train small-engram-moe with engram-train (the recipe of
#       results/train_gpu/run.sh: 400 steps, batch 16 x 512 tokens, embedded corpus, bf16, seed 0), then
#       evaluate it, one process per suite, all at once.
#   stage `baseline` (call 2, carry .evalcarry2): join the GGUF, convert it (engram-evaluate convert-gguf),
#       start `baseline-bg` (the SmolLM2-135M-Instruct baseline, evaluated the same way) in the background,
#       and wait up to WAIT_BUDGET seconds.
#   stage `finish` (call 3, and 4 if need be): wait for both (at most FINISH_BUDGET seconds) and pack into $OUT.
#
# Suites and settings (the same for both models; engram-evaluate = lm-eval 0.4.13 on local data):
#   mmlu         5-shot (the paper's setting), all 14,042 questions, log-likelihood of A/B/C/D
#   bbh          3-shot answer-only, all 6,511 items, generations capped at MAX_BBH_TOKS tokens; BBH_TASK picks
#                the variant: bbh_fewshot_strip (default; ours, the answer stripped before exact match) or
#                lm-eval's own bbh_fewshot (it scores " False" != "False", so 0)
#   bbh_cot      3-shot chain of thought (the paper's setting), lm-eval's bbh_cot_fewshot, all 6,511 items,
#                generations capped at MAX_COT_TOKS tokens (lm-eval's own cap is 1,024)
#   humaneval    0-shot greedy pass@1, all 164 problems, generations capped at MAX_HE_TOKS tokens
#   niah         RULER niah_single_1, niah_multikey_2, niah_multikey_3 at 4,096 tokens, NIAH_LIMIT per task
#                (500, RULER's default, is every sample)
# Carried (ignored) inputs: .evalcarry/site312.tar.xz (lm-eval 0.4.13 with only the mmlu, bbh, humaneval
# and ruler task folders, datasets, transformers 5.24, gguf, nltk, wonderwords, ...), eval-data.tar.xz
# (engram-evaluate prepare-data), smol.gguf.xz.part-a; .evalcarry2/smol.gguf.xz.part-b.
# A CPU dry run of the same steps: DEVICE=cpu STEPS=2 LIMIT=2 BS=2 MMLU_SHOTS=0 NIAH_LEN=512 MAX_HE_TOKS=16 \
#   MAX_COT_TOKS=16 W=/tmp/dry CARRY=... CARRY2=... bash results/eval/gpu_eval.sh setup|baseline|finish
set -euo pipefail
STAGE=${1:?usage: gpu_eval.sh setup|ours|baseline|baseline-bg|finish}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
W=${W:-/tmp/engram_eval}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-400}
BATCH=${BATCH:-16}
LIMIT=${LIMIT:-}
NIAH_LIMIT=${NIAH_LIMIT:-500}
MAX_BBH_TOKS=${MAX_BBH_TOKS:-32}
MAX_COT_TOKS=${MAX_COT_TOKS:-256}
MAX_HE_TOKS=${MAX_HE_TOKS:-512}
MMLU_SHOTS=${MMLU_SHOTS:-5}
BBH_TASK=${BBH_TASK:-bbh_fewshot_strip}
NIAH_LEN=${NIAH_LEN:-4096}
SUITES=${SUITES:-mmlu bbh bbh_cot humaneval niah}  # which suites to run (e.g. SUITES=mmlu for one alone)
MODELS=${MODELS:-ours baseline}  # which models to evaluate (MODELS=baseline skips training ours)
# One batch size for every suite (dry runs); default: MMLU 8 (ours) and 16 (the baseline, float32 logits of
# 5-shot prompts up to ~3k tokens), BBH and HumanEval 64, chain-of-thought BBH 128, NIAH 32.
BS=${BS:-}
# Time plan (seconds): every suite of both models is stopped TOTAL_BUDGET after `setup` (its results are then
# missing, and its log says so); `baseline` returns after WAIT_BUDGET; `finish` waits at most FINISH_BUDGET and
# packs what there is, so a call stays inside the 10-minute limit; run `finish` again while suites still run.
TOTAL_BUDGET=${TOTAL_BUDGET:-1700}
WAIT_BUDGET=${WAIT_BUDGET:-560}
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

evaluate_model() {  # NAME MODEL_DIR MMLU_BATCH: the suites in parallel, each stopped at the deadline, merged
  local name=$1 model=$2 mmlu_bs=$3
  local secs=$(( $(cat "$W/deadline") - $(date +%s) ))
  (( secs > 30 )) || secs=30
  local dir="$W/$name" lim=()
  mkdir -p "$dir"
  [ -n "$LIMIT" ] && lim=(--limit "$LIMIT")
  echo "$name: suites get $secs s"
  local common=(run "$model" --data-dir "$W/eval-data" --device "$DEVICE" --dtype auto --bootstrap-iters 1000)
  local ev=(timeout -k 5 "$secs" "$PY" -m engram_moe.cli.evaluate)
  if [[ " $SUITES " == *" mmlu "* ]]; then
    "${ev[@]}" "${common[@]}" "${lim[@]}" --tasks mmlu --num-fewshot "$MMLU_SHOTS" --batch-size "${BS:-$mmlu_bs}" \
      --max-length 4096 --output-dir "$dir/mmlu" >"$dir/mmlu.log" 2>&1 &
  fi
  if [[ " $SUITES " == *" bbh "* ]]; then
    "${ev[@]}" "${common[@]}" "${lim[@]}" --tasks "$BBH_TASK" --batch-size "${BS:-64}" \
      --max-gen-toks "$MAX_BBH_TOKS" --max-length 4096 --output-dir "$dir/bbh" >"$dir/bbh.log" 2>&1 &
  fi
  if [[ " $SUITES " == *" bbh_cot "* ]]; then
    "${ev[@]}" "${common[@]}" "${lim[@]}" --tasks bbh_cot_fewshot --batch-size "${BS:-128}" \
      --max-gen-toks "$MAX_COT_TOKS" --max-length 4096 --output-dir "$dir/bbh_cot" >"$dir/bbh_cot.log" 2>&1 &
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

wait_for() {  # SECONDS NAME...: wait until each NAME.done exists or SECONDS pass, printing progress
  local until=$(( $(date +%s) + $1 )) name missing
  shift
  while :; do
    missing=()
    for name in "$@"; do [ -f "$W/$name.done" ] || missing+=("$name"); done
    (( ${#missing[@]} == 0 )) && { echo "done: $*"; return 0; }
    (( $(date +%s) >= until )) && { echo "still running: ${missing[*]}"; return 1; }
    sleep 20
    echo "$(date +%T) running: ${missing[*]}; $(( $(cat "$W/deadline") - $(date +%s) )) s to the deadline;" \
      "$(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null || true)"
  done
}

case "$STAGE" in
setup)
  mkdir -p "$W/site" "$W/gguf" "$NLTK_DATA/tokenizers/punkt_tab"
  tar -C "$W/site" -xJf "$CARRY/site312.tar.xz"
  tar -C "$W" -xJf "$CARRY/eval-data.tar.xz"
  cp "$CARRY/smol.gguf.xz.part-a" "$W/gguf/"
  echo $(( $(date +%s) + TOTAL_BUDGET )) >"$W/deadline"
  "$PY" - <<'PY'
import torch, transformers, lm_eval, datasets, engram_moe
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
print("transformers", transformers.__version__, "lm_eval", lm_eval.__version__, "datasets", datasets.__version__)
PY
  if [[ " $MODELS " == *" ours "* ]]; then
    setsid nohup bash "$REPO/results/eval/gpu_eval.sh" ours >"$W/ours.log" 2>&1 </dev/null &
    sleep 5
    tail -n 5 "$W/ours.log" || true
  fi
  ;;
ours)
  start=$(date +%s)
  "$PY" "$REPO/scripts/train.py" --model small-engram-moe --output-dir "$W/train/small-engram-moe" --seq-len 512 \
    --batch-size "$BATCH" --max-steps "$STEPS" --lr 2e-3 --warmup-steps 40 --eval-every 100 --save-every 0 \
    --log-every 10 --bf16 --seed 0 --no-progress --no-plot $([ "$DEVICE" = cpu ] && echo --cpu)
  echo "trained in $(( $(date +%s) - start )) s"
  evaluate_model ours "$W/train/small-engram-moe/final" 8 || echo "ours: a suite failed"
  echo "ours finished after $(( $(date +%s) - start )) s"
  touch "$W/ours.done"
  ;;
baseline)
  start=$(date +%s)
  if [[ " $MODELS " == *" baseline "* ]]; then
    cat "$W/gguf/smol.gguf.xz.part-a" "$CARRY2/smol.gguf.xz.part-b" | xz -d >"$W/gguf/SmolLM2-135M-Instruct.Q4_1.gguf"
    "$PY" -m engram_moe.cli.evaluate convert-gguf "$W/gguf/SmolLM2-135M-Instruct.Q4_1.gguf" --out "$W/smollm2-135m"
    echo "converted in $(( $(date +%s) - start )) s"
    setsid nohup bash "$REPO/results/eval/gpu_eval.sh" baseline-bg >"$W/baseline.log" 2>&1 </dev/null &
  fi
  wait_for $(( WAIT_BUDGET - ($(date +%s) - start) )) $MODELS || true
  for name in $MODELS; do tail -n 3 "$W/$name.log" || true; done
  ;;
baseline-bg)
  start=$(date +%s)
  evaluate_model baseline "$W/smollm2-135m" 16 || echo "baseline: a suite failed"
  echo "baseline finished after $(( $(date +%s) - start )) s"
  touch "$W/baseline.done"
  ;;
finish)
  start=$(date +%s)
  wait_for "$FINISH_BUDGET" $MODELS || echo "packing what there is"
  if [[ " $MODELS " == *" ours "* ]]; then
    final="$W/train/small-engram-moe/final"
    "$PY" -m engram_moe.cli.evaluate card "$final" --results "$W/ours/all/results.json" \
      --out "$W/ours/MODEL_CARD.md" --model-id engram-moe/small-engram-moe-400steps || true
    mkdir -p "$W/pack/train"
    cp "$final/config.json" "$final/train_config.json" "$W/train/small-engram-moe/summary.json" "$W/pack/train/" || true
    cp "$W/train/small-engram-moe/metrics.jsonl" "$W/pack/train/" 2>/dev/null || true
  fi
  for name in $MODELS; do
    mkdir -p "$W/pack/$name"
    cp -r "$W/$name/all" "$W/$name/MODEL_CARD.md" "$W/pack/$name/" 2>/dev/null || true
    for suite in $SUITES; do
      mkdir -p "$W/pack/$name/$suite"
      cp "$W/$name/$suite/results.json" "$W/$name/$suite/summary.md" "$W/pack/$name/$suite/" 2>/dev/null || true
      # progress bars rewrite one line with \r: keep each bar's last state, and the end of the log
      tr '\r' '\n' <"$W/$name/$suite.log" 2>/dev/null | grep -v '^\s*$' | tail -n 60 >"$W/pack/$name/$suite/log.txt" || true
    done
    cp "$W/$name.log" "$W/pack/$name/run.log" 2>/dev/null || true
  done
  "$PY" -c "import json, torch; print(json.dumps({'gpu': torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu', 'torch': torch.__version__}))" >"$W/pack/env.json"
  tar -C "$W/pack" -czf "${OUT:-$W}/eval_gpu.tar.gz" .
  declare -A label=([ours]=small-engram-moe [baseline]=SmolLM2-135M)
  tables=() names=()
  for name in $MODELS; do tables+=("$W/$name/all"); names+=("${label[$name]}"); done
  "$PY" -m engram_moe.cli.evaluate table "${tables[@]}" --names "$(IFS=,; echo "${names[*]}")" || true
  echo "finish took $(( $(date +%s) - start )) s"
  ;;
*)
  echo "unknown stage $STAGE" >&2
  exit 2
  ;;
esac
