"""Rewrite one benchmark's section of BENCHMARKS.md, leaving every other section as it is.

A section lives between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``; a missing one is
appended under its heading.
"""

from __future__ import annotations

from pathlib import Path

BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def update_section(name: str, heading: str, body: str, path: Path = BENCHMARKS_MD) -> None:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    block = f"{start}\n{body}\n{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + f"\n\n## {heading}\n\n{block}\n"
    path.write_text(text)
