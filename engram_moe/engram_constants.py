"""Integer constants of the Engram hashing: multipliers, prime table sizes and table offsets.

Everything here is bit-exact with the reference demo (``engram_demo_v1.py``, deepseek-ai/Engram @ fb7f84a),
which derives its hash multipliers from ``numpy.random.default_rng(seed + 10007 * layer_id).integers(...)``
and its table sizes from ``sympy.nextprime``. A change of a single multiplier or prime changes every hash id,
so a checkpoint trained with the reference constants would silently read the wrong rows.

This module uses the Python standard library only (no numpy, no sympy, no torch). It is imported by
``configuration_engram.py``, which is exported as Hugging Face remote code and must load on machines that
have only ``torch`` and ``transformers``. To get there without NumPy, it re-implements the few pieces of
NumPy's random stack the reference touches:

* ``SeedSequence`` entropy mixing (pool of 4 uint32 words) and ``generate_state(4, uint64)``,
* the ``PCG64`` bit generator (128-bit LCG, XSL-RR output, the 32-bit half-word buffer of ``next_uint32``),
* ``Generator.integers(0, high, size, dtype=int64)``: Lemire's bounded method with rejection, on 64 bits for
  ranges above ``0xFFFFFFFF`` and on buffered 32-bit draws for smaller ranges, exactly as NumPy does.

The tests compare all of it against NumPy itself and against the golden fixtures computed with the demo.
"""

from __future__ import annotations

__all__ = [
    "PCG64",
    "SeedSequence",
    "engram_layer_multipliers",
    "engram_primes",
    "engram_table_offsets",
    "is_prime",
    "next_prime",
    "numpy_default_rng_integers",
]

_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF
_MASK128 = (1 << 128) - 1

# numpy/random/bit_generator.pyx: SeedSequence hashing constants.
_INIT_A = 0x43B0D7E5
_MULT_A = 0x931E8875
_INIT_B = 0x8B51F9DD
_MULT_B = 0x58F38DED
_MIX_MULT_L = 0xCA01F9DD
_MIX_MULT_R = 0x4973F715
_XSHIFT = 16  # 4 * 8 // 2
_DEFAULT_POOL_SIZE = 4

# numpy/random/src/pcg64/pcg64.h: PCG_DEFAULT_MULTIPLIER_128.
_PCG_MULT = 0x2360ED051FC65DA44385DF649FCCF645

# The demo's layer-seed stride: default_rng(seed + 10007 * layer_id).
_LAYER_SEED_STRIDE = 10007
_INT64_MAX = (1 << 63) - 1


# ---------------------------------------------------------------------------------------------- SeedSequence


def _int_to_uint32_words(value: int) -> list[int]:
    """NumPy's ``_coerce_to_uint32_array`` for a Python int: little-endian 32-bit words, ``0 -> [0]``."""
    if value < 0:
        raise ValueError(f"expected non-negative integer entropy, got {value}")
    if value == 0:
        return [0]
    words = []
    while value > 0:
        words.append(value & _MASK32)
        value >>= 32
    return words


class SeedSequence:
    """Minimal ``numpy.random.SeedSequence`` for a non-negative int entropy and no spawn key.

    Reproduces the entropy pool (``pool_size=4``) and ``generate_state`` bit for bit.
    """

    pool_size = _DEFAULT_POOL_SIZE

    def __init__(self, entropy: int):
        if isinstance(entropy, bool) or not isinstance(entropy, int):
            raise TypeError(f"entropy must be a non-negative int, got {type(entropy).__name__}")
        self.entropy = entropy
        self.pool = self._mix_entropy(_int_to_uint32_words(entropy))

    @staticmethod
    def _mix_entropy(entropy_words: list[int]) -> list[int]:
        hash_const = _INIT_A

        def hashmix(value: int) -> int:
            nonlocal hash_const
            value = (value ^ hash_const) & _MASK32
            hash_const = (hash_const * _MULT_A) & _MASK32
            value = (value * hash_const) & _MASK32
            value ^= value >> _XSHIFT
            return value

        def mix(x: int, y: int) -> int:
            result = (_MIX_MULT_L * x - _MIX_MULT_R * y) & _MASK32
            result ^= result >> _XSHIFT
            return result

        n = _DEFAULT_POOL_SIZE
        pool = [hashmix(entropy_words[i]) if i < len(entropy_words) else hashmix(0) for i in range(n)]
        # Mix all bits together so that late bits can affect earlier ones.
        for i_src in range(n):
            for i_dst in range(n):
                if i_src != i_dst:
                    pool[i_dst] = mix(pool[i_dst], hashmix(pool[i_src]))
        # Entropy beyond the pool size is folded into every pool word.
        for i_src in range(n, len(entropy_words)):
            for i_dst in range(n):
                pool[i_dst] = mix(pool[i_dst], hashmix(entropy_words[i_src]))
        return pool

    def generate_state_uint32(self, n_words: int) -> list[int]:
        """``generate_state(n_words, numpy.uint32)``."""
        hash_const = _INIT_B
        out = []
        for i in range(n_words):
            value = self.pool[i % len(self.pool)]
            value ^= hash_const
            hash_const = (hash_const * _MULT_B) & _MASK32
            value = (value * hash_const) & _MASK32
            value ^= value >> _XSHIFT
            out.append(value)
        return out

    def generate_state_uint64(self, n_words: int) -> list[int]:
        """``generate_state(n_words, numpy.uint64)``: pairs of uint32 words read as little-endian uint64."""
        words = self.generate_state_uint32(2 * n_words)
        return [words[2 * i] | (words[2 * i + 1] << 32) for i in range(n_words)]


# ---------------------------------------------------------------------------------------------- PCG64


class PCG64:
    """``numpy.random.PCG64`` seeded from a :class:`SeedSequence`, with ``next_uint64``/``next_uint32``.

    ``next_uint32`` keeps NumPy's half-word buffer: one 64-bit draw serves two 32-bit draws, low half first.
    """

    def __init__(self, seed: int | SeedSequence):
        seed_seq = seed if isinstance(seed, SeedSequence) else SeedSequence(seed)
        s0, s1, i0, i1 = seed_seq.generate_state_uint64(4)
        # pcg64_set_seed: PCG_128BIT_CONSTANT(high, low) with seed[0] as the high word.
        initstate = (s0 << 64) | s1
        initseq = (i0 << 64) | i1
        # pcg_setseq_128_srandom_r
        self.state = 0
        self.inc = ((initseq << 1) | 1) & _MASK128
        self._step()
        self.state = (self.state + initstate) & _MASK128
        self._step()
        self._has_uint32 = False
        self._uinteger = 0

    def _step(self) -> None:
        self.state = (self.state * _PCG_MULT + self.inc) & _MASK128

    def next_uint64(self) -> int:
        # pcg_setseq_128_xsl_rr_64_random_r: step first, then output from the new state.
        self._step()
        state = self.state
        value = ((state >> 64) ^ state) & _MASK64
        rot = state >> 122
        return ((value >> rot) | (value << ((-rot) & 63))) & _MASK64

    def next_uint32(self) -> int:
        if self._has_uint32:
            self._has_uint32 = False
            return self._uinteger
        value = self.next_uint64()
        self._has_uint32 = True
        self._uinteger = value >> 32
        return value & _MASK32

    # -------------------------------------------------------------- bounded draws (numpy distributions.c)

    def _bounded_lemire_uint64(self, rng: int) -> int:
        """Uniform in ``[0, rng]`` for ``0xFFFFFFFF < rng < 2**64 - 1``."""
        rng_excl = rng + 1
        m = self.next_uint64() * rng_excl
        leftover = m & _MASK64
        if leftover < rng_excl:
            threshold = (_MASK64 - rng) % rng_excl
            while leftover < threshold:
                m = self.next_uint64() * rng_excl
                leftover = m & _MASK64
        return m >> 64

    def _bounded_lemire_uint32(self, rng: int) -> int:
        """Uniform in ``[0, rng]`` for ``0 < rng < 0xFFFFFFFF``, from buffered 32-bit draws."""
        rng_excl = rng + 1
        m = self.next_uint32() * rng_excl
        leftover = m & _MASK32
        if leftover < rng_excl:
            threshold = (_MASK32 - rng) % rng_excl
            while leftover < threshold:
                m = self.next_uint32() * rng_excl
                leftover = m & _MASK32
        return m >> 32

    def integers_int64(self, high: int, size: int) -> list[int]:
        """``Generator.integers(0, high, size=size, dtype=numpy.int64)`` (``use_masked=False``, ``endpoint=False``).

        Mirrors ``random_bounded_uint64_fill``: the inclusive range ``rng = high - 1`` selects the path.
        """
        if isinstance(high, bool) or not isinstance(high, int):
            raise TypeError(f"high must be an int, got {type(high).__name__}")
        if isinstance(size, bool) or not isinstance(size, int):
            raise TypeError(f"size must be an int, got {type(size).__name__}")
        if high <= 0:
            raise ValueError(f"high={high} must be > 0 (low is 0 and the interval is half-open).")
        if high > _INT64_MAX + 1:
            raise ValueError(f"high={high} is out of bounds for int64 (at most 2**63).")
        if size < 0:
            raise ValueError(f"size={size} must be >= 0.")
        rng = high - 1
        if rng == 0:
            return [0] * size
        if rng <= _MASK32:
            if rng == _MASK32:
                return [self.next_uint32() for _ in range(size)]
            return [self._bounded_lemire_uint32(rng) for _ in range(size)]
        # rng < 2**63 here, so the full-range 64-bit shortcut (rng == 2**64 - 1) cannot occur for int64.
        return [self._bounded_lemire_uint64(rng) for _ in range(size)]


def numpy_default_rng_integers(seed: int, high: int, size: int) -> list[int]:
    """Equal to ``numpy.random.default_rng(seed).integers(0, high, size=size, dtype=numpy.int64).tolist()``.

    ``seed`` must be a non-negative int, ``1 <= high <= 2**63`` and ``size >= 0``.
    """
    return PCG64(seed).integers_int64(high, size)


# ---------------------------------------------------------------------------------------------- multipliers


def engram_layer_multipliers(
    seed: int, layer_id: int, max_ngram_size: int, compressed_vocab_size: int
) -> list[int]:
    """Odd hash multipliers of one Engram layer, one per look-back ``k = 0 .. max_ngram_size - 1``.

    As in the demo: ``M_max = (2**63 - 1) // |V'|``, ``half = max(1, M_max // 2)``,
    ``r = default_rng(seed + 10007 * layer_id).integers(0, half, size=max_ngram_size, dtype=int64)`` and
    ``m_k = 2 * r_k + 1``. The bound keeps ``compressed_id * m_k`` inside int64 for every compressed id.
    """
    if compressed_vocab_size < 1:
        raise ValueError(f"compressed_vocab_size={compressed_vocab_size} must be >= 1.")
    if max_ngram_size < 1:
        raise ValueError(f"max_ngram_size={max_ngram_size} must be >= 1.")
    rng_seed = seed + _LAYER_SEED_STRIDE * layer_id
    if rng_seed < 0:
        raise ValueError(f"seed + 10007 * layer_id = {rng_seed} must be >= 0 (NumPy rejects negative seeds).")
    m_max = _INT64_MAX // compressed_vocab_size
    half = max(1, m_max // 2)
    return [2 * r + 1 for r in numpy_default_rng_integers(rng_seed, half, max_ngram_size)]


# ---------------------------------------------------------------------------------------------- primes

# Deterministic Miller-Rabin witnesses: the first 13 primes are exact for every n below
# 3,317,044,064,679,887,385,961,981 (the smallest strong pseudoprime to all of them), far above 2**64.
_MR_BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
_MR_LIMIT = 3_317_044_064_679_887_385_961_981


def is_prime(n: int) -> bool:
    """Deterministic primality test, exact for every ``n < 3.3e24`` (all 64-bit integers).

    Larger ``n`` raise ``ValueError`` rather than risk a probabilistic answer.
    """
    if n < 2:
        return False
    for p in _MR_BASES:
        if n % p == 0:
            return n == p
    if n >= _MR_LIMIT:
        raise ValueError(f"is_prime is only deterministic below 3.3e24, got {n}.")
    d = n - 1
    s = 0
    while d % 2 == 0:
        d //= 2
        s += 1
    for a in _MR_BASES:
        x = pow(a, d, n)
        if x == 1 or x == n - 1:
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def next_prime(n: int) -> int:
    """Smallest prime strictly greater than ``n`` (like ``sympy.nextprime``)."""
    if n < 2:
        return 2
    candidate = n + 1 if n % 2 == 0 else n + 2
    while not is_prime(candidate):
        candidate += 2
    return candidate


def engram_primes(
    engram_vocab_size: list[int], layer_ids: list[int], max_ngram_size: int, num_heads: int
) -> list[list[list[int]]]:
    """Prime table size of every hash head, ``[layer (list order)][order n = 2..N][head]``.

    The demo walks one chain of used primes shared by all layers and orders: for each layer in the order of
    ``layer_ids``, for each order ``n``, ``start = engram_vocab_size[n - 2] - 1``, then for each head the
    smallest prime ``> start`` not used yet is taken, marked used, and becomes the new ``start``. So a
    layer's sizes depend on the whole ordered layer list, and all primes are distinct.
    """
    if max_ngram_size < 2:
        raise ValueError(f"max_ngram_size={max_ngram_size} must be >= 2.")
    if num_heads < 1:
        raise ValueError(f"num_heads={num_heads} must be >= 1.")
    if len(engram_vocab_size) < max_ngram_size - 1:
        raise ValueError(
            f"engram_vocab_size has {len(engram_vocab_size)} entries; max_ngram_size={max_ngram_size} "
            f"needs one per order 2..{max_ngram_size} ({max_ngram_size - 1})."
        )
    for size in engram_vocab_size[: max_ngram_size - 1]:
        if size < 1:
            raise ValueError(f"engram_vocab_size entries must be >= 1, got {size}.")
    used: set[int] = set()
    result = []
    for _layer_id in layer_ids:
        layer = []
        for n in range(2, max_ngram_size + 1):
            start = engram_vocab_size[n - 2] - 1
            heads = []
            for _ in range(num_heads):
                p = next_prime(start)
                while p in used:
                    p = next_prime(p)
                used.add(p)
                heads.append(p)
                start = p
            layer.append(heads)
        result.append(layer)
    return result


def engram_table_offsets(primes_of_layer: list[list[int]]) -> tuple[list[int], int]:
    """Row offsets of the head blocks of one layer's table, and its total number of rows.

    ``primes_of_layer`` is ``[order][head]`` (one entry of :func:`engram_primes`). The offsets are exclusive
    prefix sums in (order, head) order (the demo's ``multi_head_embedding.offsets`` buffer); the total is
    ``sum(primes)``.
    """
    offsets = []
    total = 0
    for order in primes_of_layer:
        for p in order:
            offsets.append(total)
            total += p
    return offsets, total
