"""Leakage: r(C) on hand-made token sequences, end to end on a database, and MinHash near-duplicates."""

import json

import pytest

import retrodb
from retrodb.leakage import leakage, shingles
from retrodb.overlap import Run, bucket, longest_common_run, ratio
from tests.conftest import make_text

A = list(range(100, 164))  # a 64-token chunk


def test_longest_common_run_hand_made():
    assert longest_common_run(A, A) == Run(64, 0, 0)  # identical
    shifted = [7, 8, 9] + A[:50]
    assert longest_common_run(A, shifted) == Run(50, 0, 3)  # shifted
    partial = [1, 2] + A[20:30] + [3] + A[40:45]
    assert longest_common_run(A, partial) == Run(10, 20, 2)  # partial overlap: the longer of two runs
    assert longest_common_run(A, list(range(1000, 1128))).length == 0  # no overlap
    assert longest_common_run([], A) == Run(0, 0, 0)
    assert longest_common_run([5, 5, 5], [5, 5]) == Run(2, 0, 0)  # repeats


def test_ratio_and_buckets():
    r, which, run = ratio(A, [A[10:20], [9] * 128, A[:32] + [0] * 96])
    assert (r, which, run.length) == (0.5, 2, 32)
    assert ratio(A, [])[:2] == (0.0, -1)
    assert ratio(A, [A[:1] + A])[0] == 1.0
    assert [bucket(x) for x in (0.0, 0.01, 0.125, 0.126, 0.25, 0.5, 0.51, 0.75, 1.0)] == \
        ["0", "<=12.5%", "<=12.5%", "<=25%", "<=25%", "<=50%", "<=75%", "<=75%", "<=100%"]


def test_shingles():
    assert len(shingles(list(range(20)))) == 8
    assert shingles([1, 2, 3]) == {bytes(bytearray([1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0]))}
    assert shingles([]) == set()


@pytest.fixture(scope="module")
def leak_db(tmp_path_factory):
    from retrodb.embed import embed
    from retrodb.index import index
    from retrodb.ingest import IngestOptions, ingest

    tmp = tmp_path_factory.mktemp("leak")
    src = tmp / "src.jsonl"
    base = make_text(7, 300)
    words = base.split()
    near = " ".join(w if i != 150 else "walrus" for i, w in enumerate(words))  # one word changed
    half = " ".join(w if i % 2 else "walrus" for i, w in enumerate(words))  # every other word changed
    with open(src, "w") as f:
        for i in range(12):
            f.write(json.dumps({"id": f"d{i}", "text": make_text(i, 120)}) + "\n")
        f.write(json.dumps({"id": "near-copy", "text": near}) + "\n")
        f.write(json.dumps({"id": "half-copy", "text": half}) + "\n")
    root = tmp / "db"
    ingest(root, [str(src)], IngestOptions(workers=1, segment_bytes=3000))
    embed(root, "hash:32")
    index(root, M=8, ef_construction=40, threads=1)
    evals = tmp / "eval"
    evals.mkdir()
    (evals / "copy.txt").write_text(make_text(3, 120))  # exactly d3
    (evals / "base.txt").write_text(base)
    (evals / "unrelated.txt").write_text("Zebra quantum marmalade xylophone walrus! " * 30)
    return root, evals


def test_identical_text_leaks_fully_and_unrelated_text_does_not(leak_db):
    root, evals = leak_db
    report = leakage(root, [str(evals / "copy.txt"), str(evals / "unrelated.txt")], k=10)
    copy = [c for c in report.chunks if c.file.endswith("copy.txt")]
    other = [c for c in report.chunks if c.file.endswith("unrelated.txt")]
    assert copy and all(c.r == 1.0 and c.doc_id == "d3" for c in copy)
    assert other and all(c.run <= 6 for c in other)  # a shared word or two ("walrus": several BPE tokens), never a passage
    s = report.summary()
    assert s["files"][copy[0].file]["buckets"]["<=100%"] == len(copy)
    assert s["files"][copy[0].file]["share_bytes_r_above_half"] == 1.0
    assert s["files"][other[0].file]["share_bytes_r_above_half"] == 0.0
    assert s["overall"]["chunks"] == len(copy) + len(other)
    assert s["most_leaked"][0]["r"] == 1.0 and s["most_leaked"][0]["doc_id"] == "d3"


def test_dedup_finds_planted_near_duplicates_only(leak_db, tmp_path, cli):
    root, evals = leak_db
    report = leakage(root, [str(evals / "base.txt"), str(evals / "unrelated.txt")], dedup=True)
    assert [(d.doc_id, d.file.endswith("base.txt")) for d in report.duplicates] == [("near-copy", True)]
    assert 0.8 <= report.duplicates[0].jaccard < 1.0
    ids = tmp_path / "ids.txt"
    res = cli("leakage", root, evals / "base.txt", "--dedup", "--out-ids", ids, "--format", "json")
    assert res.code == 0, res.err
    lines = res.json_lines()
    assert all(set(x) >= {"file", "position", "r", "doc_id"} for x in lines[:-1])
    summary = lines[-1]["summary"]
    assert summary["duplicates"][0]["doc_id"] == "near-copy" and summary["out_ids"]["documents"] == 1
    assert ids.read_text() == "near-copy\n"
    copy = tmp_path / "db"
    import shutil

    shutil.copytree(root, copy)
    res = cli("delete", copy, "--ids-file", ids, "--yes")
    assert res.code == 0, res.err
    assert not retrodb.open(copy).sql("SELECT * FROM documents WHERE doc_id = 'near-copy'").num_rows


def test_cli_human_output_escapes_data(leak_db, tmp_path, cli):
    root, evals = leak_db
    odd = tmp_path / "[bold]odd[red].txt"
    odd.write_text(make_text(3, 120))
    res = cli("leakage", root, odd, "--top", "2")
    assert res.code == 0, res.err
    assert "[bold]odd[red].txt" in res.out and "most leaked chunks" in res.out and "r=1.000" in res.out
    res = cli("leakage", root, tmp_path / "missing.txt")
    assert res.code == 1 and "no evaluation text" in res.err
    res = cli("leakage", root, odd, "--out-ids", tmp_path / "x")
    assert res.code == 1 and "--dedup" in res.err


def test_bad_evaluation_input_costs_only_itself(leak_db, tmp_path, cli):
    root, evals = leak_db
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01binary")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    jsonl = tmp_path / "eval.jsonl"
    jsonl.write_text(json.dumps({"text": make_text(3, 120)}) + "\n{broken\n")
    res = cli("leakage", root, tmp_path / "bin.txt", tmp_path / "latin1.txt", jsonl, "--format", "json")
    assert res.code == 0, res.err
    lines = res.json_lines()
    assert {x["file"] for x in lines[:-1]} == {f"{jsonl}:1"} and all(x["r"] == 1.0 for x in lines[:-1])
    issues = lines[-1]["summary"]["issues"]
    assert len(issues) == 3 and any("bin.txt" in i for i in issues) and any(":2" in i for i in issues)
    res = cli("leakage", root, tmp_path / "bin.txt")
    assert res.code == 1 and "no evaluation text could be read" in res.err
