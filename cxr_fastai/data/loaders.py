"""fastai DataLoaders for training: one DataBlock, two ways to feed it.

`make_datablock` is the single definition of items, labels, vocab, split and the per-item pipeline.
From it come
  - the cached path (default): every train/valid image is decoded once into a uint8 tensor on the
    training device (train images at the run's cache side, valid images squashed to the input size
    with the same PIL resize as the DataBlock's validation). `CachedDL`, a fastai `TfmdDL` (the pattern
    of `fastai.tabular.core.TabDataLoader`), treats items as indices into that cache: a batch is one
    index into a device tensor, no decoding and no host sync. Its `after_batch` holds ordinary fastai
    transforms: `IntToFloatTensor`, `RandomResizedCropBatch` (per-item crops, train only) and
    `Normalize.from_stats`. `show_batch`, `decode_batch`, `test_dl`, `new_empty`, `learn.export` and
    `ClassificationInterpretation` all work on it; a `CachedDL` given a dataset without a cache
    (`test_dl` on files, the exported pickle) runs the DataBlock's per-item pipeline instead.
  - the per-item PIL path (`--data-path pil`): `dblock.dataloaders`, fastai's RandomResizedCrop per
    item. It is the reference the cached path is tested against.
Augmentation and shuffling of epoch k depend on (seed, k) only (`set_epoch`), so a resumed run sees
the batches the uninterrupted run would have seen.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pandas as pd

from ..config import AUGMENT, BALANCE, TrainConfig
from ..errors import DataError
from ..io.files import content_key
from ..io.images import decode_many, read_step, squash
from .discover import PixelStats

if TYPE_CHECKING:
    import torch

CACHE_VERSION = 2  # 2: side chosen from the data (run.json cache_side)


def cache_side_for(size: int, native_side: float) -> int:
    """Side of the cached training images: the images' own (median) side, capped at 2x the model's
    input (crops keep detail without costing memory) and never below the input size."""
    return int(max(size, min(2 * size, round(native_side))))


def cache_form(arr: np.ndarray, side: int, contrast: str = "none", crop: float = 0.0) -> np.ndarray:
    """One decoded image as the training cache holds it: the read step (contrast, border crop), squashed to
    `side`. `refit --draws` cuts its crops from the same."""
    return squash(read_step(arr, contrast, crop), side)


def decode_to_tensor(paths: Sequence[str], side: int, workers: int = 4, contrast: str = "none", crop: float = 0.0):
    """(N, 1, side, side) uint8 tensor; unreadable files raise DataError (they were filtered by scan)."""
    import torch

    out = torch.empty((len(paths), 1, side, side), dtype=torch.uint8)
    for i, arr, err in decode_many(list(paths), workers, fn=lambda a: cache_form(a, side, contrast, crop)):
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
    key: str = ""

    @property
    def side(self) -> int:
        return int(self.x_train.shape[-1])


def build_cache(items: pd.DataFrame, classes: Sequence[str], size: int, side: int, workers: int = 4,
                cache_dir: str | Path | None = None, contrast: str = "none", crop: float = 0.0) -> ImageCache:
    """Decode the train/valid rows of `items` once: train at side x side, valid at size x size. With
    cache_dir, reuse a cache saved there whose key (every file's content and the sizes) matches, or save one."""
    import torch

    tr = items[items.split == "train"].reset_index(drop=True)
    va = items[items.split == "valid"].reset_index(drop=True)
    cls_index = {c: i for i, c in enumerate(classes)}
    key = ""
    if cache_dir is not None:
        step = contrast + (f"|crop{crop}" if crop else "")  # no crop: the key of caches saved before crops existed
        key = content_key(list(tr.path) + list(va.path), f"v{CACHE_VERSION}|{size}|{side}|{step}|{','.join(classes)}")
        f = Path(cache_dir) / f"cache-{key}.pt"
        if f.is_file():
            d = torch.load(f, map_location="cpu", weights_only=True)
            return ImageCache(d["x_train"], d["y_train"], d["x_valid"], d["y_valid"], key)
    x_train = decode_to_tensor(tr.path.tolist(), side, workers, contrast, crop)
    x_valid = decode_to_tensor(va.path.tolist(), size, workers, contrast, crop)
    y_train = torch.tensor([cls_index[c] for c in tr.label], dtype=torch.long)
    y_valid = torch.tensor([cls_index[c] for c in va.label], dtype=torch.long)
    cache = ImageCache(x_train, y_train, x_valid, y_valid, key)
    if cache_dir is not None:
        from ..io.files import atomic_save_path

        with atomic_save_path(Path(cache_dir) / f"cache-{key}.pt") as tmp:
            torch.save({"x_train": x_train, "y_train": y_train, "x_valid": x_valid, "y_valid": y_valid}, tmp)
    return cache




def build_cached_dls(items: pd.DataFrame, classes: Sequence[str], stats: PixelStats, cfg: TrainConfig, device: str,
                     side: int, cache_dir: str | Path | None = None, cache: ImageCache | None = None):
    """The cached path: the DataBlock's Datasets, batches cut from a uint8 cache on `device`."""
    from .cached_dl import CachedDL, RandomResizedCropBatch

    df = _frame(items)
    cache = cache or build_cache(df, classes, cfg.size, side, workers=4, cache_dir=cache_dir, contrast=cfg.contrast,
                                   crop=cfg.crop_border)
    dblock = make_datablock(classes, stats, cfg.size, cfg.min_scale, cfg.contrast, cfg.crop_border)
    dsets = dblock.datasets(df)
    after_batch = [*dblock.batch_tfms, RandomResizedCropBatch(cfg.size, cfg.min_scale), *augmentations(cfg.augment)]
    train = df[~df.is_valid]
    dls = dsets.dataloaders(
        bs=_bs(cfg, df), dl_type=CachedDL, device=device, after_item=dblock.item_tfms, after_batch=after_batch,
        num_workers=0, drop_last=True,
        dl_kwargs=[{"cache": (cache.x_train, cache.y_train), "seed": cfg.seed,
                    "wgts": sampling_weights(train, cfg.balance, cfg.balance_power), "groups": source_ids(train)},
                   {"cache": (cache.x_valid, cache.y_valid), "seed": cfg.seed}])
    dls.vocab = list(classes)
    return dls


def make_datablock(classes: Sequence[str], stats: PixelStats, size: int, min_scale: float, contrast: str = "none",
                   crop: float = 0.0):
    from fastai.data.block import CategoryBlock, DataBlock
    from fastai.data.transforms import ColReader, ColSplitter, Normalize
    from fastai.vision.augment import RandomResizedCrop
    from fastai.vision.data import ImageBlock

    from .types import Contrast, CropBorder, CxrImage

    return DataBlock(
        blocks=(ImageBlock(cls=CxrImage), CategoryBlock(vocab=list(classes))),
        get_x=ColReader("path"),
        get_y=ColReader("label"),
        splitter=ColSplitter("is_valid"),
        # val_xtra=0: at validation the whole image is squashed to size x size, nothing trimmed
        item_tfms=[*([CropBorder(crop)] if crop else []), *([Contrast(contrast)] if contrast != "none" else []),
                   RandomResizedCrop(size, min_scale=min_scale, val_xtra=0.0)],
        batch_tfms=[Normalize.from_stats([stats.mean], [stats.std], cuda=False)],
    )


def augmentations(kind: str) -> list:
    """Batch augmentation on the device, per image, after the crop. "light" (fastai's own transforms):
    rotation up to 5 degrees and zoom up to 1.1x (one affine resample), brightness and contrast up to 20%,
    each applied to 3 images in 4. No flips: a chest is not left-right symmetric. "texture": light, then
    per-image gamma (0.67-1.5), blur (sigma up to 1 px) and noise (std up to 4% of the range), each on half
    the images: the tone curve, sharpness and noise are what hospitals' processing pipelines differ in."""
    if kind not in AUGMENT:
        raise ValueError(f"unknown augmentation {kind!r}; use one of {', '.join(AUGMENT)}")
    if kind == "none":
        return []
    from fastai.vision.augment import aug_transforms

    light = aug_transforms(do_flip=False, max_rotate=5.0, max_zoom=1.1, max_lighting=0.2, max_warp=0.0)
    if kind == "light":
        return light
    from .cached_dl import TextureJitterBatch

    return [*light, TextureJitterBatch()]


def sampling_weights(train: pd.DataFrame, balance: str, power: float = 1.0):
    """Per-image draw probabilities for the training loader (None: every image once per epoch, shuffled).
    "class": every class drawn equally often; "class-source": every (class, source) stratum equally often,
    so that e.g. 197 adult pneumonias from one hospital are not drowned by 2,882 pediatric ones;
    "class-then-source": every class equally often and, within a class, every source equally often (a class
    held by one source, such as COVID19, keeps its third of the draws). `power` < 1 tempers the balance: each
    image's weight is raised to it (1 full balance, 0 every image alike, drawn with replacement)."""
    if balance == "none":
        return None
    if balance not in BALANCE:
        raise ValueError(f"unknown balance {balance!r}; use one of {', '.join(BALANCE)}")
    keys = ["label"] if balance == "class" else ["label", "source"]
    w = 1.0 / train.groupby(keys)["label"].transform("size").to_numpy(dtype=np.float64)
    if balance == "class-then-source":
        w /= train.groupby("label")["source"].transform("nunique").to_numpy(dtype=np.float64)
    if power != 1.0:
        w = (w / w.max()) ** power
    return w / w.sum()


def source_ids(train: pd.DataFrame):
    """(N,) int64 tensor: each training image's source as a number (sources in sorted order)."""
    import torch

    return torch.as_tensor(source_codes(train)[0], dtype=torch.long)


def source_codes(train: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    """Each row's source as a number, and the source names those numbers stand for (sorted)."""
    codes, names = pd.factorize(train["source"].astype(str), sort=True)
    return codes, list(names)


def _frame(items: pd.DataFrame) -> pd.DataFrame:
    """The train and valid rows of `items` (train first, each in its own order, as the cache holds them)
    with the DataBlock's is_valid column."""
    items = items if "source" in items.columns else items.assign(source="")
    df = pd.concat([items[items.split == s] for s in ("train", "valid")])[["path", "label", "split", "source"]]
    df = df.reset_index(drop=True)
    df["is_valid"] = df.split == "valid"
    return df


def _bs(cfg: TrainConfig, df: pd.DataFrame) -> int:
    # fastai drops the last partial batch: bs > the training-set size would train nothing
    return max(1, min(cfg.bs, int((~df.is_valid).sum())))


def build_pil_dls(items: pd.DataFrame, classes: Sequence[str], stats: PixelStats, cfg: TrainConfig, device: str):
    """The per-item PIL path: fastai's own DataBlock loaders, RandomResizedCrop per item."""
    df = _frame(items)
    dblock = make_datablock(classes, stats, cfg.size, cfg.min_scale, cfg.contrast, cfg.crop_border)
    return dblock.dataloaders(df, bs=_bs(cfg, df), num_workers=cfg.workers, device=device)


def build_dls(items: pd.DataFrame, classes: Sequence[str], stats: PixelStats, cfg: TrainConfig, device: str,
              side: int | None = None, cache: ImageCache | None = None):
    """Training DataLoaders on the path cfg.data_path names (cached or pil)."""
    if cfg.data_path == "pil":
        return build_pil_dls(items, classes, stats, cfg, device)
    return build_cached_dls(items, classes, stats, cfg, device, side or 2 * cfg.size,
                            cache_dir=cfg.cache_dir or None, cache=cache)
