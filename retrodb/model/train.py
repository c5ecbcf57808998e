"""`retrodb train`: train the RETRO model on a database's sequences and their stored neighbours.

One function, `train`, read top to bottom: data, model, optimizer, then the loop (step, log,
evaluate, checkpoint). Training sequences and their precomputed neighbours (other documents
only) come from `retrodb.data.RetroDataset`; validation uses the database's "val" split
(documents chosen by a hash of their id) and reports bits per byte with and without retrieval.
AdamW (weight decay on matrices), linear warm-up then cosine decay to `min_lr_ratio` x the
peak, gradient clipping, bf16 autocast on CUDA (and on CPU only where it measures faster).
The data order is a seeded permutation per epoch, so a run resumed from a checkpoint sees
exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..atomic import atomic_write_bytes
from ..errors import ConfigMismatch, RetrodbError
from .checkpoint import latest_checkpoint, read_model_dir, save_checkpoint
from .config import RetroConfig
from .decoder import Retro

METRICS = "metrics.jsonl"


@dataclass
class TrainConfig:
    seq_len: int = 512  # tokens per training sequence (a multiple of the chunk size)
    k: int = 2  # neighbours per chunk
    batch_size: int = 8  # sequences per optimizer step
    steps: int = 2000  # optimizer steps; the learning-rate schedule ends here
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # the cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 100  # linear warm-up from 0 to lr
    weight_decay: float = 0.1  # AdamW weight decay, on weight matrices only (not norms)
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas
    grad_clip: float = 1.0  # maximum global gradient norm
    eval_every: int = 200  # steps between validation evaluations (and one at the end)
    eval_sequences: int = 64  # validation sequences per evaluation
    checkpoint_every: int = 200  # steps between checkpoints (and one at the end)
    log_every: int = 10  # steps between metrics lines
    seed: int = 0  # initial weights and data order
    device: str = "auto"  # auto: CUDA if present, else CPU
    dtype: str = "auto"  # auto | fp32 | bf16; auto: bf16 on CUDA, on CPU only if measured faster
    val_fraction: float = 0.02  # share of documents (by hash of id) held out for validation
    exclude_docs: tuple[str, ...] = ()  # documents never trained on (nor validated on)
    keep_checkpoints: int = 2  # newest step directories kept
    workers: int = 0  # data-loading processes (0: in the training process)
    max_minutes: float | None = None  # stop with a checkpoint after this much wall time (this run)
    stop_at: int | None = None  # stop with a checkpoint at this step (the schedule still ends at `steps`)
    # Near-duplicate neighbours (see `plant_copies`): the share of training chunks whose first neighbour is
    # a copy of their own [N, F], and the most of that copy's tokens replaced by random ones. 0: the paper's
    # data exactly (other documents only).
    copy_prob: float = 0.0
    copy_noise: float = 0.25
    # The share of planted copies whose continuation also gets a made-up span (an address, a number) that only
    # the neighbour can predict (`plant_copies`), and the span's length in tokens.
    copy_span_prob: float = 0.0
    copy_span_len: tuple[int, int] = (4, 24)
    # The share of planted copies whose second neighbour is the same text one chunk early (`plant_copies`).
    copy_decoy_prob: float = 0.0

    def __post_init__(self):
        self.betas = tuple(self.betas)
        self.exclude_docs = tuple(self.exclude_docs)
        self.copy_span_len = tuple(self.copy_span_len)


@dataclass
class TrainReport:
    out: str
    step: int
    steps: int
    tokens: int  # tokens trained on (targets), over every run of this training
    elapsed_s: float  # wall time, over every run
    loss: float | None
    val_bpb: float | None
    val_bpb_no_retrieval: float | None
    device: str
    dtype: str
    parameters: int
    checkpoint: str
    stopped: str  # "done" | "time limit" | "stop_at"
    evaluations: list[dict] = field(default_factory=list)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to cfg.lr * cfg.min_lr_ratio at cfg.steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def sample_order(n: int, seed: int, position: int) -> Iterator[int]:
    """Dataset indices from sample `position` on: a fresh seeded permutation for every epoch."""
    while True:
        epoch, offset = divmod(position, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        for i in perm[offset:].tolist():
            yield i
            position += 1


def make_batches(dataset, cfg: TrainConfig, position: int):
    from torch.utils.data import DataLoader

    return iter(DataLoader(dataset, batch_size=cfg.batch_size, sampler=sample_order(len(dataset), cfg.seed, position),
                           num_workers=cfg.workers, persistent_workers=cfg.workers > 0))  # default_collate: stacked


ADDABLE = {"enc_input_norm": "encoder.in_norm."}  # RetroConfig fields that only add modules: their parameters


def grown(model: Retro, changes: dict) -> Retro:
    """`model` with `changes` to its config that only add modules (ADDABLE), the new parameters initialised as in
    a fresh model and every other weight kept."""
    changed = {k: v for k, v in changes.items() if getattr(model.cfg, k, None) != v}  # unknown fields: refused below
    if not changed:
        return model
    if set(changed) - set(ADDABLE):
        raise ConfigMismatch(f"--init keeps the model's architecture; it cannot change {sorted(set(changed) - set(ADDABLE))}",
                             hint=f"only {', '.join(sorted(ADDABLE))} can be added to a trained model")
    new = Retro(replace(model.cfg, **changed))
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False)
    added = tuple(ADDABLE[k] for k in changed)
    if unexpected or any(not name.startswith(added) for name in missing):
        raise ConfigMismatch(f"cannot add {sorted(changed)} to the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return new


def plant_copies(batch: dict, m: int, prob: float, noise: float, vocab_size: int, seed: int,
                 span_prob: float = 0.0, span_len: tuple[int, int] = (4, 24), decoy_prob: float = 0.0) -> dict:
    """Give a share `prob` of the training chunks a near-duplicate of their own [N, F] as first neighbour.

    Why: RETRO learns to read its neighbours, and to copy from them, because a web-scale corpus is full
    of near-duplicates across documents (the paper, section 4.3: its gains grow with the overlap between
    the evaluation text and what it retrieves). A few million tokens of Python sources hold too few, and
    a model trained only on other documents' neighbours never learns that a neighbour can hold the very
    next tokens: the one situation an `add` of the text itself creates. So, with probability `prob` per
    chunk u, the neighbours shift down one rank and the first becomes chunk u followed by chunk u+1 of
    the sequence itself (the tokens the positions reading it must predict), up to `noise` x 2m of its
    tokens replaced at random (a near-duplicate, not always an exact one). Validation never sees this.

    Copies of ordinary text teach a soft copy: the neighbour raises tokens the language model already
    expects. An email address or an account number is what it does not expect. So, with probability
    `span_prob` per planted copy, a span of `span_len` tokens of chunk u+1 (in the sequence and, through
    the copy, in the neighbour) is replaced by tokens drawn at random from the batch: a made-up string
    that only the neighbour can predict. The targets follow the changed inputs.

    Once a document is in the database, its other chunks are retrieved too: for chunk u, [u-1, u] of the
    same text comes second after [u, u+1] (score 1.0). A model that never saw that copies from the wrong
    one. So, with probability `decoy_prob` per planted copy (u >= 1), the second neighbour is the copy
    planted for chunk u-1: the same text, one chunk early.

    `seed` makes every choice a function of the step, so a resumed run plants the same copies (the random
    draws of span_prob = 0 are those of the first version of this function, so older stages reproduce).
    """
    if prob <= 0:
        return batch
    g = torch.Generator().manual_seed(seed)
    ids, targets, old, old_mask = batch["input_ids"], batch["targets"], batch["neighbours"], batch["neighbour_mask"]
    B, L = ids.shape
    C = old.shape[1]
    seq = torch.cat([ids, targets[:, -1:].clamp(min=0), ids.new_zeros(B, 2 * m)], dim=1)  # (B, L+1+2m)
    real = torch.cat([torch.ones(B, 1, dtype=torch.bool), targets != -100, torch.zeros(B, 2 * m, dtype=torch.bool)], 1)
    own_mask = real.unfold(1, 2 * m, m)[:, :C]  # (B, C, 2m)
    rate = torch.rand(B, C, 1, generator=g) * noise  # each copy's share of random tokens
    swap = (torch.rand(B, C, 2 * m, generator=g) < rate) & own_mask
    swap_to = torch.randint(0, vocab_size, (B, C, 2 * m), generator=g)
    chosen = (torch.rand(B, C, generator=g) < prob) & own_mask[:, :, 0]  # (B, C); only real chunks
    out = dict(batch)
    if span_prob > 0:
        seq = plant_spans(seq, real, chosen, m, span_prob, span_len, seed)
        out["input_ids"] = seq[:, :L].clone()
        out["targets"] = torch.where(targets != -100, seq[:, 1:L + 1], targets)
    own = seq.unfold(1, 2 * m, m)[:, :C]  # (B, C, 2m): chunk u then chunk u+1
    own = torch.where(swap, swap_to, own)
    pick = chosen[:, :, None, None]  # (B, C, 1, 1)
    shifted = torch.cat([own[:, :, None], old[:, :, :-1]], dim=2)  # (B, C, k, 2m)
    shifted_mask = torch.cat([own_mask[:, :, None], old_mask[:, :, :-1]], dim=2)
    if decoy_prob > 0 and old.shape[2] >= 2 and C >= 2:
        g3 = torch.Generator().manual_seed(seed * 11 + 0xDEC0)
        decoy = (torch.rand(B, C, generator=g3) < decoy_prob) & chosen
        decoy[:, 0] = False  # chunk 0 has no chunk before it
        early = torch.cat([own[:, :1], own[:, :-1]], dim=1)  # (B, C, 2m): the copy planted for chunk u-1
        early_mask = torch.cat([own_mask[:, :1], own_mask[:, :-1]], dim=1)
        d = decoy[:, :, None]
        shifted[:, :, 1] = torch.where(d, early, shifted[:, :, 1])
        shifted_mask[:, :, 1] = torch.where(d, early_mask, shifted_mask[:, :, 1])
    out["neighbours"] = torch.where(pick, shifted, old)
    out["neighbour_mask"] = torch.where(pick, shifted_mask, old_mask)
    return out


def plant_spans(seq: torch.Tensor, real: torch.Tensor, chosen: torch.Tensor, m: int, prob: float,
                span_len: tuple[int, int], seed: int) -> torch.Tensor:
    """A copy of `seq` (B, L+1+2m) with, for a share `prob` of the chosen chunks u, a span of chunk u+1's real
    tokens replaced by tokens drawn from random real positions of the batch."""
    g = torch.Generator().manual_seed(seed * 7 + 0x5EED)
    seq = seq.clone()
    pool = seq[real]
    for b, u in chosen.nonzero().tolist():
        if torch.rand(1, generator=g).item() >= prob:
            continue
        n = int(torch.randint(span_len[0], span_len[1] + 1, (1,), generator=g))
        start = (u + 1) * m + int(torch.randint(0, max(1, m - n + 1), (1,), generator=g))
        where = torch.arange(start, min(start + n, (u + 2) * m))
        where = where[real[b, where]]
        seq[b, where] = pool[torch.randint(0, len(pool), (len(where),), generator=g)]
    return seq


def autocast(device: str, dtype: str):
    return torch.autocast(device, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()


def forward_loss(model: Retro, batch: dict, device: str, dtype: str, retrieval: bool = True,
                 reduction: str = "mean") -> torch.Tensor:
    ids = batch["input_ids"].to(device, non_blocking=True)
    targets = batch["targets"].to(device, non_blocking=True)
    nb = batch["neighbours"].to(device, non_blocking=True) if retrieval else None
    mask = batch["neighbour_mask"].to(device, non_blocking=True) if retrieval else None
    with autocast(device, dtype):
        logits = model(ids, nb, mask)  # (B, L, vocab)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                                             reduction=reduction)


def choose_dtype(requested: str, device: str, model: Retro, batch: dict) -> str:
    """fp32 or bf16. CUDA: bf16. CPU: bf16 only with native bf16 units and if a timed step is faster."""
    from ..embedder import cpu_has_native_bf16

    if requested != "auto":
        return requested
    if device == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if not cpu_has_native_bf16():
        return "fp32"
    timings = {"fp32": float("inf"), "bf16": float("inf")}
    for attempt in range(3):  # forward + backward, interleaved, best of 2 after a warm-up
        for dtype in timings:
            started = time.perf_counter()
            forward_loss(model, batch, device, dtype).backward()
            if attempt:
                timings[dtype] = min(timings[dtype], time.perf_counter() - started)
    model.zero_grad(set_to_none=True)
    return "bf16" if timings["bf16"] < 0.9 * timings["fp32"] else "fp32"


@torch.no_grad()
def validate(model: Retro, items: list[dict], token_bytes: torch.Tensor, cfg: TrainConfig, device: str,
             dtype: str) -> dict:
    """Bits per byte of the validation sequences, with retrieval and without."""
    from torch.utils.data import default_collate

    model.eval()
    totals = {"with": 0.0, "without": 0.0}
    n_bytes = n_tokens = 0
    for i in range(0, len(items), cfg.batch_size):
        batch = default_collate(items[i: i + cfg.batch_size])
        for key, retrieval in (("with", True), ("without", False)):
            totals[key] += forward_loss(model, batch, device, dtype, retrieval, reduction="sum").item()
        targets = batch["targets"]
        real = targets != -100
        n_tokens += int(real.sum())
        n_bytes += int(token_bytes[targets[real]].sum())
    model.train()
    bits = 1 / (math.log(2) * max(n_bytes, 1))
    return {"val_bpb": totals["with"] * bits, "val_bpb_no_retrieval": totals["without"] * bits,
            "val_tokens": n_tokens, "val_bytes": n_bytes}


def hardware(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    from ..executor import cpu_model

    return f"{cpu_model()}, {torch.get_num_threads()} threads"


def train(db_path: str | Path, out: str | Path, cfg: TrainConfig | None = None, model_cfg: RetroConfig | None = None,
          *, init: str | Path | None = None, model_changes: dict | None = None, resume: bool = False,
          overrides: dict | None = None, datasets: tuple | None = None,
          on_progress: Callable[[dict], None] | None = None) -> TrainReport:
    """Train on the database at `db_path`, writing checkpoints and metrics.jsonl to `out`.

    `model_cfg` sets the architecture of a new model (its vocabulary is the database tokenizer's);
    `init` starts from the weights of a model directory instead (its tokenizer must be the
    database's), with `model_changes` (RetroConfig fields) applied when they only add modules
    (enc_input_norm: the new parameters start as a fresh model's). `resume` continues the run in
    `out` from its last checkpoint, with its saved configuration updated by `overrides` (e.g. more
    `steps`). `datasets` = (train, val) replaces the database's (tests). `on_progress(dict)` is
    called every `log_every` steps.
    """
    from ..database import open as open_db
    from ..tokenizer import load_tokenizer, tokenizer_info
    from .bpe import token_bytes as token_byte_lengths

    out = Path(out)
    db = open_db(db_path)
    tok_info = tokenizer_info(db.config["tokenizer"]["path"])
    tokenizer_json = load_tokenizer(tok_info.path).to_str()

    # ---- where we start: a checkpoint of this run, the weights of another model, or fresh weights
    state = None
    if resume:
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            raise RetrodbError(f"{out} has no checkpoint to resume from", hint="leave out --resume to start a run")
        state = torch.load(ckpt / "train_state.pt", map_location="cpu", weights_only=False)
        cfg = replace(TrainConfig(**state["train_config"]), **(overrides or {}))
    else:
        if (out / "LATEST").exists():
            raise RetrodbError(f"{out} already holds a training run",
                               hint=f"continue it with: retrodb train {db_path} --out {out} --resume, or pick another --out")
        cfg = replace(cfg or TrainConfig(), **(overrides or {}))
    if cfg.seq_len % db.config["chunk_size"]:
        raise RetrodbError(f"--seq-len {cfg.seq_len} is not a multiple of the chunk size {db.config['chunk_size']}")
    from .lm import pick_device

    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    if state is not None:
        model = read_model_dir(ckpt, device)
    elif init is not None:
        from .lm import load

        lm = load(init, device)
        lm.check_database(db)
        model = grown(lm.model, model_changes or {}).to(device)
    else:
        model_cfg = replace(model_cfg or RetroConfig(), vocab_size=tok_info.vocab_size,
                            chunk_size=db.config["chunk_size"])
        model = Retro(model_cfg).to(device)
    if model.cfg.chunk_size != db.config["chunk_size"] or model.cfg.vocab_size < tok_info.vocab_size:
        raise ConfigMismatch(f"the model reads chunks of {model.cfg.chunk_size} tokens from a {model.cfg.vocab_size}-token "
                             f"vocabulary; {db.root} has chunks of {db.config['chunk_size']} from {tok_info.vocab_size}")
    model.train()

    # ---- data
    if datasets is None:
        from ..data import RetroDataset

        common = dict(seq_len=cfg.seq_len, k=cfg.k, val_fraction=cfg.val_fraction, exclude_docs=cfg.exclude_docs)
        datasets = (RetroDataset(db, split="train", **common), RetroDataset(db, split="val", **common))
    train_set, val_set = datasets
    if len(train_set) == 0:
        raise RetrodbError(f"{db.root} has no training sequences", hint="ingest documents, then run retrodb neighbours")
    picks = sorted({int(i) for i in torch.linspace(0, len(val_set) - 1, min(cfg.eval_sequences, len(val_set)))}) \
        if len(val_set) else []
    val_items = [val_set[i] for i in picks]
    token_bytes = torch.from_numpy(token_byte_lengths(load_tokenizer(tok_info.path)))

    # ---- optimizer: decay the matrices, not the norms
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas,
                            fused=device == "cuda")
    step, position, tokens, elapsed_before = 0, 0, 0, 0.0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        step, position, tokens, elapsed_before = state["step"], state["position"], state["tokens"], state["elapsed_s"]
    run_started = time.perf_counter()

    def elapsed() -> float:  # wall time over every run of this training
        return elapsed_before + time.perf_counter() - run_started

    if state is not None:
        torch.set_rng_state(state["rng"])
    batches = make_batches(train_set, cfg, position)
    first = next(batches)
    dtype = state["dtype"] if state is not None and cfg.dtype == "auto" else choose_dtype(cfg.dtype, device, model, first)

    # ---- metrics: a resumed run forgets what was logged after its checkpoint
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / METRICS
    kept = [line for line in (metrics_path.read_text().splitlines() if metrics_path.exists() else [])
            if line.strip() and json.loads(line)["step"] <= step] if state is not None else []
    atomic_write_bytes(metrics_path, "".join(line + "\n" for line in kept).encode())
    metrics = open(metrics_path, "a", encoding="utf-8")

    def log(record: dict) -> None:
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()

    def checkpoint() -> Path:
        extra = {"seq_len": cfg.seq_len, "k": cfg.k, "step": step, "tokens": tokens, "elapsed_s": round(elapsed(), 1),
                 "device": device, "dtype": dtype, "hardware": hardware(device), "torch": torch.__version__,
                 "database": str(db.root), "database_version": db.version, "train_config": asdict(cfg),
                 "parameters": model.num_parameters()}
        return save_checkpoint(out, step, model, tokenizer_json, {
            "optimizer": opt.state_dict(), "step": step, "position": position, "tokens": tokens,
            "elapsed_s": elapsed(), "rng": torch.get_rng_state(), "train_config": asdict(cfg), "dtype": dtype,
        }, extra, keep=cfg.keep_checkpoints)

    # ---- the loop
    evaluations: list[dict] = []
    loss_value = None
    window_started, window_tokens = time.perf_counter(), 0
    stopped = "done"
    ckpt_path = None
    batch = first
    try:
        while step < cfg.steps and (cfg.stop_at is None or step < cfg.stop_at):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            planted = plant_copies(batch, model.cfg.chunk_size, cfg.copy_prob, cfg.copy_noise, model.cfg.vocab_size,
                                   seed=cfg.seed * 1_000_003 + step, span_prob=cfg.copy_span_prob,
                                   span_len=cfg.copy_span_len, decoy_prob=cfg.copy_decoy_prob)
            loss = forward_loss(model, planted, device, dtype)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            n = int((batch["targets"] != -100).sum())
            step, position, tokens = step + 1, position + len(batch["input_ids"]), tokens + n
            window_tokens += n
            if step % cfg.log_every == 0 or step == cfg.steps:
                loss_value = loss.item()
                now = time.perf_counter()
                rate = window_tokens / max(now - window_started, 1e-9)
                record = {"step": step, "tokens": tokens, "loss": round(loss_value, 4), "lr": lr_at(step - 1, cfg),
                          "tokens_per_s": round(rate, 1), "elapsed_s": round(elapsed(), 1)}
                log(record)
                if on_progress:
                    on_progress({**record, "steps": cfg.steps,
                                 "eta_s": (cfg.steps - step) * cfg.batch_size * cfg.seq_len / max(rate, 1e-9)})
                window_started, window_tokens = now, 0
            last = step == cfg.steps
            out_of_time = cfg.max_minutes is not None and time.perf_counter() - run_started > 60 * cfg.max_minutes
            at_stop = cfg.stop_at is not None and step >= cfg.stop_at
            if val_items and (last or out_of_time or at_stop or (cfg.eval_every and step % cfg.eval_every == 0)):
                result = {"step": step, "tokens": tokens, **validate(model, val_items, token_bytes, cfg, device, dtype)}
                evaluations.append(result)
                log(result)
                if on_progress:
                    on_progress({**result, "steps": cfg.steps})
            if last or out_of_time or at_stop or step % cfg.checkpoint_every == 0:
                ckpt_path = checkpoint()
            if (out_of_time or at_stop) and not last:
                stopped = "time limit" if out_of_time else "stop_at"
                break
            if not last:
                batch = next(batches)
    finally:
        metrics.close()
    final = evaluations[-1] if evaluations else {}
    return TrainReport(out=str(out), step=step, steps=cfg.steps, tokens=tokens, elapsed_s=round(elapsed(), 1),
                       loss=loss_value, val_bpb=final.get("val_bpb"),
                       val_bpb_no_retrieval=final.get("val_bpb_no_retrieval"), device=device, dtype=dtype,
                       parameters=model.num_parameters(), checkpoint=str(ckpt_path or latest_checkpoint(out) or ""),
                       stopped=stopped, evaluations=evaluations)
