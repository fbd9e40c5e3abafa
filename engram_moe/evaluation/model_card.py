"""Render a Hugging Face model card (README.md with the Hub's YAML metadata) for a saved Engram-MoE folder.

The card is filled from what the folder holds: ``config.json`` (architecture, Engram settings), the
parameter counts of the model built from it on the meta device (no weights are read), the training
metadata if present (``training_metadata.json`` written by the training script, or Trainer's
``trainer_state.json``) and an lm-eval results JSON (``harness.write_results`` or ``lm_eval
--output_path``). The template is ``templates/model_card.md.j2`` (Jinja2; ``model_cards/`` links to it);
the YAML front matter is built with ``huggingface_hub.ModelCardData``, the Hub's own schema.
"""

from __future__ import annotations

import json
import math
import os
from importlib import resources
from pathlib import Path

from .harness import format_table, is_niah, load_results, summary_rows

# Training metadata read from a checkpoint folder, first match of a label wins: our own free-form file,
# engram-train's `train_config.json` (in the saved folder) and run `summary.json` (beside it; copied in
# as `training_summary.json` by publish), and Trainer's `trainer_state.json`.
TRAINING_METADATA_FILES = (
    "training_metadata.json",
    "train_config.json",
    "training_summary.json",
    "trainer_state.json",
)
CARD_FILE = "README.md"

# Known training-metadata keys -> card labels. Unknown keys are shown only from training_metadata.json.
_TRAINING_LABELS = {
    "model": "Base configuration",
    "preset": "Base configuration",
    "dataset": "Training data",
    "datasets": "Training data",
    "data": "Training data",
    "max_steps": "Steps",
    "steps": "Steps",
    "global_step": "Steps",
    "tokens_seen": "Tokens seen",
    "tokens": "Tokens seen",
    "train_tokens": "Tokens seen",
    "seq_len": "Sequence length",
    "sequence_length": "Sequence length",
    "block_size": "Sequence length",
    "batch_size": "Batch size (sequences per device step)",
    "train_batch_size": "Batch size (sequences per device step)",
    "grad_accum": "Gradient accumulation steps",
    "world_size": "Devices",
    "tokens_per_step": "Tokens per step",
    "lr": "Peak learning rate",
    "learning_rate": "Peak learning rate",
    "lr_schedule": "Learning-rate schedule",
    "warmup_steps": "Warm-up steps",
    "weight_decay": "Weight decay",
    "engram_lr_multiplier": "Engram table LR multiplier",
    "final_loss": "Final training loss",
    "train_loss": "Final training loss",
    "final_val_loss": "Final validation loss",
    "eval_loss": "Final validation loss",
    "val_loss": "Final validation loss",
    "bf16": "bf16 autocast",
    "device": "Hardware",
    "hardware": "Hardware",
    "wall_s": "Training time (s)",
    "train_runtime": "Training time (s)",
    "seed": "Seed",
}

# Suite -> (Hub dataset id, display name) for the model-index metadata.
_DATASETS = {
    "mmlu": ("cais/mmlu", "MMLU"),
    "bbh": ("lukaemon/bbh", "BIG-Bench Hard"),
    "humaneval": ("openai/openai_humaneval", "HumanEval"),
}
_CHANCE = {"mmlu": 0.25}


def count_parameters(model) -> dict:
    """Total, activated-per-token, Engram-table and routed-expert parameter counts of an Engram-MoE model.

    Works on models loaded from remote code too (modules are recognised by class name and attributes).
    Activated = total - the routed experts a token skips - the Engram rows it does not read.
    """
    config = model.config
    total = sum(p.numel() for p in model.parameters())
    tables = routed = 0
    rows_per_token = 0
    head_dim = 0
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("EngramLayer") and hasattr(module, "embedding"):
            tables += module.embedding.weight.numel()
            head_dim = module.embedding.weight.shape[1]
            rows_per_token += (config.engram_max_ngram_size - 1) * config.engram_num_heads
        elif (
            hasattr(module, "gate_up_proj")
            and hasattr(module, "down_proj")
            and hasattr(module, "num_experts")
        ):
            routed += module.gate_up_proj.numel() + module.down_proj.numel()
    experts = getattr(config, "n_routed_experts", 0) or 0
    active_fraction = config.num_experts_per_tok / experts if experts else 1.0
    activated = total - round(routed * (1 - active_fraction)) - tables + rows_per_token * head_dim
    return {
        "total": total,
        "activated": activated,
        "engram_tables": tables,
        "engram_rows_per_token": rows_per_token,
        "routed_experts": routed,
    }


def _meta_model(folder: Path):
    """The model of ``folder``'s config, built on the meta device (shapes only, nothing read or allocated)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import engram_moe  # noqa: F401 -- registers the Auto classes

    config = AutoConfig.from_pretrained(folder)
    if getattr(config, "model_type", None) != "engram_moe":
        raise ValueError(f"{folder} holds a {config.model_type!r} model; the card template is for engram_moe")
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def training_metadata_files(folder: str | os.PathLike) -> list[Path]:
    """The training metadata files of a checkpoint folder, in order of precedence."""
    folder = Path(folder)
    files = [folder / f for f in TRAINING_METADATA_FILES if (folder / f).is_file()]
    # engram-train writes summary.json next to its `final/` folder; only a training summary qualifies.
    for candidate in (folder / "summary.json", folder.parent / "summary.json"):
        if candidate.is_file() and "tokens_seen" in _read_json_object(candidate):
            files.append(candidate)
            break
    return files


def _read_json_object(path: Path) -> dict:
    raw = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(raw, dict):
        raise ValueError(f"{path} is not a JSON object")
    return raw


def read_training_metadata(path: str | os.PathLike) -> dict:
    """Card rows (label -> value) from a training metadata JSON file, or from the files that
    :func:`training_metadata_files` finds in a folder ({} if none)."""
    path = Path(path)
    rows: dict = {}
    for file in training_metadata_files(path) if path.is_dir() else [path]:
        raw = _read_json_object(file)
        if file.name == "trainer_state.json":
            losses = [e["loss"] for e in raw.get("log_history", []) if "loss" in e]
            raw = {k: raw.get(k) for k in ("global_step", "train_batch_size")}
            raw["final_loss"] = losses[-1] if losses else None
        free_form = file.name not in (*TRAINING_METADATA_FILES[1:], "summary.json")
        for key, value in raw.items():
            label = _TRAINING_LABELS.get(key, key if free_form else None)
            if label is None or label in rows or value is None or isinstance(value, dict):
                continue
            if isinstance(value, list):
                if not value or not all(isinstance(v, (str, int, float)) for v in value):
                    continue
                value = ", ".join(map(str, value))
            if isinstance(value, float):
                value = f"{value:.4g}"
            elif isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10_000:
                value = f"{value:,}"
            if label == "Training data" and value == "embedded":
                value = "embedded corpus (CIA World Factbook, shipped with engram-moe)"
            rows[label] = value
    order = list(dict.fromkeys(_TRAINING_LABELS.values()))
    return dict(sorted(rows.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


def _suite(task: str) -> str | None:
    for suite in ("mmlu", "bbh", "humaneval"):
        if task == suite or task.startswith(f"{suite}_"):
            return suite
    return "niah" if is_niah(task) else None


def _leaf_tasks(results: dict, tasks: list[str]) -> list[str]:
    """The tasks behind ``tasks``: groups replaced by their subtasks, recursively."""
    subtasks, leaves, todo = results.get("group_subtasks", {}), [], list(tasks)
    while todo:
        name = todo.pop()
        if name in subtasks:
            todo += subtasks[name]
        else:
            leaves.append(name)
    return leaves


def _shots(results: dict, tasks: list[str]) -> int | None:
    """The few-shot count of ``tasks`` (groups through their subtasks), if they share one."""
    n_shot = results.get("n-shot", {})
    found = {n_shot[name] for name in _leaf_tasks(results, tasks) if name in n_shot}
    return found.pop() if len(found) == 1 else None


def _ran_on_subset(results: dict, tasks: list[str], limit) -> bool:
    """Whether a run with ``limit`` scored fewer documents than its tasks have.

    lm-eval's ``n-samples`` says how many documents each task has and how many were scored; a limit at or
    above every task's size (RULER's 500 generated NIAH samples, say) is no subset.
    """
    if not limit:
        return False
    counts = results.get("n-samples", {})
    leaves = _leaf_tasks(results, tasks)
    if not leaves or any(t not in counts for t in leaves):
        return True  # cannot tell: say so
    return any(counts[t].get("effective", 0) < counts[t].get("original", 0) for t in leaves)


def _run_settings(results: dict) -> list[dict]:
    """How each lm-eval run behind ``results`` was made (one per run when merged)."""
    record = results.get("engram_eval") or {}
    runs = record.get("runs") or [{"config": results.get("config"), "engram_eval": record}]
    out = []
    for run in runs:
        config, rec = run.get("config") or {}, run.get("engram_eval") or {}
        limit = rec.get("limit", config.get("limit"))
        subset = _ran_on_subset(results, rec.get("tasks") or [], limit)
        shots = _shots(results, rec.get("tasks") or [])
        parts = [f"{shots}-shot" if shots is not None else "shots differ per task (see n-shot)"]
        parts.append(f"at most {limit} documents per task" if subset else "all documents")
        if rec.get("max_gen_toks"):
            parts.append(f"generations capped at {rec['max_gen_toks']} tokens")
        if rec.get("niah_max_seq_lengths"):
            parts.append(f"NIAH context {', '.join(map(str, rec['niah_max_seq_lengths']))} tokens")
        tasks = rec.get("tasks") or []
        out.append({"tasks": ", ".join(tasks) or "all", "settings": "; ".join(parts), "subset": subset})
    return out


def _evaluation(results: dict) -> dict:
    rows = summary_rows(results)
    notes = []
    for r in rows:
        chance = _CHANCE.get(_suite(r["task"]))
        if chance is None or r["stderr"] is None:
            continue
        if abs(r["value"] - chance) <= 2 * r["stderr"]:
            where = "within two standard errors of"
        elif r["value"] < chance:
            where = "more than two standard errors below"  # e.g. a model that prefers one answer letter
        else:
            continue
        notes.append(
            f"{r['task']} {r['metric']}: {100 * r['value']:.2f}% is {where} chance ({100 * chance:.0f}%)."
        )
    for cot in ("bbh", "bbh_cot_fewshot"):
        if any(r["task"] == cot for r in rows):
            notes.append(
                f"{cot} is lm-eval's 3-shot chain-of-thought BBH (the paper's setting), scored on the text after "
                '"the answer is".'
            )
    if any(r["task"] == "bbh_fewshot" for r in rows):
        notes.append(
            "bbh_fewshot is lm-eval's 3-shot answer-only BBH, not the paper's chain-of-thought setting. Its exact "
            'match compares the raw generation with the target, so an answer that starts with a space (" False") '
            "counts as wrong; nearly every model scores 0 there. bbh_fewshot_strip strips the answer first."
        )
    if any(r["task"] == "bbh_fewshot_strip" for r in rows):
        notes.append(
            "bbh_fewshot_strip is engram-moe's variant of lm-eval's 3-shot answer-only BBH: the same prompts, "
            "exact match after stripping whitespace around the answer. Not the paper's chain-of-thought setting."
        )
    if any(is_niah(r["task"]) for r in rows):
        notes.append(
            "NIAH rows are RULER's synthetic needle tasks generated locally; the metric name is the context length."
        )
    runs = _run_settings(results)
    return {
        "rows": rows,
        "table": format_table(rows),
        "runs": runs,
        "subset": any(run["subset"] for run in runs),
        "lm_eval_version": results.get("lm_eval_version", ""),
        "notes": notes,
    }


def _model_index(model_name: str, rows: list[dict]):
    from huggingface_hub import EvalResult

    out = []
    for r in rows:
        suite, dataset_config = _suite(r["task"]), None
        if suite == "niah":
            # One dataset entry per task and length: the Hub groups metrics by dataset.
            dataset_type = f"ruler-{r['task']}-{r['metric']}"
            dataset_name = f"RULER {r['task']} ({r['metric']} tokens, synthetic)"
        elif suite in _DATASETS:
            dataset_type, dataset_name = _DATASETS[suite]
            if r["task"] != suite:
                dataset_name = f"{dataset_name} ({r['task']})"
                # Variants of one suite (answer-only and chain-of-thought BBH) read the same dataset; the Hub
                # merges entries that share task type, dataset type and config, so the variant is the config.
                dataset_config = r["task"]
        else:
            dataset_type, dataset_name = r["task"], r["task"]
        metric = r["metric"] if suite != "niah" else "string_match_all"
        out.append(
            EvalResult(
                task_type="text-generation",
                dataset_type=dataset_type,
                dataset_name=dataset_name,
                dataset_config=dataset_config,
                metric_type=metric,
                metric_value=round(100 * r["value"], 2),
                metric_name=f"{metric} (%)",
                source_name="lm-evaluation-harness (engram-evaluate, local data)",
                source_url="https://github.com/EleutherAI/lm-evaluation-harness",
            )
        )
    return out


def usage_snippet(model_id: str) -> str:
    return (
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f"model_id = {model_id!r}\n"
        "# The tokenizer is standard; the flag only lets AutoTokenizer read the custom config without asking.\n"
        "tokenizer = AutoTokenizer.from_pretrained(model_id, trust_remote_code=True)\n"
        "model = AutoModelForCausalLM.from_pretrained(model_id, trust_remote_code=True)\n"
        'inputs = tokenizer("The capital of France is", return_tensors="pt")\n'
        "output = model.generate(**inputs, max_new_tokens=20, do_sample=False)\n"
        "print(tokenizer.decode(output[0], skip_special_tokens=True))"
    )


def render_model_card(
    model_dir: str | os.PathLike,
    results: str | os.PathLike | dict | None = None,
    *,
    model_id: str | None = None,
    model_name: str | None = None,
    license: str = "apache-2.0",
    training_metadata: str | os.PathLike | None = None,
    extra_limitations: list[str] | None = None,
    template: str | os.PathLike | None = None,
) -> str:
    """The model card of the saved folder ``model_dir`` as text (YAML front matter + markdown).

    ``results``: an lm-eval results dict, file or folder. ``model_id``: what the usage snippet loads (the
    Hub repo id; default: the folder path). ``training_metadata``: a JSON file to use instead of the one in
    the folder. ``template``: another Jinja2 template.
    """
    import jinja2
    from huggingface_hub import ModelCardData

    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a saved model folder")
    model = _meta_model(folder)
    config = model.config
    params = count_parameters(model)
    engram = None
    if config.engram_layer_ids:
        engram = {
            "layer_ids": list(config.engram_layer_ids),
            "max_ngram_size": config.engram_max_ngram_size,
            "num_heads": config.engram_num_heads,
            "embed_dim_per_ngram": config.engram_embed_dim_per_ngram,
            "head_dim": config.engram_head_dim,
            "rows_per_layer": [f"{sum(sum(order) for order in layer):,}" for layer in config.engram_primes],
            "compressed_vocab_size": config.engram_compressed_vocab_size or config.vocab_size,
            "kernel_size": config.engram_kernel_size,
            "use_conv": config.engram_use_conv,
        }
    if training_metadata is not None and not Path(training_metadata).is_file():
        raise FileNotFoundError(f"training metadata file {training_metadata} does not exist")
    training = read_training_metadata(training_metadata if training_metadata is not None else folder)
    if results is not None and not isinstance(results, dict):
        results = load_results(results)
    evaluation = _evaluation(results) if results else None
    model_id = model_id or str(folder)
    model_name = model_name or model_id.rstrip("/").split("/")[-1]

    card_data = ModelCardData(
        license=license,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["engram", "mixture-of-experts", "engram_moe", "custom_code"],
        model_name=model_name,
        eval_results=_model_index(model_name, evaluation["rows"]) if evaluation else None,
    )
    if training.get("Training data"):
        datasets = [d.strip() for d in str(training["Training data"]).split(",") if "/" in d]
        card_data.datasets = datasets or None

    if template is not None:
        source = Path(template).read_text(encoding="utf-8")
    else:
        source = (resources.files(__package__) / "templates" / "model_card.md.j2").read_text(encoding="utf-8")
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    env.filters["fmt_int"] = lambda n: (
        f"{int(n):,}" if isinstance(n, (int, float)) and math.isfinite(n) else n
    )
    return env.from_string(source).render(
        metadata_yaml=card_data.to_yaml(),
        model_name=model_name,
        model_id=model_id,
        config=config,
        engram=engram,
        params=params,
        training=training,
        evaluation=evaluation,
        extra_limitations=extra_limitations or [],
        usage=usage_snippet(model_id),
    )


def write_model_card(model_dir: str | os.PathLike, out: str | os.PathLike | None = None, **kwargs) -> Path:
    """Render the card of ``model_dir`` and write it (default ``model_dir/README.md``); returns the path."""
    text = render_model_card(model_dir, **kwargs)
    path = Path(out) if out is not None else Path(model_dir) / CARD_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path
