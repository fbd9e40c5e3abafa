"""Decode throughput A/B: does where the Engram tables live change the step time of code that never reads them?

Same models as bench_engram.py (b). Four variants, interleaved over several rounds so that machine drift hits all
alike: the MoE baseline while the Engram model's tables sit in HBM and while they sit in host memory, and the
Engram model (fast path) with its tables in HBM and in host memory. Wall time and process CPU time per step are
recorded, so a change of the host-side cost shows separately from GPU time.

Run: ``python bench/decode_ab.py --out bench/results/decode_ab_h100.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engram import CUDA, decode_models, fmt, free_memory, table_rows, timed_decode  # noqa: E402


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="bench/results/decode_ab.json")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    engram, moe = decode_models(args.smoke)
    engram.config.engram_prefetch = "all"
    batches, prompt, steps = ([4], 8, 4) if args.smoke else ([64, 256], 256, 24)
    names = {
        "device": ["moe (Engram tables in HBM)", "engram (tables in HBM)"],
        "host": ["moe (Engram tables in host memory)", "engram (tables in host memory)"],
    }
    runs = {n: {b: [] for b in batches} for pair in names.values() for n in pair}
    cpu = {n: {b: [] for b in batches} for pair in names.values() for n in pair}
    placement = "device"
    for round_index in range(args.rounds):
        for _ in range(2):
            for name in names[placement] if round_index % 2 == 0 else names[placement][::-1]:
                model = moe if name.startswith("moe") else engram
                for batch in batches:
                    tok_s, cpu_s = timed_decode(model, batch, prompt, steps, engram.config.vocab_size)
                    runs[name][batch].append(tok_s)
                    cpu[name][batch].append(cpu_s)
            placement = "host" if placement == "device" else "device"
            if CUDA:
                engram.set_engram_table_placement(placement)
                free_memory()
    # The first round warms up every shape: leave it out of the medians.
    summary = {
        n: {
            b: {
                "median_tok_s": statistics.median(v[1:] or v),
                "best_tok_s": max(v),
                "cpu_ms_per_step": 1e3 * statistics.median(cpu[n][b][1:] or cpu[n][b]),
            }
            for b, v in runs[n].items()
        }
        for n in runs
    }
    report = {
        "device": torch.cuda.get_device_name() if CUDA else "cpu",
        "rounds": args.rounds,
        "steps": steps,
        "prompt": prompt,
        "raw_tok_s": runs,
        "raw_cpu_s_per_step": cpu,
        "summary": summary,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    headers = ["variant"]
    for b in batches:
        headers += [f"b{b} median tok/s", "best", "CPU ms/step"]
    rows = [
        [n]
        + [
            fmt(x)
            for b in batches
            for x in (s[b]["median_tok_s"], s[b]["best_tok_s"], s[b]["cpu_ms_per_step"])
        ]
        for n, s in summary.items()
    ]
    text = f"device: {report['device']}\n\n" + table_rows(headers, rows)
    text += "\n\nraw tok/s per round:\n" + "\n".join(
        f"  {n}: " + ", ".join(f"b{b}: {[round(x) for x in v]}" for b, v in r.items())
        for n, r in runs.items()
    )
    Path(args.out).with_suffix(".txt").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
