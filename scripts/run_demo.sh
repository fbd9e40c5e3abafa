#!/usr/bin/env bash
# README command 1: set up, then train a small Engram-MoE on the embedded corpus on CPU (a few minutes),
# generate a sample, save it and reload it. Extra arguments go to `engram-demo` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh train
.venv/bin/engram-demo "$@"
