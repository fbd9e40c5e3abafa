#!/usr/bin/env python
"""Thin entry point: the same as the `engram-evaluate` command (see engram_moe/cli/evaluate.py).

python scripts/evaluate.py prepare-data --out eval-data
python scripts/evaluate.py run MODEL_DIR --data-dir eval-data --output-dir eval-out --confirm-run-unsafe-code
"""

import sys

from engram_moe.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
