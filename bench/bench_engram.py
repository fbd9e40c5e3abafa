"""Engram GPU benchmark: every comparison side by side in one run, a printed table and a JSON file.

Sections (``--sections a,b,c,d``):
  a  the Engram layer alone against its floor (bytes it must move over the measured HBM bandwidth), fast path vs
     the reference, hash+gather from HBM and from pinned host memory (UVA over PCIe)
  b  prefill and decode throughput of a 12-layer MoE (hidden 2048) with Engram at two layers: tables in HBM,
     tables in host memory (with and without prefetch), the reference Engram path, and the same MoE without
     Engram (same experts, same top-k: the same FLOPs but for Engram's own projections)
  c  our Engram layer against transformers' qwen4_exp n-gram (PLE) layer at the same table shape, and our hashing
     against the reference demo's NumPy hashing (bench/numpy_reference_hash.py, checked against our hash ids)
  d  training step time (forward, backward, AdamW) with and without Engram

Run on a CUDA machine: ``python bench/bench_engram.py --out bench/results/engram_h100.json``.
``--smoke`` shrinks every size so the whole script runs in seconds (also on CPU) to check it end to end.
"""

# Closures over loop variables below are timed within the iteration that defines them.
# ruff: noqa: B023

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from numpy_reference_hash import NumpyNgramHasher  # noqa: E402

from engram_moe import PRESETS, EngramLayer, EngramMoEConfig, EngramMoEForCausalLM, engram_param_groups  # noqa: E402
from engram_moe.engram_kernels import (  # noqa: E402
    engram_hash,
    hash_gather,
    hash_gather_rows_torch,
    resolve_kernel_mode,
)
from engram_moe.engram_offload import cuda_view_of_host, pinned_host_copy  # noqa: E402
from engram_moe.modeling_engram import engram_hash_constants, hash_ngrams  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16


# ---------------------------------------------------------------------------------------------- timing


def sync():
    if CUDA:
        torch.cuda.synchronize()


def bench(fn, warmup=3, iters=10):
    """Median seconds of `fn()` (CUDA events around each call on a GPU)."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        if CUDA:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def graph_bench(fn, calls=3, iters=20):
    """Median GPU seconds per `fn()` with the host out of the way: `calls` calls captured in one CUDA graph,
    replayed. Eager timing (`bench`) of a kernel of ~100 us includes tens of microseconds of Python and launch
    work that the GPU waits for; in a model that work overlaps earlier kernels. `fn` must pick new inputs per
    call (e.g. rotate id sets) so that the replays do not re-read rows left in L2. `bench` on CPU."""
    if not CUDA:
        return bench(fn, iters=iters)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(calls):  # compile, allocate and warm up outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    seconds = bench(graph.replay, iters=iters) / calls
    del graph
    return seconds


def wall(fn, repeats=5):
    """Median host wall-clock seconds (for CPU baselines)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def free_memory():
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


@contextlib.contextmanager
def build_context(dtype=DTYPE):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(DEVICE):
            yield
    finally:
        torch.set_default_dtype(previous)


def table_rows(headers, rows):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join(str(h).ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "-" * len(line)]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def fmt(x, digits=3):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:,.0f}"
    return str(x)


# ---------------------------------------------------------------------------------------------- configs


def model_config(smoke, engram=True, layers=12, hc=1, vocab_target=2_262_400, **overrides):
    """The benchmark model: hidden 2048, GQA 16/4, 16 routed experts top-2 + 1 shared, Engram at layers 1 and 6
    (0-based) with the paper's Engram shape (orders 2-3, 8 heads, d_mem 1280, head dim 80, ~2.26M rows per head)."""
    if smoke:
        base = dict(PRESETS["tiny-engram-moe"])  # the test suite's tiny model: checks the script, not speed
    else:
        base = dict(
            vocab_size=32768,
            hidden_size=2048,
            intermediate_size=5632,
            moe_intermediate_size=1024,
            num_hidden_layers=layers,
            num_attention_heads=16,
            num_key_value_heads=4,
            max_position_embeddings=4096,
            n_routed_experts=16,
            n_shared_experts=1,
            num_experts_per_tok=2,
            engram_layer_ids=[1, min(6, layers - 1)],
            engram_num_heads=8,
            engram_embed_dim_per_ngram=640,
            engram_vocab_size=[vocab_target, vocab_target],
        )
    base.update(
        first_k_dense_replace=1,
        hc_mult=hc,
        engram_max_ngram_size=3,
        engram_pad_id=2,
        engram_conv_zero_init=False,  # a non-trivial conv, so its cost is real
        eos_token_id=None,
    )
    base.update(overrides)
    if not engram:
        base["engram_layer_ids"] = []
    return EngramMoEConfig(**base)


# ---------------------------------------------------------------------------------------------- device ceilings


def measure_ceilings(smoke):
    out = {"device": torch.cuda.get_device_name() if CUDA else platform.processor() or "cpu"}
    if not CUDA:
        return out
    nbytes = (64 << 20) if smoke else (2 << 30)
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src), warmup=3, iters=20)
    out["hbm_copy_GBps"] = 2 * nbytes / t / 1e9  # bytes read + bytes written
    n = 1024 if smoke else 8192
    a = torch.randn(n, n, device=DEVICE, dtype=DTYPE)
    b = torch.randn(n, n, device=DEVICE, dtype=DTYPE)
    t = bench(lambda: a @ b, warmup=3, iters=10)
    out["bf16_matmul_TFLOPs"] = 2 * n**3 / t / 1e12
    host = torch.empty(nbytes // 2, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty_like(host, device=DEVICE)
    t = bench(lambda: dev.copy_(host, non_blocking=True), warmup=2, iters=10)
    out["pcie_h2d_GBps"] = host.numel() / t / 1e9
    src = dst = a = b = host = dev = None
    free_memory()
    return out


# ---------------------------------------------------------------------------------------------- (a) layer vs floor


def section_a(smoke, ceilings):
    config = model_config(smoke, layers=8)
    with build_context():
        layer = EngramLayer(config, config.engram_layer_ids[0]).eval()
    weight = layer.embedding.weight.detach()
    multipliers, moduli = engram_hash_constants(config, DEVICE)
    multipliers, moduli = multipliers[:1], moduli[:1]
    heads, dim = moduli.shape[1], config.engram_head_dim
    host = pinned_host_copy(weight) if CUDA else None
    host_view = cuda_view_of_host(host.tensor, DEVICE) if CUDA else None
    bw = ceilings.get("hbm_copy_GBps")
    peak = ceilings.get("bf16_matmul_TFLOPs")
    sizes = [(2, 8), (4, 1)] if smoke else [(8, 4096), (4, 2048), (256, 1), (64, 1)]
    results = []
    for batch, length in sizes:
        tokens = batch * length
        id_sets = [
            torch.randint(0, config.engram_compressed_vocab_size, (batch, length + 2), device=DEVICE)
            for _ in range(3)
        ]
        hidden = torch.randn(batch, length, config.hc_mult, config.hidden_size, device=DEVICE, dtype=DTYPE)
        # Each timed call takes the next of three input sets, so repeated calls do not re-read rows left in L2.
        rotation = itertools.cycle(range(len(id_sets)))

        def ids():
            return id_sets[next(rotation)]

        mode = resolve_kernel_mode("auto", DEVICE)
        use_triton = mode == "triton"

        def fast_gather():
            return hash_gather(ids(), multipliers[0], moduli[0], layer.offsets, weight, use_triton=use_triton)

        # The rows of each id set, computed once: PyTorch's own gather of exactly those rows (no hashing) is what a
        # stock gather reaches on this access pattern (random 160-byte rows spread over the 5.8 GB table).
        row_sets = [hash_gather_rows_torch(i, multipliers[0], moduli[0], layer.offsets) for i in id_sets]

        def torch_row_gather():
            return torch.nn.functional.embedding(row_sets[next(rotation)], weight)

        def reference_gather():
            return layer.lookup(hash_ngrams(ids(), multipliers, moduli, 3)[:, :, 0])

        def host_gather():
            return hash_gather(
                ids(), multipliers[0], moduli[0], layer.offsets, host.tensor, host_view, use_triton=use_triton
            )

        def fast_layer():
            return layer(hidden, None, memory=fast_gather())

        def reference_layer():
            return layer(hidden, hash_ngrams(ids(), multipliers, moduli, 3)[:, :, 0])

        with torch.inference_mode():
            check = id_sets[0]
            expected = layer.lookup(hash_ngrams(check, multipliers, moduli, 3)[:, :, 0])
            got = hash_gather(check, multipliers[0], moduli[0], layer.offsets, weight, use_triton=use_triton)
            if not torch.equal(got, expected):
                raise AssertionError(f"fast hash+gather differs from the reference at {batch}x{length}")
            t_fast = bench(fast_gather)
            t_fast_graph = graph_bench(fast_gather)
            t_torch_rows = graph_bench(torch_row_gather)
            t_ref = bench(reference_gather)
            t_host = bench(host_gather) if CUDA else None
            config.engram_kernels = "auto"
            t_layer_fast = bench(fast_layer)
            config.engram_kernels = "reference"
            t_layer_ref = bench(reference_layer)
            config.engram_kernels = "auto"
        row_bytes = tokens * heads * dim * weight.element_size()
        gather_bytes = 2 * row_bytes + batch * (length + 2) * 8
        hidden_bytes = tokens * config.hc_mult * config.hidden_size * 2
        weight_bytes = (config.hc_mult + 1) * config.hidden_size * config.engram_memory_dim * 2
        layer_bytes = row_bytes + 2 * hidden_bytes + weight_bytes
        layer_flops = 2 * tokens * config.engram_memory_dim * (config.hc_mult + 1) * config.hidden_size
        entry = {
            "batch": batch,
            "seq": length,
            "tokens": tokens,
            "gather_bytes": gather_bytes,
            "gather_fast_s": t_fast,
            "gather_fast_graph_s": t_fast_graph,
            "gather_torch_precomputed_rows_graph_s": t_torch_rows,
            "gather_reference_s": t_ref,
            "gather_host_uva_s": t_host,
            "layer_fast_s": t_layer_fast,
            "layer_reference_s": t_layer_ref,
            "layer_min_bytes": layer_bytes,
            "layer_flops": layer_flops,
        }
        if bw:
            entry["gather_floor_s"] = gather_bytes / (bw * 1e9)
            entry["gather_fast_fraction_of_hbm_bw"] = gather_bytes / t_fast / (bw * 1e9)
            entry["gather_fast_graph_fraction_of_hbm_bw"] = gather_bytes / t_fast_graph / (bw * 1e9)
            entry["gather_torch_precomputed_rows_fraction_of_hbm_bw"] = (
                gather_bytes / t_torch_rows / (bw * 1e9)
            )
            entry["gather_reference_fraction_of_hbm_bw"] = gather_bytes / t_ref / (bw * 1e9)
            entry["host_uva_GBps"] = row_bytes / t_host / 1e9
            entry["layer_floor_s"] = max(layer_bytes / (bw * 1e9), layer_flops / (peak * 1e12))
            entry["layer_fast_fraction_of_floor"] = entry["layer_floor_s"] / t_layer_fast
        results.append(entry)
    sweep = gather_sweep(smoke, config, layer, weight, host, multipliers, moduli) if CUDA else []
    layer = weight = host = host_view = None
    free_memory()
    rows = [
        [
            f"{r['batch']}x{r['seq']}",
            fmt(r["gather_fast_s"] * 1e6),
            fmt(r["gather_reference_s"] * 1e6),
            fmt(r.get("gather_floor_s", 0) * 1e6),
            fmt(r.get("gather_fast_fraction_of_hbm_bw")),
            fmt(r["gather_fast_graph_s"] * 1e6),
            fmt(r.get("gather_fast_graph_fraction_of_hbm_bw")),
            fmt(r["gather_torch_precomputed_rows_graph_s"] * 1e6),
            fmt(r.get("gather_torch_precomputed_rows_fraction_of_hbm_bw")),
            fmt((r["gather_host_uva_s"] or 0) * 1e6),
            fmt(r.get("host_uva_GBps")),
            fmt(r["layer_fast_s"] * 1e6),
            fmt(r["layer_reference_s"] * 1e6),
            fmt(r.get("layer_floor_s", 0) * 1e6),
        ]
        for r in results
    ]
    text = table_rows(
        [
            "BxT",
            "gather us",
            "ref gather us",
            "floor us",
            "frac HBM bw",
            "gather us (graph)",
            "frac (graph)",
            "torch rows us (graph)",
            "frac (torch rows)",
            "host gather us",
            "host GB/s",
            "layer us",
            "ref layer us",
            "layer floor us",
        ],
        rows,
    )
    if sweep:
        text += "\n\n" + table_rows(
            ["BxT", "table memory", "elems/program", "warps", "gather us", "GB/s (rows read)"],
            [
                [
                    f"{r['batch']}x{r['seq']}",
                    r["source"],
                    r["block_elems"],
                    r["num_warps"],
                    fmt(r["s"] * 1e6),
                    fmt(r["rows_GBps"]),
                ]
                for r in sweep
            ],
        )
    return {"config": summary(config), "rows": results, "launch_sweep": sweep}, text


def gather_sweep(smoke, config, layer, weight, host, multipliers, moduli):
    """Launch shapes of the gather at both prefill sizes (GPU time, `graph_bench`): from HBM, from HBM with every
    row inside the table's first ~1/36 (~160 MB: the same bytes, but the rows share DRAM pages and TLB entries),
    and (at the largest size) from host memory with and without transparent huge pages."""
    from engram_moe import engram_kernels

    sizes = [(2, 8)] if smoke else [(8, 4096), (4, 2048)]
    plain = pinned_host_copy(weight, huge_pages=False)
    small_moduli = torch.clamp(moduli[0] // 36, min=1)
    small_offsets = torch.cumsum(small_moduli, 0) - small_moduli
    sources = [
        ("hbm", weight, weight, moduli[0], layer.offsets),
        ("hbm, rows in 1/36 of the table", weight, weight, small_moduli, small_offsets),
        ("host_thp", host.tensor, cuda_view_of_host(host.tensor, DEVICE), moduli[0], layer.offsets),
        ("host_plain", plain.tensor, cuda_view_of_host(plain.tensor, DEVICE), moduli[0], layer.offsets),
    ]
    shapes = [
        (1024, 2),
        (1024, 4),
        (2048, 2),
        (2048, 4),
        (4096, 4),
        (4096, 8),
        (8192, 4),
        (8192, 8),
        (16384, 8),
    ]
    default = dict(engram_kernels.GATHER_LAUNCH)
    rows = []
    try:
        for (batch, length), (name, table, source, head_moduli, offsets) in itertools.product(sizes, sources):
            if name.startswith("host") and (batch, length) != sizes[0]:
                continue
            id_sets = itertools.cycle(
                [
                    torch.randint(0, config.engram_compressed_vocab_size, (batch, length + 2), device=DEVICE)
                    for _ in range(3)
                ]
            )
            row_bytes = batch * length * moduli.shape[1] * config.engram_head_dim * weight.element_size()
            for block_elems, num_warps in shapes if name.startswith("hbm") else [(2048, 4), (8192, 4)]:
                engram_kernels.GATHER_LAUNCH.update(block_elems=block_elems, num_warps=num_warps)

                def gather():
                    return hash_gather(next(id_sets), multipliers[0], head_moduli, offsets, table, source)

                with torch.inference_mode():
                    t = graph_bench(gather)
                rows.append(
                    {
                        "batch": batch,
                        "seq": length,
                        "source": name,
                        "block_elems": block_elems,
                        "num_warps": num_warps,
                        "s": t,
                        "rows_GBps": row_bytes / t / 1e9,
                    }
                )
    finally:
        engram_kernels.GATHER_LAUNCH.update(default)
    return rows


def summary(config):
    return {
        "hidden_size": config.hidden_size,
        "hc_mult": config.hc_mult,
        "num_hidden_layers": config.num_hidden_layers,
        "engram_layer_ids": config.engram_layer_ids,
        "engram_memory_dim": config.engram_memory_dim,
        "engram_head_dim": config.engram_head_dim,
        "engram_heads": (config.engram_max_ngram_size - 1) * config.engram_num_heads,
        "engram_table_rows": config.engram_table_rows,
        "engram_table_GB_bf16": [
            rows * config.engram_head_dim * 2 / 1e9 for rows in config.engram_table_rows
        ],
        "n_routed_experts": config.n_routed_experts,
        "num_experts_per_tok": config.num_experts_per_tok,
    }


# ---------------------------------------------------------------------------------------------- (b) throughput


def decode_models(smoke):
    """The decode comparisons' pair, seeded alike: Engram-MoE and the same MoE without Engram."""
    torch.manual_seed(0)
    with build_context():
        engram = EngramMoEForCausalLM(model_config(smoke)).eval()
        torch.manual_seed(0)
        moe = EngramMoEForCausalLM(model_config(smoke, engram=False)).eval()
    return engram, moe


def decode_step(model, token, cache):
    """One greedy cached decode step: the next input token."""
    return model(token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)


def start_decode(model, batch, prompt, vocab, warmup=3):
    """Prefill a random prompt and decode `warmup` tokens (call in inference mode): (cache, next input token)."""
    ids = torch.randint(3, vocab, (batch, prompt), device=DEVICE)
    out = model(ids, use_cache=True, logits_to_keep=1)
    cache, token = out.cache, out.logits[:, -1:].argmax(-1)
    for _ in range(warmup):
        token = decode_step(model, token, cache)
    sync()
    return cache, token


def timed_decode(model, batch, prompt, steps, vocab):
    """(tokens/s, CPU seconds per step) of `steps` cached decode steps after the prefill and warm-up."""
    with torch.inference_mode():
        cache, token = start_decode(model, batch, prompt, vocab)
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            token = decode_step(model, token, cache)
        sync()
        return batch * steps / (time.perf_counter() - wall), (time.process_time() - cpu) / steps


def prefill_throughput(model, batch, length, vocab):
    ids = torch.randint(3, vocab, (batch, length), device=DEVICE)
    with torch.inference_mode():
        t = bench(lambda: model(ids, use_cache=True, logits_to_keep=1), warmup=2, iters=5)
    return batch * length / t


def section_b(smoke):
    engram, moe = decode_models(smoke)
    config = engram.config
    params = {
        "engram_total": sum(p.numel() for p in engram.parameters()),
        "engram_tables": config.engram_table_parameters,
        "moe_total": sum(p.numel() for p in moe.parameters()),
    }
    vocab = config.vocab_size
    prefill_shape = (2, 16) if smoke else (8, 2048)
    decode_batches = [4] if smoke else [64, 256]
    prompt, steps, rounds = (8, 4, 1) if smoke else (256, 24, 2)

    def set_variant(name):
        if name == "moe":
            return moe
        engram.config.engram_kernels = "reference" if name == "engram_hbm_reference" else "auto"
        engram.config.engram_prefetch = "off" if name == "engram_host_noprefetch" else "host"
        placement = "host" if name.startswith("engram_host") else "device"
        if engram.config.engram_table_placement != placement and CUDA:
            engram.set_engram_table_placement(placement)
            free_memory()
        return engram

    # Tables in HBM first, then host (moving 11.6 GB once each way is the slow part).
    variants = ["moe", "engram_hbm", "engram_hbm_reference", "engram_host", "engram_host_noprefetch"]
    results = {v: {"prefill_tok_s": None, "decode_tok_s": {b: [] for b in decode_batches}} for v in variants}
    for name in variants:
        model = set_variant(name)
        results[name]["prefill_tok_s"] = prefill_throughput(model, *prefill_shape, vocab)
    for round_index in range(rounds):  # interleave the decode rounds so drift hits every variant alike
        # Alternate the order so that the tables change place once per round, not twice.
        for name in variants if round_index % 2 else variants[::-1]:
            model = set_variant(name)
            for batch in decode_batches:
                results[name]["decode_tok_s"][batch].append(
                    timed_decode(model, batch, prompt, steps, vocab)[0]
                )
    for name in variants:
        results[name]["decode_tok_s"] = {
            b: statistics.median(v) for b, v in results[name]["decode_tok_s"].items()
        }
    engram = moe = None
    free_memory()
    base, hbm = results["moe"], results["engram_hbm"]
    rows = []
    for name in variants:
        r = results[name]
        row = [name, fmt(r["prefill_tok_s"]), fmt(r["prefill_tok_s"] / base["prefill_tok_s"])]
        for batch in decode_batches:
            row += [
                fmt(r["decode_tok_s"][batch]),
                fmt(r["decode_tok_s"][batch] / base["decode_tok_s"][batch]),
                fmt(r["decode_tok_s"][batch] / hbm["decode_tok_s"][batch]),
            ]
        rows.append(row)
    headers = ["variant", "prefill tok/s", "vs MoE"]
    for batch in decode_batches:
        headers += [f"decode b{batch} tok/s", "vs MoE", "vs HBM"]
    text = table_rows(headers, rows)
    meta = {
        "config": summary(config),
        "params": params,
        "prefill_shape": prefill_shape,
        "decode": {"batches": decode_batches, "prompt": prompt, "steps": steps, "rounds": rounds},
    }
    return {**meta, "results": results}, text


# ---------------------------------------------------------------------------------------------- (c) peers


def qwen4_exp_layer(hidden, hc, embed_dim, vocab_target, vocab):
    try:
        from transformers.models.qwen4_exp.configuration_qwen4_exp import Qwen4ExpTextConfig
        from transformers.models.qwen4_exp.modeling_qwen4_exp import Qwen4ExpTextPLELayer
    except ImportError as error:
        return None, f"transformers has no qwen4_exp ({error})"
    config = Qwen4ExpTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        hc_count=hc,
        num_hidden_layers=4,
        num_attention_heads=16,
        num_key_value_heads=4,
        ple_layer_ids=[1],
        ple_embed_dim=embed_dim,
        ngram_size=3,
        heads_per_ngram=8 if embed_dim % 16 == 0 else 2,
        ngram_vocab_size_base=vocab_target,
        eos_token_id=0,
    )
    with build_context():
        layer = Qwen4ExpTextPLELayer(config, 0, 0).eval()
    return layer, None


def section_c(smoke):
    hc = 4
    config = model_config(smoke, hc=hc, layers=8)
    vocab = config.vocab_size
    with build_context():
        ours = EngramLayer(config, config.engram_layer_ids[0]).eval()
        token_map = torch.arange(vocab)
    multipliers, moduli = engram_hash_constants(config, DEVICE)
    slot_m, slot_p = multipliers[:1], moduli[:1]
    vocab_target = config.engram_vocab_size[0]
    qwen, qwen_error = qwen4_exp_layer(config.hidden_size, hc, config.engram_memory_dim, vocab_target, vocab)
    use_triton = resolve_kernel_mode("auto", DEVICE) == "triton"
    sizes = [(2, 8), (4, 1)] if smoke else [(4, 2048), (256, 1)]
    layer_rows = []
    for batch, length in sizes:
        ids = torch.randint(3, vocab, (batch, length), device=DEVICE)
        hidden = torch.randn(batch, length, hc, config.hidden_size, device=DEVICE, dtype=DTYPE)
        pads = ids.new_full((batch, 2), config.engram_compressed_pad_id)

        def ours_fast():
            context = torch.cat([pads, token_map[ids]], dim=1)
            memory = hash_gather(
                context, slot_m[0], slot_p[0], ours.offsets, ours.embedding.weight, None, DTYPE, use_triton
            )
            return ours(hidden, None, memory=memory)

        def ours_reference():
            context = torch.cat([pads, token_map[ids]], dim=1)
            return ours(hidden, hash_ngrams(context, slot_m, slot_p, 3)[:, :, 0])

        entry = {"batch": batch, "seq": length}
        with torch.inference_mode():
            config.engram_kernels = "auto"
            entry["ours_fast_s"] = bench(ours_fast)
            config.engram_kernels = "reference"
            entry["ours_reference_s"] = bench(ours_reference)
            config.engram_kernels = "auto"
            if qwen is not None:
                flat = hidden.flatten(-2)
                entry["qwen4_exp_s"] = bench(lambda: qwen(flat, ids, None))
        layer_rows.append(entry)
    table_shape = {
        "ours_rows": config.engram_table_rows[0],
        "qwen4_exp_rows": None if qwen is None else qwen.ple_embedding.ngram_embedding.num_embeddings,
        "head_dim": config.engram_head_dim,
        "heads": moduli.shape[1],
        "hc": hc,
        "hidden": config.hidden_size,
    }
    ours = qwen = None
    free_memory()

    # Hashing: the demo's NumPy path (per Engram layer, every layer hashes all layers) against ours.
    hash_config = model_config(smoke)
    hasher = NumpyNgramHasher(
        lookup_table=np.arange(hash_config.vocab_size),
        compressed_vocab_size=hash_config.engram_compressed_vocab_size,
        raw_pad_id=hash_config.engram_pad_id,
        layer_ids=hash_config.engram_layer_ids,
        primes=hash_config.engram_primes,
        max_ngram_size=hash_config.engram_max_ngram_size,
        seed=hash_config.engram_seed,
    )
    all_m, all_p = engram_hash_constants(hash_config, DEVICE)
    hash_rows = []
    for batch, length in [(2, 8)] if smoke else [(4, 2048), (8, 4096), (256, 1)]:
        raw = torch.randint(3, hash_config.vocab_size, (batch, length))
        raw_np = raw.numpy()
        context = torch.cat([raw.new_full((batch, 2), hasher.pad_id), raw], dim=1).to(DEVICE)
        ours_hash = hash_ngrams(context, all_m, all_p, 3).cpu()
        reference = hasher.hash(raw_np)
        for slot, layer_id in enumerate(hash_config.engram_layer_ids):
            if not np.array_equal(reference[layer_id], ours_hash[:, :, slot].numpy()):
                raise AssertionError(f"NumPy reference hashing disagrees with ours at layer {layer_id}")
        entry = {
            "batch": batch,
            "seq": length,
            "numpy_demo_forward_s": wall(lambda: hasher.forward_as_demo(raw_np)),
            "numpy_once_s": wall(lambda: hasher.hash(raw_np)),
            "torch_hash_s": bench(lambda: hash_ngrams(context, all_m, all_p, 3)),
        }
        if use_triton:
            assert torch.equal(engram_hash(context, all_m, all_p, 3).cpu(), ours_hash)
            entry["triton_hash_s"] = bench(lambda: engram_hash(context, all_m, all_p, 3))
            # The kernel's own GPU time (the eager figure is mostly the Python launch).
            entry["triton_hash_graph_s"] = graph_bench(lambda: engram_hash(context, all_m, all_p, 3), calls=1)
        best = entry.get("triton_hash_s", entry["torch_hash_s"])
        entry["speedup_vs_numpy_demo"] = entry["numpy_demo_forward_s"] / best
        entry["speedup_vs_numpy_once"] = entry["numpy_once_s"] / best
        hash_rows.append(entry)

    text = table_rows(
        ["BxT", "ours fast us", "ours ref us", "qwen4_exp us", "qwen/ours"],
        [
            [
                f"{r['batch']}x{r['seq']}",
                fmt(r["ours_fast_s"] * 1e6),
                fmt(r["ours_reference_s"] * 1e6),
                fmt(r.get("qwen4_exp_s", 0) * 1e6) if "qwen4_exp_s" in r else "-",
                fmt(r["qwen4_exp_s"] / r["ours_fast_s"]) if "qwen4_exp_s" in r else "-",
            ]
            for r in layer_rows
        ],
    )
    text += "\n\n" + table_rows(
        [
            "BxT",
            "numpy demo fwd us",
            "numpy once us",
            "torch hash us",
            "triton hash us",
            "triton hash us (graph)",
            "x vs demo",
            "x vs once",
        ],
        [
            [
                f"{r['batch']}x{r['seq']}",
                fmt(r["numpy_demo_forward_s"] * 1e6),
                fmt(r["numpy_once_s"] * 1e6),
                fmt(r["torch_hash_s"] * 1e6),
                fmt(r.get("triton_hash_s", 0) * 1e6) if "triton_hash_s" in r else "-",
                fmt(r.get("triton_hash_graph_s", 0) * 1e6) if "triton_hash_graph_s" in r else "-",
                fmt(r["speedup_vs_numpy_demo"]),
                fmt(r["speedup_vs_numpy_once"]),
            ]
            for r in hash_rows
        ],
    )
    out = {
        "layer_shape": table_shape,
        "qwen4_exp_error": qwen_error,
        "layer": layer_rows,
        "hash": hash_rows,
        "hash_layers": hash_config.engram_layer_ids,
    }
    return out, text


# ---------------------------------------------------------------------------------------------- (d) training


def section_d(smoke):
    results = {}
    batch, length = (2, 16) if smoke else (8, 1024)
    variants = ["moe", "engram", "engram_reference", "engram_frozen_tables"]
    for name in variants:
        config = model_config(
            smoke,
            engram=name != "moe",
            layers=4,
            vocab_target=500_000,
            engram_layer_ids=[1, 2],
            engram_kernels="reference" if name == "engram_reference" else "auto",
        )
        torch.manual_seed(0)
        with build_context(torch.float32):
            model = EngramMoEForCausalLM(config).train()
        if name == "engram_frozen_tables":
            for layer in model.model.engram_layers:
                layer.embedding.weight.requires_grad_(False)
        groups = engram_param_groups(model, lr=1e-4)
        groups = [g for g in groups if any(p.requires_grad for p in g["params"])]
        for g in groups:
            g["params"] = [p for p in g["params"] if p.requires_grad]
        optimizer = torch.optim.AdamW(groups, lr=1e-4, fused=CUDA)
        ids = torch.randint(3, config.vocab_size, (batch, length), device=DEVICE)

        def step():
            with torch.autocast(DEVICE.type, dtype=DTYPE, enabled=CUDA):
                loss = model(ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        results[name] = {
            "step_s": bench(step, warmup=2, iters=5),
            "params": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        }
        model = optimizer = groups = None
        free_memory()
    base = results["moe"]["step_s"]
    text = table_rows(
        ["variant", "step ms", "vs MoE", "params", "trainable"],
        [
            [
                n,
                fmt(r["step_s"] * 1e3),
                fmt(base / r["step_s"]),
                f"{r['params']:,}",
                f"{r['trainable']:,}",
            ]
            for n, r in results.items()
        ],
    )
    return {"batch": batch, "seq": length, "results": results}, text


# ---------------------------------------------------------------------------------------------- main


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sections", default="a,b,c,d")
    parser.add_argument("--out", default="bench/results/engram_bench.json")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check the script end to end")
    args = parser.parse_args()
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    report = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "triton": triton_version,
        "smoke": args.smoke,
        "kernel_mode_auto": resolve_kernel_mode("auto", DEVICE),
    }
    report["ceilings"] = measure_ceilings(args.smoke)
    print(json.dumps(report, indent=1), flush=True)
    texts = {}
    sections = {"a": section_a, "b": section_b, "c": section_c, "d": section_d}
    for key in args.sections.split(","):
        t0 = time.perf_counter()
        fn = sections[key]
        result, text = fn(args.smoke, report["ceilings"]) if key == "a" else fn(args.smoke)
        result["section_wall_s"] = time.perf_counter() - t0
        report[key] = result
        texts[key] = text
        print(f"\n== ({key}) [{result['section_wall_s']:.0f} s]\n{text}", flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    Path(args.out).with_suffix(".txt").write_text(
        f"device: {report['ceilings']['device']}\n"
        + "\n".join(f"\n== ({k})\n{t}" for k, t in texts.items())
        + "\n"
    )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
