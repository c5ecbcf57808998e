"""The bundled checkpoint: package data within the size limits, loadable with the network cut off,
its tokenizer the default LM tokenizer of new databases."""

from __future__ import annotations

import json
import socket
import tomllib

import pytest

torch = pytest.importorskip("torch")

from conftest import REPO  # noqa: E402

from retrodb.model import BUNDLED  # noqa: E402
from retrodb.tokenizer import default_lm_tokenizer_dir, tokenizer_info  # noqa: E402

MiB = 1024 * 1024


def test_bundled_files_are_package_data_within_the_limits():
    shards = sorted(BUNDLED.glob("model-*.safetensors"))
    assert shards, f"no weight shards in {BUNDLED}"
    assert all(s.stat().st_size <= 16 * MiB for s in shards)
    assert sum(s.stat().st_size for s in shards) <= 48 * MiB
    index = json.loads((BUNDLED / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    for name in ("config.json", "tokenizer.json", "training.json"):
        assert (BUNDLED / name).is_file(), name
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "retrodb.model" in data["packages"]
    assert set(data["package-data"]["retrodb.model"]) >= {"bundled/*.json", "bundled/*.safetensors"}


def test_loads_offline_and_reads_the_default_tokenizer(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network access attempted while loading the bundled model")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from retrodb.model import load

    lm = load(device="cpu")
    assert lm.directory == BUNDLED and lm.seq_len == json.loads((BUNDLED / "training.json").read_text())["seq_len"]
    assert lm.tokenizer_sha256 == tokenizer_info(default_lm_tokenizer_dir()).sha256
    assert lm.config.vocab_size == lm.tokenizer.get_vocab_size() <= 65535
    ids = lm.tokenizer.encode("def add(a, b):\n    return a + b\n", add_special_tokens=False).ids
    with torch.no_grad():
        logits = lm.model(torch.tensor([ids]))
    assert logits.shape == (1, len(ids), lm.config.vocab_size) and torch.isfinite(logits).all()
