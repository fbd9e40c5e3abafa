"""Training Engram-MoE models: sharded pre-training (`engram-train`) and Trainer / PEFT fine-tuning.

- `sharding`: row-sharded Engram tables served by All-to-All (`ShardedEmbedding`, `shard_engram_tables`).
- `pretrain`: the Accelerate training loop (`TrainConfig`, `train`).
- `checkpoint`: atomic, sharded, resumable checkpoints.
- `data`: documents -> packed token blocks with a deterministic order.
- `hf`: `EngramTrainer`, `RouterBiasUpdateCallback`, `engram_lora_config`, `train_only_engram_tables`,
  `PackedBlocks`.

Names are imported lazily, so `import engram_moe.training` pulls in neither Accelerate nor the Trainer.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ShardedEmbedding": "sharding",
    "shard_engram_tables": "sharding",
    "unshard_engram_tables": "sharding",
    "full_state_dict": "sharding",
    "TrainConfig": "pretrain",
    "TrainHooks": "pretrain",
    "NonFiniteLossError": "pretrain",
    "train": "pretrain",
    "save_checkpoint": "checkpoint",
    "load_checkpoint": "checkpoint",
    "latest_checkpoint": "checkpoint",
    "ByteTokenizer": "data",
    "load_documents": "data",
    "prepare_data": "data",
    "plot_loss_curves": "metrics",
    "EngramTrainer": "hf",
    "RouterBiasUpdateCallback": "hf",
    "engram_lora_config": "hf",
    "train_only_engram_tables": "hf",
    "PackedBlocks": "hf",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
