"""Data audit: what makes held-out metrics lie, found before anyone reports them.

Across splits it looks for
  - exact duplicates: the same file bytes (SHA-256) in two splits;
  - near duplicates: the same picture re-encoded, resized or slightly brightened, found by perceptual
    hash (imagehash's phash of the grey image, 64 bits) within NEAR_DISTANCE bits;
  - patients and duplicate groups (labels.csv columns patient_id, group) present in two splits;
and it tabulates class by source, with the "class mostly from one source" warnings of
`metrics.source_warnings` (a model can learn the hospital instead of the disease).

The near-duplicate search is not all-pairs: the 64 hash bits are cut into NEAR_DISTANCE + 1 bands, and
two hashes that differ in at most NEAR_DISTANCE bits agree exactly on at least one band (pigeonhole), so
only hashes sharing a band value are compared — vectorised with numpy, one band at a time.

Unreadable images are listed, never fatal. Nothing here prints: `audit()` returns an AuditReport.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from .config import SPLITS, TrainConfig, write_json
from .export import sha256_file

NEAR_DISTANCE = 4      # bits of 64: phash Hamming distance at or below which two images count as the same
MAX_EXAMPLES = 50      # example pairs / ids kept per finding (counts are always complete)
SOURCE_SHARE = 0.8     # a class whose images come >= this share from one source gets a warning


@dataclass
class Duplicates:
    """Image pairs in different splits. `pairs` counts every cross-split pair; `images_by_split` counts,
    per split, the images that have a counterpart in another split."""
    pairs: int = 0
    images_by_split: dict[str, int] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)
    pairs_by_distance: dict[str, int] = field(default_factory=dict)   # near only: phash bits -> pairs

    @property
    def images(self) -> int:
        return sum(self.images_by_split.values())


@dataclass
class Overlap:
    """Values of one labels.csv column (patient_id or group) found in more than one split."""
    column: str
    present: bool = False          # the column has any non-empty value
    ids: int = 0
    images_by_split: dict[str, int] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def images(self) -> int:
        return sum(self.images_by_split.values())


@dataclass
class AuditReport:
    root: str
    layout: str
    split_given: bool
    n_images: int
    n_by_split: dict[str, int]
    near_distance: int
    exact: Duplicates
    near: Duplicates
    patients: Overlap
    groups: Overlap
    class_by_source: dict[str, dict[str, dict[str, int]]] | None   # split (and "all") -> class -> source -> n
    source_warnings: list[str]
    unreadable: list[tuple[str, str]]                             # (path relative to root, error)
    seconds: float

    @property
    def leakage(self) -> bool:
        return bool(self.exact.pairs or self.near.pairs or self.patients.ids or self.groups.ids)

    def leak_messages(self) -> list[str]:
        """One sentence per kind of cross-split leakage found (empty when the splits are clean)."""
        msgs = []
        if self.exact.pairs:
            msgs.append(f"{self.exact.pairs} exact duplicate pair(s) across splits ({_by(self.exact.images_by_split)} "
                        "image(s) with a byte-identical copy in another split)")
        if self.near.pairs:
            msgs.append(f"{self.near.pairs} near-duplicate pair(s) across splits (phash distance <= {self.near_distance}; "
                        f"{_by(self.near.images_by_split)} image(s))")
        for ov, what in ((self.patients, "patient id"), (self.groups, "group")):
            if ov.ids:
                msgs.append(f"{ov.ids} {what}(s) in more than one split (e.g. {ov.examples[0]['id']!r}; "
                            f"{_by(ov.images_by_split)} image(s))")
        return msgs

    def summary_lines(self) -> list[str]:
        """A short human summary (the CLI prints it; the JSON report has everything)."""
        lines = [f"audited {self.n_images} images of {self.root} ({self.layout}; {_by(self.n_by_split)}) "
                 f"in {self.seconds:.1f} s; {len(self.unreadable)} unreadable"]
        lines.append(f"  exact duplicates across splits: {self.exact.pairs} pair(s)"
                     + (f", images {_by(self.exact.images_by_split)}" if self.exact.pairs else ""))
        lines.append(f"  near duplicates across splits (phash distance <= {self.near_distance}): {self.near.pairs} pair(s)"
                     + (f" ({', '.join(f'{n} at {k} bits' for k, n in self.near.pairs_by_distance.items())}), "
                        f"images {_by(self.near.images_by_split)}"
                        if self.near.pairs else ""))
        for ov, what in ((self.patients, "patient ids"), (self.groups, "groups")):
            if not ov.present:
                lines.append(f"  {what} in more than one split: no {ov.column} column")
            else:
                lines.append(f"  {what} in more than one split: {ov.ids}"
                             + (f", images {_by(ov.images_by_split)}" if ov.ids else ""))
        if self.class_by_source:
            for cls, by_src in self.class_by_source["all"].items():
                total = sum(by_src.values())
                parts = ", ".join(f"{s} {n}" for s, n in sorted(by_src.items(), key=lambda kv: -kv[1]))
                lines.append(f"  class {cls} ({total}): {parts}")
        return lines

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("exact", "near", "patients", "groups"):
            d[k]["images"] = getattr(self, k).images
        d["unreadable"] = [{"path": p, "error": e} for p, e in self.unreadable]
        d["leakage"] = self.leakage
        d["leak_messages"] = self.leak_messages()
        return d


def _by(counts: dict[str, int]) -> str:
    return ", ".join(f"{s} {n}" for s, n in counts.items() if n) or "0"


def write_report(rep: AuditReport, out: str | Path) -> None:
    write_json(Path(out), rep.to_dict())


# -------------------------------------------------------------------------------------------- audit

def audit(data: str | Path, workers: int = 4, near_distance: int = NEAR_DISTANCE,
          valid_pct: float = TrainConfig.valid_pct, seed: int = TrainConfig.seed) -> AuditReport:
    """Audit a dataset in any layout `data.discover` accepts (split as `train` would split it)."""
    from .data import discover

    if not 0 <= near_distance <= 15:
        raise ValueError(f"near_distance must be in 0..15 bits, got {near_distance}")
    t0 = time.perf_counter()
    ds = discover(data, valid_pct, seed)
    items = ds.items.reset_index(drop=True)
    root = ds.root
    paths = items.path.tolist()
    rel = [_rel(p, root) for p in paths]
    splits = items.split.tolist()

    shas = hash_files(paths, workers)
    # a file whose bytes cannot be read cannot be decoded either, so this lists every unreadable image
    phashes, unreadable = _phashes(paths, workers)
    unreadable = [(_rel(p, root), e) for p, e in unreadable]
    sha_list = [s for s, _ in shas]

    counts = items.split.value_counts()
    return AuditReport(
        root=str(root), layout=ds.layout, split_given=ds.split_given, n_images=len(items),
        n_by_split={s: int(counts.get(s, 0)) for s in SPLITS if counts.get(s, 0)},
        near_distance=near_distance,
        exact=exact_duplicates(sha_list, splits, rel),
        near=near_duplicates(phashes, sha_list, splits, rel, near_distance),
        patients=overlap(items, "patient_id", root),
        groups=overlap(items, "group", root),
        class_by_source=class_by_source(items),
        source_warnings=_source_warnings(items),
        unreadable=unreadable,
        seconds=time.perf_counter() - t0,
    )


def cheap_checks(items: pd.DataFrame, workers: int = 4) -> list[str]:
    """The checks `train` can afford before training (no decoding): patient/group overlap from labels.csv
    and byte-identical images between train and valid. One warning sentence per problem found."""
    items = items[items.split.isin(("train", "valid"))].reset_index(drop=True)
    out = []
    for col, what in (("patient_id", "patient id"), ("group", "duplicate group")):
        if col not in items.columns:
            continue
        ov = overlap(items, col)
        if ov.ids:
            out.append(f"{ov.ids} {what}(s) are in both train and valid (e.g. {ov.examples[0]['id']!r}, "
                       f"{ov.images} images): validation scores will be optimistic; give each {what} a single split "
                       "(`cxr-fastai audit DATA_DIR` lists them)")
    shas = [s for s, _ in hash_files(items.path.tolist(), workers)]
    ex = exact_duplicates(shas, items.split.tolist(), items.path.tolist())
    if ex.pairs:
        e = ex.examples[0]
        out.append(f"{ex.images_by_split.get('valid', 0)} validation image(s) are byte-identical copies of training "
                   f"images (e.g. {e['b']} = {e['a']}): validation scores will be optimistic; remove the copies "
                   "(`cxr-fastai audit DATA_DIR` lists them)")
    return out


def hash_files(paths: Sequence[str], workers: int = 4) -> list[tuple[str | None, str]]:
    """(SHA-256 hex or None, error) per path, in order; hashlib drops the GIL, so threads help."""
    def one(p: str) -> tuple[str | None, str]:
        try:
            return sha256_file(Path(p)), ""
        except OSError as e:
            return None, f"{p}: cannot read the file ({type(e).__name__}: {e.strerror or e})"

    if workers <= 1:
        return [one(p) for p in paths]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, paths))


def _phash_int(arr: np.ndarray) -> int:
    """imagehash's 64-bit phash of a grey array, as an int (bit 63 = first DCT coefficient)."""
    import imagehash
    from PIL import Image

    bits = imagehash.phash(Image.fromarray(arr, mode="L")).hash.reshape(-1)
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def _phashes(paths: Sequence[str], workers: int) -> tuple[list[int | None], list[tuple[str, str]]]:
    from .data import decode_many

    out: list[int | None] = [None] * len(paths)
    bad: list[tuple[str, str]] = []
    for i, h, err in decode_many(paths, workers, fn=_phash_int):
        if h is None:
            bad.append((paths[i], err))
        else:
            out[i] = h
    return out, bad


def _rel(path: str, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return os.path.relpath(path, root)


def _split_codes(splits: Sequence[str]) -> tuple[list[str], np.ndarray]:
    names = [s for s in SPLITS if s in set(splits)] + sorted(set(splits) - set(SPLITS))
    code = {s: i for i, s in enumerate(names)}
    return names, np.array([code[s] for s in splits], dtype=np.int64)


def _cross_pairs(c: np.ndarray) -> np.ndarray:
    """Pairs in different splits within each row of split counts c (rows: groups, cols: splits)."""
    n = c.sum(axis=1)
    return (n * n - (c * c).sum(axis=1)) // 2


def _order(a: dict, b: dict, names: list[str]) -> tuple[dict, dict]:
    """The pair with the earlier split (train before valid before test) first."""
    return (a, b) if names.index(a["split"]) <= names.index(b["split"]) else (b, a)


def _example(a: dict, b: dict, names: list[str], **extra: Any) -> dict[str, Any]:
    a, b = _order(a, b, names)
    return {"a": a["path"], "split_a": a["split"], "b": b["path"], "split_b": b["split"], **extra}


# ------------------------------------------------------------------------------------ exact duplicates

def exact_duplicates(shas: Sequence[str | None], splits: Sequence[str], paths: Sequence[str]) -> Duplicates:
    """Byte-identical files (same SHA-256) in different splits; None hashes (unreadable files) ignored."""
    ok = [i for i, s in enumerate(shas) if s is not None]
    res = Duplicates()
    if not ok:
        return res
    names, code = _split_codes([splits[i] for i in ok])
    key = pd.factorize(pd.Series([shas[i] for i in ok]))[0]
    c = np.zeros((key.max() + 1, len(names)), np.int64)
    np.add.at(c, (key, code), 1)
    res.pairs = int(_cross_pairs(c).sum())
    # an image leaks when its group holds an image of another split
    involved = (c.sum(axis=1)[key] - c[key, code]) > 0
    res.images_by_split = {s: int((involved & (code == k)).sum()) for k, s in enumerate(names)}
    if res.pairs:
        leaky = np.flatnonzero(_cross_pairs(c) > 0)
        members: dict[int, list[int]] = {}
        for j, g in enumerate(key):
            if len(members) < MAX_EXAMPLES or g in members:
                members.setdefault(int(g), []).append(j)
        for g in leaky[:MAX_EXAMPLES]:
            js = members.get(int(g), [])
            recs = [{"path": paths[ok[j]], "split": names[code[j]]} for j in js]
            pair = next(((x, y) for x in recs for y in recs if x["split"] != y["split"]), None)
            if pair:
                res.examples.append(_example(*pair, names, sha256=shas[ok[js[0]]], copies=len(js)))
    return res


# ------------------------------------------------------------------------------------- near duplicates

def _popcount64(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):     # numpy >= 2.0
        return np.bitwise_count(x).astype(np.int64)
    table = np.array([bin(i).count("1") for i in range(256)], np.int64)
    return table[x.astype(np.uint64).view(np.uint8).reshape(-1, 8)].sum(axis=1)


def near_pairs(h: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Index pairs (i, j, distance), i < j, of the DISTINCT 64-bit hashes h within max_distance bits.

    Banded (multi-index) search: the bits are cut into max_distance + 1 bands; hashes within
    max_distance bits agree on at least one whole band, so only hashes sharing a band value are
    compared. A pair that shares several bands is kept only in the first one. Work grows with the
    number of same-band pairs, not with N^2."""
    h = np.asarray(h, dtype=np.uint64)
    edges = np.linspace(0, 64, max_distance + 2).round().astype(int)
    keys = [(h >> np.uint64(lo)) & np.uint64((1 << (hi - lo)) - 1) for lo, hi in zip(edges[:-1], edges[1:])]
    out_i, out_j, out_d = [], [], []
    for b, key in enumerate(keys):
        order = np.argsort(key, kind="stable")
        k = key[order]
        start = np.r_[True, k[1:] != k[:-1]] if len(k) else np.zeros(0, bool)
        run_id = np.cumsum(start) - 1
        run_start = np.flatnonzero(start)
        run_len = np.diff(np.r_[run_start, len(k)])
        left = run_len[run_id] - (np.arange(len(k)) - run_start[run_id]) - 1   # later members of its run
        active = np.flatnonzero(left > 0)
        off = 1
        # compare every sorted position with the one `off` places on, for all runs at once
        while active.size:
            a, c = order[active], order[active + off]
            d = _popcount64(h[a] ^ h[c])
            keep = d <= max_distance
            for prev in keys[:b]:
                keep &= prev[a] != prev[c]
            a, c, d = a[keep], c[keep], d[keep]
            out_i.append(np.minimum(a, c))
            out_j.append(np.maximum(a, c))
            out_d.append(d)
            off += 1
            active = active[left[active] >= off]
    if not out_i:
        e = np.zeros(0, np.int64)
        return e, e, e
    return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_d)


def near_duplicates(phashes: Sequence[int | None], shas: Sequence[str | None], splits: Sequence[str],
                    paths: Sequence[str], max_distance: int = NEAR_DISTANCE) -> Duplicates:
    """Image pairs in different splits whose phashes differ in <= max_distance bits and whose bytes differ
    (byte-identical pairs are exact duplicates, reported there). Counted per distinct hash, never pair by
    pair, so thousands of identical (e.g. blank) images cost nothing extra."""
    ok = np.array([i for i, h in enumerate(phashes) if h is not None], np.int64)
    res = Duplicates()
    if len(ok) < 2:
        return res
    names, code = _split_codes([splits[i] for i in ok])
    h = np.array([phashes[i] for i in ok], dtype=np.uint64)
    uniq, u = np.unique(h, return_inverse=True)
    u = u.reshape(-1)
    n_s = len(names)
    c = np.zeros((len(uniq), n_s), np.int64)         # images per (distinct hash, split)
    np.add.at(c, (u, code), 1)
    sha_key = pd.factorize(pd.Series([shas[i] if shas[i] is not None else f"?{i}" for i in ok]))[0]
    cs = np.zeros((sha_key.max() + 1, n_s), np.int64)  # images per (file content, split)
    np.add.at(cs, (sha_key, code), 1)

    # same hash (distance 0), different bytes: pairs per hash bucket minus the byte-identical ones
    same_pairs = int(_cross_pairs(c).sum() - _cross_pairs(cs).sum())
    involved = ((c.sum(1)[u] - c[u, code]) - (cs.sum(1)[sha_key] - cs[sha_key, code])) > 0

    # different hashes within max_distance
    i, j, d = near_pairs(uniq, max_distance)
    tot = c.sum(1)
    cross = tot[i] * tot[j] - (c[i] * c[j]).sum(1)
    keep = cross > 0
    i, j, d, cross = i[keep], j[keep], d[keep], cross[keep]
    bits = (c > 0).astype(np.int64) << np.arange(n_s)   # split-presence bit mask per distinct hash
    mask = bits.sum(1)
    nb = np.zeros(len(uniq), np.int64)                   # splits present among each hash's neighbours
    np.bitwise_or.at(nb, i, mask[j])
    np.bitwise_or.at(nb, j, mask[i])
    involved |= (nb[u] & ~(np.int64(1) << code)) != 0

    res.pairs = same_pairs + int(cross.sum())
    by_d = {0: same_pairs, **{int(k): int(cross[d == k].sum()) for k in np.unique(d)}}
    res.pairs_by_distance = {str(k): n for k, n in sorted(by_d.items()) if n}
    res.images_by_split = {s: int((involved & (code == k)).sum()) for k, s in enumerate(names)}
    if res.pairs:
        res.examples = _near_examples(u, code, sha_key, i, j, d, c, cs, ok, names, paths)
    return res


def _near_examples(u, code, sha_key, i, j, d, c, cs, ok, names, paths) -> list[dict[str, Any]]:
    """Up to MAX_EXAMPLES pairs, closest first: same-hash pairs (distance 0), then by distance."""
    members: dict[int, list[int]] = {}
    want = set(np.flatnonzero(_cross_pairs(c) > 0).tolist()) | set(i.tolist()) | set(j.tolist())
    for k, g in enumerate(u.tolist()):
        if g in want:
            members.setdefault(g, []).append(k)

    def rec(k: int) -> dict:
        return {"path": paths[ok[k]], "split": names[code[k]]}

    out: list[dict[str, Any]] = []
    for g in np.flatnonzero(_cross_pairs(c) > 0).tolist():
        ks = members[g]
        pair = next(((a, b) for a in ks for b in ks
                     if code[a] != code[b] and sha_key[a] != sha_key[b]), None)
        if pair:
            out.append(_example(rec(pair[0]), rec(pair[1]), names, distance=0))
        if len(out) >= MAX_EXAMPLES:
            return out
    for x in np.argsort(d, kind="stable").tolist():
        pair = next(((a, b) for a in members[int(i[x])] for b in members[int(j[x])] if code[a] != code[b]), None)
        if pair:
            out.append(_example(rec(pair[0]), rec(pair[1]), names, distance=int(d[x])))
        if len(out) >= MAX_EXAMPLES:
            break
    return out


# --------------------------------------------------------------------------------- labels.csv columns

def overlap(items: pd.DataFrame, column: str, root: Path | None = None) -> Overlap:
    """Non-empty values of `column` that occur in more than one split."""
    res = Overlap(column)
    if column not in items.columns:
        return res
    vals = items[column].astype(str)
    have = items[vals != ""]
    res.present = len(have) > 0
    if not res.present:
        return res
    per = have.groupby(column).split.nunique()
    bad = per[per > 1].index
    res.ids = len(bad)
    leaky = have[have[column].isin(bad)]
    counts = leaky.split.value_counts()
    res.images_by_split = {s: int(counts.get(s, 0)) for s in [*SPLITS, *sorted(set(counts.index) - set(SPLITS))]
                           if counts.get(s, 0)}
    for v in sorted(bad)[:MAX_EXAMPLES]:
        sub = leaky[leaky[column] == v]
        by = sub.split.value_counts()
        res.examples.append({"id": v, "splits": {s: int(by[s]) for s in SPLITS if s in by},
                             "paths": [_rel(p, root) if root else p for p in sub.path[:4]]})
    return res


def class_by_source(items: pd.DataFrame) -> dict[str, dict[str, dict[str, int]]] | None:
    """split (and "all") -> class -> source -> image count; None without a source column."""
    if "source" not in items.columns or not (items.source != "").any():
        return None
    src = items.source.where(items.source != "", "(none)")
    out: dict[str, dict[str, dict[str, int]]] = {}
    for name, part in [("all", items), *[(s, items[items.split == s]) for s in SPLITS]]:
        if len(part) == 0:
            continue
        tab = pd.crosstab(part.label, src[part.index])
        out[name] = {str(cl): {str(s): int(n) for s, n in row.items() if n} for cl, row in tab.iterrows()}
    return out


def _source_warnings(items: pd.DataFrame) -> list[str]:
    from .metrics import source_warnings

    if "source" not in items.columns or not (items.source != "").any():
        return []
    classes = sorted(items.label.unique().tolist())
    index = {c: k for k, c in enumerate(classes)}
    src = items.source.where(items.source != "", "(none)").tolist()
    return source_warnings([index[c] for c in items.label], classes, src, threshold=SOURCE_SHARE)
