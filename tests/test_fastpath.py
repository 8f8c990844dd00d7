"""The cached, device-resident data path agrees with fastai's PIL DataBlock path."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import make_slice, run_cli
from cxr_fastai.config import TrainConfig
from cxr_fastai.data.loaders import build_dls
from cxr_fastai.data.discover import check_trainable, discover, scan
from cxr_fastai.data.augment import TTA_SCALE, random_resized_crop, tta_views
from cxr_fastai.data.loaders import build_cache, build_cached_dls


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    from cxr_fastai.synth import make_synthetic_dataset

    root = make_synthetic_dataset(tmp_path_factory.mktemp("fp") / "data", {"train": 10, "valid": 6, "test": 0},
                                  size=48, seed=3)
    ds = discover(root)
    classes = check_trainable(ds)
    items, _, stats = scan(ds, ("train", "valid"), 32, 10_000, 0)
    return root, items, classes, stats


def test_cached_validation_batch_matches_the_pil_path(small):
    root, items, classes, stats = small
    cfg = TrainConfig(size=32, bs=8)
    pil = build_dls(items, classes, stats, cfg, "cpu")
    fast = build_cached_dls(items, classes, stats, cfg, "cpu")
    xp, yp = pil.valid.one_batch()
    xf, yf = fast.valid.one_batch()
    assert xf.dtype == xp.dtype == torch.float32 and xf.shape == xp.shape == (8, 1, 32, 32)
    assert torch.equal(torch.as_tensor(yf), torch.as_tensor(yp).long())
    # compare in pixel units: within 1/255 after undoing the normalisation
    diff = (torch.as_tensor(xf) - torch.as_tensor(xp)).abs().max().item() * stats.std
    assert diff <= 1 / 255 + 1e-6
    assert list(fast.vocab) == list(pil.vocab) == classes == sorted(classes)
    assert fast.train.stats == stats and len(fast.train) == len(items[items.split == "train"]) // 8


def test_training_batches_are_augmented_normalised_and_reproducible(small):
    root, items, classes, stats = small
    cfg = TrainConfig(size=32, bs=6, seed=5)
    a = build_cached_dls(items, classes, stats, cfg, "cpu")
    b = build_cached_dls(items, classes, stats, cfg, "cpu")
    xa, ya = next(iter(a.train))
    xb, yb = next(iter(b.train))
    assert xa.shape == (6, 1, 32, 32) and torch.equal(xa, xb) and torch.equal(ya, yb)
    xa2, _ = next(iter(a.train))  # the next epoch: another order and other crops
    assert not torch.equal(xa, xa2)
    assert abs(xa.mean().item()) < 1.5 and 0.3 < xa.std().item() < 3


def test_random_resized_crop_with_full_scale_and_square_ratio_is_a_plain_resize():
    x = torch.arange(64 * 64, dtype=torch.float32).reshape(1, 1, 64, 64)
    g = torch.Generator().manual_seed(0)
    y = random_resized_crop(x, 64, min_scale=1.0, gen=g, ratio=(1.0, 1.0))
    assert torch.allclose(y, x, atol=1e-3)


def test_tta_views_are_the_image_and_five_fixed_crops_of_its_larger_copy():
    large = torch.arange(2 * 80 * 80, dtype=torch.float32).reshape(2, 1, 80, 80)
    x = torch.nn.functional.interpolate(large, size=(40, 40), mode="bilinear", antialias=True)
    views = tta_views(x, large)
    assert len(views) == 6 and all(v.shape == x.shape for v in views)
    assert views[0] is x
    # the centre crop: the middle TTA_SCALE of the image, zoomed in (a narrower range, the same centre)
    centre = views[1]
    for b in range(2):
        assert centre[b].min() > large[b].min() and centre[b].max() < large[b].max()
        assert torch.allclose(centre[b].mean(), large[b].mean(), rtol=1e-3)
    # each corner crop keeps its own corner: top-left holds the smallest values, bottom-right the largest
    tl, tr, bl, br = views[2:]
    assert tl.mean() < tr.mean() < bl.mean() < br.mean()
    assert abs(tl[0, 0, 0, 0] - large[0, 0, 0, 0]) < 2 * 81   # within about a source pixel of the corner
    assert abs(br[0, 0, -1, -1] - large[0, 0, -1, -1]) < 2 * 81
    span = (1 - TTA_SCALE) * 80  # the crop leaves out this many source pixels on one side
    assert abs((br[0].mean() - tl[0].mean()) - span * 81) < 0.05 * span * 81
    # computed per image: image 1's views do not depend on image 0
    for a, b in zip(views, tta_views(x[1:], large[1:])):
        assert torch.allclose(a[1:], b)


def test_a_changed_file_is_decoded_again_not_served_from_the_cache(small, tmp_path):
    root, items, classes, stats = small
    data = tmp_path / "data"
    shutil.copytree(root, data)
    it = items.copy()
    it["path"] = [str(data / Path(p).relative_to(root)) for p in it.path]
    cache_dir = tmp_path / "cache"
    c1 = build_cache(it, classes, 32, cache_dir=cache_dir)
    c1b = build_cache(it, classes, 32, cache_dir=cache_dir)
    assert c1b.key == c1.key and torch.equal(c1b.x_valid, c1.x_valid)
    first_valid = it[it.split == "valid"].path.iloc[0]
    from PIL import Image

    Image.fromarray(np.full((48, 48), 255, np.uint8)).save(first_valid)
    c2 = build_cache(it, classes, 32, cache_dir=cache_dir)
    assert c2.key != c1.key
    assert int(c2.x_valid[0].min()) == 255 and not torch.equal(c2.x_valid[0], c1.x_valid[0])
    assert len(list(cache_dir.glob("cache-*.pt"))) == 2


@pytest.mark.slow
@pytest.mark.realdata
def test_cached_path_learns_as_well_as_the_pil_path(cxr3_root, tmp_path):
    """3 epochs on 2,000 real images at 32 px: final accuracies (900 validation images, mean of 2 seeds)
    within 3 points."""
    data = make_slice(cxr3_root, tmp_path / "data", {"train": 667, "valid": 300, "test": 0}, seed=1)
    acc = {}
    for path in ("cached", "pil"):
        finals = []
        for seed in (0, 1):  # the mean of two seeds: one 3-epoch run alone swings by a few points
            run = tmp_path / f"{path}-{seed}"
            # a moderate peak lr: the one-cycle run ends settled, so the last epoch is not a lucky swing
            r = run_cli("train", data, "--run", run, "--size", 32, "--epochs", 3, "--bs", 64, "--lr", "1e-3",
                        "--seed", seed, "--data-path", path, "--quiet")
            assert r.returncode == 0, r.stderr
            finals.append(float(pd.read_csv(run / "history.csv").accuracy.iloc[-1]))
        acc[path] = sum(finals) / len(finals)
    assert acc["cached"] > 0.6 and acc["pil"] > 0.6, acc
    assert abs(acc["cached"] - acc["pil"]) <= 0.03, acc
