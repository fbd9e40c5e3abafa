"""The main job: `python scripts/demo.py [--steps N ...]` (same as the `engram-demo` command)."""

from engram_moe.cli.demo import main

if __name__ == "__main__":
    main()
