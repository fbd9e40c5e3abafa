"""Where a decode step's time goes: decode throughput per round and a torch.profiler summary per variant.

Same model as bench_engram.py section (b) (12 layers, hidden 2048, 16 experts top-2, Engram at layers 1 and 6).
Variants: the MoE without Engram; Engram with tables in HBM, gathered inline on the main stream
(``engram_prefetch="off"``) or on the side stream (``"all"``); tables in host memory (``"host"``); the fused
PyTorch path (``engram_kernels="torch"``); and the reference path. Each decode round is 24 greedy steps after a
256-token prompt; rounds are interleaved. The profiler tables (4 steps at batch 256) list the ops with the most
GPU and CPU time, and count the host synchronisations.

Run: ``python bench/decode_profile.py --out bench/results/decode_profile_h100.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engram import (  # noqa: E402
    CUDA,
    decode_models,
    decode_step,
    fmt,
    free_memory,
    prefill_throughput,
    start_decode,
    sync,
    table_rows,
    timed_decode,
)

VARIANTS = {
    # name: (model, placement, kernels, prefetch)
    "moe": ("moe", None, None, None),
    "engram_hbm_inline": ("engram", "device", "auto", "off"),
    "engram_hbm_side_stream": ("engram", "device", "auto", "all"),
    "engram_host": ("engram", "host", "auto", "host"),
    "engram_hbm_torch_kernels": ("engram", "device", "torch", "off"),
    "engram_hbm_reference": ("engram", "device", "reference", "off"),
}
SYNC_OPS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "aten::_local_scalar_dense", "cudaMemcpy")


def profile_decode(model, batch, prompt, steps, vocab):
    """The torch profiler's record of `steps` cached decode steps after the prefill and warm-up."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
    with torch.inference_mode():
        cache, token = start_decode(model, batch, prompt, vocab)
        with profile(activities=activities) as prof:
            for _ in range(steps):
                token = decode_step(model, token, cache)
            sync()
    return prof


def summarize(prof, steps):
    events = prof.key_averages()
    device_attr = (
        "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    )
    gpu_us = sum(getattr(e, device_attr) for e in events) / steps
    syncs = {e.key: e.count // steps for e in events if any(s in e.key for s in SYNC_OPS)}
    kernels = (
        sum(e.count for e in events if getattr(e, device_attr) > 0 and e.device_type.name == "CUDA") / steps
    )
    return {
        "gpu_busy_us_per_step": gpu_us,
        "gpu_kernels_per_step": kernels,
        "host_syncs_per_step": syncs,
        "top_gpu": events.table(sort_by=device_attr, row_limit=12, max_name_column_width=60),
        "top_cpu": events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60),
    }


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="bench/results/decode_profile.json")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    engram, moe = decode_models(args.smoke)
    models = {"engram": engram, "moe": moe}
    vocab = engram.config.vocab_size
    batches = [4] if args.smoke else [64, 256]
    prompt, steps = (8, 4) if args.smoke else (256, 24)

    def select(name):
        kind, placement, kernels, prefetch = VARIANTS[name]
        model = models[kind]
        if kind == "engram":
            model.config.engram_kernels, model.config.engram_prefetch = kernels, prefetch
            if CUDA and model.config.engram_table_placement != placement:
                model.set_engram_table_placement(placement)
                free_memory()
        return model

    order = ["moe", "engram_hbm_inline", "engram_hbm_side_stream", "engram_hbm_torch_kernels"]
    order += ["engram_hbm_reference", "engram_host"]
    report = {"device": torch.cuda.get_device_name() if CUDA else "cpu", "prompt": prompt, "steps": steps}
    results = {name: {"decode_tok_s_rounds": {b: [] for b in batches}} for name in order}
    for name in order:
        results[name]["prefill_tok_s"] = prefill_throughput(
            select(name), *((2, 16) if args.smoke else (8, 2048)), vocab
        )
    for round_index in range(args.rounds):
        for name in order if round_index % 2 == 0 else order[::-1]:
            model = select(name)
            for batch in batches:
                tok_s = timed_decode(model, batch, prompt, steps, vocab)[0]
                results[name]["decode_tok_s_rounds"][batch].append(tok_s)
    for name in order:
        model = select(name)
        prof = profile_decode(model, batches[-1], prompt, 4, vocab)
        results[name][f"profile_b{batches[-1]}"] = summarize(prof, 4)
        rounds = results[name]["decode_tok_s_rounds"]
        results[name]["decode_tok_s"] = {b: statistics.median(v) for b, v in rounds.items()}
        report["results"] = results
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    base = results["moe"]
    rows = []
    for name in order:
        r = results[name]
        p = r[f"profile_b{batches[-1]}"]
        row = [name, fmt(r["prefill_tok_s"]), fmt(r["prefill_tok_s"] / base["prefill_tok_s"])]
        for b in batches:
            row += [fmt(r["decode_tok_s"][b]), fmt(r["decode_tok_s"][b] / base["decode_tok_s"][b])]
        row += [
            fmt(p["gpu_busy_us_per_step"] / 1e3),
            fmt(p["gpu_kernels_per_step"]),
            sum(p["host_syncs_per_step"].values()),
        ]
        rows.append(row)
    headers = ["variant", "prefill tok/s", "vs MoE"]
    for b in batches:
        headers += [f"decode b{b} tok/s", "vs MoE"]
    headers += [f"GPU busy ms/step b{batches[-1]}", "kernels/step", "sync ops/step"]
    text = f"device: {report['device']}\n\n" + table_rows(headers, rows)
    text += "\n\nper-round decode tok/s:\n" + "\n".join(
        f"  {n}: "
        + ", ".join(f"b{b}: {[round(x) for x in v]}" for b, v in results[n]["decode_tok_s_rounds"].items())
        for n in order
    )
    for name in order:
        p = results[name][f"profile_b{batches[-1]}"]
        text += f"\n\n== {name}: host syncs/step {p['host_syncs_per_step']}\n{p['top_gpu']}\n{p['top_cpu']}"
    Path(args.out).with_suffix(".txt").write_text(text + "\n")
    print(text[:6000])


if __name__ == "__main__":
    main()
