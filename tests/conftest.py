import pytest
import torch

from engram_moe import EngramMoEForCausalLM, get_preset


def build_model(preset: str = "tiny-engram-moe", seed: int = 0, **overrides) -> EngramMoEForCausalLM:
    """A tiny model in eval mode with a non-zero conv (so the conv path and its cache state matter)."""
    torch.manual_seed(seed)
    overrides.setdefault("engram_conv_zero_init", False)
    return EngramMoEForCausalLM(get_preset(preset, **overrides)).eval()


@torch.no_grad()
def assert_generates_like(model, reference, ids, attention_mask, max_new_tokens):
    """`model` and `reference` decode the same greedy tokens from a (left-padded) batch."""
    kwargs = dict(attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=False)
    assert torch.equal(model.generate(ids, **kwargs), reference.generate(ids, **kwargs))


@torch.no_grad()
def assert_matches_reference(model, reference, ids, attention_mask, max_new_tokens, rtol, atol):
    """`model` equals `reference` on a (left-padded) batch: logits within tolerance, then greedy generation."""
    torch.testing.assert_close(
        model(ids, attention_mask=attention_mask).logits,
        reference(ids, attention_mask=attention_mask).logits,
        rtol=rtol,
        atol=atol,
    )
    assert_generates_like(model, reference, ids, attention_mask, max_new_tokens)


@pytest.fixture
def tiny_model():
    return build_model()
