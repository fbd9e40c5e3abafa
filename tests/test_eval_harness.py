"""lm-evaluation-harness on a tiny Engram-MoE from local data: the Python API (model in memory), the
`lm_eval` CLI on a saved folder (remote code), and `engram-evaluate run`. Each runs MMLU, BBH, HumanEval
and NIAH with --limit 1 (NIAH at 512 tokens) and checks the results JSON."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers_eval import eval_data_dir, isolated_env, tiny_model, tiny_model_dir
from helpers_fixtures import load_tokenizer

from engram_moe.cli.evaluate import main as engram_evaluate
from engram_moe.evaluation import evaluate, load_results, summary_rows
from engram_moe.evaluation.tasks import write_task_configs

NIAH = ("niah_single_1", "niah_multikey_2", "niah_multikey_3")


def _check_suites(results: dict, niah_tasks=NIAH, length: int = 512) -> None:
    res, n = results["results"], results["n-samples"]
    assert 0.0 <= res["mmlu"]["acc,none"] <= 1.0
    mmlu_subjects = [t for t in results["group_subtasks"]["mmlu_stem"]] + [
        t
        for g in ("mmlu_other", "mmlu_social_sciences", "mmlu_humanities")
        for t in results["group_subtasks"][g]
    ]
    assert len(mmlu_subjects) == 57 and all(n[t]["effective"] == 1 for t in mmlu_subjects)
    assert n["mmlu_anatomy"]["original"] == 135  # the local test split, not a stub
    assert 0.0 <= res["bbh"]["exact_match,get-answer"] <= 1.0  # lm-eval's `bbh`: 3-shot chain of thought
    assert len(results["group_subtasks"]["bbh"]) == 27
    assert n["bbh_cot_fewshot_navigate"]["original"] == 250
    assert res["humaneval"]["pass@1,create_test"] in (0.0, 1.0)
    assert n["humaneval"]["original"] == 164
    for task in niah_tasks:
        assert 0.0 <= res[task][f"{length},none"] <= 1.0
    for task in ("mmlu_anatomy", "bbh_cot_fewshot_navigate", "humaneval"):
        config = results["configs"][task]
        assert config["dataset_path"] == "json"
        files = [Path(f) for f in config["dataset_kwargs"]["data_files"].values()]
        assert all(f.is_relative_to(eval_data_dir().resolve()) for f in files), files


@pytest.fixture(scope="module")
def api_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("api")
    model, tokenizer = tiny_model(), load_tokenizer("smollm2")
    results = evaluate(
        model,
        "mmlu,bbh,humaneval,niah",
        tokenizer=tokenizer,
        data_dir=eval_data_dir(),
        output_dir=out,
        limit=1,
        max_gen_toks=4,
        max_seq_lengths=[512],
        confirm_run_unsafe_code=True,
        log_samples=True,
        batch_size=8,
        bootstrap_iters=0,
    )
    return model, tokenizer, results, out


def test_python_api_on_a_model_in_memory(api_run):
    _, _, results, out = api_run
    _check_suites(results)
    saved = load_results(out)
    assert saved["results"]["mmlu"]["acc,none"] == pytest.approx(results["results"]["mmlu"]["acc,none"])
    assert saved["engram_eval"]["limit"] == 1 and saved["engram_eval"]["niah_max_seq_lengths"] == [512]
    assert saved["engram_eval"]["data"]["mmlu"]["test_items"] == 14042
    assert "samples" not in saved and (out / "samples_mmlu_anatomy.jsonl").is_file()
    summary = (out / "summary.md").read_text()
    mmlu_row = f"| mmlu | acc | 57 | {100 * results['results']['mmlu']['acc,none']:.2f} |"
    assert mmlu_row in summary
    assert [r["task"] for r in summary_rows(results)] == ["mmlu", "bbh", "humaneval", *NIAH]


def test_lm_eval_loglikelihoods_are_the_models_own(api_run):
    """lm-eval's MMLU scores equal log p(choice | prompt) computed directly with the model."""
    model, tokenizer, results, _ = api_run
    sample = results["samples"]["mmlu_anatomy"][0]
    for (context, continuation), resp in zip(sample["arguments"], sample["resps"], strict=True):
        whole = tokenizer(context + continuation)["input_ids"]
        n_context = len(tokenizer(context)["input_ids"])
        ids = torch.tensor([whole])
        with torch.no_grad():
            logprobs = model(ids).logits[0, :-1].float().log_softmax(-1)
        targets = ids[0, n_context:]
        expected = logprobs[n_context - 1 :].gather(-1, targets[:, None]).sum()
        torch.testing.assert_close(torch.tensor(float(resp[0][0])), expected, atol=1e-4, rtol=1e-4)
    predicted = max(range(4), key=lambda i: float(sample["resps"][i][0][0]))
    assert sample["acc"] == float(predicted == sample["target"])


def _lm_eval_command() -> list[str]:
    script = Path(sys.executable).with_name("lm_eval")
    return [str(script)] if script.exists() else [shutil.which("lm_eval") or "lm_eval"]


def test_lm_eval_cli_on_a_saved_folder(tmp_path):
    include = tmp_path / "tasks"
    write_task_configs(eval_data_dir(), include)
    out = tmp_path / "out"
    cmd = _lm_eval_command() + [
        "--model", "hf",
        "--model_args", f"pretrained={tiny_model_dir()},trust_remote_code=True,max_length=1024",
        "--device", "cpu",
        "--tasks", "mmlu,bbh,humaneval,niah_single_1",
        "--include_path", str(include),
        "--limit", "1",
        "--batch_size", "8",
        "--gen_kwargs", "max_gen_toks=4",
        "--metadata", json.dumps({"max_seq_lengths": [512]}),
        "--confirm_run_unsafe_code",
        "--output_path", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=isolated_env(tmp_path), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = load_results(out)
    _check_suites(results, niah_tasks=("niah_single_1",))
    assert results["config"]["model_args"]["trust_remote_code"] is True


def test_engram_evaluate_run_on_a_saved_folder(tmp_path, capsys):
    code = engram_evaluate(
        [
            str(tiny_model_dir()),
            "--tasks", "mmlu_anatomy,humaneval",
            "--data-dir", str(eval_data_dir()),
            "--output-dir", str(tmp_path),
            "--limit", "2",
            "--device", "cpu",
            "--max-gen-toks", "4",
            "--confirm-run-unsafe-code",
            "--bootstrap-iters", "0",
        ]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    results = load_results(tmp_path / "results.json")
    assert results["n-samples"]["mmlu_anatomy"] == {"original": 135, "effective": 2}
    assert results["n-samples"]["humaneval"] == {"original": 164, "effective": 2}
    acc = results["results"]["mmlu_anatomy"]["acc,none"]
    assert f"| mmlu_anatomy | acc | 2 | {100 * acc:.2f} |" in printed


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "M", "--output-dir", "o", "--limit", "0"], "--limit takes a positive count"),
        (["run", "M", "--output-dir", "o", "--limit", "2.5"], "--limit takes a positive count"),
        (["run", "M", "--output-dir", "o", "--batch-size", "big"], "expected a positive integer, got 'big'"),
        (["run", "M", "--output-dir", "o", "--batch-size", "auto:x"], "'auto' or 'auto:N'"),
        (["run", "M", "--output-dir", "o", "--dtype", "float8"], "invalid choice: 'float8'"),
        (["run", "M", "--output-dir", "o", "--max-seq-lengths", "4096,-1"], "got '-1'"),
        (["run", "M", "--output-dir", "o", "--gen-kwargs", "[1]"], "expected a JSON object"),
        (["run", "M"], "the following arguments are required: --output-dir"),
        (["prepare-data", "--suites", "gsm8k"], "Unknown data suite"),
        (["table", "missing.json"], "missing.json"),
    ],
)
def test_bad_flags_are_clear_errors(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ENGRAM_EVAL_DATA", str(tmp_path / "data"))
    with pytest.raises(SystemExit) as exit_info:
        engram_evaluate(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_run_arguments_fail_before_any_work(tmp_path):
    folder = str(tiny_model_dir())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate(str(tmp_path / "nope"), "mmlu", data_dir=eval_data_dir())
    with pytest.raises(ValueError, match="needs its tokenizer"):
        evaluate(tiny_model(), "mmlu", data_dir=eval_data_dir())
    with pytest.raises(PermissionError, match="--confirm-run-unsafe-code"):
        evaluate(folder, "humaneval", data_dir=eval_data_dir())
    with pytest.raises(ValueError, match="NIAH at 4096 tokens.*is 1024.*--max-length 4096"):
        evaluate(folder, "niah", device="cpu")
    with pytest.raises(FileNotFoundError, match="prepare-data"):
        evaluate(folder, "bbh", data_dir=tmp_path, device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            evaluate(folder, "mmlu", device="cuda", data_dir=eval_data_dir())
    with pytest.raises(ValueError, match="not a torch device"):
        evaluate(folder, "mmlu", device="tpu:x", data_dir=eval_data_dir())
    with pytest.raises(ValueError, match="No tasks given"):
        evaluate(folder, " , ", data_dir=eval_data_dir())
