"""Tokenizer compression for Engram: the surjective map ``P: V -> V'`` from raw token ids to canonical ids.

Raw tokens that differ only in case, accents, Unicode compatibility form or surrounding whitespace are merged,
so that the hashed n-grams see ``" The"`` and ``"the"`` as the same token. The compressed vocabulary size
``|V'|`` sets the bound of the hash multipliers (see ``engram_constants.engram_layer_multipliers``), so the map
must be reproduced exactly: this implementation is bit-exact with the reference demo
(``engram_demo_v1.py``, deepseek-ai/Engram @ fb7f84a) on SmolLM2 (``|V'| = 32,873``) and DeepSeek-V3
(``|V'| = 98,627``).

The map is computed once from a tokenizer and stored with the checkpoint; a model never needs the tokenizer
at run time. This module needs ``tokenizers`` (the Rust normalisers give the exact Unicode tables the
reference uses) and ``torch``.
"""

from __future__ import annotations

import time

import torch

__all__ = [
    "build_token_map",
    "check_tokenizer_matches",
    "compressed_vocab_size",
    "key_normalizer",
    "map_pad_id",
    "token_map_config",
]

# Private-use code point that protects a text consisting of exactly one space from ``Strip``.
_SENTINEL = "\ue000"
_REPLACEMENT_CHARACTER = "\ufffd"
# Show a progress bar only when the map takes longer than this (seconds so far) and tqdm is installed.
_PROGRESS_AFTER_S = 2.0
_CHUNK = 4096


def key_normalizer():
    """The reference's normaliser chain, built from the Rust ``tokenizers`` normalisers.

    NFKC, NFD, StripAccents, Lowercase, collapse ``[ \\t\\r\\n]+`` to one space, protect a text that is exactly
    one space, Strip, restore the protected space.
    """
    from tokenizers import Regex, normalizers

    return normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.NFD(),
            normalizers.StripAccents(),
            normalizers.Lowercase(),
            normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
            normalizers.Replace(Regex(r"^ $"), _SENTINEL),
            normalizers.Strip(),
            normalizers.Replace(_SENTINEL, " "),
        ]
    )


def _decoder(tokenizer):
    """A function ``ids -> list of texts`` decoding every id on its own, special tokens kept.

    Uses the Rust backend (``backend_tokenizer.decode``, as DeepSeek-V4.1 does: no
    ``clean_up_tokenization_spaces``); falls back to ``tokenizer.decode`` for tokenizers without a backend.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:

        def decode_chunk(ids):
            # decode_batch runs the same decoder as decode([i]) for each sequence, in parallel.
            return backend.decode_batch([[i] for i in ids], skip_special_tokens=False)

    else:

        def decode_chunk(ids):
            return [tokenizer.decode([i], skip_special_tokens=False) for i in ids]

    return decode_chunk


def build_token_map(tokenizer) -> torch.LongTensor:
    """Compute the raw-id -> compressed-id table of ``tokenizer`` (length ``len(tokenizer)``, int64).

    For every raw id ``i`` in ``0 .. len(tokenizer) - 1``, in increasing order:

    * ``text`` = the single token decoded with special tokens kept;
    * if ``text`` contains U+FFFD (a partial UTF-8 byte token), the key is the raw token string
      (``convert_ids_to_tokens(i)``), so distinct byte tokens stay distinct;
    * otherwise the key is ``key_normalizer()`` applied to ``text``, or ``text`` itself if that is empty;
    * each new key gets the next compressed id (order of first appearance).

    Ids are therefore contiguous, ``0 .. |V'| - 1``, and ``compressed_vocab_size(map) == |V'|``.
    """
    try:
        n = len(tokenizer)
    except TypeError as err:
        raise TypeError(f"expected a tokenizer with a length, got {type(tokenizer).__name__}") from err
    if n <= 0:
        raise ValueError(f"the tokenizer has no tokens (len(tokenizer) == {n}); cannot build a token map.")

    normalizer = key_normalizer()
    decode_chunk = _decoder(tokenizer)
    key_to_id: dict[str, int] = {}
    table = [0] * n

    start = time.monotonic()
    bar = None
    try:
        for chunk_start in range(0, n, _CHUNK):
            ids = list(range(chunk_start, min(n, chunk_start + _CHUNK)))
            texts = decode_chunk(ids)
            for i, text in zip(ids, texts, strict=True):
                if _REPLACEMENT_CHARACTER in text:
                    key = tokenizer.convert_ids_to_tokens(i)
                    if key is None:
                        raise ValueError(
                            f"raw id {i} decodes to a partial byte sequence but has no token string."
                        )
                else:
                    key = normalizer.normalize_str(text) or text
                new_id = key_to_id.get(key)
                if new_id is None:
                    new_id = key_to_id[key] = len(key_to_id)
                table[i] = new_id
            if bar is None and time.monotonic() - start > _PROGRESS_AFTER_S:
                bar = _progress_bar(n, initial=chunk_start + len(ids))
            elif bar is not None:
                bar.update(len(ids))
    finally:
        if bar is not None:
            bar.close()
    return torch.tensor(table, dtype=torch.long)


def _progress_bar(total: int, initial: int):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency, but the bar is only cosmetic
        return None
    return tqdm(total=total, initial=initial, desc="Engram token map", unit="tok")


def _check_token_map(token_map) -> torch.Tensor:
    if not isinstance(token_map, torch.Tensor):
        token_map = torch.as_tensor(token_map)
    if token_map.dim() != 1 or token_map.numel() == 0:
        raise ValueError(f"token_map must be a non-empty 1-D tensor, got shape {tuple(token_map.shape)}.")
    if token_map.dtype.is_floating_point or token_map.dtype.is_complex or token_map.dtype == torch.bool:
        raise ValueError(f"token_map must hold integers, got {token_map.dtype}.")
    return token_map


def compressed_vocab_size(token_map) -> int:
    """``|V'|``: the number of compressed ids of a token map built by :func:`build_token_map`.

    Such a map uses every id in ``0 .. |V'| - 1``; a map with negative ids or gaps is rejected.
    """
    token_map = _check_token_map(token_map)
    if int(token_map.min()) < 0:
        raise ValueError("token_map contains negative compressed ids.")
    size = int(token_map.max()) + 1
    if torch.unique(token_map).numel() != size:
        raise ValueError(f"token_map's compressed ids are not contiguous 0..{size - 1}.")
    return size


def map_pad_id(token_map, raw_pad_id: int) -> int:
    """The compressed id of the raw pad id (the demo hashes positions before the start with it).

    ``raw_pad_id`` must be a valid raw id (``0 <= raw_pad_id < len(token_map)``). Negative ids pass through
    unchanged, as in the demo's lookup, which leaves negative ids alone.
    """
    token_map = _check_token_map(token_map)
    raw_pad_id = int(raw_pad_id)
    if raw_pad_id < 0:
        return raw_pad_id
    if raw_pad_id >= token_map.numel():
        raise ValueError(f"raw_pad_id={raw_pad_id} is outside the token map (length {token_map.numel()}).")
    return int(token_map[raw_pad_id])


def token_map_config(token_map, raw_pad_id: int = 2) -> dict:
    """The config fields a token map fixes: ``EngramMoEConfig(**preset, **token_map_config(map, pad))``.

    |V'| sets the hash multipliers and the compressed pad id fills positions before a sequence start, so both
    must be in the config before the model (and its multipliers) is built.
    """
    return {
        "engram_pad_id": int(raw_pad_id),
        "engram_compressed_vocab_size": compressed_vocab_size(token_map),
        "engram_compressed_pad_id": map_pad_id(token_map, raw_pad_id),
    }


def check_tokenizer_matches(model, tokenizer) -> None:
    """Raise ``ValueError`` if ``tokenizer`` is not the one the checkpoint's Engram token map was built from.

    A different tokenizer would send the same text to other n-gram rows: the model would silently read the
    wrong memory. Builds the tokenizer's map (seconds) and compares it with the model's saved map.
    """
    config = model.config
    if len(tokenizer) > config.vocab_size:
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} ids but the model's vocab_size is {config.vocab_size}: they do "
            "not belong together."
        )
    token_map = build_token_map(tokenizer)
    size = compressed_vocab_size(token_map)
    if size != config.engram_compressed_vocab_size:
        raise ValueError(
            f"The tokenizer compresses to {size} ids but the checkpoint was built for "
            f"engram_compressed_vocab_size={config.engram_compressed_vocab_size}."
        )
    saved = model.get_decoder().engram_token_map[: token_map.numel()].cpu()
    differing = (saved != token_map).nonzero().flatten()
    if differing.numel():
        raise ValueError(
            f"The tokenizer's compression differs from the checkpoint's token map at {differing.numel()} ids "
            f"(first: raw id {int(differing[0])})."
        )
