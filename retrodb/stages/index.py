"""Index stage: one segment's keys -> its HNSW index (hnswlib; labels are the chunk ids).

The file name carries what the index was built from (space, M, ef_construction
and the first hex digits of the keys file's sha256), so a finished file left by
an interrupted run is recognised and reused, an index built with other
parameters is told apart from the current one, and a new build never
overwrites a committed file.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .. import faults
from ..atomic import file_record, publish, tmp_path_for
from ..errors import CorruptDatabase, RetrodbError, UsageError, require
from ..snapshot import segment_name
from .base import Stage, result

DEFAULT_PARAMS = {"space": "cosine", "M": 32, "ef_construction": 200}
SPACES = ("cosine", "ip")
ADD_BATCH = 32768  # keys converted to float32 and added per call: bounds memory for any segment size
SEED = 100  # hnswlib's level generator seed: builds are reproducible with one thread

_NAME = re.compile(r"^index-(?P<space>[a-z0-9]+)-M(?P<M>\d+)-efc(?P<ef_construction>\d+)-(?P<keys>[0-9a-f]+)\.hnsw$")


def check_params(params: dict) -> dict:
    """A complete, validated copy of index parameters {space, M, ef_construction}."""
    out = {**DEFAULT_PARAMS, **{k: v for k, v in params.items() if v is not None}}
    if out["space"] not in SPACES:
        raise UsageError(f"unknown index space {out['space']!r}; use one of {', '.join(SPACES)}")
    if int(out["M"]) < 2 or int(out["ef_construction"]) < 1:
        raise UsageError(f"bad index parameters M={out['M']} ef_construction={out['ef_construction']}",
                           hint="M must be at least 2 and ef_construction at least 1 (defaults: 32 and 200)")
    return {"space": str(out["space"]), "M": int(out["M"]), "ef_construction": int(out["ef_construction"])}


def index_file_name(params: dict, keys_record: dict) -> str:
    return (f"index-{params['space']}-M{params['M']}-efc{params['ef_construction']}-"
            f"{keys_record['sha256'][:12]}.hnsw")


def params_of(index_path: str | Path) -> dict | None:
    """The parameters an index file was built with, read from its name (None if the name is not ours)."""
    m = _NAME.match(Path(index_path).name)
    if not m:
        return None
    return {"space": m["space"], "M": int(m["M"]), "ef_construction": int(m["ef_construction"])}


def index_is_current(seg: dict, params: dict) -> bool:
    """True if the segment has keys and an index built from those keys with `params`."""
    files = seg["files"]
    if "keys" not in files or "index" not in files:
        return False
    return Path(files["index"]["path"]).name == index_file_name(params, files["keys"])


def read_chunk_ids(root: Path, seg: dict) -> np.ndarray:
    """The chunk_id column of a segment, in row order (row i is key i)."""
    import pyarrow.parquet as pq

    col = pq.read_table(root / seg["files"]["chunks"]["path"], columns=["chunk_id"]).column(0)
    return col.to_numpy().astype(np.int64, copy=False)


def open_keys(root: Path, seg: dict) -> np.ndarray:
    """The segment's keys as a read-only float16 memmap [chunks, dim]."""
    path = root / seg["files"]["keys"]["path"]
    try:
        keys = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise CorruptDatabase(f"cannot read keys file {path}: {exc}",
                              hint="run: retrodb verify DB; rebuild the keys with retrodb embed --reembed") from None
    if keys.ndim != 2:
        raise CorruptDatabase(f"keys file {path} has shape {keys.shape}, not [chunks, dim]")
    return keys


class IndexStage(Stage):
    """Builds one segment's hnswlib index with `threads` threads and publishes it under its final name."""

    name = "index"

    def __init__(self, root: Path, params: dict, threads: int | None = None):
        self.root = Path(root)
        self.params = check_params(params)
        self.threads = threads

    def run(self, unit: dict) -> dict:
        """`unit`: {"segment": number, "entry": its manifest entry}; the result's entry adds the index file."""
        segment, seg = unit["segment"], unit["entry"]
        name = segment_name(segment)
        if "keys" not in seg["files"]:
            raise RetrodbError(f"segment {name} has no keys yet", hint="run: retrodb embed DB")
        final = self.root / "segments" / name / index_file_name(self.params, seg["files"]["keys"])
        if final.exists():  # published by an earlier run that stopped before its commit
            self.report(chunks=seg["chunks"])
            return result(segment, {"files": {"index": file_record(self.root, final)}}, True, chunks=seg["chunks"])
        hnswlib = require("hnswlib", "index")
        from ..executor import default_workers

        threads = self.threads or default_workers()
        keys = open_keys(self.root, seg)
        ids = read_chunk_ids(self.root, seg)
        if len(ids) != len(keys):
            raise CorruptDatabase(f"segment {name}: {len(keys)} keys for {len(ids)} chunks",
                                  hint="rebuild its keys with: retrodb embed DB --reembed")
        index = hnswlib.Index(space=self.params["space"], dim=int(keys.shape[1]))
        index.init_index(max_elements=max(1, len(ids)), ef_construction=self.params["ef_construction"],
                         M=self.params["M"], random_seed=SEED)
        for start in range(0, len(ids), ADD_BATCH):
            block = np.asarray(keys[start: start + ADD_BATCH], dtype=np.float32)
            index.add_items(block, ids[start: start + ADD_BATCH], num_threads=threads)
            self.report(chunks=len(block))
            faults.point("index.batch_added")
        tmp = tmp_path_for(final)
        try:
            index.save_index(str(tmp))
            faults.point("index.saved")
            publish(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        faults.point("index.segment_published")
        return result(segment, {"files": {"index": file_record(self.root, final)}}, chunks=len(ids))
