"""Evaluation with lm-evaluation-harness on local data, model cards and Hub publishing.

* :func:`prepare_data` fills a local data folder (MMLU, BBH, HumanEval) from sources that need no Hub.
* :func:`write_task_configs` writes lm-eval task configs that run lm-eval's own tasks on that data.
* :func:`evaluate` runs lm-eval on a saved folder or a model in memory and writes results.json.
* :func:`render_model_card` / :func:`write_model_card` fill the model card template.
* :func:`prepare_hub_folder` / :func:`push_folder` / :func:`publish` ready a folder and push it.
* :mod:`.code_exec` runs HumanEval programs in guarded child processes and scores pass@k.

The command line is ``engram-evaluate`` (:mod:`engram_moe.cli.evaluate`).
"""

from .code_exec import ExecutionResult, estimate_pass_at_k, pass_at_k, run_program, run_programs
from .harness import (
    DEFAULT_TASKS,
    SUITES,
    compare_table,
    evaluate,
    expand_tasks,
    format_table,
    load_results,
    summary_rows,
    write_results,
)
from .local_data import check_data, default_data_dir, prepare_data
from .model_card import count_parameters, read_training_metadata, render_model_card, write_model_card
from .publish import PublishError, prepare_hub_folder, publish, push_folder
from .tasks import write_task_configs

__all__ = [
    "DEFAULT_TASKS",
    "SUITES",
    "ExecutionResult",
    "PublishError",
    "check_data",
    "compare_table",
    "count_parameters",
    "default_data_dir",
    "estimate_pass_at_k",
    "evaluate",
    "expand_tasks",
    "format_table",
    "load_results",
    "pass_at_k",
    "prepare_data",
    "prepare_hub_folder",
    "publish",
    "push_folder",
    "read_training_metadata",
    "render_model_card",
    "run_program",
    "run_programs",
    "summary_rows",
    "write_model_card",
    "write_results",
    "write_task_configs",
]
