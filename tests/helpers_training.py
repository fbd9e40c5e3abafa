"""Shared pieces of the training tests: a tiny corpus, a tiny run configuration, single-thread CPU."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

from engram_moe.data import load_embedded_corpus
from engram_moe.training.pretrain import TrainConfig


def write_tiny_corpus(directory: Path, num_docs: int = 40, chars: int = 3000) -> Path:
    """The first `num_docs` documents of the embedded corpus, each cut to `chars`, as a blank-line text file."""
    path = Path(directory) / "tiny.txt"
    docs = [doc[:chars] for doc in load_embedded_corpus()[:num_docs]]
    path.write_text("\n\n".join(docs), encoding="utf-8")
    return path


def tiny_config(corpus: Path, output_dir: Path, **overrides) -> TrainConfig:
    """A few-second float32 run of the tiny preset with the byte tokenizer."""
    values = dict(
        model="tiny-engram-moe",
        tokenizer="byte",
        dataset=str(corpus),
        seq_len=32,
        batch_size=4,
        max_steps=6,
        lr=3e-3,
        warmup_steps=2,
        eval_every=3,
        eval_batches=2,
        save_every=2,
        log_every=1,
        output_dir=str(output_dir),
        progress=False,
        plot=False,
        save_final=False,
        cpu=True,
        experts_implementation="eager",
    )
    values.update(overrides)
    return TrainConfig(**values)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine run ~100x faster on one intra-op thread (no spin contention)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
