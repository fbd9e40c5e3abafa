#!/usr/bin/env python
"""Thin entry point: `engram-evaluate publish` (see engram_moe/cli/evaluate.py and evaluation/publish.py).

    python scripts/publish.py MODEL_DIR --repo-id you/engram-moe-small --out hub/engram-moe-small \\
        --results eval-out/results.json
"""

import sys

from engram_moe.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main(["publish", *sys.argv[1:]]))
