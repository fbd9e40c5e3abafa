"""Row-sharded Engram tables: each rank holds a contiguous slice of every table and serves it by All-to-All.

The paper shards the Engram tables across GPUs and gathers the active rows with an All-to-All; the tables are
the bulk of the parameters and are never replicated. `shard_engram_tables(model)` replaces each
`EngramLayer.embedding` (an `nn.Embedding`) by a `ShardedEmbedding` that keeps only the local rows. The rest
of the model stays replicated (data-parallel through DDP), and its parameters are listed in
`sharded_parameter_names(model)` so that DDP leaves the tables alone (`ignore_sharded_parameters_in_ddp`).

One lookup on rank r, for the hash rows of r's own micro-batch:

1. deduplicate the requested rows (`unique` sorts them, which also groups them by owner rank);
2. exchange the request counts, then the row ids (All-to-All #1);
3. each owner gathers the rows asked of it and sends them back (All-to-All #2);
4. scatter the unique rows back to the request positions.

Backward runs the same exchange in reverse: the gradient of each unique row goes back to its owner, which
adds it into its local shard. A shard therefore receives the gradient of *every* rank's loss, summed, while
DDP averages the replicated parameters' gradients over ranks; the table gradient is divided by the world
size so that both follow `mean over ranks`, i.e. the gradient of the single-process loss on the global batch.

Rows are split like `torch.chunk`: rank r owns rows `[r * c, min((r + 1) * c, rows))` with
`c = ceil(rows / world_size)` (the last rank may own fewer, or none), so a sharded checkpoint can be
re-cut for another world size by row ranges alone.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from ..modeling_engram import EngramLayer


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def shard_range(num_rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows `[start, stop)` of a `num_rows` table that `rank` owns (torch.chunk split; may be empty)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is outside [0, world_size={world_size}).")
    chunk = math.ceil(num_rows / world_size)
    start = min(rank * chunk, num_rows)
    return start, min(start + chunk, num_rows)


def _all_to_all(tensor: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
    out = tensor.new_empty((sum(recv_splits), *tensor.shape[1:]))
    dist.all_to_all_single(
        out, tensor.contiguous(), output_split_sizes=recv_splits, input_split_sizes=send_splits, group=group
    )
    return out


class _ShardedLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, indices, chunk, rank, world_size, group):
        flat = indices.reshape(-1)
        unique, inverse = torch.unique(flat, sorted=True, return_inverse=True)
        owners = torch.div(unique, chunk, rounding_mode="floor")
        send_counts = torch.bincount(owners, minlength=world_size)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=group)
        send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()
        requested = _all_to_all(unique, send_splits, recv_splits, group)
        local = requested - rank * chunk
        rows = _all_to_all(weight[local], recv_splits, send_splits, group)
        ctx.save_for_backward(inverse, local)
        ctx.splits = (send_splits, recv_splits)
        ctx.num_unique = unique.numel()
        ctx.weight_shape = weight.shape
        ctx.world_size, ctx.group = world_size, group
        return rows[inverse].view(*indices.shape, weight.shape[1])

    @staticmethod
    def backward(ctx, grad_output):
        inverse, local = ctx.saved_tensors
        send_splits, recv_splits = ctx.splits
        grad_output = grad_output.reshape(-1, grad_output.shape[-1])
        grad_unique = grad_output.new_zeros(ctx.num_unique, grad_output.shape[1])
        grad_unique.index_add_(0, inverse, grad_output)
        received = _all_to_all(grad_unique, send_splits, recv_splits, ctx.group)
        grad_weight = received.new_zeros(ctx.weight_shape)
        grad_weight.index_add_(0, local, received)
        # Each shard sums the gradients of all ranks' losses; DDP averages the replicated ones.
        return grad_weight / ctx.world_size, None, None, None, None, None


class ShardedEmbedding(nn.Module):
    """The local rows of one Engram table, looked up across ranks with two All-to-Alls.

    `forward(indices)` takes *global* row ids of any shape (the caller's local micro-batch) and returns
    `[*indices.shape, embedding_dim]`, equal to `nn.Embedding(num_embeddings, dim)(indices)` on the full
    table. Every rank must call it the same number of times in the same order (it is a collective). With
    one process (or no process group) it is a plain local lookup.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        rank: int = 0,
        world_size: int = 1,
        group=None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.rank, self.world_size, self.group = rank, world_size, group
        self.chunk = math.ceil(num_embeddings / world_size)
        self.row_start, self.row_stop = shard_range(num_embeddings, rank, world_size)
        self.weight = nn.Parameter(
            torch.empty(self.row_stop - self.row_start, embedding_dim, device=device, dtype=dtype)
        )

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, rank: int, world_size: int, group=None):
        """Keep `rank`'s rows of a full `nn.Embedding` (a copy, so the full table can be freed)."""
        full = embedding.weight
        sharded = cls(
            full.shape[0], full.shape[1], rank, world_size, group, device=full.device, dtype=full.dtype
        )
        with torch.no_grad():
            sharded.weight.copy_(full[sharded.row_start : sharded.row_stop])
        sharded.weight.requires_grad_(full.requires_grad)
        return sharded

    def reader(self, device) -> torch.Tensor | None:
        """The tensor the fused hash+gather kernels may read rows from (the `EngramTable` protocol).

        Those kernels index a full table by global row; a shard must go through `forward` (the All-to-All),
        which the reference path calls, so only a one-process "shard" (the whole table) is handed out.
        """
        device = torch.device(device)
        weight = self.weight
        same = weight.device == device or (weight.device.type == device.type and device.index is None)
        return weight if self.world_size == 1 and same else None

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return nn.functional.embedding(indices, self.weight)
        return _ShardedLookup.apply(self.weight, indices, self.chunk, self.rank, self.world_size, self.group)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, rows=[{self.row_start}, {self.row_stop}), "
            f"rank={self.rank}/{self.world_size}"
        )


def _world(group=None) -> tuple[int, int]:
    if _dist_ready():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def shard_engram_tables(model: nn.Module, group=None) -> dict[str, ShardedEmbedding]:
    """Replace every Engram table of `model` by this rank's `ShardedEmbedding` (in place).

    Call it on every rank, on identical models (same seed or same checkpoint), before wrapping the model in
    DDP and before building the optimizer. Returns `{parameter name: sharded module}`.
    """
    rank, world_size = _world(group)
    sharded = {}
    for name, module in model.named_modules():
        if isinstance(module, EngramLayer) and isinstance(module.embedding, nn.Embedding):
            module.embedding = ShardedEmbedding.from_embedding(module.embedding, rank, world_size, group)
            sharded[f"{name}.embedding.weight" if name else "embedding.weight"] = module.embedding
    return sharded


def sharded_modules(model: nn.Module) -> dict[str, ShardedEmbedding]:
    """`{parameter name: ShardedEmbedding}` for every sharded table in `model` (DDP/PEFT prefixes kept)."""
    return {
        f"{name}.weight" if name else "weight": module
        for name, module in model.named_modules()
        if isinstance(module, ShardedEmbedding)
    }


def sharded_parameter_names(model: nn.Module) -> list[str]:
    return list(sharded_modules(model))


def ignore_sharded_parameters_in_ddp(model: nn.Module) -> None:
    """Tell DDP (built later, e.g. by `accelerator.prepare`) not to broadcast or all-reduce the shards."""
    from torch.nn.parallel import DistributedDataParallel

    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sharded_parameter_names(model))


def _squared_norm(grads: list[torch.Tensor], device) -> torch.Tensor:
    if not grads:
        return torch.zeros((), device=device, dtype=torch.float32)
    norms = torch._foreach_norm(grads, 2.0)  # one fused kernel per dtype/device, not one per tensor
    return torch.stack([n.float() for n in norms]).pow(2).sum()


def clip_grad_norm_(model: nn.Module, max_norm: float, group=None) -> torch.Tensor:
    """Clip by the global gradient norm of the whole (logical, unsharded) model; returns the norm.

    The replicated gradients are identical on every rank (after DDP's all-reduce); each shard's gradient is
    only on its owner, so its squared norm is summed over ranks before adding.
    """
    shard_ids = {id(m.weight) for m in sharded_modules(model).values()}
    replicated, shards = [], []
    for param in model.parameters():
        if param.grad is not None:
            (shards if id(param) in shard_ids else replicated).append(param.grad)
    device = (replicated or shards)[0].device if (replicated or shards) else torch.device("cpu")
    shard_sq = _squared_norm(shards, device)
    if _dist_ready() and dist.get_world_size(group) > 1:
        dist.all_reduce(shard_sq, group=group)
    total = (_squared_norm(replicated, device) + shard_sq).sqrt()
    if max_norm and max_norm > 0:
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        torch._foreach_mul_(replicated + shards, scale)
    return total


@torch.no_grad()
def gather_full_tables(model: nn.Module, group=None, dst: int = 0) -> dict[str, torch.Tensor]:
    """The full tables `{parameter name: [rows, dim] CPU tensor}` on rank `dst` (an empty dict elsewhere).

    A collective: call it on every rank.
    """
    rank, world_size = _world(group)
    full = {}
    for name, module in sharded_modules(model).items():
        if world_size == 1:
            full[name] = module.weight.detach().cpu().clone()
            continue
        padded = module.weight.new_zeros(module.chunk, module.embedding_dim)
        padded[: module.weight.shape[0]] = module.weight.detach()
        pieces = [torch.empty_like(padded) for _ in range(world_size)] if rank == dst else None
        dist.gather(padded, pieces, dst=dst, group=group)
        if rank == dst:
            full[name] = torch.cat(pieces)[: module.num_embeddings].cpu()
    return full


def full_state_dict(model: nn.Module, group=None, dst: int = 0) -> dict[str, torch.Tensor]:
    """The model's state dict with every sharded table gathered back to its full shape, on rank `dst`.

    Keys are those of the unsharded model, so `model.save_pretrained(dir, state_dict=...)` writes a normal
    checkpoint that `from_pretrained` loads on any number of devices. Other ranks get an empty dict.
    """
    tables = gather_full_tables(model, group, dst)
    if _world(group)[0] != dst:
        return {}
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    state.update(tables)
    return state


def unshard_engram_tables(model: nn.Module, group=None) -> None:
    """Put full `nn.Embedding` tables back into `model` on every rank (collective; for tests and export)."""
    rank, world_size = _world(group)
    for name, module in list(sharded_modules(model).items()):
        if world_size == 1:
            full = module.weight.detach().clone()
        else:
            padded = module.weight.new_zeros(module.chunk, module.embedding_dim)
            padded[: module.weight.shape[0]] = module.weight.detach()
            pieces = [torch.empty_like(padded) for _ in range(world_size)]
            dist.all_gather(pieces, padded, group=group)
            full = torch.cat(pieces)[: module.num_embeddings]
        parent = model.get_submodule(name.rsplit(".", 2)[0]) if name.count(".") >= 2 else model
        embedding = nn.Embedding(
            module.num_embeddings, module.embedding_dim, device=full.device, dtype=full.dtype
        )
        embedding.weight.data.copy_(full)
        parent.embedding = embedding
