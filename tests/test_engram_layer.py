"""EngramLayer against the reference demo's outputs (golden fixtures) and a slow plain-PyTorch reference."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers_fixtures import fixture_path, load_json
from safetensors.torch import load_file

from engram_moe import EngramLayer, EngramMoEConfig, engram_hash_ids
from engram_moe.convert_reference import convert_reference_state_dict, reference_engram_config


def fixture_config(hc: int, config_hc: int | None = None):
    """The demo's configuration of module_hc{hc}; `config_hc` overrides the branch count (mismatch tests)."""
    meta = load_json(f"module/module_hc{hc}")
    engram, derived = meta["engram_config"], meta["derived"]
    return reference_engram_config(
        vocab_size=49152,
        hidden_size=meta["backbone_config"]["hidden_size"],
        hc_mult=hc if config_hc is None else config_hc,
        num_hidden_layers=2,
        num_attention_heads=4,
        engram_layer_ids=engram["layer_ids"],
        engram_vocab_size=engram["engram_vocab_size"],
        engram_max_ngram_size=engram["max_ngram_size"],
        engram_embed_dim_per_ngram=engram["n_embed_per_ngram"],
        engram_num_heads=engram["n_head_per_ngram"],
        engram_pad_id=engram["pad_id"],
        engram_seed=engram["seed"],
        engram_kernel_size=engram["kernel_size"],
        engram_compressed_vocab_size=derived["compressed_vocab_size"],
        engram_compressed_pad_id=derived["pad_id_compressed"],
    )


def fixture_layer(hc: int) -> tuple[EngramLayer, dict]:
    meta = load_json(f"module/module_hc{hc}")
    config = fixture_config(hc)
    layer = EngramLayer(config, meta["layer_id"])
    state = load_file(fixture_path("module", f"module_hc{hc}.safetensors"))
    layer.load_state_dict(convert_reference_state_dict(state, config, meta["layer_id"]), strict=True)
    io = load_file(fixture_path("module", f"module_hc{hc}_io.safetensors"))
    return layer, io


@pytest.mark.parametrize("hc", [1, 4])
def test_fixture_hashes_and_memory(hc):
    layer, io = fixture_layer(hc)
    hash_ids = engram_hash_ids(fixture_config(hc), io["compressed_ids"])[:, :, 0]
    assert torch.equal(hash_ids, io["hash_ids"])
    torch.testing.assert_close(layer.lookup(hash_ids), io["embeddings"], atol=0, rtol=0)


@pytest.mark.parametrize("hc", [1, 4])
def test_fixture_outputs_float32(hc):
    layer, io = fixture_layer(hc)
    hidden = io["hidden_states"]
    with torch.no_grad():
        updated, gates = layer(hidden, io["hash_ids"])
    # The demo returns Y without the residual; our layer returns hidden + Y.
    torch.testing.assert_close(updated - hidden, io["output"], atol=1e-5, rtol=0)
    torch.testing.assert_close(gates, io["gates"].squeeze(-1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("hc", [1, 4])
def test_fixture_outputs_float64_pin_the_eps(hc):
    # At float64 a different gate-norm eps (1e-6 instead of finfo eps) moves the output by ~1e-6; we match to 1e-12.
    layer, io = fixture_layer(hc)
    layer = layer.double()
    hidden = io["hidden_states"].double()
    with torch.no_grad():
        updated, gates = layer(hidden, io["hash_ids"])
    torch.testing.assert_close(updated - hidden, io["output_f64"], atol=1e-12, rtol=0)
    torch.testing.assert_close(gates, io["gates_f64"].squeeze(-1), atol=1e-12, rtol=0)


def test_converter_rejects_unknown_and_mismatched_names():
    state = load_file(fixture_path("module", "module_hc4.safetensors"))
    with pytest.raises(ValueError, match="bogus"):
        convert_reference_state_dict({**state, "bogus.weight": torch.zeros(1)}, fixture_config(4), 1)
    with pytest.raises(ValueError, match="offsets"):
        bad = {**state, "multi_head_embedding.offsets": torch.tensor([0, 1, 2, 3])}
        convert_reference_state_dict(bad, fixture_config(4), 1)
    with pytest.raises(ValueError, match="hc_mult"):
        convert_reference_state_dict(state, fixture_config(4, config_hc=1), 1)


# ------------------------------------------------------------------------------------------ slow reference


def reference_engram_forward(
    layer: EngramLayer, hidden: torch.Tensor, hash_ids: torch.Tensor
) -> torch.Tensor:
    """Engram, written out from the spec with explicit loops over branches, heads and conv taps."""
    batch, length, hc, d = hidden.shape
    weight = layer.embedding.weight
    rows = [weight[hash_ids[:, :, j] + int(layer.offsets[j])] for j in range(hash_ids.shape[-1])]
    memory = torch.cat(rows, dim=-1)
    value = memory @ layer.value_proj.weight.T
    if layer.value_proj.bias is not None:
        value = value + layer.value_proj.bias

    def rms(x, w, eps):
        eps = torch.finfo(x.dtype).eps if eps is None else eps
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w

    gated = []
    for m in range(hc):
        key_w = layer.key_proj.weight[m * d : (m + 1) * d]
        key = memory @ key_w.T
        if layer.key_proj.bias is not None:
            key = key + layer.key_proj.bias[m * d : (m + 1) * d]
        k = rms(key, layer.key_norm.weight[m], layer.key_norm.eps)
        q = rms(hidden[:, :, m], layer.query_norm.weight[m], layer.query_norm.eps)
        score = (k * q).sum(-1, keepdim=True) / math.sqrt(d)
        score = torch.sign(score) * torch.sqrt(torch.clamp(score.abs(), min=1e-6))
        gated.append(torch.sigmoid(score) * value)
    u = torch.stack(gated, dim=2)
    if layer.conv is None:
        return hidden + u
    normed = torch.stack(
        [rms(u[:, :, m], layer.conv_norm.weight[m], layer.conv_norm.eps) for m in range(hc)], 2
    )
    kernel = layer.conv.weight.shape[-1]
    dilation = layer.conv.dilation[0]
    conv = torch.zeros_like(normed)
    for m in range(hc):
        w = layer.conv.weight[m * d : (m + 1) * d, 0]  # [d, kernel]
        for t in range(length):
            for tap in range(kernel):
                src = t - (kernel - 1 - tap) * dilation
                if src >= 0:
                    conv[:, t, m] = conv[:, t, m] + w[:, tap] * normed[:, src, m]
    return hidden + F.silu(conv) + u


@pytest.mark.parametrize(
    "overrides",
    [
        {"hc_mult": 1},
        {"hc_mult": 3, "engram_use_bias": True, "engram_gate_norm_eps": None},
        {"hc_mult": 2, "engram_use_conv": False},
        {
            "hc_mult": 2,
            "engram_max_ngram_size": 4,
            "engram_vocab_size": [31, 37, 41],
            "engram_kernel_size": 3,
        },
    ],
)
def test_layer_equals_slow_reference_forward_and_gradients(overrides):
    config = EngramMoEConfig(
        **{
            "vocab_size": 100,
            "hidden_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "engram_layer_ids": [1],
            "engram_num_heads": 2,
            "engram_embed_dim_per_ngram": 8,
            "engram_vocab_size": [31, 37],
            "engram_conv_zero_init": False,
            **overrides,
        }
    )
    torch.manual_seed(0)
    layer = EngramLayer(config, 1).double()
    for param in layer.parameters():
        torch.nn.init.normal_(param, std=0.5)
    if layer.conv_norm is not None:
        torch.nn.init.normal_(layer.conv_norm.weight, mean=1.0, std=0.1)
    ids = torch.randint(0, 100, (2, 11))
    hash_ids = engram_hash_ids(config, ids)[:, :, 0]
    hidden = torch.randn(2, 11, config.hc_mult, 16, dtype=torch.float64, requires_grad=True)

    ours, _ = layer(hidden, hash_ids)
    ours_grads = torch.autograd.grad(ours.pow(2).sum(), [hidden, *layer.parameters()])
    ref = reference_engram_forward(layer, hidden, hash_ids)
    ref_grads = torch.autograd.grad(ref.pow(2).sum(), [hidden, *layer.parameters()])
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=1e-10)
    for a, b in zip(ours_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)
