"""Embed throughput: retrodb's embed stage against the bare model forward, on the same chunks, in the same run.

Chunks: Python's documentation topics (pydoc_data.topics) ingested into a retrodb
database at 64 LM tokens per chunk (2,041 chunks per copy; `--copies N` repeats the
corpus under other ids). Measured alternately, `--rounds` times, medians reported:
- stage: `EmbedStage.run` over the segment(s) with the model already loaded: reading
  the chunk texts from Parquet, tokenising, forward, pooling, writing float16 keys
  through the memory map and the durable-pass markers;
- bare: `model(input_ids, attention_mask)` alone over the same chunks, tokenised
  beforehand into length-sorted batches already on the device, same dtype, at its
  best batch size (a sweep picks it first).
Also: the stage at each swept batch size (to check retrodb's default), fp32 against
bf16 (speed, and the cosine of their keys), and one end-to-end `embed()` of a fresh
copy, which adds the model load, the dtype probe and the commit.

    python bench/bench_embed.py                      # CPU, bundled MiniLM
    python bench/bench_embed.py --model DIR --rounds 3 --device cuda --copies 25

bench/gpu_embed.py runs these on a GPU for MiniLM and a bert-base-sized model, with the stage streamed over
the whole database as `embed()` runs it (`measure_stream`, same batch for both) and a profiler summary
(`profile_stage`).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

import retrodb  # noqa: E402
from retrodb.embedder import BertEmbedder  # noqa: E402
from retrodb.stages.base import segment_unit  # noqa: E402
from retrodb.stages.embed import EmbedStage, chunk_texts, keys_file_name  # noqa: E402


def build_db(directory: Path, copies: int = 1, segments: int = 8) -> Path:
    """A database of the pydoc topics corpus, `copies` times (distinct ids), in about `segments` segments."""
    from retrodb.demo_corpus import topics
    from retrodb.ingest import IngestOptions, ingest

    corpus = directory / "corpus"
    size = 0
    for c in range(copies):
        (corpus / f"copy{c:03d}").mkdir(parents=True, exist_ok=True)
        for name, text in topics().items():
            size += (corpus / f"copy{c:03d}" / f"{name}.txt").write_bytes(text.encode())
    db = directory / "db"
    ingest(db, [str(corpus)], IngestOptions(workers=1, segment_bytes=max(1, size // segments)))
    return db


def segments_of(db_path: Path) -> list:
    """(number, Segment) of every segment, in order."""
    return sorted(retrodb.open(db_path).snapshot.segments.items())


def all_texts(db_path: Path) -> list[str]:
    return [t for _, seg in segments_of(db_path) for t in chunk_texts(db_path, seg.to_json())]


def sync(emb: BertEmbedder) -> None:
    if emb.device == "cuda":
        emb.torch.cuda.synchronize()


def bare_inputs(emb: BertEmbedder, texts: list[str], batch_size: int) -> list:
    """Length-sorted batches, tokenised and moved to the device beforehand (the best case for the model)."""
    lengths = [len(e.ids) for e in emb._encode(texts)]
    order = np.argsort(lengths, kind="stable")[::-1]
    out = []
    for i in range(0, len(order), batch_size):
        ids, mask = emb.tokenize([texts[j] for j in order[i: i + batch_size]])
        out.append((ids.to(emb.device), mask.to(emb.device)))
    return out


def time_bare(emb: BertEmbedder, inputs: list) -> float:
    """Seconds for model(...) over all batches: no tokenising, no pooling, no copies."""
    from contextlib import nullcontext

    torch = emb.torch
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(emb.dtype)
    sync(emb)
    started = time.perf_counter()
    with torch.inference_mode(), (torch.autocast(emb.device, dtype=amp) if amp else nullcontext()):
        for ids, mask in inputs:
            emb.model(input_ids=ids, attention_mask=mask)
    sync(emb)
    return time.perf_counter() - started


def time_stage(emb: BertEmbedder, db_path: Path, work: Path, units: list | None = None, threads: int = 1) -> float:
    """Seconds for the embed stage over `units` (default: every segment), one after another (`threads=1`) or as
    `embed()` runs them (`threads=2`: two units at a time on one model, so a segment is read and tokenised while
    another is on the model); keys written, then removed."""
    from retrodb.executor import make_executor

    units = units or segments_of(db_path)
    name = keys_file_name(emb.identity())
    for _, seg in units:
        (db_path / "segments" / seg.name / name).unlink(missing_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    stage = EmbedStage(db_path, emb, work)
    sync(emb)
    started = time.perf_counter()
    make_executor("local", 1, threads=threads).run(stage, [segment_unit(s) for _, s in units])
    sync(emb)
    return time.perf_counter() - started


def time_stream(emb: BertEmbedder, db_path: Path, work: Path, units: list | None = None) -> float:
    """`time_stage` as `embed()` streams the units."""
    return time_stage(emb, db_path, work, units, threads=2)


def stage_keys(emb: BertEmbedder, db_path: Path) -> np.ndarray:
    name = keys_file_name(emb.identity())
    return np.concatenate([np.load(db_path / "segments" / s / name) for s, _ in segments_of(db_path)])


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    return np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def measure(emb: BertEmbedder, db_path: Path, work: Path, rounds: int, sweep: list[int], log=print) -> dict:
    """The stage at retrodb's batch size against the bare forward at its best batch size.

    Each round runs, segment by segment, the stage and then the bare forward on the same
    chunks, so each pair sees the same load on a shared machine; the ratio is the median
    of the per-segment ratios over all rounds.
    """
    units = segments_of(db_path)
    texts = {name: chunk_texts(db_path, seg.to_json()) for name, seg in units}
    n = sum(map(len, texts.values()))
    default_batch = emb.batch_size
    sweep = sorted(set(sweep) | {default_batch})
    first = next(iter(texts.values()))
    time_bare(emb, bare_inputs(emb, first, max(sweep)))  # warm-up (kernels, allocator, thread pools)
    time_stage(emb, db_path, work, units[:1])
    bare_by_batch, stage_by_batch = {}, {}
    for bs in sweep:
        inputs = {name: bare_inputs(emb, t, bs) for name, t in texts.items()}
        bare_by_batch[bs] = max(n / sum(time_bare(emb, inputs[name]) for name in texts) for _ in range(2))
        del inputs
        emb.batch_size = bs
        stage_by_batch[bs] = n / time_stage(emb, db_path, work)
        log(f"  sweep batch {bs}: bare {bare_by_batch[bs]:,.0f} chunks/s, stage {stage_by_batch[bs]:,.0f} chunks/s")
    best = max(bare_by_batch, key=bare_by_batch.get)
    emb.batch_size = default_batch
    inputs = {name: bare_inputs(emb, t, best) for name, t in texts.items()}
    stage_runs, bare_runs, ratios = [], [], []
    for r in range(rounds):
        st = bt = 0.0
        for unit in units:
            s = time_stage(emb, db_path, work, [unit])
            b = time_bare(emb, inputs[unit[0]])
            ratios.append(b / s)
            st, bt = st + s, bt + b
        stage_runs.append(n / st)
        bare_runs.append(n / bt)
        log(f"  round {r + 1}: stage {stage_runs[-1]:,.0f} chunks/s, bare {bare_runs[-1]:,.0f} chunks/s")
    return {"chunks": n, "segments": len(units), "dtype": emb.dtype, "device": emb.device,
            "stage_batch": default_batch, "bare_batch": best, "rounds": rounds,
            "stage": statistics.median(stage_runs), "bare": statistics.median(bare_runs),
            "ratio": statistics.median(ratios), "ratio_q1": float(np.percentile(ratios, 25)),
            "ratio_q3": float(np.percentile(ratios, 75)),
            "bare_by_batch": bare_by_batch, "stage_by_batch": stage_by_batch}


def measure_stream(emb: BertEmbedder, db_path: Path, work: Path, rounds: int, sweep: list[int], log=print) -> dict:
    """The stage over the whole database as `embed()` streams it, against the bare forward over the same chunks
    at the SAME batch size (retrodb's default), alternating stage and bare `rounds` times (ratio: median of the
    per-round ratios); a sweep of both over `sweep`; and the bare forward at its best batch, for reference."""
    units = segments_of(db_path)
    texts = {name: chunk_texts(db_path, seg.to_json()) for name, seg in units}
    n = sum(map(len, texts.values()))
    batch = emb.batch_size
    time_bare(emb, bare_inputs(emb, next(iter(texts.values())), batch))  # warm-up
    time_stream(emb, db_path, work, units[:1])
    bare_by_batch, stage_by_batch = {}, {}
    for bs in sorted(set(sweep) | {batch}):
        emb.batch_size = bs
        inputs = [x for t in texts.values() for x in bare_inputs(emb, t, bs)]
        bare_by_batch[bs] = max(n / time_bare(emb, inputs) for _ in range(2))
        del inputs
        stage_by_batch[bs] = n / time_stream(emb, db_path, work)
        log(f"  sweep batch {bs}: bare {bare_by_batch[bs]:,.0f} chunks/s, stage {stage_by_batch[bs]:,.0f} chunks/s")
    emb.batch_size = batch
    inputs = [x for t in texts.values() for x in bare_inputs(emb, t, batch)]
    stage_runs, bare_runs, ratios = [], [], []
    for r in range(rounds):
        s = time_stream(emb, db_path, work)
        b = time_bare(emb, inputs)
        stage_runs.append(n / s)
        bare_runs.append(n / b)
        ratios.append(b / s)
        log(f"  round {r + 1}: stage {stage_runs[-1]:,.0f} chunks/s, bare {bare_runs[-1]:,.0f} chunks/s, "
            f"ratio {ratios[-1]:.2f}")
    best = max(bare_by_batch, key=bare_by_batch.get)
    return {"chunks": n, "segments": len(units), "dtype": emb.dtype, "device": emb.device, "batch": batch,
            "rounds": rounds, "stage": statistics.median(stage_runs), "bare": statistics.median(bare_runs),
            "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "bare_best_batch": best, "bare_best": bare_by_batch[best],
            "bare_by_batch": bare_by_batch, "stage_by_batch": stage_by_batch}


def profile_stage(emb: BertEmbedder, db_path: Path, work: Path, trace: Path | None = None, rows: int = 15) -> dict:
    """One streamed stage run under torch.profiler: the top operators (by device time on CUDA, else CPU time),
    and on CUDA how busy the device was: the union of kernel intervals over the run's wall time, and the idle
    gaps between kernels. `trace`: also write the Chrome trace there (gzipped)."""
    import gzip
    import json

    from torch.profiler import ProfilerActivity, profile

    cuda = emb.device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    try:  # the pipeline's threads too, not only this one (recent torch)
        from torch._C._profiler import _ExperimentalConfig

        config = {"experimental_config": _ExperimentalConfig(profile_all_threads=True, enable_cuda_sync_events=cuda)}
    except (ImportError, TypeError):  # older torch: start the pipeline's threads (not the tokenising processes)
        config = {}                   # again under the profiler, so that their operators are recorded
        if getattr(emb, "_pipeline", None) is not None:
            emb._pipeline.close()
    with profile(activities=activities, **config) as prof:
        seconds = time_stream(emb, db_path, work)
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    out = {"seconds": seconds, "table": prof.key_averages().table(sort_by=sort, row_limit=rows)}
    tmp = Path(tempfile.mkdtemp(prefix="trace-")) / "trace.json"
    prof.export_chrome_trace(str(tmp))
    events = json.loads(tmp.read_text()).get("traceEvents", [])
    kernels = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in events
                     if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    if kernels:
        busy, gaps, end = 0.0, [], kernels[0][0]
        for a, b in kernels:
            if a > end:
                gaps.append(a - end)
            busy += max(0.0, b - max(a, end))
            end = max(end, b)
        cpu = [e for e in events if e.get("ph") == "X" and e.get("cat") == "cpu_op"]
        window = (max(e["ts"] + e.get("dur", 0) for e in cpu) - min(e["ts"] for e in cpu)) if cpu else end - kernels[0][0]
        out.update(kernels=len(kernels), device_busy_us=busy, window_us=window,
                   device_busy_fraction=busy / window if window else None,
                   gaps_over_1ms=sum(1 for g in gaps if g > 1000), gap_us_over_1ms=sum(g for g in gaps if g > 1000),
                   largest_gap_us=max(gaps, default=0.0))
    threads: dict = {}  # CPU time per thread name: what each pipeline thread spends
    for e in events:
        if e.get("ph") == "X" and e.get("cat") == "cpu_op":
            threads[e.get("tid")] = threads.get(e.get("tid"), 0) + e.get("dur", 0)
    out["cpu_op_us_by_thread"] = dict(sorted(threads.items(), key=lambda kv: -kv[1])[:6])
    if trace is not None:
        trace.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(trace, "wb") as f:
            f.write(tmp.read_bytes())
    shutil.rmtree(tmp.parent, ignore_errors=True)
    return out


def compare_dtypes(model_dir: Path, device: str, texts: list[str], batch_size: int | None, rounds: int,
                   log=print) -> dict:
    """fp32 against bf16: bare forward speed, and the cosine of the keys (full embedder path)."""
    embs = {name: BertEmbedder(model_dir, device=device, dtype=name, batch_size=batch_size).load()
            for name in ("fp32", "bf16")}
    batch_size = embs["bf16"].batch_size
    speeds = {name: [] for name in embs}
    inputs = {name: bare_inputs(e, texts, batch_size) for name, e in embs.items()}
    for name, e in embs.items():
        time_bare(e, inputs[name])  # warm-up
    for _ in range(rounds):
        for name, e in embs.items():
            speeds[name].append(len(texts) / time_bare(e, inputs[name]))
    keys = {name: e.embed(texts) for name, e in embs.items()}
    for e in embs.values():
        e.close()  # their pipeline threads and tokenising processes
    cos = cosines(keys["bf16"], keys["fp32"])
    out = {"texts": len(texts), "batch": batch_size, "rounds": rounds,
           "fp32": statistics.median(speeds["fp32"]), "bf16": statistics.median(speeds["bf16"]),
           "cos_min": float(cos.min()), "cos_median": float(np.median(cos))}
    out["speedup"] = out["bf16"] / out["fp32"]
    log(f"  fp32 {out['fp32']:,.0f} chunks/s, bf16 {out['bf16']:,.0f} chunks/s, cosine min {out['cos_min']:.6f}")
    return out


def machine() -> str:
    import torch

    from retrodb.executor import cpu_model

    cpu = cpu_model()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} CPUs visible, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"{gpu}, Python {platform.python_version()}")


def report_tables(title: str, m: dict, dt: dict | None, e2e: dict | None) -> str:
    lines = [f"### {title}", "",
             f"{m['chunks']:,} chunks of 64 LM tokens in {m['segments']} segments, {m['device']}, {m['dtype']}; "
             f"medians of {m['rounds']} rounds, stage and bare alternating segment by segment.", "",
             "| what | batch | chunks/s |", "|---|---:|---:|",
             f"| retrodb embed stage (read, tokenise, forward, pool, write) | {m['stage_batch']} | {m['stage']:,.0f} |",
             f"| bare model forward (pre-tokenised, on device, best batch) | {m['bare_batch']} | {m['bare']:,.0f} |",
             f"| **ratio stage / bare** (median of per-segment pairs) | | **{m['ratio']:.2f}x** "
             f"(quartiles {m['ratio_q1']:.2f}-{m['ratio_q3']:.2f}) |",
             "", "Batch-size sweep (bare: best of 2 runs, stage: 1 run):", "", "| batch | bare chunks/s | stage chunks/s |", "|---:|---:|---:|"]
    lines += [f"| {bs} | {m['bare_by_batch'][bs]:,.0f} | {m['stage_by_batch'][bs]:,.0f} |" for bs in sorted(m["bare_by_batch"])]
    return "\n".join(lines) + "\n" + dtype_and_end_to_end(dt, e2e)


def dtype_and_end_to_end(dt: dict | None, e2e: dict | None) -> str:
    lines = []
    if dt:
        lines += ["", f"fp32 against bf16 (bare forward, batch {dt['batch']}, {dt['texts']} chunks, medians of "
                      f"{dt['rounds']}):", "", "| dtype | chunks/s | cosine to fp32 keys (min / median) |",
                  "|---|---:|---|", f"| fp32 | {dt['fp32']:,.0f} | 1 |",
                  f"| bf16 | {dt['bf16']:,.0f} ({dt['speedup']:.2f}x) | {dt['cos_min']:.6f} / {dt['cos_median']:.6f} |"]
    if e2e:
        lines += ["", f"End to end, `embed()` on a fresh copy: {e2e['chunks']:,} chunks in {e2e['seconds']:.1f} s "
                      f"({e2e['chunks'] / e2e['seconds']:,.0f} chunks/s overall), of which {e2e['load_seconds']:.1f} s "
                      f"loading the model and probing the dtype ({e2e['dtype']} chosen); "
                      f"{e2e['chunks_per_s']:,.0f} chunks/s after loading."]
    return "\n".join(lines) + "\n" if lines else ""


def end_to_end(db_path: Path, scratch: Path, model: Path | None, device: str) -> dict:
    from retrodb.embed import embed

    copy = scratch / "e2e-db"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(db_path, copy, ignore=shutil.ignore_patterns("keys-*", "_work"))
    report = embed(copy, model, device=device)
    return report.to_dict()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="HF BERT directory (default: bundled MiniLM)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto", help="dtype of the stage/bare comparison (auto: retrodb's choice)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--copies", type=int, default=1, help="corpus copies (2,041 chunks each)")
    ap.add_argument("--segments", type=int, default=8, help="segments the corpus is cut into")
    ap.add_argument("--sweep", default="8,16,32,64,128", help="batch sizes tried for the bare forward")
    ap.add_argument("--dtype-texts", type=int, default=512, help="chunks for the fp32/bf16 comparison (0: skip)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--stream", action="store_true",
                    help="also the stage streamed over the whole database as embed() runs it, same batch as bare")
    args = ap.parse_args(argv)
    from retrodb.tokenizer import default_model_dir

    model = args.model or default_model_dir()
    scratch = args.workdir or Path(tempfile.mkdtemp(prefix="bench-embed-"))
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    log(f"building the database in {scratch} ...")
    db_path = build_db(scratch, args.copies, args.segments)
    emb = BertEmbedder(model, device=args.device, dtype=args.dtype).load()
    log(f"model {model}: {emb.device}, {emb.dtype}, batch {emb.batch_size}, loaded in {emb.load_seconds:.1f}s")
    m = measure(emb, db_path, scratch / "work", args.rounds, [int(x) for x in args.sweep.split(",")], log)
    stream = measure_stream(emb, db_path, scratch / "work", args.rounds, [], log) if args.stream else None
    dt = None
    if args.dtype_texts:
        dt = compare_dtypes(model, args.device, all_texts(db_path)[: args.dtype_texts], emb.batch_size,
                            max(3, args.rounds // 2), log)
    del emb
    e2e = end_to_end(db_path, scratch, args.model, args.device)
    print(f"Machine: {machine()}\n")
    print(report_tables(args.model.name if args.model else "all-MiniLM-L6-v2 (bundled)", m, dt, e2e))
    if stream:
        print(f"Streamed over the whole database as embed() runs it, batch {stream['batch']}: stage "
              f"{stream['stage']:,.0f} chunks/s, bare {stream['bare']:,.0f} chunks/s, ratio **{stream['ratio']:.2f}x** "
              f"(rounds {stream['ratio_min']:.2f}-{stream['ratio_max']:.2f}).")
    if args.workdir is None:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
