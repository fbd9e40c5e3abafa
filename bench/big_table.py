"""Engram tables larger than the GPU can hold, served from pinned host memory.

Part 1 (`from_pretrained`): save a model whose Engram table is ~5.8 GB, cap this process's GPU memory below the
table (``torch.cuda.set_per_process_memory_fraction``) and load it with ``device_map="cuda",
engram_table_placement="host"``: it loads and generates, and its logits equal those of the uncapped model with
the table in HBM. The same load with the table on the device fails under the cap (out of memory), as it must.

Part 2 (larger than the physical GPU): build a model whose table alone (~88 GB) exceeds the GPU's whole memory
directly in host memory (the model is made on the meta device; ``to_empty(device="cuda")`` materialises the
backbone on the GPU and the table in host memory, registered in place with ``cudaHostRegister``; no 88 GB
checkpoint goes through the 64 GiB disk), fill the table with random rows, check the UVA gather against a CPU
gather, and generate.

Run: ``python bench/big_table.py --out bench/results/big_table_h100.json`` (``--part 1``/``--part 2``;
``--table-gb`` sets part 2's table size).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engram_moe import EngramMoEConfig, EngramMoEForCausalLM  # noqa: E402
from engram_moe.engram_kernels import hash_gather  # noqa: E402
from engram_moe.engram_offload import EngramTable  # noqa: E402

CUDA = torch.device("cuda")
GB = 1e9


def backbone(**overrides):
    config = dict(
        vocab_size=32768,
        hidden_size=2048,
        intermediate_size=5632,
        moe_intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=16,
        num_key_value_heads=4,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        engram_layer_ids=[1],
        engram_max_ngram_size=3,
        engram_num_heads=8,
        engram_embed_dim_per_ngram=640,
        engram_pad_id=2,
        engram_conv_zero_init=False,
        eos_token_id=None,
    )
    config.update(overrides)
    return EngramMoEConfig(**config)


def host_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB


def gpu_state():
    free, total = torch.cuda.mem_get_info()
    return {
        "gpu_total_GB": total / GB,
        "gpu_free_GB": free / GB,
        "gpu_max_allocated_GB": torch.cuda.max_memory_allocated() / GB,
    }


def generate(model, batch, prompt, new_tokens, vocab):
    torch.manual_seed(1)
    ids = torch.randint(3, vocab, (batch, prompt), device=CUDA)
    with torch.inference_mode():
        model.generate(ids[:, :8], max_new_tokens=2, do_sample=False)  # warm up (kernels compile)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
    return out, {"batch": batch, "prompt": prompt, "new_tokens": new_tokens, "generate_s": elapsed}


def part1(workdir):
    config = backbone(engram_vocab_size=[2_262_400, 2_262_400])
    table_gb = config.engram_table_rows[0] * config.engram_head_dim * 2 / GB
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(CUDA):
        model = EngramMoEForCausalLM(config).eval()
    torch.set_default_dtype(previous)
    ids = torch.randint(3, config.vocab_size, (4, 64), device=CUDA)
    with torch.inference_mode():
        reference_logits = model(ids).logits.float().cpu()
    path = Path(workdir) / "model"
    t0 = time.perf_counter()
    model.save_pretrained(path)
    save_s = time.perf_counter() - t0
    del model
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()

    total = torch.cuda.mem_get_info()[1]
    cap_gb = min(table_gb / 2, 4.0)
    torch.cuda.set_per_process_memory_fraction(cap_gb * GB / total)
    result = {"table_GB": table_gb, "save_s": save_s, "gpu_cap_GB": cap_gb}
    try:
        t0 = time.perf_counter()
        loaded = EngramMoEForCausalLM.from_pretrained(
            path, device_map="cuda", engram_table_placement="host", dtype=torch.bfloat16
        ).eval()
        result["load_s"] = time.perf_counter() - t0
        table = loaded.model.engram_layers[0].embedding.weight
        result["table_device"] = str(table.device)
        result["table_pinned"] = bool(table.is_pinned())
        with torch.inference_mode():
            logits = loaded(ids).logits.float().cpu()
        result["max_abs_logit_diff_vs_hbm_model"] = float((logits - reference_logits).abs().max())
        result["logits_equal_to_hbm_model"] = bool(torch.equal(logits, reference_logits))
        _, gen = generate(loaded, 4, 64, 32, config.vocab_size)
        result["generate"] = gen
        result.update(gpu_state())
        del loaded, table
        gc.collect()
        torch.cuda.empty_cache()
        try:
            EngramMoEForCausalLM.from_pretrained(path, device_map="cuda", dtype=torch.bfloat16)
            result["device_placement_under_cap"] = "loaded (unexpected: the cap did not bind)"
        except (torch.OutOfMemoryError, RuntimeError) as error:
            result["device_placement_under_cap"] = f"out of memory, as expected: {str(error).splitlines()[0]}"
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        gc.collect()
        torch.cuda.empty_cache()
        shutil.rmtree(path, ignore_errors=True)
    return result


def part2(table_gb):
    head_dim, heads = 80, 16
    per_head = int(table_gb * GB / (heads * head_dim * 2))
    config = backbone(engram_vocab_size=[per_head, per_head], engram_table_placement="host")
    rows = config.engram_table_rows[0]
    result = {"table_rows": rows, "table_GB": rows * head_dim * 2 / GB}
    result["gpu_total_GB"] = torch.cuda.mem_get_info()[1] / GB
    t0 = time.perf_counter()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("meta"):
        model = EngramMoEForCausalLM(config)
    torch.set_default_dtype(previous)
    # Backbone to the GPU, the table to host memory (allocated there and page-locked in place).
    model.to_empty(device=CUDA)
    table_module = model.model.engram_layers[0].embedding
    assert isinstance(table_module, EngramTable)
    table = table_module.weight
    result["materialise_and_pin_s"] = time.perf_counter() - t0
    result["table_device"], result["table_pinned"] = str(table.device), bool(table.is_pinned())
    table._is_hf_initialized = True  # the backbone gets the usual init; the table is filled below
    model.init_weights()
    model.eval()
    t0 = time.perf_counter()
    chunk = 1 << 24
    generator = torch.Generator(device=CUDA).manual_seed(0)
    with torch.no_grad():
        for start in range(0, rows, chunk):
            stop = min(rows, start + chunk)
            block = torch.randn(
                stop - start, head_dim, device=CUDA, dtype=torch.bfloat16, generator=generator
            )
            table[start:stop].copy_(block * config.initializer_range)
    torch.cuda.synchronize()
    result["fill_s"] = time.perf_counter() - t0
    result["host_max_rss_GB"] = host_rss_gb()

    # The UVA gather reads the same rows as a CPU gather.
    ids = torch.randint(3, config.vocab_size, (8, 128), device=CUDA)
    base = model.model
    context = base.engram_context_ids(ids, None, None)
    hash_ids = base.compute_engram_hash_ids(ids, None, None)[:, :, 0]
    layer = base.engram_layers[0]
    with torch.inference_mode():
        source = table_module.reader(CUDA)
        uva = hash_gather(
            context,
            base.engram_multipliers[0],
            base.engram_moduli[0],
            layer.offsets,
            table,
            source,
            torch.bfloat16,
        )
        cpu_rows = table.detach()[(hash_ids + layer.offsets).cpu()].flatten(-2)
    result["uva_gather_equals_cpu_gather"] = bool(torch.equal(uva.cpu(), cpu_rows))
    result["source_is_uva_view"] = bool(source.is_cuda and source.data_ptr() == table.data_ptr())
    _, result["generate"] = generate(model, 8, 128, 32, config.vocab_size)
    result["generate"]["tok_s"] = 8 * 32 / result["generate"]["generate_s"]
    _, decode = generate(model, 64, 128, 32, config.vocab_size)
    decode["tok_s"] = 64 * 32 / decode["generate_s"]
    result["generate_b64"] = decode
    result.update(gpu_state())
    result["host_max_rss_GB"] = host_rss_gb()
    return result


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="bench/results/big_table.json")
    parser.add_argument("--part", default="1,2")
    parser.add_argument("--table-gb", type=float, default=88.0)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cpus": os.cpu_count()}
    for part in args.part.split(","):
        t0 = time.perf_counter()
        if part == "1":
            workdir = args.workdir or tempfile.mkdtemp(prefix="engram-big-")
            report["part1_from_pretrained_under_gpu_cap"] = part1(workdir)
        else:
            report["part2_table_larger_than_gpu"] = part2(args.table_gb)
        report[f"part{part}_wall_s"] = time.perf_counter() - t0
        print(json.dumps(report, indent=1), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
