"""Train an Engram-MoE model: `python scripts/train.py --help`, or `accelerate launch scripts/train.py ...`."""

from engram_moe.cli.train import main

raise SystemExit(main())
