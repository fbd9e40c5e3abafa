"""The fast Engram paths (fused PyTorch twin, Triton kernels) against the reference EngramLayer.

The fused PyTorch path runs everywhere. The Triton kernels run here through Triton's CPU interpreter
(TRITON_INTERPRET=1) when Triton is installed; on a GPU, tests/gpu runs them compiled.
"""

import copy
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from conftest import (
    assert_gate_gradients_match_the_twin,
    assert_generates_like,
    assert_matches_reference,
    assert_training_gradients_match,
    build_model,
)

from engram_moe import EngramLayer, EngramMoEConfig, get_preset, hash_ngrams
from engram_moe.engram_kernels import (
    engram_gate_torch,
    engram_layer_forward,
    hash_gather,
    resolve_kernel_mode,
)
from engram_moe.modeling_engram import engram_hash_constants


def layer_and_inputs(hc=4, use_conv=True, use_bias=False, gate_eps=1e-6, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    config = get_preset(
        "tiny-engram-moe-hc4" if hc == 4 else "tiny-engram-moe",
        engram_use_conv=use_conv,
        engram_use_bias=use_bias,
        engram_gate_norm_eps=gate_eps,
        engram_conv_zero_init=False,
    )
    layer = EngramLayer(config, 1).to(dtype)
    with torch.no_grad():
        for norm in (layer.key_norm, layer.query_norm, layer.conv_norm):
            if norm is not None:
                norm.weight.uniform_(0.5, 1.5)  # not all ones, so a swapped weight shows
        if layer.conv is not None:
            layer.conv.weight.normal_()
    ids = torch.randint(0, config.engram_compressed_vocab_size, (2, 9))
    multipliers, moduli = engram_hash_constants(config)
    pads = ids.new_full((2, config.engram_max_ngram_size - 1), config.engram_compressed_pad_id)
    ids_with_history = torch.cat([pads, ids], dim=1)
    hash_ids = hash_ngrams(ids_with_history, multipliers, moduli, config.engram_max_ngram_size)[:, :, 0]
    hidden = torch.randn(2, 9, hc, config.hidden_size, dtype=dtype)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :2] = 0
    return config, layer, ids_with_history, multipliers[0], moduli[0], hash_ids, hidden, mask


@pytest.mark.parametrize(
    "hc,use_conv,use_bias,gate_eps", [(4, True, False, 1e-6), (1, True, True, None), (4, False, False, 1e-6)]
)
def test_fused_torch_path_matches_reference_forward_and_gradients(hc, use_conv, use_bias, gate_eps):
    _, layer, _, _, _, hash_ids, hidden, mask = layer_and_inputs(hc, use_conv, use_bias, gate_eps)
    fused = copy.deepcopy(layer)
    hidden_ref = hidden.clone().requires_grad_()
    hidden_fused = hidden.clone().requires_grad_()
    out_ref, gate_ref = layer(hidden_ref, hash_ids, attention_mask=mask)
    out_fused, gate_fused = engram_layer_forward(
        fused, hidden_fused, fused.lookup(hash_ids), mask, None, use_triton=False
    )
    torch.testing.assert_close(out_fused, out_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gate_fused, gate_ref, rtol=1e-12, atol=1e-12)
    probe = torch.randn_like(out_ref)
    (out_ref * probe).sum().backward()
    (out_fused * probe).sum().backward()
    torch.testing.assert_close(hidden_fused.grad, hidden_ref.grad, rtol=1e-10, atol=1e-12)
    for (name, p_ref), (_, p_fused) in zip(layer.named_parameters(), fused.named_parameters(), strict=True):
        torch.testing.assert_close(p_fused.grad, p_ref.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_fused_gate_in_bfloat16_is_within_bfloat16_rounding():
    # The twin keeps float32 intermediates where the reference rounds to bf16 between ops: compare both to fp64.
    _, layer, _, _, _, hash_ids, hidden, _ = layer_and_inputs(hc=4)
    exact, _ = layer(hidden, hash_ids)
    low = copy.deepcopy(layer).to(torch.bfloat16)
    ref_bf16, _ = low(hidden.bfloat16(), hash_ids)
    fused_bf16, _ = engram_layer_forward(low, hidden.bfloat16(), low.lookup(hash_ids), None, None, False)
    err_ref = (ref_bf16.double() - exact).norm() / exact.norm()
    err_fused = (fused_bf16.double() - exact).norm() / exact.norm()
    assert err_fused < 1e-2 and err_fused <= err_ref * 1.5, (err_fused, err_ref)


def test_hash_gather_torch_path_equals_reference_lookup_and_its_gradient():
    _, layer, ids, multipliers, moduli, hash_ids, _, _ = layer_and_inputs(dtype=torch.float32)
    weight = layer.embedding.weight
    memory = hash_gather(ids, multipliers, moduli, layer.offsets, weight, use_triton=False)
    reference = layer.lookup(hash_ids)
    assert torch.equal(memory, reference)
    probe = torch.randn_like(reference)
    (grad_ref,) = torch.autograd.grad((reference * probe).sum(), weight)
    (grad_fast,) = torch.autograd.grad((memory * probe).sum(), weight)
    torch.testing.assert_close(grad_fast, grad_ref)


def test_model_with_torch_kernels_matches_reference_logits_gradients_and_generation():
    reference = build_model("tiny-engram-moe-hc4")
    fast = copy.deepcopy(reference)
    fast.config.engram_kernels = "torch"
    ids = torch.randint(0, 512, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    out_fast, out_ref = assert_training_gradients_match(fast, reference, ids, 1e-4, 1e-6, attention_mask=mask)
    torch.testing.assert_close(out_fast.logits, out_ref.logits, rtol=1e-5, atol=1e-6)
    assert_generates_like(fast, reference, ids, mask, max_new_tokens=6)


def test_kernel_mode_resolution_and_config_validation():
    assert resolve_kernel_mode("reference", torch.device("cpu")) == "reference"
    assert resolve_kernel_mode("torch", torch.device("cpu")) == "torch"
    assert resolve_kernel_mode("auto", torch.device("cpu")) == "reference"
    with pytest.raises(ValueError, match="'fastest'"):
        resolve_kernel_mode("fastest", torch.device("cpu"))
    with pytest.raises(ValueError, match="engram_kernels='fastest'"):
        EngramMoEConfig(engram_layer_ids=[1], engram_kernels="fastest")
    with pytest.raises(ValueError, match="engram_table_placement='gpu'"):
        EngramMoEConfig(engram_layer_ids=[1], engram_table_placement="gpu")
    with pytest.raises(ValueError, match=r"engram_table_placement=\['host'\]"):
        EngramMoEConfig(engram_layer_ids=[1, 2], engram_table_placement=["host"])


def test_fused_gate_handles_a_zero_score_like_the_reference():
    # sign(0) = 0: a zero score gives gate sigmoid(0) = 0.5 in both.
    key = torch.zeros(1, 1, 4, dtype=torch.float64)
    query = torch.randn(1, 1, 4, dtype=torch.float64)
    value = torch.randn(1, 4, dtype=torch.float64)
    ones = torch.ones(1, 4, dtype=torch.float64)
    gate, u, _ = engram_gate_torch(key, query, value, ones, ones, None, 1e-6, 1e-6, 1e-5)
    assert gate.item() == 0.5
    torch.testing.assert_close(u[0, 0], 0.5 * value[0])


# ---------------------------------------------------------------------------------------------- Triton (interpreter)


@pytest.fixture
def triton_interpreter():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    if os.environ.get("TRITON_INTERPRET") != "1":
        # Triton fixes interpretation when it is imported (transformers imports it), so these run in a subprocess
        # started with TRITON_INTERPRET=1 (test_triton_kernels_under_the_interpreter), or on a GPU in tests/gpu.
        pytest.skip("needs TRITON_INTERPRET=1 at interpreter start")


def test_triton_kernels_under_the_interpreter():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("already interpreting: the tests below run directly")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "triton_interp"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0 and " passed" in result.stdout and "skipped" not in result.stdout, (
        result.stdout[-3000:] + result.stderr[-3000:]
    )


def test_triton_interp_hash_is_bit_exact_on_paper_constants(triton_interpreter):
    from engram_moe.engram_kernels import engram_hash

    for config in (
        get_preset("engram-27b"),
        get_preset("tiny-engram-moe", engram_max_ngram_size=4, engram_vocab_size=[211, 223, 227]),
    ):
        multipliers, moduli = engram_hash_constants(config)
        ids = torch.randint(
            0, config.engram_compressed_vocab_size, (3, 17 + config.engram_max_ngram_size - 1)
        )
        expected = hash_ngrams(ids, multipliers, moduli, config.engram_max_ngram_size)
        assert torch.equal(engram_hash(ids, multipliers, moduli, config.engram_max_ngram_size), expected)


def test_triton_interp_hash_gather_is_exact_and_its_gradient_matches_the_embedding(triton_interpreter):
    _, layer, ids, multipliers, moduli, hash_ids, _, _ = layer_and_inputs(hc=1, dtype=torch.float32)
    weight = layer.embedding.weight
    memory = hash_gather(ids, multipliers, moduli, layer.offsets, weight, use_triton=True)
    reference = layer.lookup(hash_ids)
    assert torch.equal(memory, reference)
    as_bf16 = hash_gather(ids, multipliers, moduli, layer.offsets, weight, out_dtype=torch.bfloat16)
    # The interpreter casts by truncation (the GPU rounds to nearest even, checked bit-exact in tests/gpu).
    torch.testing.assert_close(as_bf16, reference.bfloat16(), rtol=2**-7, atol=0)
    probe = torch.randn_like(reference)
    (grad_ref,) = torch.autograd.grad((reference * probe).sum(), weight)
    (grad_fast,) = torch.autograd.grad((memory * probe).sum(), weight)
    torch.testing.assert_close(grad_fast, grad_ref)


@pytest.mark.parametrize("hc,use_conv", [(4, True), (1, True), (4, False)])
def test_triton_interp_gate_matches_the_torch_twin(triton_interpreter, hc, use_conv):
    from engram_moe.engram_kernels import engram_gate_triton

    _, layer, _, _, _, hash_ids, hidden, _ = layer_and_inputs(hc=hc, use_conv=use_conv, dtype=torch.float32)
    memory = layer.lookup(hash_ids)
    key = layer.key_proj(memory).unflatten(-1, (hc, hidden.shape[-1])).detach()
    value = layer.value_proj(memory).detach()
    args = (
        key,
        hidden,
        value,
        layer.key_norm.weight.detach(),
        layer.query_norm.weight.detach(),
        layer.conv_norm.weight.detach() if use_conv else None,
        1e-6,
        1e-6,
        1e-5,
    )
    expected = engram_gate_torch(*args)
    got = engram_gate_triton(*args)
    for want, have in zip(expected, got, strict=True):
        if want is None:
            assert have is None
        else:
            torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "hc,hidden,use_conv,used",
    [
        (4, 32, True, ("gate", "u", "normed")),
        (1, 20, True, ("u", "normed")),
        (4, 32, False, ("gate", "u")),
        (3, 24, True, ("normed",)),
    ],
)
def test_triton_interp_gate_backward_matches_the_torch_twin(triton_interpreter, hc, hidden, use_conv, used):
    # 37 tokens: not a multiple of any block, so the last program's tail is masked.
    assert_gate_gradients_match_the_twin(37, hc, hidden, use_conv, used)


def test_triton_interp_training_gradients_match_reference(triton_interpreter):
    reference = build_model("tiny-engram-moe-hc4")
    fast = copy.deepcopy(reference)
    fast.config.engram_kernels = "triton"
    ids = torch.randint(0, 512, (2, 12))
    assert_training_gradients_match(fast, reference, ids, rtol=1e-4, atol=1e-6)


def test_triton_interp_model_kernels_matches_reference(triton_interpreter):
    reference = build_model("tiny-engram-moe-hc4")
    fast = copy.deepcopy(reference)
    fast.config.engram_kernels = "triton"
    ids = torch.randint(0, 512, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    assert_matches_reference(fast, reference, ids, mask, max_new_tokens=4, rtol=1e-5, atol=1e-5)


def test_triton_interp_conv_residual_matches_reference_with_mask_and_cache(triton_interpreter):
    from transformers import DynamicCache

    from engram_moe.engram_kernels import conv_residual_triton

    config, layer, _, _, _, _, _, _ = layer_and_inputs(hc=4, dtype=torch.float32)
    torch.manual_seed(3)
    hidden, u, normed = (torch.randn(2, 13, 4, config.hidden_size) for _ in range(3))
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[0, :4] = 0
    with torch.no_grad():
        expected = hidden + (u + layer._short_conv(normed, mask, None))
        torch.testing.assert_close(conv_residual_triton(layer, hidden, u, normed, mask, None), expected)
        # Prefill then two decode steps through a cache, in both the reference and the kernel.
        caches = [DynamicCache(config=config), DynamicCache(config=config)]
        for start, stop in ((0, 11), (11, 12), (12, 13)):
            step = [t[:, start:stop] for t in (hidden, u, normed)]
            step_mask = mask[:, :stop]
            expected = step[0] + (step[1] + layer._short_conv(step[2], step_mask, caches[0]))
            got = conv_residual_triton(layer, *step, step_mask, caches[1])
            torch.testing.assert_close(got, expected)
            torch.testing.assert_close(caches[1].get_conv_state(1, 0), caches[0].get_conv_state(1, 0))


def test_triton_interp_generation_modes_match_reference(triton_interpreter):
    reference = build_model("tiny-engram-moe-hc4")
    fast = copy.deepcopy(reference)
    fast.config.engram_kernels = "triton"
    pattern = torch.randint(3, 512, (1, 4))
    ids = torch.cat([pattern, pattern, pattern], dim=1)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        for extra in ({"prompt_lookup_num_tokens": 3}, {"num_beams": 3, "num_return_sequences": 2}):
            assert torch.equal(
                fast.generate(ids, **kwargs, **extra), reference.generate(ids, **kwargs, **extra)
            )
