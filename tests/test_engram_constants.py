"""engram_constants: NumPy PCG64 re-implementation, multipliers, primes and offsets against NumPy and the
golden fixtures (computed by running the reference demo)."""

from __future__ import annotations

import ast
import random
from pathlib import Path

import pytest
from helpers_fixtures import load_json

from engram_moe import engram_constants as ec
from engram_moe.engram_constants import (
    PCG64,
    SeedSequence,
    engram_layer_multipliers,
    engram_primes,
    engram_table_offsets,
    is_prime,
    next_prime,
    numpy_default_rng_integers,
)

np = pytest.importorskip("numpy")

HASHING = load_json("hashing")
CONFIG_NAMES = ("A", "B", "C", "A_dsv3")

# ---------------------------------------------------------------------------------------------- NumPy parity

SEEDS = [0, 1, 7, 10007, 150105, 2**32 - 1, 2**32, 2**64 + 5, 2**130 + 3]
HIGHS = [
    1,  # rng == 0: no draw at all
    2,
    3,
    100,
    2**31,
    2**31 + 1,  # 32-bit Lemire with ~50 % rejection
    3 * 2**30 + 7,
    2**32 - 1,  # largest bounded 32-bit range
    2**32,  # rng == 0xFFFFFFFF: raw buffered next_uint32
    2**32 + 1,  # smallest 64-bit range
    2**33,
    2**62 + 1,  # 64-bit Lemire with ~25 % rejection
    2**62 + 12345,
    140287957242338,  # half_bound of config A
    2**63 - 1,
    2**63,  # int64 maximum + 1
]


def _numpy_integers(seed, high, size):
    return np.random.default_rng(seed).integers(0, high, size=size, dtype=np.int64).tolist()


@pytest.mark.parametrize("seed", SEEDS)
def test_seed_sequence_matches_numpy(seed):
    ours, ref = SeedSequence(seed), np.random.SeedSequence(seed)
    assert ours.pool == ref.pool.tolist()
    assert ours.generate_state_uint32(7) == ref.generate_state(7, np.uint32).tolist()
    assert ours.generate_state_uint64(4) == ref.generate_state(4, np.uint64).tolist()


@pytest.mark.parametrize("seed", SEEDS)
def test_pcg64_state_and_raw_output_match_numpy(seed):
    ours, ref = PCG64(seed), np.random.PCG64(seed)
    state = ref.state["state"]
    assert (ours.state, ours.inc) == (state["state"], state["inc"])
    assert [ours.next_uint64() for _ in range(8)] == ref.random_raw(8).tolist()


@pytest.mark.parametrize("high", HIGHS)
@pytest.mark.parametrize("seed", SEEDS)
def test_integers_match_numpy(seed, high):
    for size in (0, 1, 5, 33):
        assert numpy_default_rng_integers(seed, high, size) == _numpy_integers(seed, high, size)


def test_integers_match_numpy_random_bounds():
    rnd = random.Random(20260114)
    for _ in range(200):
        seed = rnd.getrandbits(rnd.choice([8, 32, 64, 100]))
        high = rnd.randrange(1, 2 ** rnd.choice([8, 31, 32, 33, 50, 63]) + 1)
        size = rnd.randrange(0, 20)
        assert numpy_default_rng_integers(seed, high, size) == _numpy_integers(seed, high, size), (seed, high)


def test_small_ranges_use_buffered_32_bit_draws():
    # For ranges <= 0xFFFFFFFF NumPy draws 32-bit halves of one 64-bit output (low half first).
    raw = np.random.PCG64(5).random_raw(2).tolist()
    halves = [raw[0] & 0xFFFFFFFF, raw[0] >> 32, raw[1] & 0xFFFFFFFF, raw[1] >> 32]
    assert numpy_default_rng_integers(5, 2**32, 4) == halves


@pytest.mark.parametrize(
    ("seed", "high", "size", "error"),
    [(0, 0, 1, ValueError), (0, 2**63 + 1, 1, ValueError), (0, 5, -1, ValueError), (-1, 5, 1, ValueError)],
)
def test_integers_reject_invalid_arguments(seed, high, size, error):
    with pytest.raises(error):
        numpy_default_rng_integers(seed, high, size)


# ---------------------------------------------------------------------------------------------- multipliers


def _layers(name):
    entry = HASHING["configs"][name]
    cfg = entry["config"]
    for index, layer_id in enumerate(cfg["layer_ids"]):
        yield index, layer_id, entry["layers"][str(layer_id)]


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_multipliers_match_demo(name):
    entry = HASHING["configs"][name]
    cfg = entry["config"]
    assert entry["half_bound"] == max(1, ((2**63 - 1) // entry["compressed_vocab_size"]) // 2)
    for _, layer_id, layer in _layers(name):
        assert layer["rng_seed"] == cfg["seed"] + 10007 * layer_id
        got = engram_layer_multipliers(
            cfg["seed"], layer_id, cfg["max_ngram_size"], entry["compressed_vocab_size"]
        )
        assert got == layer["multipliers"]
        assert all(m % 2 == 1 for m in got)


def test_multipliers_v4_1_check():
    check = HASHING["v4_1_check"]
    cfg = check["config"]
    assert check["compressed_vocab_size_assumed"] == 99092
    for layer_id, layer in check["layers"].items():
        got = engram_layer_multipliers(cfg["seed"], int(layer_id), cfg["max_ngram_size"], 99092)
        assert got == layer["multipliers"]
    assert check["layers"]["1"]["multipliers"] == [
        76632096046245,
        4839876093313,
        35959672319349,
        73987337458391,
    ]


def test_multipliers_never_overflow_int64():
    for vocab in (1, 2, 3, 32873, 98627, 99092, 2**40):
        for m in engram_layer_multipliers(0, 1, 4, vocab):
            assert (vocab - 1) * m <= 2**63 - 1


def test_multipliers_with_half_bound_one_are_all_one():
    # |V'| so large that M_max // 2 == 0: half = max(1, 0) = 1, so r = 0 and every multiplier is 1.
    assert engram_layer_multipliers(0, 3, 3, 2**62 + 1) == [1, 1, 1]


# ---------------------------------------------------------------------------------------------- primes


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_primes_offsets_and_rows_match_demo(name):
    cfg = HASHING["configs"][name]["config"]
    primes = engram_primes(
        cfg["engram_vocab_size"], cfg["layer_ids"], cfg["max_ngram_size"], cfg["n_head_per_ngram"]
    )
    assert len(primes) == len(cfg["layer_ids"])
    for index, _, layer in _layers(name):
        assert primes[index] == layer["primes_per_order_per_head"]
        assert [p for order in primes[index] for p in order] == layer["list_of_N"]
        offsets, total = engram_table_offsets(primes[index])
        assert offsets == layer["offsets"]
        assert total == layer["total_rows"]


def test_demo_default_rows():
    cfg = HASHING["configs"]["A"]["config"]
    primes = engram_primes(cfg["engram_vocab_size"], cfg["layer_ids"], 3, 8)
    assert [engram_table_offsets(layer)[1] for layer in primes] == [10_344_164, 10_348_242]
    assert primes[0][0][0] == 646403 and primes[0][1][-1] == 646619


def test_v4_1_row_totals():
    check = HASHING["v4_1_check"]
    cfg = check["config"]
    primes = engram_primes(
        cfg["engram_vocab_size"], cfg["layer_ids"], cfg["max_ngram_size"], cfg["n_head_per_ngram"]
    )
    for index, layer_id in enumerate(cfg["layer_ids"]):
        assert primes[index] == check["layers"][str(layer_id)]["primes_per_order_per_head"]
    assert [engram_table_offsets(layer)[1] for layer in primes] == [384_006_168, 384_016_682]


@pytest.mark.parametrize(
    ("model", "target", "expected_params"),
    [("Engram-27B", 2_262_400, 5_792_338_560), ("Engram-40B", 7_239_680, 18_534_311_360)],
)
def test_paper_table_sizes(model, target, expected_params):
    check = HASHING["paper_table_size_check"][model]
    assert check["engram_vocab_size_per_head"] == target
    layer_ids = check["layer_ids"]
    assert layer_ids == [2, 15]
    # d_mem 1280 = 2 orders x n_embed_per_ngram 640; head dim = 640 / 8 heads = 80.
    primes = engram_primes([target, target], layer_ids, 3, check["n_head_per_ngram"])
    rows = [engram_table_offsets(layer)[1] for layer in primes]
    assert rows == [check["rows_per_layer"][str(layer_id)] for layer_id in layer_ids]
    assert sum(rows) * 80 == expected_params == check["params_at_head_dim_80"]


def test_prime_chain_depends_on_layer_order():
    forward = engram_primes([100, 100], [1, 2], 3, 2)
    backward = engram_primes([100, 100], [2, 1], 3, 2)
    # The first layer in the list gets the smallest primes whatever its id.
    assert forward[0] == backward[0] == [[101, 103], [107, 109]]
    assert forward[1] == [[113, 127], [131, 137]]


def test_primes_are_distinct_and_large_enough():
    sizes = [50, 40, 60]
    primes = engram_primes(sizes, [0, 3, 9], 4, 3)
    flat = [p for layer in primes for order in layer for p in order]
    assert len(set(flat)) == len(flat) == 3 * 3 * 3
    for layer in primes:
        for n, order in enumerate(layer, start=2):
            assert all(is_prime(p) and p >= sizes[n - 2] for p in order)


def test_engram_primes_rejects_bad_arguments():
    with pytest.raises(ValueError):
        engram_primes([100], [1], 3, 2)  # one size for two orders
    with pytest.raises(ValueError):
        engram_primes([100, 100], [1], 3, 0)
    with pytest.raises(ValueError):
        engram_primes([100, 100], [1], 1, 2)


def test_offsets_of_empty_and_small_layers():
    assert engram_table_offsets([]) == ([], 0)
    assert engram_table_offsets([[101, 103], [107, 109]]) == ([0, 101, 204, 311], 420)


# ---------------------------------------------------------------------------------------------- is_prime


def _sieve(limit):
    flags = bytearray([1]) * (limit + 1)
    flags[0:2] = b"\x00\x00"
    for i in range(2, int(limit**0.5) + 1):
        if flags[i]:
            flags[i * i :: i] = bytearray(len(flags[i * i :: i]))
    return flags


def test_is_prime_matches_sieve():
    limit = 200_000
    flags = _sieve(limit)
    assert [n for n in range(-5, limit + 1) if is_prime(n)] == [n for n in range(limit + 1) if flags[n]]


def test_is_prime_on_a_window_near_16_million():
    lo, width = 16_000_000, 2_000
    flags = bytearray([1]) * width
    for p in range(2, int((lo + width) ** 0.5) + 1):
        for multiple in range(max(p * p, (lo + p - 1) // p * p), lo + width, p):
            flags[multiple - lo] = 0
    assert [lo + i for i in range(width) if is_prime(lo + i)] == [lo + i for i in range(width) if flags[i]]


def test_is_prime_64_bit_cases():
    assert is_prime(2**61 - 1)  # Mersenne prime
    assert is_prime(2**64 - 59)  # largest 64-bit prime
    assert not is_prime(2**64 - 1)
    # Strong pseudoprimes to several small bases.
    for n in (2047, 3215031751, 3825123056546413051, 318665857834031151167461):
        assert not is_prime(n)
    # Beyond the range where the 13 witnesses are proven, it refuses rather than guess.
    with pytest.raises(ValueError):
        is_prime(3_317_044_064_679_887_385_961_981)


def test_next_prime():
    assert [next_prime(n) for n in (-3, 0, 1, 2, 3, 13, 14, 646399, 646400)] == [
        2,
        2,
        2,
        3,
        5,
        17,
        17,
        646403,
        646403,
    ]


# ---------------------------------------------------------------------------------------------- remote code


def test_module_uses_standard_library_only():
    """configuration_engram imports this module as remote code, where numpy/sympy may be missing."""
    tree = ast.parse(Path(ec.__file__).read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0
            imported.add(node.module.split(".")[0])
    assert imported <= {"__future__"}, imported
