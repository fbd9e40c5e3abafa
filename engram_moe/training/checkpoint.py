"""Atomic, sharded, resumable training checkpoints.

Layout of `<output_dir>/checkpoints/step-00000100/`:

- `model.pt`: the replicated part of the model state (everything but the Engram table shards), rank 0.
- `optimizer.pt`: the optimizer's hyper-parameters and the state of the replicated parameters, keyed by
  parameter name; the LR scheduler's state. Rank 0.
- `tables-rank00000-of-00002.pt`, ...: each rank's rows of every Engram table, with their Adam moments and
  row ranges, and that rank's RNG states.
- `trainer_state.json`, `config.json` (the model config), `train_config.json` (the run's options).

Atomicity: everything is written into `checkpoints/.tmp-step-...`, each file fsynced; then rank 0 renames the
folder to its final name (atomic on POSIX), fsyncs the parent and atomically replaces `checkpoints/latest`. A
crash at any point leaves the previous checkpoint and `latest` untouched; stale `.tmp-*` folders are removed
by the next save. Old checkpoints are pruned only after the new one is committed. Multi-node runs need
`output_dir` on a file system that all nodes share.

Table shards are stored with their global row ranges, so a run can resume on another number of processes
(each rank reads the overlapping rows of the saved shards), provided the global batch stays the same.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .sharding import sharded_modules

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
_STEP_RE = re.compile(r"^step-(\d{8})$")


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if _dist_ready() else (0, 1)


def _barrier() -> None:
    if _dist_ready():
        dist.barrier()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, obj) -> None:
    if isinstance(obj, (dict, list)) and path.suffix == ".json":
        path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    else:
        torch.save(obj, path)
    _fsync_file(path)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _param_names(model: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters()}


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Committed checkpoints, oldest first (temporary folders of interrupted saves are never listed)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _STEP_RE.match(p.name))


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint named by `checkpoints/latest`, else the newest committed one, else None."""
    root = checkpoint_root(output_dir)
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if candidate.is_dir() and (candidate / "trainer_state.json").is_file():
            return candidate
    committed = [p for p in list_checkpoints(output_dir) if (p / "trainer_state.json").is_file()]
    return committed[-1] if committed else None


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    trainer_state: dict,
    train_config: dict,
    keep: int | None = 2,
) -> Path:
    """Write the checkpoint of `step` atomically (a collective: every rank calls it). Returns its path.

    `model` is the unwrapped model (no DDP wrapper), with sharded tables.
    """
    rank, world_size = _rank_world()
    root = checkpoint_root(output_dir)
    name = f"step-{step:08d}"
    final = root / name
    tmp = root / f".tmp-{name}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):  # left by a save that was killed
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier()

    names = _param_names(model)
    tables = sharded_modules(model)
    table_ids = {id(m.weight) for m in tables.values()}

    # Every rank: its table rows, their optimizer state, its RNG.
    shard = {"world_size": world_size, "rank": rank, "rng": _rng_state(), "tables": {}}
    for pname, module in tables.items():
        opt_state = optimizer.state.get(module.weight, {})
        shard["tables"][pname] = {
            "weight": module.weight.detach().cpu(),
            "row_start": module.row_start,
            "row_stop": module.row_stop,
            "num_rows": module.num_embeddings,
            "optim": {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in opt_state.items()},
        }
    _write(tmp / f"tables-rank{rank:05d}-of-{world_size:05d}.pt", shard)

    if rank == 0:
        model_state = {
            k: v.detach().cpu()
            for k, v in model.state_dict().items()
            if k not in tables  # the shards live in the tables-rank* files
        }
        _write(tmp / "model.pt", model_state)
        groups, states = [], {}
        for group in optimizer.param_groups:
            groups.append(
                {
                    **{k: v for k, v in group.items() if k != "params"},
                    "params": [names[id(p)] for p in group["params"]],
                }
            )
            for p in group["params"]:
                if id(p) not in table_ids and p in optimizer.state:
                    states[names[id(p)]] = {
                        k: (v.detach().cpu() if torch.is_tensor(v) else v)
                        for k, v in optimizer.state[p].items()
                    }
        _write(
            tmp / "optimizer.pt",
            {
                "param_groups": groups,
                "state": states,
                "scheduler": scheduler.state_dict() if scheduler else None,
            },
        )
        config = getattr(model, "config", None)
        if config is not None:
            config.to_json_file(tmp / "config.json")
            _fsync_file(tmp / "config.json")
        _write(tmp / "train_config.json", train_config)
        # Written last: a folder with trainer_state.json is complete.
        _write(tmp / "trainer_state.json", {**trainer_state, "step": step, "world_size": world_size})
        _fsync_dir(tmp)
    _barrier()

    if rank == 0:
        if final.exists():  # re-saving the same step (e.g. after resuming at it): replace atomically
            old = root / f".old-{name}"
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        _fsync_dir(root)
        pointer_tmp = root / f".{LATEST}.tmp"
        pointer_tmp.write_text(name + "\n")
        _fsync_file(pointer_tmp)
        os.replace(pointer_tmp, root / LATEST)
        _fsync_dir(root)
        if keep is not None and keep > 0:
            for old in list_checkpoints(output_dir)[:-keep]:
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def read_trainer_state(path: str | os.PathLike) -> dict:
    return json.loads((Path(path) / "trainer_state.json").read_text())


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
    restore_rng: bool = True,
) -> dict:
    """Load a checkpoint written by `save_checkpoint` into `model` (unwrapped, sharded) and the optimizer.

    Works on any number of processes: each rank copies its rows from the saved shards that overlap them.
    Returns the trainer state.
    """
    path = Path(path)
    rank, world_size = _rank_world()
    state = read_trainer_state(path)
    device = next(model.parameters()).device

    model_state = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
    tables = sharded_modules(model)
    missing, unexpected = model.load_state_dict(model_state, strict=False)
    missing = [k for k in missing if k not in tables]
    if missing or unexpected:
        raise ValueError(
            f"Checkpoint {path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}."
        )

    shard_files = sorted(path.glob("tables-rank*-of-*.pt"))
    saved_world = state.get("world_size", len(shard_files))
    if len(shard_files) != saved_world:
        raise ValueError(f"Checkpoint {path} has {len(shard_files)} table shards, expected {saved_world}.")
    table_optim = {name: {} for name in tables}
    rng = None
    for file in shard_files:
        shard = torch.load(file, map_location="cpu", weights_only=True)
        if saved_world == world_size and shard["rank"] == rank:
            rng = shard["rng"]
        for name, module in tables.items():
            if name not in shard["tables"]:
                raise ValueError(f"Checkpoint {path} has no Engram table {name!r}.")
            saved = shard["tables"][name]
            if saved["num_rows"] != module.num_embeddings:
                raise ValueError(
                    f"Table {name!r} has {saved['num_rows']} rows in {path} but {module.num_embeddings} in the model."
                )
            lo, hi = max(saved["row_start"], module.row_start), min(saved["row_stop"], module.row_stop)
            if lo >= hi:
                continue
            src = slice(lo - saved["row_start"], hi - saved["row_start"])
            dst = slice(lo - module.row_start, hi - module.row_start)
            with torch.no_grad():
                module.weight[dst].copy_(saved["weight"][src])
            for key, value in saved["optim"].items():
                if torch.is_tensor(value) and value.dim() == 2:
                    buf = table_optim[name].setdefault(key, torch.zeros_like(module.weight, device="cpu"))
                    buf[dst].copy_(value[src])
                else:
                    table_optim[name][key] = value  # e.g. Adam's step count, the same on every shard

    if optimizer is not None:
        saved_opt = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        params = dict(model.named_parameters())
        if len(saved_opt["param_groups"]) != len(optimizer.param_groups):
            raise ValueError(
                f"Checkpoint {path} has {len(saved_opt['param_groups'])} optimizer groups, the run has "
                f"{len(optimizer.param_groups)}: the trainable parameters changed."
            )
        for group, saved_group in zip(optimizer.param_groups, saved_opt["param_groups"], strict=True):
            names = [n for n, p in params.items() if any(p is q for q in group["params"])]
            if sorted(names) != sorted(saved_group["params"]):
                raise ValueError(f"Optimizer group {group.get('name')!r} differs from the checkpoint's.")
            group.update({k: v for k, v in saved_group.items() if k != "params"})
        optimizer.state.clear()
        for name, saved in saved_opt["state"].items():
            param = params[name]
            optimizer.state[param] = {
                k: (v.to(param.device) if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in saved.items()
            }
        for name, module in tables.items():
            if table_optim[name]:
                optimizer.state[module.weight] = {
                    k: (v.to(device) if torch.is_tensor(v) and v.dim() > 0 else v)
                    for k, v in table_optim[name].items()
                }
        if scheduler is not None and saved_opt["scheduler"] is not None:
            scheduler.load_state_dict(saved_opt["scheduler"])

    if restore_rng and rng is not None:
        _set_rng_state(rng)
    return state
