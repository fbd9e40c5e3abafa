"""Every snippet of the README's training section runs (the section between the engram-train markers).

Python blocks run one after another, each in a fresh interpreter, in one working folder. Shell commands run
when they train a tiny preset (`python scripts/train.py` / `engram-train`); the `small-engram-moe` command
and the `accelerate launch` ones need GPUs and are only checked to parse (`--help` of the same flags).
Until the section is merged into README.md, `ENGRAM_TRAINING_README=path` points the test at the draft.
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from engram_moe.cli.train import build_parser

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- engram-train:begin -->", "<!-- engram-train:end -->"


def _section() -> str | None:
    path = Path(os.environ.get("ENGRAM_TRAINING_README", ROOT / "README.md"))
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    if BEGIN not in text or END not in text:
        return None
    return text.split(BEGIN, 1)[1].split(END, 1)[0]


SECTION = _section()
pytestmark = pytest.mark.skipif(SECTION is None, reason="README.md has no engram-train section yet")
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", SECTION or "", flags=re.S)
COMMANDS = [
    " ".join(block.replace("\\\n", " ").split())
    for block in re.findall(r"```bash\n(.*?)```", SECTION or "", flags=re.S)
]


def _train_args(command: str) -> list[str] | None:
    """The `engram-train` arguments of a command (None for commands that are not training runs)."""
    words = shlex.split(command)
    for i, word in enumerate(words):
        if word.endswith("scripts/train.py") or word == "engram-train":
            return words[i + 1 :]
    return None


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("readme_training")


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def test_section_has_the_documented_pieces():
    assert len(PYTHON_BLOCKS) >= 4
    launches = [c for c in COMMANDS if c.startswith("accelerate launch")]
    assert any("--num_machines" in c for c in launches) and any("--num_processes 2" in c for c in launches)
    for words in (
        "row-sharded",
        "--resume",
        "EngramTrainer",
        "target_parameters",
        "train_only_engram_tables",
    ):
        assert words in SECTION, words


@pytest.mark.parametrize("index", range(len(COMMANDS)))
def test_shell_command(index, workdir):
    args = _train_args(COMMANDS[index])
    assert args is not None, COMMANDS[index]
    config = build_parser().parse_args(args)  # every documented flag exists and parses
    if not config.model.startswith("tiny-"):
        pytest.skip("needs a GPU (documented for GPUs; its flags parse)")
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), *args, "--no-progress"]
    result = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, env=_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = workdir / config.output_dir
    assert (out / "metrics.jsonl").is_file() and (out / "final" / "config.json").is_file()


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_python_snippet(index, workdir):
    result = subprocess.run(
        [sys.executable, "-c", PYTHON_BLOCKS[index]],
        cwd=workdir,
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
