"""Named configurations: tiny ones for tests, small ones for the CPU demo and benchmarks, and the paper's shapes.

`get_preset(name, **overrides)` returns an `EngramMoEConfig`. Each Engram preset has a twin without Engram
(`*-moe`) with the same backbone, so comparisons change one thing only.
"""

from __future__ import annotations

import copy

from .configuration_engram import EngramMoEConfig

_TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    n_routed_experts=4,
    n_shared_experts=1,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    eos_token_id=0,
)
_TINY_ENGRAM = dict(
    engram_layer_ids=[1, 2],
    engram_max_ngram_size=3,
    engram_num_heads=2,
    engram_embed_dim_per_ngram=16,
    engram_vocab_size=[211, 223],
)

# Sized for the SmolLM2 tokenizer (49,152 ids, 32,873 after compression) and a few CPU minutes of training.
_SMALL = dict(
    vocab_size=49152,
    hidden_size=256,
    intermediate_size=768,
    moe_intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    tie_word_embeddings=True,
    eos_token_id=0,
    engram_compressed_vocab_size=32873,
    engram_pad_id=2,
    engram_compressed_pad_id=2,
)
_SMALL_ENGRAM = dict(
    engram_layer_ids=[1, 2],
    engram_max_ngram_size=3,
    engram_num_heads=4,
    engram_embed_dim_per_ngram=128,
    engram_vocab_size=[20011, 20011],
)

# The paper's Engram-27B / Engram-40B (Table 5): 30 layers, d = 2560, mHC x4, 2 shared + 55 routed experts
# (top-6), Engram at layers 2 and 15 (1-based), d_mem 1280, 8 heads per order, orders 2-3, DeepSeek-V3
# tokenizer (|V'| = 98,627). The paper uses MLA; we use GQA with the same head count. MoE-27B has 72 routed
# experts and no Engram.
_PAPER = dict(
    vocab_size=129280,
    hidden_size=2560,
    intermediate_size=12288,
    moe_intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
    n_routed_experts=55,
    n_shared_experts=2,
    num_experts_per_tok=6,
    first_k_dense_replace=1,
    scoring_func="sigmoid",
    router_bias_update_speed=0.001,
    hc_mult=4,
    eos_token_id=1,
    engram_compressed_vocab_size=98627,
    engram_pad_id=2,
    engram_compressed_pad_id=2,
    engram_layer_ids=[1, 14],
    engram_max_ngram_size=3,
    engram_num_heads=8,
    engram_embed_dim_per_ngram=640,
    engram_vocab_size=[2262400, 2262400],
)

_NO_ENGRAM = dict(engram_layer_ids=[])

PRESETS: dict[str, dict] = {
    "tiny-dense": {**_TINY, "n_routed_experts": 0, "n_shared_experts": 0},
    "tiny-moe": dict(_TINY),
    "tiny-engram-moe": {**_TINY, **_TINY_ENGRAM},
    "tiny-engram-moe-hc4": {**_TINY, **_TINY_ENGRAM, "hc_mult": 4},
    "small-moe": dict(_SMALL),
    "small-engram-moe": {**_SMALL, **_SMALL_ENGRAM},
    "engram-27b": dict(_PAPER),
    "engram-40b": {**_PAPER, "engram_vocab_size": [7239680, 7239680]},
    "moe-27b": {**_PAPER, **_NO_ENGRAM, "n_routed_experts": 72},
}


def get_preset(name: str, **overrides) -> EngramMoEConfig:
    """The named preset as a config; keyword arguments override its fields."""
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
    kwargs = copy.deepcopy(PRESETS[name])
    kwargs.update(overrides)
    return EngramMoEConfig(**kwargs)
