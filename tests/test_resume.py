"""Nothing lost: an interrupted training keeps its best model and resumes where it stopped.

The training runs in a fresh process (the CLI's `main`, as `python -m cxr_fastai train` runs it, with a narrow
ResNet9: the CLI has no option for the widths) and gets a real SIGINT (Ctrl-C) or SIGTERM (`kill`) once its
first epoch is checkpointed; the resume and what follows run in-process. That a resumed run ends with the
uninterrupted run's weights is tests/test_pipeline.py's."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO, TINY_WIDTHS, cli

NARROW_CLI = ("import functools\n"
              "from cxr_fastai import cli\n"
              f"cli.TrainConfig = functools.partial(cli.TrainConfig, widths={TINY_WIDTHS!r})\n"
              "cli.main()\n")


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    from cxr_fastai.synth import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("synth") / "data", {"train": 16, "valid": 4, "test": 0},
                                  size=32, seed=1)


def _start_train(data: Path, run: Path, epochs: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", NARROW_CLI, "train", str(data), "--run", str(run), "--size", "16",
                             "--epochs", str(epochs), "--bs", "8", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})


def _wait_for_epochs(run: Path, n: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            if json.loads((run / "run.json").read_text()).get("epochs_done", 0) >= n:
                return
        except (FileNotFoundError, ValueError):
            pass
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("training did not reach the epoch in time")


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_run_keeps_best_model_and_resumes_to_the_same_number_of_epochs(synth, tmp_path, sig, code):
    run = tmp_path / "run"
    epochs = 12  # 6 batches each: a signal sent once epoch 1 is saved lands well before the run could end
    proc = _start_train(synth, run, epochs)
    _wait_for_epochs(run, 1, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "--resume" in err and "Traceback" not in err
    done = json.loads((run / "run.json").read_text())["epochs_done"]
    assert 1 <= done < epochs
    assert (run / "checkpoints" / "best.pth").is_file() and (run / "checkpoints" / "last.pth").is_file()
    assert len(pd.read_csv(run / "history.csv")) == done

    r = cli("train", "--resume", "--run", run, "--quiet")
    assert r.exit_code == 0, (r.output, r.exception)
    hist = pd.read_csv(run / "history.csv")
    assert hist.epoch.tolist() == list(range(1, epochs + 1))
    meta = json.loads((run / "run.json").read_text())
    assert meta["finished"] and meta["epochs_done"] == epochs and (run / "learner.pkl").is_file()
    assert meta["best"]["balanced_accuracy_score"] == pytest.approx(hist.balanced_accuracy_score.max())
    assert json.loads((run / "config.json").read_text())["widths"] == list(TINY_WIDTHS)
    # a finished run has nothing left to resume
    again = cli("train", "--resume", "--run", run)
    assert again.exit_code == 1 and "already finished" in again.stderr
