"""The token map travels with the checkpoint; a tokenizer that does not match it is refused."""

import pytest
import torch
from helpers_fixtures import load_tokenizer

from engram_moe import (
    EngramMoEForCausalLM,
    build_token_map,
    check_tokenizer_matches,
    get_preset,
    token_map_config,
)


@pytest.fixture(scope="module")
def smollm2():
    tokenizer = load_tokenizer("smollm2")
    return tokenizer, build_token_map(tokenizer)


def small_model(token_map, **overrides):
    config = get_preset(
        "tiny-engram-moe", vocab_size=49152, **token_map_config(token_map, raw_pad_id=2), **overrides
    )
    model = EngramMoEForCausalLM(config).eval()
    model.set_engram_token_map(token_map)
    return model


def test_token_map_config_reads_size_and_pad(smollm2):
    _, token_map = smollm2
    assert token_map_config(token_map, 2) == {
        "engram_pad_id": 2,
        "engram_compressed_vocab_size": 32873,
        "engram_compressed_pad_id": 2,
    }


def test_matching_tokenizer_passes_and_survives_save_load(smollm2, tmp_path):
    tokenizer, token_map = smollm2
    model = small_model(token_map)
    model.save_pretrained(tmp_path)
    loaded = EngramMoEForCausalLM.from_pretrained(tmp_path)
    check_tokenizer_matches(loaded, tokenizer)
    assert torch.equal(loaded.model.engram_token_map[:49152], token_map)


def test_compression_merges_case_and_space_variants(smollm2):
    tokenizer, token_map = smollm2
    the, space_the, cap_the = (tokenizer.convert_tokens_to_ids(t) for t in ("the", "Ġthe", "ĠThe"))
    assert token_map[the] == token_map[space_the] == token_map[cap_the]


def test_mismatched_tokenizer_is_named(smollm2):
    tokenizer, token_map = smollm2
    shuffled = token_map.clone()
    shuffled[[100, 200]] = shuffled[[200, 100]]
    model = small_model(shuffled)
    with pytest.raises(ValueError, match="first: raw id 100"):
        check_tokenizer_matches(model, tokenizer)


def test_tokenizer_larger_than_the_model_is_named(smollm2):
    tokenizer, _ = smollm2
    model = EngramMoEForCausalLM(get_preset("tiny-engram-moe"))
    with pytest.raises(ValueError, match="49152 ids"):
        check_tokenizer_matches(model, tokenizer)
