"""Every stage on a Ray cluster (three nodes of one CPU each on this machine, ray.cluster_utils.Cluster): the
same database as the local executor, workers and nodes that die mid-stage, a rerun after the coordinator dies,
and a node that cannot see the database directory.

Run with `make test-ray` (installs the ray extra); `make test` skips these.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest

import retrodb
from retrodb.embed import embed
from retrodb.ingest import IngestOptions, ingest
from tests.conftest import make_text, run_retrodb
from tests.edit_helpers import content, keys_by_chunk

ray = pytest.importorskip("ray", reason="the ray extra is not installed (make test-ray installs it)")
pytestmark = pytest.mark.ray

from ray.cluster_utils import Cluster  # noqa: E402

NODE = {"num_cpus": 1, "object_store_memory": 80 << 20}


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
    for _ in range(2):
        c.add_node(**NODE)
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


@contextmanager
def job_env(cluster, **env):
    """Reconnect the driver with `env` set in every worker of the job (Ray's runtime_env)."""
    ray.shutdown()
    ray.init(address=cluster.address, log_to_driver=False, runtime_env={"env_vars": env})
    try:
        yield
    finally:
        ray.shutdown()
        ray.init(address=cluster.address, log_to_driver=False)


def corpus(path: Path, n: int = 24, seed: int = 100) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"d{i}", "text": make_text(seed + i, 40 + (i * 13) % 90)}) + "\n")
    return path


def same_database(a: Path, b: Path) -> None:
    """What a reader sees is the same: documents, chunks (ids, tokens, spans, continuations) and keys, bytewise."""
    assert content(a) == content(b)
    ka, kb = keys_by_chunk(a), keys_by_chunk(b)
    assert ka and ka == kb
    q = "SELECT chunk_id, char_start, char_end, segment FROM chunks ORDER BY chunk_id"
    assert retrodb.open(a).sql(q).equals(retrodb.open(b).sql(q))


# ---------------------------------------------------------------- the same database


def test_every_stage_on_ray_matches_local(tmp_path, cluster, tiny_bert):
    """ingest, embed (tiny BERT, fp32), index, neighbours, compact and add on the cluster: the database a
    local run builds, keys byte for byte; per-node figures in the reports."""
    from retrodb.add import add
    from retrodb.compact import compact
    from retrodb.delete import delete
    from retrodb.index import index
    from retrodb.neighbours import compute_neighbours

    src, extra = corpus(tmp_path / "docs.jsonl"), corpus(tmp_path / "extra.jsonl", 6, seed=900)
    (tmp_path / "extra").mkdir()
    shutil.move(extra, tmp_path / "extra" / "more.jsonl")
    for name in ("local", "ray"):
        opts = IngestOptions(segment_bytes=2500, executor=name, workers=1 if name == "local" else None)
        ex = {"executor": name}
        db = tmp_path / name
        r = ingest(db, [str(src)], opts)
        e = embed(db, tiny_bert, dtype="fp32", batch_size=8, **ex)
        index(db, M=8, ef_construction=40, threads=1, **ex)
        compute_neighbours(db, 2, threads=1, **ex)
        delete(db, doc_ids=["d1", "d2", "d3"])
        c = compact(db, min_deleted_ratio=0.01, target_segment_chunks=0, **ex)
        a = add(db, [str(tmp_path / "extra")], IngestOptions(segment_bytes=2500, executor=name, workers=1),
                dtype="fp32", batch_size=8)
        if name == "ray":
            assert len(r.segments) >= 4 and e.executor == "ray" and e.dtype == "fp32"
            figures = e.nodes["embed"]
            assert sum(n["units"] for n in figures) == len(r.segments) and all(n["address"] for n in figures)
            assert sum(n["chunks"] for n in figures) == e.chunks == r.chunks
            assert set(r.nodes) == {"ingest"} and set(c.nodes) == {"compact"}
            assert set(a.to_dict()["nodes"]) == {"ingest", "embed", "index"}
            assert sum(n["units"] for n in r.nodes["ingest"]) == len(r.segments)
    same_database(tmp_path / "local", tmp_path / "ray")
    q = "SELECT chunk_id, rank, neighbour_chunk_id FROM neighbours ORDER BY chunk_id, rank"
    assert retrodb.open(tmp_path / "local").sql(q).equals(retrodb.open(tmp_path / "ray").sql(q))
    hits = [retrodb.open(tmp_path / d).query(["retrieval database"], k=3, ef=100)[0].neighbours for d in ("local", "ray")]
    assert [n.chunk_id for n in hits[0]] == [n.chunk_id for n in hits[1]]


@pytest.mark.slow
def test_minilm_fp32_keys_on_ray_are_byte_identical_to_local(tmp_path, cluster):
    """The bundled MiniLM in fp32: one-thread CPU actors on the cluster, two torch threads locally, same bytes."""
    src = corpus(tmp_path / "docs.jsonl", 12)
    ingest(tmp_path / "local", [str(src)], IngestOptions(workers=1, segment_bytes=3000))
    shutil.copytree(tmp_path / "local", tmp_path / "ray")
    embed(tmp_path / "local", dtype="fp32")
    report = embed(tmp_path / "ray", dtype="fp32", executor="ray")
    assert (report.device, report.dtype) == ("cpu", "fp32") and len(report.segments) >= 2
    assert keys_by_chunk(tmp_path / "local") == keys_by_chunk(tmp_path / "ray")


def test_cli_on_ray_one_bar_and_json_figures(cli, tmp_path, cluster):
    src = corpus(tmp_path / "docs.jsonl")
    db = tmp_path / "db"
    res = cli("ingest", db, src, "--segment-mb", "0.0025", "--executor", "ray", "--ray-address", cluster.address)
    assert res.code == 0, res.err
    assert "segments" in res.err and "tokens/s" in res.err and "ETA" in res.err  # one bar for the cluster job
    res = cli("embed", db, "--model", "hash:16", "--executor", "ray", "--format", "json")
    assert res.code == 0, res.err
    (rec,) = res.json_lines()
    assert rec["executor"] == "ray" and rec["retried_units"] == 0
    per_node = rec["nodes"]["embed"]
    assert sum(n["units"] for n in per_node) == len(rec["segments"]) and all("chunks_per_s" in n for n in per_node)
    assert all(a["device"] == "cpu" for n in per_node for a in n["actors"])


# ---------------------------------------------------------------- failures


def test_a_worker_killed_mid_ingest_costs_only_its_unit(tmp_path, cluster):
    src = corpus(tmp_path / "docs.jsonl")
    local = ingest(tmp_path / "local", [str(src)], IngestOptions(workers=1, segment_bytes=2500))
    once = tmp_path / "killed-once"
    with job_env(cluster, RETRODB_KILL_AT="ingest.before_marker", RETRODB_KILL_ONCE=str(once)):
        report = ingest(tmp_path / "ray", [str(src)], IngestOptions(executor="ray", segment_bytes=2500))
    assert once.exists()  # one worker died after writing its segment's files, before its marker
    assert report.retried_units == 1 and report.segments == local.segments
    assert content(tmp_path / "local") == content(tmp_path / "ray")


def test_an_actor_killed_mid_embed_is_replaced_and_its_unit_resumes(tmp_path, cluster, tiny_bert, monkeypatch):
    src = corpus(tmp_path / "docs.jsonl", 30)
    ingest(tmp_path / "local", [str(src)], IngestOptions(workers=1, segment_bytes=4000))
    shutil.copytree(tmp_path / "local", tmp_path / "ray")
    monkeypatch.setenv("RETRODB_EMBED_PASS_ROWS", "4")
    embed(tmp_path / "local", tiny_bert, dtype="fp32", batch_size=4)
    once = tmp_path / "killed-once"
    with job_env(cluster, RETRODB_KILL_AT="embed.pass_done#2", RETRODB_KILL_ONCE=str(once),
                 RETRODB_EMBED_PASS_ROWS="4"):
        report = embed(tmp_path / "ray", tiny_bert, dtype="fp32", batch_size=4, executor="ray")
    assert once.exists() and report.retried_units >= 1
    assert report.resumed_chunks >= 8  # the dead actor's two durable passes were not embedded again
    assert report.chunks + report.resumed_chunks == retrodb.open(tmp_path / "ray").snapshot.totals()["chunks"]
    same_database(tmp_path / "local", tmp_path / "ray")


def test_a_node_that_dies_mid_embed_loses_only_its_units(tmp_path, cluster, tiny_bert):
    src = corpus(tmp_path / "docs.jsonl", 40)
    ingest(tmp_path / "local", [str(src)], IngestOptions(workers=1, segment_bytes=2500))
    shutil.copytree(tmp_path / "local", tmp_path / "ray")
    embed(tmp_path / "local", tiny_bert, dtype="fp32", batch_size=4)
    doomed = cluster.add_node(**NODE)
    cluster.wait_for_nodes()
    removed = []

    def progress(counts):  # once chunks flow from every node, take one node away
        if not removed and counts.get("chunks"):
            cluster.remove_node(doomed, allow_graceful=False)
            removed.append(True)

    try:
        report = embed(tmp_path / "ray", tiny_bert, dtype="fp32", batch_size=4, executor="ray", progress=progress)
    finally:
        if not removed:
            cluster.remove_node(doomed)
    assert removed
    same_database(tmp_path / "local", tmp_path / "ray")
    assert report.chunks + report.resumed_chunks == retrodb.open(tmp_path / "ray").snapshot.totals()["chunks"]


def test_a_rerun_after_the_coordinator_dies_recomputes_no_finished_unit(tmp_path, cluster):
    src = corpus(tmp_path / "docs.jsonl")
    ingest(tmp_path / "db", [str(src)], IngestOptions(workers=1, segment_bytes=2500))
    total = retrodb.open(tmp_path / "db").snapshot.totals()["chunks"]
    res = run_retrodb("embed", tmp_path / "db", "--model", "hash:16", "--executor", "ray", "--ray-address",
                      cluster.address, env={"RETRODB_KILL_AT": "embed.before_commit"}, timeout=300)
    assert res.returncode == -9, res.stderr.decode()[-2000:]
    assert retrodb.open(tmp_path / "db").version == 1  # nothing committed
    report = embed(tmp_path / "db", "hash:16", executor="ray")
    assert report.chunks == 0 and report.resumed_chunks == total  # every key file the actors wrote is reused
    from retrodb.verify import verify

    assert verify(tmp_path / "db").ok


# ---------------------------------------------------------------- the shared directory


def test_a_node_that_cannot_see_the_database_is_refused_by_name(tmp_path, cluster):
    blind = cluster.add_node(**NODE, env_vars={"RETRODB_FAIL_AT": "ray.probe=ENOENT"})
    cluster.wait_for_nodes()
    try:
        src = corpus(tmp_path / "docs.jsonl", 6)
        with pytest.raises(retrodb.RetrodbError, match="cannot use the database directory") as err:
            ingest(tmp_path / "db", [str(src)], IngestOptions(executor="ray", segment_bytes=2500))
        assert blind.node_id[:12] in err.value.message and "cannot read" in err.value.message
        assert "shared filesystem" in err.value.hint
        assert not any((tmp_path / "db" / "segments").iterdir())  # refused before any work
        assert not list((tmp_path / "db" / "_work").glob("ray-probe-*"))
    finally:
        cluster.remove_node(blind)
