"""Data shipped with the package: a real-text corpus and the default tokenizer, so that the demo, the
training script and the tests run on a fresh machine without any download."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
from functools import lru_cache
from importlib import resources
from pathlib import Path

DEFAULT_TOKENIZER = "smollm2"


def embedded_corpus_path() -> Path:
    """Path of the gzipped embedded corpus (CIA World Factbook, public domain; see data/README.md)."""
    return Path(str(resources.files(__name__) / "factbook.txt.gz"))


def load_embedded_corpus() -> list[str]:
    """The embedded corpus as a list of documents (one per country or territory)."""
    with gzip.open(embedded_corpus_path(), "rt", encoding="utf-8") as f:
        return [doc for doc in f.read().split("\n\n") if doc.strip()]


def unpack_tokenizer(name: str = DEFAULT_TOKENIZER, cache_dir: str | os.PathLike | None = None) -> Path:
    """Un-gzip a shipped tokenizer into a cache folder (once per content hash) and return that folder."""
    source = Path(str(resources.files(__name__) / "tokenizers" / name))
    if not source.is_dir():
        raise ValueError(f"No shipped tokenizer named {name!r}; available: {DEFAULT_TOKENIZER!r}.")
    packed = source / "tokenizer.json.gz"
    digest = hashlib.sha256(packed.read_bytes()).hexdigest()[:16]
    root = Path(
        cache_dir or os.environ.get("ENGRAM_MOE_CACHE", Path(tempfile.gettempdir()) / "engram-moe-cache")
    )
    target = root / f"tokenizer-{name}-{digest}"
    if not (target / "tokenizer.json").exists():
        staging = Path(tempfile.mkdtemp(dir=root.mkdir(parents=True, exist_ok=True) or root))
        for file in source.iterdir():
            if file.name == "tokenizer.json.gz":
                with gzip.open(file, "rb") as src, open(staging / "tokenizer.json", "wb") as dst:
                    shutil.copyfileobj(src, dst)
            elif file.is_file():
                shutil.copy(file, staging / file.name)
        try:
            staging.rename(target)  # atomic: concurrent processes never see a half-written folder
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
    return target


@lru_cache(maxsize=4)
def load_default_tokenizer(name: str = DEFAULT_TOKENIZER):
    """The shipped tokenizer (SmolLM2's by default) as a transformers tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(unpack_tokenizer(name))
