"""The fastai pieces of the cached path: `CachedDL` (a TfmdDL over a uint8 image cache),
`RandomResizedCropBatch` (per-item random crops on the batch, train only) and `TextureJitterBatch`
(per-item gamma, blur and noise, train only).

Module-level classes (not made inside functions) so that `learner.pkl` refers to them by name and
loads in any process that can import cxr_fastai. Importing this module imports fastai.
"""
from __future__ import annotations

import random

import numpy as np
import torch
from fastai.data.core import TfmdDL
from fastai.torch_core import TensorCategory
from fastai.vision.augment import RandTransform
from fastai.vision.core import TensorImage

from .augment import random_resized_crop, texture_jitter
from .types import CxrTensorImage


def seed_for(seed: int, epoch: int) -> int:
    """The random stream of one epoch: a function of (seed, epoch) only."""
    return (seed * 1_000_003 + epoch) % 2**63


class SeededBatchTransform(RandTransform):
    """A train-only batch transform whose draws come from its own generator on the batch's device, reseeded
    per epoch by `CachedDL` (`reseed`): no host sync, and epoch k's draws depend only on (seed, k).
    Data-parallel (`shard` = (this process, processes)): every process draws for the whole global batch and
    keeps its own rows, so each image gets what the one-process run would have given it."""
    split_idx = 0
    shard = (0, 1)  # (rank, world size); set for a data-parallel fit only (train.distributed)
    stream = 0      # added to the epoch's seed: transforms of one loader draw from different streams

    def __init__(self, **kwargs):
        super().__init__(p=1.0, **kwargs)
        self._seed, self._gen = 0, None

    def reseed(self, seed: int) -> None:
        self._seed, self._gen = (int(seed) + self.stream) % 2**63, None

    def _draw(self, fn, shape, device) -> torch.Tensor:
        """fn(global shape) (torch.rand / torch.randn) from this transform's generator; this process's rows
        rank*n .. (rank+1)*n of a global batch of n*world images (one process: all)."""
        if self._gen is None or self._gen.device != torch.device(device):
            # a CUDA generator's device reads cuda:0 where the tensor says cuda: compare by type and index
            self._gen = torch.Generator(device=device).manual_seed(self._seed)
        n, (rank, world) = shape[0], self.shard
        return fn((n * world, *shape[1:]), generator=self._gen, device=device)[rank * n:(rank + 1) * n]

    def __getstate__(self):  # the generator and the shard are state of one process, not of the transform
        d = dict(self.__dict__)
        d["_gen"] = None
        d.pop("shard", None)
        return d


class RandomResizedCropBatch(SeededBatchTransform):
    """RandomResizedCrop for a whole batch on its device, a different crop for every image (fastai's
    `RandomResizedCropGPU` draws one crop per batch). Train only: validation images are already squashed to
    size x size. Antialiased (see `augment.crop_resize`)."""
    order = 30  # after IntToFloatTensor (10), before Normalize (99), as fastai's GPU crop

    def __init__(self, size: int, min_scale: float, ratio=(3 / 4, 4 / 3), **kwargs):
        super().__init__(**kwargs)
        self.size, self.min_scale, self.ratio = int(size), float(min_scale), tuple(ratio)

    def encodes(self, x: TensorImage):
        u = self._draw(torch.rand, (x.shape[0], 4), x.device)
        return TensorImage(random_resized_crop(x, self.size, self.min_scale, u, self.ratio)).as_subclass(type(x))


class TextureJitterBatch(SeededBatchTransform):
    """Per-image gamma, blur and noise (`augment.texture_jitter`), train only: `--augment texture`."""
    order, stream = 60, 1_000_003  # after the crop and fastai's lighting/affine transforms, before Normalize

    def __init__(self, max_gamma: float = 1.5, max_sigma: float = 1.0, max_noise: float = 0.04, p: float = 0.5,
                 **kwargs):
        super().__init__(**kwargs)
        self.max_gamma, self.max_sigma, self.max_noise, self.prob = max_gamma, max_sigma, max_noise, p

    def encodes(self, x: TensorImage):
        u = self._draw(torch.rand, (x.shape[0], 6), x.device)
        z = self._draw(torch.randn, tuple(x.shape), x.device)
        y = texture_jitter(x, u, z, self.max_gamma, self.max_sigma, self.max_noise, self.prob)
        return TensorImage(y).as_subclass(type(x))


class CachedDL(TfmdDL):
    """A fastai TfmdDL whose items are indices into `cache`, (x (N, 1, S, S) uint8, y (N,) int64), on
    the loader's device: a batch is one tensor index, the DataBlock's per-item pipeline never runs.
    Without a cache (e.g. `test_dl` over files, or the empty loaders inside `learner.pkl`) it is an
    ordinary TfmdDL over its dataset. `set_epoch(k)` (called by the Learner's `EpochSeed` callback)
    fixes the shuffle and the augmentation of the next pass to (seed, k)."""

    def __init__(self, dataset=None, cache=None, seed: int = 0, epoch: int = 0, wgts=None, groups=None, **kwargs):
        self.cache, self.seed, self.epoch, self.wgts = cache, int(seed), int(epoch), wgts
        # groups: (N,) int64, each cached image's source id; `last_idx`: the cache rows of the latest batch
        # (what --mixup-pairs lisa reads to pair images across sources)
        self.groups, self.last_idx = groups, None
        super().__init__(dataset, **kwargs)
        if self.cache is not None:
            x, y = self.cache
            if len(x) != len(y) or (self.dataset is not None and len(x) != len(self.dataset)):
                raise ValueError(f"cache holds {len(x)} images and {len(y)} labels for {len(self.dataset)} items")
            if self.groups is not None and len(self.groups) != len(y):
                raise ValueError(f"{len(self.groups)} source ids for {len(y)} cached images")
            if self.device is not None:
                self.cache = (x.to(self.device), y.to(self.device))
                self.groups = None if self.groups is None else self.groups.to(self.device)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def before_iter(self):
        super().before_iter()
        s = seed_for(self.seed, self.epoch)
        self.rng = random.Random(s)  # the shuffle of this pass (fastai's DataLoader.shuffle_fn uses it)
        for f in self.after_batch.fs:
            if hasattr(f, "reseed"):
                f.reseed(s)

    def get_idxs(self):
        if self.wgts is None or not self.shuffle or self.n == 0:
            return super().get_idxs()
        # weighted draws with replacement, as fastai's WeightedDL, from this epoch's own generator
        rng = np.random.default_rng(seed_for(self.seed, self.epoch))
        return rng.choice(self.n, self.n, p=self.wgts).tolist()

    def do_item(self, s):
        if self.cache is None:
            return super().do_item(s)
        return 0 if s is None else s

    def create_batch(self, b):
        if self.cache is None:
            return super().create_batch(b)
        x, y = self.cache
        idx = torch.as_tensor(b, dtype=torch.long).to(x.device, non_blocking=True)
        self.last_idx = idx
        return CxrTensorImage(x[idx]), TensorCategory(y[idx])

    def to(self, device):
        super().to(device)
        if self.cache is not None:
            self.cache = tuple(t.to(device) for t in self.cache)
        if self.groups is not None:
            self.groups = self.groups.to(device)
        return self

    def new(self, dataset=None, cls=None, **kwargs):
        # the same dataset keeps the cache (and the seed); another dataset (test_dl, new_empty) has none
        same = dataset is None or dataset is self.dataset
        kwargs.setdefault("cache", self.cache if same else None)
        kwargs.setdefault("seed", self.seed)
        kwargs.setdefault("epoch", self.epoch)
        kwargs.setdefault("wgts", self.wgts if same else None)
        kwargs.setdefault("groups", self.groups if same else None)
        return super().new(dataset, cls, **kwargs)

    def __getstate__(self):  # never pickle the images (learn.export holds empty loaders anyway)
        d = dict(self.__dict__)
        d["cache"], d["groups"], d["last_idx"] = None, None, None
        return d
