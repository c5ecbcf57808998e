"""Writes tests/data/old-format-v1: a small database in the first on-disk format (one manifest listing every
segment), kept to prove that a database written by retrodb before the snapshot tree (issue 13) is read and
upgraded on its next commit. It was made once with that code (commit d65e4a2) and is not regenerated:
running this again with today's code would write today's format.

    python tests/data/make_old_format.py tests/data/old-format-v1
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from retrodb.compact import compact  # noqa: E402
from retrodb.delete import delete  # noqa: E402
from retrodb.neighbours import compute_neighbours  # noqa: E402
from retrodb.vacuum import vacuum  # noqa: E402
from tests.edit_helpers import build_db  # noqa: E402


def main(target: Path) -> None:
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = target.parent / "old-format-build"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    db = build_db(work / "db", n_docs=12, segment_bytes=1500, index=True)
    compute_neighbours(db, k=2, threads=1)
    delete(db, ["d1", "d7"])  # tombstones in two segments
    compact(db, min_deleted_ratio=0.0, target_segment_chunks=0)  # rewrites them: compacted_from, carried neighbours
    delete(db, ["d10"])  # a tombstone left in place
    vacuum(db, retain=2, grace=0)  # the last two snapshots are retained
    for p in sorted(db.rglob("*")):
        if p.name in ("LOCK",) or p.name.startswith(".tmp-"):
            p.unlink()
    (work / "db-src.jsonl").unlink()
    shutil.move(str(db), str(target))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
