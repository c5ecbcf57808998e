"""`retrodb train`: schedule, metrics, checkpoints, kill -9 and --resume (fake data of the data contract)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from conftest import REPO  # noqa: E402
from model_fakes import fake_datasets, one_torch_thread, tiny_run  # noqa: E402,F401 (fixture)

from retrodb.database import Database  # noqa: E402
from retrodb.errors import RetrodbError  # noqa: E402
from retrodb.model.checkpoint import latest_checkpoint, read_model_dir  # noqa: E402
from retrodb.model.train import TrainConfig, lr_at  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def empty_db(tmp_path):
    """A database with the default (the bundled model's) tokenizer and chunks of 8 tokens; the data is fake."""
    Database.create(tmp_path / "db", chunk_size=8)
    return tmp_path / "db"



def test_schedule_warms_up_then_decays_to_a_tenth():
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, steps=110, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(111)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[60] == pytest.approx(0.55e-3) and lrs[110] == pytest.approx(1e-4)


def test_train_logs_loss_and_validation_bpb_with_and_without_retrieval(empty_db, tmp_path):
    out = tmp_path / "run"
    report = tiny_run(str(empty_db), str(out))
    assert report.step == 6 and report.stopped == "done"
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if "loss" in x]
    evals = [x for x in lines if "val_bpb" in x]
    assert [x["step"] for x in train_lines] == [1, 2, 3, 4, 5, 6]
    assert [x["step"] for x in evals] == [3, 6]
    assert all(x["val_bpb"] > 0 and x["val_bpb_no_retrieval"] > 0 and x["val_bytes"] > 0 for x in evals)
    assert train_lines[-1]["tokens"] == report.tokens > 0
    # checkpoints: the newest two steps, LATEST names the last, loading gives the trained weights
    assert sorted(p.name for p in out.glob("step-*")) == ["step-00000004", "step-00000006"]
    assert latest_checkpoint(out).name == "step-00000006"
    model = read_model_dir(out / "step-00000006")
    assert model.num_parameters() == report.parameters
    info = json.loads((out / "step-00000006" / "training.json").read_text())
    assert info["step"] == 6 and info["tokens"] == report.tokens and info["seq_len"] == 32
    with pytest.raises(RetrodbError, match="already holds a training run"):
        tiny_run(str(empty_db), str(out))


def test_kill_9_during_a_checkpoint_then_resume_matches_an_uninterrupted_run(empty_db, tmp_path):
    whole = tmp_path / "whole"
    tiny_run(str(empty_db), str(whole))
    killed = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(REPO), RETRODB_KILL_AT="train:checkpoint-written#2")
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "model_fakes.py"), str(empty_db), str(killed)],
                          env=env, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    # killed while writing step 4: step 2 is the last complete checkpoint, step 4 only a temporary directory
    assert (killed / "LATEST").read_text() == "step-00000002"
    assert any(p.name.startswith(".tmp-") for p in killed.iterdir())
    logged = [json.loads(x)["step"] for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert max(logged) == 4  # logged past the checkpoint: the resumed run drops those lines
    report = tiny_run(str(empty_db), str(killed), resume=True)
    assert report.step == 6
    assert not any(p.name.startswith(".tmp-") for p in killed.iterdir())
    steps = [json.loads(x)["step"] for x in (killed / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == [1, 2, 3, 4, 5, 6]
    a = read_model_dir(whole / "step-00000006").state_dict()
    b = read_model_dir(killed / "step-00000006").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run diverged from the uninterrupted one"


def test_resume_can_extend_the_run(empty_db, tmp_path):
    out = tmp_path / "run"
    tiny_run(str(empty_db), str(out))
    report = tiny_run(str(empty_db), str(out), resume=True, steps=8)
    assert report.step == 8 and latest_checkpoint(out).name == "step-00000008"
    with pytest.raises(RetrodbError, match="no checkpoint"):
        tiny_run(str(empty_db), str(tmp_path / "nothing"), resume=True)


def test_stop_at_keeps_the_schedule_and_resume_finishes_it_as_one_run_would(empty_db, tmp_path):
    whole = tmp_path / "whole"
    tiny_run(str(empty_db), str(whole))
    out = tmp_path / "stopped"
    report = tiny_run(str(empty_db), str(out), stop_at=3)
    assert report.step == 3 and report.stopped == "stop_at" and latest_checkpoint(out).name == "step-00000003"
    lrs = [json.loads(x)["lr"] for x in (out / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(x)]
    assert lrs == [lr_at(i, TrainConfig(steps=6, lr=3e-3, warmup_steps=2)) for i in range(3)]  # the 6-step schedule
    report = tiny_run(str(empty_db), str(out), resume=True, stop_at=None)
    assert report.step == 6 and report.stopped == "done"
    a = read_model_dir(whole / "step-00000006").state_dict()
    b = read_model_dir(out / "step-00000006").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "stopping and resuming changed the run"


def test_fake_items_follow_the_data_contract():
    train, _ = fake_datasets()
    item = train[len(train) - 1]
    C, k, r = 32 // 8, 2, 16
    assert item["input_ids"].shape == (32,) and item["input_ids"].dtype == torch.int64
    assert item["targets"].shape == (32,) and (item["targets"] == -100).any()
    assert item["neighbours"].shape == (C, k, r) and item["neighbour_mask"].dtype == torch.bool
    assert item["chunk_ids"].shape == (C,) and item["neighbour_ids"].shape == (C, k)
    assert not math.isnan(float(item["neighbours"].float().mean()))


def test_cli_train_on_a_real_database_killed_then_resumed(tmp_path, cli):
    """`retrodb train` on stored neighbours (retrodb.data), kill -9 mid-checkpoint, --resume, then eval with it."""
    from conftest import run_retrodb
    from edit_helpers import build_db

    from retrodb.neighbours import compute_neighbours

    db = build_db(tmp_path / "db", n_docs=16, segment_bytes=4000, index=True)
    compute_neighbours(db, 2)
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"model": {"dim": 32, "n_layers": 2, "n_heads": 2, "head_dim": 16, "enc_dim": 16,
                                            "enc_heads": 1, "ffn_mult": 2},
                                  "train": {"seq_len": 128, "batch_size": 2, "steps": 4, "warmup_steps": 1,
                                            "eval_every": 2, "eval_sequences": 2, "checkpoint_every": 1,
                                            "log_every": 1, "dtype": "fp32", "val_fraction": 0.2}}))
    out = tmp_path / "run"
    killed = run_retrodb("train", db, "--out", out, "--config", config, "--format", "json",
                         env={"RETRODB_KILL_AT": "train:checkpoint-written#3"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    assert (out / "LATEST").read_text() == "step-00000002"
    r = cli("train", db, "--out", out, "--resume", "--format", "json")
    assert r.code == 0, r.err
    done = r.json_lines()[-1]
    assert done["done"] and done["step"] == 4 and done["val_bpb"] > 0 and done["val_bpb_no_retrieval"] > 0
    (tmp_path / "t.txt").write_text("retrieval database chunk neighbour encoder attention " * 20)
    r = cli("eval", db, tmp_path / "t.txt", "--model", out, "--format", "json")
    assert r.code == 0, r.err
    assert r.json_lines()[0]["bpb"] > 0


def test_plant_copies_gives_chunks_their_own_continuation_as_first_neighbour():
    from retrodb.model.train import plant_copies

    m, B, L, k = 4, 2, 12, 2
    ids = torch.arange(1, B * L + 1).reshape(B, L)
    targets = torch.cat([ids[:, 1:], ids[:, -1:] + 100], dim=1)
    targets[1, 6:] = -100  # the second sequence's document ends at its 7th token
    old = torch.full((B, L // m, k, 2 * m), 7)
    old_mask = torch.ones(B, L // m, k, 2 * m, dtype=torch.bool)
    old[:, :, 1] = 9
    batch = {"input_ids": ids, "targets": targets, "neighbours": old, "neighbour_mask": old_mask}
    assert plant_copies(batch, m, 0.0, 0.25, 50, seed=1) is batch
    out = plant_copies(batch, m, 1.0, 0.0, 50, seed=1)
    seq0 = torch.cat([ids[0], targets[0, -1:]])
    for u in range(L // m):  # the first neighbour is chunk u then chunk u+1 of the sequence itself
        want = seq0[u * m: u * m + 2 * m]
        assert out["neighbours"][0, u, 0, :len(want)].tolist() == want.tolist()
        assert out["neighbour_mask"][0, u, 0].tolist() == [True] * len(want) + [False] * (2 * m - len(want))
        assert (out["neighbours"][0, u, 1] == 7).all()  # the old first neighbour moved down a rank
    # second sequence: 7 real tokens; chunk 0 is [1..4] + [5..7], chunk 1 has 3 real tokens, chunk 2 none
    assert out["neighbour_mask"][1, 0, 0].sum() == 7 and out["neighbour_mask"][1, 1, 0].sum() == 3
    assert (out["neighbours"][1, 2] == old[1, 2]).all()  # a padding chunk is left alone
    # the choice is a function of the seed (resumed runs plant the same copies), and noise replaces tokens
    a, b = plant_copies(batch, m, 0.5, 0.5, 50, seed=3), plant_copies(batch, m, 0.5, 0.5, 50, seed=3)
    assert torch.equal(a["neighbours"], b["neighbours"])
    noisy = [plant_copies(batch, m, 1.0, 1.0, 50, seed=s)["neighbours"][:, :, 0] for s in range(4)]
    assert any(not torch.equal(n, out["neighbours"][:, :, 0]) for n in noisy)
    assert torch.equal(batch["neighbours"], old)  # the input batch is not changed


def test_plant_copies_decoy_is_the_same_text_one_chunk_early_as_second_neighbour():
    """copy_decoy_prob: after an add, a document's chunk u retrieves [u, u+1] and then [u-1, u] of itself."""
    from retrodb.model.train import plant_copies

    m, B, L, k = 4, 2, 16, 2
    ids = torch.arange(1, B * L + 1).reshape(B, L)
    targets = torch.cat([ids[:, 1:], ids[:, -1:] + 1], dim=1)
    old = torch.full((B, L // m, k, 2 * m), 7)
    batch = {"input_ids": ids, "targets": targets, "neighbours": old,
             "neighbour_mask": torch.ones(B, L // m, k, 2 * m, dtype=torch.bool)}
    out = plant_copies(batch, m, 1.0, 0.0, 50, seed=4, decoy_prob=1.0)
    seq = torch.cat([ids, targets[:, -1:]], dim=1)
    for b in range(B):
        assert (out["neighbours"][b, 0, 1] == 7).all()  # chunk 0: nothing before it, the old first neighbour
        for u in range(1, L // m):
            n = min(2 * m, L + 1 - u * m)
            assert out["neighbours"][b, u, 0, :n].tolist() == seq[b, u * m: u * m + n].tolist()
            assert out["neighbours"][b, u, 1].tolist() == seq[b, (u - 1) * m: (u + 1) * m].tolist()
    half = plant_copies(batch, m, 1.0, 0.0, 50, seed=4, decoy_prob=0.5)["neighbours"][:, 1:, 1]
    assert (half == 7).all(-1).any() and (half != 7).all(-1).any()  # some decoys, some old neighbours


def test_a_saved_model_without_the_encoder_input_norm_loads_as_it_was_and_can_grow_one(tmp_path):
    """config.json files written before RetroConfig.enc_input_norm describe models without it; `--init` with
    {"model": {"enc_input_norm": true}} adds it (fresh weights) and keeps every other weight."""
    from retrodb.errors import ConfigMismatch
    from retrodb.model.checkpoint import write_model_dir
    from retrodb.model.config import RetroConfig
    from retrodb.model.decoder import Retro
    from retrodb.model.train import grown

    cfg = RetroConfig(vocab_size=40, chunk_size=4, dim=32, n_layers=2, n_heads=2, head_dim=16, enc_dim=16,
                      enc_heads=1, enc_input_norm=False)
    torch.manual_seed(0)
    old = Retro(cfg).eval()
    write_model_dir(old, tmp_path / "m", '{"version": "1.0"}')
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    del saved["enc_input_norm"]  # as written before the field existed
    (tmp_path / "m" / "config.json").write_text(json.dumps(saved))
    back = read_model_dir(tmp_path / "m")
    assert back.cfg.enc_input_norm is False and back.encoder.in_norm is None
    assert RetroConfig.from_dict({}).enc_input_norm is True  # a new model has it
    new = grown(back, {"enc_input_norm": True})
    assert new.encoder.in_norm is not None and torch.equal(new.encoder.in_norm.weight, torch.ones(32))
    old_state, new_state = back.state_dict(), new.state_dict()
    assert all(torch.equal(old_state[k], new_state[k]) for k in old_state)
    assert set(new_state) - set(old_state) == {"encoder.in_norm.weight"}
    assert grown(back, {"enc_input_norm": False}) is back
    with pytest.raises(ConfigMismatch, match="dim"):
        grown(back, {"dim": 64})
    with pytest.raises(ConfigMismatch, match="bogus"):
        grown(back, {"bogus": 1})


def test_plant_copies_spans_are_made_up_tokens_only_the_neighbour_holds():
    """copy_span_prob: a span of chunk u+1 is replaced, in the inputs, the targets and the planted copy alike."""
    from retrodb.model.train import plant_copies

    m, B, L, k = 8, 3, 32, 2
    ids = torch.arange(1, B * L + 1).reshape(B, L)
    targets = torch.cat([ids[:, 1:], ids[:, -1:] + 1], dim=1)
    targets[2, 10:] = -100  # a short document: its padding stays padding
    old = torch.zeros(B, L // m, k, 2 * m, dtype=torch.long)
    batch = {"input_ids": ids, "targets": targets, "neighbours": old,
             "neighbour_mask": torch.ones(B, L // m, k, 2 * m, dtype=torch.bool)}
    assert torch.equal(plant_copies(batch, m, 1.0, 0.0, 50, seed=2, span_prob=0.0)["input_ids"], ids)
    out = plant_copies(batch, m, 1.0, 0.0, 50, seed=2, span_prob=1.0, span_len=(3, 5))
    new_ids, new_t = out["input_ids"], out["targets"]
    real = targets != -100
    assert torch.equal(new_t[:, :-1][real[:, :-1]], new_ids[:, 1:][real[:, :-1]])  # targets follow the inputs
    assert torch.equal(new_t == -100, targets == -100) and torch.equal(new_ids[2, 11:], ids[2, 11:])
    changed = (new_ids != ids).nonzero().tolist()
    assert changed and all(p >= m for _, p in changed)  # chunk 0 is never a continuation
    seq = torch.cat([new_ids, new_t[:, -1:].clamp(min=0)], dim=1)
    for b in range(B):  # the planted copy holds the made-up span where the targets do
        for u in range(L // m):
            if b == 2 and u * m > 10:  # past the short document's end: no copy planted
                assert torch.equal(out["neighbours"][b, u], old[b, u])
                continue
            want = seq[b, u * m: u * m + 2 * m]
            mask = out["neighbour_mask"][b, u, 0, :len(want)]
            assert torch.equal(out["neighbours"][b, u, 0, :len(want)][mask], want[mask]) and mask[0]
    # the span's tokens come from the batch, and the choice is a function of the seed
    assert set(new_ids[new_ids != ids].tolist()) <= set(ids[real].tolist()) | set(targets[real].tolist())
    again = plant_copies(batch, m, 1.0, 0.0, 50, seed=2, span_prob=1.0, span_len=(3, 5))
    assert all(torch.equal(out[x], again[x]) for x in out)
    assert torch.equal(batch["input_ids"], ids)


def test_recipe_runs_each_stage_once_resuming_the_interrupted_one(tmp_path, monkeypatch):
    """`make model` trains recipe.BUNDLED_STAGES in order: a finished stage is skipped, an interrupted one resumed
    with its overrides, a new one started from the previous stage's last checkpoint; a time limit stops the chain."""
    from types import SimpleNamespace

    from retrodb.model import recipe
    from retrodb.model import train as train_module
    from retrodb.model.checkpoint import LATEST, STATE

    def reach(run, step):
        (run / f"step-{step:08d}").mkdir(parents=True)
        (run / f"step-{step:08d}" / STATE).write_bytes(b"")
        (run / LATEST).write_text(f"step-{step:08d}")

    work = tmp_path / "work"
    reach(work / "run", 700)  # stage 1 done
    reach(work / "copy-1", 325)  # stage 2 done, its continuation (stage 3) not yet
    calls, changes = [], []

    out_of_time = {"copy-4"}

    def fake_train(db, run, cfg=None, model_cfg=None, *, init=None, model_changes=None, resume=False, overrides=None,
                   on_progress=None):
        calls.append((run.name, resume, dict(overrides or {}), init and Path(init).relative_to(work).as_posix(),
                      cfg and cfg.copy_prob))
        changes.append(model_changes)
        stage = next(s for s in recipe.BUNDLED_STAGES[::-1] if s.name == run.name)
        stopped = "time limit" if run.name in out_of_time else "done"
        if stopped == "done":
            reach(run, stage.target())
        return SimpleNamespace(step=stage.target(), steps=stage.target(), stopped=stopped, tokens=1, val_bpb=None,
                               val_bpb_no_retrieval=None)

    monkeypatch.setattr(train_module, "train", fake_train)
    recipe.step_train(work, tmp_path / "db", {"device": "cpu"})
    assert calls == [
        ("copy-1", True, {"steps": 1000, "stop_at": 825, "device": "cpu"}, None, None),
        ("copy-2", False, {"device": "cpu"}, "copy-1/step-00000825", 0.6),
        ("copy-3", False, {"device": "cpu"}, "copy-2/step-00000500", 0.8),
        ("copy-4", False, {"device": "cpu"}, "copy-3/step-00000700", 0.4),
    ]  # copy-4 ran out of time: copy-5 waits for the rerun
    calls.clear(), changes.clear(), out_of_time.clear()
    reach(work / "copy-4", 150)  # where the time limit left it
    recipe.step_train(work, tmp_path / "db", {"device": "cpu"})
    assert [c[0] for c in calls] == ["copy-4", "copy-5", "copy-6", "copy-7", "copy-8", "copy-9", "copy-10"]
    assert calls[0][1] is True and calls[2][3] == "copy-5/step-00000900"  # resumed; copy-6 from copy-5's end
    assert changes[2] == {"enc_input_norm": True} and not changes[3]  # copy-6 adds the encoder's input norm
