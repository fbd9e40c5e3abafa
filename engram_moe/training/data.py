"""Training data: documents from the embedded corpus, local files or the Hub, tokenised and packed.

The order in which packed blocks are visited is a pure function of (seed, global micro-batch index), so a run
resumed from a checkpoint sees exactly the batches the uninterrupted run would have seen, and `W` processes
with per-device batch `B` see the same global batches as one process with batch `W * B`.

Plain-text files, JSON-lines files and the embedded corpus are read without `datasets` (so training works on
machines that lack it); `.parquet` files and Hub datasets go through `datasets.load_dataset`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

TEXT_SUFFIXES = (".txt", ".md", ".txt.gz")
JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz")
PARQUET_SUFFIXES = (".parquet",)


class ByteTokenizer:
    """UTF-8 bytes as tokens (ids 3..258; 0 = end of text, 1 = bos, 2 = pad): for the tiny presets (vocab 512)."""

    name = "byte"
    offset = 3
    eos_token_id = 0
    bos_token_id = 1
    pad_token_id = 2
    vocab_size = 256 + offset

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        return bytes(i - self.offset for i in ids if i >= self.offset).decode("utf-8", errors="replace")

    def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict:
        return {"input_ids": [self.encode(t) for t in texts]}


def _read_text(path: Path) -> str:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return f.read()


def _split_paragraph_docs(text: str) -> list[str]:
    # Documents are separated by blank lines (the embedded corpus's format, and most plain-text dumps).
    return [doc.strip() for doc in text.split("\n\n") if doc.strip()]


def _read_jsonl(path: Path, text_column: str) -> list[str]:
    raw = _read_text(path).strip()
    if raw.startswith("["):  # a JSON array of records
        records = json.loads(raw)
    else:
        records = [json.loads(line) for line in raw.splitlines() if line.strip()]
    docs = []
    for i, record in enumerate(records):
        if not isinstance(record, dict) or text_column not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(
                f"{path}: record {i} has no column {text_column!r} (found {keys}); pass --text-column."
            )
        docs.append(str(record[text_column]))
    return docs


def _load_with_datasets(name_or_files, text_column: str, config: str | None, split: str) -> list[str]:
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            f"Loading {name_or_files!r} needs the `datasets` package (pip install 'engram-moe[train]'). Plain "
            "text and JSON-lines files and --dataset embedded work without it."
        ) from err
    if isinstance(name_or_files, list):
        dataset = datasets.load_dataset("parquet", data_files=[str(p) for p in name_or_files], split="train")
    else:
        dataset = datasets.load_dataset(name_or_files, config, split=split)
    if text_column not in dataset.column_names:
        raise ValueError(
            f"Dataset {name_or_files!r} has no column {text_column!r} (columns: {dataset.column_names}); "
            "pass --text-column."
        )
    return [str(t) for t in dataset[text_column]]


def load_documents(
    source: str = "embedded",
    text_column: str = "text",
    dataset_config: str | None = None,
    split: str = "train",
    max_documents: int | None = None,
) -> list[str]:
    """Documents (strings) from `source`.

    `source` is `"embedded"` (the corpus shipped with the package), a local file or folder (`.txt`/`.md`, split
    into documents at blank lines; `.jsonl`/`.json` with a `text_column`; `.parquet`; `.gz` variants of text
    and JSON lines), or a Hub dataset name (needs `datasets` and network access).
    """
    if source == "embedded":
        from ..data import load_embedded_corpus

        docs = load_embedded_corpus()
    else:
        path = Path(source)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and _suffix_kind(p) is not None)
            if not files:
                raise ValueError(
                    f"--dataset folder {source!r} holds no .txt, .md, .jsonl, .json or .parquet files."
                )
        elif path.is_file():
            if _suffix_kind(path) is None:
                raise ValueError(
                    f"--dataset file {source!r} has an unsupported suffix; use .txt, .md, .jsonl, .json, "
                    ".parquet (or .txt.gz / .jsonl.gz)."
                )
            files = [path]
        elif _suffix_kind(path) is None and not source.startswith((".", "/", "~")) and source.count("/") <= 1:
            files = None  # a Hub dataset name such as "owner/name"
        else:
            raise ValueError(
                f"--dataset {source!r} does not exist; give 'embedded', an existing file or folder, or a Hub "
                "dataset name such as 'owner/name'."
            )
        if files is None:
            docs = _load_with_datasets(source, text_column, dataset_config, split)
        else:
            docs = []
            parquet = [p for p in files if _suffix_kind(p) == "parquet"]
            for file in files:
                kind = _suffix_kind(file)
                if kind == "text":
                    docs.extend(_split_paragraph_docs(_read_text(file)))
                elif kind == "json":
                    docs.extend(_read_jsonl(file, text_column))
            if parquet:
                docs.extend(_load_with_datasets(parquet, text_column, None, "train"))
    docs = [d for d in docs if d.strip()]
    if max_documents is not None:
        docs = docs[:max_documents]
    if not docs:
        raise ValueError(f"--dataset {source!r} gave no non-empty documents.")
    return docs


def _suffix_kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    if name.endswith(JSON_SUFFIXES):
        return "json"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def tokenize_documents(
    docs: list[str], tokenizer, eos_token_id: int, batch_size: int = 256
) -> list[list[int]]:
    """Token ids of each document followed by `eos_token_id` (the document separator in packed blocks)."""
    out = []
    for start in range(0, len(docs), batch_size):
        encoded = tokenizer(docs[start : start + batch_size], add_special_tokens=False)["input_ids"]
        out.extend(list(ids) + [eos_token_id] for ids in encoded)
    return out


def pack(token_lists: list[list[int]], seq_len: int) -> torch.LongTensor:
    """Concatenate and cut into `[num_blocks, seq_len]` (the tail shorter than a block is dropped)."""
    flat = torch.tensor([t for ids in token_lists for t in ids], dtype=torch.long)
    num_blocks = flat.numel() // seq_len
    return flat[: num_blocks * seq_len].view(num_blocks, seq_len)


@dataclass
class PackedData:
    """Packed train and validation blocks, and the deterministic order in which training visits them."""

    train: torch.LongTensor
    val: torch.LongTensor
    seed: int
    fingerprint: str

    @property
    def seq_len(self) -> int:
        return self.train.shape[1]

    def train_indices(
        self, micro_batch: int, rank: int, world_size: int, batch_size: int
    ) -> torch.LongTensor:
        """Block indices of `rank`'s share of global micro-batch `micro_batch` (each of `batch_size` blocks).

        The training stream is an endless sequence of epochs, each a seeded permutation of the blocks; global
        micro-batch k is stream positions `[k * B * W, (k + 1) * B * W)` and rank r takes the r-th `B` of them.
        """
        num_blocks = self.train.shape[0]
        start = (micro_batch * world_size + rank) * batch_size
        positions = torch.arange(start, start + batch_size)
        epochs = positions // num_blocks
        out = torch.empty(batch_size, dtype=torch.long)
        for epoch in epochs.unique().tolist():
            perm = torch.randperm(
                num_blocks, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            )
            chosen = epochs == epoch
            out[chosen] = perm[positions[chosen] % num_blocks]
        return out

    def train_batch(self, micro_batch: int, rank: int, world_size: int, batch_size: int) -> torch.LongTensor:
        return self.train[self.train_indices(micro_batch, rank, world_size, batch_size)]

    def val_batches(self, rank: int, world_size: int, batch_size: int, max_batches: int | None = None):
        """Yield `(blocks [B, T], valid [B] bool)`; every rank yields the same number of batches.

        The sharded Engram lookup is a collective, so ranks must run the same number of forwards: the last
        global batch is topped up with block 0, marked invalid.
        """
        num_val = self.val.shape[0]
        global_batch = batch_size * world_size
        num_batches = math.ceil(num_val / global_batch)
        if max_batches is not None:
            num_batches = min(num_batches, max_batches)
        for b in range(num_batches):
            positions = torch.arange(
                b * global_batch + rank * batch_size, b * global_batch + (rank + 1) * batch_size
            )
            valid = positions < num_val
            yield self.val[torch.where(valid, positions, 0)], valid


def split_documents(docs: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """A seeded document-level split: no validation document is ever trained on."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"--val-fraction {val_fraction} must be in (0, 1).")
    if len(docs) < 2:
        raise ValueError(
            f"The dataset has {len(docs)} document(s); a validation split needs at least 2 (documents are "
            "separated by blank lines in text files)."
        )
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed)).tolist()
    num_val = max(1, round(val_fraction * len(docs)))
    val_ids = set(order[:num_val])
    train = [d for i, d in enumerate(docs) if i not in val_ids]
    val = [d for i, d in enumerate(docs) if i in val_ids]
    return train, val


def prepare_data(
    docs: list[str],
    tokenizer,
    seq_len: int,
    eos_token_id: int,
    val_fraction: float = 0.05,
    seed: int = 0,
) -> PackedData:
    """Split documents, tokenise, pack into blocks of `seq_len` tokens. Errors name the option to change."""
    if seq_len < 2:
        raise ValueError(f"--seq-len {seq_len} must be at least 2.")
    train_docs, val_docs = split_documents(docs, val_fraction, seed)
    train = pack(tokenize_documents(train_docs, tokenizer, eos_token_id), seq_len)
    val = pack(tokenize_documents(val_docs, tokenizer, eos_token_id), seq_len)
    if train.shape[0] == 0:
        raise ValueError(f"The training split has fewer than --seq-len={seq_len} tokens: use more data.")
    if val.shape[0] == 0:
        raise ValueError(
            f"The validation split has fewer than --seq-len={seq_len} tokens: raise --val-fraction "
            f"(now {val_fraction}) or lower --seq-len."
        )
    digest = hashlib.sha256()
    for tensor in (train, val):
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.numpy().tobytes())
    return PackedData(train=train, val=val, seed=seed, fingerprint=digest.hexdigest()[:16])
