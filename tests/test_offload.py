"""Engram table placement (device / host), the device maps for from_pretrained, and the prefetch bookkeeping.

On a CPU-only machine "host" and "device" are the same memory, so these tests check the logic: which tensors
move, which device map transformers receives, which layers get their memory gathered ahead, and that the
results equal the reference. tests/gpu checks pinned memory, UVA reads and the side stream on a GPU.
"""

import copy

import pytest
import torch
from conftest import assert_matches_reference, build_model
from transformers import AutoModelForCausalLM
from transformers.integrations.accelerate import expand_device_map

from engram_moe import EngramMoEForCausalLM
from engram_moe.engram_offload import EngramMemory, engram_device_map, prepare_engram_inputs


def table_names(model):
    return {n for n, _ in model.named_parameters() if ".engram.embedding." in n}


def test_host_tables_stay_on_the_host_when_the_model_moves_but_follow_dtype_changes():
    model = build_model(engram_table_placement="host")
    model.to("meta")
    for name, param in model.named_parameters():
        expected = "cpu" if name in table_names(model) else "meta"
        assert param.device.type == expected, name
    model = build_model(engram_table_placement=["host", "device"])
    model.to(torch.float64)
    first, second = model.model.engram_layers
    assert first.embedding.host_resident and not second.embedding.host_resident
    assert first.embedding.weight.dtype == torch.float64 and first.embedding.weight.device.type == "cpu"
    model.to("meta")
    assert first.embedding.weight.device.type == "cpu"
    assert second.embedding.weight.device.type == "meta"


def test_to_empty_materialises_a_meta_host_table_on_the_host():
    config = build_model().config
    config.engram_table_placement = "host"
    with torch.device("meta"):
        model = EngramMoEForCausalLM(config)
    model.to_empty(device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    model.model.engram_layers[0].embedding._apply(lambda t: torch.empty_like(t, device="cpu"))
    weight = model.model.engram_layers[0].embedding.weight
    assert weight.device.type == "cpu" and weight.shape == (
        config.engram_table_rows[0],
        config.engram_head_dim,
    )


def test_device_map_leaves_host_tables_out_and_keeps_one_device():
    config = build_model().config
    config.engram_table_placement = ["host", "device"]
    device_map = engram_device_map(EngramMoEForCausalLM, config, "cuda:0")
    model = EngramMoEForCausalLM(config)
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    placed = expand_device_map(device_map, names)
    host_table = "model.layers.1.engram.embedding.weight"
    assert placed[host_table] == "cpu"  # transformers' default for names no entry covers
    assert {placed[n] for n in names if n != host_table} == {torch.device("cuda:0")}
    # One device value, so transformers loads directly and dispatches no offload hooks.
    assert set(device_map.values()) == {torch.device("cuda:0")}
    assert "model.layers.2" in device_map  # the device-placed table's layer stays one entry


def test_device_map_splits_a_user_map_around_host_tables():
    config = build_model().config
    config.engram_table_placement = "host"
    user_map = {"": 0, "model.layers.2": 1, "lm_head": 1}
    device_map = engram_device_map(EngramMoEForCausalLM, config, user_map)
    model = EngramMoEForCausalLM(config)
    names = [n for n, _ in model.named_parameters()]
    placed = expand_device_map(device_map, names)
    for name in names:
        if ".engram.embedding." in name:
            assert placed[name] == "cpu", name
        elif name.startswith(("model.layers.2.", "lm_head")):
            assert placed[name] == 1, name
        else:
            assert placed[name] == 0, name
    assert engram_device_map(EngramMoEForCausalLM, build_model().config, user_map) == user_map


@pytest.mark.parametrize(
    "placement,device_map", [("host", "cpu"), (["device", "host"], "cpu"), ("host", "auto")]
)
def test_from_pretrained_with_host_tables_and_a_device_map(tmp_path, placement, device_map):
    model = build_model()
    model.save_pretrained(tmp_path)
    ids = torch.randint(0, 512, (2, 8))
    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path, device_map=device_map, engram_table_placement=placement
    )
    assert loaded.config.engram_table_placement == placement
    expected = [placement] * 2 if isinstance(placement, str) else placement
    assert [layer.embedding.host_resident for layer in loaded.model.engram_layers] == [
        p == "host" for p in expected
    ]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    loaded.set_engram_table_placement("device")
    assert not any(layer.embedding.host_resident for layer in loaded.model.engram_layers)
    assert loaded.config.engram_table_placement == "device"


def test_prepare_engram_inputs_gathers_fast_layers_and_hashes_the_rest():
    model = build_model()
    ids = torch.randint(0, 512, (2, 7))
    reference_hash = model.model.compute_engram_hash_ids(ids, None, None)
    dtype = model.model.embed_tokens.weight.dtype

    hash_ids, memories = prepare_engram_inputs(model.model, ids, None, None, dtype)
    assert memories == {} and torch.equal(hash_ids, reference_hash)  # "auto" on CPU is the reference

    model.config.engram_kernels = "torch"
    hash_ids, memories = prepare_engram_inputs(model.model, ids, None, None, dtype)
    assert hash_ids is None and sorted(memories) == model.config.engram_layer_ids
    for slot, layer in enumerate(model.model.engram_layers):
        memory = memories[layer.layer_idx]
        assert isinstance(memory, EngramMemory) and not memory.prefetched  # no side stream on CPU
        assert torch.equal(memory.wait(), layer.lookup(reference_hash[:, :, slot]))

    # A table the kernels cannot read from the ids' device falls back to the reference path for that layer.
    second = model.model.engram_layers[1]
    second.embedding.weight = torch.nn.Parameter(second.embedding.weight.to("meta"))
    hash_ids, memories = prepare_engram_inputs(model.model, ids, None, None, dtype)
    assert sorted(memories) == [model.config.engram_layer_ids[0]]
    assert torch.equal(hash_ids, reference_hash)


def test_host_placed_model_with_fast_path_matches_the_reference_through_generation():
    reference = build_model("tiny-engram-moe-hc4")
    host = copy.deepcopy(reference)
    host.config.engram_kernels = "torch"
    host.set_engram_table_placement("host")
    ids = torch.randint(0, 512, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    assert_matches_reference(host, reference, ids, mask, max_new_tokens=5, rtol=1e-5, atol=1e-6)
