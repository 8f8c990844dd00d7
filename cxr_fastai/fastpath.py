"""The cached, device-resident data path behind the same recipe as the DataBlock.

Each image is decoded once into a uint8 tensor cache: training images at `train_side` (room for crops),
validation images squashed to exactly size x size with the same PIL resize as the DataBlock path (so
the two paths give the same validation batches). Batches are cut from the cache on the training
device; a RandomResizedCrop equivalent and Normalize run per batch there. fastai's Learner drives it
through `CachedDL`, which speaks enough of fastai's DataLoader protocol for fit, validate and get_preds.
"""
from __future__ import annotations

import copy
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pandas as pd

from .config import TrainConfig
from .data import PixelStats, decode_many
from .errors import DataError
from .images import squash

if TYPE_CHECKING:
    import torch

CACHE_VERSION = 1


def train_side_for(size: int, native_side: int) -> int:
    """Cache side for training images: up to 2x the model's input (crops keep detail), never above
    the images' own resolution and never below the input size."""
    return max(size, min(2 * size, native_side))


def content_key(paths: Sequence[str], extra: str) -> str:
    """SHA-256 over every file's path, size and content: a changed file changes the key."""
    h = hashlib.sha256(f"v{CACHE_VERSION}|{extra}".encode())
    for p in paths:
        data = Path(p).read_bytes()
        h.update(f"{p}|{len(data)}|".encode())
        h.update(hashlib.sha1(data).digest())
    return h.hexdigest()[:32]


def decode_to_tensor(paths: Sequence[str], side: int, workers: int = 4):
    """(N, 1, side, side) uint8 tensor; unreadable files raise DataError (they were filtered by scan)."""
    import torch

    out = torch.empty((len(paths), 1, side, side), dtype=torch.uint8)
    for i, arr, err in decode_many(list(paths), workers, fn=lambda a: squash(a, side)):
        if arr is None:
            raise DataError(f"{paths[i]}: became unreadable after the scan ({err})")
        out[i, 0] = torch.from_numpy(np.array(arr))  # copy: decoded arrays are read-only views
    return out


@dataclass
class ImageCache:
    x_train: "torch.Tensor"   # (N, 1, T, T) uint8
    y_train: "torch.Tensor"   # (N,) int64
    x_valid: "torch.Tensor"   # (M, 1, S, S) uint8, squashed exactly like the DataBlock's validation
    y_valid: "torch.Tensor"
    valid_items: pd.DataFrame
    key: str = ""


def build_cache(items: pd.DataFrame, classes: Sequence[str], size: int, workers: int = 4,
                cache_dir: str | Path | None = None) -> ImageCache:
    """Decode the train/valid rows of `items` once. With cache_dir, reuse a cache saved there whose
    key (every file's content and the sizes) matches, or save one."""
    import torch

    from .images import read_grey

    tr = items[items.split == "train"].reset_index(drop=True)
    va = items[items.split == "valid"].reset_index(drop=True)
    native = max(read_grey(tr.path[0]).shape)
    side = train_side_for(size, native)
    cls_index = {c: i for i, c in enumerate(classes)}
    key = ""
    if cache_dir is not None:
        key = content_key(list(tr.path) + list(va.path), f"{size}|{side}|{','.join(classes)}")
        f = Path(cache_dir) / f"cache-{key}.pt"
        if f.is_file():
            d = torch.load(f, map_location="cpu", weights_only=True)
            return ImageCache(d["x_train"], d["y_train"], d["x_valid"], d["y_valid"], va, key)
    x_train = decode_to_tensor(tr.path.tolist(), side, workers)
    x_valid = decode_to_tensor(va.path.tolist(), size, workers)
    y_train = torch.tensor([cls_index[c] for c in tr.label], dtype=torch.long)
    y_valid = torch.tensor([cls_index[c] for c in va.label], dtype=torch.long)
    cache = ImageCache(x_train, y_train, x_valid, y_valid, va, key)
    if cache_dir is not None:
        from .fsutil import atomic_save_path

        with atomic_save_path(Path(cache_dir) / f"cache-{key}.pt") as tmp:
            torch.save({"x_train": x_train, "y_train": y_train, "x_valid": x_valid, "y_valid": y_valid}, tmp)
    return cache


def normalise(x_u8, mean: float, std: float):
    """uint8 pixels (any shape, any device) -> float32 model input: /255, then the training stats.
    The one definition every path uses (training batches, predict, bench, Grad-CAM)."""
    return (x_u8.float().div_(255.0) - mean) / std


def to_model_input(arrays, mean: float, std: float, device="cpu"):
    """A list of (S, S) uint8 arrays -> (B, 1, S, S) normalised float32 tensor on `device`."""
    import torch

    return normalise(torch.from_numpy(np.stack(arrays))[:, None].to(device), mean, std)


def random_resized_crop(x, size: int, min_scale: float, gen=None, ratio=(3 / 4, 4 / 3), u=None):
    """Batched RandomResizedCrop: x (B, C, H, W) float -> (B, C, size, size); one affine sampling
    grid per image (crop area fraction in [min_scale, 1], aspect ratio in `ratio`), bilinear.
    The crops come from `u`, (B, 4) uniforms on x's device (see crop_draws), or else are drawn from `gen`."""
    import torch

    if u is None:
        u = torch.rand((x.shape[0], 4), generator=gen, device=gen.device).to(x.device)
    area = min_scale + (1 - min_scale) * u[:, 0]
    logr = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    r = torch.exp(logr)
    w = torch.sqrt(area * r).clamp(max=1.0)   # crop width as a fraction of the image width
    h = torch.sqrt(area / r).clamp(max=1.0)
    cx = (2 * u[:, 2] - 1) * (1 - w)          # centre in [-1, 1] coordinates, crop inside the image
    cy = (2 * u[:, 3] - 1) * (1 - h)
    return crop_resize(x, size, w, h, cx, cy)


def crop_draws(n_batches: int, bs: int, gen, device):
    """The uniforms for a whole epoch's crops, (n_batches, bs, 4), drawn from the CPU generator `gen`
    and moved to `device` in one copy: a copy per batch would make the host wait for the GPU each step."""
    import torch

    return torch.rand((n_batches, bs, 4), generator=gen).to(device)


def crop_resize(x, size: int, w, h, cx, cy):
    """Cut one crop per image and resize it to size x size (bilinear): w, h are the crop's width and height
    as fractions of the image's, cx, cy its centre in [-1, 1] coordinates; each a (B,) tensor."""
    import torch
    import torch.nn.functional as F

    b = x.shape[0]
    theta = torch.zeros((b, 2, 3), device=x.device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w, cx, h, cy
    grid = F.affine_grid(theta, [b, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


TTA_SCALE = 0.85  # side of the test-time crops, as a fraction of the image's side (area ~0.72)
TTA_SOURCE = 2    # the crops are cut from the image squashed to TTA_SOURCE x the input size, as training's
                  # crops are cut from its cache at up to 2x (cutting them from the input-size image and
                  # scaling them up would show the model blurrier images than it was trained on)


def tta_views(x, x_large):
    """Test-time augmentation: the whole image as validation sees it, x (B, C, S, S), plus five fixed
    crops (centre and four corners) of side TTA_SCALE cut from x_large (B, C, L, L), the same images at
    a larger size, each resized to S x S -- crops like those training's RandomResizedCrop shows the
    model. Returns a list of six (B, C, S, S) tensors."""
    import torch

    b, s, size = x.shape[0], TTA_SCALE, x.shape[-1]
    off = 1 - s
    views = [x]
    for cx, cy in ((0.0, 0.0), (-off, -off), (off, -off), (-off, off), (off, off)):
        side = torch.full((b,), s, device=x_large.device, dtype=x_large.dtype)
        views.append(crop_resize(x_large, size, side, side, torch.full_like(side, cx), torch.full_like(side, cy)))
    return views


class CachedDL:
    """Batches from a uint8 tensor on `device`: fastai's DataLoader protocol, as much as Learner uses."""
    n_inp = 1

    def __init__(self, x, y, bs: int, stats: PixelStats, size: int, *, shuffle: bool, drop_last: bool,
                 augment: bool, min_scale: float = TrainConfig.min_scale, seed: int = 0, device="cpu", vocab=None, items=None,
                 channels_last: bool = False):
        self.x, self.y, self.bs, self.stats, self.size = x, y, bs, stats, size
        self.shuffle, self.drop_last, self.augment, self.min_scale = shuffle, drop_last, augment, min_scale
        self.seed, self.vocab, self.items, self.channels_last = seed, vocab, items, channels_last
        self.epoch = 0
        self.to(device)

    @property
    def n(self) -> int:
        return len(self.y)

    @property
    def dataset(self):
        return range(self.n)

    def __len__(self) -> int:
        return self.n // self.bs if self.drop_last else math.ceil(self.n / self.bs)

    def to(self, device):
        import torch

        self.device = torch.device(device)
        self.x, self.y = self.x.to(self.device), self.y.to(self.device)
        return self

    def new(self, shuffle: bool | None = None, drop_last: bool | None = None, bs: int | None = None, **kwargs):
        dl = copy.copy(self)
        if shuffle is not None:
            dl.shuffle = shuffle
        if drop_last is not None:
            dl.drop_last = drop_last
        if bs is not None:
            dl.bs = bs
        return dl

    def _normalise(self, xb):
        return normalise(xb, self.stats.mean, self.stats.std)

    def __iter__(self):
        import torch

        # one generator per epoch, seeded from (seed, epoch): the same run gives the same batches
        gen = torch.Generator(device="cpu").manual_seed(self.seed * 100_003 + self.epoch)
        self.epoch += 1
        order = torch.randperm(self.n, generator=gen).to(self.device) if self.shuffle else None
        draws = crop_draws(len(self), self.bs, gen, self.device) if self.augment else None
        for i in range(len(self)):
            sl = slice(i * self.bs, min((i + 1) * self.bs, self.n))
            idx = order[sl] if order is not None else None
            xb = self.x[idx] if idx is not None else self.x[sl]
            yb = self.y[idx] if idx is not None else self.y[sl]
            xb = self._normalise(xb)
            if self.augment:
                xb = random_resized_crop(xb, self.size, self.min_scale, u=draws[i, :xb.shape[0]])
            elif xb.shape[-1] != self.size:
                raise DataError(f"cached images are {xb.shape[-1]} px, expected {self.size} px")
            if self.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yield xb, yb

    def one_batch(self):
        return next(iter(self.new(shuffle=False)))


def build_cached_dls(items: pd.DataFrame, classes: Sequence[str], stats: PixelStats, cfg, device: str,
                     cache_dir: str | Path | None = None, cache: ImageCache | None = None):
    """fastai DataLoaders over the cached path: same recipe as data.build_dls."""
    from fastai.data.core import DataLoaders

    cache = cache or build_cache(items, classes, cfg.size, workers=4, cache_dir=cache_dir)
    n_train = len(cache.y_train)
    bs = max(1, min(cfg.bs, n_train))
    cl = str(device).startswith("cuda")
    train = CachedDL(cache.x_train, cache.y_train, bs, stats, cfg.size, shuffle=True, drop_last=True, augment=True,
                     min_scale=cfg.min_scale, seed=cfg.seed, device=device, vocab=list(classes), channels_last=cl)
    valid = CachedDL(cache.x_valid, cache.y_valid, bs, stats, cfg.size, shuffle=False, drop_last=False,
                     augment=False, seed=cfg.seed, device=device, vocab=list(classes), items=cache.valid_items,
                     channels_last=cl)
    dls = DataLoaders(train, valid, device=device)
    dls.vocab = list(classes)
    return dls
