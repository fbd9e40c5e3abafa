"""The reference demo's n-gram hashing path, re-implemented in NumPy as the benchmark baseline.

`engram_demo_v1.py` (deepseek-ai/Engram, commit fb7f84a) hashes on the CPU in NumPy: it maps raw ids through the
compression lookup table, builds the look-back shifts by padding with the compressed pad id, mixes
`XOR_k (x_{t-k} * m_k)` per order and takes the mix modulo each head's prime. Every Engram layer's forward calls
the hashing for *all* Engram layers and keeps its own (``hash(input_ids)[layer_id]``), so one model forward hashes
L times L layers. This file re-implements that flow in our own words (NumPy only, plus the config's primes, which
the core tests check against the demo's golden values); the multipliers are drawn here with NumPy's own PCG64, as
the demo does. `bench_engram.py` checks its output against our hash ids before timing it.
"""

from __future__ import annotations

import numpy as np

PRIME_1 = 10007


class NumpyNgramHasher:
    def __init__(
        self, lookup_table, compressed_vocab_size, raw_pad_id, layer_ids, primes, max_ngram_size, seed
    ):
        """`primes[engram_index][order][head]` as in `EngramMoEConfig.engram_primes`."""
        self.lookup_table = np.asarray(lookup_table, dtype=np.int64)
        self.pad_id = int(self.lookup_table[raw_pad_id])
        self.layer_ids = list(layer_ids)
        self.max_ngram_size = max_ngram_size
        self.primes = {layer_id: primes[index] for index, layer_id in enumerate(self.layer_ids)}
        half_bound = max(1, (np.iinfo(np.int64).max // compressed_vocab_size) // 2)
        self.multipliers = {}
        for layer_id in self.layer_ids:
            rng = np.random.default_rng(int(seed + PRIME_1 * layer_id))
            draws = rng.integers(low=0, high=half_bound, size=(max_ngram_size,), dtype=np.int64)
            self.multipliers[layer_id] = draws * 2 + 1

    def compress(self, raw_ids):
        ids = np.asarray(raw_ids, dtype=np.int64)
        out = ids.copy()
        valid = ids >= 0
        out[valid] = self.lookup_table[ids[valid]]
        return out

    def layer_hashes(self, compressed, layer_id):
        """`[B, T, (N-1)*K]` head indices of one layer (before the table offsets)."""
        batch, length = compressed.shape
        shifts = [compressed]
        for k in range(1, self.max_ngram_size):
            padded = np.pad(compressed, ((0, 0), (k, 0)), mode="constant", constant_values=self.pad_id)
            shifts.append(padded[:, :length])
        multipliers = self.multipliers[layer_id]
        heads = []
        for order in range(2, self.max_ngram_size + 1):
            mix = shifts[0] * multipliers[0]
            for k in range(1, order):
                mix = np.bitwise_xor(mix, shifts[k] * multipliers[k])
            for prime in self.primes[layer_id][order - 2]:
                heads.append((mix % int(prime)).astype(np.int64, copy=False))
        return np.stack(heads, axis=2)

    def hash(self, raw_ids):
        """What one call of the demo's `hash` returns: every Engram layer's head indices, from raw ids."""
        compressed = self.compress(raw_ids)
        return {layer_id: self.layer_hashes(compressed, layer_id) for layer_id in self.layer_ids}

    def forward_as_demo(self, raw_ids):
        """The hashing work of one demo model forward: each Engram layer hashes all layers, keeps its own."""
        return {layer_id: self.hash(raw_ids)[layer_id] for layer_id in self.layer_ids}
