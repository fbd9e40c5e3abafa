"""Model cards: parameter counts, the numbers of a results file, training metadata, a usage snippet that runs."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_eval import BLOCK_ENGRAM_MOE, isolated_env, tiny_model, tiny_model_dir
from helpers_fixtures import fixture_path
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import eval_results_to_model_index

from engram_moe.cli.evaluate import main as engram_evaluate
from engram_moe.evaluation import count_parameters, load_results, render_model_card, summary_rows
from engram_moe.evaluation.harness import _metric_label, merge_results
from engram_moe.evaluation.model_card import _evaluation, _model_index

RESULTS = fixture_path("eval", "results_tiny.json")


def test_parameter_counts_match_a_count_by_hand():
    model = tiny_model()
    c = model.config
    counts = count_parameters(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    head_dim = c.engram_embed_dim_per_ngram // c.engram_num_heads
    tables = sum(sum(sum(order) for order in layer) for layer in c.engram_primes) * head_dim
    moe_layers = c.num_hidden_layers - c.first_k_dense_replace
    routed = moe_layers * c.n_routed_experts * 3 * c.hidden_size * c.moe_intermediate_size
    rows_per_token = len(c.engram_layer_ids) * (c.engram_max_ngram_size - 1) * c.engram_num_heads
    assert counts["engram_tables"] == tables
    assert counts["routed_experts"] == routed
    assert counts["engram_rows_per_token"] == rows_per_token
    skipped_experts = routed * (c.n_routed_experts - c.num_experts_per_tok) // c.n_routed_experts
    assert counts["activated"] == counts["total"] - skipped_experts - tables + rows_per_token * head_dim


@pytest.fixture(scope="module")
def card() -> str:
    return render_model_card(tiny_model_dir(), RESULTS, model_id=str(tiny_model_dir()))


def test_card_holds_the_numbers_of_the_results_file(card):
    rows = summary_rows(load_results(RESULTS))
    assert [r["task"] for r in rows] == [
        "mmlu",
        "bbh",
        "humaneval",
        "niah_single_1",
        "niah_multikey_2",
        "niah_multikey_3",
    ]
    for r in rows:
        assert f"| {r['task']} | {_metric_label(r)} | {r['n']} | {100 * r['value']:.2f} |" in card
    assert "Some tasks ran on a subset" in card
    settings = (
        "shots differ per task (see n-shot); at most 1 documents per task; generations capped at 4 tokens"
    )
    assert f"- mmlu, bbh, humaneval, niah_single_1, niah_multikey_2, niah_multikey_3: {settings}" in card
    parsed = ModelCard(card)
    assert parsed.data.license == "apache-2.0" and "custom_code" in parsed.data.tags
    by_dataset = {(e.dataset_name, e.metric_type): e.metric_value for e in parsed.data.eval_results}
    mmlu = next(r for r in rows if r["task"] == "mmlu")
    assert by_dataset[("MMLU", "acc")] == round(100 * mmlu["value"], 2)
    assert ("RULER niah_multikey_3 (512 tokens, synthetic)", "string_match_all") in by_dataset


def test_each_bbh_variant_is_its_own_hub_entry():
    """Answer-only and chain-of-thought BBH read one dataset; the Hub must not fold them into one entry."""
    results = load_results(RESULTS)
    bbh = next(r for r in summary_rows(results) if r["task"] == "bbh")
    rows = [
        {**bbh, "task": t, "value": v} for t, v in (("bbh_fewshot_strip", 0.25), ("bbh_cot_fewshot", 0.125))
    ]
    index = eval_results_to_model_index("m", _model_index("m", rows))
    values = {e["dataset"]["name"]: [m["value"] for m in e["metrics"]] for e in index[0]["results"]}
    assert values == {
        "BIG-Bench Hard (bbh_fewshot_strip)": [25.0],
        "BIG-Bench Hard (bbh_cot_fewshot)": [12.5],
    }
    results["results"]["bbh_cot_fewshot"] = results["results"].pop("bbh")
    results["group_subtasks"]["bbh_cot_fewshot"] = results["group_subtasks"].pop("bbh")
    assert any(
        n.startswith("bbh_cot_fewshot is lm-eval's 3-shot chain-of-thought")
        for n in _evaluation(results)["notes"]
    )


def test_card_describes_the_architecture(card):
    model = tiny_model()
    counts = count_parameters(model)
    assert "| Hidden size | 32 |" in card
    assert "| Engram layers (0-based) | 1, 2 |" in card
    assert "| Routed experts, top-k, shared experts | 4, 2, 1 |" in card
    assert f"| Total | {counts['total']:,} |" in card
    assert f"| Activated per token | {counts['activated']:,} |" in card
    assert f"| Engram tables (all layers) | {counts['engram_tables']:,} |" in card
    assert "No training metadata was found" in card


def test_training_metadata_of_an_engram_train_run(tmp_path):
    run = tmp_path / "run"
    final = run / "final"
    shutil.copytree(tiny_model_dir(), final)
    train_config = {"model": "tiny-engram-moe", "dataset": "embedded", "seq_len": 256, "batch_size": 8}
    train_config |= {"max_steps": 1000, "lr": 0.001, "output_dir": "runs/x", "progress": True}
    (final / "train_config.json").write_text(json.dumps(train_config))
    summary = {"tokens_seen": 2048000, "final_loss": 3.21875, "final_val_loss": 3.5, "device": "NVIDIA H100"}
    (run / "summary.json").write_text(json.dumps(summary))
    card = render_model_card(final)
    for row in (
        "| Steps | 1000 |",
        "| Tokens seen | 2,048,000 |",
        "| Final training loss | 3.219 |",
        "| Hardware | NVIDIA H100 |",
        "| Training data | embedded corpus (CIA World Factbook, shipped with engram-moe) |",
    ):
        assert row in card
    assert "output_dir" not in card and "progress" not in card  # run plumbing is not card material
    assert "trained with engram-moe on 2,048,000 tokens" in card
    free_form = tmp_path / "facts.json"
    free_form.write_text(json.dumps({"dataset": "HuggingFaceFW/fineweb-edu", "curriculum": "none"}))
    card = render_model_card(final, training_metadata=free_form)
    assert "| Training data | HuggingFaceFW/fineweb-edu |" in card and "| curriculum | none |" in card
    assert "- HuggingFaceFW/fineweb-edu" in card.split("---")[1]  # the Hub's `datasets:` metadata


def test_usage_snippet_runs_where_engram_moe_is_not_installed(card, tmp_path):
    snippet = re.search(r"## Usage\n\n```python\n(.*?)```", card, re.S).group(1)
    assert "trust_remote_code=True" in snippet
    proc = subprocess.run(
        [sys.executable, "-I", "-c", BLOCK_ENGRAM_MOE + snippet],
        cwd=tmp_path,
        env=isolated_env(tmp_path),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = proc.stdout.strip().splitlines()[-1]  # transformers may print a remote-code notice first
    assert printed.startswith("The capital of France is")
    assert len(printed) > len("The capital of France is")  # it generated something


def test_card_command(tmp_path, capsys):
    out = tmp_path / "README.md"
    assert engram_evaluate(["card", str(tiny_model_dir()), "--results", str(RESULTS), "--out", str(out)]) == 0
    assert out.read_text().startswith("---\n") and "| mmlu | acc |" in out.read_text()
    with pytest.raises(SystemExit) as exit_info:
        engram_evaluate(["card", str(tmp_path)])
    assert exit_info.value.code == 2 and "has no config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        engram_evaluate(["card", str(tiny_model_dir()), "--training-metadata", str(tmp_path / "none.json")])
    assert "none.json does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"no": "results"}))
    with pytest.raises(SystemExit):
        engram_evaluate(["card", str(tiny_model_dir()), "--results", str(bad), "--out", str(out)])
    assert "not an lm-eval results file" in capsys.readouterr().err


def test_merged_results_keep_every_task_and_each_runs_settings():
    full = load_results(RESULTS)
    niah = ("niah_single_1", "niah_multikey_2", "niah_multikey_3")

    def part(keep, tasks, limit):
        p = copy.deepcopy(full)
        for key in (
            "results",
            "n-samples",
            "versions",
            "n-shot",
            "higher_is_better",
            "groups",
            "group_subtasks",
        ):
            p[key] = {k: v for k, v in p.get(key, {}).items() if keep(k)}
        p["engram_eval"] = {**p["engram_eval"], "tasks": tasks, "limit": limit}
        return p

    a = part(lambda k: not k.startswith("niah"), ["mmlu", "bbh", "humaneval"], 1)
    b = part(lambda k: k.startswith("niah"), list(niah), None)
    merged = merge_results([a, b])
    assert summary_rows(merged) == summary_rows(full)
    assert [r["engram_eval"]["limit"] for r in merged["engram_eval"]["runs"]] == [1, None]
    card = render_model_card(tiny_model_dir(), merged)
    assert "- mmlu, bbh, humaneval: shots differ per task (see n-shot); at most 1 documents per task" in card
    assert "- niah_single_1, niah_multikey_2, niah_multikey_3: 0-shot; all documents" in card
    with pytest.raises(ValueError, match="more than one results file"):
        merge_results([a, a])


def test_a_limit_that_covers_every_document_is_no_subset():
    """RULER generates 500 NIAH samples per task: --limit 500 scores them all, and the card must say so."""
    results = load_results(RESULTS)
    niah = ["niah_single_1", "niah_multikey_2", "niah_multikey_3"]
    results["engram_eval"] = {**results["engram_eval"], "tasks": niah, "limit": 500}
    for task in niah:
        results["n-samples"][task] = {"original": 500, "effective": 500}
    evaluation = _evaluation(results)
    assert evaluation["runs"][0]["settings"].startswith("0-shot; all documents;")
    assert not evaluation["subset"]
    results["n-samples"]["niah_multikey_3"]["effective"] = 499
    evaluation = _evaluation(results)
    assert "at most 500 documents per task" in evaluation["runs"][0]["settings"] and evaluation["subset"]


def test_model_cards_folder_links_the_package_template():
    link = Path(__file__).resolve().parents[1] / "model_cards" / "model_card.md.j2"
    assert link.read_text() == (
        Path(__file__).resolve().parents[1] / "engram_moe" / "evaluation" / "templates" / "model_card.md.j2"
    ).read_text(encoding="utf-8")
