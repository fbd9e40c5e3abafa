"""Run lm-evaluation-harness on a saved folder or a model in memory, from local data.

:func:`evaluate` expands our suite names (``mmlu``, ``bbh``, ``humaneval``, ``niah``) into lm-eval task
names, checks the local data (``local_data.py``), writes the local-data task configs (``tasks.py``) into a
temporary include path, calls ``lm_eval.simple_evaluate`` and writes lm-eval's results JSON plus a compact
table. Everything else is lm-eval's: prompts, few-shot settings, metrics and aggregation.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from .local_data import check_data, default_data_dir

logger = logging.getLogger(__name__)

# Suite name -> the lm-eval tasks it stands for. "bbh" is lm-eval's `bbh` group: 3-shot chain of thought
# (the paper's setting); `bbh_fewshot` is 3-shot answer-only. RULER's other needle tasks download essays.
SUITES: dict[str, tuple[str, ...]] = {
    "mmlu": ("mmlu",),
    "bbh": ("bbh",),
    "humaneval": ("humaneval",),
    "niah": ("niah_single_1", "niah_multikey_2", "niah_multikey_3"),
}
DEFAULT_TASKS = ("mmlu", "bbh", "humaneval", "niah")
OFFLINE_NIAH = SUITES["niah"]
DEFAULT_MAX_SEQ_LENGTHS = (4096,)
DTYPES = ("auto", "float32", "bfloat16", "float16")
RESULTS_FILE = "results.json"
SUMMARY_FILE = "summary.md"


def expand_tasks(tasks: str | Iterable[str]) -> list[str]:
    """Suite names and lm-eval task names (a list or a comma-separated string) -> lm-eval task names."""
    names = (
        [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [str(t).strip() for t in tasks]
    )
    names = [n for n in names if n]
    if not names:
        raise ValueError(
            "No tasks given; use suite names (mmlu, bbh, humaneval, niah) or lm-eval task names."
        )
    out = []
    for name in names:
        out.extend(SUITES.get(name, (name,)))
    return list(dict.fromkeys(out))


def data_suite(task: str) -> str | None:
    """Which local data suite an lm-eval task name reads (None: no files needed, or not one of ours)."""
    for suite in ("mmlu", "bbh", "humaneval"):
        if task == suite or task.startswith(f"{suite}_"):
            return suite
    return None


def is_niah(task: str) -> bool:
    return task.startswith("niah_") or task == "ruler"


def _check_positive_int(name: str, value, allow_none: bool = True):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_options(limit, batch_size, max_length, dtype, max_seq_lengths, num_fewshot, max_gen_toks) -> None:
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0:
            raise ValueError(
                f"limit must be a positive number of documents (or a fraction < 1), got {limit!r}"
            )
        if isinstance(limit, float) and limit >= 1 and not limit.is_integer():
            raise ValueError(f"limit {limit!r}: use an integer count or a fraction below 1")
    if isinstance(batch_size, str):
        head, _, tail = batch_size.partition(":")
        if head != "auto" or (tail and not tail.isdigit()):
            raise ValueError(f"batch_size must be a positive integer, 'auto' or 'auto:N', got {batch_size!r}")
    else:
        _check_positive_int("batch_size", batch_size, allow_none=False)
    _check_positive_int("max_length", max_length)
    _check_positive_int("max_gen_toks", max_gen_toks)
    if num_fewshot is not None and (
        isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int) or num_fewshot < 0
    ):
        raise ValueError(f"num_fewshot must be a non-negative integer, got {num_fewshot!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if not max_seq_lengths:
        raise ValueError("max_seq_lengths must name at least one NIAH context length")
    for length in max_seq_lengths:
        _check_positive_int("each of max_seq_lengths", length, allow_none=False)


def _check_device(device: str | None) -> str:
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1')") from err
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but this torch has no CUDA device; use --device cpu")
    return device


def _model_context_length(model, path: str | None) -> int | None:
    """The context length lm-eval's HF backend will assume (its own rule: the config's position limit)."""
    config = getattr(model, "config", None)
    if config is None and path is not None and (Path(path) / "config.json").is_file():
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    if config is None:
        return None
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k, None)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        if get(attr):
            return int(get(attr))
    return None


def evaluate(
    model,
    tasks: str | Sequence[str] = DEFAULT_TASKS,
    *,
    tokenizer=None,
    data_dir: str | os.PathLike | None = None,
    output_dir: str | os.PathLike | None = None,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int | str = 1,
    max_length: int | None = None,
    device: str | None = None,
    dtype: str = "auto",
    max_seq_lengths: Sequence[int] = DEFAULT_MAX_SEQ_LENGTHS,
    max_gen_toks: int | None = None,
    gen_kwargs: Mapping | None = None,
    confirm_run_unsafe_code: bool = False,
    apply_chat_template: bool = False,
    log_samples: bool = False,
    seed: int = 1234,
    bootstrap_iters: int = 100_000,
    trust_remote_code: bool = True,
    model_args: Mapping | None = None,
) -> dict:
    """Evaluate ``model`` with lm-eval on local data and return lm-eval's results dict.

    ``model`` is a saved folder (any Transformers causal LM; ours load with ``trust_remote_code``) or a
    ``PreTrainedModel`` in memory (then ``tokenizer`` is required; device and dtype are the model's own).
    ``tasks``: suite names (``mmlu``, ``bbh``, ``humaneval``, ``niah``) or lm-eval task/group names.
    ``limit``: documents per task (lm-eval's ``--limit``). ``max_seq_lengths``: NIAH context lengths.
    ``max_gen_toks`` caps every generation task's output length (recorded in the results). ``model_args``:
    extra arguments for lm-eval's HF backend (e.g. ``{"gguf_file": ...}``). HumanEval runs model-written
    code (in the guarded child processes of ``code_exec``), which needs ``confirm_run_unsafe_code=True``.
    With ``output_dir``, writes ``results.json`` (lm-eval's format), ``summary.md`` and, with
    ``log_samples``, ``samples_<task>.jsonl``.
    """
    task_names = expand_tasks(tasks)
    max_seq_lengths = [int(x) for x in max_seq_lengths] if max_seq_lengths else []
    _check_options(limit, batch_size, max_length, dtype, max_seq_lengths, num_fewshot, max_gen_toks)
    is_path = isinstance(model, (str, os.PathLike))
    if is_path:
        model = os.fspath(model)
        if not Path(model).is_dir() and (model.startswith((".", "/", "~")) or os.sep in model.strip("/")):
            raise FileNotFoundError(f"model folder {model!r} does not exist")
    elif not hasattr(model, "config") or not callable(model):
        raise ValueError(
            f"model must be a folder path or a transformers PreTrainedModel, got {type(model).__name__}"
        )
    elif tokenizer is None:
        raise ValueError("A model in memory needs its tokenizer: evaluate(model, tokenizer=...)")
    if any(data_suite(t) == "humaneval" for t in task_names) and not confirm_run_unsafe_code:
        raise PermissionError(
            "HumanEval executes the code the model writes (in guarded child processes; see "
            "engram_moe/evaluation/code_exec.py). Pass confirm_run_unsafe_code=True "
            "(--confirm-run-unsafe-code) to allow it, or leave humaneval out of the tasks."
        )
    device = _check_device(device)
    niah = [t for t in task_names if is_niah(t)]
    for t in niah:
        if t not in OFFLINE_NIAH:
            logger.warning(
                "%s builds its haystack from downloaded essays; offline, only %s run.", t, OFFLINE_NIAH
            )
    if niah:
        context = max_length or _model_context_length(model, model if is_path else None)
        if context is not None and context < max(max_seq_lengths):
            raise ValueError(
                f"NIAH at {max(max_seq_lengths)} tokens needs a context of at least that: the model's is "
                f"{context}. Pass --max-length {max(max_seq_lengths)} (RoPE then extrapolates) or lower "
                f"--max-seq-lengths."
            )

    suites = sorted({s for t in task_names if (s := data_suite(t))})
    data = Path(data_dir) if data_dir is not None else default_data_dir()
    if suites:
        check_data(data, suites)

    import lm_eval
    from lm_eval.tasks import TaskManager

    from .tasks import write_task_configs

    with tempfile.TemporaryDirectory(prefix="engram-eval-") as tmp:
        tmp = Path(tmp)
        include = tmp / "tasks"
        if suites:
            write_task_configs(data, include, suites)
        else:
            include.mkdir()
        tok_name = tokenizer if isinstance(tokenizer, (str, os.PathLike)) else None
        if tokenizer is not None and tok_name is None and niah:
            tok_name = tmp / "tokenizer"  # RULER sizes its haystacks with a tokenizer it loads by name
            tokenizer.save_pretrained(tok_name)
        metadata = {"max_seq_lengths": max_seq_lengths}
        if tok_name is not None or is_path:
            metadata["tokenizer"] = os.fspath(tok_name if tok_name is not None else model)
        # Our include path replaces lm-eval's Hub-backed tasks on purpose; one warning per task is noise.
        logging.getLogger("lm_eval.tasks._index").setLevel(logging.ERROR)
        task_manager = TaskManager(include_path=str(include), metadata=metadata)
        unknown = [t for t in task_names if t not in task_manager.all_tasks]
        if unknown:
            raise ValueError(f"Unknown lm-eval task(s) {unknown}; `lm_eval ls tasks` lists the known ones.")

        gen = dict(gen_kwargs or {})
        if max_gen_toks is not None:
            gen["max_gen_toks"] = max_gen_toks
        common = dict(
            tasks=task_names,
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=task_manager,
            gen_kwargs=gen or None,
            confirm_run_unsafe_code=confirm_run_unsafe_code,
            apply_chat_template=apply_chat_template,
            log_samples=log_samples,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
            bootstrap_iters=bootstrap_iters,
        )
        if is_path:
            args = dict(pretrained=model, trust_remote_code=trust_remote_code, dtype=dtype, device=device)
            if tokenizer is not None:
                args["tokenizer"] = os.fspath(tokenizer) if tok_name is not None else tokenizer
            if max_length is not None:
                args["max_length"] = max_length
            args.update(model_args or {})
            results = lm_eval.simple_evaluate(model="hf", model_args=args, batch_size=batch_size, **common)
        else:
            from lm_eval.models.huggingface import HFLM

            lm = HFLM(
                pretrained=model,
                tokenizer=tokenizer,
                batch_size=batch_size,
                max_length=max_length,
                trust_remote_code=trust_remote_code,
                **dict(model_args or {}),
            )
            results = lm_eval.simple_evaluate(model=lm, **common)

    if results is None:  # lm-eval returns None on non-zero ranks of a distributed run
        return {}
    results["engram_eval"] = _run_record(
        model if is_path else type(model).__name__,
        task_names,
        suites,
        data,
        max_seq_lengths,
        max_gen_toks,
        limit,
    )
    if output_dir is not None:
        write_results(results, output_dir)
    return results


def _run_record(model, tasks, suites, data: Path, max_seq_lengths, max_gen_toks, limit) -> dict:
    from engram_moe import __version__

    manifest_path = data / "manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.exists() else {}
    return {
        "engram_moe_version": __version__,
        "model": str(model),
        "tasks": list(tasks),
        "limit": limit,
        "max_gen_toks": max_gen_toks,
        "niah_max_seq_lengths": list(max_seq_lengths) if any(is_niah(t) for t in tasks) else None,
        "data": {s: {k: v for k, v in manifest.get(s, {}).items() if k != "counts"} for s in suites},
    }


def write_results(results: dict, output_dir: str | os.PathLike) -> Path:
    """Write ``results.json`` (lm-eval's format, samples split out), ``samples_<task>.jsonl`` and
    ``summary.md`` into ``output_dir``; each file is written to a temporary name and renamed."""
    from lm_eval.utils import handle_non_serializable, make_table

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = dict(results)
    samples = results.pop("samples", None) or {}
    _atomic_write(
        out / RESULTS_FILE,
        json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False),
    )
    for task, rows in samples.items():
        lines = [json.dumps(r, default=handle_non_serializable, ensure_ascii=False) for r in rows]
        _atomic_write(out / f"samples_{task}.jsonl", "\n".join(lines) + "\n")
    parts = ["## Summary\n", format_table(summary_rows(results)), "\n## lm-eval table\n", make_table(results)]
    if results.get("groups"):
        parts += ["\n", make_table(results, "groups")]
    _atomic_write(out / SUMMARY_FILE, "\n".join(parts))
    return out / RESULTS_FILE


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def load_results(path: str | os.PathLike) -> dict:
    """A results JSON written by :func:`write_results` or by ``lm_eval --output_path`` (a file, or a folder
    holding ``results.json`` or lm-eval's ``results_<date>.json`` files: the newest one)."""
    p = Path(path)
    if p.is_dir():
        candidates = [p / RESULTS_FILE] if (p / RESULTS_FILE).is_file() else sorted(p.rglob("results_*.json"))
        if not candidates:
            raise FileNotFoundError(f"no results JSON in {p}")
        p = candidates[-1]
    data = json.loads(p.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or "results" not in data:
        raise ValueError(f"{p} is not an lm-eval results file (no 'results' key)")
    return data


_MERGED_KEYS = (
    "results",
    "groups",
    "group_subtasks",
    "configs",
    "versions",
    "n-shot",
    "higher_is_better",
    "n-samples",
)


def merge_results(parts: Sequence[dict]) -> dict:
    """One results dict from several lm-eval runs of the same model (e.g. one process per suite, each with
    its own shots and limits). Per-task sections are united (a task in two parts is an error); the run-level
    fields are the first part's, and every part's ``config`` and ``engram_eval`` record is kept under
    ``engram_eval["runs"]``."""
    if not parts:
        raise ValueError("merge_results needs at least one results dict")
    merged = {k: v for k, v in parts[0].items() if k not in _MERGED_KEYS}
    for key in _MERGED_KEYS:
        merged[key] = {}
        for part in parts:
            section = part.get(key) or {}
            clash = set(section) & set(merged[key])
            if clash and key == "results":
                raise ValueError(f"tasks {sorted(clash)} appear in more than one results file")
            merged[key].update(section)
    merged["engram_eval"] = {
        **(parts[0].get("engram_eval") or {}),
        "tasks": [t for p in parts for t in (p.get("engram_eval") or {}).get("tasks", [])],
        "runs": [{"config": p.get("config"), "engram_eval": p.get("engram_eval")} for p in parts],
    }
    for key in ("limit", "max_gen_toks"):
        values = {json.dumps((p.get("engram_eval") or {}).get(key)) for p in parts}
        if len(values) > 1:
            merged["engram_eval"][key] = "differs per run (see runs)"
    return merged


def _top_level(results: dict) -> list[str]:
    """Requested entries: groups and tasks that are not inside another group, in lm-eval's order."""
    subtasks = results.get("group_subtasks", {})
    inner = {t for children in subtasks.values() for t in children}
    names = list(subtasks) + list(results.get("results", {}))
    return [n for n in dict.fromkeys(names) if n not in inner and n in results.get("results", {})]


def summary_rows(results: dict) -> list[dict]:
    """One row per (top-level task or group, metric, filter): the compact view of a results dict.

    NIAH's unused length columns (lm-eval reports them as -1) are dropped.
    """
    rows = []
    n_samples = results.get("n-samples", {})
    for name in _top_level(results):
        entry = results["results"][name]
        for key, value in entry.items():
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            if is_niah(name) and value == -1:
                continue
            stderr = entry.get(f"{metric}_stderr,{filt}")
            n = n_samples.get(name, {}).get("effective", entry.get("sample_len"))
            rows.append(
                {
                    "task": name,
                    "metric": metric,
                    "filter": filt,
                    "value": float(value),
                    "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                    "n": n,
                    "n_shot": results.get("n-shot", {}).get(name),
                }
            )
    return rows


def _metric_label(row: dict) -> str:
    return f"{row['metric']} ({row['filter']})" if row["filter"] != "none" else row["metric"]


def format_table(rows: list[dict]) -> str:
    """Markdown table of :func:`summary_rows` (values in percent, with the standard error)."""
    lines = ["| Task | Metric | n | Value (%) | ± stderr |", "| --- | --- | ---: | ---: | ---: |"]
    for r in rows:
        se = f"{100 * r['stderr']:.2f}" if r["stderr"] is not None else ""
        lines.append(f"| {r['task']} | {_metric_label(r)} | {r['n'] or ''} | {100 * r['value']:.2f} | {se} |")
    return "\n".join(lines) + "\n"


def compare_table(named_results: Mapping[str, dict]) -> str:
    """Side-by-side markdown table of several results dicts (values in percent; blank where absent)."""
    keyed = {}
    for label, res in named_results.items():
        for r in summary_rows(res):
            keyed.setdefault((r["task"], _metric_label(r)), {})[label] = r
    head = "| Task | Metric | " + " | ".join(named_results) + " |"
    lines = [head, "| --- | --- | " + " | ".join("---:" for _ in named_results) + " |"]
    for (task, metric), by in keyed.items():
        cells = []
        for label in named_results:
            r = by.get(label)
            cells.append(
                "" if r is None else f"{100 * r['value']:.2f}" + (f" (n={r['n']})" if r["n"] else "")
            )
        lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
