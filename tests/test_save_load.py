"""save_pretrained / from_pretrained, the Auto classes, and remote code in a process without engram_moe."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import build_model
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import engram_moe
from engram_moe import EngramMoEForCausalLM, EngramMoEModel


def ids():
    return torch.randint(3, 512, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def saved(tmp_path):
    model = build_model("tiny-engram-moe-hc4")
    token_map = torch.arange(512)
    token_map[3:] = torch.flip(token_map[3:], [0])
    model.set_engram_token_map(token_map)
    model.save_pretrained(tmp_path)
    return model, tmp_path


def test_round_trip_gives_identical_logits(saved):
    model, folder = saved
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert isinstance(loaded, EngramMoEForCausalLM)
    assert torch.equal(loaded.model.engram_token_map, model.model.engram_token_map)
    with torch.no_grad():
        assert torch.equal(loaded(ids()).logits, model(ids()).logits)


def test_folder_holds_safetensors_code_and_auto_map(saved):
    _, folder = saved
    files = set(os.listdir(folder))
    assert "model.safetensors" in files and "pytorch_model.bin" not in files
    assert {"configuration_engram.py", "modeling_engram.py", "engram_constants.py"} <= files
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "engram_moe"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_engram.EngramMoEForCausalLM"
    assert config["auto_map"]["AutoConfig"] == "configuration_engram.EngramMoEConfig"
    # Derived buffers are rebuilt from the config; only the token map is checkpoint data.
    keys = load_file(folder / "model.safetensors").keys()
    assert "model.engram_token_map" in keys
    assert not any(k.endswith(("offsets", "engram_multipliers", "engram_moduli")) for k in keys)


def test_auto_classes_are_registered():
    config = AutoConfig.for_model("engram_moe", **engram_moe.PRESETS["tiny-engram-moe"])
    assert isinstance(AutoModel.from_config(config), EngramMoEModel)
    assert isinstance(AutoModelForCausalLM.from_config(config), EngramMoEForCausalLM)


def test_remote_code_loads_without_the_package(saved, tmp_path_factory):
    model, folder = saved
    expected = tmp_path_factory.mktemp("expected") / "logits.pt"
    with torch.no_grad():
        torch.save({"ids": ids(), "logits": model(ids()).logits}, expected)
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["engram_moe"] = None  # any import of our package now fails, as on a machine without it
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        data = torch.load({str(expected)!r})
        with torch.no_grad():
            logits = model(data["ids"]).logits
        assert torch.equal(logits, data["logits"]), (logits - data["logits"]).abs().max()
        out = model.generate(data["ids"], attention_mask=torch.ones_like(data["ids"]), max_new_tokens=3,
                             do_sample=False, pad_token_id=0)
        print("OK", tuple(out.shape))
        """
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path_factory.mktemp("modules")), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path_factory.mktemp("cwd"),
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK (2, 13)" in result.stdout


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(OSError, match="does-not-exist"):
        EngramMoEForCausalLM.from_pretrained(tmp_path / "does-not-exist")


def test_checkpoint_with_another_compression_is_refused(saved, tmp_path):
    _, folder = saved
    config = json.loads((folder / "config.json").read_text())
    config["engram_compressed_vocab_size"] = 400
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="engram_multipliers"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_derived_buffers_are_rebuilt_on_load(saved):
    # from_pretrained builds on the meta device: every non-persistent buffer must come from _init_weights.
    model, folder = saved
    loaded = EngramMoEForCausalLM.from_pretrained(folder)
    fresh = dict(model.named_buffers())
    for name, buffer in loaded.named_buffers():
        assert torch.equal(buffer, fresh[name]), name
