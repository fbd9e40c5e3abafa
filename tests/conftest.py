import pytest
import torch

from engram_moe import EngramMoEForCausalLM, get_preset
from engram_moe.engram_kernels import engram_gate


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


def gate_inputs(tokens, hc, hidden, use_conv, dtype=torch.float32, device="cpu", seed=0):
    """Random gate inputs (leaf tensors that want gradients), one token with a zero key (score 0: sign(0) = 0)."""
    generator = torch.Generator().manual_seed(seed)

    def leaf(*shape, offset=0.0):
        return (torch.randn(*shape, generator=generator) + offset).to(device, dtype).requires_grad_()

    key, query, value = leaf(tokens, hc, hidden), leaf(tokens, hc, hidden), leaf(tokens, hidden)
    with torch.no_grad():
        key[1] = 0
    norm_weights = [leaf(hc, hidden, offset=1.0) for _ in range(3 if use_conv else 2)]
    return key, query, value, *norm_weights, *([] if use_conv else [None])


def assert_gate_gradients_match_the_twin(
    tokens, hc, hidden, use_conv, used, rtol, atol, dtype=torch.float32, device="cpu"
):
    """Forward and every input's gradient of the Triton gate (kernel + backward kernel) against the PyTorch twin,
    with a loss over the outputs named in `used` (an output left out gets no gradient)."""
    inputs = gate_inputs(tokens, hc, hidden, use_conv, dtype, device=device)
    leaves = [t for t in inputs if t is not None]
    eps = (1e-6, 1e-6, 1e-5)
    expected = engram_gate(*inputs, *eps, use_triton=False)
    got = engram_gate(*inputs, *eps, use_triton=True)
    generator = torch.Generator().manual_seed(1)
    probes = [torch.randn(o.shape, generator=generator).to(o) if o is not None else None for o in expected]
    losses = [
        sum(
            (o.float() * p.float()).sum()
            for o, p, name in zip(outputs, probes, ("gate", "u", "normed"), strict=True)
            if name in used and o is not None
        )
        for outputs in (expected, got)
    ]
    for want, have in zip(expected, got, strict=True):
        assert (want is None) == (have is None)
        if want is not None:
            torch.testing.assert_close(have, want, rtol=rtol, atol=atol)
    grads_want = torch.autograd.grad(losses[0], leaves)
    grads_have = torch.autograd.grad(losses[1], leaves)
    for index, (want, have) in enumerate(zip(grads_want, grads_have, strict=True)):
        torch.testing.assert_close(have, want, rtol=rtol, atol=atol, msg=lambda m, i=index: f"input {i}: {m}")
