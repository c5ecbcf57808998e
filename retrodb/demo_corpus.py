"""The embedded default corpus: Python's own documentation topics (`pydoc_data.topics`).

About 465 KB of real English text that exists wherever Python does. Writes one
.txt file per topic into a folder: `python -m retrodb.demo_corpus DIR`.
"""

from __future__ import annotations

import sys
from pathlib import Path


def topics() -> dict[str, str]:
    from pydoc_data.topics import topics as t

    return dict(sorted(t.items()))


def write_demo_corpus(directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in topics().items():
        (directory / f"{name}.txt").write_text(text, encoding="utf-8")
    return directory


if __name__ == "__main__":
    write_demo_corpus(sys.argv[1] if len(sys.argv) > 1 else "demo-corpus")
