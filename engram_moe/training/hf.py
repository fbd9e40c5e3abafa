"""Fine-tuning with `transformers.Trainer` and PEFT.

- `EngramTrainer`: a `Trainer` whose optimizer follows the paper (AdamW for the backbone; the Engram tables in
  their own group with `engram_lr_multiplier` x the learning rate and no weight decay), and which adds
  `RouterBiasUpdateCallback` when the model uses auxiliary-loss-free balancing.
- `RouterBiasUpdateCallback`: calls `update_router_biases` after every optimizer step.
- `engram_lora_config(...)`: a PEFT `LoraConfig` on the attention projections and the 3-D expert weights.
- `train_only_engram_tables(model)`: memory-only fine-tuning (every other parameter frozen).
- `PackedBlocks`: packed token blocks as a `Dataset` of `{"input_ids", "labels"}` for the Trainer.

Trainer runs replicate the whole model on every device (DDP); the sharded tables of `engram-train` are not
used here.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from ..modeling_engram import EngramMoERouter, update_router_biases
from ..optim import ENGRAM_TABLE_LR_MULTIPLIER, engram_param_groups, engram_table_parameter_names

ATTENTION_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _engram_config(model: nn.Module):
    """The EngramMoEConfig of a model, a PEFT model or a DDP wrapper."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "router_bias_update_speed"):
            return config
    return None


class RouterBiasUpdateCallback(TrainerCallback):
    """Auxiliary-loss-free MoE balancing under the Trainer: one `update_router_biases` per optimizer step."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        config = _engram_config(model)
        speed = config.router_bias_update_speed if config is not None else 0.0
        if speed > 0:
            update_router_biases(model, speed=speed)


class EngramTrainer(Trainer):
    """`transformers.Trainer` with the paper's optimizer groups (see `engram_moe.optim.engram_param_groups`).

    Extra keyword argument: `engram_lr_multiplier` (default 5). Uses `args.learning_rate`,
    `args.weight_decay`, `args.adam_beta1/2`, `args.adam_epsilon` and the optimizer class of `args.optim`.
    """

    def __init__(self, *args, engram_lr_multiplier: float = ENGRAM_TABLE_LR_MULTIPLIER, **kwargs):
        super().__init__(*args, **kwargs)
        self.engram_lr_multiplier = engram_lr_multiplier
        config = _engram_config(self.model)
        has_callback = any(isinstance(cb, RouterBiasUpdateCallback) for cb in self.callback_handler.callbacks)
        if config is not None and config.router_bias_update_speed > 0 and not has_callback:
            self.add_callback(RouterBiasUpdateCallback())

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        opt_model = self.model if model is None else model
        if self.optimizer is None:
            groups = engram_param_groups(
                opt_model, self.args.learning_rate, self.args.weight_decay, self.engram_lr_multiplier
            )
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            for key in ("params", "model", "optimizer_dict"):
                if key in optimizer_kwargs:
                    raise ValueError(
                        f"EngramTrainer builds its own parameter groups; --optim {self.args.optim!r} needs "
                        f"{key!r} and is not supported. Use an AdamW variant (adamw_torch, adamw_torch_fused)."
                    )
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer


def engram_lora_config(
    r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.0,
    attention: bool = True,
    experts: bool = True,
    **kwargs,
):
    """A PEFT `LoraConfig` for Engram-MoE: attention projections and the 3-D routed-expert weights.

    The expert weights are `nn.Parameter`s (not `nn.Linear`s), reached through PEFT's `target_parameters`.
    Extra keyword arguments go to `LoraConfig` (e.g. `modules_to_save`, `init_lora_weights`).
    """
    from peft import LoraConfig

    if not (attention or experts):
        raise ValueError("engram_lora_config needs attention=True or experts=True (or both).")
    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=list(ATTENTION_PROJECTIONS) if attention else [],
        target_parameters=list(EXPERT_PARAMETERS) if experts else None,
        task_type="CAUSAL_LM",
        **kwargs,
    )


def train_only_engram_tables(model: nn.Module) -> list[str]:
    """Memory-only fine-tuning: freeze everything but the Engram tables. Returns the trainable names.

    The router biases are buffers, not parameters; set `router_bias_update_speed=0` in the config to keep
    them fixed as well.
    """
    tables = engram_table_parameter_names(model)
    if not tables:
        raise ValueError("The model has no Engram tables (engram_layer_ids is empty): nothing would train.")
    for name, param in model.named_parameters():
        param.requires_grad_(name in tables)
    return sorted(tables)


def router_modules(model: nn.Module) -> list[EngramMoERouter]:
    return [m for m in model.modules() if isinstance(m, EngramMoERouter)]


class PackedBlocks(torch.utils.data.Dataset):
    """`[num_blocks, seq_len]` token blocks as causal-LM examples (`labels` = `input_ids`; the model shifts)."""

    def __init__(self, blocks: torch.LongTensor):
        if blocks.dim() != 2:
            raise ValueError(f"blocks must be [num_blocks, seq_len], got shape {tuple(blocks.shape)}.")
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict:
        block = self.blocks[index]
        return {"input_ids": block, "labels": block.clone()}

    @classmethod
    def from_texts(
        cls,
        docs: list[str],
        tokenizer,
        seq_len: int,
        eos_token_id: int,
        val_fraction: float = 0.05,
        seed: int = 0,
    ) -> tuple[PackedBlocks, PackedBlocks]:
        """Train and validation datasets from documents (document-level split, then tokenise and pack)."""
        from .data import prepare_data

        data = prepare_data(docs, tokenizer, seq_len, eos_token_id, val_fraction, seed)
        return cls(data.train), cls(data.val)
