"""Durable writes: write to a temporary name, fsync, rename into place.

Nothing half-written is ever visible under a committed name. Temporary names
start with `.tmp-` so that listing code can never mistake them for data.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

TMP_PREFIX = ".tmp-"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: Path) -> Path:
    """mkdir -p, fsyncing the parent of every directory it creates: after a power loss, a committed
    manifest never names a file in a directory whose own entry was lost."""
    path = Path(path)
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:  # made meanwhile by another process, which fsyncs it
            continue
        fsync_dir(d.parent)
    return path


def tmp_path_for(path: Path) -> Path:
    return path.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{path.name}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one."""
    make_dirs(path.parent)
    tmp = tmp_path_for(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def publish(tmp: Path, final: Path) -> None:
    """fsync a finished temporary file and rename it to its final name."""
    fsync_file(tmp)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def file_digest(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_record(db_root: Path, path: Path) -> dict:
    """The manifest entry for a committed file: relative path, size and sha256."""
    return {
        "path": path.relative_to(db_root).as_posix(),
        "bytes": path.stat().st_size,
        "sha256": file_digest(path),
    }
