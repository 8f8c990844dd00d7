"""Nothing lost: an interrupted training keeps its best model and resumes where it stopped."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO, run_cli


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    from cxr_fastai.synth import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("synth") / "data", {"train": 40, "valid": 12, "test": 0},
                                  size=32, seed=1)


def _start_train(data: Path, run: Path, epochs: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cxr_fastai", "train", str(data), "--run", str(run), "--size", "32",
                             "--epochs", str(epochs), "--bs", "16", "--quiet"],
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
        time.sleep(0.2)
    raise AssertionError("training did not reach the epoch in time")


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_run_keeps_best_model_and_resumes_to_the_same_number_of_epochs(synth, tmp_path, sig, code):
    run = tmp_path / "run"
    epochs = 6
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

    r = run_cli("train", "--resume", "--run", run, "--quiet")
    assert r.returncode == 0, r.stderr
    hist = pd.read_csv(run / "history.csv")
    assert hist.epoch.tolist() == list(range(1, epochs + 1))
    meta = json.loads((run / "run.json").read_text())
    assert meta["finished"] and meta["epochs_done"] == epochs and (run / "learner.pkl").is_file()
    assert meta["best"]["balanced_accuracy_score"] == pytest.approx(hist.balanced_accuracy_score.max())
    # a finished run has nothing left to resume
    again = run_cli("train", "--resume", "--run", run)
    assert again.returncode == 1 and "already finished" in again.stderr
