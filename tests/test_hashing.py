"""Hashing: bit-exact with the reference demo's fixtures, and equal to a slow per-position loop."""

import pytest
import torch
from helpers_fixtures import load_json

from engram_moe import EngramMoEConfig, engram_hash_ids

HASHING = load_json("hashing")
CONFIG_NAMES = ["A", "B", "C", "A_dsv3"]
LEN_TOKENIZER = {"tokenizers/smollm2": 49152, "tokenizers/deepseek-v3": 128815}


def config_from_fixture(name: str) -> EngramMoEConfig:
    fixture = HASHING["configs"][name]
    ref = fixture["config"]
    return EngramMoEConfig(
        vocab_size=LEN_TOKENIZER[fixture["tokenizer"]],
        num_hidden_layers=max(ref["layer_ids"]) + 1,
        engram_layer_ids=ref["layer_ids"],
        engram_max_ngram_size=ref["max_ngram_size"],
        engram_num_heads=ref["n_head_per_ngram"],
        engram_embed_dim_per_ngram=ref["n_embed_per_ngram"],
        engram_vocab_size=ref["engram_vocab_size"],
        engram_pad_id=ref["pad_id"],
        engram_seed=ref["seed"],
        engram_compressed_vocab_size=fixture["compressed_vocab_size"],
        engram_compressed_pad_id=fixture["pad_id_compressed"],
    )


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_primes_and_multipliers_match_reference(name):
    config = config_from_fixture(name)
    layers = HASHING["configs"][name]["layers"]
    for i, layer_id in enumerate(config.engram_layer_ids):
        expected = layers[str(layer_id)]
        assert config.engram_primes[i] == expected["primes_per_order_per_head"]
        assert config.engram_multipliers[i] == expected["multipliers"]
        assert config.engram_table_rows[i] == expected["total_rows"]


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_hash_ids_match_reference(name):
    config = config_from_fixture(name)
    for batch in HASHING["configs"][name]["batches"]:
        ids = torch.tensor(batch["compressed_ids"])
        hashes = engram_hash_ids(config, ids)
        assert hashes.dtype == torch.long
        for i, layer_id in enumerate(config.engram_layer_ids):
            expected = torch.tensor(batch["hash_ids"][str(layer_id)])
            assert torch.equal(hashes[:, :, i], expected), (name, batch["name"], layer_id)


def slow_reference_hash(config: EngramMoEConfig, ids: list[list[int]]) -> list:
    """The algorithm of spec 2.4, one position, order and head at a time, in Python integers."""
    n_max, pad = config.engram_max_ngram_size, config.engram_compressed_pad_id
    out = []
    for row in ids:
        row_out = []
        for t in range(len(row)):
            per_layer = []
            for layer, multipliers in enumerate(config.engram_multipliers):
                heads = []
                for n in range(2, n_max + 1):
                    mix = 0
                    for k in range(n):
                        token = row[t - k] if t - k >= 0 else pad
                        mix ^= token * multipliers[k]
                    heads.extend(mix % p for p in config.engram_primes[layer][n - 2])
                per_layer.append(heads)
            row_out.append(per_layer)
        out.append(row_out)
    return out


@pytest.mark.parametrize("n_max", [2, 3, 4, 5])
def test_hash_equals_slow_reference(n_max):
    config = EngramMoEConfig(
        vocab_size=1000,
        num_hidden_layers=4,
        engram_layer_ids=[3, 0],
        engram_max_ngram_size=n_max,
        engram_num_heads=3,
        engram_embed_dim_per_ngram=6,
        engram_vocab_size=[97 + 10 * i for i in range(n_max - 1)],
        engram_compressed_vocab_size=700,
        engram_compressed_pad_id=5,
        engram_seed=11,
    )
    ids = torch.randint(0, 700, (3, 9), generator=torch.Generator().manual_seed(n_max))
    assert engram_hash_ids(config, ids).tolist() == slow_reference_hash(config, ids.tolist())


def test_history_continues_a_sequence():
    config = config_from_fixture("C")
    ids = torch.tensor(HASHING["configs"]["C"]["batches"][0]["compressed_ids"])
    context = config.engram_max_ngram_size - 1
    full = engram_hash_ids(config, ids)
    tail = engram_hash_ids(config, ids[:, 7:], history=ids[:, 7 - context : 7])
    assert torch.equal(tail, full[:, 7:])


def test_padding_counts_as_sequence_start():
    config = config_from_fixture("B")
    ids = torch.tensor(HASHING["configs"]["B"]["batches"][0]["compressed_ids"])[:1, :8]
    padded = torch.cat([torch.full((1, 3), 1234), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 8, dtype=torch.long)], dim=1)
    assert torch.equal(
        engram_hash_ids(config, padded, attention_mask=mask)[:, 3:], engram_hash_ids(config, ids)
    )
    # Without the mask the padding leaks into the first n-grams.
    assert not torch.equal(engram_hash_ids(config, padded)[:, 3:], engram_hash_ids(config, ids))


def test_out_of_range_compressed_ids_are_named():
    config = config_from_fixture("B")
    with pytest.raises(ValueError, match="32873"):
        engram_hash_ids(config, torch.tensor([[1, 32873]]))
    with pytest.raises(ValueError, match="-1"):
        engram_hash_ids(config, torch.tensor([[-1, 3]]))
