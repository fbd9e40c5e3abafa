"""GPU tests of the Engram fast path and table placement. Skipped without CUDA.

Run on a GPU machine: `python -m pytest -q tests/gpu` (Triton needed for the kernel tests; they skip without it).
"""

import copy
import importlib.util

import pytest
import torch
from conftest import (
    assert_gate_gradients_match_the_twin,
    assert_matches_reference,
    assert_training_gradients_match,
)

from engram_moe import EngramLayer, EngramMoEForCausalLM, get_preset, hash_ngrams
from engram_moe.engram_kernels import engram_gate_torch, engram_gate_triton, engram_hash, hash_gather
from engram_moe.engram_offload import EngramMemory, cuda_view_of_host, pinned_host_copy, prepare_engram_inputs
from engram_moe.modeling_engram import engram_hash_constants

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
CUDA = torch.device("cuda")


def model_pair(preset="tiny-engram-moe-hc4", dtype=torch.float32, seed=0, **overrides):
    torch.manual_seed(seed)
    overrides.setdefault("engram_conv_zero_init", False)
    reference = EngramMoEForCausalLM(get_preset(preset, engram_kernels="reference", **overrides)).eval()
    reference = reference.to(CUDA, dtype)
    fast = copy.deepcopy(reference)
    fast.config.engram_kernels = "auto"
    return reference, fast


@needs_triton
@pytest.mark.parametrize(
    "preset,overrides", [("engram-27b", {}), ("tiny-engram-moe", {"engram_max_ngram_size": 4})]
)
def test_hash_kernel_is_bit_exact(preset, overrides):
    if overrides:
        overrides["engram_vocab_size"] = [211, 223, 227]
    config = get_preset(preset, **overrides)
    multipliers, moduli = engram_hash_constants(config, CUDA)
    for shape in ((1, 1), (7, 333), (64, 1), (4, 4096)):
        context = config.engram_max_ngram_size - 1
        ids = torch.randint(
            0, config.engram_compressed_vocab_size, (shape[0], shape[1] + context), device=CUDA
        )
        expected = hash_ngrams(ids, multipliers, moduli, config.engram_max_ngram_size)
        assert torch.equal(engram_hash(ids, multipliers, moduli, config.engram_max_ngram_size), expected)


def gather_inputs(head_dim, table_dtype, tokens=(3, 257)):
    config = get_preset(
        "tiny-engram-moe", engram_embed_dim_per_ngram=2 * head_dim, engram_vocab_size=[5003, 5009]
    )
    layer = EngramLayer(config, 1).to(CUDA, table_dtype)
    multipliers, moduli = engram_hash_constants(config, CUDA)
    ids = torch.randint(0, config.engram_compressed_vocab_size, (tokens[0], tokens[1] + 2), device=CUDA)
    hash_ids = hash_ngrams(ids, multipliers, moduli, 3)[:, :, 0]
    return layer, ids, multipliers[0], moduli[0], hash_ids


@needs_triton
@pytest.mark.parametrize("head_dim", [80, 64, 5])
@pytest.mark.parametrize("table_dtype", [torch.float32, torch.bfloat16])
def test_hash_gather_is_exact_from_hbm_and_from_pinned_host_memory(head_dim, table_dtype):
    layer, ids, multipliers, moduli, hash_ids = gather_inputs(head_dim, table_dtype)
    weight = layer.embedding.weight.detach()
    expected = layer.lookup(hash_ids)
    # Poison the block the caching allocator will hand out next: every element must be written.
    poison = torch.full_like(expected, float("nan"))
    del poison
    out = hash_gather(ids, multipliers, moduli, layer.offsets, weight)
    assert torch.equal(out, expected)
    assert torch.equal(
        hash_gather(ids, multipliers, moduli, layer.offsets, weight, out_dtype=torch.bfloat16),
        expected.to(torch.bfloat16),
    )
    host = pinned_host_copy(weight)
    view = cuda_view_of_host(host.tensor, CUDA)
    assert view.is_cuda and view.data_ptr() == host.tensor.data_ptr()
    from_host = hash_gather(ids, multipliers, moduli, layer.offsets, host.tensor, source=view)
    assert torch.equal(from_host, expected)
    torch.testing.assert_close(
        hash_gather(ids, multipliers, moduli, layer.offsets, host.tensor, source=view, use_triton=False),
        expected,
        rtol=0,
        atol=0,
    )


@needs_triton
def test_hash_gather_gradient_matches_nn_embedding():
    layer, ids, multipliers, moduli, hash_ids = gather_inputs(80, torch.float32, tokens=(4, 512))
    weight = layer.embedding.weight
    reference = layer.lookup(hash_ids)
    memory = hash_gather(ids, multipliers, moduli, layer.offsets, weight)
    probe = torch.randn_like(reference)
    (grad_ref,) = torch.autograd.grad((reference * probe).sum(), weight)
    (grad_fast,) = torch.autograd.grad((memory * probe).sum(), weight)
    torch.testing.assert_close(grad_fast, grad_ref, rtol=1e-5, atol=1e-6)


@needs_triton
@pytest.mark.parametrize(
    "hc,hidden,use_conv", [(1, 2048, True), (4, 2560, True), (4, 64, False), (1, 100, True)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gate_kernel_matches_the_torch_twin(hc, hidden, use_conv, dtype):
    tokens = 301
    key = torch.randn(tokens, hc, hidden, device=CUDA, dtype=dtype)
    query = torch.randn(tokens, hc, hidden, device=CUDA, dtype=dtype)
    value = torch.randn(tokens, hidden, device=CUDA, dtype=dtype)
    weights = [torch.rand(hc, hidden, device=CUDA, dtype=dtype) + 0.5 for _ in range(3)]
    conv = weights[2] if use_conv else None
    expected = engram_gate_torch(key, query, value, weights[0], weights[1], conv, 1e-6, 1e-6, 1e-5)
    got = engram_gate_triton(key, query, value, weights[0], weights[1], conv, 1e-6, 1e-6, 1e-5)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    for want, have in zip(expected, got, strict=True):
        if want is None:
            assert have is None
        else:
            torch.testing.assert_close(have, want, **tol)


@needs_triton
@pytest.mark.parametrize(
    "hc,hidden,use_conv", [(1, 2048, True), (4, 2560, True), (4, 64, False), (1, 100, True), (2, 256, True)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gate_backward_kernel_matches_the_torch_twin(hc, hidden, use_conv, dtype):
    used = ("gate", "u", "normed") if use_conv else ("gate", "u")
    # 3,001 tokens: several tokens per program (at most 1,024 programs) and a masked tail.
    assert_gate_gradients_match_the_twin(3001, hc, hidden, use_conv, used, dtype=dtype, device=CUDA)


@needs_triton
@pytest.mark.parametrize("preset", ["tiny-engram-moe", "tiny-engram-moe-hc4"])
def test_fast_model_matches_reference_float32_logits_and_greedy_generation(preset):
    reference, fast = model_pair(preset)
    ids = torch.randint(0, 512, (3, 20), device=CUDA)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    assert_matches_reference(fast, reference, ids, mask, max_new_tokens=8, rtol=1e-4, atol=1e-4)


@needs_triton
def test_fast_model_bfloat16_is_within_bfloat16_error_of_float32():
    # (torch's grouped_mm experts have no float64 path: float32 is the truth here.)
    reference, fast = model_pair("tiny-engram-moe-hc4")
    ids = torch.randint(0, 512, (2, 32), device=CUDA)
    with torch.no_grad():
        truth = reference(ids).logits.double()
        err_fast = (fast.to(torch.bfloat16)(ids).logits.double() - truth).norm() / truth.norm()
        err_ref = (reference.to(torch.bfloat16)(ids).logits.double() - truth).norm() / truth.norm()
    assert err_fast < 2e-2 and err_fast < 1.5 * err_ref, (err_fast, err_ref)


@needs_triton
def test_training_step_gradients_fast_vs_reference():
    reference, fast = model_pair("tiny-engram-moe-hc4")
    reference.train()
    fast.train()
    ids = torch.randint(0, 512, (2, 24), device=CUDA)
    assert_training_gradients_match(fast, reference, ids, rtol=1e-3, atol=1e-5)


@needs_triton
def test_host_tables_give_identical_outputs_with_and_without_prefetch():
    _, device_model = model_pair("tiny-engram-moe-hc4")
    host_model = copy.deepcopy(device_model)
    host_model.set_engram_table_placement("host")
    for layer in host_model.model.engram_layers:
        assert layer.embedding.weight.device.type == "cpu" and layer.embedding.weight.is_pinned()
    ids = torch.randint(0, 512, (4, 33), device=CUDA)
    with torch.no_grad():
        expected = device_model(ids).logits
        _, memories = prepare_engram_inputs(host_model.model, ids, None, None, torch.float32)
        assert all(isinstance(m, EngramMemory) and m.prefetched for m in memories.values())
        assert torch.equal(host_model(ids).logits, expected)
        host_model.config.engram_prefetch = "off"
        assert torch.equal(host_model(ids).logits, expected)
        host_model.config.engram_prefetch = "all"
        device_model.config.engram_prefetch = "all"  # device tables gathered on the side stream too
        assert torch.equal(device_model(ids).logits, expected)
        out_device = device_model.generate(ids, max_new_tokens=8, do_sample=False)
        out_host = host_model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(out_host, out_device)


def test_moving_the_model_keeps_host_tables_pinned_on_the_host():
    torch.manual_seed(0)
    model = EngramMoEForCausalLM(get_preset("tiny-engram-moe", engram_table_placement=["host", "device"]))
    model.to(CUDA, torch.bfloat16)
    first, second = model.model.engram_layers
    assert first.embedding.weight.device.type == "cpu" and first.embedding.weight.is_pinned()
    assert first.embedding.weight.dtype == torch.bfloat16
    assert second.embedding.weight.is_cuda
    ids = torch.randint(0, 512, (2, 9), device=CUDA)
    with torch.no_grad():
        model(ids)


def test_from_pretrained_device_map_cuda_loads_host_tables_to_pinned_memory(tmp_path):
    reference, _ = model_pair("tiny-engram-moe")
    reference.save_pretrained(tmp_path)
    loaded = EngramMoEForCausalLM.from_pretrained(tmp_path, device_map="cuda", engram_table_placement="host")
    for name, param in loaded.named_parameters():
        if ".engram.embedding." in name:
            assert param.device.type == "cpu" and param.is_pinned(), name
        else:
            assert param.is_cuda, name
    ids = torch.randint(0, 512, (2, 16), device=CUDA)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)


@needs_triton
def test_fused_conv_and_cached_decoding_with_left_padding_match_reference():
    reference, fast = model_pair("tiny-engram-moe-hc4")
    ids = torch.randint(3, 512, (3, 17), device=CUDA)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(fast.generate(ids, **kwargs), reference.generate(ids, **kwargs))
        beams = dict(kwargs, num_beams=3, num_return_sequences=2)
        assert torch.equal(fast.generate(ids, **beams), reference.generate(ids, **beams))
