"""The BERT embedder against a reference computed directly with transformers.

Reference: AutoModel in fp32, one text at a time (so no padding at all), masked
mean over the last hidden state, L2 norm. Fast tests use a tiny randomly
initialised BERT with MiniLM's tokenizer; the `slow` ones use the bundled MiniLM.
"""

import pickle
import threading
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

import retrodb
from retrodb.embed import embed, embed_texts
from retrodb.embedder import BertEmbedder, cpu_has_native_bf16, embedder_for, load_embedder
from retrodb.errors import RetrodbError
from retrodb.ingest import IngestOptions, ingest
from retrodb.tokenizer import default_model_dir
from tests.conftest import make_text

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

def reference(model_dir, texts, max_length=128) -> np.ndarray:
    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    model = transformers.AutoModel.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for text in texts:
            enc = tok(text, truncation=True, max_length=max_length, return_tensors="pt")
            hidden = model(**enc).last_hidden_state[0].double()
            mask = enc["attention_mask"][0].unsqueeze(-1).double()
            pooled = (hidden * mask).sum(0) / mask.sum()
            out.append((pooled / pooled.norm()).numpy())
    return np.stack(out)


def cosines(a, b) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def varied_texts(n=40) -> list[str]:
    """Chunk-like texts of very different lengths: empty, short, about 64 tokens, and longer than max_length."""
    texts = ["", "retrieval", "A frozen BERT encoder.", "Ünïcödé café naïve 東京 — ok", "a literal [PAD] and [SEP] here"]
    texts += [make_text(i, n_words=5 + (i * 7) % 60) for i in range(n - 6)]
    texts.append(make_text(999, n_words=300))  # truncated at max_length
    return texts


def build_db(db_path, corpus):
    return ingest(db_path, [str(corpus)], IngestOptions(workers=1, segment_bytes=4000))


def stored_vs_texts(db_path):
    """Stored keys of all segments, and the chunk texts row by row (joined in SQL)."""
    db = retrodb.open(db_path)
    rows = db.sql("SELECT c.chunk_id, substr(d.text, c.char_start + 1, c.char_end - c.char_start) AS t "
                  "FROM chunks c JOIN documents d ON c.doc_id = d.doc_id AND c.segment = d.segment").to_pylist()
    text_of = {r["chunk_id"]: r["t"] for r in rows}
    keys, texts = [], []
    for _, seg in sorted(db.snapshot.segments.items()):
        ids = pq.read_table(db.root / seg.files["chunks"]["path"], columns=["chunk_id"])["chunk_id"].to_pylist()
        keys.append(np.load(db.root / seg.files["keys"]["path"]))
        texts += [text_of[i] for i in ids]
    return np.concatenate(keys), texts


# ------------------------------------------------------------ tiny random BERT (fast)


def test_fp32_equals_reference_for_any_batch_size_and_composition(tiny_bert):
    texts = varied_texts()
    ref = reference(tiny_bert, texts)
    runs = {}
    for bs in (1, 3, 64):
        emb = BertEmbedder(tiny_bert, device="cpu", dtype="fp32", batch_size=bs)
        runs[bs] = emb.embed(texts)
        assert runs[bs].dtype == np.float32 and runs[bs].shape == (len(texts), 32)
        assert cosines(runs[bs], ref).min() >= 1 - 1e-6, bs
    # Other neighbours in the batch, another order: the same keys.
    other = [make_text(5000 + i, 80) for i in range(20)]
    mixed = other[:10] + texts[::-1] + other[10:]
    got = BertEmbedder(tiny_bert, device="cpu", dtype="fp32", batch_size=8).embed(mixed)
    assert cosines(got[10:10 + len(texts)][::-1], ref).min() >= 1 - 1e-6
    assert np.allclose(runs[1], runs[64], atol=1e-5)


def test_tokenising_processes_give_the_same_keys(tiny_bert, monkeypatch):
    # the path an accelerator takes (windows tokenised by a process pool), forced on CPU
    texts = varied_texts() * 3
    in_thread = BertEmbedder(tiny_bert, device="cpu", dtype="fp32", batch_size=4).embed(texts)
    monkeypatch.setenv("RETRODB_TOKENIZE_PROCS", "2")
    emb = BertEmbedder(tiny_bert, device="cpu", dtype="fp32", batch_size=4)
    try:
        assert emb.load().tokenize_procs() == 2
        assert np.array_equal(emb.embed(texts), in_thread)
        assert np.allclose(emb.embed(texts[:7]), in_thread[:7], atol=1e-6)  # the pool is reused
        clone = pickle.loads(pickle.dumps(emb))  # the pool does not travel
        assert getattr(clone, "_tokenize_pool", None) is None
    finally:
        emb.close()


def test_bf16_close_to_reference(tiny_bert):
    texts = varied_texts()
    got = BertEmbedder(tiny_bert, device="cpu", dtype="bf16", batch_size=16).embed(texts)
    assert cosines(got, reference(tiny_bert, texts)).min() >= 0.999


def test_database_keys_equal_reference_and_model_loads_once(tiny_bert, corpus, db_path, monkeypatch):
    build_db(db_path, corpus)
    assert len(retrodb.open(db_path).snapshot.segments) >= 3
    loads = []
    real = transformers.AutoModel.from_pretrained
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained",
                        lambda *a, **k: loads.append(a) or real(*a, **k))
    report = embed(db_path, tiny_bert, dtype="fp32", commit_every_segments=1)
    assert len(loads) == 1 and report.model_loaded and report.commits >= 3
    assert (report.device, report.dtype, report.batch_size) == ("cpu", "fp32", 32)
    keys, texts = stored_vs_texts(db_path)
    assert keys.dtype == np.float16 and keys.shape == (len(texts), 32)
    assert cosines(keys, reference(tiny_bert, texts)).min() >= 1 - 1e-5  # float16 storage
    assert retrodb.open(db_path).config["embedder"] == {
        "kind": "bert", "path": str(tiny_bert.resolve()), "sha256": report_sha(tiny_bert), "pooling": "mean",
        "dim": 32, "max_length": 128}
    # The query-side API gives the same keys.
    assert cosines(embed_texts(db_path, texts[:5]), keys[:5]).min() >= 1 - 1e-5


def report_sha(model_dir) -> str:
    import hashlib

    h = hashlib.sha256(b"model.safetensors")
    h.update((model_dir / "model.safetensors").read_bytes())
    return h.hexdigest()


def test_nothing_to_do_does_not_load_the_model(tiny_bert, corpus, db_path, monkeypatch):
    build_db(db_path, corpus)
    embed(db_path, tiny_bert, dtype="fp32")
    version = retrodb.open(db_path).version

    def no_load(self):
        raise AssertionError("model loaded with nothing to embed")

    monkeypatch.setattr(BertEmbedder, "load", no_load)
    report = embed(db_path)
    assert (report.chunks, report.model_loaded, report.version, report.device) == (0, False, version, None)
    emb = embedder_for(retrodb.open(db_path).config)  # cheap too: identity from the files
    assert emb.loaded is False and emb.dim == 32


def test_loading_prints_nothing(tiny_bert, corpus, db_path, cli):
    build_db(db_path, corpus)
    res = cli("embed", db_path, "--model", tiny_bert, "--dtype", "fp32", "-f", "json")
    assert res.code == 0 and res.err == ""
    assert res.json_lines()[0]["model_loaded"] is True


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_a_clear_error(tiny_bert, corpus, db_path, cli):
    build_db(db_path, corpus)
    res = cli("embed", db_path, "--model", tiny_bert, "--device", "cuda")
    assert res.code == 1 and "--device cuda, but no CUDA device is visible" in res.err
    assert "Traceback" not in res.err and retrodb.open(db_path).version == 1


def test_directory_without_model_is_a_clear_error(tmp_path, cli, corpus, db_path):
    build_db(db_path, corpus)
    (tmp_path / "empty").mkdir()
    res = cli("embed", db_path, "--model", tmp_path / "empty")
    assert res.code == 1 and "no readable config.json" in res.err
    shutil.copy(default_model_dir() / "config.json", tmp_path / "empty" / "config.json")
    res = cli("embed", db_path, "--model", tmp_path / "empty")
    assert res.code == 1 and "no model weights" in res.err


def test_embedder_pickles_without_its_model(tiny_bert):
    emb = BertEmbedder(tiny_bert, device="cpu", dtype="fp32").load()
    clone = pickle.loads(pickle.dumps(emb))
    assert clone.model is None and clone.identity() == emb.identity()
    assert np.allclose(clone.embed(["a b c"]), emb.embed(["a b c"]), atol=1e-6)


# ------------------------------------------------------------ the bundled MiniLM (slow)


@pytest.mark.slow
def test_minilm_matches_reference_in_fp32_and_chosen_dtype():
    model = default_model_dir()
    texts = varied_texts(32)
    ref = reference(model, texts)
    fp32 = load_embedder(None, device="cpu", dtype="fp32", batch_size=8).embed(texts)
    assert cosines(fp32, ref).min() >= 1 - 1e-6
    auto = load_embedder(None, device="cpu")
    got = auto.embed(texts)
    if cpu_has_native_bf16():
        assert auto.dtype in ("bf16", "fp32")
    assert cosines(got, ref).min() >= 0.999, auto.dtype
    # Batch size and batch composition do not matter beyond the dtype's rounding.
    shuffled = np.random.default_rng(0).permutation(len(texts))
    again = load_embedder(None, device="cpu", dtype=auto.dtype, batch_size=3).embed([texts[i] for i in shuffled])
    assert cosines(again, got[shuffled]).min() >= 0.999


@pytest.mark.slow
def test_minilm_end_to_end_cli(cli, corpus, db_path):
    build_db(db_path, corpus)
    res = cli("embed", db_path, "-f", "json")
    assert res.code == 0 and res.err == "", res.err
    rec = res.json_lines()[0]
    keys, texts = stored_vs_texts(db_path)
    assert rec["chunks"] == len(texts) and keys.shape == (len(texts), 384)
    assert cosines(keys, reference(default_model_dir(), texts)).min() >= 0.999, rec["dtype"]
    assert retrodb.open(db_path).config["embedder"]["path"] == str(default_model_dir().resolve())


def test_bad_dtype_is_a_clear_error(tiny_bert):
    with pytest.raises(RetrodbError, match="unknown dtype 'fp8'"):
        BertEmbedder(tiny_bert, dtype="fp8")


# ------------------------------------------------------------ the pipeline (embed_pipeline.py), on CPU


def test_pipeline_keys_do_not_depend_on_concurrency(tiny_bert):
    """Jobs submitted from two threads at once, interleaved, give exactly the keys of one job at a time and of
    the same batches computed inline: a job's batches never depend on what else runs."""
    from retrodb.embed_pipeline import run_inline

    a, b = varied_texts(), [make_text(700 + i, 10 + i) for i in range(50)]
    emb = BertEmbedder(tiny_bert, device="cpu", dtype="fp32", batch_size=4)
    try:
        alone = [emb.embed(a), emb.embed(b)]
        assert np.array_equal(alone[0], run_inline(emb, a, np.empty((len(a), 32), np.float32)))
        together: dict = {}

        def submit_many(name, texts):
            jobs = [emb.submit(texts) for _ in range(3)]
            together[name] = [j.wait() for j in jobs]

        threads = [threading.Thread(target=submit_many, args=args) for args in (("a", a), ("b", b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(np.array_equal(k, alone[0]) for k in together["a"])
        assert all(np.array_equal(k, alone[1]) for k in together["b"])
        assert not emb._pipeline.pinned  # on CPU: plain tensors, the same threads
        assert {t.name for t in emb._pipeline.threads} == {"retrodb-embed-tokenise", "retrodb-embed-compute",
                                                          "retrodb-embed-write"}
        threads = emb._pipeline.threads
    finally:
        emb.close()
    assert not any(t.is_alive() for t in threads)


def test_an_idle_pipeline_ends_its_threads_and_the_next_submit_starts_new_ones(tiny_bert, monkeypatch):
    from retrodb import embed_pipeline

    monkeypatch.setattr(embed_pipeline, "IDLE", 0.3)
    emb = BertEmbedder(tiny_bert, device="cpu", dtype="fp32", batch_size=4)
    want = emb.embed(varied_texts())
    first = emb._pipeline
    for t in first.threads:
        t.join(timeout=10)
    assert first.closed and not any(t.is_alive() for t in first.threads)
    assert np.array_equal(emb.embed(varied_texts()), want) and emb._pipeline is not first
    emb.close()


def test_staged_path_of_accelerators_gives_the_same_keys_on_cpu(tiny_bert, monkeypatch):
    """The path CUDA takes (ring of host buffers for ids, lengths and keys, events, a free-slot queue), run on
    CPU: exactly the keys of the direct path, float16 and float32, with more batches than buffers."""
    from retrodb import embed_pipeline

    texts = varied_texts() * 4  # 160 texts, 40 batches: every buffer is reused many times
    direct = BertEmbedder(tiny_bert, device="cpu", dtype="fp32", batch_size=4)
    want32 = direct.embed(texts)
    want16 = direct.embed(texts, out=np.empty((len(texts), 32), np.float16))
    direct.close()
    monkeypatch.setenv("RETRODB_EMBED_STAGED", "1")
    emb = BertEmbedder(tiny_bert, device="cpu", dtype="fp32", batch_size=4)
    try:
        got16 = emb.embed(texts, out=np.empty((len(texts), 32), np.float16))
        assert emb._pipeline.staged and not emb._pipeline.pinned
        assert len(emb._pipeline._in_slots) == embed_pipeline.INPUT_SLOTS
        assert np.array_equal(emb.embed(texts), want32) and np.array_equal(got16, want16)
    finally:
        emb.close()


def test_pipeline_failure_fails_its_jobs_and_the_next_submit_starts_afresh(tiny_bert):
    texts = varied_texts()
    emb = BertEmbedder(tiny_bert, device="cpu", dtype="fp32", batch_size=4)
    try:
        want = emb.embed(texts)

        def broken(n):
            raise OSError(28, "No space left on device")

        with pytest.raises(OSError, match="No space left"):
            emb.submit(texts, on_batch=broken).wait()
        assert np.array_equal(emb.embed(texts), want)  # a new pipeline
    finally:
        emb.close()


def test_first_window_is_one_batch_then_windows_grow():
    from retrodb.embed_pipeline import WINDOW_BATCHES, window_sizes

    sizes = [b - a for a, b in window_sizes(10_000, 4)]
    assert sizes[:6] == [4, 4, 8, 16, 32, 64] and max(sizes) == WINDOW_BATCHES * 4 and sum(sizes) == 10_000
    assert list(window_sizes(0, 4)) == [] and list(window_sizes(3, 4)) == [(0, 3)]


def test_stage_submits_the_next_pass_before_waiting_for_this_one(tmp_path, corpus):
    """The embed stage keeps the embedder busy across passes: pass k+1 is queued before pass k is made durable."""
    from retrodb.embedder import HashEmbedder
    from retrodb.stages.base import segment_unit
    from retrodb.stages.embed import EmbedStage

    events = []

    class Recording(HashEmbedder):
        def submit(self, texts, out=None, on_batch=None):
            n = len([e for e in events if e[0] == "submit"])
            events.append(("submit", n))
            job = super().submit(texts, out, on_batch)
            wait = job.wait
            job.wait = lambda: events.append(("wait", n)) or wait()
            return job

    ingest(tmp_path / "db", [str(corpus)], IngestOptions(workers=1))
    name, seg = next(iter(retrodb.open(tmp_path / "db").snapshot.segments.items()))
    EmbedStage(tmp_path / "db", Recording(16), tmp_path / "work", rows_per_pass=5).run(segment_unit(seg))
    passes = -(-seg.chunks // 5)
    assert passes >= 3
    assert events[:3] == [("submit", 0), ("submit", 1), ("wait", 0)] and events[-1] == ("wait", passes - 1)
