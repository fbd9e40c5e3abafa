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


def assert_training_gradients_match(model, reference, ids, rtol, atol, attention_mask=None):
    """One training forward and backward of `model` and `reference` on `ids` (labels = ids): the same loss, and
    the same parameters getting gradients, equal within the tolerances. Returns both outputs (model's first)."""
    outputs = [m(ids, attention_mask=attention_mask, labels=ids) for m in (model, reference)]
    torch.testing.assert_close(outputs[0].loss, outputs[1].loss, rtol=rtol, atol=atol)
    for out in outputs:
        out.loss.backward()
    grads = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        assert (param.grad is None) == (grads[name].grad is None), name
        if param.grad is not None:
            torch.testing.assert_close(param.grad, grads[name].grad, rtol=rtol, atol=atol, msg=name)
    return outputs


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
    tokens, hc, hidden, use_conv, used, dtype=torch.float32, device="cpu"
):
    """Forward and every input's gradient of the Triton gate (kernel + backward kernel) against the PyTorch twin,
    with a loss over the outputs named in `used` (an output left out gets no gradient).

    Both are measured against the twin run in float64 (the truth): the kernels' relative (Frobenius) error must
    stay within 4x the twin's own at `dtype`, or under a floor (1e-4 in float32, 2e-2 in bfloat16). Elementwise
    tolerances would flag conditioning, not bugs: the norm weights' gradients are sums over every token, added in
    another order by the kernel, and a score near 0 amplifies its rounding error by 1/(2 sqrt|s|) (the signed
    square root) in any float32 implementation; a wrong term in a gradient gives errors of 1e-2 and more.
    """
    inputs = gate_inputs(tokens, hc, hidden, use_conv, dtype, device=device)
    truth_inputs = [t.detach().double().requires_grad_() if t is not None else None for t in inputs]
    eps = (1e-6, 1e-6, 1e-5)
    generator = torch.Generator().manual_seed(1)
    probes = [torch.randn(tokens, hc, generator=generator)] + [
        torch.randn(tokens, hc, hidden, generator=generator) for _ in range(2)
    ]
    runs = []
    for args, use_triton in ((truth_inputs, False), (inputs, False), (inputs, True)):
        outputs = engram_gate(*args, *eps, use_triton=use_triton)
        assert [o is None for o in outputs] == [False, False, not use_conv]
        loss = sum(
            (o.double() * p.to(o.device, torch.float64)).sum()
            for o, p, name in zip(outputs, probes, ("gate", "u", "normed"), strict=True)
            if name in used and o is not None
        )
        grads = torch.autograd.grad(loss, [t for t in args if t is not None])
        runs.append([o for o in outputs if o is not None] + list(grads))
    floor = {torch.float32: 1e-4, torch.bfloat16: 2e-2}[dtype]
    for index, (truth, twin, kernel) in enumerate(zip(*runs, strict=True)):
        assert kernel.dtype == twin.dtype and kernel.shape == twin.shape, index

        def error(x, truth=truth):
            return ((x.double() - truth).norm() / truth.norm().clamp_min(1e-30)).item()

        assert error(kernel) <= max(4 * error(twin), floor), (index, error(kernel), error(twin))
