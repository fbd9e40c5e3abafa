"""Where a training step's time goes: wall time vs GPU busy time, kernel launches, top GPU kernels.

Runs small-moe and small-engram-moe side by side (bf16 autocast, AdamW with the paper's groups, the same
random tokens) at each batch size given, and writes one JSON:

    python results/train_gpu/profile_step.py --batch-sizes 16 64 --out profile.json

A step whose GPU busy time is far below its wall time is bound by the CPU launching kernels, not by the GPU.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

from engram_moe import EngramMoEForCausalLM, build_token_map, engram_param_groups, get_preset
from engram_moe.data import load_default_tokenizer


def _model(name: str, token_map, device) -> EngramMoEForCausalLM:
    torch.manual_seed(0)
    model = EngramMoEForCausalLM._from_config(get_preset(name), dtype=torch.float32).to(device).train()
    if model.config.engram_layer_ids:
        model.set_engram_token_map(token_map)
    return model


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _step(model, optimizer, ids):
    with torch.autocast(ids.device.type, dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def measure(name: str, batch: int, seq: int, token_map, device, steps: int = 20) -> dict:
    model = _model(name, token_map, device)
    optimizer = torch.optim.AdamW(engram_param_groups(model, 1e-3), lr=1e-3, betas=(0.9, 0.95))
    ids = torch.randint(0, 49152, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    for _ in range(5):
        _step(model, optimizer, ids)
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        _step(model, optimizer, ids)
    _sync(device)
    wall = (time.perf_counter() - start) / steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            _step(model, optimizer, ids)
        _sync(device)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_us = sum(e.device_time for e in kernels) / 3  # kernels of one stream do not overlap
    by_name: dict[str, float] = {}
    for e in kernels:
        by_name[e.name] = by_name.get(e.name, 0.0) + e.device_time / 3
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:12]
    result = {
        "model": name,
        "batch": batch,
        "seq_len": seq,
        "wall_ms_per_step": wall * 1e3,
        "gpu_busy_ms_per_step": gpu_us / 1e3,
        "kernels_per_step": len(kernels) / 3,
        "tokens_per_sec": batch * seq / wall,
        "top_kernels_ms": {k[:90]: v / 1e3 for k, v in top},
    }
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--out", default="profile.json")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    token_map = build_token_map(load_default_tokenizer())
    rows = []
    for batch in args.batch_sizes:
        for name in ("small-moe", "small-engram-moe"):
            row = measure(name, batch, args.seq_len, token_map, device, args.steps)
            rows.append(row)
            print(
                f"{name:18s} batch {batch:3d}: {row['wall_ms_per_step']:7.1f} ms/step wall, "
                f"{row['gpu_busy_ms_per_step']:7.1f} ms GPU busy, {row['kernels_per_step']:6.0f} kernels, "
                f"{row['tokens_per_sec']:10,.0f} tokens/s"
            )
    by_batch = {}
    for row in rows:
        by_batch.setdefault(row["batch"], {})[row["model"]] = row
    for batch, pair in by_batch.items():
        ratio = pair["small-engram-moe"]["tokens_per_sec"] / pair["small-moe"]["tokens_per_sec"]
        print(f"batch {batch}: Engram-MoE / MoE tokens/s = {ratio:.3f}")
    with open(args.out, "w") as f:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        json.dump({"device": name, "torch": torch.__version__, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
