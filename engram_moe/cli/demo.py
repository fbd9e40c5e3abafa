"""`engram-demo`: the main job on the embedded default (see engram_moe.demo)."""

from __future__ import annotations

import argparse
import dataclasses

from ..demo import DemoArgs, run_demo
from ..presets import PRESETS


def parse_args(argv=None) -> DemoArgs:
    defaults = DemoArgs()
    parser = argparse.ArgumentParser(description=__doc__)
    for field in dataclasses.fields(DemoArgs):
        flag = "--" + field.name.replace("_", "-")
        kwargs = {"default": getattr(defaults, field.name), "type": type(getattr(defaults, field.name))}
        if field.name == "preset":
            kwargs["choices"] = sorted(n for n in PRESETS if n.startswith(("tiny", "small")))
        parser.add_argument(flag, **kwargs)
    args = DemoArgs(**vars(parser.parse_args(argv)))
    for name in ("steps", "batch_size", "seq_len", "max_new_tokens", "eval_batches"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.warmup_steps < 0 or not args.lr > 0:
        parser.error(f"--warmup-steps must be >= 0 and --lr > 0, got {args.warmup_steps} and {args.lr}")
    return args


def main(argv=None) -> None:
    run_demo(parse_args(argv))


if __name__ == "__main__":
    main()
