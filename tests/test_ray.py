"""The same ingest stage under the Ray executor gives the same database as the local pool."""

import pytest

import retrodb
from retrodb.ingest import IngestOptions, ingest

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_executor_matches_local(tmp_path, jsonl_file, ray_cluster):
    local = ingest(tmp_path / "local", [str(jsonl_file)], IngestOptions(workers=1, segment_bytes=4000))
    on_ray = ingest(tmp_path / "ray", [str(jsonl_file)], IngestOptions(executor="ray", segment_bytes=4000))
    assert len(on_ray.segments) > 1
    assert (local.documents, local.chunks, local.tokens, local.segments) == \
        (on_ray.documents, on_ray.chunks, on_ray.tokens, on_ray.segments)
    q = "SELECT chunk_id, doc_id, tokens, char_start, char_end FROM chunks ORDER BY chunk_id"
    assert retrodb.open(tmp_path / "local").sql(q).equals(retrodb.open(tmp_path / "ray").sql(q))


def test_neighbours_on_ray_match_local(tmp_path, ray_cluster):
    import shutil

    from retrodb.neighbours import compute_neighbours
    from tests.edit_helpers import build_db

    local = build_db(tmp_path / "local", n_docs=20, segment_bytes=2000, index=True)
    shutil.copytree(local, tmp_path / "ray")
    compute_neighbours(local, 2, workers=1)
    report = compute_neighbours(tmp_path / "ray", 2, executor="ray")
    assert len(report.segments) > 1
    q = "SELECT * FROM neighbours ORDER BY chunk_id, rank"
    assert retrodb.open(local).sql(q).equals(retrodb.open(tmp_path / "ray").sql(q))
