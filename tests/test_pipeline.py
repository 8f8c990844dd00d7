"""The default training path is fastai's own pipeline, with the documented recipe, and a resumed run is
the run that would have happened. One tiny synthetic run (16 px, narrow ResNet9) serves the module."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import interrupted_after_first_epoch
from cxr_fastai.config import ADAM, ONE_CYCLE, TrainConfig

WIDTHS = (8, 16, 16, 32)


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    from cxr_fastai.synth import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("pipe") / "data", n_per_class=30, size=48, seed=0)


def tiny_cfg(root: Path, run: Path, **kw) -> TrainConfig:
    return TrainConfig(data=str(root), run=str(run), size=16, bs=16, widths=WIDTHS, **{"epochs": 2, **kw})


@pytest.fixture(scope="module")
def tiny_run(synth_root, tmp_path_factory) -> Path:
    from cxr_fastai.train.fit import train

    run = tmp_path_factory.mktemp("pipe_run") / "run"
    train(tiny_cfg(synth_root, run))
    return run


@pytest.fixture(scope="module")
def tiny_learn(tiny_run):
    from cxr_fastai.train.fit import learner_from_run
    from cxr_fastai.train.runs import load_run

    return learner_from_run(load_run(tiny_run), "cpu")


def test_default_loaders_are_fastai_tfmddls_with_fastai_normalize(tiny_learn):
    from fastai.data.core import TfmdDL
    from fastai.data.transforms import IntToFloatTensor, Normalize

    from cxr_fastai.data.cached_dl import CachedDL, RandomResizedCropBatch

    for dl in (tiny_learn.dls.train, tiny_learn.dls.valid):
        assert isinstance(dl, TfmdDL) and isinstance(dl, CachedDL) and dl.cache is not None
        kinds = [type(t) for t in dl.after_batch.fs]
        assert kinds == [IntToFloatTensor, RandomResizedCropBatch, Normalize]
    x, y = tiny_learn.dls.train.one_batch()
    assert x.shape == (16, 1, 16, 16) and x.dtype == torch.float32
    assert type(x)._show_args["cmap"] == "gray"  # shown as read, not with fastai's inverted 'Greys' for BW
    assert abs(float(x.mean())) < 1.5  # normalised with the training stats, not raw [0, 1] pixels
    xv, _ = tiny_learn.dls.valid.one_batch()
    assert xv.shape[-1] == 16


def test_show_batch_saves_a_figure_on_the_default_path(tiny_learn, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tiny_learn.dls.show_batch(max_n=4)
    out = tmp_path / "batch.png"
    plt.gcf().savefig(out)
    plt.close("all")
    assert out.stat().st_size > 2000
    # decode_batch undoes Normalize and IntToFloatTensor: pixels back in 0..255 with their labels
    decoded = tiny_learn.dls.valid.decode_batch(tiny_learn.dls.valid.one_batch(), max_n=3)
    img, label = decoded[0]
    assert 0 <= int(img.min()) and int(img.max()) <= 255 and str(label) in tiny_learn.dls.vocab


def test_learner_pkl_is_the_training_loaders_emptied_with_fastai_adam_hypers(tiny_run):
    from fastai.learner import load_learner

    from cxr_fastai.data.cached_dl import CachedDL, RandomResizedCropBatch

    learn = load_learner(tiny_run / "learner.pkl", cpu=True)
    assert isinstance(learn.dls.train, CachedDL) and learn.dls.train.cache is None  # no images pickled
    assert any(isinstance(t, RandomResizedCropBatch) for t in learn.dls.train.after_batch.fs)
    learn.create_opt()
    for h in learn.opt.hypers:
        assert h["mom"] == pytest.approx(0.9) and h["sqr_mom"] == pytest.approx(0.99)
        assert h["eps"] == pytest.approx(1e-5)
    # the exported pipeline predicts files through fastai's test_dl: the same as the cached valid batches
    run_items = pd.read_csv(tiny_run / "items.csv")
    valid = run_items[run_items.split == "valid"].path.tolist()
    dl = learn.dls.test_dl(pd.DataFrame({"path": valid}))
    x_files = torch.cat([b[0] for b in dl])
    from cxr_fastai.train.fit import learner_from_run
    from cxr_fastai.train.runs import load_run

    cached = learner_from_run(load_run(tiny_run), "cpu").dls.valid
    x_cache = torch.cat([b[0] for b in cached.new(shuffle=False, drop_last=False)])
    from fastai.data.transforms import Normalize

    std = float([t for t in cached.after_batch.fs if isinstance(t, Normalize)][0].std.flatten()[0])
    assert (x_files - x_cache).abs().max().item() * std <= 1 / 255 + 1e-6


@pytest.mark.parametrize("kind", ["adamw", "fastai"])
def test_both_optimizers_run_fastais_adam_hypers_with_no_decay_on_bn_and_bias(tiny_learn, kind):
    from cxr_fastai.train.fit import group_wd, make_learner

    cfg = TrainConfig(size=16, widths=WIDTHS, opt=kind, wd=3e-4)
    learn = make_learner(cfg, tiny_learn.dls, 3)
    learn.create_opt()
    learn.opt.set_hypers(wd=group_wd(cfg))  # what fit() does with the learner's per-group wd
    decay, no_decay = learn.opt.param_lists
    assert all(p.ndim > 1 for p in decay) and all(p.ndim == 1 for p in no_decay)
    assert [h["wd"] for h in learn.opt.hypers] == [pytest.approx(3e-4), 0.0]
    for h in learn.opt.hypers:
        assert (h["mom"], h["sqr_mom"], h["eps"]) == (ADAM["mom"], ADAM["sqr_mom"], ADAM["eps"])


def test_bench_plain_loop_uses_exactly_the_training_recipe(tiny_learn):
    """Read from the live optimizers: same groups, betas, eps and weight decay; same one-cycle schedule."""
    from fastai.callback.schedule import combined_cos

    from cxr_fastai.bench import BenchConfig, one_cycle_at, plain_optimizer
    from cxr_fastai.model import ResNet9
    from cxr_fastai.train.fit import group_wd, make_learner

    bcfg = BenchConfig()
    tcfg = TrainConfig(size=16, widths=WIDTHS, lr=bcfg.lr, wd=bcfg.wd)
    learn = make_learner(tcfg, tiny_learn.dls, 3)
    learn.create_opt()
    learn.opt.set_hypers(wd=group_wd(tcfg))
    fastai_groups = learn.opt.opt.param_groups  # the torch AdamW inside fastai's OptimWrapper
    plain = plain_optimizer(ResNet9(1, 3, WIDTHS), bcfg, cuda=False)
    assert len(fastai_groups) == len(plain.param_groups) == 2
    for a, b in zip(fastai_groups, plain.param_groups):
        assert [p.shape for p in a["params"]] == [p.shape for p in b["params"]]
        assert a["betas"] == b["betas"] and a["eps"] == b["eps"]
        assert a["weight_decay"] == pytest.approx(b["weight_decay"])
    lr = combined_cos(ONE_CYCLE["pct_start"], bcfg.lr / ONE_CYCLE["div"], bcfg.lr, bcfg.lr / ONE_CYCLE["div_final"])
    mom = combined_cos(ONE_CYCLE["pct_start"], *ONE_CYCLE["moms"])
    for pos in (0.0, 0.1, 0.25, 0.5, 0.9, 0.999):
        got_lr, got_mom = one_cycle_at(pos, bcfg.lr)
        assert got_lr == pytest.approx(float(lr(pos)), rel=1e-6) and got_mom == pytest.approx(float(mom(pos)), rel=1e-6)


def test_bench_plain_loop_trains_on_a_five_step_epoch():
    """torch's OneCycleLR divided by zero on very short runs; the plain loop's own schedule does not."""
    from types import SimpleNamespace

    from cxr_fastai.bench import BenchConfig, plain_loop
    from cxr_fastai.data.discover import PixelStats

    g = torch.Generator().manual_seed(0)
    cache = SimpleNamespace(x_train=torch.randint(0, 256, (5 * 8, 1, 32, 32), generator=g, dtype=torch.uint8),
                            y_train=torch.arange(40) % 3)
    vx, vy = cache.x_train[:8, :, :16, :16], cache.y_train[:8]
    r = plain_loop(cache, PixelStats(0.5, 0.25), BenchConfig(size=16, bs=8), torch.device("cpu"), 1, 0.0, 0.99, vx, vy)
    assert r["img_s"] > 0 and len(r["valid_acc"]) == 1


def test_an_epochs_batches_depend_on_seed_and_epoch_only(tiny_learn):
    dl = tiny_learn.dls.train

    def first_batch(epoch):
        dl.set_epoch(epoch)
        return next(iter(dl))

    a = first_batch(3)
    first_batch(0)                       # another epoch in between changes nothing
    b = first_batch(3)
    c = first_batch(4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_an_interrupted_and_resumed_run_ends_with_the_same_weights(synth_root, tmp_path, monkeypatch):
    """KeyboardInterrupt right after epoch 1's checkpoint (what Ctrl-C raises), then --resume: bit-identical on
    CPU. Raised directly: a signal raised in the pytest process once went unanswered in a full CI run (not
    reproduced since); the real Ctrl-C of a real process is tests/test_resume.py's."""
    from cxr_fastai.train.fit import train

    train(tiny_cfg(synth_root, tmp_path / "full", epochs=3))
    with interrupted_after_first_epoch(monkeypatch):
        train(tiny_cfg(synth_root, tmp_path / "part", epochs=3))
    assert pd.read_csv(tmp_path / "part" / "history.csv").epoch.tolist() == [1]
    train(TrainConfig(run=str(tmp_path / "part")), resume=True)
    full = torch.load(tmp_path / "full" / "checkpoints" / "last.pth", weights_only=False)["model"]
    part = torch.load(tmp_path / "part" / "checkpoints" / "last.pth", weights_only=False)["model"]
    assert full.keys() == part.keys()
    assert max((full[k].float() - part[k].float()).abs().max().item() for k in full) <= 1e-5
    h_full = pd.read_csv(tmp_path / "full" / "history.csv")
    h_part = pd.read_csv(tmp_path / "part" / "history.csv")
    assert np.allclose(h_full.valid_loss, h_part.valid_loss, atol=1e-6)


def test_training_crops_are_antialiased_like_pils_resize(cxr3_root):
    """A crop of the 2x cache resized to the input size is closer to PIL's resize of the same region than
    plain bilinear grid_sample is (measured: 1.07 vs 1.66 grey levels on 20 cxr3 images)."""
    import torch.nn.functional as F
    from PIL import Image

    from cxr_fastai.data.augment import crop_resize
    from cxr_fastai.io.images import read_grey, squash

    files = sorted(cxr3_root.glob("train/*/*.jpg"))[::1000][:8]
    ours, plain = [], []
    for f in files:
        big = squash(read_grey(f), 64)
        x = torch.from_numpy(big.copy()).float()[None, None]
        for w in (0.775, 0.85, 0.93):
            lo, hi = 64 * (1 - w) / 2, 64 * (1 + w) / 2
            ref = np.asarray(Image.fromarray(big).resize((32, 32), Image.BILINEAR, box=(lo, lo, hi, hi)), np.float32)
            t = torch.tensor([w])
            ours.append(np.abs(crop_resize(x, 32, t, t, t * 0, t * 0)[0, 0].numpy() - ref).mean())
            theta = torch.tensor([[[w, 0.0, 0.0], [0.0, w, 0.0]]])
            grid = F.affine_grid(theta, [1, 1, 32, 32], align_corners=False)
            pl = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)[0, 0].numpy()
            plain.append(np.abs(pl - ref).mean())
    assert np.mean(ours) < 0.8 * np.mean(plain)


def test_cache_side_comes_from_the_data_and_reaches_the_manifest(tiny_run, tmp_path):
    import json

    from cxr_fastai.artifact.export import export_run, read_manifest

    meta = json.loads((tiny_run / "run.json").read_text())
    assert meta["stats"]["side"] == 48              # the synthetic images are 48 px
    assert meta["cache_side"] == 32                 # median side 48, capped at 2 x 16
    art = export_run(tiny_run, to=tmp_path / "art")
    assert read_manifest(art.folder).cache_side == 32
    from cxr_fastai.data.loaders import cache_side_for

    assert cache_side_for(16, 20) == 20 and cache_side_for(16, 8) == 16 and cache_side_for(128, 1024) == 256
    assert math.isclose(art.manifest["normalization"]["mean"], meta["stats"]["mean"])
