"""Compare training runs side by side: throughput, peak memory, losses; a table, a JSON and a loss-curve PNG.

    python -m engram_moe.training.compare --run engram=runs/a --run moe=runs/b --baseline moe \
        --json comparison.json --png loss_curves.png

Each run folder (or prefix) holds `summary.json` and `metrics.jsonl` as written by `engram-train`; a run may
also be given as `label=PREFIX` where `PREFIX_summary.json` and `PREFIX_metrics.jsonl` exist.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .metrics import plot_loss_curves


def _files(spec: str) -> tuple[Path, Path]:
    path = Path(spec)
    if path.is_dir():
        return path / "summary.json", path / "metrics.jsonl"
    return Path(f"{spec}_summary.json"), Path(f"{spec}_metrics.jsonl")


def compare_runs(runs: dict[str, str], baseline: str | None = None) -> dict:
    """`{label: {tokens_per_sec, peak_memory_gib, final_loss, final_val_loss, ...}}` plus ratios to `baseline`."""
    table = {}
    for label, spec in runs.items():
        summary_path, _ = _files(spec)
        if not summary_path.is_file():
            raise FileNotFoundError(f"--run {label}={spec}: no {summary_path}")
        table[label] = json.loads(summary_path.read_text())
    if baseline is not None:
        if baseline not in table:
            raise ValueError(f"--baseline {baseline!r} is not one of the runs {sorted(table)}.")
        base = table[baseline]["tokens_per_sec"]
        for row in table.values():
            row["tokens_per_sec_vs_baseline"] = row["tokens_per_sec"] / base if base else None
    return table


def format_table(table: dict) -> str:
    columns = [
        ("run", lambda label, r: label),
        ("tokens/s", lambda label, r: f"{r['tokens_per_sec']:,.0f}"),
        ("vs baseline", lambda label, r: f"{r.get('tokens_per_sec_vs_baseline', float('nan')):.3f}"),
        (
            "peak GiB",
            lambda label, r: "-" if r.get("peak_memory_gib") is None else f"{r['peak_memory_gib']:.2f}",
        ),
        ("params", lambda label, r: f"{r['parameters'] / 1e6:.1f}M"),
        ("tables", lambda label, r: f"{r['engram_table_parameters'] / 1e6:.1f}M"),
        ("train loss", lambda label, r: f"{r['final_loss']:.4f}"),
        (
            "val loss",
            lambda label, r: "-" if r.get("final_val_loss") is None else f"{r['final_val_loss']:.4f}",
        ),
    ]
    rows = [[name for name, _ in columns]] + [
        [fn(label, r) for _, fn in columns] for label, r in table.items()
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m engram_moe.training.compare", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--run", action="append", required=True, metavar="LABEL=PATH", help="a run (repeatable)"
    )
    parser.add_argument("--baseline", help="label whose tokens/s is 1.0")
    parser.add_argument("--json", help="write the comparison here")
    parser.add_argument("--png", help="write train/validation loss curves of all runs here")
    args = parser.parse_args(argv)
    runs = {}
    for spec in args.run:
        if "=" not in spec:
            parser.error(f"--run {spec!r} must look like LABEL=PATH")
        label, path = spec.split("=", 1)
        runs[label] = path
    table = compare_runs(runs, args.baseline)
    print(format_table(table))
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2) + "\n")
    if args.png:
        written = plot_loss_curves(
            {label: _files(spec)[1] for label, spec in runs.items()},
            args.png,
            title="train / validation loss",
        )
        if written is None:
            print("matplotlib is not installed: no PNG")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
