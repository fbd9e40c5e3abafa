"""Configuration of Engram-MoE: a Mixture-of-Experts causal LM with Engram conditional memory.

The config is the single source of truth. Everything the Engram hash needs (the compressed vocabulary size,
the compressed pad id, the per-layer multipliers and the per-(layer, order, head) primes) is either a field or
derived here, once, and written into ``config.json``. A saved config that carries derived values which do not
match what its fields give is refused, so a checkpoint can never be hashed with different constants than the
ones it was trained with.

This file imports only the standard library, transformers and its sibling ``engram_constants`` (relative
import), so that it can be exported as remote code.
"""

from __future__ import annotations

from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

from .engram_constants import engram_layer_multipliers, engram_primes, engram_table_offsets

_DERIVED_KEYS = ("engram_primes", "engram_multipliers")
_SCORING_FUNCS = ("softmax", "sigmoid")
_TABLE_PLACEMENTS = ("device", "host")
_ENGRAM_KERNELS = ("auto", "triton", "torch", "reference")
_ENGRAM_PREFETCH = ("host", "all", "off")


class EngramMoEConfig(PreTrainedConfig):
    r"""
    Configuration for [`EngramMoEForCausalLM`].

    Backbone fields use the usual Hugging Face names (DeepSeek-V3 names for the MoE parts). Engram fields are
    prefixed with ``engram_``:

    - ``engram_layer_ids``: 0-based decoder layers that get an Engram module (the paper's layers 2 and 15 of 30
      are ``[1, 14]``). Their order matters: the prime chain walks the list in this order.
    - ``engram_max_ngram_size`` (N): suffix n-grams of orders 2..N are hashed.
    - ``engram_num_heads`` (K): hash heads per order.
    - ``engram_embed_dim_per_ngram``: width of one order's memory; each head row has
      ``engram_embed_dim_per_ngram // engram_num_heads`` columns and ``d_mem = (N-1) * engram_embed_dim_per_ngram``.
    - ``engram_vocab_size``: per-order target table size per head (one int per order 2..N); every head gets its
      own prime at or above the target.
    - ``engram_pad_id``: the *raw* pad id used before the sequence start; ``engram_compressed_pad_id`` is that id
      mapped through the tokenizer compression (derived from the token map, see ``build_token_map``).
    - ``engram_compressed_vocab_size``: |V'|, the size of the compressed vocabulary. It drives the hash
      multipliers. ``None`` means no compression (identity map, |V'| = ``vocab_size``).
    - ``engram_seed``: seed of the multiplier generator (NumPy PCG64, reproduced bit-exactly in pure Python).
    - ``engram_kernel_size``: taps of the dilated causal depthwise convolution (dilation = N).
    - ``engram_use_bias``, ``engram_gate_norm_eps`` (``None`` = ``torch.finfo(dtype).eps``, the reference's
      choice), ``engram_conv_norm_eps``, ``engram_use_conv``, ``engram_conv_zero_init``: switches that let the
      layer reproduce the reference demo exactly or follow the paper.
    - ``engram_init_std``: std of the table init (``None`` = ``initializer_range``; the demo uses 1.0).
    - ``engram_reset_on_padding``: treat positions with ``attention_mask == 0`` as a sequence start (production
      behaviour); ``False`` hashes them like the demo does.
    - ``engram_table_placement``: where each Engram table lives: ``"device"`` (with the model, HBM on a GPU) or
      ``"host"`` (pinned host memory, rows read over PCIe); one value or one per Engram layer. Can be set at load
      time (``from_pretrained(..., engram_table_placement="host")``).
    - ``engram_kernels``: ``"auto"`` (Triton kernels on CUDA, the reference on CPU), ``"triton"``, ``"torch"``
      (fused PyTorch path) or ``"reference"`` (the plain PyTorch code). ``engram_prefetch``: which tables' rows
      are gathered on a side CUDA stream as soon as the ids are known: ``"host"``, ``"all"`` or ``"off"``.

    Derived, read-only: ``engram_primes[layer][order][head]`` and ``engram_multipliers[layer]`` (one per look-back
    0..N-1), in the order of ``engram_layer_ids``.
    """

    model_type = "engram_moe"
    keys_to_ignore_at_inference = ["cache"]
    attribute_map = {"num_experts": "n_routed_experts", "num_local_experts": "n_routed_experts"}
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
    }
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    # Backbone.
    vocab_size: int = 49152
    hidden_size: int = 256
    intermediate_size: int = 768
    moe_intermediate_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = 2
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = 0
    tie_word_embeddings: bool = False
    rope_parameters: RopeParameters | dict | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0

    # MoE (DeepSeek-V3 names).
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    first_k_dense_replace: int = 1
    scoring_func: str = "softmax"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    router_bias_update_speed: float = 0.0
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001

    # Multi-branch residual stream (mHC, as transformers' deepseek_v4 has it). 1 = plain residual.
    hc_mult: int = 1
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6

    # Engram.
    engram_layer_ids: list[int] | None = None
    engram_max_ngram_size: int = 3
    engram_num_heads: int = 8
    engram_embed_dim_per_ngram: int = 512
    engram_vocab_size: list[int] | None = None
    engram_pad_id: int = 2
    engram_compressed_pad_id: int | None = None
    engram_compressed_vocab_size: int | None = None
    engram_seed: int = 0
    engram_kernel_size: int = 4
    engram_use_bias: bool = False
    engram_gate_norm_eps: float | None = 1e-6
    engram_conv_norm_eps: float = 1e-5
    engram_use_conv: bool = True
    engram_conv_zero_init: bool = True
    engram_init_std: float | None = None
    engram_reset_on_padding: bool = True
    # Engram serving (placement and kernels; they do not change the model's function).
    engram_table_placement: str | list[str] = "device"
    engram_kernels: str = "auto"
    engram_prefetch: str = "host"

    layer_types: list[str] | None = None

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.engram_layer_ids is None:
            self.engram_layer_ids = []
        self.engram_layer_ids = [int(i) for i in self.engram_layer_ids]
        if self.engram_vocab_size is None:
            self.engram_vocab_size = [646400] * (self.engram_max_ngram_size - 1)
        elif isinstance(self.engram_vocab_size, int):
            self.engram_vocab_size = [self.engram_vocab_size] * (self.engram_max_ngram_size - 1)
        self.engram_vocab_size = [int(v) for v in self.engram_vocab_size]
        if self.engram_compressed_vocab_size is None:
            self.engram_compressed_vocab_size = self.vocab_size
        if self.engram_compressed_pad_id is None:
            # Without a token map the compression is the identity, so the pad id maps to itself.
            self.engram_compressed_pad_id = self.engram_pad_id

        saved_derived = {key: kwargs.pop(key, None) for key in _DERIVED_KEYS}
        kwargs.pop("number_of_conv_states", None)
        self._validate()

        # Engram layers keep KV *and* two conv-state slots in the generation cache: slot 0 holds the short
        # convolution's input frames, slot 1 the last N-1 compressed ids.
        expected_types = [
            "hybrid" if i in self.engram_layer_ids else "full_attention"
            for i in range(self.num_hidden_layers)
        ]
        if self.layer_types is not None and list(self.layer_types) != expected_types:
            raise ValueError(
                f"layer_types={self.layer_types} is derived from engram_layer_ids={self.engram_layer_ids}; "
                f"expected {expected_types}. Leave layer_types unset."
            )
        self.layer_types = expected_types
        self.number_of_conv_states = 2

        self._derive_engram_constants()
        for key, saved in saved_derived.items():
            if saved is not None and _as_nested_lists(saved) != _as_nested_lists(getattr(self, key)):
                raise ValueError(
                    f"The saved {key}={saved} does not match the value derived from this config "
                    f"({getattr(self, key)}): the checkpoint was hashed with other constants."
                )
        super().__post_init__(**kwargs)

    # ------------------------------------------------------------------ validation

    def _validate(self):
        def positive(name):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")

        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "moe_intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "hc_mult",
            "hc_sinkhorn_iters",
            "engram_max_ngram_size",
            "engram_num_heads",
            "engram_embed_dim_per_ngram",
            "engram_kernel_size",
            "engram_compressed_vocab_size",
            "max_position_embeddings",
        ):
            positive(name)
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                f"{self.num_attention_heads}; set head_dim explicitly."
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}."
            )
        if self.n_routed_experts < 0 or self.n_shared_experts < 0:
            raise ValueError(
                f"n_routed_experts={self.n_routed_experts} and n_shared_experts={self.n_shared_experts} "
                "must be >= 0."
            )
        if self.n_routed_experts > 0 and not 0 < self.num_experts_per_tok <= self.n_routed_experts:
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, n_routed_experts="
                f"{self.n_routed_experts}]."
            )
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise ValueError(
                f"first_k_dense_replace={self.first_k_dense_replace} must be in [0, num_hidden_layers="
                f"{self.num_hidden_layers}]."
            )
        if self.scoring_func not in _SCORING_FUNCS:
            raise ValueError(f"scoring_func={self.scoring_func!r} must be one of {_SCORING_FUNCS}.")
        if self.router_bias_update_speed < 0:
            raise ValueError(f"router_bias_update_speed={self.router_bias_update_speed} must be >= 0.")
        if self.engram_max_ngram_size < 2:
            raise ValueError(f"engram_max_ngram_size={self.engram_max_ngram_size} must be >= 2.")
        if len(self.engram_vocab_size) != self.engram_max_ngram_size - 1:
            raise ValueError(
                f"engram_vocab_size={self.engram_vocab_size} needs one entry per n-gram order 2.."
                f"{self.engram_max_ngram_size} ({self.engram_max_ngram_size - 1} entries)."
            )
        if any(v < 2 for v in self.engram_vocab_size):
            raise ValueError(f"engram_vocab_size={self.engram_vocab_size} entries must be >= 2.")
        if self.engram_embed_dim_per_ngram % self.engram_num_heads:
            raise ValueError(
                f"engram_embed_dim_per_ngram={self.engram_embed_dim_per_ngram} is not divisible by "
                f"engram_num_heads={self.engram_num_heads}."
            )
        bad = [i for i in self.engram_layer_ids if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(
                f"engram_layer_ids={self.engram_layer_ids} has layers outside [0, num_hidden_layers="
                f"{self.num_hidden_layers}): {bad}."
            )
        if len(set(self.engram_layer_ids)) != len(self.engram_layer_ids):
            raise ValueError(f"engram_layer_ids={self.engram_layer_ids} has duplicates.")
        if not 0 <= self.engram_pad_id < self.vocab_size:
            raise ValueError(
                f"engram_pad_id={self.engram_pad_id} must be a token id in [0, {self.vocab_size})."
            )
        if not 0 <= self.engram_compressed_pad_id < self.engram_compressed_vocab_size:
            raise ValueError(
                f"engram_compressed_pad_id={self.engram_compressed_pad_id} must be in [0, "
                f"engram_compressed_vocab_size={self.engram_compressed_vocab_size})."
            )
        if self.engram_compressed_vocab_size > self.vocab_size:
            raise ValueError(
                f"engram_compressed_vocab_size={self.engram_compressed_vocab_size} cannot exceed "
                f"vocab_size={self.vocab_size}."
            )
        for name in ("engram_conv_norm_eps", "rms_norm_eps", "hc_eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0.")
        if self.engram_gate_norm_eps is not None and not self.engram_gate_norm_eps > 0:
            raise ValueError(f"engram_gate_norm_eps={self.engram_gate_norm_eps} must be > 0 or None.")
        if self.engram_init_std is not None and not self.engram_init_std > 0:
            raise ValueError(f"engram_init_std={self.engram_init_std} must be > 0 or None.")
        placements = (
            [self.engram_table_placement]
            if isinstance(self.engram_table_placement, str)
            else list(self.engram_table_placement)
        )
        bad = [p for p in placements if p not in _TABLE_PLACEMENTS]
        if bad or (
            not isinstance(self.engram_table_placement, str) and len(placements) != len(self.engram_layer_ids)
        ):
            raise ValueError(
                f"engram_table_placement={self.engram_table_placement!r} must be one of {_TABLE_PLACEMENTS} or a list "
                f"of them, one per Engram layer ({len(self.engram_layer_ids)})."
            )
        if self.engram_prefetch not in _ENGRAM_PREFETCH:
            raise ValueError(f"engram_prefetch={self.engram_prefetch!r} must be one of {_ENGRAM_PREFETCH}.")
        if self.engram_kernels not in _ENGRAM_KERNELS:
            raise ValueError(f"engram_kernels={self.engram_kernels!r} must be one of {_ENGRAM_KERNELS}.")

    # ------------------------------------------------------------------ derived constants

    def _derive_engram_constants(self):
        n = self.engram_max_ngram_size
        self.__dict__["_engram_primes"] = engram_primes(
            self.engram_vocab_size, self.engram_layer_ids, n, self.engram_num_heads
        )
        self.__dict__["_engram_multipliers"] = [
            engram_layer_multipliers(self.engram_seed, layer_id, n, self.engram_compressed_vocab_size)
            for layer_id in self.engram_layer_ids
        ]

    @property
    def engram_primes(self) -> list[list[list[int]]]:
        """Table size of every hash head: ``[engram layer][order 2..N][head]`` (read-only, derived)."""
        return [[list(order) for order in layer] for layer in self.__dict__["_engram_primes"]]

    @property
    def engram_multipliers(self) -> list[list[int]]:
        """Odd hash multipliers of every Engram layer, one per look-back 0..N-1 (read-only, derived)."""
        return [list(m) for m in self.__dict__["_engram_multipliers"]]

    @property
    def engram_head_dim(self) -> int:
        return self.engram_embed_dim_per_ngram // self.engram_num_heads

    @property
    def engram_memory_dim(self) -> int:
        """d_mem: width of the concatenated memory vector e_t."""
        return (self.engram_max_ngram_size - 1) * self.engram_embed_dim_per_ngram

    @property
    def engram_table_rows(self) -> list[int]:
        """Rows of each Engram layer's table (sum of its primes)."""
        return [engram_table_offsets(layer)[1] for layer in self.__dict__["_engram_primes"]]

    @property
    def engram_head_offsets(self) -> list[list[int]]:
        """Start row of every (order, head) block in each Engram layer's table (exclusive prefix sums)."""
        return [engram_table_offsets(layer)[0] for layer in self.__dict__["_engram_primes"]]

    @property
    def engram_table_parameters(self) -> int:
        """Parameters in all Engram tables (the paper's "Engram parameters")."""
        return sum(self.engram_table_rows) * self.engram_head_dim

    @property
    def engram_conv_dilation(self) -> int:
        return self.engram_max_ngram_size

    def to_dict(self):
        output = super().to_dict()
        output.pop("_engram_primes", None)
        output.pop("_engram_multipliers", None)
        output["engram_primes"] = self.engram_primes
        output["engram_multipliers"] = self.engram_multipliers
        return output

    def __setattr__(self, key, value):
        if key in _DERIVED_KEYS:
            raise AttributeError(f"{key} is derived from the Engram fields and read-only.")
        super().__setattr__(key, value)
        # Derived constants follow their inputs when a field changes after construction.
        if key.startswith("engram_") and getattr(self, "_post_init_done", False):
            self._validate()
            self._derive_engram_constants()


def _as_nested_lists(value):
    if isinstance(value, (list, tuple)):
        return [_as_nested_lists(v) for v in value]
    return int(value)


__all__ = ["EngramMoEConfig"]
