"""Load weights of the reference demo's `Engram` module (`engram_demo_v1.py`) into our `EngramLayer`.

The demo keeps one key projection and one RMSNorm module per residual branch; we fuse the branches (one
`key_proj` with `hc * hidden` outputs, norms as `[hc, hidden]` weights). The demo also saves the head offsets
as a buffer; ours are derived from the config, so the converter checks them instead of copying them.

    config = reference_engram_config(hidden_size=32, hc_mult=4, engram_vocab_size=[101, 103], ...)
    layer = EngramLayer(config, layer_idx=1)
    layer.load_state_dict(convert_reference_state_dict(demo_state_dict, config, layer_idx=1))
"""

from __future__ import annotations

import re

import torch

from .configuration_engram import EngramMoEConfig

_BRANCH = re.compile(r"^(key_projs|norm1|norm2|short_conv\.norms)\.(\d+)\.(weight|bias)$")
_RENAMES = {
    "multi_head_embedding.embedding.weight": "embedding.weight",
    "short_conv.conv.weight": "conv.weight",
    "value_proj.weight": "value_proj.weight",
    "value_proj.bias": "value_proj.bias",
}
_BRANCH_TARGETS = {
    "key_projs": "key_proj",
    "norm1": "key_norm",
    "norm2": "query_norm",
    "short_conv.norms": "conv_norm",
}


def reference_engram_config(**overrides) -> EngramMoEConfig:
    """A config whose Engram layers make the demo's choices: linear biases, gate-norm eps = finfo(dtype).eps,
    a conv that is not zero-initialised, tables initialised N(0, 1), and padding hashed like any token."""
    kwargs = dict(
        engram_use_bias=True,
        engram_gate_norm_eps=None,
        engram_conv_norm_eps=1e-5,
        engram_use_conv=True,
        engram_conv_zero_init=False,
        engram_init_std=1.0,
        engram_reset_on_padding=False,
    )
    kwargs.update(overrides)
    return EngramMoEConfig(**kwargs)


def convert_reference_state_dict(
    state_dict: dict[str, torch.Tensor], config: EngramMoEConfig, layer_idx: int
) -> dict[str, torch.Tensor]:
    """Map a demo `Engram` state dict onto `EngramLayer(config, layer_idx)` parameter names.

    Raises `ValueError` naming the key for unknown or missing names, shape mismatches, and demo offsets that
    disagree with the config's primes (the weights would then be looked up at the wrong rows).
    """
    hc, hidden = config.hc_mult, config.hidden_size
    converted: dict[str, torch.Tensor] = {}
    branches: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if key == "multi_head_embedding.offsets":
            expected = config.engram_head_offsets[config.engram_layer_ids.index(layer_idx)]
            if value.tolist() != expected:
                raise ValueError(
                    f"multi_head_embedding.offsets={value.tolist()} but the config gives {expected}."
                )
        elif key in _RENAMES:
            converted[_RENAMES[key]] = value
        elif match := _BRANCH.match(key):
            name, branch, kind = match.group(1), int(match.group(2)), match.group(3)
            if branch >= hc:
                raise ValueError(f"{key}: branch {branch} but config.hc_mult is {hc}.")
            branches.setdefault((name, kind), {})[branch] = value
        else:
            raise ValueError(f"Unknown reference parameter {key!r}.")
    for (name, kind), per_branch in branches.items():
        if sorted(per_branch) != list(range(hc)):
            raise ValueError(f"{name}.*.{kind}: got branches {sorted(per_branch)}, expected 0..{hc - 1}.")
        stacked = [per_branch[i] for i in range(hc)]
        # key_projs: [hidden, d_mem] per branch -> rows of one [hc*hidden, d_mem] matrix; norms: [hc, hidden].
        converted[f"{_BRANCH_TARGETS[name]}.{kind}"] = (
            torch.cat(stacked, dim=0) if name == "key_projs" else torch.stack(stacked, dim=0)
        )
    if "conv.weight" in converted and converted["conv.weight"].shape[0] != hc * hidden:
        raise ValueError(
            f"short_conv.conv.weight has {converted['conv.weight'].shape[0]} channels, expected hc*hidden={hc * hidden}."
        )
    return converted
