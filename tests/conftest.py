import pytest
import torch

from engram_moe import EngramMoEForCausalLM, get_preset


def build_model(preset: str = "tiny-engram-moe", seed: int = 0, **overrides) -> EngramMoEForCausalLM:
    """A tiny model in eval mode with a non-zero conv (so the conv path and its cache state matter)."""
    torch.manual_seed(seed)
    overrides.setdefault("engram_conv_zero_init", False)
    return EngramMoEForCausalLM(get_preset(preset, **overrides)).eval()


@pytest.fixture
def tiny_model():
    return build_model()
