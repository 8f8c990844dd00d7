"""The cached, device-resident data path agrees with fastai's PIL DataBlock path."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_image
from cxr_fastai.config import TrainConfig
from cxr_fastai.data.augment import TTA_SCALE, gaussian_blur, random_resized_crop, texture_jitter, tta_views
from cxr_fastai.data.discover import check_trainable, discover, scan
from cxr_fastai.data.loaders import build_cache, build_cached_dls, build_dls, cache_side_for


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    from cxr_fastai.synth import make_synthetic_dataset

    root = make_synthetic_dataset(tmp_path_factory.mktemp("fp") / "data", {"train": 10, "valid": 6, "test": 0},
                                  size=48, seed=3)
    ds = discover(root)
    classes = check_trainable(ds)
    items, _, stats = scan(ds, ("train", "valid"), 32, 10_000, 0)
    return root, items, classes, stats


def _side(stats) -> int:
    return cache_side_for(32, stats.side)


def _pixels(x, stats) -> torch.Tensor:
    """A normalised batch back in pixel units (0..1)."""
    return torch.as_tensor(x).float() * stats.std + stats.mean


def assert_same_validation(pil, fast, stats) -> None:
    """Every validation batch of the two paths: the same labels in the same order, pixels within 1/255."""
    n = 0
    for (xp, yp), (xf, yf) in zip(pil.valid.new(shuffle=False), fast.valid.new(shuffle=False), strict=True):
        assert xf.dtype == xp.dtype == torch.float32 and xf.shape == xp.shape
        assert torch.equal(torch.as_tensor(yf), torch.as_tensor(yp).long())
        diff = (_pixels(xf, stats) - _pixels(xp, stats)).abs().max().item()
        assert diff <= 1 / 255 + 1e-6, diff
        n += len(yf)
    assert n == len(pil.valid_ds) == len(fast.valid_ds)


def test_cached_validation_batch_matches_the_pil_path(small):
    root, items, classes, stats = small
    cfg = TrainConfig(size=32, bs=8)
    pil = build_dls(items, classes, stats, cfg.replace(data_path="pil"), "cpu")
    fast = build_cached_dls(items, classes, stats, cfg, "cpu", _side(stats))
    xf, _ = fast.valid.one_batch()
    assert xf.shape == (8, 1, 32, 32)
    assert_same_validation(pil, fast, stats)
    assert list(fast.vocab) == list(pil.vocab) == classes == sorted(classes)
    assert len(fast.train) == len(pil.train) == len(items[items.split == "train"]) // 8
    # build_dls takes the cached path unless told otherwise
    assert type(build_dls(items, classes, stats, cfg, "cpu", side=_side(stats)).train) is type(fast.train)


def test_training_batches_are_augmented_normalised_and_reproducible(small):
    root, items, classes, stats = small
    cfg = TrainConfig(size=32, bs=6, seed=5)
    a = build_cached_dls(items, classes, stats, cfg, "cpu", _side(stats))
    b = build_cached_dls(items, classes, stats, cfg, "cpu", _side(stats))
    xa, ya = next(iter(a.train))
    xb, yb = next(iter(b.train))
    assert xa.shape == (6, 1, 32, 32) and torch.equal(xa, xb) and torch.equal(ya, yb)
    a.train.set_epoch(1)  # the next epoch (EpochSeed sets it in training): another order and other crops
    xa2, _ = next(iter(a.train))
    assert not torch.equal(xa, xa2)
    other = build_cached_dls(items, classes, stats, cfg.replace(seed=6), "cpu", _side(stats))
    assert not torch.equal(xa, next(iter(other.train))[0])  # another seed, other batches
    assert abs(xa.mean().item()) < 1.5 and 0.3 < xa.std().item() < 3


def test_random_resized_crop_with_full_scale_and_square_ratio_is_a_plain_resize():
    x = torch.arange(64 * 64, dtype=torch.float32).reshape(1, 1, 64, 64)
    u = torch.rand((1, 4), generator=torch.Generator().manual_seed(0))
    y = random_resized_crop(x, 64, min_scale=1.0, u=u, ratio=(1.0, 1.0))
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
    c1 = build_cache(it, classes, 32, 48, cache_dir=cache_dir)
    c1b = build_cache(it, classes, 32, 48, cache_dir=cache_dir)
    assert c1b.key == c1.key and torch.equal(c1b.x_valid, c1.x_valid)
    first_valid = it[it.split == "valid"].path.iloc[0]
    from PIL import Image

    Image.fromarray(np.full((48, 48), 255, np.uint8)).save(first_valid)
    c2 = build_cache(it, classes, 32, 48, cache_dir=cache_dir)
    assert c2.key != c1.key
    assert int(c2.x_valid[0].min()) == 255 and not torch.equal(c2.x_valid[0], c1.x_valid[0])
    assert len(list(cache_dir.glob("cache-*.pt"))) == 2


# ------------------------------------------------- the cached path feeds what fastai's PIL path feeds
# (these replace training several CLI models on each path and comparing their accuracies)

def _both_paths(root: Path, cfg: TrainConfig):
    ds = discover(root)
    classes = check_trainable(ds)
    items, _, stats = scan(ds, ("train", "valid"), cfg.size, 10_000, 0)
    pil = build_dls(items, classes, stats, cfg.replace(data_path="pil"), "cpu")
    fast = build_cached_dls(items, classes, stats, cfg, "cpu", cache_side_for(cfg.size, stats.side))
    return items, classes, stats, pil, fast


def _epoch(dl, epoch: int):
    """All (x, y) of one pass, in pixel units."""
    if hasattr(dl, "set_epoch"):
        dl.set_epoch(epoch)
    xs, ys = zip(*[(torch.as_tensor(x).float(), torch.as_tensor(y).long()) for x, y in dl])
    return torch.cat(xs), torch.cat(ys)


@pytest.mark.realdata
def test_cached_and_pil_validation_agree_on_real_jpegs(cxr3_slice):
    """Real 128 px JPEGs (60 train, 20 valid per class): every validation image within 1/255 on both paths,
    the same labels in the same order, in training too."""
    items, classes, stats, pil, fast = _both_paths(cxr3_slice, TrainConfig(size=32, bs=36))
    assert stats.side == 128 and fast.train.cache[0].shape[-1] == 64  # crops come from a 2x cache
    assert_same_validation(pil, fast, stats)
    train = items[items.split == "train"].reset_index(drop=True)
    for dls in (pil, fast):
        _, y = _epoch(dls.train.new(shuffle=False), 0)
        assert y.tolist() == [classes.index(lab) for lab in train.label[:len(y)]]


def test_every_training_crop_comes_from_its_own_image_on_both_paths(tmp_path):
    """Each training image a flat grey of its own: any crop of it is that grey, so a crop names its image.
    In order and shuffled, on both paths, crop k is cut from the image (and carries the label) that the
    items put at k."""
    root = tmp_path / "flat"
    levels = {}
    for split, n in (("train", 12), ("valid", 2)):
        for ci, c in enumerate(("A", "B", "C")):
            for i in range(n):
                v = 30 + 6 * (ci * 12 + i) + (2 if split == "valid" else 0)
                levels[str(write_image(root / split / c / f"{i}.png", v, size=40).resolve())] = (v, c)
    items, classes, stats, pil, fast = _both_paths(root, TrainConfig(size=16, bs=6))
    train = items[items.split == "train"].reset_index(drop=True)
    want = torch.tensor([levels[str(Path(p).resolve())][0] for p in train.path], dtype=torch.float32) / 255
    by_level = {levels[k][0]: classes.index(levels[k][1]) for k in levels}
    for name, dls in (("pil", pil), ("cached", fast)):
        x, y = _epoch(dls.train.new(shuffle=False), 0)
        px = _pixels(x, stats)
        assert (px.amax((1, 2, 3)) - px.amin((1, 2, 3))).max() < 1e-4, name  # flat crops
        assert (px[:, 0, 0, 0] - want[:len(px)]).abs().max() <= 1 / 255, name
        x, y = _epoch(dls.train, 2)                                          # shuffled: x and y move together
        got = (_pixels(x, stats)[:, 0, 0, 0] * 255).round().int().tolist()
        assert [by_level[v] for v in got] == y.tolist(), name
        assert len(set(got)) == len(got) == 36, name                         # each image once per epoch


def test_training_crops_cover_the_same_scales_on_both_paths(tmp_path):
    """Horizontal and vertical grey ramps: a crop's range of grey is the share of the image's width (or
    height) it kept. Over 8 epochs, both paths crop from the whole range min_scale allows, and alike on
    average (measured: mean share of the width 0.85 PIL, 0.88 cached, whose crops clamp at the image's
    border where fastai's redraw)."""
    root = tmp_path / "ramps"
    ramp = np.tile(np.round(np.arange(64) * 255 / 63).astype(np.uint8), (64, 1))
    for split, n in (("train", 30), ("valid", 2)):
        for c, img in (("H", ramp), ("V", np.ascontiguousarray(ramp.T))):
            for i in range(n):
                write_image(root / split / c / f"{i}.png", img)
    from fastai.torch_core import set_seed

    cfg = TrainConfig(size=32, bs=20)
    _, classes, stats, pil, fast = _both_paths(root, cfg)
    set_seed(0)  # fastai's per-item crops draw from Python's global random
    mean_span = {}
    for name, dls in (("pil", pil), ("cached", fast)):
        spans = {0: [], 1: []}
        for ep in range(8):
            x, y = _epoch(dls.train, ep)
            px = _pixels(x, stats)
            for xi, yi in zip(px, y.tolist()):
                spans[yi].append((xi.max() - xi.min()).item())
        w, h = np.array(spans[classes.index("H")]), np.array(spans[classes.index("V")])
        assert len(w) == len(h) == 8 * 30
        for s in (w, h):
            assert s.min() < 0.8 and s.max() > 0.95 and s.min() > np.sqrt(cfg.min_scale * 0.75) - 0.05, name
        mean_span[name] = (w.mean(), h.mean())
    for a, b in zip(mean_span["pil"], mean_span["cached"]):
        assert abs(a - b) < 0.05, mean_span


def test_gaussian_blur_per_image_sigma():
    g = torch.Generator().manual_seed(0)
    x = torch.rand((3, 1, 24, 24), generator=g)
    y = gaussian_blur(x, torch.tensor([0.0, 0.5, 1.0]))
    assert torch.equal(y[0], x[0])                                    # sigma 0: the image itself
    assert y[1].std() < x[1].std() and y[2].std() < y[1].std()        # more sigma, smoother
    assert torch.allclose(y.mean((1, 2, 3)), x.mean((1, 2, 3)), atol=0.02)   # brightness kept
    flat = torch.full((1, 1, 8, 8), 0.3)
    assert torch.allclose(gaussian_blur(flat, torch.tensor([1.0])), flat)


def test_texture_jitter_draws_each_part_per_image():
    g = torch.Generator().manual_seed(1)
    x = torch.rand((4, 1, 16, 16), generator=g)
    z = torch.randn(x.shape, generator=g)
    off = torch.ones((4, 6)) * 0.99                   # u >= p: nothing applied
    assert torch.equal(texture_jitter(x, off, z), x)
    u = off.clone()
    u[1, 0], u[1, 3] = 0.0, 1.0                       # image 1: gamma on, at its maximum (1.5)
    u[2, 1], u[2, 4] = 0.0, 1.0                       # image 2: blur on, sigma 1
    u[3, 2], u[3, 5] = 0.0, 1.0                       # image 3: noise on, std 0.04
    y = texture_jitter(x, u, z)
    assert torch.equal(y[0], x[0])
    assert torch.allclose(y[1], x[1] ** 1.5, atol=1e-6)
    assert torch.allclose(y[2], gaussian_blur(x[2:3], torch.tensor([1.0]))[0])
    assert torch.allclose(y[3], (x[3] + 0.04 * z[3]).clamp(0, 1))
    assert y.min() >= 0 and y.max() <= 1


def test_texture_augment_is_seeded_train_only_and_sharded_like_one_process(small):
    from fastai.vision.core import TensorImage

    from cxr_fastai.data.cached_dl import RandomResizedCropBatch, TextureJitterBatch
    from cxr_fastai.data.loaders import augmentations

    assert isinstance(augmentations("texture")[-1], TextureJitterBatch) and augmentations("none") == []
    with pytest.raises(ValueError, match="texture"):
        augmentations("heavy")
    x = TensorImage(torch.rand((4, 1, 16, 16), generator=torch.Generator().manual_seed(2)))
    one, rank1 = TextureJitterBatch(p=1.0), TextureJitterBatch(p=1.0)
    one.reseed(7), rank1.reseed(7)
    rank1.shard = (1, 2)
    full = one(x, split_idx=0)
    assert not torch.equal(full, x)
    assert torch.equal(rank1(x[2:], split_idx=0), full[2:])    # rank 1 of 2 gets rows 2-3 of the global batch
    again = TextureJitterBatch(p=1.0)
    again.reseed(7)
    assert torch.equal(again(x, split_idx=0), full)             # same seed, same draws
    assert torch.equal(one(x, split_idx=1), x)                  # validation: untouched
    crop, jitter = RandomResizedCropBatch(16, 0.5), TextureJitterBatch()
    crop.reseed(7), jitter.reseed(7)    # one loader reseeds both with the epoch's seed: different streams
    assert not torch.equal(crop._draw(torch.rand, (4, 6), "cpu"), jitter._draw(torch.rand, (4, 6), "cpu"))

    root, items, classes, stats = small
    cfg = TrainConfig(size=32, bs=6, seed=5, augment="texture")
    a = build_cached_dls(items, classes, stats, cfg, "cpu", _side(stats))
    b = build_cached_dls(items, classes, stats, cfg, "cpu", _side(stats))
    plain = build_cached_dls(items, classes, stats, cfg.replace(augment="none"), "cpu", _side(stats))


    def first_batch(dls):
        torch.manual_seed(0)     # light's fastai transforms draw from torch's global generator (EpochSeed seeds it)
        return next(iter(dls.train))[0]

    xa, xb, xp = first_batch(a), first_batch(b), first_batch(plain)
    assert torch.equal(xa, xb) and not torch.equal(xa, xp)
