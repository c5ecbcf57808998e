"""The embedded default corpus: Python's own documentation topics (`pydoc_data.topics`).

About 465 KB of real English text that exists wherever Python does.

    python -m retrodb.demo_corpus DIR            # one .txt file per topic
    python -m retrodb.demo_corpus --extra FILE   # the JSONL the demo adds, then deletes and redacts
    python -m retrodb.demo_corpus --eval DIR     # an evaluation set for the leakage report
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# Documents the demo adds to show that an edit changes what the model retrieves. The
# email address is fake; the demo redacts it.
EXTRA = [
    {"id": "retro-paper",
     "text": "RETRO, the Retrieval-Enhanced Transformer from DeepMind, conditions a language model on chunks "
             "retrieved from a database of two trillion tokens. The input is split into chunks of 64 tokens; "
             "for each chunk the model retrieves its nearest neighbours by frozen BERT embeddings, and reads "
             "them through an encoder and chunked cross-attention. Questions about the paper go to "
             "retro.author@example.org."},
    {"id": "retro-database",
     "text": "Because the knowledge of a retrieval-enhanced model lives in its database, documents can be added "
             "or removed, private text redacted, and the model's behaviour changes without retraining it."},
]


def topics() -> dict[str, str]:
    from pydoc_data.topics import topics as t

    return dict(sorted(t.items()))


def write_demo_corpus(directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in topics().items():
        (directory / f"{name}.txt").write_text(text, encoding="utf-8")
    return directory


def write_extra(path: str | Path) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(d) + "\n" for d in EXTRA), encoding="utf-8")
    return path


def write_eval(directory: str | Path) -> Path:
    """An evaluation set for `retrodb leakage`: a topic of the corpus with one sentence changed (a near-duplicate:
    it leaks fully), and the Zen of Python (not in the corpus)."""
    import ast
    import codecs
    import importlib.util

    source = Path(importlib.util.find_spec("this").origin).read_text()  # importing `this` would print it
    zen = next(ast.literal_eval(n.value) for n in ast.parse(source).body
               if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "s")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    edited = topics()["with"].replace("for convenient reuse", "so that they can be reused", 1)
    (directory / "with-edited.txt").write_text(edited, encoding="utf-8")
    (directory / "zen-of-python.txt").write_text(codecs.decode(zen, "rot13"), encoding="utf-8")
    return directory


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--extra"]:
        write_extra(args[1] if len(args) > 1 else "demo-extra.jsonl")
    elif args[:1] == ["--eval"]:
        write_eval(args[1] if len(args) > 1 else "demo-eval")
    else:
        write_demo_corpus(args[0] if args else "demo-corpus")
