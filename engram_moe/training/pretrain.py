"""The training loop behind `engram-train` / `scripts/train.py`: one process or many through Accelerate.

What is sharded and what is replicated (see `sharding.py`): every Engram table is row-sharded across the
processes and served by All-to-All; the backbone (attention, experts, embeddings, norms) is replicated and
data-parallel (DDP through Accelerate); the batch is split across processes. The training checkpoint keeps the
shards apart (`tables-rank*.pt`), and the final `save_pretrained` folder is a normal, unsharded checkpoint.

Determinism: the model is built from the same seed on every rank, the data order depends only on the seed
and the global micro-batch index, and the checkpoint stores the optimizer, the scheduler and every rank's
RNG. A run with `W` processes and per-device batch `B` takes the same steps as one process with batch `W*B`,
and a resumed run takes the same steps as the uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ..configuration_engram import EngramMoEConfig
from ..modeling_engram import EngramMoEForCausalLM, update_router_biases
from ..optim import engram_param_groups
from ..presets import PRESETS, get_preset
from .checkpoint import latest_checkpoint, load_checkpoint, read_trainer_state, save_checkpoint
from .data import ByteTokenizer, PackedData, load_documents, prepare_data
from .metrics import MetricsLog, plot_loss_curves
from .sharding import (
    clip_grad_norm_,
    full_state_dict,
    ignore_sharded_parameters_in_ddp,
    shard_engram_tables,
    sharded_modules,
)

LR_SCHEDULES = ("cosine", "linear", "constant")


class NonFiniteLossError(RuntimeError):
    """Raised when the training loss (or gradient norm) is NaN or infinite; no optimizer step was taken."""


@dataclass
class TrainConfig:
    """Every option of a run (the CLI flags, one to one). Saved as `train_config.json` beside checkpoints."""

    model: str = "tiny-engram-moe"
    set: dict = field(default_factory=dict)  # config overrides, e.g. {"router_bias_update_speed": 0.001}
    tokenizer: str = "auto"
    dataset: str = "embedded"
    dataset_config: str | None = None
    dataset_split: str = "train"
    text_column: str = "text"
    max_documents: int | None = None
    val_fraction: float = 0.05
    seq_len: int = 256
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 1e-3
    lr_schedule: str = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    engram_lr_multiplier: float = 5.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    bf16: bool = False
    gradient_checkpointing: bool = False
    eval_every: int = 100
    eval_batches: int | None = None
    save_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    output_dir: str = "runs/engram-train"
    resume: bool = False
    shard_tables: bool = True
    train_only_engram: bool = False  # memory-only training: every parameter but the Engram tables frozen
    cpu: bool = False
    attn_implementation: str | None = None
    experts_implementation: str | None = (
        None  # None: grouped_mm on GPU, eager on CPU (grouped_mm is slow there)
    )
    progress: bool = True
    plot: bool = True
    save_final: bool = True

    def validate(self) -> None:
        """Clear errors naming the flag and the bad value."""

        def flag(name):
            return "--" + name.replace("_", "-")

        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "keep_checkpoints", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{flag(name)} must be a positive integer, got {value!r}.")
        for name in ("warmup_steps", "eval_every", "save_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{flag(name)} must be a non-negative integer (0 disables), got {value!r}.")
        for name in ("eval_batches", "max_documents"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{flag(name)} must be a positive integer, got {value!r}.")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"--lr must be a positive number, got {self.lr!r}.")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"--lr-schedule {self.lr_schedule!r} is not one of {LR_SCHEDULES}.")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio!r}.")
        if self.weight_decay < 0:
            raise ValueError(f"--weight-decay must be >= 0, got {self.weight_decay!r}.")
        if self.engram_lr_multiplier <= 0:
            raise ValueError(f"--engram-lr-multiplier must be > 0, got {self.engram_lr_multiplier!r}.")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{flag(name)} must be in [0, 1), got {getattr(self, name)!r}.")
        if self.max_grad_norm < 0:
            raise ValueError(
                f"--max-grad-norm must be >= 0 (0 disables clipping), got {self.max_grad_norm!r}."
            )
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"--val-fraction must be in (0, 1), got {self.val_fraction!r}.")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    losses: dict[int, float]  # step (1-based) -> training loss
    val_losses: dict[int, float]
    output_dir: Path
    final_dir: Path | None
    summary: dict
    model: torch.nn.Module | None = None  # the trained model (unwrapped; tables still sharded)


@dataclass
class TrainHooks:
    """Test and extension points. `on_step_start(step, model)` runs before each step (0-based), on every rank."""

    on_step_start: Callable[[int, torch.nn.Module], None] | None = None


# ---------------------------------------------------------------------------------------------- building


def _config_fields() -> set[str]:
    names = (
        {f.name for f in dataclasses.fields(EngramMoEConfig)}
        if dataclasses.is_dataclass(EngramMoEConfig)
        else set()
    )
    return names | set(vars(EngramMoEConfig()).keys())


def build_config(model: str, overrides: dict | None = None) -> tuple[EngramMoEConfig, Path | None]:
    """The model config from a preset name, a config JSON file or a saved model folder (+ overrides).

    Returns `(config, weights_folder)`; `weights_folder` is set when `model` is a folder with weights.
    """
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - _config_fields())
    if unknown:
        raise ValueError(f"--set {unknown[0]}=...: {unknown[0]!r} is not an EngramMoEConfig field.")
    path = Path(model)
    if model in PRESETS:
        return get_preset(model, **overrides), None
    if path.is_dir() and (path / "config.json").is_file():
        config = EngramMoEConfig.from_pretrained(path, **overrides)
        has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
        return config, (path if has_weights else None)
    if path.is_file() and path.suffix == ".json":
        data = json.loads(path.read_text())
        data.pop("model_type", None)
        return EngramMoEConfig(**{**data, **overrides}), None
    raise ValueError(
        f"--model {model!r} is neither a preset ({', '.join(sorted(PRESETS))}), a config .json file, nor a "
        "folder with a config.json."
    )


def resolve_tokenizer(name: str, config: EngramMoEConfig, model_dir: Path | None):
    """`"byte"`, `"smollm2"` (shipped), a tokenizer folder, or `"auto"` (the model folder's, else by vocab)."""
    if name == "auto":
        if model_dir is not None and (
            (model_dir / "tokenizer.json").is_file() or (model_dir / "tokenizer_config.json").is_file()
        ):
            name = str(model_dir)
        elif config.vocab_size >= 49152:
            name = "smollm2"
        else:
            name = "byte"
    if name == "byte":
        tokenizer = ByteTokenizer()
    elif name == "smollm2":
        from ..data import load_default_tokenizer

        tokenizer = load_default_tokenizer("smollm2")
    elif Path(name).is_dir():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(name)
    else:
        raise ValueError(f"--tokenizer {name!r} is not 'auto', 'byte', 'smollm2' or a tokenizer folder.")
    if len(tokenizer) > config.vocab_size:
        raise ValueError(
            f"--tokenizer {name!r} has {len(tokenizer)} ids but the model's vocab_size is {config.vocab_size}; "
            "choose a matching tokenizer (the tiny presets take --tokenizer byte) or a larger model."
        )
    return tokenizer


def build_model(cfg: TrainConfig, device_type: str = "cpu"):
    """The model (seeded, identical on every rank) and its tokenizer."""
    config, weights_dir = build_config(cfg.model, cfg.set)
    tokenizer = resolve_tokenizer(cfg.tokenizer, config, weights_dir if weights_dir else None)
    torch.manual_seed(cfg.seed)
    kwargs = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
    experts = cfg.experts_implementation or ("eager" if device_type == "cpu" else None)
    if experts and config.n_routed_experts > 0:
        kwargs["experts_implementation"] = experts
    if weights_dir is not None:
        model = EngramMoEForCausalLM.from_pretrained(
            weights_dir, config=config, dtype=torch.float32, **kwargs
        )
    else:
        model = EngramMoEForCausalLM._from_config(config, dtype=torch.float32, **kwargs)
        if config.engram_layer_ids and not isinstance(tokenizer, ByteTokenizer):
            from ..compression import build_token_map

            model.set_engram_token_map(build_token_map(tokenizer))
    return model, tokenizer


def _lr_lambda(cfg: TrainConfig):
    def factor(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        if cfg.lr_schedule == "linear":
            shape = 1.0 - progress
        else:
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape

    return factor


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig):
    """AdamW for the backbone, the Engram tables in their own group (x5 LR, no decay), warmup + decay."""
    groups = engram_param_groups(model, cfg.lr, cfg.weight_decay, cfg.engram_lr_multiplier)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
    return optimizer, scheduler


# ---------------------------------------------------------------------------------------------- helpers


def _all_reduce(tensor: torch.Tensor, op=None) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor


@torch.no_grad()
def evaluate(
    model, data: PackedData, batch_size: int, rank: int, world_size: int, device, max_batches=None
) -> float:
    """Mean validation loss per predicted token over the (whole, or first `max_batches`) validation set."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    for blocks, valid in data.val_batches(rank, world_size, batch_size, max_batches):
        blocks = blocks.to(device)
        labels = blocks.masked_fill(~valid.to(device)[:, None], -100)
        count = int(valid.sum()) * (blocks.shape[1] - 1)
        loss = model(input_ids=blocks, labels=labels).loss
        if count:
            totals[0] += loss.double() * count
            totals[1] += count
    _all_reduce(totals)
    model.train(was_training)
    return float(totals[0] / totals[1])


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def _reset_accelerate_state_if_single_process():
    # In-process runs one after another (tests, notebooks) may change mixed precision; Accelerate keeps a
    # singleton state that refuses changes. Without a process group there is nothing to keep.
    if not (dist.is_available() and dist.is_initialized()):
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)


# ---------------------------------------------------------------------------------------------- training


def train(cfg: TrainConfig, hooks: TrainHooks | None = None) -> TrainResult:
    """Run (or resume) a training run; see the module docstring. Returns the per-step losses and a summary."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs
    from tqdm.auto import tqdm

    cfg.validate()
    hooks = hooks or TrainHooks()
    _reset_accelerate_state_if_single_process()
    accelerator = Accelerator(
        cpu=cfg.cpu or not torch.cuda.is_available(),
        mixed_precision="bf16" if cfg.bf16 else "no",
        # The router's load counters are per-rank buffers that update_router_biases sums over ranks; DDP's
        # default broadcast of rank 0's buffers before every forward would overwrite them.
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
    )
    rank, world_size = accelerator.process_index, accelerator.num_processes
    is_main = accelerator.is_main_process
    device = accelerator.device
    output_dir = Path(cfg.output_dir)

    # Resume: the checkpoint's options must describe the same run.
    resume_from = None
    if cfg.resume:
        resume_from = latest_checkpoint(output_dir)
        if resume_from is None:
            raise FileNotFoundError(f"--resume: no complete checkpoint under {output_dir / 'checkpoints'}.")
        saved = json.loads((resume_from / "train_config.json").read_text())
        for key in (
            "model",
            "set",
            "dataset",
            "seq_len",
            "seed",
            "grad_accum",
            "max_documents",
            "val_fraction",
        ):
            if saved.get(key) != getattr(cfg, key):
                raise ValueError(
                    f"--resume: --{key.replace('_', '-')} is {getattr(cfg, key)!r} but the checkpoint {resume_from} "
                    f"was trained with {saved.get(key)!r}."
                )
        saved_global = saved["batch_size"] * read_trainer_state(resume_from)["world_size"]
        if saved_global != cfg.batch_size * world_size:
            raise ValueError(
                f"--resume: the global micro-batch is --batch-size {cfg.batch_size} x {world_size} processes = "
                f"{cfg.batch_size * world_size}, but the checkpoint used {saved_global}; keep it equal so that the "
                "data order and the losses continue exactly."
            )

    model, tokenizer = build_model(cfg, device.type)
    docs = load_documents(
        cfg.dataset, cfg.text_column, cfg.dataset_config, cfg.dataset_split, cfg.max_documents
    )
    eos = model.config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    if eos is None:
        eos = tokenizer.eos_token_id
    data = prepare_data(docs, tokenizer, cfg.seq_len, eos, cfg.val_fraction, cfg.seed)

    tables = shard_engram_tables(model) if cfg.shard_tables else {}
    model.to(device)
    if cfg.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    if cfg.train_only_engram:
        from .hf import train_only_engram_tables

        train_only_engram_tables(model)
    optimizer, scheduler = build_optimizer(model, cfg)

    start_step, tokens_seen = 0, 0
    metrics = MetricsLog(output_dir / "metrics.jsonl", enabled=is_main)
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, optimizer, scheduler)
        if state.get("data_fingerprint") != data.fingerprint:
            raise ValueError(f"--resume: the packed data differs from the checkpoint's ({resume_from}).")
        start_step, tokens_seen = state["step"], state["tokens_seen"]
        metrics.truncate_after(start_step)
    elif is_main and (output_dir / "metrics.jsonl").exists():
        (output_dir / "metrics.jsonl").unlink()
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "train_config.json").write_text(
            json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n"
        )

    table_ids = {id(m.weight) for m in tables.values()}
    replicated_trainable = any(p.requires_grad and id(p) not in table_ids for p in model.parameters())
    if replicated_trainable:
        if tables and world_size > 1:
            ignore_sharded_parameters_in_ddp(model)
        with warnings.catch_warnings():
            # torch >= 2.13 prefers forward_sync_buffers=False, which Accelerate does not expose yet; the
            # meaning we need (no buffer broadcast before each forward) is the same.
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
            ddp_model = accelerator.prepare(model)
    else:
        ddp_model = model  # only sharded tables train: nothing for DDP to synchronise
    unwrapped = _unwrap(ddp_model)
    update_biases = unwrapped.config.router_bias_update_speed > 0

    total_params = sum(p.numel() for p in unwrapped.parameters())
    local_table_params = sum(m.weight.numel() for m in sharded_modules(unwrapped).values())
    full_table_params = sum(m.num_embeddings * m.embedding_dim for m in sharded_modules(unwrapped).values())
    tokens_per_step = cfg.batch_size * world_size * cfg.grad_accum * cfg.seq_len
    if is_main:
        accelerator.print(
            f"engram-train: {world_size} process(es) on {device.type}, "
            f"{total_params - local_table_params + full_table_params:,} parameters "
            f"({full_table_params:,} in Engram tables, {local_table_params:,} on this rank); "
            f"{data.train.shape[0]:,} train / {data.val.shape[0]:,} val blocks of {cfg.seq_len} tokens; "
            f"{tokens_per_step:,} tokens per step"
            + (f"; resuming at step {start_step} from {resume_from}" if resume_from else "")
        )

    losses: dict[int, float] = {}
    val_losses: dict[int, float] = {}
    progress = tqdm(
        total=cfg.max_steps,
        initial=start_step,
        disable=not (is_main and cfg.progress),
        unit="step",
        dynamic_ncols=True,
    )
    if torch.cuda.is_available() and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_times: list[float] = []
    run_start = time.perf_counter()
    last_checkpoint = resume_from
    step = start_step
    try:
        for step in range(start_step, cfg.max_steps):
            if hooks.on_step_start is not None:
                hooks.on_step_start(step, unwrapped)
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), device=device, dtype=torch.float32)
            for micro in range(cfg.grad_accum):
                blocks = data.train_batch(step * cfg.grad_accum + micro, rank, world_size, cfg.batch_size).to(
                    device
                )
                sync = micro == cfg.grad_accum - 1
                with (
                    contextlib.nullcontext() if sync else accelerator.no_sync(ddp_model),
                    accelerator.autocast(),
                ):
                    loss = ddp_model(input_ids=blocks, labels=blocks).loss
                    accelerator.backward(loss / cfg.grad_accum)
                loss_sum += loss.detach().float()
            mean_loss = _all_reduce(loss_sum / cfg.grad_accum) / world_size
            # Clip first (no host sync), then read loss and norm in one transfer: a single sync per step. A
            # non-finite value stops the run before optimizer.step, so the weights stay as they were.
            grad_norm_t = clip_grad_norm_(unwrapped, cfg.max_grad_norm)
            loss_value, grad_norm = torch.stack([mean_loss.float(), grad_norm_t.float()]).tolist()
            if not math.isfinite(loss_value):
                raise NonFiniteLossError(
                    f"training loss is {loss_value} at step {step + 1}; no optimizer step was taken"
                )
            if not math.isfinite(grad_norm):
                raise NonFiniteLossError(
                    f"gradient norm is {grad_norm} at step {step + 1} (loss {loss_value:.4f}); no optimizer step "
                    "was taken"
                )
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if update_biases:
                update_router_biases(unwrapped)
            dt = time.perf_counter() - t0
            step_times.append(dt)
            tokens_seen += tokens_per_step
            losses[step + 1] = loss_value
            lr = scheduler.get_last_lr()[0]
            tok_s = tokens_per_step / dt
            progress.update(1)
            progress.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tok_s:,.0f}", lr=f"{lr:.2e}")
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps or step == start_step:
                metrics.write(
                    {
                        "step": step + 1,
                        "loss": loss_value,
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "tokens": tokens_seen,
                        "tokens_per_sec": tok_s,
                        "elapsed_s": time.perf_counter() - run_start,
                    }
                )
            if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step + 1 == cfg.max_steps:
                with accelerator.autocast():
                    val = evaluate(
                        ddp_model, data, cfg.batch_size, rank, world_size, device, cfg.eval_batches
                    )
                val_losses[step + 1] = val
                metrics.write(
                    {
                        "step": step + 1,
                        "val_loss": val,
                        "val_ppl": math.exp(min(val, 50)),
                        "tokens": tokens_seen,
                    }
                )
                if is_main and cfg.progress:
                    progress.write(f"step {step + 1}: val_loss {val:.4f}")
            if cfg.save_every and ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps):
                last_checkpoint = save_checkpoint(
                    output_dir,
                    step + 1,
                    unwrapped,
                    optimizer,
                    scheduler,
                    {
                        "tokens_seen": tokens_seen,
                        "data_fingerprint": data.fingerprint,
                        "loss": loss_value,
                        "val_loss": val_losses.get(step + 1),
                    },
                    cfg.to_dict(),
                    keep=cfg.keep_checkpoints,
                )
    except NonFiniteLossError as err:
        progress.close()
        where = (
            f"the last good checkpoint is {last_checkpoint} (continue with --resume)"
            if last_checkpoint
            else ("no checkpoint was written yet")
        )
        raise NonFiniteLossError(f"Stopped: {err}; {where}. Lower --lr or raise --warmup-steps.") from None
    progress.close()

    # Steady-state throughput: skip the first steps (allocation, kernel selection, warm caches).
    timed = step_times[min(len(step_times) // 5, 10) :] or step_times
    summary = {
        "steps": cfg.max_steps,
        "start_step": start_step,
        "world_size": world_size,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "tokens_per_step": tokens_per_step,
        "tokens_seen": tokens_seen,
        "tokens_per_sec": tokens_per_step * len(timed) / sum(timed) if timed else None,
        "wall_s": time.perf_counter() - run_start,
        "peak_memory_gib": (torch.cuda.max_memory_allocated(device) / 2**30)
        if device.type == "cuda"
        else None,
        "parameters": total_params - local_table_params + full_table_params,
        "engram_table_parameters": full_table_params,
        "engram_table_parameters_per_rank": local_table_params,
        "final_loss": losses.get(cfg.max_steps),
        "final_val_loss": val_losses.get(cfg.max_steps),
        "bf16": cfg.bf16,
    }

    final_dir = None
    if cfg.save_final:
        final_dir = output_dir / "final"
        state = full_state_dict(unwrapped) if tables else None
        if is_main:
            # The unsharded export: a normal folder that from_pretrained loads on any device count.
            unwrapped.save_pretrained(final_dir, state_dict=state)
            if hasattr(tokenizer, "save_pretrained"):
                tokenizer.save_pretrained(final_dir)
            (final_dir / "train_config.json").write_text(
                json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n"
            )
        accelerator.wait_for_everyone()
    if is_main:
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if cfg.plot and (output_dir / "metrics.jsonl").exists():
            plot_loss_curves(
                output_dir / "metrics.jsonl", output_dir / "loss_curve.png", title=f"{cfg.model}"
            )
    accelerator.wait_for_everyone()
    return TrainResult(losses, val_losses, output_dir, final_dir, summary, unwrapped)
