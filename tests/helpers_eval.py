"""Shared, cached inputs of the evaluation tests (tests/test_eval_*.py).

* ``eval_data_dir()``: a local data folder filled by ``prepare_data`` (MMLU, BBH, HumanEval), once per process.
* ``tiny_model_dir()``: a tiny Engram-MoE (``tiny-engram-moe`` with hidden 32 and the SmolLM2 vocabulary,
  so the model covers the tokenizer) saved with the SmolLM2 tokenizer fixture, once per process.
* ``isolated_env(tmp)``: environment for child processes that must not reach the Hub.
* ``BLOCK_ENGRAM_MOE``: Python source that makes ``import engram_moe`` fail, as on a machine without it.

Folders live in one temporary directory removed at exit.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from helpers_fixtures import session_tmp, tokenizer_dir

# The editable install puts engram_moe on every interpreter's path (a .pth finder), so a child process
# blocks it explicitly; a blocked module raises ModuleNotFoundError on import.
BLOCK_ENGRAM_MOE = 'import sys\nsys.modules["engram_moe"] = None\n'

TINY_OVERRIDES = dict(
    vocab_size=49152,  # the SmolLM2 tokenizer's ids
    hidden_size=32,
    intermediate_size=64,
    moe_intermediate_size=32,
    max_position_embeddings=1024,
    eos_token_id=2,  # <|im_end|>, the tokenizer's eos
)


def _tmp() -> Path:
    return session_tmp("engram-eval-tests-")


@functools.cache
def eval_data_dir() -> Path:
    from engram_moe.evaluation.local_data import prepare_data

    return prepare_data(_tmp() / "eval-data")


def tiny_model(seed: int = 0):
    import torch

    from engram_moe import EngramMoEForCausalLM, get_preset

    torch.manual_seed(seed)
    return EngramMoEForCausalLM(get_preset("tiny-engram-moe", **TINY_OVERRIDES)).eval()


@functools.cache
def tiny_model_dir() -> Path:
    from transformers import AutoTokenizer

    folder = _tmp() / "tiny-model"
    tiny_model().save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir("smollm2")).save_pretrained(folder)
    return folder


def isolated_env(tmp: Path) -> dict:
    """Child-process environment: offline Hub and datasets, private caches under ``tmp``."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_MODULES_CACHE": str(tmp / "modules"),
        "HF_DATASETS_CACHE": str(tmp / "datasets"),
        "PYTHONUNBUFFERED": "1",
    }
