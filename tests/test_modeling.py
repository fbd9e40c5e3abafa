"""The whole model: cached decoding, generation, padding, MoE equivalence with Mixtral, errors, outputs."""

import pytest
import torch
from conftest import build_model
from transformers import DynamicCache, MixtralConfig, MixtralForCausalLM

from engram_moe import get_preset, update_router_biases

PRESETS = ["tiny-engram-moe", "tiny-engram-moe-hc4"]


def random_ids(batch=2, length=12, seed=0, vocab=512):
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("preset", PRESETS)
def test_cached_decoding_equals_full_forward(preset):
    model = build_model(preset)
    ids = random_ids()
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :5], cache=DynamicCache(config=model.config), use_cache=True)
        steps = [out.logits]
        for t in range(5, ids.shape[1]):
            out = model(ids[:, t : t + 1], cache=out.cache, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("preset", PRESETS)
def test_chunked_prefill_shorter_than_the_context(preset):
    # A 1-token prefill is shorter than both the n-gram context (2) and the conv state (9 frames).
    model = build_model(preset)
    ids = random_ids(length=7, seed=1)
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :1], use_cache=True)
        first = out.logits
        out = model(ids[:, 1:4], cache=out.cache, use_cache=True)
        second = out.logits
        out = model(ids[:, 4:], cache=out.cache, use_cache=True)
    torch.testing.assert_close(torch.cat([first, second, out.logits], dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("preset", PRESETS)
def test_generate_with_and_without_cache_is_identical(preset):
    model = build_model(preset)
    ids = random_ids(length=6)
    mask = torch.ones_like(ids)
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kwargs), model.generate(ids, use_cache=False, **kwargs))


@pytest.mark.parametrize("preset", PRESETS)
def test_left_padded_batch_generates_like_each_sequence_alone(preset):
    model = build_model(preset)
    long, short = random_ids(1, 9, seed=2)[0], random_ids(1, 5, seed=3)[0]
    pad = 0
    batch = torch.stack([long, torch.cat([torch.full((4,), pad), short])])
    mask = torch.stack([torch.ones(9, dtype=torch.long), torch.tensor([0] * 4 + [1] * 5)])
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=pad)
    together = model.generate(batch, attention_mask=mask, **kwargs)
    alone_long = model.generate(long[None], attention_mask=torch.ones(1, 9, dtype=torch.long), **kwargs)
    alone_short = model.generate(short[None], attention_mask=torch.ones(1, 5, dtype=torch.long), **kwargs)
    assert torch.equal(together[0, 9:], alone_long[0, 9:])
    assert torch.equal(together[1, 9:], alone_short[0, 5:])


@pytest.mark.parametrize("preset", PRESETS)
def test_beam_search_with_cache_equals_without(preset):
    model = build_model(preset)
    ids = random_ids(length=6, seed=4)
    kwargs = dict(
        attention_mask=torch.ones_like(ids),
        max_new_tokens=6,
        num_beams=3,
        num_return_sequences=2,
        do_sample=False,
        pad_token_id=0,
    )
    cached = model.generate(ids, **kwargs)
    uncached = model.generate(ids, use_cache=False, **kwargs)
    assert cached.shape == (4, 12)
    assert torch.equal(cached, uncached)


def test_prompt_lookup_decoding_crops_the_cache_correctly():
    # Candidate tokens that get rejected are cropped from the cache, Engram conv and n-gram states included.
    model = build_model("tiny-engram-moe-hc4")
    pattern = random_ids(1, 4, seed=5)
    ids = torch.cat([pattern, pattern, pattern], dim=1)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, pad_token_id=0)
    greedy = model.generate(ids, **kwargs)
    assisted = model.generate(ids, prompt_lookup_num_tokens=3, **kwargs)
    assert torch.equal(greedy, assisted)


def test_sampling_is_reproducible_with_a_seed(tiny_model):
    ids = random_ids(length=4)
    kwargs = dict(
        attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=True, top_k=20, pad_token_id=0
    )
    torch.manual_seed(7)
    first = tiny_model.generate(ids, **kwargs)
    torch.manual_seed(7)
    assert torch.equal(first, tiny_model.generate(ids, **kwargs))


def test_matches_mixtral_without_engram():
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    ours = build_model(
        "tiny-moe", n_shared_experts=0, first_k_dense_replace=0, rope_parameters=rope, scoring_func="softmax"
    )
    c = ours.config
    mixtral = MixtralForCausalLM(
        MixtralConfig(
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            intermediate_size=c.moe_intermediate_size,
            num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads,
            num_local_experts=c.n_routed_experts,
            num_experts_per_tok=c.num_experts_per_tok,
            rms_norm_eps=c.rms_norm_eps,
            rope_parameters=rope,
            max_position_embeddings=c.max_position_embeddings,
            tie_word_embeddings=False,
        )
    ).eval()
    missing, unexpected = mixtral.load_state_dict(ours.state_dict(), strict=False)
    assert missing == []
    assert all(key.endswith("e_score_correction_bias") for key in unexpected)
    ids = random_ids(length=10)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, mixtral(ids).logits, atol=1e-5, rtol=1e-5)
        ours_out = ours(ids, output_router_logits=True, labels=ids)
        mixtral_out = mixtral(ids, output_router_logits=True, labels=ids)
    torch.testing.assert_close(ours_out.aux_loss, mixtral_out.aux_loss)
    torch.testing.assert_close(ours_out.loss, mixtral_out.loss)


def test_engram_changes_the_output(tiny_model):
    # Guard against an Engram path that silently contributes nothing.
    ids = random_ids()
    with torch.no_grad():
        before = tiny_model(ids).logits
        for layer in tiny_model.model.engram_layers:
            layer.value_proj.weight.zero_()
        after = tiny_model(ids).logits
    assert (before - after).abs().max() > 1e-4


def test_gates_are_returned_per_engram_layer():
    model = build_model("tiny-engram-moe-hc4")
    out = model(random_ids(), output_engram_gates=True)
    assert len(out.engram_gates) == 2
    for gates in out.engram_gates:
        assert gates.shape == (2, 12, 4)
        assert bool(((gates > 0) & (gates < 1)).all())


def test_out_of_range_token_ids_are_named(tiny_model):
    with pytest.raises(ValueError, match="512"):
        tiny_model(torch.tensor([[1, 512]]))
    with pytest.raises(ValueError, match="-3"):
        tiny_model(torch.tensor([[-3, 1]]))


def test_engram_needs_input_ids(tiny_model):
    with pytest.raises(ValueError, match="input_ids"):
        tiny_model(inputs_embeds=torch.randn(1, 3, 64))


def test_token_map_is_validated_and_used(tiny_model):
    config = tiny_model.config
    with pytest.raises(ValueError, match="compresses to 100"):
        tiny_model.set_engram_token_map(torch.arange(512) % 100)
    with pytest.raises(ValueError, match="vocab_size"):
        tiny_model.set_engram_token_map(torch.arange(600))
    ids = random_ids()
    with torch.no_grad():
        before = tiny_model(ids).logits
        token_map = torch.arange(512)
        token_map[3:] = torch.flip(token_map[3:], [0])  # a permutation that keeps the pad id
        tiny_model.set_engram_token_map(token_map)
        after = tiny_model(ids).logits
    assert config.engram_compressed_vocab_size == 512
    assert not torch.allclose(before, after)


def test_router_bias_moves_toward_balance():
    model = build_model("tiny-engram-moe", router_bias_update_speed=0.01, scoring_func="sigmoid")
    model.train()
    model(random_ids(4, 16))
    router = model.model.layers[1].mlp.gate
    load = router.tokens_per_expert.clone()
    assert load.sum() == 4 * 16 * model.config.num_experts_per_tok
    update_router_biases(model)
    expected = 0.01 * torch.sign(load.mean() - load)
    torch.testing.assert_close(router.e_score_correction_bias, expected)
    assert router.tokens_per_expert.sum() == 0


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = build_model("tiny-engram-moe-hc4")
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable()
        ids = random_ids()
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)


def test_tables_receive_gradients(tiny_model):
    tiny_model.train()
    ids = random_ids()
    tiny_model(ids, labels=ids).loss.backward()
    for layer in tiny_model.model.engram_layers:
        assert layer.embedding.weight.grad is not None
        assert layer.embedding.weight.grad.abs().sum() > 0


def test_dense_preset_has_no_experts():
    model = build_model("tiny-dense")
    assert not any("experts" in name for name, _ in model.named_parameters())
    assert get_preset("tiny-dense").n_routed_experts == 0


@torch.no_grad()
def test_packed_documents_attend_apart_but_engram_reads_across_the_boundary():
    """What the README says of packed batches (restarting position_ids, no mask, use_cache=False)."""
    torch.manual_seed(0)
    first, second = torch.randint(5, 200, (1, 7)), torch.randint(5, 200, (1, 6))
    packed = torch.cat([first, second], dim=1)
    positions = torch.cat([torch.arange(7), torch.arange(6)]).unsqueeze(0)
    moe = build_model("tiny-moe")
    torch.testing.assert_close(
        moe(packed, position_ids=positions, use_cache=False).logits[:, 7:], moe(second).logits
    )
    engram = build_model("tiny-engram-moe")
    packed_logits = engram(packed, position_ids=positions, use_cache=False).logits[:, 7:]
    assert not torch.allclose(packed_logits, engram(second).logits, atol=1e-4)
