"""The bundled model's training corpus: text that exists wherever retrodb installs.

Nothing is downloaded. The corpus is the Python standard library's source files (tests, IDLE,
lib2to3, generated codec tables and pydoc_data left out), the documentation topics of
`pydoc_data.topics` (English prose), and the Python sources of the small pure-Python
dependencies that retrodb installs (torch and transformers are left out: they are four times
the rest together). The bundled model's database holds the first two (MODEL_SOURCES: what a
shared 2-core CPU can embed and train on in a session); its tokenizer was trained on all three.
Versions differ between installs, so `write_corpus` records every
document's size and sha256; `make model` compares them with the card (docs/model.md).

A fixed list of documents, `HELD_OUT`, is never trained on (nor used to train the tokenizer):
they measure what the model reads from its database (`bench/bench_model.py`, `make demo`).

    python -m retrodb.model.corpus DIR [SOURCE...]       # DIR/train.jsonl, heldout.jsonl, manifest.tsv
    python -m retrodb.model.corpus --held-out FILE [ID...]   # only the held-out documents (JSONL)

SOURCES: stdlib, pydoc, dependencies (default: all three; the tokenizer is trained on all three,
the bundled model's database holds stdlib and pydoc, MODEL_SOURCES).
"""

from __future__ import annotations

import hashlib
import json
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

# Never trained on. Two related pairs (json, and the two pydoc topics on statements) let the
# benchmark measure how much the model gains from *related* documents only.
HELD_OUT = (
    "stdlib/bisect.py",
    "stdlib/colorsys.py",
    "stdlib/fractions.py",
    "stdlib/glob.py",
    "stdlib/heapq.py",
    "stdlib/json/decoder.py",
    "stdlib/json/encoder.py",
    "stdlib/sched.py",
    "stdlib/shlex.py",
    "stdlib/textwrap.py",
    "pydoc/lambda",
    "pydoc/with",
)

# Pure-Python distributions retrodb installs (directly or through typer and rich).
DEPENDENCIES = ("click", "duckdb", "markdown-it-py", "mdurl", "numpy", "psutil", "pyarrow", "pygments",
                "rich", "shellingham", "tokenizers", "typer", "zstandard")

MAX_DOC_BYTES = 300_000  # larger files are generated tables, not prose or code
_SKIP_PARTS = {"test", "tests", "testing", "idle_test", "idlelib", "lib2to3", "site-packages", "__pycache__",
               "encodings", "pydoc_data", "ensurepip", "turtledemo"}


@dataclass(frozen=True)
class CorpusDocument:
    doc_id: str  # stdlib/<path>, pydoc/<topic> or <distribution>/<path>
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def _source_files(root: Path, files: list[Path], prefix: str) -> Iterator[CorpusDocument]:
    for path in files:
        rel = path.relative_to(root)
        if _SKIP_PARTS & set(rel.parts[:-1]) or path.suffix != ".py" or not path.is_file():
            continue
        data = path.read_bytes()
        if not data.strip() or len(data) > MAX_DOC_BYTES or b"\x00" in data:
            continue
        try:
            yield CorpusDocument(f"{prefix}/{rel.as_posix()}", data.decode("utf-8"))
        except UnicodeDecodeError:
            continue


def stdlib_documents() -> Iterator[CorpusDocument]:
    root = Path(sysconfig.get_paths()["stdlib"])
    yield from _source_files(root, sorted(root.rglob("*.py")), "stdlib")


def pydoc_documents() -> Iterator[CorpusDocument]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        if topics[name].strip():
            yield CorpusDocument(f"pydoc/{name}", topics[name])


def dependency_documents() -> Iterator[CorpusDocument]:
    import importlib.metadata as md

    for name in DEPENDENCIES:
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        located = sorted({Path(f.locate()) for f in dist.files or [] if str(f).endswith(".py")})
        if not located:
            continue
        site = Path(dist.locate_file(""))
        yield from _source_files(site, located, name)


SOURCES = {"stdlib": stdlib_documents, "pydoc": pydoc_documents, "dependencies": dependency_documents}
ALL_SOURCES = tuple(SOURCES)
MODEL_SOURCES = ("stdlib", "pydoc")  # the bundled model's training database (the tokenizer saw all three)


def corpus_documents(sources: tuple[str, ...] = ALL_SOURCES) -> list[CorpusDocument]:
    """Every document of `sources`, held-out ones included, sorted by id (the order is the recipe's)."""
    docs: dict[str, CorpusDocument] = {}
    for source in sources:
        for d in SOURCES[source]():
            docs.setdefault(d.doc_id, d)
    return [docs[k] for k in sorted(docs)]


def held_out_documents(ids: tuple[str, ...] | list[str] = HELD_OUT) -> list[CorpusDocument]:
    wanted = set(ids)
    return [d for d in corpus_documents() if d.doc_id in wanted]


def write_jsonl(path: Path, docs: list[CorpusDocument]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"id": d.doc_id, "text": d.text}, ensure_ascii=False) + "\n")
    return path


def write_corpus(directory: str | Path, sources: tuple[str, ...] = ALL_SOURCES) -> dict:
    """Write train.jsonl, heldout.jsonl and manifest.tsv (doc_id, split, bytes, sha256) to `directory`."""
    directory = Path(directory)
    docs = corpus_documents(sources)
    held = set(HELD_OUT)
    train = [d for d in docs if d.doc_id not in held]
    heldout = [d for d in docs if d.doc_id in held]
    write_jsonl(directory / "train.jsonl", train)
    write_jsonl(directory / "heldout.jsonl", heldout)
    lines = ["doc_id\tsplit\tbytes\tsha256"]
    lines += [f"{d.doc_id}\t{'heldout' if d.doc_id in held else 'train'}\t{len(d.text.encode())}\t{d.sha256}"
              for d in docs]
    (directory / "manifest.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()
    return {"documents": len(train), "bytes": sum(len(d.text.encode()) for d in train),
            "held_out": len(heldout), "held_out_missing": sorted(held - {d.doc_id for d in heldout}),
            "manifest_sha256": digest, "python": sys.version.split()[0]}


def write_manifest(path: str | Path) -> str:
    """The whole recipe's file list (docs/model-corpus.tsv): doc_id, role, bytes, sha256; returns its sha256.

    role: model (in the bundled model's database and its tokenizer's corpus), tokenizer (the
    tokenizer's corpus only) or heldout (neither).
    """
    held = set(HELD_OUT)
    model = {d.doc_id for d in corpus_documents(MODEL_SOURCES)}
    lines = ["doc_id\trole\tbytes\tsha256"]
    for d in corpus_documents():
        role = "heldout" if d.doc_id in held else "model" if d.doc_id in model else "tokenizer"
        lines.append(f"{d.doc_id}\t{role}\t{len(d.text.encode())}\t{d.sha256}")
    text = "\n".join(lines) + "\n"
    Path(path).write_text(text, encoding="utf-8")
    return hashlib.sha256(text.encode()).hexdigest()


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--held-out"]:
        out = Path(args[1] if len(args) > 1 else "heldout.jsonl")
        write_jsonl(out, held_out_documents(args[2:] or HELD_OUT))
    else:
        print(json.dumps(write_corpus(args[0] if args else "model-corpus", tuple(args[1:]) or ALL_SOURCES)))
