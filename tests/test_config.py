"""EngramMoEConfig: derived constants from configs alone, validation errors, serialisation."""

import json

import pytest
from helpers_fixtures import load_json

from engram_moe import EngramMoEConfig, get_preset
from engram_moe.presets import PRESETS


def test_v4_1_row_totals_and_multipliers_from_config():
    check = load_json("hashing")["v4_1_check"]
    config = EngramMoEConfig(
        vocab_size=129280,
        num_hidden_layers=16,
        engram_layer_ids=[1, 14],
        engram_max_ngram_size=4,
        engram_num_heads=8,
        engram_vocab_size=[16_000_000] * 3,
        engram_seed=0,
        engram_compressed_vocab_size=99_092,
    )
    assert config.engram_table_rows == [384_006_168, 384_016_682]
    assert config.engram_multipliers == [
        check["layers"]["1"]["multipliers"],
        check["layers"]["14"]["multipliers"],
    ]


@pytest.mark.parametrize(
    ("preset", "expected"), [("engram-27b", 5_792_338_560), ("engram-40b", 18_534_311_360)]
)
def test_paper_engram_parameter_counts(preset, expected):
    config = get_preset(preset)
    assert config.engram_head_dim == 80
    assert config.engram_table_parameters == expected


def test_derived_constants_are_read_only():
    config = get_preset("tiny-engram-moe")
    with pytest.raises(AttributeError, match="engram_primes"):
        config.engram_primes = [[[7]]]
    with pytest.raises(AttributeError, match="engram_multipliers"):
        config.engram_multipliers = [[1]]


def test_derived_constants_follow_field_changes():
    config = get_preset("tiny-engram-moe")
    before = config.engram_multipliers
    config.engram_seed = 5
    assert config.engram_multipliers != before
    assert config.engram_multipliers == get_preset("tiny-engram-moe", engram_seed=5).engram_multipliers


def test_config_round_trip_saves_derived_constants(tmp_path):
    config = get_preset("tiny-engram-moe-hc4")
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["engram_primes"] == config.engram_primes
    assert saved["engram_multipliers"] == config.engram_multipliers
    loaded = EngramMoEConfig.from_pretrained(tmp_path)
    assert loaded.engram_primes == config.engram_primes
    assert loaded.layer_types == ["full_attention", "hybrid", "hybrid"]
    assert loaded.hc_mult == 4


def test_tampered_derived_constants_are_refused(tmp_path):
    config = get_preset("tiny-engram-moe")
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["engram_multipliers"][0][0] += 2
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="engram_multipliers"):
        EngramMoEConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        ({"engram_layer_ids": [0, 7]}, "engram_layer_ids"),
        ({"engram_layer_ids": [1, 1]}, "engram_layer_ids"),
        ({"engram_vocab_size": [100]}, "engram_vocab_size"),
        ({"engram_vocab_size": [1, 100]}, "engram_vocab_size"),
        ({"engram_max_ngram_size": 1, "engram_vocab_size": []}, "engram_max_ngram_size"),
        ({"engram_embed_dim_per_ngram": 15}, "engram_embed_dim_per_ngram"),
        ({"engram_num_heads": 0}, "engram_num_heads"),
        ({"engram_pad_id": 600}, "engram_pad_id"),
        ({"engram_compressed_vocab_size": 1000}, "engram_compressed_vocab_size"),
        ({"engram_compressed_pad_id": 512}, "engram_compressed_pad_id"),
        ({"engram_gate_norm_eps": -1.0}, "engram_gate_norm_eps"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"num_attention_heads": 3}, "num_attention_heads"),
        ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
        ({"scoring_func": "relu"}, "scoring_func"),
        ({"first_k_dense_replace": 9}, "first_k_dense_replace"),
        ({"hc_mult": 0}, "hc_mult"),
        ({"layer_types": ["full_attention"] * 3}, "layer_types"),
    ],
)
def test_bad_values_raise_value_error_naming_them(overrides, name):
    with pytest.raises(ValueError, match=name):
        get_preset("tiny-engram-moe", **overrides)


def test_unknown_preset_is_named():
    with pytest.raises(ValueError, match="no-such-preset"):
        get_preset("no-such-preset")


@pytest.mark.parametrize("name", sorted(n for n in PRESETS if not n.endswith(("27b", "40b"))))
def test_presets_build(name):
    config = get_preset(name)
    assert config.model_type == "engram_moe"
    assert len(config.layer_types) == config.num_hidden_layers


def test_engram_moe_twins_share_the_backbone():
    engram, moe = get_preset("small-engram-moe").to_dict(), get_preset("small-moe").to_dict()
    differing = {k for k in engram if engram[k] != moe.get(k)}
    assert differing <= {
        "engram_layer_ids",
        "engram_num_heads",
        "engram_embed_dim_per_ngram",
        "engram_vocab_size",
        "engram_primes",
        "engram_multipliers",
        "layer_types",
    }
