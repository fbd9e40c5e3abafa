"""Evaluation with lm-evaluation-harness on local data (see local_data.py, tasks.py, code_exec.py)."""
