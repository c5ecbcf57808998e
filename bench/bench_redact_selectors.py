"""Redaction with many selectors: `--from-file` with thousands of literals, and detectors on 1 MB documents.

Times, on a small database built in a temporary folder (hash embedder, no index):
- the audit's selector hashes for N literals: one salted key derivation (PBKDF2, 200k rounds), then one
  HMAC per selector (before issue 9: one PBKDF2 per selector, minutes for thousands of lines);
- a dry run of `redact --from-file` with N literals (DuckDB scan with one RE2 alternation, RE2 set in Python);
- each built-in detector over 1 MB of adversarial text (linear time: RE2 candidates, bounded checks).

    python bench/bench_redact_selectors.py [--lines 1000 5000] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from retrodb.ingest import IngestOptions, ingest  # noqa: E402
from retrodb.pii import DETECTORS, find  # noqa: E402
from retrodb.redact import audit_key, build_selectors, redact  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, nargs="+", default=[1000, 5000])
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-redact-sel-"))
    src = work / "src.jsonl"
    src.write_text("".join(json.dumps({"id": f"d{i}", "text": f"document {i} " * 200}) + "\n" for i in range(2000)))
    root = work / "db"
    if not root.exists():
        ingest(root, [str(src)], IngestOptions(workers=1))
    results = {}
    started = time.perf_counter()
    hashlib.pbkdf2_hmac("sha256", b"x", b"salt", 200_000)
    one_pbkdf2 = time.perf_counter() - started
    for n in args.lines:
        f = work / f"literals-{n}.txt"
        f.write_text("".join(f"secret literal number {i}\n" for i in range(n)))
        sel = build_selectors(from_file=f)
        started = time.perf_counter()
        key = audit_key(b"salt")
        [s.describe_for_audit(key) for s in sel]
        hashes = time.perf_counter() - started
        started = time.perf_counter()
        redact(root, sel, dry_run=True)
        plan = time.perf_counter() - started
        results[f"from_file_{n}"] = {"audit_hashes_s": round(hashes, 3), "dry_run_s": round(plan, 3),
                                     "per_selector_pbkdf2_would_take_s": round(one_pbkdf2 * n, 1)}
    mb = 1 << 20
    texts = {"base64+email": "QUJD" * (mb // 4) + "jane@example.org", "digit-groups": "1234 " * (mb // 5),
             "prose": ("Please call +44 20 7946 0958 or mail jane@example.org about card 4111 1111 1111 1111. "
                       * (mb // 90))}
    for name, text in texts.items():
        for d in DETECTORS.values():
            started = time.perf_counter()
            find(d, text)
            results[f"{d.name}_1MB_{name}_s"] = round(time.perf_counter() - started, 3)
    print(json.dumps({"cpus": os.cpu_count(), **results}, indent=1))


if __name__ == "__main__":
    main()
