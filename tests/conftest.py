"""Shared fixtures: tiny corpora built in a temporary directory, and an in-process CLI runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RETRODB_CACHE_DIR", tempfile.mkdtemp(prefix="retrodb-test-cache-"))  # not ~/.cache
REPO = Path(__file__).resolve().parents[1]

WORDS = ("retrieval database chunk neighbour encoder attention token segment snapshot index query "
         "embedding language model frozen continuation document corpus privacy redact").split()


def make_text(i: int, n_words: int = 150) -> str:
    """Deterministic English-like text, distinct per i."""
    import random

    r = random.Random(i)
    words = [r.choice(WORDS) for _ in range(n_words)]
    return f"Document {i} begins. " + " ".join(words) + f". End of document {i}."


@pytest.fixture
def corpus(tmp_path) -> Path:
    """A folder of 12 text files (3 in a subfolder)."""
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    for i in range(12):
        sub = "sub/" if i % 4 == 0 else ""
        (root / f"{sub}doc{i:02d}.txt").write_text(make_text(i), encoding="utf-8")
    return root


@pytest.fixture
def jsonl_file(tmp_path) -> Path:
    path = tmp_path / "docs.jsonl"
    with open(path, "w") as f:
        for i in range(20):
            f.write(json.dumps({"id": f"j{i}", "text": make_text(100 + i), "lang": "en"}) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """A 2-layer, 32-dim BERT with random (seeded) weights and MiniLM's tokenizer, saved like any HF model."""
    import shutil

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from retrodb.tokenizer import default_model_dir

    directory = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=512)
    transformers.BertModel(config).save_pretrained(directory)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (default_model_dir() / name).exists():
            shutil.copy(default_model_dir() / name, directory / name)
    return directory


@pytest.fixture
def db_path(tmp_path) -> Path:
    return tmp_path / "db"


class CliResult:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err

    def json_lines(self) -> list[dict]:
        return [json.loads(line) for line in self.out.splitlines() if line.strip()]


@pytest.fixture
def cli(capsys):
    """Run `retrodb ARGS...` in this process; returns exit code, stdout, stderr."""
    from retrodb.cli.main import run

    def invoke(*args) -> CliResult:
        capsys.readouterr()
        code = run([str(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return invoke


def run_retrodb(*args, env: dict | None = None, input: bytes | None = None, timeout: float = 120):
    """Run the CLI in a subprocess (for kill -9 and concurrency tests)."""
    full_env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.run([sys.executable, "-m", "retrodb.cli", *map(str, args)], cwd=REPO, env=full_env,
                          input=input, capture_output=True, timeout=timeout)
