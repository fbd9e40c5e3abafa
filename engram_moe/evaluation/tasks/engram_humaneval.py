"""lm-eval loads ``!function engram_humaneval.NAME`` from the file beside the task YAML: this one.

It forwards to :mod:`engram_moe.evaluation.code_exec` (local pass@k, no ``evaluate.load`` from the Hub).
"""

from engram_moe.evaluation.code_exec import build_predictions, build_predictions_instruct, pass_at_k

__all__ = ["build_predictions", "build_predictions_instruct", "pass_at_k"]
