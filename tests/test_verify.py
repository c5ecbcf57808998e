"""verify: a clean database passes; each kind of damage is reported precisely; leftovers are warnings."""

from __future__ import annotations

import json
import os
import socket

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import retrodb
from retrodb.atomic import file_record
from retrodb.delete import delete
from retrodb.verify import verify
from tests.edit_helpers import build_db


@pytest.fixture
def db(tmp_path):
    return build_db(tmp_path / "db", n_docs=12, segment_bytes=1500)


def first_segment(root):
    snap = retrodb.open(root).snapshot
    name = sorted(snap.segments)[0]
    return name, snap.segments[name]


def errors(root, **kw) -> list[tuple[str, str]]:
    return [(f.check, f.message) for f in verify(root, **kw).errors]


def rewrite(root, name: str, kind: str, table_or_array) -> None:
    """Replace one file of a segment with altered content AND record it in a new manifest (so only the
    semantic checks can catch it)."""
    db = retrodb.open(root)
    with db.writer("test") as w:
        data = w.base.derive("test")
        seg = data["segments"][name]
        path = root / seg["files"][kind]["path"]
        path.unlink()
        if kind == "keys":
            np.save(path, table_or_array)
        else:
            pq.write_table(table_or_array, path)
        seg["files"][kind] = file_record(root, path)
        w.commit(data)


def test_clean_database_passes(cli, db):
    report = verify(db)
    assert report.ok and not report.findings and report.checks[:4] == ["pending", "files", "schema", "rows"]
    assert report.files == sum(len(s["files"]) for s in retrodb.open(db).snapshot.segments.values())
    r = cli("verify", db, "--format", "json")
    assert r.code == 0 and r.json_lines()[0]["ok"] is True


def test_changed_byte_is_caught_by_checksum_not_by_quick(cli, db):
    name, seg = first_segment(db)
    path = db / seg["files"]["chunks"]["path"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    os.chmod(path, 0o644)
    path.write_bytes(bytes(data))
    assert ("files", f"{name}: chunks file content differs from its recorded sha256") in errors(db)
    assert not any(c == "files" for c, _ in errors(db, quick=True))
    r = cli("verify", db)
    assert r.code == 1 and "sha256" in r.err and "FAILED" in r.out and seg["files"]["chunks"]["path"] in r.err


def test_missing_and_truncated_files(cli, db):
    name, seg = first_segment(db)
    (db / seg["files"]["keys"]["path"]).unlink()
    docs = db / seg["files"]["documents"]["path"]
    docs.write_bytes(docs.read_bytes()[:100])
    found = errors(db, quick=True)
    assert ("files", f"{name}: keys file is missing") in found
    assert any(m.startswith(f"{name}: documents file has 100 bytes") for _, m in found)
    r = cli("verify", db, "--quick", "-f", "json")
    out = r.json_lines()[0]
    assert r.code == 1 and out["ok"] is False and out["errors"] == 2
    assert {f["path"] for f in out["findings"]} == {seg["files"]["keys"]["path"], seg["files"]["documents"]["path"]}


def test_counts_keys_shape_and_index_count_must_line_up(db):
    import hnswlib

    name, seg = first_segment(db)
    keys = np.load(db / seg["files"]["keys"]["path"])
    rewrite(db, name, "keys", keys[:-1])
    assert any("keys are float16[" in m and f"expected float16[{seg['chunks']}, 16]" in m for _, m in errors(db))
    rewrite(db, name, "keys", keys)
    # an index that does not cover every chunk
    index = hnswlib.Index(space="ip", dim=16)
    index.init_index(max_elements=seg["chunks"])
    index.add_items(keys[:-2].astype(np.float32), np.arange(seg["chunks"] - 2))
    path = db / "segments" / name / "index-test.hnsw"
    index.save_index(str(path))
    w_db = retrodb.open(db)
    with w_db.writer("test") as w:
        data = w.base.derive("test")
        data["segments"][name]["files"]["index"] = file_record(db, path)
        data["segments"][name]["tokens"] += 1
        w.commit(data)
    found = errors(db)
    assert ("rows", f"{name}: index holds {seg['chunks'] - 2:,} elements for {seg['chunks']:,} chunks") in found
    assert any(m.startswith(f"{name}: ") and "tokens (documents)" in m for _, m in found)


def test_broken_chunk_ids_and_continuations(db):
    name, seg = first_segment(db)
    chunks = pq.read_table(db / seg["files"]["chunks"]["path"])
    cont = chunks["continuation_id"].to_pylist()
    cont[0] = cont[0] + 5
    rewrite(db, name, "chunks", chunks.set_column(7, "continuation_id", pa.array(cont, pa.int64())))
    msgs = [m for _, m in errors(db)]
    assert any("1 chunk(s): continuation_id does not name the next chunk of the same document (first: row 0" in m
               for m in msgs)
    # chunk ids reused by another segment
    other = sorted(retrodb.open(db).snapshot.segments)[1]
    oseg = retrodb.open(db).snapshot.segments[other]
    rewrite(db, name, "chunks", chunks)
    ochunks = pq.read_table(db / oseg["files"]["chunks"]["path"])
    odocs = pq.read_table(db / oseg["files"]["documents"]["path"])
    shift = int(chunks["chunk_id"][0].as_py()) - int(ochunks["chunk_id"][0].as_py())
    fix = lambda col: pa.array([x + shift if x is not None else None for x in col.to_pylist()], pa.int64())  # noqa: E731
    rewrite(db, other, "chunks", ochunks.set_column(0, "chunk_id", fix(ochunks["chunk_id"]))
            .set_column(7, "continuation_id", fix(ochunks["continuation_id"])))
    rewrite(db, other, "documents", odocs.set_column(7, "first_chunk_id", fix(odocs["first_chunk_id"])))
    msgs = errors(db)
    assert [c for c, _ in msgs] == ["chunk_ids"]
    assert f"used in both {name} and {other}" in msgs[0][1] or f"used in both {other} and {name}" in msgs[0][1]


def test_tombstones_must_name_documents_of_their_segment(db):
    delete(db, doc_ids=["d0"])
    name, seg = first_segment(db)
    t = pq.read_table(db / seg["files"]["tombstones"]["path"])
    rewrite(db, name, "tombstones", t.set_column(0, "doc_id", pa.array(["ghost"])))
    msgs = [m for _, m in errors(db)]
    assert f"{name}: tombstone for 'ghost', which is not a document of this segment" in msgs


def test_retained_snapshot_missing_a_file_is_an_error(db):
    old = retrodb.open(db).version
    delete(db, doc_ids=["d0"])
    from retrodb.compact import compact

    compact(db, 0.0, 0)
    name, seg = next((n, s) for n, s in retrodb.open(db, at=old).snapshot.segments.items()
                     if n not in retrodb.open(db).snapshot.segments)
    (db / seg["files"]["chunks"]["path"]).unlink()
    assert ("retained", f"retained snapshot v{old} references a missing file") in errors(db)
    assert not verify(db, at=old).ok


def test_leftovers_are_warnings_and_the_next_writer_cleans_them(cli, db):
    current = retrodb.open(db).version
    (db / "segments" / "seg-000001" / ".tmp-abc-chunks.parquet").write_bytes(b"partial")
    (db / "_work" / "ingest-0123").mkdir(parents=True)
    (db / "manifests" / f"v-{current + 1:08d}.json").write_text("{}")
    (db / "segments" / "seg-000999").mkdir()
    (db / "segments" / "seg-000999" / "chunks.parquet").write_bytes(b"x")
    (db / "segments" / "seg-000001" / "tombstones-v00000042.parquet").write_bytes(b"x")
    (db / "LOCK").write_text(json.dumps({"pid": 2 ** 22 + 12345, "host": socket.gethostname(), "command": "add",
                                         "since": "then"}))
    report = verify(db)
    assert report.ok
    found = {(f.check, f.path): f.message for f in report.warnings}
    assert "temporary file" in found[("leftovers", "segments/seg-000001/.tmp-abc-chunks.parquet")]
    assert "unfinished job ingest-0123" in found[("leftovers", "_work/ingest-0123")]
    assert "never committed" in found[("leftovers", f"manifests/v-{current + 1:08d}.json")]
    assert "segment directory" in found[("leftovers", "segments/seg-000999")]
    assert "vacuum" in found[("leftovers", "segments/seg-000001/tombstones-v00000042.parquet")]
    assert "stale writer lock of pid" in found[("leftovers", "LOCK")]
    r = cli("verify", db)
    assert r.code == 0 and "warning" in r.err and "OK" in r.out
    delete(db, doc_ids=["d1"])  # any writing command cleans what interrupted commands left
    left = {f.path for f in verify(db).warnings}
    assert left == {"segments/seg-000001/tombstones-v00000042.parquet"}  # unreferenced data: vacuum's job
