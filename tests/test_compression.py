"""Tokenizer compression against the golden tables computed by running the reference demo."""

from __future__ import annotations

import functools
import hashlib
import math

import pytest
import torch
from helpers_fixtures import load_json, load_tokenizer

from engram_moe.compression import build_token_map, compressed_vocab_size, key_normalizer, map_pad_id

GOLDEN = load_json("compression")["tokenizers"]
NAMES = ("smollm2", "deepseek-v3")


@functools.cache
def _token_map(name: str) -> torch.Tensor:
    return build_token_map(load_tokenizer(name))


@pytest.fixture(scope="module", params=NAMES)
def built(request):
    name = request.param
    return name, load_tokenizer(name), _token_map(name)


def _sha256_int64_le(table: torch.Tensor) -> str:
    return hashlib.sha256(table.to(torch.int64).numpy().astype("<i8").tobytes()).hexdigest()


def test_token_map_shape_and_size(built):
    name, tokenizer, table = built
    golden = GOLDEN[name]
    assert table.dtype == torch.long and table.dim() == 1
    assert len(tokenizer) == len(table) == golden["len_tokenizer"]
    assert compressed_vocab_size(table) == golden["compressed_vocab_size"]


def test_token_map_equals_demo_table(built):
    name, _, table = built
    golden = GOLDEN[name]
    head = golden["lookup_table_head"]
    assert table[: len(head)].tolist() == head
    assert _sha256_int64_le(table) == golden["lookup_table_sha256_int64_le"]


def test_group_sizes_and_example_merges(built):
    name, tokenizer, table = built
    golden = GOLDEN[name]
    histogram = torch.bincount(torch.bincount(table))
    assert {
        str(size): int(count) for size, count in enumerate(histogram.tolist()) if size and count
    } == golden["group_size_histogram"]
    normalizer = key_normalizer()
    for merge in golden["example_merges"]:
        assert not merge["truncated"]
        members = torch.nonzero(table == merge["new_id"]).flatten().tolist()
        assert members == merge["raw_ids"]
        assert len(members) == merge["num_raw_ids"]
        assert tokenizer.convert_ids_to_tokens(merge["raw_ids"]) == merge["raw_tokens"]
        for text in merge["decoded"]:
            assert "\ufffd" not in text
            assert (normalizer.normalize_str(text) or text) == merge["key"]


def test_pad_id_maps_as_in_demo(built):
    name, tokenizer, table = built
    golden = GOLDEN[name]["raw_pad_id_2"]
    assert tokenizer.convert_ids_to_tokens(2) == golden["raw_token"]
    assert map_pad_id(table, 2) == golden["compressed_id"]


def test_new_ids_follow_first_appearance(built):
    _, _, table = built
    first_seen = torch.full((compressed_vocab_size(table),), len(table), dtype=torch.long)
    first_seen.scatter_reduce_(0, table, torch.arange(len(table)), reduce="amin")
    assert torch.equal(first_seen, torch.sort(first_seen).values)
    assert table[0] == 0


def test_smollm2_sizes():
    golden = GOLDEN["smollm2"]
    assert (golden["len_tokenizer"], golden["compressed_vocab_size"]) == (49_152, 32_873)


def test_deepseek_v3_reduction_matches_paper():
    golden = GOLDEN["deepseek-v3"]
    table = _token_map("deepseek-v3")
    assert (len(table), compressed_vocab_size(table)) == (128_815, 98_627)
    reduction_percent = 100 * (1 - compressed_vocab_size(table) / len(table))
    # The paper's 23.43 % is the exact 23.4352 % truncated to two decimals (rounding gives 23.44 %).
    assert math.floor(reduction_percent * 100) / 100 == 23.43
    assert golden["paper_check"]["paper_table6_top5"] == [
        [" ", 163],
        ["a", 54],
        ["o", 40],
        ["e", 35],
        ["i", 30],
    ]
    counts = torch.bincount(table)
    top = torch.argsort(counts, descending=True, stable=True)[:5]
    assert counts[top].tolist() == [163, 54, 40, 35, 30]


class _PythonDecodeOnly:
    """A tokenizer without ``backend_tokenizer``, truncated to its first ``n`` ids."""

    def __init__(self, tokenizer, n):
        self._tokenizer, self._n = tokenizer, n

    def __len__(self):
        return self._n

    def decode(self, ids, skip_special_tokens=False):
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids):
        return self._tokenizer.convert_ids_to_tokens(ids)


@pytest.mark.parametrize("name", NAMES)
def test_python_decode_fallback_gives_the_same_prefix(name):
    # First-appearance numbering makes the map of the first n ids the first n entries of the full map.
    golden = GOLDEN[name]["lookup_table_head"]
    table = build_token_map(_PythonDecodeOnly(load_tokenizer(name), len(golden)))
    assert table.tolist() == golden


def test_key_normalizer_examples():
    normalizer = key_normalizer()
    assert normalizer.normalize_str(" The") == "the"
    assert normalizer.normalize_str("Ｃafé\n") == "cafe"  # NFKC full-width, accent stripped, stripped
    assert normalizer.normalize_str("\t\n") == " "  # pure whitespace collapses to one protected space
    assert normalizer.normalize_str("  a  b ") == "a b"


def test_empty_tokenizer_is_rejected():
    with pytest.raises(ValueError, match="no tokens"):
        build_token_map(_PythonDecodeOnly(None, 0))


def test_compressed_vocab_size_rejects_non_maps():
    assert compressed_vocab_size(torch.tensor([0, 1, 1, 2])) == 3
    with pytest.raises(ValueError):
        compressed_vocab_size(torch.tensor([0, 2]))  # gap
    with pytest.raises(ValueError):
        compressed_vocab_size(torch.tensor([-1, 0]))
    with pytest.raises(ValueError):
        compressed_vocab_size(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError):
        compressed_vocab_size(torch.zeros(2, 2, dtype=torch.long))


def test_map_pad_id_maps_through_the_table():
    table = torch.tensor([0, 1, 0, 2, 1])
    assert map_pad_id(table, 3) == 2
    assert map_pad_id(table, 2) == 0  # a fixture with identity at id 2 could not catch a missing lookup
    assert map_pad_id(table, -1) == -1  # negative ids pass through, as in the demo
    with pytest.raises(ValueError):
        map_pad_id(table, 5)
