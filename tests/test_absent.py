import gzip
from pathlib import Path
import json

import hnswlib
import numpy as np

from retrodb.absent import scan_absent
from retrodb.embedder import HashEmbedder
from retrodb.ingest import IngestOptions, ingest
from retrodb.tokenizer import default_lm_tokenizer_dir, default_model_dir, load_tokenizer
from tests.conftest import make_text

SECRET = "zebra-quartz 7731 hidden phrase"


def test_finds_text_inside_compressed_parquet_and_token_ids(tmp_path, db_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": "s", "text": make_text(1) + " " + SECRET + " " + make_text(2)}) + "\n")
    ingest(db_path, [str(src)], IngestOptions(workers=1))
    tok = str(default_lm_tokenizer_dir())  # byte-level BPE: mid-sentence, the secret's ids start with "Ġzebra"
    hits = scan_absent(db_path, [SECRET], tokenizer_path=tok)
    where = {(h.file.split("/")[-1], h.what) for h in hits}
    assert ("documents.parquet", "text") in where and ("chunks.parquet", "tokens") in where
    # the page is zstd-compressed: only the decoded scan sees it
    assert any("column text" in h.location for h in hits)
    assert not any(h.location.startswith("bytes") and h.file.endswith("documents.parquet") for h in hits)
    assert scan_absent(db_path, ["not in the database at all"], tokenizer_path=tok) == []


def test_raw_gzip_and_token_bytes_in_other_files(tmp_path):
    root = tmp_path / "db"
    root.mkdir()
    tok = load_tokenizer(str(default_model_dir()))
    ids = tok.encode(SECRET, add_special_tokens=False).ids
    (root / "log.txt").write_text(f"line one\n{SECRET}\n")
    (root / "old.jsonl.gz").write_bytes(gzip.compress(f'{{"text": "{SECRET}"}}'.encode()))
    (root / "ids.bin").write_bytes(b"\x00" * 7 + np.asarray(ids, dtype="<u2").tobytes())
    (root / "SECRET-free.txt").write_text("nothing")
    hits = scan_absent(root, [SECRET], tokenizer_path=str(default_model_dir()))
    found = {(h.file, h.what, h.location.split(" ")[0]) for h in hits}
    assert found == {("log.txt", "text", "bytes"), ("old.jsonl.gz", "text", "gunzip"), ("ids.bin", "tokens", "bytes")}


def test_ignore_case(tmp_path):
    (tmp_path / "a.txt").write_text("Some ZEBRA-Quartz 7731 HIDDEN phrase")
    assert scan_absent(tmp_path, [SECRET]) == []
    assert len(scan_absent(tmp_path, [SECRET], ignore_case=True)) == 1


def test_keys_in_npy_and_deleted_hnsw_slots(tmp_path):
    emb = HashEmbedder(32)
    key = emb.embed([SECRET])[0]
    others = emb.embed([make_text(i) for i in range(20)])
    np.save(tmp_path / "keys.npy", np.vstack([others, key[None]]).astype(np.float16))
    index = hnswlib.Index(space="cosine", dim=32)
    index.init_index(max_elements=30, ef_construction=50, M=8)
    index.add_items(np.vstack([others, key[None]]), np.arange(100, 121), num_threads=1)  # slot order = row order
    index.mark_deleted(120)  # mark_deleted keeps the vector bytes in the saved file
    index.save_index(str(tmp_path / "index.hnsw"))
    hits = scan_absent(tmp_path, [SECRET], check_keys=True, embedder=emb)
    locs = {(h.file, h.location.split(" (")[0]) for h in hits if h.what == "key"}
    assert locs == {("keys.npy", "row 20"), ("index.hnsw", "vector slot 20 label 120")}
    np.save(tmp_path / "keys.npy", others.astype(np.float16))
    (tmp_path / "index.hnsw").unlink()
    assert scan_absent(tmp_path, [SECRET], check_keys=True, embedder=emb) == []


def test_ignore_case_in_raw_files_is_unicode(tmp_path):
    (tmp_path / "a.txt").write_text("Notiz: HERR MÜLLER, ÉCOLE ΣΟΦΊΑ", encoding="utf-8")
    for needle in ("herr müller", "école", "σοφία"):
        assert len(scan_absent(tmp_path, [needle], ignore_case=True)) == 1, needle
        assert scan_absent(tmp_path, [needle]) == []


def test_files_are_streamed_and_matches_across_blocks_found(tmp_path, monkeypatch):
    import zstandard

    from retrodb import absent

    monkeypatch.setattr(absent, "BLOCK", 1000)
    monkeypatch.setattr(Path, "read_bytes", lambda self: (_ for _ in ()).throw(AssertionError("read whole")))
    body = ("x" * 995 + SECRET + "y" * 3000).encode()
    (tmp_path / "log.txt").write_bytes(body)
    (tmp_path / "old.jsonl.gz").write_bytes(gzip.compress(body))
    (tmp_path / "old.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(body))
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(body)[:-8])  # truncated: scanned as far as it goes
    hits = scan_absent(tmp_path, [SECRET.upper()], ignore_case=True)
    assert sorted((h.file, h.location) for h in hits) == [
        ("cut.jsonl.gz", "gunzip offset 995"), ("log.txt", "bytes offset 995"), ("old.jsonl.gz", "gunzip offset 995"),
        ("old.jsonl.zst", "bytes offset 14"), ("old.jsonl.zst", "unzstd offset 995")]  # zstd keeps literals raw


def test_hits_name_the_document(tmp_path, db_path):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": f"doc-{i}", "text": make_text(i) + (f" {SECRET}" if i == 3 else "")})
                           + "\n" for i in range(6)))
    ingest(db_path, [str(src)], IngestOptions(workers=1))
    hits = scan_absent(db_path, [SECRET], tokenizer_path=str(default_lm_tokenizer_dir()))
    docs = {(h.what, h.doc_id, h.segment) for h in hits if h.doc_id}
    assert ("text", "doc-3", "seg-000001") in docs and ("tokens", "doc-3", "seg-000001") in docs
    assert "document 'doc-3' of seg-000001" in [h for h in hits if h.doc_id][0].describe()


def test_verify_absent_says_what_it_checked_and_names_the_document(tmp_path, db_path, cli):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": f"doc-{i}", "text": make_text(i) + (f" {SECRET}" if i == 3 else "")})
                           + "\n" for i in range(6)))
    ingest(db_path, [str(src)], IngestOptions(workers=1))
    bad = cli("verify", db_path, "--absent", SECRET)
    assert bad.code == 1 and "in document 'doc-3' of seg-000001" in bad.err, bad.err
    ok = cli("verify", db_path, "--absent", "nowhere to be found", "--format", "json")
    summary = ok.json_lines()[0]["absent"]
    assert ok.code == 0 and summary["files"] >= 4 and summary["bytes"] > 1000 and summary["texts"] == 1
    assert summary["found"] == 0 and any("token ids" in k for k in summary["kinds"])
    human = cli("verify", db_path, "--absent", "nowhere to be found", "--ignore-case")
    assert human.code == 0 and "for 1 text(s) in any case as text" in human.out and "none found" in human.out
