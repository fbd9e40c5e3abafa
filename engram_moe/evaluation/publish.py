"""Prepare a Hub-ready folder (weights, modelling code, tokenizer, card, results) and push it.

:func:`prepare_hub_folder` re-saves a checkpoint with ``save_pretrained`` (which, because ``import
engram_moe`` marks our classes for remote-code export, copies the modelling files and writes ``auto_map``,
so the folder loads with ``trust_remote_code=True`` on machines without engram-moe), saves the tokenizer,
copies the training metadata and evaluation results, and renders the model card as ``README.md``. The
folder is built under a temporary name and renamed when complete.

:func:`push_folder` uploads it with huggingface_hub's own ``HfApi.create_repo`` and ``HfApi.upload_folder``
(one commit of exactly the folder that was checked). Any failure (offline mode, no network, no token, no
permission) raises :class:`PublishError` saying what happened and that the local folder is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .harness import RESULTS_FILE, SUMMARY_FILE, load_results, write_results
from .model_card import TRAINING_METADATA_FILES, training_metadata_files, write_model_card

EVAL_DIR = "eval_results"


class PublishError(RuntimeError):
    """The Hub upload failed; the prepared local folder is complete and can be pushed later."""


def prepare_hub_folder(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    results: str | os.PathLike | dict | None = None,
    repo_id: str | None = None,
    training_metadata: str | os.PathLike | None = None,
    overwrite: bool = False,
    license: str = "apache-2.0",
) -> Path:
    """Write the Hub-ready folder of the checkpoint ``model_dir`` into ``out_dir`` and return it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import engram_moe  # noqa: F401 -- registers the classes and marks them for remote-code export

    src = Path(model_dir).resolve()
    out = Path(out_dir).resolve()
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src} has no config.json: not a saved model folder")
    if out == src:
        raise ValueError("out_dir must differ from model_dir: the folder is re-saved from the checkpoint")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    if training_metadata is not None and not Path(training_metadata).is_file():
        raise FileNotFoundError(f"training metadata file {training_metadata} does not exist")
    results = load_results(results) if results is not None and not isinstance(results, dict) else results

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
        if getattr(model.config, "model_type", None) != "engram_moe":
            raise ValueError(f"{src} holds a {model.config.model_type!r} model, not engram_moe")
        tokenizer = AutoTokenizer.from_pretrained(src)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        del model
        for file in training_metadata_files(src):
            # engram-train's run summary sits beside the folder; inside the Hub folder it gets its own name.
            shutil.copyfile(
                file, staging / ("training_summary.json" if file.name == "summary.json" else file.name)
            )
        if training_metadata is not None:
            shutil.copyfile(training_metadata, staging / TRAINING_METADATA_FILES[0])
        if results is not None:
            write_results(results, staging / EVAL_DIR)
        write_model_card(
            staging,
            results=results,
            model_id=repo_id or out.name,
            license=license,
        )
        missing = [f for f in ("config.json", "README.md") if not (staging / f).is_file()]
        if not any(staging.glob("*.safetensors")) or not any(staging.glob("*.py")) or missing:
            raise RuntimeError(
                f"the prepared folder is incomplete (weights, code, {missing}); nothing was moved"
            )
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload Engram-MoE checkpoint with engram-evaluate publish",
) -> str:
    """Create ``repo_id`` if needed and upload ``folder`` to it in one commit; returns the commit URL."""
    from huggingface_hub import HfApi, constants

    folder = Path(folder)
    if not (folder / "config.json").is_file() or not (folder / "README.md").is_file():
        raise FileNotFoundError(f"{folder} is not a prepared folder (needs config.json and README.md)")
    if "/" not in repo_id or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"repo_id must look like 'user-or-org/name', got {repo_id!r}")
    endpoint = constants.ENDPOINT
    try:
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            folder_path=folder, repo_id=repo_id, repo_type="model", commit_message=commit_message
        )
    except Exception as err:  # offline mode, DNS, refused connection, 401/403: all end the same way
        offline = constants.HF_HUB_OFFLINE or type(err).__name__ == "OfflineModeIsEnabled"
        why = "HF_HUB_OFFLINE is set" if offline else f"{type(err).__name__}: {err}"
        raise PublishError(
            f"Could not push to {repo_id} on the Hub at {endpoint} ({why}). The local folder {folder} is "
            f"complete; push it later with `engram-evaluate publish --push-only {folder} --repo-id {repo_id}` "
            f"(or `hf upload {repo_id} {folder}`) once the Hub is reachable and you are logged in."
        ) from err
    return str(getattr(info, "commit_url", info))


def publish(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    repo_id: str,
    *,
    push: bool = True,
    private: bool = False,
    token: str | None = None,
    **prepare_kwargs,
) -> tuple[Path, str | None]:
    """:func:`prepare_hub_folder` then, if ``push``, :func:`push_folder`. Returns (folder, commit URL)."""
    if "/" not in repo_id or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"repo_id must look like 'user-or-org/name', got {repo_id!r}")
    folder = prepare_hub_folder(model_dir, out_dir, repo_id=repo_id, **prepare_kwargs)
    url = push_folder(folder, repo_id, private=private, token=token) if push else None
    return folder, url


def folder_summary(folder: str | os.PathLike) -> dict:
    """What a prepared folder holds (for the CLI's report and the tests)."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return {
        "files": sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()),
        "auto_map": config.get("auto_map"),
        "results": (folder / EVAL_DIR / RESULTS_FILE).is_file(),
        "summary": (folder / EVAL_DIR / SUMMARY_FILE).is_file(),
    }
