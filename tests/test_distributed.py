"""Data-parallel training (train/distributed.py): one run in 2 processes over gloo on the CPU, started by
accelerate's launcher (`accelerate launch --multi_gpu --num_processes 2`, torchrun's launcher: on a machine
without GPUs the processes train on the CPU) or by `cxr-fastai train --procs 2`.

Fast: the sharded loader hands out exactly the one-process batches (order, weighted draws, crops), the last
validation batch's padding is dropped, the relaunched command line is the user's. Slow (a few processes
each): the 2-process run writes one run folder, scores the validation set once, lands near the one-process
run, exports and predicts; a process that crashes ends the job in bounded time with its checkpoint kept,
and the run resumes in one process; `--procs 2`; Ctrl-C."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import REPO, TINY_WIDTHS, cli

NARROW_CLI = ("import functools\n"
              "from cxr_fastai import cli\n"
              f"cli.TrainConfig = functools.partial(cli.TrainConfig, widths={TINY_WIDTHS!r})\n"
              "cli.main()\n")
RECIPE = ("--size", "16", "--bs", "8", "--device", "cpu", "--quiet")


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    from cxr_fastai.synth import make_synthetic_dataset

    # 48 train (6 batches of 8), 15 valid: the last validation batch (7) is padded across 2 processes
    return make_synthetic_dataset(tmp_path_factory.mktemp("dsynth") / "data", {"train": 16, "valid": 5, "test": 2},
                                  size=32, seed=3)


@pytest.fixture(scope="module")
def narrow_script(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("narrow") / "narrow_cli.py"
    f.write_text(NARROW_CLI)
    return f


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def _launch(script: Path, *args, procs: int = 2) -> list[str]:
    from cxr_fastai.train.distributed import launcher_command

    cmd = launcher_command(list(map(str, args)), procs)
    i = cmd.index("-m", cmd.index("--main_process_port"))
    return cmd[:i] + [str(script)] + cmd[i + 2:]  # the narrow CLI script instead of `-m cxr_fastai`


def _run(cmd: list[str], env: dict, timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"no exit within {timeout} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), time.perf_counter() - t0


def _valid_images(run: Path) -> int:
    items = pd.read_csv(run / "items.csv")
    return int((items.split == "valid").sum())


# ------------------------------------------------------------------------------------------- fast

def test_split_batch_keeps_the_global_batch():
    from cxr_fastai.errors import CxrError
    from cxr_fastai.train.distributed import split_batch

    assert split_batch(256, 10_000, 2) == (256, 128)
    assert split_batch(256, 10_000, 4) == (256, 64)
    assert split_batch(8, 30, 2) == (8, 4)
    assert split_batch(256, 30, 4) == (28, 7)   # clamped to the training set as one process clamps it
    with pytest.raises(CxrError, match="multiple of the 3 processes"):
        split_batch(256, 10_000, 3)
    with pytest.raises(CxrError, match="at least one"):
        split_batch(4, 1, 2)


def test_timeout_comes_from_the_environment(monkeypatch):
    from cxr_fastai.errors import CxrError
    from cxr_fastai.train import distributed as d

    monkeypatch.delenv(d.TIMEOUT_ENV, raising=False)
    assert d.timeout_seconds() == d.DEFAULT_TIMEOUT_S
    monkeypatch.setenv(d.TIMEOUT_ENV, "90")
    assert d.timeout_seconds() == 90
    monkeypatch.setenv(d.TIMEOUT_ENV, "soon")
    with pytest.raises(CxrError, match="seconds"):
        d.timeout_seconds()


def test_procs_relaunches_the_users_command_without_procs(monkeypatch):
    from cxr_fastai.train import distributed as d

    seen = {}

    def fake_launch(args, procs, *, device, log):
        seen.update(args=args, procs=procs, device=device)
        return 0

    monkeypatch.setattr(d, "launch_local", fake_launch)
    r = cli("train", "d1", "d2", "--run", "r", "--size", "16", "--no-class-weights", "--exclude-source", "a",
            "--exclude-source", "b", "-q", "--procs", "2", "--device", "cpu", "--balance", "class")
    assert r.exit_code == 0, r.output
    assert seen == {"procs": 2, "device": "cpu",
                    "args": ["train", "--run", "r", "--size", "16", "--device", "cpu", "--no-class-weights",
                             "--exclude-source", "a", "--exclude-source", "b", "--balance", "class", "--quiet",
                             "d1", "d2"]}
    r = cli("train", "--resume", "--run", "r", "--procs", "3")
    assert r.exit_code == 0 and seen["args"] == ["train", "--run", "r", "--resume"] and seen["procs"] == 3
    # the launcher is accelerate's: torchrun behind --multi_gpu (`--cpu --num_processes N` starts one process)
    cmd = d.launcher_command(["train", "x"], 2)
    assert cmd[1:4] == ["-m", "accelerate.commands.launch", "--multi_gpu"] and cmd[-4:] == ["-m", "cxr_fastai", "train", "x"]


@pytest.fixture(scope="module")
def prepared(synth, tmp_path_factory):
    from cxr_fastai.config import TrainConfig
    from cxr_fastai.data.loaders import _frame, build_cache
    from cxr_fastai.train.fit import prepare_run
    from cxr_fastai.train.runs import cache_side

    run = tmp_path_factory.mktemp("prep") / "run"
    cfg = TrainConfig(data=str(synth), run=str(run), size=16, bs=8, widths=TINY_WIDTHS, device="cpu")
    info, items = prepare_run(cfg, force=False, log=lambda m: None, warn=lambda m: None)
    cache = build_cache(_frame(items), info.classes, 16, cache_side(info))
    return info, items, cache


def _local_sharded():
    from cxr_fastai.train import distributed as d

    class LocalSharded(d.ShardedDL):  # no process group here: every "rank" made the same order
        def _broadcast(self, t, rank):
            return list(t)

    return LocalSharded


@pytest.mark.parametrize("world,balance", [(2, "none"), (4, "class")])
def test_sharded_batches_are_the_one_process_batches(prepared, world, balance):
    """Every global batch, put back together from the processes' pieces, is the one-process batch: same
    images in the same order (weighted draws included), same crops; the last validation batch's padding
    is dropped; as many batches per epoch as one process (the one-cycle schedule's length)."""
    from cxr_fastai.data.loaders import build_cached_dls
    from cxr_fastai.train.runs import cache_side

    info, items, cache = prepared
    B = 8

    def loaders(bs):
        cfg = info.cfg.replace(bs=bs, balance=balance)
        return build_cached_dls(items, info.classes, info.stats, cfg, "cpu", side=cache_side(info), cache=cache)

    one = loaders(B)
    Sharded = _local_sharded()
    ranks = [loaders(B // world) for _ in range(world)]  # one process each: each has its own crop transform
    for split in (0, 1):
        for epoch in (0, 3):
            one[split].set_epoch(epoch)
            want = list(one[split])
            parts, n_real = [], []
            for r, dls in enumerate(ranks):
                sdl = Sharded(dls[split], rank=r, world_size=world)
                assert len(sdl) == len(one[split])
                sdl.set_epoch(epoch)
                got = []
                for x, y in sdl:
                    got.append((x, y))
                    if r == 0:
                        n_real.append(sdl.n_real(len(y)))
                parts.append(got)
                sdl.unwrap()
            assert all(len(p) == len(want) for p in parts)
            for j, (x1, y1) in enumerate(want):
                x = torch.cat([p[j][0] for p in parts])[:n_real[j]]
                y = torch.cat([p[j][1] for p in parts])[:n_real[j]]
                assert torch.equal(y, y1), (split, epoch, j)
                torch.testing.assert_close(x, x1, rtol=0, atol=1e-5)
            if split == 1:  # validation: every image once
                assert sum(n_real) == len(one.valid_ds)
    crop = [f for f in ranks[0].train.after_batch.fs if hasattr(f, "shard")][0]
    assert crop.shard == (0, 1)  # unwrapped: a one-process loader again


EXIT_SCRIPT = """
import atexit, sys
from pathlib import Path
from cxr_fastai import cli
from cxr_fastai.train import distributed

atexit.register(lambda: Path(sys.argv[1]).write_text("atexit ran"))
distributed._state["atexit"] = sys.argv[2] == "joined"   # as `setup` leaves it
print("written before the exit", end="")                 # no newline: only a flush gets it out
cli.app = lambda: sys.exit(int(sys.argv[3]))
cli.main()
"""


@pytest.mark.parametrize("joined", ["joined", "alone"])
def test_a_data_parallel_process_exits_with_its_code_after_its_atexit_handlers(tmp_path, joined):
    """`main` ends a process that joined a group through `exit_process` (os._exit, after the atexit
    handlers, where the group is destroyed, and a flush), and any other process as Python does: the exit
    status, the atexit handlers and the printed output are the same either way."""
    mark = tmp_path / "mark"
    env = {k: v for k, v in _env().items() if k != "PYTHONUNBUFFERED"}  # stdout to a pipe: block-buffered
    r = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, str(mark), joined, "3"], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 3, r.stderr
    assert r.stdout == "written before the exit"
    assert mark.read_text() == "atexit ran"


def test_revert_sync_batchnorm_keeps_parameters():
    from cxr_fastai.model import ResNet9
    from cxr_fastai.train.distributed import revert_sync_batchnorm

    m = ResNet9(n_in=1, n_out=3, widths=TINY_WIDTHS)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    s = torch.nn.SyncBatchNorm.convert_sync_batchnorm(m)
    assert any(isinstance(x, torch.nn.SyncBatchNorm) for x in s.modules())
    back = revert_sync_batchnorm(s)
    assert not any(isinstance(x, torch.nn.SyncBatchNorm) for x in back.modules())
    assert back.state_dict().keys() == before.keys()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in before.items())


# ------------------------------------------------------------------------------------------- slow

@pytest.fixture(scope="module")
def two_and_one(synth, narrow_script, tmp_path_factory):
    """The same run (2 epochs, global batch 8, seed 0) in 2 processes and in 1; wall times."""
    base = tmp_path_factory.mktemp("dp")
    runs = base / "runs"
    runs.mkdir()
    r2, t2 = _run(_launch(narrow_script, "train", synth, "--run", runs / "two", "--epochs", "2", *RECIPE),
                  _env(), timeout=600)
    assert r2.returncode == 0, r2.stderr[-4000:]
    t0 = time.perf_counter()
    r1 = subprocess.run([sys.executable, str(narrow_script), "train", str(synth), "--run", str(base / "one"),
                         "--epochs", "2", *RECIPE], capture_output=True, text=True, env=_env(), timeout=600)
    t1 = time.perf_counter() - t0
    assert r1.returncode == 0, r1.stderr[-4000:]
    h2, h1 = pd.read_csv(runs / "two" / "history.csv"), pd.read_csv(base / "one" / "history.csv")
    print(f"\nwall time: 2 processes {t2:.1f} s, 1 process {t1:.1f} s; seconds per epoch {h2.seconds.tolist()} vs "
          f"{h1.seconds.tolist()}; valid_loss {h2.valid_loss.tolist()} vs {h1.valid_loss.tolist()}; accuracy "
          f"{h2.accuracy.tolist()} vs {h1.accuracy.tolist()} (load average {os.getloadavg()[0]:.1f})")
    return runs, runs / "two", base / "one", r2


@pytest.mark.slow
def test_two_processes_write_one_run_scored_once(two_and_one):
    runs, run, _, r2 = two_and_one
    assert sorted(p.name for p in runs.iterdir()) == ["two"]   # one run folder, written once
    assert r2.stdout.count("trained 48 images") == 1             # rank 0 reports, alone
    hist = pd.read_csv(run / "history.csv")
    assert hist.epoch.tolist() == [1, 2]
    meta = json.loads((run / "run.json").read_text())
    assert meta["finished"] and meta["epochs_done"] == 2 and (run / "learner.pkl").is_file()
    assert meta["data_parallel"] == {"processes": 2, "backend": "gloo", "global_bs": 8, "bs_per_process": 4}
    # every validation image scored once (15 images: the last batch of 7 was padded to 2 x 4, padding dropped)
    assert meta["valid_n"] == _valid_images(run) == 15
    assert meta["best"]["balanced_accuracy_score"] == pytest.approx(hist.balanced_accuracy_score.max())
    # the recorded figures are those of the saved model (rank 0's weights and BatchNorm statistics) over the
    # whole validation set, as one process computes them
    from cxr_fastai.train.fit import learner_from_run
    from cxr_fastai.train.runs import load_run

    learn = learner_from_run(load_run(run), device="cpu")
    with learn.no_bar():
        valid_loss, acc, bal = learn.validate()
    assert valid_loss == pytest.approx(meta["best"]["valid_loss"], abs=1e-5)
    assert acc == pytest.approx(meta["best"]["accuracy"], abs=1e-6)
    assert bal == pytest.approx(meta["best"]["balanced_accuracy_score"], abs=1e-6)
    # weights are the plain module's: no DDP `module.` prefix, loadable into ResNet9
    for name in ("best.pth", "last.pth"):
        sd = torch.load(run / "checkpoints" / name, map_location="cpu", weights_only=False)
        keys = (sd["model"] if "model" in sd else sd).keys()
        assert not any(k.startswith(("module.", "_orig_mod.")) for k in keys)
    assert (run / "checkpoints" / "last.pth").stat().st_size > 0


@pytest.mark.slow
def test_two_processes_land_near_the_one_process_run(two_and_one):
    """Same global batch, seed, order and crops: the only difference on the CPU is BatchNorm over each
    process's 4 images instead of 8 (no SyncBatchNorm on gloo)."""
    _, run, one, _ = two_and_one
    h2, h1 = pd.read_csv(run / "history.csv"), pd.read_csv(one / "history.csv")
    assert len(h1) == len(h2) == 2
    assert h2.valid_loss[0] == pytest.approx(h1.valid_loss[0], abs=0.02)  # measured: 0.0008
    last2, last1 = h2.iloc[-1], h1.iloc[-1]                               # measured: 0.016 apart
    assert last2.valid_loss == pytest.approx(last1.valid_loss, abs=0.1)
    assert last2.accuracy == pytest.approx(last1.accuracy, abs=0.2)
    assert json.loads((one / "run.json").read_text())["valid_n"] == 15


@pytest.mark.slow
def test_a_data_parallel_run_exports_and_predicts(two_and_one, synth, tmp_path):
    from cxr_fastai.artifact.export import export_run

    _, run, _, _ = two_and_one
    art = export_run(run, tmp_path / "art").folder
    images = sorted((synth / "test").rglob("*.png"))
    out = tmp_path / "pred.csv"
    r = cli("predict", art, *images, "--out", out, "--device", "cpu")
    assert r.exit_code == 0, r.output
    pred = pd.read_csv(out)
    assert len(pred) == len(images) and pred.error.isna().all()


@pytest.mark.slow
def test_a_crashing_process_ends_the_job_and_the_run_resumes_in_one(synth, narrow_script, tmp_path):
    run = tmp_path / "run"
    # process 1 dies (os._exit) at its 8th training batch: epoch 2 (6 batches per epoch), epoch 1 checkpointed
    env = _env(CXR_TEST_FAIL_RANK="1", CXR_TEST_FAIL_AT_BATCH="8", CXR_TEST_FAIL_HOW="exit")
    r, took = _run(_launch(narrow_script, "train", synth, "--run", run, "--epochs", "3", *RECIPE), env, timeout=180)
    assert r.returncode != 0
    assert took < 180
    assert "process 0 of 2: lost the other processes" in r.stderr or "terminated" in r.stderr, r.stderr[-3000:]
    meta = json.loads((run / "run.json").read_text())
    assert meta["epochs_done"] == 1 and not meta["finished"]
    assert len(pd.read_csv(run / "history.csv")) == 1 and (run / "checkpoints" / "last.pth").is_file()
    # the same run folder resumes in one process
    res = cli("train", "--resume", "--run", run, "--quiet")
    assert res.exit_code == 0, res.output
    assert pd.read_csv(run / "history.csv").epoch.tolist() == [1, 2, 3]
    meta = json.loads((run / "run.json").read_text())
    assert meta["finished"] and "data_parallel" not in meta and meta["valid_n"] == _valid_images(run)


@pytest.mark.slow
def test_procs_shortcut_trains_and_ctrl_c_stops_every_process(synth, tmp_path):
    """`cxr-fastai train --procs 2` (the real CLI, default widths at 16 px): one run, then Ctrl-C on a second
    run once its first epoch is saved stops the launcher and both processes with 130 and the resume hint."""
    run = tmp_path / "run"
    r, _ = _run([sys.executable, "-m", "cxr_fastai", "train", str(synth), "--run", str(run), "--epochs", "1",
                 "--procs", "2", *RECIPE], _env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    meta = json.loads((run / "run.json").read_text())
    assert meta["finished"] and meta["data_parallel"]["processes"] == 2 and meta["valid_n"] == 15

    run2 = tmp_path / "run2"
    proc = subprocess.Popen([sys.executable, "-m", "cxr_fastai", "train", str(synth), "--run", str(run2), "--epochs",
                             "40", "--procs", "2", *RECIPE], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env(), start_new_session=True)
    try:
        t0 = time.time()
        while time.time() - t0 < 240:
            try:
                if json.loads((run2 / "run.json").read_text()).get("epochs_done", 0) >= 1:
                    break
            except (FileNotFoundError, ValueError):
                pass
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends the foreground command
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted" in err and "--resume" in err
    meta = json.loads((run2 / "run.json").read_text())
    assert 1 <= meta["epochs_done"] < 40 and (run2 / "checkpoints" / "last.pth").is_file()
