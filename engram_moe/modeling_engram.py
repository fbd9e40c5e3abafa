"""Engram-MoE: a Mixture-of-Experts causal LM with Engram conditional memory (arXiv 2601.07372).

At the decoder layers named by ``config.engram_layer_ids`` an Engram module hashes the suffix n-grams (orders
2..N) of the compressed token ids into per-layer embedding tables, gates the looked-up memory with the
current hidden state and adds it, through a short dilated causal convolution, to the residual stream before
attention. The backbone is a DeepSeek-style MoE (shared + routed experts) with an optional multi-branch
residual stream (mHC, ``hc_mult > 1``) in the form transformers' ``deepseek_v4`` uses.

How this file differs from the paper and from the reference demo (``engram_demo_v1.py``, commit fb7f84a):

- Hashing runs in torch int64 on the ids' device, once per forward for all Engram layers (the demo hashes in
  NumPy on the CPU in every layer). Results are bit-identical to the demo's.
- The multipliers and primes are derived once, in the config, with a pure-Python re-implementation of NumPy's
  PCG64 (bit-exact), and saved with it; the model needs neither NumPy nor a tokenizer at run time. The token
  compression map is a persistent buffer saved with the checkpoint.
- Positions with ``attention_mask == 0`` (left padding) are treated as sequence start: their ids become the
  compressed pad id and their conv inputs are zeroed, so a padded batch equals each sequence alone
  (``engram_reset_on_padding=False`` hashes them like the demo). Document boundaries inside a packed
  sequence are not reset (the demo does not either).
- Generation: the last N-1 compressed ids and the conv's last ``(kernel-1) * N`` input frames live in the
  ``DynamicCache`` conv-state slots of the Engram layers ("hybrid" layer type), so beam search, cropping and
  left padding stay correct. The demo has no cache.
- The per-branch key projections are fused into one ``key_proj`` (as in DeepSeek-V4.1); the per-branch norms
  are stored as ``[hc, hidden]`` weights. ``engram_moe.convert_reference_state_dict`` maps the demo's names.
- Defaults follow the paper (no linear biases, zero-initialised conv, table init ``N(0, initializer_range)``);
  ``engram_use_bias=True``, ``engram_gate_norm_eps=None`` (``finfo(dtype).eps``) and
  ``engram_conv_zero_init=False`` reproduce the demo. The signed square root of the gate score is kept (it is
  in both codes, not in the paper's equation).
- Token ids the tokenizer does not have (the model vocabulary is often padded) map to the compressed pad id;
  the demo raises for them.
- Attention is standard GQA with RoPE through ``ALL_ATTENTION_FUNCTIONS`` (the paper uses MLA).
- On CUDA the Engram layer runs fused kernels (``engram_kernels.py``: hash+gather, gate, conv+residual; Triton
  with PyTorch twins), selected by ``config.engram_kernels``; the plain PyTorch code in this file is the
  reference they are tested against. Tables can live in pinned host memory (``engram_table_placement``,
  ``engram_offload.py``), their rows gathered on a side stream as soon as the ids are known. The demo has
  neither; the paper describes host-memory tables with prefetch.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.configuration_utils import PreTrainedConfig
from transformers.generation import GenerationMixin
from transformers.integrations import use_experts_implementation
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_engram import EngramMoEConfig
from .engram_kernels import engram_layer_forward, resolve_kernel_mode
from .engram_offload import (
    EngramTable,
    engram_device_map,
    layer_placement,
    prepare_engram_inputs,
    resolve_memory,
)

# Cache conv-state slots of an Engram ("hybrid") layer: the short conv's input frames and the last N-1 ids.
CONV_STATE = 0
NGRAM_HISTORY_STATE = 1
# Floor of |score| under the gate's signed square root (the reference's constant).
GATE_SQRT_FLOOR = 1e-6


# ---------------------------------------------------------------------------------------------- outputs


@dataclass
class EngramMoEModelOutputWithPast(MoeModelOutputWithPast):
    r"""
    engram_gates (`tuple(torch.FloatTensor)`, *optional*, returned with `output_engram_gates=True`):
        One `[batch, seq, hc_mult]` tensor per Engram layer (config order): the gate alpha of every branch.
    """

    engram_gates: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class EngramMoECausalLMOutputWithPast(MoeCausalLMOutputWithPast):
    r"""
    engram_gates (`tuple(torch.FloatTensor)`, *optional*, returned with `output_engram_gates=True`):
        One `[batch, seq, hc_mult]` tensor per Engram layer (config order): the gate alpha of every branch.
    """

    engram_gates: tuple[torch.FloatTensor, ...] | None = None


# ---------------------------------------------------------------------------------------------- hashing


def hash_ngrams(
    ids_with_history: torch.Tensor, multipliers: torch.Tensor, moduli: torch.Tensor, max_ngram_size: int
) -> torch.Tensor:
    """Hash every suffix n-gram of `ids_with_history` for every Engram layer at once.

    Args:
        ids_with_history: `[B, N-1+T]` int64 compressed ids; the first N-1 columns are the context before the
            first position (the compressed pad id at a sequence start, the cached ids when decoding).
        multipliers: `[L, N]` int64, one odd multiplier per look-back k = 0..N-1 and Engram layer.
        moduli: `[L, (N-1)*K]` int64 primes in (order, head) order.

    Returns:
        `[B, T, L, (N-1)*K]` int64 head indices (before the table offsets).

    `mix_n = XOR_{k<n} x_{t-k} * m_k` in int64; the config guarantees `x * m_k < 2**63`, so no product wraps,
    every mix is non-negative and `remainder` equals the reference's `mod`.
    """
    context = max_ngram_size - 1
    length = ids_with_history.shape[1] - context
    num_heads = moduli.shape[1] // context
    mix = ids_with_history[:, context:, None] * multipliers[:, 0]
    heads = []
    for k in range(1, max_ngram_size):
        previous = ids_with_history[:, context - k : context - k + length, None]
        mix = torch.bitwise_xor(mix, previous * multipliers[:, k])
        heads.append(torch.remainder(mix[..., None], moduli[:, (k - 1) * num_heads : k * num_heads]))
    return torch.cat(heads, dim=-1)


def engram_hash_constants(config: EngramMoEConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The `[L, N]` multipliers and `[L, (N-1)*K]` prime moduli of `config` as int64 tensors."""
    multipliers = torch.tensor(config.engram_multipliers, dtype=torch.long, device=device)
    moduli = torch.tensor(
        [[p for order in layer for p in order] for layer in config.engram_primes],
        dtype=torch.long,
        device=device,
    )
    n = config.engram_max_ngram_size
    return multipliers.view(-1, n), moduli.view(-1, (n - 1) * config.engram_num_heads)


def engram_hash_ids(
    config: EngramMoEConfig,
    compressed_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    history: torch.Tensor | None = None,
) -> torch.LongTensor:
    """Per-head hash indices `[B, T, L, (N-1)*K]` of `compressed_ids` `[B, T]` for the config's Engram layers.

    Indices are before the table offsets, Engram layers in config order, columns in (order, head) order. With
    `attention_mask`, masked positions count as sequence start (when `config.engram_reset_on_padding`).
    `history` (`[B, N-1]`) is the context before the first position; the compressed pad id by default.
    """
    if compressed_ids.dim() != 2:
        raise ValueError(f"compressed_ids must be [batch, seq], got shape {tuple(compressed_ids.shape)}.")
    ids = compressed_ids.long()
    bad = (ids < 0) | (ids >= config.engram_compressed_vocab_size)
    if bad.any():
        raise ValueError(
            f"compressed id {int(ids[bad][0])} is outside [0, engram_compressed_vocab_size="
            f"{config.engram_compressed_vocab_size})."
        )
    pad = config.engram_compressed_pad_id
    if attention_mask is not None and config.engram_reset_on_padding:
        ids = torch.where(attention_mask[:, -ids.shape[1] :].bool(), ids, pad)
    if history is None:
        history = ids.new_full((ids.shape[0], config.engram_max_ngram_size - 1), pad)
    multipliers, moduli = engram_hash_constants(config, ids.device)
    return hash_ngrams(
        torch.cat([history.long(), ids], dim=1), multipliers, moduli, config.engram_max_ngram_size
    )


# ---------------------------------------------------------------------------------------------- norms


class EngramMoERMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class EngramBranchRMSNorm(nn.Module):
    """One RMSNorm per residual branch, stored as a `[hc, hidden]` weight, applied to `[..., hc, hidden]`.

    `eps=None` means `torch.finfo(input dtype).eps`, which is what the reference's `nn.RMSNorm(eps=None)` does.
    The statistics run in float32 or wider (float64 inputs stay float64, so the float64 fixtures pin the eps).
    """

    def __init__(self, num_branches: int, hidden_size: int, eps: float | None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_branches, hidden_size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        eps = torch.finfo(input_dtype).eps if self.eps is None else self.eps
        compute_dtype = torch.promote_types(input_dtype, torch.float32)
        hidden_states = hidden_states.to(compute_dtype)
        hidden_states = hidden_states * torch.rsqrt(hidden_states.pow(2).mean(-1, keepdim=True) + eps)
        return (self.weight.to(compute_dtype) * hidden_states).to(input_dtype)


class EngramMoEUnweightedRMSNorm(nn.Module):
    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states * torch.rsqrt(hidden_states.pow(2).mean(-1, keepdim=True) + self.eps)


# ---------------------------------------------------------------------------------------------- Engram


class EngramLayer(nn.Module):
    """The Engram module of one decoder layer.

    `forward(hidden_states [B, T, hc, d], hash_ids [B, T, (N-1)*K])` returns the updated residual stream
    `hidden_states + Y` and the gates `[B, T, hc]`, where `e_t` is the concatenation of the looked-up rows,
    `alpha_m = sigmoid(signed_sqrt(<RMSNorm(W_K,m e_t), RMSNorm(h_m)> / sqrt(d)))`, `u_m = alpha_m * W_V e_t` and
    `Y = SiLU(DilatedCausalConv(RMSNorm(u))) + u`.
    """

    def __init__(self, config: EngramMoEConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.engram_index = config.engram_layer_ids.index(layer_idx)
        self.num_branches = config.hc_mult
        self.hidden_size = config.hidden_size
        memory_dim = config.engram_memory_dim
        hc_hidden = self.num_branches * self.hidden_size

        # The serving settings (engram_kernels, engram_prefetch) are read from the config at call time.
        self.config = config
        host = layer_placement(config, self.engram_index) == "host"
        self.embedding = EngramTable(
            config.engram_table_rows[self.engram_index], config.engram_head_dim, host_resident=host
        )
        self.offsets = nn.Buffer(
            torch.tensor(config.engram_head_offsets[self.engram_index], dtype=torch.long), persistent=False
        )
        self.key_proj = nn.Linear(memory_dim, hc_hidden, bias=config.engram_use_bias)
        self.value_proj = nn.Linear(memory_dim, self.hidden_size, bias=config.engram_use_bias)
        self.key_norm = EngramBranchRMSNorm(self.num_branches, self.hidden_size, config.engram_gate_norm_eps)
        self.query_norm = EngramBranchRMSNorm(
            self.num_branches, self.hidden_size, config.engram_gate_norm_eps
        )
        self.conv_state_len = (config.engram_kernel_size - 1) * config.engram_conv_dilation
        if config.engram_use_conv:
            self.conv_norm = EngramBranchRMSNorm(
                self.num_branches, self.hidden_size, config.engram_conv_norm_eps
            )
            self.conv = nn.Conv1d(
                hc_hidden,
                hc_hidden,
                kernel_size=config.engram_kernel_size,
                dilation=config.engram_conv_dilation,
                groups=hc_hidden,
                bias=False,
            )
        else:
            self.conv_norm = None
            self.conv = None

    def lookup(self, hash_ids: torch.Tensor) -> torch.Tensor:
        """`[B, T, (N-1)*K]` head indices -> memory vectors `e_t` `[B, T, d_mem]`."""
        # Through the module (not F.embedding on its weight) so that sharding wrappers such as
        # torch.distributed's RowwiseParallel see the call. The table may live on another device than the
        # activations (host offload): index where it is.
        table_device = self.embedding.weight.device
        rows = self.embedding((hash_ids + self.offsets.to(hash_ids.device)).to(table_device))
        return rows.flatten(-2).to(hash_ids.device)

    def forward(
        self,
        hidden_states: torch.Tensor,
        hash_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        memory: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        memory = self.lookup(hash_ids) if memory is None else resolve_memory(memory)
        mode = resolve_kernel_mode(self.config.engram_kernels, hidden_states.device)
        if mode != "reference":
            # The same math with a fused gate (Triton for inference, its PyTorch twin when training).
            return engram_layer_forward(self, hidden_states, memory, attention_mask, cache, mode == "triton")
        memory = memory.to(hidden_states.dtype)
        key = self.key_norm(self.key_proj(memory).unflatten(-1, (self.num_branches, self.hidden_size)))
        query = self.query_norm(hidden_states)
        score = (key * query).sum(dim=-1, keepdim=True) / math.sqrt(self.hidden_size)
        score = score.sign() * score.abs().clamp_min(GATE_SQRT_FLOOR).sqrt()
        gate = torch.sigmoid(score)
        value = gate * self.value_proj(memory).unsqueeze(-2)
        output = value
        if self.conv is not None:
            output = value + self._short_conv(self.conv_norm(value), attention_mask, cache)
        return hidden_states + output, gate.squeeze(-1)

    def _short_conv(self, normed: torch.Tensor, attention_mask: torch.Tensor | None, cache: Cache | None):
        length = normed.shape[1]
        frames = normed.flatten(-2).transpose(1, 2)
        if attention_mask is not None:
            # Padding positions act as the zeros before a sequence start.
            frames = frames * attention_mask[:, None, -length:].to(frames.dtype)
        if cache is not None:
            frames = cache.update_conv_state(
                frames, self.layer_idx, state_idx=CONV_STATE, conv_kernel_size=self.conv_state_len
            )
        frames = F.pad(frames, (self.conv_state_len, 0))[..., -(self.conv_state_len + length) :]
        out = F.silu(self.conv(frames))
        return out.transpose(1, 2).unflatten(-1, (self.num_branches, self.hidden_size))


# ---------------------------------------------------------------------------------------------- mHC


class EngramMoEHyperConnection(nn.Module):
    """Manifold-constrained hyper-connection around one sub-layer (transformers' `deepseek_v4` form).

    From the `hc` streams it computes `pre` (collapse the streams into the sub-layer input), `post` (expand the
    sub-layer output back into streams) and the doubly stochastic `comb` (mix the input streams), the latter
    with a few Sinkhorn-Knopp iterations.
    """

    def __init__(self, config: EngramMoEConfig):
        super().__init__()
        self.hc_mult = config.hc_mult
        self.sinkhorn_iters = config.hc_sinkhorn_iters
        self.hc_eps = config.hc_eps
        self.input_norm = EngramMoEUnweightedRMSNorm(config.rms_norm_eps)
        num_weights = (2 + self.hc_mult) * self.hc_mult
        self.fn = nn.Parameter(torch.empty(num_weights, self.hc_mult * config.hidden_size))
        self.base = nn.Parameter(torch.empty(num_weights))
        self.scale = nn.Parameter(torch.empty(3))

    def forward(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hc = self.hc_mult
        mixes = F.linear(self.input_norm(streams.flatten(2).float()), self.fn.float())
        pre_w, post_w, comb_w = mixes.split([hc, hc, hc * hc], dim=-1)
        pre_b, post_b, comb_b = self.base.float().split([hc, hc, hc * hc])
        pre_scale, post_scale, comb_scale = self.scale.float().unbind(0)
        pre = torch.sigmoid(pre_w * pre_scale + pre_b) + self.hc_eps
        post = 2 * torch.sigmoid(post_w * post_scale + post_b)
        comb = (
            torch.softmax(comb_w.unflatten(-1, (hc, hc)) * comb_scale + comb_b.view(hc, hc), dim=-1)
            + self.hc_eps
        )
        comb = comb / (comb.sum(dim=-2, keepdim=True) + self.hc_eps)
        for _ in range(self.sinkhorn_iters - 1):
            comb = comb / (comb.sum(dim=-1, keepdim=True) + self.hc_eps)
            comb = comb / (comb.sum(dim=-2, keepdim=True) + self.hc_eps)
        collapsed = (pre.unsqueeze(-1) * streams).sum(dim=2).to(streams.dtype)
        return post.to(streams.dtype), comb.to(streams.dtype), collapsed

    @staticmethod
    def merge(
        streams: torch.Tensor, output: torch.Tensor, post: torch.Tensor, comb: torch.Tensor
    ) -> torch.Tensor:
        """`out_k = post_k * f(x) + sum_j comb[j, k] * x_j`."""
        return post.unsqueeze(-1) * output.unsqueeze(-2) + torch.matmul(comb.transpose(-1, -2), streams)


class EngramMoEHyperHead(nn.Module):
    """Collapses the `hc` streams into one before the final norm."""

    def __init__(self, config: EngramMoEConfig):
        super().__init__()
        self.hc_eps = config.hc_eps
        self.input_norm = EngramMoEUnweightedRMSNorm(config.rms_norm_eps)
        self.fn = nn.Parameter(torch.empty(config.hc_mult, config.hc_mult * config.hidden_size))
        self.base = nn.Parameter(torch.empty(config.hc_mult))
        self.scale = nn.Parameter(torch.empty(1))

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        mixes = F.linear(self.input_norm(streams.flatten(2).float()), self.fn.float())
        pre = torch.sigmoid(mixes * self.scale.float() + self.base.float()) + self.hc_eps
        return (pre.unsqueeze(-1) * streams).sum(dim=2).to(streams.dtype)


# ---------------------------------------------------------------------------------------------- attention


class EngramMoERotaryEmbedding(nn.Module):
    def __init__(self, config: EngramMoEConfig):
        super().__init__()
        self.config = config
        self.rope_type = config.rope_parameters["rope_type"]
        rope_init_fn: Callable = self.compute_default_rope_parameters
        if self.rope_type != "default":
            rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = rope_init_fn(config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: EngramMoEConfig, **kwargs) -> tuple[torch.Tensor, float]:
        base = config.rope_parameters["rope_theta"]
        dim = config.head_dim or config.hidden_size // config.num_attention_heads
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x, position_ids):
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(
            x.dtype
        )


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Unpack[TransformersKwargs],
):
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class EngramMoEAttention(nn.Module):
    """Grouped-query attention with RoPE."""

    def __init__(self, config: EngramMoEConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim or config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = self.o_proj(attn_output.reshape(*input_shape, -1).contiguous())
        return attn_output, attn_weights


# ---------------------------------------------------------------------------------------------- MoE


class EngramMoEMLP(nn.Module):
    """SwiGLU feed-forward: the dense layers and the shared experts."""

    def __init__(self, config: EngramMoEConfig, intermediate_size: int | None = None):
        super().__init__()
        intermediate_size = intermediate_size or config.intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


@use_experts_implementation
class EngramMoEExperts(nn.Module):
    """Routed experts stored as 3-D weights."""

    def __init__(self, config: EngramMoEConfig):
        super().__init__()
        self.num_experts = config.n_routed_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(
            torch.empty(self.num_experts, 2 * self.intermediate_dim, self.hidden_dim)
        )
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        final_hidden_states = torch.zeros_like(hidden_states)
        with torch.no_grad():
            expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert_idx in expert_hit:
            expert_idx = expert_idx[0]
            if expert_idx == self.num_experts:
                continue
            top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
            gate, up = F.linear(hidden_states[token_idx], self.gate_up_proj[expert_idx]).chunk(2, dim=-1)
            current = F.linear(self.act_fn(gate) * up, self.down_proj[expert_idx])
            current = current * top_k_weights[token_idx, top_k_pos, None]
            final_hidden_states.index_add_(0, token_idx, current.to(final_hidden_states.dtype))
        return final_hidden_states


class EngramMoERouter(nn.Module):
    """Top-k router: softmax or sigmoid scores, selection shifted by a load-balancing bias.

    The bias (`e_score_correction_bias`, DeepSeek-V3's name) only changes which experts are chosen, never their
    weights. With `router_bias_update_speed > 0` the router counts the tokens each expert receives while
    training; `update_router_biases(model)` then moves the bias towards balance (auxiliary-loss-free balancing).
    """

    def __init__(self, config: EngramMoEConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.n_routed_experts
        self.hidden_dim = config.hidden_size
        self.scoring_func = config.scoring_func
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.track_load = config.router_bias_update_speed > 0
        self.weight = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim))
        self.e_score_correction_bias = nn.Buffer(torch.zeros(self.num_experts, dtype=torch.float32))
        self.tokens_per_expert = nn.Buffer(
            torch.zeros(self.num_experts, dtype=torch.float32), persistent=False
        )

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        router_logits = F.linear(hidden_states, self.weight)
        if self.scoring_func == "softmax":
            scores = F.softmax(router_logits.float(), dim=-1)
        else:
            scores = torch.sigmoid(router_logits.float())
        top_k_index = torch.topk(scores + self.e_score_correction_bias, self.top_k, dim=-1).indices
        top_k_weights = scores.gather(1, top_k_index)
        if self.norm_topk_prob:
            top_k_weights = top_k_weights / top_k_weights.sum(dim=-1, keepdim=True)
        top_k_weights = top_k_weights * self.routed_scaling_factor
        if self.track_load and self.training:
            with torch.no_grad():
                self.tokens_per_expert += torch.bincount(top_k_index.flatten(), minlength=self.num_experts)
        return router_logits, top_k_weights, top_k_index


class EngramMoESparseMoeBlock(nn.Module):
    def __init__(self, config: EngramMoEConfig):
        super().__init__()
        self.gate = EngramMoERouter(config)
        self.experts = EngramMoEExperts(config)
        self.shared_experts = (
            EngramMoEMLP(config, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts > 0
            else None
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size, seq_len, hidden_dim = hidden_states.shape
        flat = hidden_states.reshape(-1, hidden_dim)
        _, top_k_weights, top_k_index = self.gate(flat)
        output = self.experts(flat, top_k_index, top_k_weights).reshape(batch_size, seq_len, hidden_dim)
        if self.shared_experts is not None:
            output = output + self.shared_experts(hidden_states)
        return output


@torch.no_grad()
def update_router_biases(model: nn.Module, speed: float | None = None) -> None:
    """Auxiliary-loss-free balancing step (DeepSeek-V3): `bias += speed * sign(mean_load - load)` per router.

    Call it after each optimizer step. Under torch.distributed the token counts are summed over ranks first,
    so every rank applies the same update.
    """
    for module in model.modules():
        if not isinstance(module, EngramMoERouter) or not module.track_load:
            continue
        load = module.tokens_per_expert
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(load)
        if load.sum() > 0:
            rate = speed if speed is not None else _config_of(model).router_bias_update_speed
            module.e_score_correction_bias += rate * torch.sign(load.mean() - load)
        load.zero_()


def _config_of(model: nn.Module) -> EngramMoEConfig:
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("update_router_biases needs a model with a config, or an explicit speed.")
    return config


# ---------------------------------------------------------------------------------------------- blocks


class EngramMoEDecoderLayer(GradientCheckpointingLayer):
    """Engram (if this layer has one) -> attention -> dense FFN or MoE, on `[B, T, hc, d]` streams."""

    def __init__(self, config: EngramMoEConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.hc_mult = config.hc_mult
        self.engram = EngramLayer(config, layer_idx) if layer_idx in config.engram_layer_ids else None
        self.self_attn = EngramMoEAttention(config, layer_idx)
        is_moe = layer_idx >= config.first_k_dense_replace and config.n_routed_experts > 0
        self.mlp = EngramMoESparseMoeBlock(config) if is_moe else EngramMoEMLP(config)
        self.input_layernorm = EngramMoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = EngramMoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if self.hc_mult > 1:
            self.attn_hc = EngramMoEHyperConnection(config)
            self.ffn_hc = EngramMoEHyperConnection(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        engram_hash_ids: torch.Tensor | None = None,
        engram_mask: torch.Tensor | None = None,
        engram_memory=None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        if self.engram is not None:
            hidden_states, _ = self.engram(
                hidden_states, engram_hash_ids, attention_mask=engram_mask, cache=cache, memory=engram_memory
            )

        def attention(x):
            return self.self_attn(
                self.input_layernorm(x),
                position_embeddings=position_embeddings,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                **kwargs,
            )[0]

        if self.hc_mult == 1:
            # A plain pre-norm residual: identical to a standard MoE decoder layer.
            residual = hidden_states.squeeze(2)
            hidden = residual + attention(residual)
            hidden = hidden + self.mlp(self.post_attention_layernorm(hidden))
            return hidden.unsqueeze(2)

        post, comb, collapsed = self.attn_hc(hidden_states)
        hidden_states = EngramMoEHyperConnection.merge(hidden_states, attention(collapsed), post, comb)
        post, comb, collapsed = self.ffn_hc(hidden_states)
        mlp_output = self.mlp(self.post_attention_layernorm(collapsed))
        return EngramMoEHyperConnection.merge(hidden_states, mlp_output, post, comb)


# ---------------------------------------------------------------------------------------------- models


class EngramMoEPreTrainedModel(PreTrainedModel):
    config: EngramMoEConfig
    config_class = EngramMoEConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["EngramMoEDecoderLayer"]
    _skip_keys_device_placement = ["cache"]
    # Huge Engram tables may stay in host memory: accelerate's "auto" placement may leave them out.
    _no_placement_params = ["engram.embedding.weight"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False
    _can_record_outputs = {
        "router_logits": OutputRecorder(EngramMoERouter, index=0),
        "hidden_states": EngramMoEDecoderLayer,
        "attentions": EngramMoEAttention,
        "engram_gates": OutputRecorder(EngramLayer, index=1),
    }

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`, with host-placed Engram tables kept out of `device_map`.

        With `engram_table_placement="host"` (in the saved config or as a keyword) and a `device_map`, the tables
        load into host memory and are page-locked; everything else goes where `device_map` says. So a checkpoint
        whose tables exceed GPU memory loads with `device_map="cuda"`.
        """
        config = kwargs.get("config")
        # PreTrainedConfig, not EngramMoEConfig: remote code loads its own copy of the config class.
        if isinstance(config, PreTrainedConfig) and "engram_table_placement" in kwargs:
            # With a config object, transformers would hand unknown keywords to __init__: set it here instead.
            config = copy.deepcopy(config)
            config.engram_table_placement = kwargs.pop("engram_table_placement")
            kwargs["config"] = config
        device_map = kwargs.get("device_map")
        if device_map is not None:
            if not isinstance(config, PreTrainedConfig):
                download = (
                    "cache_dir",
                    "force_download",
                    "local_files_only",
                    "token",
                    "revision",
                    "subfolder",
                )
                config = EngramMoEConfig.from_pretrained(
                    config if config is not None else pretrained_model_name_or_path,
                    **{key: kwargs[key] for key in download if key in kwargs},
                )
                if "engram_table_placement" in kwargs:
                    config.engram_table_placement = kwargs["engram_table_placement"]
            kwargs["device_map"] = engram_device_map(cls, config, device_map, kwargs.get("max_memory"))
        model = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        # Host tables were loaded to the CPU: page-lock them for the GPU's reads (device tables stay put).
        model._place_engram_tables(only="host")
        return model

    def set_engram_table_placement(self, placement: str | list[str]) -> None:
        """Move the Engram tables: "device" (with the model's first parameter) or "host" (pinned host memory),
        one value or one per Engram layer. Saved in the config."""
        self.config.engram_table_placement = placement
        self._place_engram_tables()

    def _place_engram_tables(self, only: str | None = None) -> None:
        device = next(p.device for n, p in self.named_parameters() if ".engram.embedding." not in n)
        for module in self.modules():
            if isinstance(module, EngramLayer):
                placement = layer_placement(self.config, module.engram_index)
                if only is None or placement == only:
                    module.embedding.place(placement, device)

    def _init_weights(self, module):
        super()._init_weights(module)
        config = self.config
        std = config.initializer_range
        if isinstance(module, EngramLayer):
            table_std = config.engram_init_std if config.engram_init_std is not None else std
            init.normal_(module.embedding.weight, mean=0.0, std=table_std)
            init.copy_(module.offsets, torch.tensor(config.engram_head_offsets[module.engram_index]))
            if module.conv is not None:
                if config.engram_conv_zero_init:
                    # The paper: start from the identity, so a fresh Engram only adds the gated value.
                    init.zeros_(module.conv.weight)
                else:
                    init.kaiming_uniform_(module.conv.weight, a=math.sqrt(5))
        elif isinstance(module, EngramBranchRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, EngramMoEExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, EngramMoERouter):
            init.normal_(module.weight, mean=0.0, std=std)
            init.zeros_(module.e_score_correction_bias)
            init.zeros_(module.tokens_per_expert)
        elif isinstance(module, (EngramMoEHyperConnection, EngramMoEHyperHead)):
            init.normal_(module.fn, mean=0.0, std=std)
            init.zeros_(module.base)
            init.ones_(module.scale)
        elif isinstance(module, EngramMoEModel) and module.has_engram:
            multipliers, moduli = engram_hash_constants(config)
            init.copy_(module.engram_multipliers, multipliers)
            init.copy_(module.engram_moduli, moduli)
            init.copy_(module.engram_token_map, default_token_map(config))


def default_token_map(config: EngramMoEConfig) -> torch.LongTensor:
    """Identity compression over the first |V'| ids; any id beyond maps to the compressed pad id."""
    token_map = torch.full((config.vocab_size,), config.engram_compressed_pad_id, dtype=torch.long)
    size = config.engram_compressed_vocab_size
    token_map[:size] = torch.arange(size)
    return token_map


class EngramMoEModel(EngramMoEPreTrainedModel):
    def __init__(self, config: EngramMoEConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [EngramMoEDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = EngramMoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = EngramMoERotaryEmbedding(config=config)
        self.hc_head = EngramMoEHyperHead(config) if config.hc_mult > 1 else None
        self.has_engram = len(config.engram_layer_ids) > 0
        if self.has_engram:
            multipliers, moduli = engram_hash_constants(config)
            # Derived from the config, so not saved: only the token map is checkpoint data.
            self.engram_multipliers = nn.Buffer(multipliers, persistent=False)
            self.engram_moduli = nn.Buffer(moduli, persistent=False)
            self.engram_token_map = nn.Buffer(default_token_map(config))
        self.gradient_checkpointing = False
        self.post_init()

    @property
    def engram_layers(self) -> list[EngramLayer]:
        """The Engram modules in config order."""
        by_layer = {layer.layer_idx: layer.engram for layer in self.layers if layer.engram is not None}
        return [by_layer[i] for i in self.config.engram_layer_ids]

    def set_engram_token_map(self, token_map: torch.Tensor) -> None:
        """Install the tokenizer compression map (from `build_token_map`); it is saved with the checkpoint."""
        if not self.has_engram:
            raise ValueError(
                "This model has no Engram layers (engram_layer_ids is empty); it needs no token map."
            )
        config = self.config
        token_map = torch.as_tensor(token_map, dtype=torch.long).flatten()
        if token_map.numel() > config.vocab_size:
            raise ValueError(
                f"The token map covers {token_map.numel()} ids but the model's vocab_size is {config.vocab_size}."
            )
        size = int(token_map.max()) + 1 if token_map.numel() else 0
        if size != config.engram_compressed_vocab_size or int(token_map.min()) < 0:
            raise ValueError(
                f"The token map compresses to {size} ids but config.engram_compressed_vocab_size is "
                f"{config.engram_compressed_vocab_size}: the map belongs to another tokenizer. Build the config "
                "from this map (engram_moe.token_map_config)."
            )
        if config.engram_pad_id < token_map.numel():
            mapped_pad = int(token_map[config.engram_pad_id])
            if mapped_pad != config.engram_compressed_pad_id:
                raise ValueError(
                    f"The token map sends engram_pad_id={config.engram_pad_id} to {mapped_pad}, but "
                    f"config.engram_compressed_pad_id is {config.engram_compressed_pad_id}."
                )
        full = torch.full((config.vocab_size,), config.engram_compressed_pad_id, dtype=torch.long)
        full[: token_map.numel()] = token_map
        self.engram_token_map.copy_(full.to(self.engram_token_map.device))

    def compute_engram_hash_ids(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None, cache: Cache | None
    ) -> torch.LongTensor:
        """Compress, extend with the cached (or pad) context, and hash once for all Engram layers."""
        compressed = self.engram_context_ids(input_ids, attention_mask, cache)
        return hash_ngrams(
            compressed, self.engram_multipliers, self.engram_moduli, self.config.engram_max_ngram_size
        )

    def engram_context_ids(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None, cache: Cache | None
    ) -> torch.LongTensor:
        """Compressed ids `[B, N-1+T]` with the N-1 ids before the first position (cached, or the pad id).

        Updates the cache's n-gram history, so call it once per forward."""
        config = self.config
        compressed = self.engram_token_map[input_ids]
        if attention_mask is not None and config.engram_reset_on_padding:
            compressed = torch.where(
                attention_mask[:, -input_ids.shape[1] :].bool(), compressed, config.engram_compressed_pad_id
            )
        context = config.engram_max_ngram_size - 1
        first = config.engram_layer_ids[0]
        cached = cache.get_conv_state(first, NGRAM_HISTORY_STATE) if cache is not None else None
        if cached is None:
            pads = compressed.new_full((compressed.shape[0], context), config.engram_compressed_pad_id)
            compressed = torch.cat([pads, compressed], dim=1)
        if cache is not None:
            # On prefill we hand in `pads + ids`; on decode the cache returns `cached + ids`. Every Engram layer
            # keeps the (identical, tiny) history so that each cache layer can be cropped and reordered alone.
            new_ids = compressed
            for layer_id in config.engram_layer_ids:
                extended = cache.update_conv_state(
                    new_ids, layer_id, state_idx=NGRAM_HISTORY_STATE, conv_kernel_size=context
                )
                if layer_id == first:
                    compressed = extended
        return compressed

    def _check_input_ids(self, input_ids: torch.LongTensor) -> None:
        if torch.compiler.is_compiling():
            return
        bad = (input_ids < 0) | (input_ids >= self.config.vocab_size)
        if bad.any():
            raise ValueError(
                f"input_ids contains {int(input_ids[bad][0])}, outside the vocabulary [0, {self.config.vocab_size})."
            )

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> EngramMoEModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if self.has_engram and input_ids is None:
            raise ValueError("Engram layers hash token ids: pass input_ids, not only inputs_embeds.")
        if input_ids is not None:
            self._check_input_ids(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = (
                torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            )
            position_ids = position_ids.unsqueeze(0)

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        padding_mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        hash_ids, engram_memory = None, {}
        if self.has_engram:
            # Fast paths gather every layer's memory here (host tables on a side stream, overlapping the layers
            # before them); the reference path gets hash ids.
            hash_ids, engram_memory = prepare_engram_inputs(
                self, input_ids, padding_mask, cache, inputs_embeds.dtype
            )
        engram_slot = {layer_id: i for i, layer_id in enumerate(self.config.engram_layer_ids)}

        hidden_states = inputs_embeds.unsqueeze(2)
        if self.config.hc_mult > 1:
            hidden_states = hidden_states.expand(-1, -1, self.config.hc_mult, -1).contiguous()
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids=position_ids)
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            slot = engram_slot.get(decoder_layer.layer_idx)
            hidden_states = decoder_layer(
                hidden_states,
                position_embeddings=position_embeddings,
                attention_mask=causal_mask,
                position_ids=position_ids,
                cache=cache,
                engram_hash_ids=hash_ids[:, :, slot] if slot is not None and hash_ids is not None else None,
                engram_mask=padding_mask,
                engram_memory=engram_memory.get(decoder_layer.layer_idx),
                **kwargs,
            )
        hidden_states = self.hc_head(hidden_states) if self.hc_head is not None else hidden_states.squeeze(2)
        return EngramMoEModelOutputWithPast(last_hidden_state=self.norm(hidden_states), cache=cache)


class EngramMoEForCausalLM(EngramMoEPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: EngramMoEConfig):
        super().__init__(config)
        self.model = EngramMoEModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def set_engram_token_map(self, token_map: torch.Tensor) -> None:
        self.model.set_engram_token_map(token_map)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> EngramMoECausalLMOutputWithPast:
        output_router_logits = (
            output_router_logits if output_router_logits is not None else self.config.output_router_logits
        )
        outputs: EngramMoEModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
        aux_loss = None
        if output_router_logits and outputs.router_logits:
            aux_loss = load_balancing_loss_func(
                outputs.router_logits,
                self.config.n_routed_experts,
                self.config.num_experts_per_tok,
                attention_mask,
            )
            if labels is not None:
                loss = loss + self.config.router_aux_loss_coef * aux_loss.to(loss.device)

        return EngramMoECausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
            engram_gates=outputs.engram_gates,
        )


__all__ = [
    "EngramLayer",
    "EngramMoEForCausalLM",
    "EngramMoEModel",
    "EngramMoEPreTrainedModel",
    "engram_hash_ids",
    "hash_ngrams",
    "update_router_biases",
]
