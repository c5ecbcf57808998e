"""Model directories and training checkpoints, written atomically.

A model directory (the bundled one, or any step of a training run) holds:

    config.json                              RetroConfig
    tokenizer.json                           the LM tokenizer (byte-level BPE)
    model-00001-of-00003.safetensors ...     weights, shards of at most 16 MiB
    model.safetensors.index.json             tensor name -> shard (the Hugging Face layout)
    training.json                            what trained it (a training run's steps only)

A training run's output directory holds `step-NNNNNNNN/` model directories (each with
`train_state.pt`: optimizer, step, data position, random states), `LATEST` naming the newest
complete one, and `metrics.jsonl`. A step directory is written under a temporary name and
renamed into place before `LATEST` moves, so a kill -9 at any moment leaves the last complete
checkpoint current. Loading reads local files only.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..atomic import TMP_PREFIX, atomic_write_bytes, fsync_dir
from ..errors import RetrodbError
from .config import RetroConfig
from .decoder import Retro

SHARD_BYTES = 16 * 1024 * 1024
LATEST = "LATEST"
STATE = "train_state.pt"
INDEX = "model.safetensors.index.json"


def _shards(tensors: dict[str, torch.Tensor], limit: int) -> list[dict[str, torch.Tensor]]:
    """Greedy, in name order: a shard takes tensors until the next would pass `limit` bytes."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        t = tensors[name]
        n = t.numel() * t.element_size()
        if n > limit:
            raise RetrodbError(f"tensor {name} is {n / 2**20:.1f} MiB, more than a {limit / 2**20:.0f} MiB shard",
                               hint="store the weights in bfloat16 (half the bytes), or use a narrower model")
        if shards[-1] and size + n > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    return shards


def write_model_dir(model: Retro, directory: Path, tokenizer_json: str, *, dtype: torch.dtype = torch.float32,
                    extra: dict | None = None, shard_bytes: int = SHARD_BYTES) -> Path:
    """Write config, tokenizer and weight shards into `directory` (which must not exist yet)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    state = model.state_dict()
    if model.cfg.tie_embeddings:
        state.pop("head.weight")  # the same tensor as embed.weight; safetensors stores no aliases
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}
    shards = _shards(tensors, shard_bytes)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    (directory / INDEX).write_text(json.dumps({"metadata": {"total_size": sum(
        t.numel() * t.element_size() for t in tensors.values())}, "weight_map": weight_map}, indent=1, sort_keys=True))
    (directory / "config.json").write_text(model.cfg.to_json())
    (directory / "tokenizer.json").write_text(tokenizer_json)
    if extra is not None:
        (directory / "training.json").write_text(json.dumps(extra, indent=2, sort_keys=True))
    for f in directory.iterdir():
        os.chmod(f, 0o644)  # safetensors writes 0600; a model directory is meant to be shared (package data)
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    return directory


def resolve_model_dir(path: str | Path) -> Path:
    """A model directory, or a training run's output directory (its LATEST step)."""
    path = Path(path).expanduser()
    if (path / LATEST).exists():
        path = path / (path / LATEST).read_text().strip()
    if not (path / "config.json").exists():
        raise RetrodbError(f"{path} is not a model directory (no config.json)",
                           hint="pass a directory written by `retrodb train --out DIR`, or leave out --model "
                                "for the bundled model")
    return path


def read_model_dir(directory: Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Retro:
    from safetensors.torch import load_file

    try:
        cfg = RetroConfig.from_saved(json.loads((directory / "config.json").read_text()))
        weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
        state = {}
        for shard in sorted(set(weight_map.values())):
            state.update(load_file(str(directory / shard), device=str(device)))
    except (OSError, ValueError, KeyError) as exc:
        raise RetrodbError(f"cannot read the model in {directory}: {exc}",
                           hint="the directory needs config.json, model.safetensors.index.json and its shards") from None
    model = Retro(cfg)
    if cfg.tie_embeddings:
        state["head.weight"] = state["embed.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RetrodbError(f"the weights in {directory} do not fit its config.json "
                           f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    return model.to(device=device, dtype=dtype).eval()


def weights_sha256(directory: Path) -> str:
    """One hash over every weight shard (names and bytes), to show that weights did not change."""
    import hashlib

    h = hashlib.sha256()
    for shard in sorted(directory.glob("model-*.safetensors")):
        h.update(shard.name.encode())
        h.update(shard.read_bytes())
    return h.hexdigest()


# ---------------------------------------------------------------- training checkpoints


def save_checkpoint(out: Path, step: int, model: Retro, tokenizer_json: str, state: dict, extra: dict,
                    keep: int = 2) -> Path:
    """Write step-NNNNNNNN atomically, point LATEST at it, keep the newest `keep` steps."""
    from ..faults import point

    name = f"step-{step:08d}"
    tmp = out / f"{TMP_PREFIX}{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    write_model_dir(model, tmp, tokenizer_json, extra=extra)
    point("train:checkpoint-written")  # the step is complete under its temporary name only
    torch.save(state, tmp / STATE)
    with open(tmp / STATE, "rb") as fh:
        os.fsync(fh.fileno())
    final = out / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    fsync_dir(out)
    atomic_write_bytes(out / LATEST, name.encode())
    point("train:checkpoint-published")
    for old in sorted(out.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete step directory of a training run (leftovers of a killed write are removed)."""
    for tmp in out.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
    if not (out / LATEST).exists():
        return None
    path = out / (out / LATEST).read_text().strip()
    if not (path / STATE).exists():
        raise RetrodbError(f"{out}/LATEST names {path.name}, which is incomplete or gone",
                           hint="start again without --resume, or point LATEST at an existing step-* directory")
    return path
