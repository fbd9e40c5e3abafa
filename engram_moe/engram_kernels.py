"""Fast paths of the Engram layer: fused hash + gather and a fused gate, in Triton with PyTorch twins.

The plain PyTorch code in ``modeling_engram.py`` (``hash_ngrams`` + ``EngramLayer.lookup`` + the gate written
op by op) stays the reference. This module adds:

- ``hash_gather``: hashes every (token, head) pair of one Engram layer and copies the table row it addresses
  into the memory vector ``e_t``, in one launch. The hash ids never reach device memory (they are written only
  when a backward pass needs them), and the table may be a CUDA view of pinned host memory (UVA): the same
  kernel then reads the rows over PCIe. Gradients flow to the table through ``embedding_dense_backward``,
  exactly as ``nn.Embedding`` computes them.
- ``engram_hash``: the hash ids of all Engram layers in one launch (the reference does ~5 launches per order).
- ``engram_gate``: both RMSNorms, the gate score, its signed square root, the sigmoid, ``u = alpha * v`` and the
  conv's RMSNorm of ``u`` in one pass over a token's activations, and its backward in one more (it recomputes the
  forward from the saved inputs). ``engram_gate_torch`` is the PyTorch twin (the same math under autograd,
  written so ``torch.compile`` can fuse it): the path without Triton, and the reference the kernels are tested
  against, forward and gradients.

Triton is optional: without it (or on CPU) every function here has a PyTorch path with the same results, and
``TRITON_INTERPRET=1`` runs the Triton kernels on CPU tensors (the CPU tests use that when Triton is installed).
This file imports only torch (and Triton when present), so the remote-code export works without Triton.
"""

from __future__ import annotations

import importlib.util
import math
import os

import torch

# Triton is optional (the PyTorch paths below work without it) and imported on first use: whether it interprets
# kernels on CPU (TRITON_INTERPRET=1) is fixed when it is imported, so importing late lets tests choose.
triton = None
tl = None

KERNEL_MODES = ("auto", "triton", "torch", "reference")
# Floor of |score| under the gate's signed square root (the reference's constant, as in modeling_engram).
GATE_SQRT_FLOOR = 1e-6


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_installed() -> bool:
    return triton is not None or importlib.util.find_spec("triton") is not None


def _import_triton():
    global triton, tl, _ngram_mix
    if triton is None:
        try:
            import triton as triton_module
            import triton.language as tl_module
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise RuntimeError("The Engram Triton kernels need the `triton` package.") from error
        triton, tl = triton_module, tl_module
        # A helper the kernels call must itself be a Triton function; kernels find it in this module's globals
        # when they compile.
        _ngram_mix = triton.jit(_ngram_mix)
    return triton


def triton_runs_on(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors of `device` (CUDA, or CPU under TRITON_INTERPRET=1)."""
    if not triton_installed():
        return False
    device = torch.device(device)
    return device.type == "cuda" or (device.type == "cpu" and triton_interpret())


def resolve_kernel_mode(mode: str, device: torch.device) -> str:
    """Which implementation serves `mode` on `device`: "triton", "torch" or "reference".

    "auto" takes the Triton kernels on CUDA when Triton is installed, the fused PyTorch path on CUDA without it,
    and the reference path on CPU (where the reference is already the fastest simple code). "triton" insists on
    Triton and fails clearly where it cannot run.
    """
    if mode not in KERNEL_MODES:
        raise ValueError(f"engram_kernels={mode!r} must be one of {KERNEL_MODES}.")
    if mode in ("reference", "torch"):
        return mode
    runs = triton_runs_on(device)
    if mode == "triton":
        if not runs:
            raise RuntimeError(
                f"engram_kernels='triton' needs Triton and a CUDA device (or TRITON_INTERPRET=1 on CPU); "
                f"triton installed: {triton_installed()}, device: {device}."
            )
        return "triton"
    if torch.device(device).type != "cuda":
        return "reference"
    return "triton" if runs else "torch"


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


# ---------------------------------------------------------------------------------------------- Triton kernels
# Plain functions, jitted on first use (`_jit`), when Triton is imported.

_JITTED: dict = {}


def _jit(fn):
    kernel = _JITTED.get(fn.__name__)
    if kernel is None:
        kernel = _JITTED[fn.__name__] = _import_triton().jit(fn)
    return kernel


def _ngram_mix(base, mult_ptr, mask, order, NGRAM: tl.constexpr):
    # The hash mix of the n-gram ending at `base` (compressed ids, one per lane): XOR over look-backs k < order of
    # id[t-k] * multiplier[k], int64 wrapping as in the reference. Order n mixes look-backs 0..n-1, so lanes of
    # lower orders skip the later terms. Jitted by `_import_triton` so that both hash kernels call it.
    mix = tl.load(base, mask=mask, other=0) * tl.load(mult_ptr, mask=mask, other=0)
    for k in tl.static_range(1, NGRAM):
        term = tl.load(base - k, mask=mask, other=0) * tl.load(mult_ptr + k, mask=mask, other=0)
        mix = tl.where(k < order, mix ^ term, mix)
    return mix


def _hash_gather_kernel(
    ids_ptr,
    ids_stride,
    mult_ptr,
    mod_ptr,
    off_ptr,
    table_ptr,
    out_ptr,
    rows_ptr,
    num_pairs,
    seq_len,
    NGRAM: tl.constexpr,
    HEADS_PER_ORDER: tl.constexpr,
    NUM_HEADS: tl.constexpr,
    DIM: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
    WRITE_ROWS: tl.constexpr,
):
    # One program copies BLOCK_P (token, head) rows. `ids` is [B, N-1+T] int64: the context columns first.
    pairs = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = pairs < num_pairs
    token = pairs // NUM_HEADS
    head = pairs % NUM_HEADS
    batch = token // seq_len
    position = token % seq_len
    order = head // HEADS_PER_ORDER + 2
    base = ids_ptr + batch * ids_stride + position + (NGRAM - 1)
    # One layer here: every lane reads the same multipliers (a block of equal pointers, as the helper masks them).
    mix = _ngram_mix(base, mult_ptr + tl.zeros_like(head), pmask, order, NGRAM)
    modulus = tl.load(mod_ptr + head, mask=pmask, other=1)
    row = mix % modulus + tl.load(off_ptr + head, mask=pmask, other=0)
    if WRITE_ROWS:
        tl.store(rows_ptr + pairs, row, mask=pmask)
    cols = tl.arange(0, BLOCK_D)
    mask = pmask[:, None] & (cols < DIM)[None, :]
    values = tl.load(table_ptr + row[:, None] * DIM + cols[None, :], mask=mask)
    tl.store(out_ptr + pairs[:, None] * DIM + cols[None, :], values.to(out_ptr.dtype.element_ty), mask=mask)


def _hash_kernel(
    ids_ptr,
    ids_stride,
    mult_ptr,
    mod_ptr,
    out_ptr,
    num_items,
    seq_len,
    NGRAM: tl.constexpr,
    HEADS_PER_ORDER: tl.constexpr,
    NUM_HEADS: tl.constexpr,
    NUM_LAYERS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Items are (token, layer, head) in the layout of `hash_ngrams`' output [B, T, L, H].
    items = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = items < num_items
    head = items % NUM_HEADS
    layer = (items // NUM_HEADS) % NUM_LAYERS
    token = items // (NUM_HEADS * NUM_LAYERS)
    batch = token // seq_len
    position = token % seq_len
    order = head // HEADS_PER_ORDER + 2
    base = ids_ptr + batch * ids_stride + position + (NGRAM - 1)
    mix = _ngram_mix(base, mult_ptr + layer * NGRAM, mask, order, NGRAM)
    modulus = tl.load(mod_ptr + layer * NUM_HEADS + head, mask=mask, other=1)
    tl.store(out_ptr + items, mix % modulus, mask=mask)


def _gate_kernel(
    key_ptr,
    query_ptr,
    value_ptr,
    wk_ptr,
    wq_ptr,
    wc_ptr,
    gate_ptr,
    u_ptr,
    normed_ptr,
    hidden,
    eps_k,
    eps_q,
    eps_c,
    inv_sqrt_d,
    HC: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_CONV: tl.constexpr,
):
    # One program per token: all HC branches share the token's value vector.
    token = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    cmask = cols < hidden
    value = tl.load(value_ptr + token * hidden + cols, mask=cmask, other=0.0).to(tl.float32)
    value_ms = tl.sum(value * value, axis=0) / hidden
    for branch in tl.static_range(HC):
        offset = (token * HC + branch) * hidden
        key = tl.load(key_ptr + offset + cols, mask=cmask, other=0.0).to(tl.float32)
        query = tl.load(query_ptr + offset + cols, mask=cmask, other=0.0).to(tl.float32)
        wk = tl.load(wk_ptr + branch * hidden + cols, mask=cmask, other=0.0).to(tl.float32)
        wq = tl.load(wq_ptr + branch * hidden + cols, mask=cmask, other=0.0).to(tl.float32)
        key = key * (1.0 / tl.sqrt(tl.sum(key * key, axis=0) / hidden + eps_k)) * wk
        query = query * (1.0 / tl.sqrt(tl.sum(query * query, axis=0) / hidden + eps_q)) * wq
        score = tl.sum(key * query, axis=0) * inv_sqrt_d
        root = tl.sqrt(tl.maximum(tl.abs(score), 1e-6))
        score = tl.where(score > 0, root, tl.where(score < 0, -root, 0.0))
        gate = 1.0 / (1.0 + tl.exp(-score))
        tl.store(gate_ptr + token * HC + branch, gate.to(gate_ptr.dtype.element_ty))
        u = gate * value
        tl.store(u_ptr + offset + cols, u.to(u_ptr.dtype.element_ty), mask=cmask)
        if HAS_CONV:
            # RMS of u = |gate| * RMS of v: no second pass over u.
            wc = tl.load(wc_ptr + branch * hidden + cols, mask=cmask, other=0.0).to(tl.float32)
            normed = u * (1.0 / tl.sqrt(gate * gate * value_ms + eps_c)) * wc
            tl.store(normed_ptr + offset + cols, normed.to(normed_ptr.dtype.element_ty), mask=cmask)


def _gate_backward_kernel(
    key_ptr,
    query_ptr,
    value_ptr,
    wk_ptr,
    wq_ptr,
    wc_ptr,
    dgate_ptr,
    du_ptr,
    dnormed_ptr,
    dkey_ptr,
    dquery_ptr,
    dvalue_ptr,
    dweight_ptr,
    tokens,
    hidden,
    eps_k,
    eps_q,
    eps_c,
    inv_sqrt_d,
    HC: tl.constexpr,
    HC_BLOCK: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_T: tl.constexpr,
    HAS_CONV: tl.constexpr,
    HAS_DGATE: tl.constexpr,
    HAS_DU: tl.constexpr,
    HAS_DNORMED: tl.constexpr,
):
    # The gate's backward for BLOCK_T tokens. Only the inputs were saved: the forward is recomputed here, then
    # differentiated op by op in the order of `engram_gate_torch` (the chain rule of each op is noted). A token's
    # HC branches form one [HC_BLOCK, BLOCK] tile, so the value's gradient (a sum over branches) stays in
    # registers, and the three norm weights' gradients are summed over this program's tokens into one partial
    # row each (`dweight` [3, programs, HC, hidden], summed by the caller): no atomics, deterministic.
    pid = tl.program_id(0)
    rows = tl.arange(0, HC_BLOCK)
    cols = tl.arange(0, BLOCK)
    tile_mask = (rows < HC)[:, None] & (cols < hidden)[None, :]
    tile = rows[:, None] * hidden + cols[None, :]
    wk = tl.load(wk_ptr + tile, mask=tile_mask, other=0.0).to(tl.float32)
    wq = tl.load(wq_ptr + tile, mask=tile_mask, other=0.0).to(tl.float32)
    if HAS_CONV:
        wc = tl.load(wc_ptr + tile, mask=tile_mask, other=0.0).to(tl.float32)
    acc_k = tl.zeros([HC_BLOCK, BLOCK], dtype=tl.float32)
    acc_q = tl.zeros([HC_BLOCK, BLOCK], dtype=tl.float32)
    acc_c = tl.zeros([HC_BLOCK, BLOCK], dtype=tl.float32)
    for i in range(BLOCK_T):
        token = pid.to(tl.int64) * BLOCK_T + i
        # Masks compare blocks, not the scalar `token < tokens` (Triton 3.9's interpreter rejects scalar masks).
        row_live = (rows < HC) & (token + tl.zeros([HC_BLOCK], dtype=tl.int64) < tokens)
        vmask = (cols < hidden) & (token + tl.zeros([BLOCK], dtype=tl.int64) < tokens)
        mask = row_live[:, None] & (cols < hidden)[None, :]
        offset = token * HC * hidden + tile
        # Forward, recomputed (masked lanes and tokens past the end are zeros and contribute zeros).
        key = tl.load(key_ptr + offset, mask=mask, other=0.0).to(tl.float32)
        query = tl.load(query_ptr + offset, mask=mask, other=0.0).to(tl.float32)
        value = tl.load(value_ptr + token * hidden + cols, mask=vmask, other=0.0).to(tl.float32)[None, :]
        rk = 1.0 / tl.sqrt(tl.sum(key * key, axis=1) / hidden + eps_k)
        rq = 1.0 / tl.sqrt(tl.sum(query * query, axis=1) / hidden + eps_q)
        key_hat = key * rk[:, None]
        query_hat = query * rq[:, None]
        key_n = key_hat * wk
        query_n = query_hat * wq
        score = tl.sum(key_n * query_n, axis=1) * inv_sqrt_d
        sign = tl.where(score > 0, 1.0, tl.where(score < 0, -1.0, 0.0))
        magnitude = tl.abs(score)
        root = tl.sqrt(tl.maximum(magnitude, 1e-6))
        gate = 1.0 / (1.0 + tl.exp(-(sign * root)))
        u = gate[:, None] * value
        # u's gradient: its own, plus the conv RMSNorm's (y = x r w: dx = r a - x_hat r mean(a x_hat), a = dy w).
        if HAS_DU:
            du = tl.load(du_ptr + offset, mask=mask, other=0.0).to(tl.float32)
        else:
            du = tl.zeros([HC_BLOCK, BLOCK], dtype=tl.float32)
        if HAS_CONV and HAS_DNORMED:
            dnormed = tl.load(dnormed_ptr + offset, mask=mask, other=0.0).to(tl.float32)
            ru = 1.0 / tl.sqrt(tl.sum(u * u, axis=1) / hidden + eps_c)
            u_hat = u * ru[:, None]
            a = dnormed * wc
            du += ru[:, None] * a - u_hat * (ru * tl.sum(a * u_hat, axis=1) / hidden)[:, None]
            acc_c += dnormed * u_hat
        # u = gate * value; gate = sigmoid(t); t = sign(s) sqrt(max(|s|, floor)) (no gradient below the floor).
        dvalue = tl.sum(gate[:, None] * du, axis=0)
        tl.store(dvalue_ptr + token * hidden + cols, dvalue.to(dvalue_ptr.dtype.element_ty), mask=vmask)
        dgate = tl.sum(du * value, axis=1)
        if HAS_DGATE:
            dgate += tl.load(dgate_ptr + token * HC + rows, mask=row_live, other=0.0).to(tl.float32)
        dt = dgate * gate * (1.0 - gate)
        dscore = tl.where(magnitude >= 1e-6, dt * sign * sign * 0.5 / root, 0.0) * inv_sqrt_d
        # score = sum(key_n * query_n) / sqrt(d), then both RMSNorms.
        a_k = dscore[:, None] * query_n * wk
        a_q = dscore[:, None] * key_n * wq
        acc_k += dscore[:, None] * query_n * key_hat
        acc_q += dscore[:, None] * key_n * query_hat
        dkey = rk[:, None] * a_k - key_hat * (rk * tl.sum(a_k * key_hat, axis=1) / hidden)[:, None]
        dquery = rq[:, None] * a_q - query_hat * (rq * tl.sum(a_q * query_hat, axis=1) / hidden)[:, None]
        tl.store(dkey_ptr + offset, dkey.to(dkey_ptr.dtype.element_ty), mask=mask)
        tl.store(dquery_ptr + offset, dquery.to(dquery_ptr.dtype.element_ty), mask=mask)
    programs = tl.num_programs(0)
    part = dweight_ptr + pid.to(tl.int64) * HC * hidden + tile
    tl.store(part, acc_k, mask=tile_mask)
    tl.store(part + programs * HC * hidden, acc_q, mask=tile_mask)
    tl.store(part + 2 * programs * HC * hidden, acc_c, mask=tile_mask)


def _conv_residual_kernel(
    hidden_ptr,
    u_ptr,
    normed_ptr,
    mask_ptr,
    mask_stride,
    history_ptr,
    history_stride_b,
    history_stride_c,
    history_stride_t,
    history_len,
    weight_ptr,
    out_ptr,
    seq_len,
    channels,
    KERNEL: tl.constexpr,
    DILATION: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_HISTORY: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # out = hidden + u + SiLU(causal dilated depthwise conv of the (masked) normed frames), one token and channel
    # block per program. Frames before position 0 come from the cache's history (already masked), else zeros.
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < channels
    batch = token // seq_len
    position = token % seq_len
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for k in tl.static_range(KERNEL):
        source = position - (KERNEL - 1 - k) * DILATION
        # Masks compare a block, not a scalar: Triton 3.9's interpreter broadcasts a scalar boolean into int32
        # data and then rejects the mask.
        sources = source + tl.zeros((BLOCK_C,), dtype=tl.int64)
        x = tl.load(
            normed_ptr + (token - position + source) * channels + cols, mask=cmask & (sources >= 0), other=0.0
        )
        x = x.to(tl.float32)
        if HAS_MASK:
            keep = tl.load(mask_ptr + batch * mask_stride + source, mask=source >= 0, other=0).to(tl.float32)
            x = x * keep
        if HAS_HISTORY:
            past = history_len + sources
            h = tl.load(
                history_ptr + batch * history_stride_b + cols * history_stride_c + past * history_stride_t,
                mask=cmask & (sources < 0) & (past >= 0),
                other=0.0,
            )
            x = x + h.to(tl.float32)
        acc += x * tl.load(weight_ptr + cols * KERNEL + k, mask=cmask, other=0.0).to(tl.float32)
    y = acc / (1.0 + tl.exp(-acc))
    offset = token * channels + cols
    out = tl.load(hidden_ptr + offset, mask=cmask, other=0.0).to(tl.float32)
    out += tl.load(u_ptr + offset, mask=cmask, other=0.0).to(tl.float32) + y
    tl.store(out_ptr + offset, out.to(out_ptr.dtype.element_ty), mask=cmask)


# ---------------------------------------------------------------------------------------------- hashing


def engram_hash(
    ids_with_history: torch.Tensor, multipliers: torch.Tensor, moduli: torch.Tensor, max_ngram_size: int
):
    """`hash_ngrams` in one Triton launch: `[B, N-1+T]` int64 ids -> `[B, T, L, (N-1)*K]` int64 (bit-exact)."""
    ids = ids_with_history.long().contiguous()
    batch, width = ids.shape
    seq_len = width - (max_ngram_size - 1)
    num_layers, num_heads = moduli.shape
    out = torch.empty(batch, seq_len, num_layers, num_heads, dtype=torch.long, device=ids.device)
    num_items = out.numel()
    if num_items == 0:
        return out
    block = 1024
    _jit(_hash_kernel)[(-(-num_items // block),)](
        ids,
        ids.stride(0),
        multipliers.contiguous(),
        moduli.contiguous(),
        out,
        num_items,
        seq_len,
        NGRAM=max_ngram_size,
        HEADS_PER_ORDER=num_heads // (max_ngram_size - 1),
        NUM_HEADS=num_heads,
        NUM_LAYERS=num_layers,
        BLOCK=block,
    )
    return out


# ---------------------------------------------------------------------------------------------- hash + gather


def hash_gather_rows_torch(
    ids_with_history: torch.Tensor, multipliers: torch.Tensor, moduli: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """Table rows `[B, T, H]` of one layer (hash + offsets) in plain PyTorch, the reference's arithmetic."""
    from .modeling_engram import hash_ngrams  # noqa: PLC0415 - import cycle: modeling imports this module

    max_ngram_size = multipliers.shape[-1]
    rows = hash_ngrams(ids_with_history.long(), multipliers.view(1, -1), moduli.view(1, -1), max_ngram_size)
    return rows[:, :, 0] + offsets


# Launch shape of the gather: ~`block_elems` table elements per program, `num_warps` warps. Many small programs
# keep the most row reads in flight: bench/bench_engram.py's sweep on an H100 (CUDA-graph GPU time, 8 x 4096
# tokens, 160-byte rows) ranks 2048 elements / 4 warps first and slows down steadily with larger programs.
GATHER_LAUNCH = {"block_elems": 2048, "num_warps": 4}


def _launch_hash_gather(ids, multipliers, moduli, offsets, table, out_dtype, write_rows):
    ids = ids.long().contiguous()
    batch, width = ids.shape
    ngram = multipliers.numel()
    seq_len = width - (ngram - 1)
    num_heads = moduli.numel()
    dim = table.shape[1]
    out = torch.empty(batch, seq_len, num_heads * dim, dtype=out_dtype, device=ids.device)
    rows = torch.empty(batch, seq_len, num_heads, dtype=torch.long, device=ids.device) if write_rows else out
    num_pairs = batch * seq_len * num_heads
    if num_pairs == 0:
        return out, rows
    block_d = _next_pow2(dim)
    block_p = max(1, min(512, GATHER_LAUNCH["block_elems"] // block_d))
    _jit(_hash_gather_kernel)[(-(-num_pairs // block_p),)](
        ids,
        ids.stride(0),
        multipliers.contiguous(),
        moduli.contiguous(),
        offsets.contiguous(),
        table,
        out,
        rows,
        num_pairs,
        seq_len,
        NGRAM=ngram,
        HEADS_PER_ORDER=num_heads // (ngram - 1),
        NUM_HEADS=num_heads,
        DIM=dim,
        BLOCK_P=block_p,
        BLOCK_D=block_d,
        WRITE_ROWS=write_rows,
        num_warps=GATHER_LAUNCH["num_warps"],
    )
    return out, rows


class _HashGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, multipliers, moduli, offsets, weight, source, out_dtype):
        needs_rows = ctx.needs_input_grad[4]
        out, rows = _launch_hash_gather(ids, multipliers, moduli, offsets, source, out_dtype, needs_rows)
        if needs_rows:
            ctx.save_for_backward(rows)
            ctx.num_rows = weight.shape[0]
            ctx.weight_dtype = weight.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (rows,) = ctx.saved_tensors
        dim = grad_out.shape[-1] // rows.shape[-1]
        # nn.Embedding's own backward (sorted segment sums, accumulated in float32 for half types).
        grad_weight = torch.ops.aten.embedding_dense_backward(
            grad_out.reshape(-1, dim), rows.reshape(-1), ctx.num_rows, -1, False
        )
        return None, None, None, None, grad_weight.to(ctx.weight_dtype), None, None


def hash_gather(
    ids_with_history: torch.Tensor,
    multipliers: torch.Tensor,
    moduli: torch.Tensor,
    offsets: torch.Tensor,
    weight: torch.Tensor,
    source: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    use_triton: bool = True,
) -> torch.Tensor:
    """Memory vectors `e_t` `[B, T, H*D]` of one Engram layer straight from the ids with their context.

    Args:
        ids_with_history: `[B, N-1+T]` compressed ids, the first N-1 columns the context before position 0.
        multipliers: `[N]` int64 multipliers of this layer; `moduli`, `offsets`: `[H]` int64 primes and row offsets.
        weight: the table `[rows, D]` (the parameter gradients flow to).
        source: the tensor the rows are read from, on the ids' device: `weight` itself, or a CUDA view of a
            pinned host `weight` (UVA; the rows then travel over PCIe). Defaults to `weight`.
        out_dtype: dtype of `e_t` (the activations' dtype; rows are cast while copied). Defaults to the table's.
    """
    source = weight if source is None else source
    out_dtype = out_dtype or weight.dtype
    if source is not weight and weight.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            "Gradients cannot flow into a host-resident Engram table (a dense gradient of the whole table would be "
            "built on the GPU); keep the table on the device to train it, or freeze it (requires_grad_(False))."
        )
    if use_triton:
        if torch.is_grad_enabled() and weight.requires_grad:
            return _HashGather.apply(
                ids_with_history, multipliers, moduli, offsets, weight, source, out_dtype
            )
        return _launch_hash_gather(ids_with_history, multipliers, moduli, offsets, source, out_dtype, False)[
            0
        ]
    rows = hash_gather_rows_torch(ids_with_history, multipliers, moduli, offsets)
    return torch.nn.functional.embedding(rows, source).flatten(-2).to(out_dtype)


# ---------------------------------------------------------------------------------------------- gate


def engram_gate_torch(
    key: torch.Tensor,
    query: torch.Tensor,
    value: torch.Tensor,
    key_weight: torch.Tensor,
    query_weight: torch.Tensor,
    conv_weight: torch.Tensor | None,
    eps_k: float,
    eps_q: float,
    eps_c: float,
):
    """The gate of `EngramLayer` with float32 (or wider) intermediates; differentiable, `torch.compile`-friendly.

    Args: `key` `[..., hc, d]` (key_proj output), `query` `[..., hc, d]` (the residual streams), `value` `[..., d]`
    (value_proj output), per-branch RMSNorm weights `[hc, d]`. Returns `gate [..., hc]`, `u = gate * value`
    `[..., hc, d]` and `conv_norm(u)` (or None without a conv weight), all in `query`'s dtype.
    """
    dtype = query.dtype
    compute = torch.promote_types(dtype, torch.float32)
    key, query, value = key.to(compute), query.to(compute), value.to(compute)
    key = key * torch.rsqrt(key.pow(2).mean(-1, keepdim=True) + eps_k) * key_weight.to(compute)
    query = query * torch.rsqrt(query.pow(2).mean(-1, keepdim=True) + eps_q) * query_weight.to(compute)
    score = (key * query).sum(-1, keepdim=True) / math.sqrt(query.shape[-1])
    score = score.sign() * score.abs().clamp_min(GATE_SQRT_FLOOR).sqrt()
    gate = torch.sigmoid(score)
    u = gate * value.unsqueeze(-2)
    normed = None
    if conv_weight is not None:
        normed = (u * torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + eps_c) * conv_weight.to(compute)).to(
            dtype
        )
    return gate.squeeze(-1).to(dtype), u.to(dtype), normed


def _gate_operands(key, query, value, key_weight, query_weight, conv_weight, eps_k, eps_q, eps_c):
    """The gate kernels' common operands: `key`, `query` `[tokens, hc, d]`, `value` `[tokens, d]` and the three
    norm weights, contiguous (the conv's weight stands in as a never-read placeholder without a conv), and the
    scalars `(d, eps_k, eps_q, eps_c, 1/sqrt(d))`."""
    hc, hidden = query.shape[-2], query.shape[-1]
    tensors = (
        key.reshape(-1, hc, hidden).contiguous(),
        query.reshape(-1, hc, hidden).contiguous(),
        value.reshape(-1, hidden).contiguous(),
        key_weight.contiguous(),
        query_weight.contiguous(),
        (conv_weight if conv_weight is not None else key_weight).contiguous(),
    )
    return tensors, (hidden, float(eps_k), float(eps_q), float(eps_c), 1.0 / math.sqrt(hidden))


def engram_gate_triton(key, query, value, key_weight, query_weight, conv_weight, eps_k, eps_q, eps_c):
    """`engram_gate_torch` in one Triton launch (no autograd: inference only)."""
    hc, hidden = query.shape[-2], query.shape[-1]
    lead = query.shape[:-2]
    tensors, scalars = _gate_operands(
        key, query, value, key_weight, query_weight, conv_weight, eps_k, eps_q, eps_c
    )
    query = tensors[1]
    tokens = query.shape[0]
    gate = torch.empty(tokens, hc, dtype=query.dtype, device=query.device)
    u = torch.empty_like(query)
    has_conv = conv_weight is not None
    normed = torch.empty_like(query) if has_conv else u
    if tokens:
        block = _next_pow2(hidden)
        _jit(_gate_kernel)[(tokens,)](
            *tensors,
            gate,
            u,
            normed,
            *scalars,
            HC=hc,
            BLOCK=block,
            HAS_CONV=has_conv,
            num_warps=max(1, min(16, block // 256)),
        )
    gate = gate.view(*lead, hc)
    u = u.view(*lead, hc, hidden)
    return gate, u, normed.view(*lead, hc, hidden) if has_conv else None


# The gate's backward runs at most this many programs, each over a run of tokens, each summing the norm weights'
# gradients over its tokens into one partial row: the partial buffer stays small, and there are still enough
# programs to fill every SM.
GATE_BACKWARD_MAX_PROGRAMS = 1024


def engram_gate_backward_triton(saved, grads, eps_k, eps_q, eps_c, needs_input_grad):
    """Gradients of `engram_gate_torch` from its inputs (`saved`: key, query, value and the three norm weights,
    the conv weight may be None) and its outputs' gradients (`grads`: gate, u, normed; None where unused)."""
    key, query, value, key_weight, query_weight, conv_weight = saved
    grad_gate, grad_u, grad_normed = grads
    hc, hidden = query.shape[-2], query.shape[-1]
    tensors, scalars = _gate_operands(
        key, query, value, key_weight, query_weight, conv_weight, eps_k, eps_q, eps_c
    )
    key3, query3, value2 = tensors[:3]
    tokens = query3.shape[0]
    has_conv = conv_weight is not None
    dkey = torch.empty_like(key3)
    dquery = torch.empty_like(query3)
    dvalue = torch.empty_like(value2)
    block_t = max(1, -(-tokens // GATE_BACKWARD_MAX_PROGRAMS))
    programs = max(1, -(-tokens // block_t))
    dweight = torch.zeros(3, programs, hc, hidden, dtype=torch.float32, device=query.device)
    if tokens:
        block = _next_pow2(hidden)
        hc_block = _next_pow2(hc)

        def flat(grad, shape):
            return grad.reshape(shape).contiguous() if grad is not None else key3

        _jit(_gate_backward_kernel)[(programs,)](
            *tensors,
            flat(grad_gate, (-1, hc)),
            flat(grad_u, (-1, hc, hidden)),
            flat(grad_normed, (-1, hc, hidden)),
            dkey,
            dquery,
            dvalue,
            dweight,
            tokens,
            *scalars,
            HC=hc,
            HC_BLOCK=hc_block,
            BLOCK=block,
            BLOCK_T=block_t,
            HAS_CONV=has_conv,
            HAS_DGATE=grad_gate is not None,
            HAS_DU=grad_u is not None,
            HAS_DNORMED=grad_normed is not None,
            num_warps=max(4, min(16, hc_block * block // 512)),
        )
    dweight = dweight.sum(1)
    weights = (key_weight, query_weight, conv_weight)
    dweights = [
        dweight[i].to(w.dtype) if w is not None and needs else None
        for i, (w, needs) in enumerate(zip(weights, needs_input_grad[3:6], strict=True))
    ]
    return (
        dkey.view(key.shape) if needs_input_grad[0] else None,
        dquery.view(query.shape) if needs_input_grad[1] else None,
        dvalue.view(value.shape) if needs_input_grad[2] else None,
        *dweights,
    )


class _EngramGate(torch.autograd.Function):
    """The Triton gate with a Triton backward (training): two launches per layer and step where the PyTorch twin
    under autograd takes ~70, and only the inputs are saved (the backward recomputes the rest)."""

    @staticmethod
    def forward(ctx, key, query, value, key_weight, query_weight, conv_weight, eps_k, eps_q, eps_c):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(key, query, value, key_weight, query_weight, conv_weight)
        ctx.eps = (eps_k, eps_q, eps_c)
        return engram_gate_triton(
            key, query, value, key_weight, query_weight, conv_weight, eps_k, eps_q, eps_c
        )

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_gate, grad_u, grad_normed):
        grads = engram_gate_backward_triton(
            ctx.saved_tensors, (grad_gate, grad_u, grad_normed), *ctx.eps, ctx.needs_input_grad
        )
        return (*grads, None, None, None)


def engram_gate(key, query, value, key_weight, query_weight, conv_weight, eps_k, eps_q, eps_c, use_triton):
    """The Triton gate (with its Triton backward when a gradient is needed); the PyTorch twin without Triton."""
    args = (key, query, value, key_weight, query_weight, conv_weight, eps_k, eps_q, eps_c)
    if not use_triton:
        return engram_gate_torch(*args)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (key, query, value, key_weight, query_weight, conv_weight)
    )
    return _EngramGate.apply(*args) if needs_grad else engram_gate_triton(*args)


def conv_residual_triton(layer, hidden_states, u, normed, attention_mask, cache):
    """`hidden + u + layer._short_conv(normed, mask, cache)` in one Triton launch (inference only).

    The cache's conv state is read first and then updated through the cache's own `update_conv_state` (with the
    same masked frames the reference stores), so beam reordering, cropping and `record_past` behave the same.
    """
    from .modeling_engram import CONV_STATE  # noqa: PLC0415 - import cycle

    batch, length = hidden_states.shape[:2]
    channels = layer.num_branches * layer.hidden_size
    hidden_states, u, normed = hidden_states.contiguous(), u.contiguous(), normed.contiguous()
    mask = None
    if attention_mask is not None:
        mask = attention_mask[:, -length:]
        mask = mask.to(torch.int32) if mask.dtype == torch.bool else mask
        mask = mask if mask.stride(-1) == 1 else mask.contiguous()
    history = cache.get_conv_state(layer.layer_idx, CONV_STATE) if cache is not None else None
    out = torch.empty_like(hidden_states)
    weight = layer.conv.weight.reshape(channels, -1).contiguous()
    block = min(1024, _next_pow2(channels))
    _jit(_conv_residual_kernel)[(batch * length, -(-channels // block))](
        hidden_states,
        u,
        normed,
        mask if mask is not None else normed,
        mask.stride(0) if mask is not None else 0,
        history if history is not None else normed,
        history.stride(0) if history is not None else 0,
        history.stride(1) if history is not None else 0,
        history.stride(2) if history is not None else 0,
        history.shape[-1] if history is not None else 0,
        weight,
        out,
        length,
        channels,
        KERNEL=weight.shape[1],
        DILATION=layer.conv.dilation[0],
        HAS_MASK=mask is not None,
        HAS_HISTORY=history is not None,
        BLOCK_C=block,
        num_warps=4,
    )
    if cache is not None:
        # Launched after the kernel on the same stream: the kernel reads the old state before this overwrites it.
        frames = normed.flatten(-2).transpose(1, 2)
        if mask is not None:
            frames = frames * mask[:, None, :].to(frames.dtype)
        cache.update_conv_state(
            frames, layer.layer_idx, state_idx=CONV_STATE, conv_kernel_size=layer.conv_state_len
        )
    return out


def engram_layer_forward(layer, hidden_states, memory, attention_mask, cache, use_triton):
    """`EngramLayer.forward` after the lookup, through the fused gate: `(hidden + Y, gates)`."""
    dtype = hidden_states.dtype
    memory = memory.to(dtype)
    key = layer.key_proj(memory).unflatten(-1, (layer.num_branches, layer.hidden_size))
    value = layer.value_proj(memory)

    def eps(norm):
        return torch.finfo(dtype).eps if norm.eps is None else norm.eps

    has_conv = layer.conv is not None
    gate, u, normed = engram_gate(
        key,
        hidden_states,
        value,
        layer.key_norm.weight,
        layer.query_norm.weight,
        layer.conv_norm.weight if has_conv else None,
        eps(layer.key_norm),
        eps(layer.query_norm),
        eps(layer.conv_norm) if has_conv else 0.0,
        use_triton,
    )
    if not has_conv:
        return hidden_states + u, gate
    needs_grad = torch.is_grad_enabled() and (
        u.requires_grad or hidden_states.requires_grad or layer.conv.weight.requires_grad
    )
    if use_triton and not needs_grad:
        return conv_residual_triton(layer, hidden_states, u, normed, attention_mask, cache), gate
    return hidden_states + (u + layer._short_conv(normed, attention_mask, cache)), gate


__all__ = [
    "KERNEL_MODES",
    "conv_residual_triton",
    "engram_gate",
    "engram_gate_backward_triton",
    "engram_gate_torch",
    "engram_gate_triton",
    "engram_hash",
    "engram_layer_forward",
    "hash_gather",
    "hash_gather_rows_torch",
    "resolve_kernel_mode",
    "triton_runs_on",
]
