"""Publishing: a Hub-ready folder (weights, code, tokenizer, card, results) that loads with remote code
alone, and a clear failure that leaves it complete when the Hub cannot be reached."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers_eval import BLOCK_ENGRAM_MOE, isolated_env, tiny_model, tiny_model_dir
from helpers_fixtures import fixture_path
from huggingface_hub import ModelCard

from engram_moe.cli.evaluate import main as engram_evaluate
from engram_moe.evaluation import load_results, prepare_hub_folder, push_folder

RESULTS = fixture_path("eval", "results_tiny.json")
REPO = "someone/tiny-engram-moe"
EXPECTED_FILES = {
    "README.md",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "modeling_engram.py",
    "configuration_engram.py",
    "engram_constants.py",
    "tokenizer.json",
    "tokenizer_config.json",
    "eval_results/results.json",
    "eval_results/summary.md",
}


def _publish_cli(args, env):
    return subprocess.run(
        [sys.executable, "-m", "engram_moe.cli.evaluate", "publish", *args],
        env=env,
        capture_output=True,
        text=True,
    )


@pytest.fixture(scope="module")
def unreachable(tmp_path_factory):
    """`publish` with the Hub endpoint pointed at a closed local port: the push fails, the folder stays."""
    tmp = tmp_path_factory.mktemp("publish")
    out = tmp / "hub-folder"
    env = isolated_env(tmp) | {
        "HF_HUB_OFFLINE": "0",
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "HF_TOKEN": "hf_test",
    }
    proc = _publish_cli(
        [str(tiny_model_dir()), "--repo-id", REPO, "--out", str(out), "--results", str(RESULTS)], env
    )
    return proc, out, tmp


def test_push_without_network_fails_clearly_and_keeps_the_folder(unreachable):
    proc, out, _ = unreachable
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert f"Could not push to {REPO} on the Hub at http://127.0.0.1:9" in proc.stderr
    assert f"The local folder {out} is complete" in proc.stderr
    assert f"engram-evaluate publish --push-only {out} --repo-id {REPO}" in proc.stderr
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert EXPECTED_FILES <= files
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".hub-folder")]  # no staging left
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_engram.EngramMoEForCausalLM"


def test_offline_mode_is_named_in_the_message(unreachable):
    _, out, tmp = unreachable
    before = sorted(p.name for p in out.iterdir())
    proc = _publish_cli(["--push-only", str(out), "--repo-id", REPO], isolated_env(tmp))  # HF_HUB_OFFLINE=1
    assert proc.returncode == 3
    assert "HF_HUB_OFFLINE is set" in proc.stderr and f"The local folder {out} is complete" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == before


def test_published_card_and_results(unreachable):
    _, out, _ = unreachable
    card = ModelCard.load(out / "README.md")
    assert card.data.model_name == "tiny-engram-moe"
    assert f"model_id = {REPO!r}" in card.text
    mmlu = load_results(RESULTS)["results"]["mmlu"]["acc,none"]
    assert f"| mmlu | acc | 57 | {100 * mmlu:.2f} |" in card.text
    assert load_results(out / "eval_results")["results"] == load_results(RESULTS)["results"]


def test_published_folder_loads_with_remote_code_alone(unreachable):
    _, out, tmp = unreachable
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 2]])
    with torch.no_grad():
        expected = tiny_model()(ids).logits
    torch.save({"ids": ids, "logits": expected}, tmp / "expected.pt")
    script = BLOCK_ENGRAM_MOE + textwrap.dedent(
        f"""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        try:
            import engram_moe
            raise SystemExit("engram_moe is importable")
        except ImportError:
            pass
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        tokenizer = AutoTokenizer.from_pretrained({str(out)!r}, trust_remote_code=True)
        assert len(tokenizer) == model.config.vocab_size
        data = torch.load({str(tmp / "expected.pt")!r})
        with torch.no_grad():
            logits = model(data["ids"]).logits
        torch.testing.assert_close(logits, data["logits"])
        print("OK")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-I", "-c", script], cwd=tmp, env=isolated_env(tmp), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("OK")


def test_prepare_refuses_to_overwrite_and_bad_arguments(unreachable, tmp_path, capsys):
    _, out, _ = unreachable
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare_hub_folder(tiny_model_dir(), out)
    with pytest.raises(ValueError, match="must differ"):
        prepare_hub_folder(tiny_model_dir(), tiny_model_dir(), overwrite=True)
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        prepare_hub_folder(tmp_path, tmp_path / "x")
    with pytest.raises(ValueError, match="user-or-org/name"):
        push_folder(out, "no-slash")
    with pytest.raises(FileNotFoundError, match="not a prepared folder"):
        push_folder(tmp_path, REPO)
    with pytest.raises(SystemExit) as exit_info:
        engram_evaluate(["publish", "--repo-id", REPO])
    assert exit_info.value.code == 2 and "needs a model folder and --out" in capsys.readouterr().err


def test_no_push_prepares_only(tmp_path, capsys):
    out = tmp_path / "folder"
    assert (
        engram_evaluate(["publish", str(tiny_model_dir()), "--repo-id", REPO, "--out", str(out), "--no-push"])
        == 0
    )
    assert f"Prepared {out}" in capsys.readouterr().out
    assert (out / "README.md").is_file() and not (out / "eval_results").exists()
    assert "Not evaluated yet" in (out / "README.md").read_text()
