"""Optimizer parameter groups as the paper trains Engram models.

The Engram tables get their own group: Adam with the learning rate x5 and no weight decay (paper, section 4.1).
The backbone follows the usual AdamW split: matrices decay, norms, biases and 1-D parameters do not.
"""

from __future__ import annotations

from torch import nn

from .modeling_engram import EngramLayer

ENGRAM_TABLE_LR_MULTIPLIER = 5.0


def engram_table_parameter_names(model: nn.Module) -> set[str]:
    """Qualified names of every Engram table weight in `model` (PEFT wrappers included)."""
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, EngramLayer):
            names.add(f"{module_name}.embedding.weight" if module_name else "embedding.weight")
    return names


def engram_param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.1,
    engram_lr_multiplier: float = ENGRAM_TABLE_LR_MULTIPLIER,
) -> list[dict]:
    """Parameter groups for `torch.optim.AdamW`: backbone (decay / no decay) and Engram tables (x5 LR, no decay).

    Only parameters with `requires_grad` are included, so frozen parts (PEFT, memory-only fine-tuning) drop out.
    Each group carries a `name` for logging and schedulers.
    """
    tables = engram_table_parameter_names(model)
    decay, no_decay, table_params = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name in tables:
            table_params.append(param)
        elif param.ndim < 2 or name.endswith(".bias") or "norm" in name.split(".")[-2]:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [
        {"name": "backbone", "params": decay, "lr": lr, "weight_decay": weight_decay},
        {"name": "backbone_no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0},
        {
            "name": "engram_tables",
            "params": table_params,
            "lr": lr * engram_lr_multiplier,
            "weight_decay": 0.0,
        },
    ]
    return [group for group in groups if group["params"]]
