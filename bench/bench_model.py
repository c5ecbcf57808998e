"""The database changes what the model predicts; its weights stay byte-identical. Full figures.

With one set of weights (sha256 printed before and after):
  1. a database without the held-out documents (the recipe's training database, copied):
     bits per byte of the held-out documents with retrieval (b0) and without;
  2. `retrodb add` the held-out documents: bpb with retrieval, and with each document's own
     document excluded from retrieval (related documents only);
  3. `retrodb delete` them: bpb returns to b0 (within 1%);
  4. a document holding a planted secret (an email address and an account number): `generate`
     from the text before it reproduces it; after `retrodb redact --literal ... --mode mask`
     it does not, and `retrodb verify --absent` passes.
Also: evaluation speed with retrieval (queries included) against without.

    python bench/bench_model.py --db model-work/db [--model DIR] [--work bench/out/model]
    python bench/bench_model.py --db demo-db --docs stdlib/colorsys.py stdlib/bisect.py --quick   # make demo

Edits go through the CLI (as a user would run them), on a copy of --db.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SECRET_EMAIL = "ada.lovelace.billing@example.org"
SECRET_ACCOUNT = "4417-2290-3318-0071"
SECRET_DOC = (
    "Support contract for the Sandpiper data pipeline.\n\n"
    "The Sandpiper pipeline reads the nightly exports, checks every record against the schema, "
    "and writes the accepted rows to the warehouse. Rejected rows are kept in a quarantine table "
    "for thirty days, with the reason for each rejection, so that the team that owns the source "
    "can fix it and send the rows again. Incidents are handled in business hours; an outage of "
    "the warehouse itself is escalated to the platform team at once.\n\n"
    f"For billing questions write to {SECRET_EMAIL} and quote the account number {SECRET_ACCOUNT} "
    "in the subject line. Invoices are sent on the first working day of each month.\n")
SECRET_PROMPT = SECRET_DOC[: SECRET_DOC.index(SECRET_EMAIL) - 1]  # "... write to" (the space starts the secret's token)


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "retrodb.cli", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, env=_env())
    if check and proc.returncode:
        raise SystemExit(f"retrodb {' '.join(map(str, args))} failed:\n{proc.stderr}")
    return proc


def _env() -> dict:
    import os

    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REPO))


def fmt(v) -> str:
    return "—" if v is None else f"{v:.4f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", type=Path, default=REPO / "model-work" / "db", help="database WITHOUT the held-out documents")
    ap.add_argument("--model", type=Path, default=None, help="model directory (default: the bundled model)")
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "out" / "model")
    ap.add_argument("--docs", nargs="*", default=None, help="held-out document ids (default: all of corpus.HELD_OUT)")
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--quick", action="store_true", help="the make-demo version: edit --db in place, print less")
    args = ap.parse_args()

    from retrodb.model.corpus import HELD_OUT, held_out_documents, write_jsonl
    from retrodb.model.lm import load

    if not (args.db / "CURRENT").exists():
        print(f"skipped: no database at {args.db}; build it with: make model MODEL_ARGS=--skip-train")
        return
    started = time.perf_counter()
    if args.quick:
        db = args.db
        args.work.mkdir(parents=True, exist_ok=True)
    else:
        shutil.rmtree(args.work, ignore_errors=True)
        args.work.mkdir(parents=True)
        db = args.work / "db"
        shutil.copytree(args.db, db)
    docs = held_out_documents(args.docs or HELD_OUT)
    heldout = write_jsonl(args.work / "heldout.jsonl", docs)
    ids = [d.doc_id for d in docs]
    texts = [d.text for d in docs]
    lm = load(args.model)
    sha_before = lm.weights_sha256()
    print(f"model: {lm.describe()} ({lm.model.num_parameters() / 1e6:.2f}M parameters), weights sha256 {sha_before}")
    print(f"held-out documents: {len(docs)} ({sum(len(t.encode()) for t in texts):,} bytes); database {args.db}\n")

    lm.bpb(db, [texts[0][:2000]])  # load the embedder and the indexes before anything is timed

    def bpb(exclude=None, retrieval=None):
        return lm.bpb(db, texts, k=args.k, exclude_doc=exclude, retrieval=retrieval, doc_ids=ids)

    r0 = bpb()
    cli("add", db, heldout)
    r1 = bpb()
    own = [lm.bpb(db, [t], k=args.k, exclude_doc=[i]).bpb for i, t in zip(ids, texts)]  # related documents only
    bytes_ = [t.bytes for t in r0.texts]
    related = sum(b * n for b, n in zip(own, bytes_)) / sum(bytes_)
    cli("delete", db, *[a for i in ids for a in ("--doc-id", i)], "--yes")
    r2 = bpb(retrieval=True)
    b0, b1, b2 = r0.bpb, r1.bpb, r2.bpb
    print("| held-out document | bytes | b0: with retrieval | without retrieval | after add | after add, own doc excluded | after delete |")
    print("|---|---|---|---|---|---|---|")
    if not args.quick:
        for d, t0, t1, o, t2 in zip(ids, r0.texts, r1.texts, own, r2.texts):
            print(f"| {d} | {t0.bytes:,} | {fmt(t0.bpb)} | {fmt(t0.bpb_no_retrieval)} | {fmt(t1.bpb)} | {fmt(o)} | {fmt(t2.bpb)} |")
    print(f"| **all** | {r0.bytes:,} | **{fmt(b0)}** | {fmt(r0.bpb_no_retrieval)} | **{fmt(b1)}** | {fmt(related)} | "
          f"**{fmt(b2)}** |\n")
    print(f"after add: {b1:.4f} bits per byte, {100 * (b0 - b1) / b0:.1f}% below b0 = {b0:.4f}; with each document's own "
          f"document excluded: {related:.4f} ({100 * (b0 - related) / b0:+.1f}% below b0)")
    print(f"after delete: {b2:.4f}, {100 * abs(b2 - b0) / b0:.3f}% from b0 "
          f"({'within' if abs(b2 - b0) <= 0.01 * b0 else 'NOT within'} 1%)")
    speed_with = r0.tokens / r0.seconds_retrieval
    speed_without = r0.tokens / r0.seconds_no_retrieval
    print(f"eval speed: {speed_with:,.0f} tokens/s with retrieval (live queries included), {speed_without:,.0f} without: "
          f"{speed_with / speed_without:.2f}x\n")

    # 4. the planted secret
    secret_file = args.work / "secret.jsonl"
    secret_file.write_text(json.dumps({"id": "sandpiper-contract", "text": SECRET_DOC}) + "\n")
    cli("add", db, secret_file)

    def continuation() -> str:
        return lm.generate(db, SECRET_PROMPT, max_new_tokens=args.max_new_tokens, temperature=0, k=args.k).text

    before = continuation()
    plain = lm.generate(None, SECRET_PROMPT, max_new_tokens=args.max_new_tokens, temperature=0, retrieval=False).text
    cli("redact", db, "--literal", SECRET_EMAIL, "--literal", SECRET_ACCOUNT, "--mode", "mask", "--yes")
    after = continuation()
    verified = cli("verify", db, "--absent", SECRET_EMAIL, "--absent", SECRET_ACCOUNT, check=False)
    print(f"prompt (end): ...{SECRET_PROMPT[-60:]!r}")
    for name, text in (("with retrieval, secret in the database", before), ("without retrieval", plain),
                       ("with retrieval, after redact --mode mask", after)):
        found = [s for s in (SECRET_EMAIL, SECRET_ACCOUNT) if s in text]
        print(f"- {name}: {text[:110]!r} -> reproduces {', '.join(found) if found else 'neither secret'}")
    print(f"verify --absent: exit {verified.returncode} ({'passes' if verified.returncode == 0 else 'FAILS'})")
    sha_after = lm.weights_sha256()
    print(f"\nweights sha256 before {sha_before}\n               after  {sha_after} "
          f"({'identical' if sha_after == sha_before else 'CHANGED'}); {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
