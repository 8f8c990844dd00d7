"""Data audit: what makes held-out metrics lie, found before anyone reports them.

Across splits it looks for
  - exact duplicates: the same file bytes (SHA-256) in two splits;
  - near duplicates: the same picture re-encoded, resized or slightly brightened. Found in two steps:
    candidates are pairs whose perceptual hashes (imagehash's phash of the grey image, 64 bits) differ in
    at most NEAR_DISTANCE bits (and whose bytes differ: byte copies are exact duplicates); a candidate is
    CONFIRMED only when the Pearson correlation of the two images' 32x32 grey thumbnails (the whole image
    squashed, as `images.squash` does) is >= MIN_SIMILARITY. The phash alone is not enough on chest
    X-rays: their low-frequency DCT structure is so alike that different patients often fall within 4
    bits (on cxr3 most phash candidates correlate < 0.95 and are visibly different pictures). A flat
    (constant) thumbnail has no correlation: it counts as 0, so it is never confirmed;
  - patients and duplicate groups (labels.csv columns patient_id, group) present in two splits;
and it tabulates class by source, with the "class mostly from one source" warnings of
`metrics.source_warnings` (a model can learn the hospital instead of the disease).

The candidate search is not all-pairs: the 64 hash bits are cut into NEAR_DISTANCE + 1 bands, and
two hashes that differ in at most NEAR_DISTANCE bits agree exactly on at least one band (pigeonhole), so
only hashes sharing a band value are compared — vectorised with numpy, one band at a time. The phash and
the thumbnail come from the same decoding pass (no image is decoded twice); thumbnails are kept as
standardised float32 rows (4 KiB per image), so a pair's correlation is a dot product / 1024. Only
exact duplicates and CONFIRMED near duplicates count as leakage (`AuditReport.leakage`, `--strict`);
the report also keeps the candidate count, a histogram of candidate correlations (SIMILARITY_BINS) and
example pairs with their phash distance and correlation, confirmed and rejected.

Unreadable images are listed, never fatal. Nothing here prints: `audit()` returns an AuditReport.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from ..config import SPLITS, AuditConfig, TrainConfig, write_json
from ..io.files import hash_files

NEAR_DISTANCE = AuditConfig.near_distance
MIN_SIMILARITY = AuditConfig.min_similarity
THUMB_SIZE = 32        # thumbnail side (pixels) for the correlation: THUMB_SIZE**2 values per image
SIMILARITY_BINS = (0.8, 0.9, 0.95)   # edges of the candidate-correlation histogram
MAX_EXAMPLES = 50      # example pairs / ids kept per finding (counts are always complete)
CONFOUND_GAP = 0.4    # a source whose share of a class differs from the other sources' by this much is named
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
class NearDuplicates(Duplicates):
    """Near duplicates. `candidates` counts the cross-split pairs within the phash distance (bytes differ);
    `pairs`, `images_by_split`, `pairs_by_distance` and `examples` are about the CONFIRMED ones (thumbnail
    correlation >= min_similarity) only. `similarity_histogram` counts the candidates per correlation bin;
    `rejected_examples` are unconfirmed candidates, most similar first. Examples carry `distance` (phash
    bits) and `correlation`."""
    candidates: int = 0
    candidates_by_distance: dict[str, int] = field(default_factory=dict)
    similarity_histogram: dict[str, int] = field(default_factory=dict)
    rejected_examples: list[dict[str, Any]] = field(default_factory=list)


def _bin_labels(edges: Sequence[float] = SIMILARITY_BINS) -> list[str]:
    return ([f"<{edges[0]:g}"] + [f"{lo:g}-{hi:g}" for lo, hi in zip(edges[:-1], edges[1:])]
            + [f">={edges[-1]:g}"])


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
    min_similarity: float
    exact: Duplicates
    near: NearDuplicates
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
            msgs.append(f"{self.near.pairs} near-duplicate pair(s) across splits ({self._near_rule()}; confirmed of "
                        f"{self.near.candidates} phash candidate(s); {_by(self.near.images_by_split)} image(s))")
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
        near = self.near
        lines.append(f"  near duplicates across splits ({self._near_rule()}): {near.pairs} pair(s) confirmed of "
                     f"{near.candidates} phash candidate(s)"
                     + (f" ({', '.join(f'{n} at {k} bits' for k, n in near.pairs_by_distance.items())}), "
                        f"images {_by(near.images_by_split)}"
                        if near.pairs else ""))
        if near.candidates:
            lines.append("    candidate thumbnail correlations: "
                         + ", ".join(f"{k} {n}" for k, n in near.similarity_histogram.items()))
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

    def _near_rule(self) -> str:
        return (f"phash distance <= {self.near_distance} and {THUMB_SIZE} px thumbnail correlation "
                f">= {self.min_similarity:g}")

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

def audit(data: str | Path, workers: int = AuditConfig.workers, near_distance: int = NEAR_DISTANCE,
          min_similarity: float = MIN_SIMILARITY,
          valid_pct: float = TrainConfig.valid_pct, seed: int = TrainConfig.seed) -> AuditReport:
    """Audit a dataset in any layout `data.discover` accepts (split as `train` would split it)."""
    from .discover import discover

    if not 0 <= near_distance <= 15:
        raise ValueError(f"near_distance must be in 0..15 bits, got {near_distance}")
    if not -1.0 <= min_similarity <= 1.0:
        raise ValueError(f"min_similarity must be a correlation in -1..1, got {min_similarity}")
    t0 = time.perf_counter()
    ds = discover(data, valid_pct, seed)
    items = ds.items.reset_index(drop=True)
    root = ds.root
    paths = items.path.tolist()
    rel = [_rel(p, root) for p in paths]
    splits = items.split.tolist()

    shas = hash_files(paths, workers)
    # a file whose bytes cannot be read cannot be decoded either, so this lists every unreadable image
    phashes, thumbs, unreadable = _phashes_and_thumbs(paths, workers)
    unreadable = [(_rel(p, root), e) for p, e in unreadable]
    sha_list = [s for s, _ in shas]

    counts = items.split.value_counts()
    return AuditReport(
        root=ds.where, layout=ds.layout, split_given=ds.split_given, n_images=len(items),
        n_by_split={s: int(counts[s]) for s in _split_codes(splits)[0]},
        near_distance=near_distance, min_similarity=float(min_similarity),
        exact=exact_duplicates(sha_list, splits, rel),
        near=near_duplicates(phashes, thumbs, sha_list, splits, rel, near_distance, min_similarity),
        patients=overlap(items, "patient_id", root),
        groups=overlap(items, "group", root),
        class_by_source=class_by_source(items),
        source_warnings=_source_warnings(items),
        unreadable=unreadable,
        seconds=time.perf_counter() - t0,
    )




def _phash_int(arr: np.ndarray) -> int:
    """imagehash's 64-bit phash of a grey array, as an int (bit 63 = first DCT coefficient)."""
    import imagehash
    from PIL import Image

    bits = imagehash.phash(Image.fromarray(arr, mode="L")).hash.reshape(-1)
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def _thumb(arr: np.ndarray) -> np.ndarray:
    """The image squashed to THUMB_SIZE x THUMB_SIZE, flattened and standardised (mean 0, population std 1)
    as float32, so that the Pearson correlation of two images is dot(a, b) / THUMB_SIZE**2. A flat image
    gives zeros (correlation 0 with anything)."""
    from ..io.images import squash

    x = squash(arr, THUMB_SIZE).astype(np.float32).reshape(-1)
    x -= x.mean()
    s = float(np.sqrt(np.mean(x * x)))
    return x / np.float32(s) if s > 1e-6 else np.zeros_like(x)


def _phash_and_thumb(arr: np.ndarray) -> tuple[int, np.ndarray]:
    return _phash_int(arr), _thumb(arr)


def _phashes_and_thumbs(paths: Sequence[str], workers: int
                        ) -> tuple[list[int | None], np.ndarray, list[tuple[str, str]]]:
    """Per path, from ONE decode: the phash (None when unreadable) and the standardised thumbnail, as rows
    of a (N, THUMB_SIZE**2) float32 array (zeros when unreadable); plus (path, error) per unreadable file."""
    from ..io.images import decode_many

    out: list[int | None] = [None] * len(paths)
    thumbs = np.zeros((len(paths), THUMB_SIZE * THUMB_SIZE), np.float32)
    bad: list[tuple[str, str]] = []
    for i, res, err in decode_many(paths, workers, fn=_phash_and_thumb):
        if res is None:
            bad.append((paths[i], err))
        else:
            out[i], thumbs[i] = res
    return out, thumbs, bad


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


def near_duplicates(phashes: Sequence[int | None], thumbs: np.ndarray, shas: Sequence[str | None],
                    splits: Sequence[str], paths: Sequence[str], max_distance: int = NEAR_DISTANCE,
                    min_similarity: float = MIN_SIMILARITY) -> NearDuplicates:
    """Image pairs in different splits whose phashes differ in <= max_distance bits and whose bytes differ
    (byte-identical pairs are exact duplicates, reported there) are candidates; a candidate is confirmed
    when the correlation of its two thumbnails (rows of `thumbs`, standardised as `_thumb` makes them) is
    >= min_similarity.

    The candidate search runs on distinct hashes (`near_pairs`); each candidate pair of distinct hashes,
    and each hash shared across splits, is then expanded to its image pairs and their correlations are
    taken in bounded blocks, so memory stays flat even for large groups of identical hashes."""
    ok = np.array([i for i, h in enumerate(phashes) if h is not None], np.int64)
    res = NearDuplicates(similarity_histogram=dict.fromkeys(_bin_labels(), 0))
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
    t = thumbs if len(ok) == len(thumbs) else thumbs[ok]   # thumbnail per position k (k indexes ok)
    tally = _Tally(len(ok), min_similarity)

    def block(a: np.ndarray, b: np.ndarray, d: int, same: bool) -> None:
        """All image pairs of a x b (a == b and pairs once when `same`) in different splits and bytes."""
        rows = max(1, (1 << 22) // len(b))             # at most 4M correlations (16 MB) at a time
        for s in range(0, len(a), rows):
            aa = a[s:s + rows]
            m = (code[aa][:, None] != code[b][None, :]) & (sha_key[aa][:, None] != sha_key[b][None, :])
            if same:
                m &= np.arange(s, s + len(aa))[:, None] < np.arange(len(b))[None, :]
            ia, ib = np.nonzero(m)
            if len(ia):
                r = (t[aa] @ t[b].T)[ia, ib] / np.float32(t.shape[1])
                tally.add(aa[ia], b[ib], np.full(len(ia), d, np.int64), r)

    order = np.argsort(u, kind="stable")              # positions grouped by distinct hash
    cnt = c.sum(1)
    first = np.r_[0, np.cumsum(cnt)[:-1]]

    def members(g: int) -> np.ndarray:
        return order[first[g]:first[g] + cnt[g]]

    # same hash (distance 0): buckets holding a cross-split pair that is not byte-identical
    # (identical bytes give identical hashes, so each content group sits inside one bucket)
    sha_bucket = np.zeros(len(cs), np.int64)
    sha_bucket[sha_key] = u
    identical = np.bincount(sha_bucket, weights=_cross_pairs(cs), minlength=len(uniq))
    for g in np.flatnonzero(_cross_pairs(c) - identical > 0).tolist():
        mg = members(g)
        block(mg, mg, 0, same=True)

    # different hashes within max_distance (their bytes necessarily differ)
    i, j, d = near_pairs(uniq, max_distance)
    cross = cnt[i] * cnt[j] - (c[i] * c[j]).sum(1)
    keep = cross > 0
    i, j, d = i[keep], j[keep], d[keep]
    n = cnt[i] * cnt[j]
    big = n > 4096
    for x in np.flatnonzero(big).tolist():
        block(members(int(i[x])), members(int(j[x])), int(d[x]), same=False)
    i, j, d, n = i[~big], j[~big], d[~big], n[~big]
    ends = np.cumsum(n)
    lo = 0
    while lo < len(n):                                # expand ~8k image pairs at a time, gathered in one go
        hi = max(lo + 1, int(np.searchsorted(ends, (ends[lo - 1] if lo else 0) + 8192, side="right")))
        ni = n[lo:hi]
        p = np.repeat(np.arange(lo, hi), ni)
        k = np.arange(ni.sum()) - np.repeat(np.cumsum(ni) - ni, ni)
        a = order[first[i[p]] + k // cnt[j[p]]]
        b = order[first[j[p]] + k % cnt[j[p]]]
        m = code[a] != code[b]
        a, b, p = a[m], b[m], p[m]
        r = np.einsum("ij,ij->i", t[a], t[b]) / np.float32(t.shape[1])
        tally.add(a, b, d[p], r)
        lo = hi

    res.candidates = int(tally.hist.sum())
    res.similarity_histogram = dict(zip(_bin_labels(), tally.hist.tolist()))
    res.candidates_by_distance = {str(k): int(v) for k, v in enumerate(tally.cand_by_d) if v}
    res.pairs = int(tally.conf_by_d.sum())
    res.pairs_by_distance = {str(k): int(v) for k, v in enumerate(tally.conf_by_d) if v}
    res.images_by_split = {s: int((tally.involved & (code == k)).sum()) for k, s in enumerate(names)}

    def examples(e: tuple[np.ndarray, ...]) -> list[dict[str, Any]]:
        return [_example({"path": paths[ok[a]], "split": names[code[a]]}, {"path": paths[ok[b]], "split": names[code[b]]},
                         names, distance=int(dd), correlation=round(float(r), 4))
                for a, b, dd, r in zip(*(x.tolist() for x in e))]

    res.examples = examples(tally.confirmed)
    res.rejected_examples = examples(tally.rejected)
    return res


class _Tally:
    """Running counts over candidate pairs (positions a, b; phash distance d; correlation r), and the
    MAX_EXAMPLES best examples: confirmed ones closest first (distance, then correlation), rejected ones
    most similar first."""

    def __init__(self, n: int, min_similarity: float):
        self.min_similarity = min_similarity
        self.hist = np.zeros(len(SIMILARITY_BINS) + 1, np.int64)
        self.cand_by_d = np.zeros(65, np.int64)
        self.conf_by_d = np.zeros(65, np.int64)
        self.involved = np.zeros(n, bool)
        e = np.zeros(0, np.int64)
        self.confirmed: tuple[np.ndarray, ...] = (e, e, e, np.zeros(0, np.float32))
        self.rejected: tuple[np.ndarray, ...] = self.confirmed

    def add(self, a: np.ndarray, b: np.ndarray, d: np.ndarray, r: np.ndarray) -> None:
        r = r.astype(np.float32)
        self.hist += np.bincount(np.searchsorted(np.array(SIMILARITY_BINS, np.float32), r, side="right"),
                                 minlength=len(SIMILARITY_BINS) + 1)
        self.cand_by_d += np.bincount(d, minlength=65)
        ok = r >= np.float32(self.min_similarity)
        self.conf_by_d += np.bincount(d[ok], minlength=65)
        self.involved[a[ok]] = True
        self.involved[b[ok]] = True
        self.confirmed = self._best(self.confirmed, (a[ok], b[ok], d[ok], r[ok]), by_distance=True)
        self.rejected = self._best(self.rejected, (a[~ok], b[~ok], d[~ok], r[~ok]), by_distance=False)

    @staticmethod
    def _best(old: tuple[np.ndarray, ...], new: tuple[np.ndarray, ...], by_distance: bool) -> tuple[np.ndarray, ...]:
        if not len(new[0]):
            return old
        a, b, d, r = (np.concatenate([x, y]) for x, y in zip(old, new))
        keys = (b, a, d, -r) if not by_distance else (b, a, -r, d)   # lexsort: last key is the primary one
        top = np.lexsort(keys)[:MAX_EXAMPLES]
        return a[top], b[top], d[top], r[top]


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
    from ..metrics import source_warnings

    if "source" not in items.columns or not (items.source != "").any():
        return []
    classes = sorted(items.label.unique().tolist())
    index = {c: k for k, c in enumerate(classes)}
    src = items.source.where(items.source != "", "(none)").tolist()
    return (source_warnings([index[c] for c in items.label], classes, src, threshold=SOURCE_SHARE)
            + confounds(items))


def confounds(items: pd.DataFrame, min_gap: float = CONFOUND_GAP) -> list[str]:
    """The other direction of a class-by-source confound, with its numbers: a source whose training images
    are of one class far more often (or far less often, or never) than the other sources' are. A model can
    then predict the class from the look of the source. Training images only (what a model learns from);
    all images when the layout has no train split."""
    if "source" not in items.columns or items.source.nunique() < 2 or not (items.source != "").all():
        return []
    part = items[items.split == "train"] if (items.split == "train").any() else items
    tab = pd.crosstab(part.source, part.label)
    out = []
    for s, row in tab.iterrows():
        rest = tab.drop(index=s).sum()
        n, n_rest = int(row.sum()), int(rest.sum())
        if n == 0 or n_rest == 0:
            continue
        for c in tab.columns:
            share, share_rest = row[c] / n, rest[c] / n_rest
            if abs(share - share_rest) >= min_gap:
                out.append(f"source '{s}': {share:.0%} {c} ({int(row[c]):,} of {n:,} training images) against "
                           f"{share_rest:.0%} in the other sources ({int(rest[c]):,} of {n_rest:,}): a model can "
                           f"learn this source's look as {'' if share > share_rest else 'not '}{c}")
    return out


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
