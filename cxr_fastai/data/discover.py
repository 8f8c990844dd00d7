"""Dataset discovery (folders or labels.csv), class order, splits, pixel stats and fastai DataLoaders.

Layouts, tried in this order:
  (c) ROOT/labels.csv with columns path,label[,split][,source][,patient_id][,group]; paths relative to
      ROOT. Its split column is used as given; without one, items are split by connected components of
      patient_id and group, so that no patient and no duplicate group is on both sides.
  (a) ROOT/{train,valid[,test]}/CLASS/**/image
  (b) ROOT/CLASS/**/image, split by a seeded random split (by patient when DICOM headers name one).
Images are .jpg .jpeg .png .bmp .tif .tiff and DICOM (.dcm, .dicom, or no extension with the DICM preamble);
symlinked folders are followed once each; hidden files and OS debris (.DS_Store, Thumbs.db, __MACOSX/) are
skipped. A DICOM's PatientID is kept only as a salted hash (patient_id), never as itself.
"""
from __future__ import annotations

import functools
import math
import os
import random
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from ..config import SPLITS
from ..errors import DataError
from ..io.files import sub_folders, walk_files
from ..io.images import decode_many, is_image_path, read_step, squash

COLUMNS = ("path", "label", "split", "source", "patient_id", "group")
SPLIT_ALIASES = {"train": "train", "training": "train", "valid": "valid", "val": "valid",
                 "validation": "valid", "test": "test", "testing": "test"}
SPLIT_NAME = r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}"   # a labels.csv split of the user's own (e.g. external, site_b)


@dataclass
class Dataset:
    root: Path                 # the first root (messages name it)
    layout: str                # "labels.csv" | "split-folders" | "class-folders" (one per root, joined by " + ")
    items: pd.DataFrame        # COLUMNS; path is absolute; split: train/valid/test or a labels.csv name of its own
    split_given: bool          # False when this module made the split (of any root)
    roots: list[Path] = field(default_factory=list)   # every root, in the order given

    def __post_init__(self):
        self.roots = self.roots or [self.root]

    @property
    def where(self) -> str:
        """The roots, for messages."""
        return " + ".join(str(r) for r in self.roots)

    @property
    def classes(self) -> list[str]:
        return sorted(self.items.loc[self.items.split == "train", "label"].unique().tolist())

    def split(self, name: str) -> pd.DataFrame:
        return self.items[self.items.split == name].reset_index(drop=True)


@dataclass
class Skipped:
    """Images that could not be read: skipped, warned about and listed, never fatal on their own."""
    rows: list[tuple[str, str]] = field(default_factory=list)   # (path, reason)

    def add(self, path: str, reason: str) -> None:
        self.rows.append((str(path), reason))

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=["path", "error"])

    def __len__(self) -> int:
        return len(self.rows)


# ---------------------------------------------------------------------------------------- discovery

def discover(roots: str | Path | Sequence[str | Path], valid_pct: float = 0.2, seed: int = 0) -> Dataset:
    """One dataset from one root or several. With several roots, each is read in its own layout (and split
    by itself when it has no split), an item's source is its labels.csv `source` or else its root's
    folder name, and classes are matched by name across roots."""
    roots = [roots] if isinstance(roots, (str, Path)) else list(roots)
    if not roots:
        raise DataError("no dataset root given; give one or more folders")
    parts = [_discover_one(r, valid_pct, seed) for r in roots]
    if len(parts) == 1:
        return parts[0]
    seen: dict[Path, int] = {}
    for i, ds in enumerate(parts):
        if ds.root in seen:
            raise DataError(f"{ds.root}: given twice as a dataset root; give each root once")
        seen[ds.root] = i
        ds.items["source"] = ds.items.source.where(ds.items.source != "", ds.root.name)
    items = pd.concat([ds.items for ds in parts], ignore_index=True)
    dup = items.path.duplicated()
    if dup.any():
        raise DataError(f"{items.path[dup].iloc[0]}: listed by two of the roots (one root inside another?); "
                        "give roots that do not overlap")
    return Dataset(parts[0].root, " + ".join(ds.layout for ds in parts), items,
                   split_given=all(ds.split_given for ds in parts), roots=[ds.root for ds in parts])


def _discover_one(root: str | Path, valid_pct: float, seed: int) -> Dataset:
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"{root}: no such folder; give the dataset root (folders of classes, "
                        "train/valid/test folders, or a folder with labels.csv)")
    if not root.is_dir():
        raise DataError(f"{root}: is a file, not a folder; give the dataset root folder")
    root = root.resolve()
    if (root / "labels.csv").is_file():
        ds = _from_labels_csv(root, valid_pct, seed)
    elif (root / "train").is_dir():
        ds = _from_split_folders(root)
    else:
        ds = _from_class_folders(root, valid_pct, seed)
    _check(ds)
    return ds


def _images_under(folder: Path) -> list[Path]:
    """Images (and DICOMs) under a class folder, symlinked folders followed once, debris skipped."""
    return walk_files(folder, is_image_path)


def _class_dirs(folder: Path) -> list[Path]:
    return sub_folders(folder)


def _frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    for c in ("source", "patient_id", "group"):
        df[c] = df[c].astype(object).fillna("").astype(str)  # all-missing columns are float NaN
    return df


def _from_split_folders(root: Path) -> Dataset:
    rows = []
    for split in SPLITS:
        d = root / split
        if not d.is_dir():
            continue
        for cdir in _class_dirs(d):
            for p in _images_under(cdir):
                rows.append(dict(path=str(p), label=cdir.name, split=split))
    ds = Dataset(root, "split-folders", _with_dicom_patients(_frame(rows)), split_given=True)
    if not (root / "valid").is_dir():
        raise DataError(f"{root}: has train/ but no valid/ folder; add ROOT/valid/CLASS/* "
                        "(or remove train/ to let the tool split ROOT/CLASS/* itself)")
    return ds


def _from_class_folders(root: Path, valid_pct: float, seed: int) -> Dataset:
    rows = []
    for cdir in _class_dirs(root):
        for p in _images_under(cdir):
            rows.append(dict(path=str(p), label=cdir.name, split=""))
    df = _with_dicom_patients(_frame(rows))
    if (df.patient_id != "").any():
        # DICOMs name their patient: keep each patient's films on one side of the split
        df["split"] = group_split(df.patient_id.tolist(), df.group.tolist(), valid_pct, seed)
    elif len(df):
        df["split"] = _random_split(df.label.tolist(), valid_pct, seed)
    return Dataset(root, "class-folders", df, split_given=False)


@functools.cache
def _salt() -> str:
    """A random salt for this process's patient keys: a key groups one patient's films within a run (split,
    audit) and cannot be turned back into the id, nor matched against another run's keys."""
    return secrets.token_hex(16)


def _with_dicom_patients(df: pd.DataFrame) -> pd.DataFrame:
    """Fill patient_id for DICOM files from their PatientID header, as a salted hash (never the id itself)."""
    from ..io.dicom import is_dicom_file, patient_key

    keys = [patient_key(p, _salt()) if is_dicom_file(p) else None for p in df.path]
    df["patient_id"] = [k or "" for k in keys]
    return df


def _random_split(labels: Sequence[str], valid_pct: float, seed: int) -> list[str]:
    """Seeded split, stratified by class: each class keeps at least one training image (a class with a
    single image stays in train), and some class with 2+ images gives at least one validation item."""
    labels = np.asarray(labels, dtype=object)
    rng = np.random.default_rng(seed)
    split = np.array(["train"] * len(labels), dtype=object)
    for c in sorted(set(labels.tolist())):
        idx = np.flatnonzero(labels == c)
        k = min(int(round(len(idx) * valid_pct)), len(idx) - 1)
        split[rng.permutation(idx)[:k]] = "valid"
    counts = {c: int((labels == c).sum()) for c in sorted(set(labels.tolist()))}
    if not (split == "valid").any() and max(counts.values(), default=0) > 1:
        # every class rounded to 0: hold out one item of the largest class
        c = max(counts, key=counts.get)
        split[rng.choice(np.flatnonzero(labels == c))] = "valid"
    return split.tolist()


def _from_labels_csv(root: Path, valid_pct: float, seed: int) -> Dataset:
    csv = root / "labels.csv"
    try:
        df = pd.read_csv(csv, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(f"{csv}: cannot be parsed as CSV ({e}); it needs a header line path,label[,split,...]") from e
    df.columns = [str(c).strip().lower() for c in df.columns]
    missing = [c for c in ("path", "label") if c not in df.columns]
    if missing:
        raise DataError(f"{csv}: missing column(s) {', '.join(missing)}; the header must include path,label "
                        f"(found: {', '.join(df.columns) or 'nothing'})")
    if len(df) == 0:
        raise DataError(f"{csv}: has a header but no rows; list one image per row")
    for c in COLUMNS:
        if c not in df.columns:
            df[c] = ""
    df = df[list(COLUMNS)].copy()
    for c in COLUMNS:
        df[c] = df[c].astype(str).str.strip()
    line = df.index + 2  # 1-based file line, after the header
    empty = df.index[(df.path == "") | (df.label == "")]
    if len(empty):
        raise DataError(f"{csv}: line {line[empty[0]]} has an empty path or label; fill or delete it")
    abs_paths = []
    for i, rel in zip(line, df.path):
        # normpath, not resolve: a symlinked image inside the folder is fine, "../x" is not
        p = Path(os.path.normpath(root / rel))
        if not p.is_relative_to(root):
            raise DataError(f"{csv}: line {i}: path {rel!r} points outside the data folder {root}; "
                            "paths must stay inside the folder that holds labels.csv")
        abs_paths.append(str(p))
    df["path"] = abs_paths
    dup = df.path.duplicated(keep=False)
    if dup.any():
        first = df.loc[dup, "path"].iloc[0]
        lines = line[(df.path == first).to_numpy()].tolist()
        raise DataError(f"{csv}: image {Path(first).relative_to(root)} is listed {len(lines)} times "
                        f"(lines {', '.join(map(str, lines))}); keep one row per image")
    has_split = (df.split != "").any()
    if has_split:
        known = df.split.str.lower().isin(SPLIT_ALIASES)
        bad = df.index[~known & ~df.split.str.fullmatch(SPLIT_NAME)]
        if len(bad):
            raise DataError(f"{csv}: line {line[bad[0]]}: split {df.split[bad[0]]!r} is not train, valid, test or "
                            "a name of letters, digits, '-' and '_' (e.g. external, site_b); fill it in or leave the "
                            "split column out to let the tool split")
        # train/valid/test (and their aliases) drive training; any other name is a set of its own for evaluate
        df["split"] = df.split.where(~known, df.split.str.lower().map(SPLIT_ALIASES))
        return Dataset(root, "labels.csv", df.reset_index(drop=True), split_given=True)
    df["split"] = group_split(df.patient_id.tolist(), df.group.tolist(), valid_pct, seed)
    return Dataset(root, "labels.csv", df.reset_index(drop=True), split_given=False)


def patient_components(patient_ids: Sequence[str], groups: Sequence[str]) -> list[list[int]]:
    """Item indices joined when they share a patient id or a group (transitively), each list in item order,
    the lists in the order of their first item: what must stay on one side of any split."""
    n = len(patient_ids)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for key_col in (patient_ids, groups):
        first: dict[str, int] = {}
        for i, k in enumerate(key_col):
            if not k:
                continue
            if k in first:
                a, b = find(i), find(first[k])
                if a != b:
                    parent[a] = b
            else:
                first[k] = i
    comps: dict[int, list[int]] = {}
    for i in range(n):
        comps.setdefault(find(i), []).append(i)
    return list(comps.values())


def group_split(patient_ids: Sequence[str], groups: Sequence[str], valid_pct: float, seed: int) -> list[str]:
    """'train'/'valid' per item; items sharing a patient id or a group (transitively) stay together."""
    n = len(patient_ids)
    order = patient_components(patient_ids, groups)
    random.Random(seed).shuffle(order)
    split = ["train"] * n
    target = max(1, int(round(n * valid_pct))) if n > 1 else 0
    taken = 0
    for comp in order:
        if taken >= target:
            break
        if taken + len(comp) > target * 1.5:
            continue  # a huge component would overshoot (even as the first one): try smaller ones
        for i in comp:
            split[i] = "valid"
        taken += len(comp)
    if taken == 0 and len(order) > 1:
        for i in min(order, key=len):  # every component overshoots: hold out the smallest one
            split[i] = "valid"
    return split


def group_folds(labels: Sequence[str], patient_ids: Sequence[str], groups: Sequence[str], k: int,
                seed: int) -> list[int]:
    """A fold number in 0..k-1 per item for patient-grouped k-fold: items sharing a patient id or a group
    (transitively) get the same fold, and each fold's class mix is kept near the whole's (scikit-learn's
    StratifiedGroupKFold, seeded). The same items in the same order and seed give the same folds."""
    from sklearn.model_selection import StratifiedGroupKFold

    comps = patient_components(patient_ids, groups)
    if len(comps) < k:
        raise DataError(f"{k}-fold needs at least {k} patients (or groups); these images have {len(comps)}")
    comp_of = np.empty(len(labels), dtype=np.int64)
    for c, members in enumerate(comps):
        comp_of[members] = c
    fold = np.zeros(len(labels), dtype=np.int64)
    cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    for j, (_, held) in enumerate(cv.split(np.zeros(len(labels)), np.asarray(labels), comp_of)):
        fold[held] = j
    return fold.tolist()


def item_folds(items: pd.DataFrame, k: int, seed: int) -> np.ndarray:
    """group_folds over discover's item rows (label, patient_id, group), as one array."""
    return np.asarray(group_folds(items.label.tolist(), items.patient_id.tolist(), items.group.tolist(), k, seed))


def _check(ds: Dataset) -> None:
    root = ds.root
    if len(ds.items) == 0:
        raise DataError(f"{root}: no images found (looked for {', '.join(('.jpg', '.png', '.bmp', '.tif'))} "
                        "in ROOT/CLASS/, ROOT/train/CLASS/ or via ROOT/labels.csv)")


def check_trainable(ds: Dataset) -> list[str]:
    """Raise DataError unless train and valid can be built; return the class order (sorted names)."""
    root = ds.root
    train, valid = ds.split("train"), ds.split("valid")
    if len(train) == 0:
        raise DataError(f"{root}: no training images (split 'train' is empty)")
    classes = ds.classes
    if len(classes) < 2:
        raise DataError(f"{root}: only one class ({classes[0]!r}) in the training images; a classifier "
                        "needs at least 2 classes (one folder or label per class)")
    if len(valid) == 0:
        raise DataError(f"{root}: no validation images; add a valid split (or enough images for the tool "
                        "to hold some out)")
    unknown = sorted(set(ds.items.label) - set(classes))
    if unknown:
        where = ds.items.loc[ds.items.label.isin(unknown), "split"].iloc[0]
        raise DataError(f"{root}: label {unknown[0]!r} appears in the {where} split but has no training "
                        f"images; add training images for it or remove it")
    return classes


# -------------------------------------------------------------------------------- decoding and stats


@dataclass
class PixelStats:
    mean: float        # of pixel/255 over the training images, at the training size
    std: float
    side: float = 0.0  # px: median longer side of the training images as read, after the run's border crop (0 = unknown)

    def to_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "std": self.std, "side": self.side}


def scan(ds: Dataset, splits: Sequence[str], size: int, stats_limit: int, seed: int,
         workers: int = 4, progress: Callable[[int, int], None] | None = None, contrast: str = "none",
         crop: float = 0.0) -> tuple[pd.DataFrame, Skipped, PixelStats]:
    """Decode every image of `splits` once: drop unreadable ones (listed in Skipped), and compute the
    pixel mean/std and the median image side from training images only (a seeded sample of at most
    stats_limit of them)."""
    items = ds.items[ds.items.split.isin(splits)].reset_index(drop=True)
    train_idx = np.flatnonzero(items.split.to_numpy() == "train")
    if len(train_idx) > stats_limit:
        train_idx = np.random.default_rng(seed).choice(train_idx, stats_limit, replace=False)
    for_stats = np.zeros(len(items), bool)
    for_stats[train_idx] = True
    ok = np.ones(len(items), bool)
    skipped = Skipped()
    s = s2 = 0.0
    npx = 0
    paths = items.path.tolist()
    sides = []
    for i, arr, err in decode_many(paths, workers, fn=lambda a: read_step(a, contrast, crop)):
        if arr is None:
            ok[i] = False
            skipped.add(paths[i], err)
        elif for_stats[i]:
            sides.append(max(arr.shape))
            x = squash(arr, size).astype(np.float64) / 255.0
            s += x.sum()
            s2 += np.square(x).sum()
            npx += x.size
        if progress and (i + 1) % 256 == 0:
            progress(i + 1, len(paths))
    items = items[ok].reset_index(drop=True)
    if npx == 0:
        raise DataError(f"{ds.root}: none of the training images could be read "
                        f"({len(skipped)} unreadable, e.g. {skipped.rows[0][1] if len(skipped) else '?'})")
    mean = s / npx
    std = math.sqrt(max(s2 / npx - mean * mean, 0.0))
    if std < 1e-6:
        raise DataError(f"{ds.root}: every training pixel has the same value; the images carry no information")
    return items, skipped, PixelStats(mean=float(mean), std=float(std), side=float(np.median(sides)))


# ----------------------------------------------------------------------------------- fastai pipeline


def check_items_exist(items: pd.DataFrame, info) -> None:
    """The run's images must still be where training found them (interpret, resume)."""
    missing = [p for p in items.path if not Path(p).is_file()]
    if missing:
        raise DataError(f"{info.path}: {len(missing)} of the run's {len(items)} images are gone "
                        f"(first: {missing[0]}); put the data back at {' + '.join(info.cfg.data)}")


def select_items(ds: Dataset, splits: Sequence[str], sources: Sequence[str] = ()):
    """The items of `ds` in any of `splits` ("all": every split, unless the layout has a split of its own
    named so) and, if given, of `sources`; a split or source with no images is an error naming what exists.
    A layout without splits of its own (class folders) counts all its images whatever `splits` says."""
    items = ds.items
    if ds.split_given:
        for split in splits:
            if not len(items[items.split == split]) and not (split == "all" and len(items)):
                have = ", ".join(sorted(ds.items.split.unique()))
                raise DataError(f"{ds.where}: no images in split {split!r} (splits present: {have}); pick one with --split")
        if "all" not in splits or "all" in set(items.split):   # a split of the user's own named "all" wins
            items = items[items.split.isin(list(splits))]
    if sources:
        missing = sorted(set(sources) - set(items.source))
        if missing:
            raise DataError(f"{ds.where}: no images from source {missing[0]!r} in this split "
                            f"(sources: {', '.join(sorted(set(items.source) - {''})) or 'none'})")
        items = items[items.source.isin(list(sources))]
    return items.reset_index(drop=True)
