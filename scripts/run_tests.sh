#!/usr/bin/env bash
# README command 2: set up with every extra, then run the default test suite (slow tests: add `-m slow`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "train,eval,test"
.venv/bin/python -m pytest -q "$@"
