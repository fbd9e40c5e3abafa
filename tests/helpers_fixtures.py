"""Access to the golden fixtures in ``tests/fixtures/`` (copied from engram-golden, computed with the demo).

* ``fixture_path(*parts)``: absolute path of a fixture file, e.g. ``fixture_path("module", "module_hc4.json")``.
* ``load_json(name)``: a parsed JSON fixture, e.g. ``load_json("hashing")`` or ``load_json("module/module_hc4")``
  (the ``.json`` suffix is optional). Cached; treat the result as read-only.
* ``tokenizer_dir(name)``: a directory holding the un-gzipped tokenizer ``name`` (``"smollm2"`` or
  ``"deepseek-v3"``), extracted once per process into a temporary directory.
* ``load_tokenizer(name)``: ``transformers.AutoTokenizer.from_pretrained(tokenizer_dir(name))``. Cached per
  process; treat it as read-only.

The tokenizers are stored as ``tokenizer.json.gz`` to keep the repository small.
"""

from __future__ import annotations

import atexit
import functools
import gzip
import json
import shutil
import tempfile
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TOKENIZER_NAMES = ("smollm2", "deepseek-v3")


def fixture_path(*parts: str) -> Path:
    path = FIXTURES.joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"no fixture {path}")
    return path


@functools.cache
def load_json(name: str):
    if not name.endswith(".json"):
        name += ".json"
    with open(fixture_path(name), encoding="utf-8") as f:
        return json.load(f)


@functools.cache
def session_tmp(prefix: str) -> Path:
    """A scratch folder for the whole test session (one per prefix), removed at exit."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


@functools.cache
def tokenizer_dir(name: str) -> Path:
    if name not in TOKENIZER_NAMES:
        raise ValueError(f"unknown tokenizer fixture {name!r}; expected one of {TOKENIZER_NAMES}")
    src = fixture_path("tokenizers", name)
    dst = session_tmp("engram-test-tokenizers-") / name
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.name.endswith(".gz"):
            with gzip.open(item, "rb") as fin, open(dst / item.name[: -len(".gz")], "wb") as fout:
                shutil.copyfileobj(fin, fout)
        else:
            shutil.copyfile(item, dst / item.name)
    return dst


@functools.cache
def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir(name)))
