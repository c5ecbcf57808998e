"""Bad input never costs good documents, never crashes, never hangs: a table of hostile inputs.

Each case writes a few files (good records around the bad one), ingests them with --on-error skip and
checks which documents made it and which issues were reported, by kind and file:line. Cases that are
not one file (a FIFO, symlinks, folders, stdin, ids, a huge document) follow the table.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

import retrodb
from retrodb.errors import UsageError
from retrodb.ingest import IngestOptions, ingest
from tests.conftest import REPO, make_text, run_retrodb


def jsonl(*records) -> bytes:
    """Records (dicts, or raw lines as str/bytes) as JSONL bytes."""
    out = b""
    for r in records:
        line = r if isinstance(r, bytes) else (r.encode() if isinstance(r, str) else json.dumps(r).encode())
        out += line + b"\n"
    return out


def good(i: int, **extra) -> dict:
    return {"id": f"g{i}", "text": make_text(i, 30), **extra}


def many_lines(n: int) -> bytes:
    return jsonl(*[good(i) for i in range(n)])


def corrupt_parquet() -> bytes:
    """Two row groups of 20 rows; a data page of the first one's text column is overwritten."""
    import io

    buf = io.BytesIO()
    texts = [make_text(i, 30) for i in range(40)]
    pq.write_table(pa.table({"id": [f"p{i}" for i in range(40)], "text": texts}), buf, row_group_size=20,
                   compression="none", use_dictionary=False)
    data = bytearray(buf.getvalue())
    col = pq.ParquetFile(pa.BufferReader(bytes(data))).metadata.row_group(0).column(1)
    mid = col.data_page_offset + col.total_compressed_size // 2
    data[mid: mid + 16] = b"\xff" * 16
    return bytes(data)


@dataclass
class Case:
    name: str
    files: dict[str, bytes | Callable[[], bytes]]  # relative path -> content
    documents: set[str]  # ids that must be ingested
    issues: list[tuple[str, str]]  # (kind, where suffix: "file:line" or "file#rowN")
    options: dict = field(default_factory=dict)
    exact_documents: bool = True


CASES = [
    Case("5000-digit integer: only its line is lost",
         {"a.jsonl": jsonl(good(1), '{"id": "big", "text": "x", "n": ' + "1" * 5000 + "}", good(2))},
         {"g1", "g2"}, [("malformed-json", "a.jsonl:2")]),
    Case("JSON nested 3000 deep: only its line is lost",
         {"a.jsonl": jsonl(good(1), "[" * 3000 + "]" * 3000, '{"id": "d", "text": "x", "m": ' + "[" * 5000 + "]" * 5000 + "}",
                           good(2))},
         {"g1", "g2"}, [("malformed-json", "a.jsonl:2"), ("malformed-json", "a.jsonl:3")]),
    Case("truncated .jsonl.zst: reported like .gz, the whole lines before it kept",
         {"t.jsonl.zst": lambda: (lambda c: c[: len(c) // 2])(zstandard.ZstdCompressor().compress(many_lines(400)))},
         set(), [("truncated", "t.jsonl.zst:")], exact_documents=False),
    Case("truncated .jsonl.gz",
         {"t.jsonl.gz": lambda: (lambda c: c[: len(c) // 2])(gzip.compress(many_lines(400)))},
         set(), [("truncated", "t.jsonl.gz:")], exact_documents=False),
    Case("two zstd frames back to back are one stream, not a truncation",
         {"f.jsonl.zst": lambda: zstandard.ZstdCompressor().compress(jsonl(good(1)))
          + zstandard.ZstdCompressor().compress(jsonl(good(2)))},
         {"g1", "g2"}, []),
    Case("lone surrogate in the text, the id, the metadata",
         {"s.jsonl": jsonl(good(1), '{"id": "s1", "text": "bad \\udc80 text"}', '{"id": "s\\udc80", "text": "t"}',
                           '{"id": "s3", "text": "t", "meta": "\\ud800"}', good(2))},
         {"g1", "g2"}, [("invalid-utf8", "s.jsonl:2"), ("bad-id", "s.jsonl:3"), ("invalid-utf8", "s.jsonl:4")]),
    Case("corrupt Parquet data page: its row group is skipped, the next one read",
         {"c.parquet": corrupt_parquet},
         {f"p{i}" for i in range(20, 40)}, [("unreadable", "c.parquet#row1")]),
    Case("ids: strings or integers; 1 and \"1\" are the same id; the rest refused",
         {"ids.jsonl": jsonl({"id": 1, "text": "one"}, {"id": "1", "text": "one again"}, {"id": {"x": 1}, "text": "t"},
                             {"id": "a\nb", "text": "t"}, {"id": "x" * 2000, "text": "t"}, {"id": 1.5, "text": "t"},
                             {"id": True, "text": "t"}, {"id": " padded ", "text": "t"}, {"id": "tab\there", "text": "t"},
                             {"id": "ok é [/bold]", "text": "fine"}, {"id": None, "text": "no id: content hash"})},
         {"1", "ok é [/bold]"}, [("duplicate-id", "ids.jsonl:2"), ("bad-id", "ids.jsonl:3"), ("bad-id", "ids.jsonl:4"),
                                 ("bad-id", "ids.jsonl:5"), ("bad-id", "ids.jsonl:6"), ("bad-id", "ids.jsonl:7"),
                                 ("bad-id", "ids.jsonl:8"), ("bad-id", "ids.jsonl:9")], exact_documents=False),
    Case("Parquet id column of floats",
         {"f.parquet": lambda: _parquet({"id": [1.5, 2.5], "text": ["a b", "c d"]})},
         set(), [("bad-id", "f.parquet#row1"), ("bad-id", "f.parquet#row2")]),
]


def _parquet(columns: dict) -> bytes:
    import io

    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf)
    return buf.getvalue()


def ids_in(db) -> set[str]:
    return {r["doc_id"] for r in retrodb.open(db).sql("SELECT doc_id FROM documents").to_pylist()}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_table(tmp_path, case: Case):
    src = tmp_path / "src"
    src.mkdir()
    (src / "anchor.txt").write_text(make_text(999, 30))  # every run ingests something
    for rel, content in case.files.items():
        (src / rel).write_bytes(content() if callable(content) else content)
    report = ingest(tmp_path / "db", [str(src)], IngestOptions(workers=1, **case.options))
    found = ids_in(tmp_path / "db")
    assert "anchor.txt" in found
    if case.exact_documents:
        assert found - {"anchor.txt"} == case.documents, report.issues
    else:
        assert case.documents <= found, report.issues
    got = [(i["kind"], i["where"]) for i in report.issues]
    for kind, where in case.issues:
        assert any(k == kind and w.startswith(str(src / where)) for k, w in got), (kind, where, got)
    assert len(got) == len(case.issues), got


def test_truncated_zstd_keeps_every_whole_line_before_the_cut(tmp_path):
    data = many_lines(4000)  # many zstd blocks: half the file decodes to whole lines
    cut = zstandard.ZstdCompressor().compress(data)
    path = tmp_path / "t.jsonl.zst"
    path.write_bytes(cut[: len(cut) // 2])
    readable = zstandard.ZstdDecompressor().decompressobj().decompress(cut[: len(cut) // 2])
    whole = readable.count(b"\n")
    report = ingest(tmp_path / "db", [str(path)], IngestOptions(workers=1))
    assert report.documents == whole > 0
    (issue,) = [i for i in report.issues if i["kind"] == "truncated"]
    assert issue["where"] == f"{path}:{whole + 1}" or issue["where"] == f"{path}:{whole + 2}"
    assert "truncated" in issue["message"]


def test_fifo_is_skipped_never_opened(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "good.txt").write_text(make_text(1))
    os.mkfifo(src / "pipe.txt")
    os.mkfifo(tmp_path / "named.jsonl")
    # in subprocesses with a timeout: a run that opened a FIFO would block forever
    proc = run_retrodb("ingest", tmp_path / "db", src, "--format", "json", timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    report = json.loads(proc.stdout)
    assert ids_in(tmp_path / "db") == {"good.txt"}
    assert [(i["kind"], i["where"]) for i in report["issues"]] == [("not-a-file", str(src / "pipe.txt"))]
    assert "FIFO" in report["issues"][0]["message"]
    proc = run_retrodb("ingest", tmp_path / "db", tmp_path / "named.jsonl", timeout=120)
    assert proc.returncode == 1 and b"not-a-file" in proc.stderr and b"FIFO" in proc.stderr, proc.stderr


def test_symlinks_hidden_entries_and_unreadable_folders(tmp_path, monkeypatch):
    src, other = tmp_path / "src", tmp_path / "other"
    (src / "sub").mkdir(parents=True)
    (src / "locked").mkdir()
    (src / ".git").mkdir()
    other.mkdir()
    (src / "good.txt").write_text(make_text(1))
    (src / "sub" / "deep.txt").write_text(make_text(2))
    (src / "locked" / "secret.txt").write_text(make_text(3))
    (src / ".hidden.txt").write_text(make_text(4))
    (src / ".git" / "HEAD.txt").write_text(make_text(5))
    (other / "outside.txt").write_text(make_text(6))
    (src / "linked").symlink_to(other, target_is_directory=True)
    (src / "link.txt").symlink_to(src / "sub" / "deep.txt")  # a symlink to a file is read as that file
    (src / "loop.txt").symlink_to(src / "loop.txt")
    (src / "dangling.txt").symlink_to(tmp_path / "nowhere.txt")
    real_scandir = os.scandir

    def scandir(path="."):  # root reads every folder: deny this one as an unreadable folder would be
        if str(path) == str(src / "locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    report = ingest(tmp_path / "db", [str(src)], IngestOptions(workers=1))
    assert ids_in(tmp_path / "db") == {"good.txt", "sub/deep.txt", "link.txt"}
    issues = {(i["kind"], i["where"]): i["message"] for i in report.issues}
    assert "symlink loop" in issues[("unreadable", str(src / "loop.txt"))]
    assert "broken symlink" in issues[("unreadable", str(src / "dangling.txt"))]
    assert "Permission denied" in issues[("unreadable", str(src / "locked"))]
    assert len(issues) == 3
    ignored = {(i["kind"], i["where"]) for i in report.ignored}
    assert ignored == {("hidden", str(src / ".git")), ("hidden", str(src / ".hidden.txt")),
                       ("symlinked-folder", str(src / "linked"))}
    # the policy is not an error, even under --on-error fail
    ingest(tmp_path / "db2", [str(src / "sub"), str(src / ".hidden.txt")], IngestOptions(workers=1, on_error="fail"))
    assert ids_in(tmp_path / "db2") == {"deep.txt", ".hidden.txt"}  # a hidden file named as a source is read


def test_non_utf8_file_name_is_a_named_skip_and_prints(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "good.txt").write_text(make_text(1))
    bad = os.path.join(os.fsencode(src), b"caf\xe9.txt")
    with open(bad, "wb") as f:
        f.write(make_text(2).encode())
    proc = run_retrodb("ingest", tmp_path / "db", src, "--workers", "1")
    err = proc.stderr.decode()
    assert proc.returncode == 0 and "internal error" not in err, err
    assert "caf\\xe9.txt" in err and "not valid UTF-8" in err
    assert ids_in(tmp_path / "db") == {"good.txt"}


def test_nothing_ingested_is_an_error_that_says_what_was_found(cli, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "page.html").write_text("<p>hello</p>")
    (src / "notes.csv").write_text("a,b\n")
    r = cli("ingest", tmp_path / "db1", src)
    assert r.code == 1 and "nothing ingested" in r.err and "--format text" in r.err and "2 unsupported" in r.err
    assert not (tmp_path / "db1").exists()  # no empty database left behind
    assert cli("ingest", tmp_path / "db1", src, "--format", "text").code == 0
    records = tmp_path / "r.jsonl"
    records.write_text(jsonl({"url": "u1", "body": "b"}, {"url": "u2", "content": "c"}).decode())
    r = cli("ingest", tmp_path / "db2", records, "--format", "json")
    assert r.code == 1 and "--text-field" in r.err and "body, content, url" in r.err
    out = r.json_lines()[0]
    assert out["documents"] == 0 and out["issue_counts"] == {"missing-field": 2} and "nothing ingested" in out["error"]
    r = cli("ingest", tmp_path / "db3", tmp_path / "no-such-dir")
    assert r.code == 1 and "no such file or folder" in r.err and "check the paths" in r.err
    # an ingest whose every document is already there is "nothing new", not an error
    assert cli("ingest", tmp_path / "db1", src, "--format", "text").code == 0


def test_format_text_on_stdin_is_one_plain_text_document(tmp_path):
    text = '{"this": "is not JSON to be parsed"}\nsecond line of plain text\n'
    proc = run_retrodb("ingest", tmp_path / "db", "-", "--format", "text", "--format", "json", input=text.encode())
    assert proc.returncode == 0, proc.stderr.decode()
    rows = retrodb.open(tmp_path / "db").sql("SELECT doc_id, source, text FROM documents").to_pylist()
    assert len(rows) == 1 and rows[0]["text"] == text and rows[0]["doc_id"].startswith("sha256:")
    with pytest.raises(UsageError, match="only source"):
        ingest(tmp_path / "db", ["-", str(tmp_path)], IngestOptions(workers=1))


def test_ids_are_defined_and_deletable_through_an_ids_file(cli, tmp_path):
    path = tmp_path / "ids.jsonl"
    path.write_bytes(jsonl({"id": 7, "text": make_text(1)}, {"id": "x [/bold] é", "text": make_text(2)},
                           {"id": "two\nlines", "text": make_text(3)}))
    report = ingest(tmp_path / "db", [str(path)], IngestOptions(workers=1))
    assert ids_in(tmp_path / "db") == {"7", "x [/bold] é"}
    (bad,) = report.issues
    assert bad["kind"] == "bad-id" and bad["where"] == f"{path}:3" and "line break" in bad["message"]
    ids_file = tmp_path / "del.txt"
    ids_file.write_text("7\nx [/bold] é\n")
    r = cli("delete", tmp_path / "db", "--ids-file", ids_file, "--yes")
    assert r.code == 0, r.err
    assert ids_in(tmp_path / "db") == set()


# ---------------------------------------------------------------- memory per document

# VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over exec from the forked parent (pytest's RSS).
RSS_PROBE = r"""
import json, re, sys
from retrodb.ingest import ingest, IngestOptions
report = ingest(sys.argv[1], [sys.argv[2]], IngestOptions(workers=1))
hwm = int(re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read()).group(1))
print(json.dumps({"documents": report.documents, "chunks": report.chunks, "peak_mb": hwm / 1024}))
"""


def test_a_long_one_line_document_is_tokenised_in_bounded_memory(tmp_path):
    """A 3 MB one-line document: tokenised whole, the process peaked at 438 MB (1.1 GB for 8 MB: about
    120 bytes per character); window by window, at 189 MB (233 MB for 8 MB), near the baseline of imports,
    the text and its JSON line. bench/bench_big_document.py measures 50 MB."""
    text = " ".join(make_text(i, 200) for i in range(6000))[: 3 << 20]
    path = tmp_path / "big.jsonl"
    path.write_text(json.dumps({"id": "big", "text": text}) + "\n")
    proc = subprocess.run([sys.executable, "-c", RSS_PROBE, str(tmp_path / "db"), str(path)], cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["documents"] == 1
    assert out["peak_mb"] < 320, out


def test_windowed_tokenisation_equals_whole_document_tokenisation(monkeypatch):
    from retrodb import tokenizer as tk

    tok = tk.load_tokenizer(str(tk.default_model_dir()))
    assert tk.streamable(tok)
    text = "  ".join(make_text(i, 120) for i in range(40)) + "\n\nTail:\tend.   Ünïcödé [UNK] 中文 text"
    whole = tk.chunk_batch(tok, [text], 64)
    monkeypatch.setattr(tk, "WINDOW_CHARS", 777)  # many windows, cut at odd places
    windowed = tk.chunk_batch(tok, [text], 64)
    for name in ("tokens", "doc_token_counts", "chunk_token_starts", "chunk_token_counts", "chunk_position",
                 "chunk_char_start", "chunk_char_end"):
        assert (getattr(whole, name) == getattr(windowed, name)).all(), name
    assert tk.window_cuts("x" * 5000, 777) is None  # no space to cut at: such a document is refused
    assert "without a space" in tk.too_large(tok, "x" * 5000)
