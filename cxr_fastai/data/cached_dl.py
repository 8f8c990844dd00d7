"""The fastai pieces of the cached path: `CachedDL` (a TfmdDL over a uint8 image cache) and
`RandomResizedCropBatch` (per-item random crops on the batch, train only).

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

from .augment import random_resized_crop
from .types import CxrTensorImage


def seed_for(seed: int, epoch: int) -> int:
    """The random stream of one epoch: a function of (seed, epoch) only."""
    return (seed * 1_000_003 + epoch) % 2**63


class RandomResizedCropBatch(RandTransform):
    """RandomResizedCrop for a whole batch on its device, a different crop for every image (fastai's
    `RandomResizedCropGPU` draws one crop per batch). Train only (split_idx=0): validation images are
    already squashed to size x size. Antialiased (see `augment.crop_resize`). Draws come from a
    generator on the batch's device, reseeded per epoch by `CachedDL` (`reseed`): no host sync, and
    epoch k's crops depend only on (seed, k). Data-parallel (`shard` = (this process, processes)): every
    process draws for the whole global batch and keeps its own rows, so each image gets the crop the
    one-process run would have given it."""
    split_idx, order = 0, 30  # after IntToFloatTensor (10), before Normalize (99), as fastai's GPU crop
    shard = (0, 1)  # (rank, world size); set for a data-parallel fit only (train.distributed)

    def __init__(self, size: int, min_scale: float, ratio=(3 / 4, 4 / 3), **kwargs):
        super().__init__(p=1.0, **kwargs)
        self.size, self.min_scale, self.ratio = int(size), float(min_scale), tuple(ratio)
        self._seed, self._gen = 0, None

    def reseed(self, seed: int) -> None:
        self._seed, self._gen = int(seed), None

    def _draws(self, n: int, device) -> torch.Tensor:
        if self._gen is None or self._gen.device != torch.device(device):
            # a CUDA generator's device reads cuda:0 where the tensor says cuda: compare by type and index
            self._gen = torch.Generator(device=device).manual_seed(self._seed)
        # this process holds rows rank*n .. (rank+1)*n of a global batch of n*world images (one process: all)
        rank, world = self.shard
        return torch.rand((n * world, 4), generator=self._gen, device=device)[rank * n:(rank + 1) * n]

    def encodes(self, x: TensorImage):
        u = self._draws(x.shape[0], x.device)
        return TensorImage(random_resized_crop(x, self.size, self.min_scale, u, self.ratio)).as_subclass(type(x))

    def __getstate__(self):  # the generator and the shard are state of one process, not of the transform
        d = dict(self.__dict__)
        d["_gen"] = None
        d.pop("shard", None)
        return d


class CachedDL(TfmdDL):
    """A fastai TfmdDL whose items are indices into `cache`, (x (N, 1, S, S) uint8, y (N,) int64), on
    the loader's device: a batch is one tensor index, the DataBlock's per-item pipeline never runs.
    Without a cache (e.g. `test_dl` over files, or the empty loaders inside `learner.pkl`) it is an
    ordinary TfmdDL over its dataset. `set_epoch(k)` (called by the Learner's `EpochSeed` callback)
    fixes the shuffle and the augmentation of the next pass to (seed, k)."""

    def __init__(self, dataset=None, cache=None, seed: int = 0, epoch: int = 0, wgts=None, **kwargs):
        self.cache, self.seed, self.epoch, self.wgts = cache, int(seed), int(epoch), wgts
        super().__init__(dataset, **kwargs)
        if self.cache is not None:
            x, y = self.cache
            if len(x) != len(y) or (self.dataset is not None and len(x) != len(self.dataset)):
                raise ValueError(f"cache holds {len(x)} images and {len(y)} labels for {len(self.dataset)} items")
            if self.device is not None:
                self.cache = (x.to(self.device), y.to(self.device))

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
        return CxrTensorImage(x[idx]), TensorCategory(y[idx])

    def to(self, device):
        super().to(device)
        if self.cache is not None:
            self.cache = tuple(t.to(device) for t in self.cache)
        return self

    def new(self, dataset=None, cls=None, **kwargs):
        # the same dataset keeps the cache (and the seed); another dataset (test_dl, new_empty) has none
        same = dataset is None or dataset is self.dataset
        kwargs.setdefault("cache", self.cache if same else None)
        kwargs.setdefault("seed", self.seed)
        kwargs.setdefault("epoch", self.epoch)
        kwargs.setdefault("wgts", self.wgts if same else None)
        return super().new(dataset, cls, **kwargs)

    def __getstate__(self):  # never pickle the images (learn.export holds empty loaders anyway)
        d = dict(self.__dict__)
        d["cache"] = None
        return d
