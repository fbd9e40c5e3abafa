"""`engram-train` (also `python scripts/train.py`): train or resume an Engram-MoE model.

One process:       engram-train --model tiny-engram-moe --max-steps 200 --output-dir runs/tiny
Several (GPUs):    accelerate launch --num_processes 2 scripts/train.py --model small-engram-moe --bf16 ...
Several (CPU):     accelerate launch --cpu --num_processes 2 scripts/train.py ...

Every Engram table is row-sharded across the processes; the rest of the model is data-parallel.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..training.pretrain import LR_SCHEDULES, NonFiniteLossError, TrainConfig, train


def _parse_override(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(
            f"--set {text!r} must look like KEY=VALUE (e.g. router_bias_update_speed=0.001)."
        )
    key, value = text.split("=", 1)
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key.strip(), parsed


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="engram-train",
        description="Train or fine-tune an Engram-MoE model (Engram tables sharded across processes).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    m = p.add_argument_group("model and data")
    m.add_argument("--model", default=d.model, help="preset name, config .json file, or saved model folder")
    m.add_argument(
        "--set",
        action="append",
        type=_parse_override,
        default=[],
        metavar="KEY=VALUE",
        help="override a config field (repeatable), e.g. --set router_bias_update_speed=0.001",
    )
    m.add_argument(
        "--tokenizer",
        default=d.tokenizer,
        help="'auto', 'byte' (tiny presets), 'smollm2' (shipped) or a tokenizer folder",
    )
    m.add_argument(
        "--dataset",
        default=d.dataset,
        help="'embedded' (shipped corpus), a .txt/.jsonl/.parquet file or folder, or a Hub dataset name",
    )
    m.add_argument("--dataset-config", default=d.dataset_config, help="Hub dataset configuration name")
    m.add_argument("--dataset-split", default=d.dataset_split, help="Hub dataset split")
    m.add_argument(
        "--text-column", default=d.text_column, help="column holding the text (JSON lines, parquet, Hub)"
    )
    m.add_argument(
        "--max-documents", type=int, default=d.max_documents, help="use only the first N documents"
    )
    m.add_argument(
        "--val-fraction", type=float, default=d.val_fraction, help="fraction of documents held out"
    )
    m.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per packed sequence")
    o = p.add_argument_group("optimisation")
    o.add_argument(
        "--batch-size", type=int, default=d.batch_size, help="sequences per process per micro-batch"
    )
    o.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    o.add_argument("--max-steps", type=int, default=d.max_steps, help="optimizer steps")
    o.add_argument("--lr", type=float, default=d.lr, help="backbone peak learning rate (AdamW)")
    o.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=d.lr_schedule, help="decay after warmup")
    o.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear warmup steps")
    o.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="final LR / peak LR")
    o.add_argument(
        "--weight-decay", type=float, default=d.weight_decay, help="backbone weight decay (tables: 0)"
    )
    o.add_argument(
        "--engram-lr-multiplier",
        type=float,
        default=d.engram_lr_multiplier,
        help="Engram table LR = this x --lr (paper: 5)",
    )
    o.add_argument("--adam-beta1", type=float, default=d.adam_beta1)
    o.add_argument("--adam-beta2", type=float, default=d.adam_beta2)
    o.add_argument("--adam-eps", type=float, default=d.adam_eps)
    o.add_argument(
        "--max-grad-norm", type=float, default=d.max_grad_norm, help="clip the global norm (0: off)"
    )
    o.add_argument("--bf16", action="store_true", help="bf16 autocast (weights and optimizer stay float32)")
    o.add_argument("--gradient-checkpointing", action="store_true", help="recompute layers in backward")
    o.add_argument("--seed", type=int, default=d.seed, help="model init, data split and data order")
    r = p.add_argument_group("run")
    r.add_argument(
        "--output-dir", default=d.output_dir, help="checkpoints, metrics.jsonl, loss_curve.png, final/"
    )
    r.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in --output-dir"
    )
    r.add_argument(
        "--eval-every", type=int, default=d.eval_every, help="validate every N steps (0: only at the end)"
    )
    r.add_argument("--eval-batches", type=int, default=d.eval_batches, help="limit validation batches")
    r.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint every N steps (0: never)")
    r.add_argument(
        "--keep-checkpoints", type=int, default=d.keep_checkpoints, help="checkpoints kept on disk"
    )
    r.add_argument("--log-every", type=int, default=d.log_every, help="metrics.jsonl record every N steps")
    r.add_argument(
        "--no-shard-tables",
        dest="shard_tables",
        action="store_false",
        help="replicate the Engram tables (DDP) instead of sharding them",
    )
    r.add_argument(
        "--train-only-engram",
        action="store_true",
        help="memory-only training: freeze everything but the Engram tables",
    )
    r.add_argument("--cpu", action="store_true", help="train on CPU even when a GPU is present")
    r.add_argument(
        "--attn-implementation", default=d.attn_implementation, help="sdpa, eager, flash_attention_2, ..."
    )
    r.add_argument(
        "--experts-implementation",
        default=d.experts_implementation,
        help="MoE experts kernel: grouped_mm, batched_mm, eager (default: grouped_mm on GPU, eager on CPU)",
    )
    r.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    r.add_argument("--no-plot", dest="plot", action="store_false", help="no loss_curve.png")
    r.add_argument(
        "--no-save-final", dest="save_final", action="store_false", help="no final/ save_pretrained"
    )
    return p


def config_from_args(argv: list[str] | None = None) -> TrainConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    values = vars(args)
    values["set"] = dict(values["set"])
    cfg = TrainConfig(**values)
    try:
        cfg.validate()
    except ValueError as err:
        parser.error(str(err))
    return cfg


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_args(argv)
    try:
        train(cfg)
    except NonFiniteLossError as err:
        print(f"engram-train: {err}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"engram-train: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
