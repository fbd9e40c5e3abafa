"""Every snippet in README.md runs."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# The training section's snippets have their own test (tests/test_training_readme.py).
TRAINING = re.compile(r"<!-- engram-train:begin -->.*?<!-- engram-train:end -->", flags=re.S)
OUTSIDE_TRAINING = TRAINING.sub("", README)
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", OUTSIDE_TRAINING, flags=re.S)
BASH_BLOCKS = re.findall(r"```bash\n(.*?)```", OUTSIDE_TRAINING, flags=re.S)
QUICK_START = [line.split("#")[0].strip() for line in BASH_BLOCKS[0].splitlines() if line.strip()]
# The benchmark block; the evaluation section's commands run in tests/test_eval_*.py.
BENCH_LINES = [
    line.split("#")[0].strip()
    for block in BASH_BLOCKS
    if "bench/" in block
    for line in block.splitlines()
    if line.strip()
]
QUICK_DEMO = [
    "--steps",
    "2",
    "--batch-size",
    "2",
    "--seq-len",
    "32",
    "--eval-batches",
    "1",
    "--max-new-tokens",
    "3",
]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """A working directory holding `outputs/demo/final`, written by a 2-step demo run."""
    cwd = tmp_path_factory.mktemp("readme")
    result = subprocess.run(
        [sys.executable, "-m", "engram_moe.cli.demo", *QUICK_DEMO, "--output-dir", "outputs/demo"],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "identical logits" in result.stdout
    for name in (
        "loss_curve.png",
        "engram_gates.png",
        "demo.json",
        "final/config.json",
        "final/modeling_engram.py",
    ):
        assert (cwd / "outputs" / "demo" / name).exists(), name
    return cwd


def test_readme_has_the_snippets_we_test():
    assert len(PYTHON_BLOCKS) >= 3
    assert QUICK_START == ["bash scripts/run_demo.sh", "bash scripts/run_tests.sh"]
    assert len(BENCH_LINES) >= 4


def test_benchmark_commands(tmp_path):
    # CI has no GPU: the smoke run executes every benchmark section at tiny sizes; the other scripts must parse.
    for line in BENCH_LINES:
        words = line.split()
        if words[:3] == ["python", "-m", "pytest"]:
            assert Path(ROOT, words[-1]).is_dir(), line
            continue
        assert words[0] == "python" and Path(ROOT, words[1]).is_file(), line
        # The smoke run writes its table and JSON to a scratch file, not into the repository.
        args = [*words[2:], "--out", str(tmp_path / "smoke.json")] if "--smoke" in words else ["--help"]
        result = subprocess.run([sys.executable, str(ROOT / words[1]), *args], capture_output=True, text=True)
        assert result.returncode == 0, (line, result.stderr[-2000:])


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_python_snippet_runs(demo_dir, index):
    result = subprocess.run(
        [sys.executable, "-c", PYTHON_BLOCKS[index]],
        cwd=demo_dir,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip(), "each snippet prints what it shows"


@pytest.mark.skipif(
    Path(sys.prefix).resolve() != (ROOT / ".venv").resolve(),
    reason="runs inside the .venv that scripts/setup.sh creates (as in CI); elsewhere it would install one",
)
def test_run_demo_script(tmp_path):
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "run_demo.sh"), *QUICK_DEMO, "--output-dir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "demo" / "final" / "model.safetensors").exists()
