"""Write lm-eval task configs that run lm-eval's own MMLU, BBH and HumanEval tasks on local data.

lm-eval's built-in tasks load their data from the Hugging Face Hub. For each built-in task whose data we
have locally (see ``local_data.py``) we write a YAML that ``include:``s the built-in YAML by absolute path
(so prompts, few-shot settings and metrics stay lm-eval's) and overrides the dataset with local files.
lm-eval's install path differs per machine, so the YAMLs are generated from the templates in ``tasks/`` at
run time, into a folder that is passed to lm-eval as ``include_path`` (``--include_path`` on its CLI). Tasks
from an include path replace built-in tasks of the same name, and lm-eval's groups (``mmlu``, ``bbh``,
``bbh_fewshot``, ...) then pick up the local versions.

HumanEval is the exception: its built-in ``utils.py`` downloads a metric when imported, so its YAML is
flattened instead of included and its functions are pointed at :mod:`engram_moe.evaluation.code_exec`.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
import os
import shutil
from importlib import resources
from pathlib import Path

import yaml

from .local_data import MMLU_SPLITS, SUITES, check_data, parse_suites

MMLU_DATASET_PATHS = ("cais/mmlu", "hails/mmlu_no_train")
BBH_DATASET_PATHS = ("SaylorTwift/bbh", "lukaemon/bbh")
HUMANEVAL_DATASET_PATH = "openai/openai_humaneval"
# lm-eval's answer-only BBH scores the raw generation, leading space included, against the target; we add a
# variant (our own, named apart) that strips the answer first. See tasks/bbh_strip.yaml.tmpl.
_BBH_ANSWER_ONLY = "bbh_fewshot_"
_BBH_STRIP = "bbh_fewshot_strip_"
HUMANEVAL_TASKS = ("humaneval", "humaneval_64", "humaneval_instruct", "humaneval_64_instruct")
_SHIM = "engram_humaneval.py"


def lm_eval_tasks_dir() -> Path:
    """Folder of lm-eval's built-in task YAMLs in the installed lm-eval."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("lm-eval is not installed: pip install 'engram-moe[eval]' (or 'lm-eval[ruler]').")
    return Path(next(iter(spec.submodule_search_locations))) / "tasks"


@functools.cache
def lm_eval_version() -> str:
    try:
        return importlib.metadata.version("lm_eval")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class _Function(str):
    """A ``!function`` reference, kept as text (we read YAMLs without importing their modules)."""


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    pass


class _Dumper(yaml.SafeDumper):
    pass


def _represent_str(dumper, data):
    # Quoted with escapes: the block styles PyYAML picks for newlines are hard to read and easy to break.
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style='"' if "\n" in data else None)


_Loader.add_constructor("!function", lambda loader, node: _Function(loader.construct_scalar(node)))
_Dumper.add_representer(str, _represent_str)
_Dumper.add_representer(_Function, lambda dumper, data: dumper.represent_scalar("!function", str(data)))


def read_task_yaml(path: Path, _seen: frozenset = frozenset()) -> dict:
    """A task YAML with its ``include:`` chain merged (later keys win), ``!function`` left unresolved.

    Each ``!function`` value becomes the absolute ``<folder>/<module>.<name>`` of the file that named it.
    """
    path = Path(path).resolve()
    if path in _seen:
        raise ValueError(f"include cycle at {path}")
    with open(path, encoding="utf-8") as f:
        cfg = yaml.load(f, Loader=_Loader)  # noqa: S506 -- a SafeLoader with one extra tag
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} is not a YAML mapping")
    cfg = {k: _absolute_functions(v, path.parent) for k, v in cfg.items()}
    includes = cfg.pop("include", None)
    merged: dict = {}
    for inc in [] if includes is None else includes if isinstance(includes, list) else [includes]:
        merged.update(read_task_yaml(path.parent / inc, _seen | {path}))
    merged.update(cfg)
    return merged


def _absolute_functions(value, folder: Path):
    if isinstance(value, _Function):
        return value if os.path.isabs(value) else _Function(f"{folder}/{value}")
    if isinstance(value, dict):
        return {k: _absolute_functions(v, folder) for k, v in value.items()}
    if isinstance(value, list):
        return [_absolute_functions(v, folder) for v in value]
    return value


def _builtin_tasks(folder: Path, dataset_paths) -> list[tuple[Path, dict]]:
    """(yaml path, merged config) of every task under ``folder`` that reads one of ``dataset_paths``."""
    found = []
    for path in sorted(folder.rglob("*.yaml")):
        try:
            cfg = read_task_yaml(path)
        except (OSError, yaml.YAMLError, ValueError):
            continue  # a helper YAML that is not a task on its own
        if isinstance(cfg.get("task"), str) and cfg.get("dataset_path") in dataset_paths:
            found.append((path, cfg))
    return found


def _template(name: str) -> str:
    return (resources.files(__package__) / "tasks" / name).read_text(encoding="utf-8")


def _q(value) -> str:
    """A YAML scalar: JSON strings are valid YAML and survive any path."""
    return json.dumps(str(value))


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _mmlu_configs(data: Path, out: Path, tasks_dir: Path) -> list[str]:
    written = []
    for path, cfg in _builtin_tasks(tasks_dir / "mmlu", MMLU_DATASET_PATHS):
        subject = cfg.get("dataset_name")
        files = {s: data / "mmlu" / str(subject) / f"{s}.jsonl" for s in MMLU_SPLITS}
        if not all(f.is_file() for f in files.values()):
            raise FileNotFoundError(
                f"lm-eval task {cfg['task']} needs MMLU subject {subject!r}, not in {data}"
            )
        text = _template("mmlu.yaml.tmpl").format(
            lm_eval_version=lm_eval_version(),
            include=_q(path),
            task=_q(cfg["task"]),
            **{s: _q(f) for s, f in files.items()},
        )
        _write(out / "mmlu" / path.parent.name / f"{cfg['task']}.yaml", text)
        written.append(cfg["task"])
    if not written:
        raise RuntimeError(f"found no MMLU tasks in {tasks_dir / 'mmlu'} (lm-eval {lm_eval_version()})")
    return written


def _bbh_configs(data: Path, out: Path, tasks_dir: Path) -> list[str]:
    written, strip = [], []
    for path, cfg in _builtin_tasks(tasks_dir / "bbh", BBH_DATASET_PATHS):
        test = data / "bbh" / f"{cfg.get('dataset_name')}.json"
        if not test.is_file():
            raise FileNotFoundError(f"lm-eval task {cfg['task']} needs {test}")
        text = _template("bbh.yaml.tmpl").format(
            lm_eval_version=lm_eval_version(), include=_q(path), task=_q(cfg["task"]), test=_q(test)
        )
        _write(out / "bbh" / path.parent.name / f"{cfg['task']}.yaml", text)
        written.append(cfg["task"])
        if cfg["task"].startswith(_BBH_ANSWER_ONLY):
            name = _BBH_STRIP + cfg["task"][len(_BBH_ANSWER_ONLY) :]
            text = _template("bbh_strip.yaml.tmpl").format(
                lm_eval_version=lm_eval_version(),
                base_task=cfg["task"],
                include=_q(path),
                task=_q(name),
                test=_q(test),
            )
            _write(out / "bbh" / "fewshot_strip" / f"{name}.yaml", text)
            strip.append(name)
    if strip:
        text = _template("bbh_strip_group.yaml.tmpl").format(
            lm_eval_version=lm_eval_version(), tasks="\n".join(f"  - {t}" for t in strip)
        )
        _write(out / "bbh" / "fewshot_strip" / "_bbh_fewshot_strip.yaml", text)
        written += strip
    if not written:
        raise RuntimeError(f"found no BBH tasks in {tasks_dir / 'bbh'} (lm-eval {lm_eval_version()})")
    return written


def _humaneval_configs(data: Path, out: Path, tasks_dir: Path) -> list[str]:
    from . import code_exec

    test = data / "humaneval" / "HumanEval.jsonl"
    if not test.is_file():
        raise FileNotFoundError(f"HumanEval needs {test}")
    folder = out / "humaneval"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(str(resources.files(__package__) / "tasks" / _SHIM)), folder / _SHIM)
    written = []
    for name in HUMANEVAL_TASKS:
        source = tasks_dir / "humaneval" / f"{name}.yaml"
        if not source.is_file():
            continue  # older lm-eval without this variant
        cfg = read_task_yaml(source)
        if cfg.get("dataset_path") != HUMANEVAL_DATASET_PATH or cfg.get("task") != name:
            raise RuntimeError(f"{source} is not the HumanEval task this was written for: {cfg.get('task')}")

        def swap(value, name=name):
            if isinstance(value, _Function):
                fn = value.rsplit(".", 1)[-1]
                if not callable(getattr(code_exec, fn, None)):
                    raise RuntimeError(f"{name} uses {value}, which engram_moe.evaluation.code_exec lacks")
                return _Function(f"{_SHIM[:-3]}.{fn}")
            if isinstance(value, dict):
                return {k: swap(v) for k, v in value.items()}
            if isinstance(value, list):
                return [swap(v) for v in value]
            return value

        cfg = swap(cfg)
        cfg.update(
            dataset_path="json",
            dataset_name=None,
            dataset_kwargs={"data_files": {cfg.get("test_split", "test"): str(test)}},
        )
        body = yaml.dump(cfg, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=110)
        text = _template("humaneval.yaml.tmpl").format(
            lm_eval_version=lm_eval_version(), task=name, source=source, body=body
        )
        _write(folder / f"{name}.yaml", text)
        written.append(name)
    if "humaneval" not in written:
        raise RuntimeError(
            f"found no humaneval task in {tasks_dir / 'humaneval'} (lm-eval {lm_eval_version()})"
        )
    return written


_WRITERS = {"mmlu": _mmlu_configs, "bbh": _bbh_configs, "humaneval": _humaneval_configs}


def write_task_configs(data_dir: str | os.PathLike, out_dir: str | os.PathLike, suites=SUITES) -> dict:
    """Write the local-data task YAMLs of ``suites`` for the installed lm-eval into ``out_dir``.

    ``out_dir`` is then an lm-eval include path. Returns ``{suite: [task names]}``. The folder is
    replaced as a whole, so stale configs of an earlier lm-eval never linger.
    """
    suites = parse_suites(suites)
    data = check_data(data_dir, suites).resolve()
    out = Path(out_dir).resolve()
    if out.exists():
        marker = out / "ENGRAM_TASKS"
        if not marker.exists():
            raise FileExistsError(
                f"{out} exists and was not written by engram-evaluate; choose another folder"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tasks_dir = lm_eval_tasks_dir()
    written = {suite: _WRITERS[suite](data, out, tasks_dir) for suite in suites}
    (out / "ENGRAM_TASKS").write_text(
        json.dumps({"lm_eval": lm_eval_version(), "data_dir": str(data), "tasks": written}, indent=1),
        encoding="utf-8",
    )
    return written
