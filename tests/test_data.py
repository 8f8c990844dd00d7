"""data: dataset discovery (three layouts), splits, refusals, the pixel-stats scan and the fastai DataLoaders."""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import noise_image, write_image
from cxr_fastai.config import TrainConfig
from cxr_fastai.data.discover import COLUMNS, PixelStats, check_trainable, discover, group_split, scan
from cxr_fastai.data.loaders import build_dls
from cxr_fastai.io.images import decode_many
from cxr_fastai.errors import DataError
from cxr_fastai.io.images import read_grey, squash


def rel_paths(df: pd.DataFrame, root: Path) -> list[str]:
    return sorted(Path(p).relative_to(root.resolve()).as_posix() for p in df.path)


def write_csv(root: Path, rows: list[dict] | str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    csv = root / "labels.csv"
    if isinstance(rows, str):
        csv.write_text(rows)
    else:
        pd.DataFrame(rows).to_csv(csv, index=False)
    return csv


def csv_dataset(root: Path, rows: list[dict]) -> Path:
    """labels.csv layout: one small image per row (paths relative to root)."""
    rng = np.random.default_rng(0)
    for r in rows:
        write_image(root / r["path"], noise_image(rng, 16))
    write_csv(root, rows)
    return root


def raises_naming(match_path: Path | str, fn, *a, **kw) -> DataError:
    with pytest.raises(DataError) as ei:
        fn(*a, **kw)
    assert str(match_path) in str(ei.value), str(ei.value)
    return ei.value


# ----------------------------------------------------------------------------------- layout (a)

def test_split_folders_layout_reads_train_valid_and_test(make_folder_dataset):
    root = make_folder_dataset(classes=("B", "A"), n=3, splits=("train", "valid", "test"))
    ds = discover(root)
    assert ds.layout == "split-folders" and ds.split_given
    assert list(ds.items.columns) == list(COLUMNS)
    for split in ("train", "valid", "test"):
        part = ds.split(split)
        assert len(part) == 6
        assert all(Path(p).parent.parent.name == split for p in part.path)
        assert all(Path(p).parent.name == lab for p, lab in zip(part.path, part.label))
        assert all(Path(p).is_absolute() for p in part.path)
    assert check_trainable(ds) == ["A", "B"]


def test_split_folders_without_test_folder_is_fine(make_folder_dataset):
    ds = discover(make_folder_dataset(n=2, splits=("train", "valid")))
    assert set(ds.items.split) == {"train", "valid"}
    assert check_trainable(ds) == ["A", "B"]


def test_split_folders_without_valid_folder_is_refused(make_folder_dataset):
    root = make_folder_dataset(n=2, splits=("train",))
    e = raises_naming(root.resolve(), discover, root)
    assert "valid" in str(e)


def test_split_folders_images_in_nested_subfolders_are_found(tmp_path):
    root = tmp_path / "ds"
    for split in ("train", "valid"):
        for c in ("A", "B"):
            write_image(root / split / c / "sub" / "deeper" / "x.png", 10)
    ds = discover(root)
    assert len(ds.items) == 4 and set(ds.items.label) == {"A", "B"}


# ----------------------------------------------------------------------------------- layout (b)

def test_class_folders_layout_is_split_by_seed_reproducibly(make_folder_dataset):
    root = make_folder_dataset(classes=("A", "B"), n=25, splits=None)
    a, b = discover(root, valid_pct=0.2, seed=0), discover(root, valid_pct=0.2, seed=0)
    assert a.layout == "class-folders" and not a.split_given
    assert a.items.equals(b.items)
    others = [discover(root, valid_pct=0.2, seed=s).items.split.tolist() for s in (1, 2, 3)]
    assert any(o != a.items.split.tolist() for o in others)  # the seed matters
    n_valid = int((a.items.split == "valid").sum())
    assert n_valid == 10  # ~valid_pct of 50
    assert check_trainable(a) == ["A", "B"]


@pytest.mark.parametrize("n, pct", [(1, 0.2), (2, 0.2), (3, 0.5), (3, 0.9), (10, 0.99), (10, 0.01),
                                    (40, 0.3)])
def test_class_folders_split_leaves_both_splits_non_empty_with_every_class_in_train(make_folder_dataset, n, pct):
    root = make_folder_dataset(classes=("A", "B", "C"), n=n, splits=None)
    for seed in range(3):
        ds = discover(root, valid_pct=pct, seed=seed)
        if n == 1:
            # nothing can be held out without losing a class: train has all, and the refusal says so
            assert set(ds.items.split) == {"train"}
            raises_naming(ds.root, check_trainable, ds)
            continue
        assert (ds.items.split == "valid").any() and (ds.items.split == "train").any()
        assert check_trainable(ds) == ["A", "B", "C"]
        if n >= 10:
            share = (ds.items.split == "valid").mean()
            assert abs(share - pct) <= max(0.1, 1 / n + 1e-9) or pct > 0.9


def test_class_folders_a_class_with_one_image_still_trains(make_folder_dataset, tmp_path):
    root = make_folder_dataset(classes=("A", "B"), n=8, splits=None)
    write_image(root / "C" / "only.png", 50)
    for seed in range(10):
        ds = discover(root, valid_pct=0.2, seed=seed)
        assert check_trainable(ds) == ["A", "B", "C"]
        assert ds.items.loc[ds.items.label == "C", "split"].tolist() == ["train"]


def test_split_folders_a_class_with_one_image_still_trains(make_folder_dataset):
    root = make_folder_dataset(classes=("A", "B"), n=3)
    write_image(root / "train" / "C" / "only.png", 50)
    ds = discover(root)
    assert check_trainable(ds) == ["A", "B", "C"]


def test_non_image_files_and_hidden_files_are_ignored(make_folder_dataset):
    root = make_folder_dataset(classes=("A", "B"), n=3, splits=None)
    (root / "A" / "notes.txt").write_text("hello")
    (root / "A" / "Thumbs.db").write_bytes(b"\0")
    (root / "A" / "photo.heic").write_bytes(b"\0" * 10)
    write_image(root / "A" / ".hidden.png", 3)
    (root / "README.md").write_text("top-level file, not a class")
    (root / ".cache").mkdir()
    write_image(root / ".cache" / "x.png", 3)
    ds = discover(root)
    assert len(ds.items) == 6
    assert all(Path(p).suffix == ".png" and not Path(p).name.startswith(".") for p in ds.items.path)
    assert check_trainable(ds) == ["A", "B"]


def test_non_image_files_are_ignored_in_split_folders(make_folder_dataset):
    root = make_folder_dataset(n=2)
    (root / "train" / "A" / "labels.json").write_text("{}")
    (root / "valid" / "B" / "x.txt").write_text("x")
    assert len(discover(root).items) == 8


@pytest.mark.parametrize("names", [("zeta", "Alpha", "mid", "beta"), ("PNEUMONIA", "COVID19", "NORMAL")])
@pytest.mark.parametrize("splits", [("train", "valid"), None])
def test_class_order_is_sorted_names_for_any_number_of_classes(make_folder_dataset, names, splits):
    ds = discover(make_folder_dataset(classes=names, n=3, splits=splits))
    assert check_trainable(ds) == sorted(names) == ds.classes


def test_four_classes_from_labels_csv_are_sorted(tmp_path):
    rows = [dict(path=f"img/{c}{i}.png", label=c, split=s) for c in ("d", "b", "c", "a")
            for i, s in enumerate(("train", "train", "valid"))]
    ds = discover(csv_dataset(tmp_path / "ds", rows))
    assert check_trainable(ds) == ["a", "b", "c", "d"]


# ----------------------------------------------------------------------------------- layout (c)

def test_labels_csv_split_column_is_used_as_given(tmp_path):
    rows = [dict(path="imgs/a1.png", label="A", split="train"), dict(path="imgs/a2.png", label="A", split="valid"),
            dict(path="imgs/b1.png", label="B", split="train"), dict(path="imgs/b2.png", label="B", split="test"),
            dict(path="imgs/b3.png", label="B", split="valid")]
    root = csv_dataset(tmp_path / "ds", rows)
    ds = discover(root)
    assert ds.layout == "labels.csv" and ds.split_given
    got = {Path(p).name: (lab, s) for p, lab, s in zip(ds.items.path, ds.items.label, ds.items.split)}
    assert got == {Path(r["path"]).name: (r["label"], r["split"]) for r in rows}
    assert check_trainable(ds) == ["A", "B"]


def test_labels_csv_split_spellings_are_normalised(tmp_path):
    rows = [dict(path=f"{i}.png", label="AB"[i % 2], split=s)
            for i, s in enumerate(["Train", "training", "val", "VALIDATION", "testing", "test"])]
    ds = discover(csv_dataset(tmp_path / "ds", rows))
    assert ds.items.split.tolist() == ["train", "train", "valid", "valid", "test", "test"]


def test_labels_csv_wins_over_folder_names_that_contradict_it(tmp_path):
    root = tmp_path / "ds"
    # files sit in train/valid class folders, but the CSV says otherwise: the CSV is followed
    rows = [dict(path="train/A/1.png", label="B", split="valid"), dict(path="train/A/2.png", label="A", split="train"),
            dict(path="valid/B/3.png", label="A", split="train"), dict(path="valid/B/4.png", label="B", split="train"),
            dict(path="train/B/5.png", label="A", split="valid")]
    csv_dataset(root, rows)
    ds = discover(root)
    assert ds.layout == "labels.csv"
    got = {Path(p).relative_to(root.resolve()).as_posix(): (lab, s)
           for p, lab, s in zip(ds.items.path, ds.items.label, ds.items.split)}
    assert got == {r["path"]: (r["label"], r["split"]) for r in rows}


def test_labels_csv_wins_over_folders_when_both_exist(make_folder_dataset):
    root = make_folder_dataset(n=4)  # 16 images in train/valid class folders
    write_csv(root, [dict(path="train/A/A_0.png", label="A", split="train"),
                     dict(path="train/B/B_0.png", label="B", split="train"),
                     dict(path="valid/A/A_0.png", label="A", split="valid")])
    ds = discover(root)
    assert ds.layout == "labels.csv" and len(ds.items) == 3
    assert rel_paths(ds.items, root) == ["train/A/A_0.png", "train/B/B_0.png", "valid/A/A_0.png"]


def test_labels_csv_extra_columns_and_whitespace_are_tolerated(tmp_path):
    root = tmp_path / "ds"
    for n in ("a.png", "b.png", "c.png"):
        write_image(root / n, 1)
    write_csv(root, "Path, Label ,split,notes\n a.png , A ,train,x\nb.png,B,train,y\nc.png,A,valid,z\n")
    ds = discover(root)
    assert ds.items.label.tolist() == ["A", "B", "A"]
    assert set(ds.items.columns) == set(COLUMNS)


def test_labels_csv_without_split_keeps_patients_and_groups_on_one_side(tmp_path):
    rows = []
    for p in range(20):  # 20 patients of 3 images each
        for k in range(3):
            rows.append(dict(path=f"p{p}/{k}.png", label="AB"[p % 2], patient_id=f"P{p}", group=""))
    # a chain: patient X's image 0 and patient Y's image share a group (duplicate), Y's other image is
    # in group G2 with patient Z: X, Y and Z must all land on one side
    rows += [dict(path="x0.png", label="A", patient_id="X", group=""),
             dict(path="x1.png", label="B", patient_id="X", group="G1"),
             dict(path="y0.png", label="A", patient_id="Y", group="G1"),
             dict(path="y1.png", label="B", patient_id="Y", group="G2"),
             dict(path="z0.png", label="A", patient_id="Z", group="G2"),
             dict(path="n0.png", label="A", patient_id="", group="G3"),
             dict(path="n1.png", label="B", patient_id="", group="G3")]
    root = csv_dataset(tmp_path / "ds", rows)
    for seed in range(8):
        ds = discover(root, valid_pct=0.25, seed=seed)
        assert not ds.split_given
        it = ds.items
        for key in ("patient_id", "group"):
            keyed = it[it[key] != ""]
            assert (keyed.groupby(key).split.nunique() == 1).all(), (seed, key)
        chain = it[it.patient_id.isin(["X", "Y", "Z"])]
        assert chain.split.nunique() == 1, seed
        share = (it.split == "valid").mean()
        assert 0.1 <= share <= 0.4, (seed, share)
        assert set(it.split) == {"train", "valid"}


def test_labels_csv_without_split_is_reproducible_per_seed(tmp_path):
    rows = [dict(path=f"{i}.png", label="AB"[i % 2], patient_id=f"P{i // 2}") for i in range(40)]
    root = csv_dataset(tmp_path / "ds", rows)
    a, b = discover(root, seed=3), discover(root, seed=3)
    assert a.items.split.tolist() == b.items.split.tolist()


def test_labels_csv_without_split_or_ids_splits_items_individually(tmp_path):
    rows = [dict(path=f"{i}.png", label="AB"[i % 2]) for i in range(50)]
    ds = discover(csv_dataset(tmp_path / "ds", rows), valid_pct=0.2, seed=0)
    assert (ds.items.split == "valid").sum() == 10


def test_group_split_keeps_a_transitive_chain_together():
    # 0-1 share a patient, 1-2 share a group, 2-3 share a patient: one component of 4
    pids = ["A", "A", "B", "B"] + [f"s{i}" for i in range(16)]
    groups = ["", "g", "g", ""] + [""] * 16
    for seed in range(20):
        sp = group_split(pids, groups, 0.2, seed)
        assert len(set(sp[:4])) == 1
        assert sp.count("valid") >= 1 and sp.count("train") >= 1


def test_group_split_valid_share_stays_near_valid_pct_when_one_patient_is_huge():
    """A patient holding most images must not be put in valid just because the shuffle drew it first."""
    pids = ["big"] * 90 + [f"p{i}" for i in range(10)]
    for seed in range(30):
        sp = group_split(pids, [""] * 100, 0.2, seed)
        assert 5 <= sp.count("valid") <= 30, (seed, sp.count("valid"))
        assert sp[:90] == ["train"] * 90


def test_group_split_holds_out_the_smallest_component_when_every_one_overshoots():
    pids = ["a"] * 10 + ["b"] * 10 + ["c"] * 4
    sp = group_split(pids, [""] * 24, 0.1, 0)
    assert sp.count("valid") == 4 and sp[20:] == ["valid"] * 4


# --------------------------------------------------------------------------------------- refusals

def test_missing_root_is_refused_naming_it(tmp_path):
    raises_naming(tmp_path / "nope", discover, tmp_path / "nope")


def test_root_that_is_a_file_is_refused_naming_it(tmp_path):
    f = tmp_path / "data.zip"
    f.write_bytes(b"PK")
    e = raises_naming(f, discover, f)
    assert "file" in str(e)


def test_empty_folder_is_refused_naming_it(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    raises_naming(root.resolve(), discover, root)


def test_folder_with_only_non_images_is_refused(tmp_path):
    root = tmp_path / "ds"
    (root / "A").mkdir(parents=True)
    (root / "A" / "x.txt").write_text("x")
    raises_naming(root.resolve(), discover, root)


@pytest.mark.parametrize("splits", [("train", "valid"), None])
def test_one_class_only_is_refused_naming_the_folder(make_folder_dataset, splits):
    root = make_folder_dataset(classes=("ONLY",), n=5, splits=splits)
    ds = discover(root)
    e = raises_naming(root.resolve(), check_trainable, ds)
    assert "ONLY" in str(e) and "2 classes" in str(e)


def test_labels_csv_without_label_column_is_refused_naming_it(tmp_path):
    root = tmp_path / "ds"
    write_image(root / "a.png", 1)
    csv = write_csv(root, "path,class\na.png,A\n")
    e = raises_naming(csv, discover, root)
    assert "label" in str(e)


def test_labels_csv_with_header_only_is_refused(tmp_path):
    csv = write_csv(tmp_path / "ds", "path,label\n")
    raises_naming(csv, discover, tmp_path / "ds")


def test_empty_labels_csv_is_refused(tmp_path):
    csv = write_csv(tmp_path / "ds", "")
    raises_naming(csv, discover, tmp_path / "ds")


@pytest.mark.parametrize("body, line", [("a.png,A\n,B\n", 3), ("a.png,A\nb.png,\n", 3), ("a.png,  \n", 2)])
def test_labels_csv_empty_path_or_label_cell_is_refused_naming_the_line(tmp_path, body, line):
    root = tmp_path / "ds"
    for n in ("a.png", "b.png"):
        write_image(root / n, 1)
    csv = write_csv(root, "path,label\n" + body)
    e = raises_naming(csv, discover, root)
    assert f"line {line}" in str(e)


@pytest.mark.parametrize("second", ["a.png", "./a.png", "sub/../a.png"])
def test_labels_csv_duplicate_rows_are_refused(tmp_path, second):
    root = tmp_path / "ds"
    write_image(root / "a.png", 1)
    write_image(root / "b.png", 1)
    csv = write_csv(root, f"path,label,split\na.png,A,train\nb.png,B,train\n{second},A,valid\n")
    e = raises_naming(csv, discover, root)
    assert "a.png" in str(e) and "2 times" in str(e)


@pytest.mark.parametrize("bad", ["../x.png", "sub/../../x.png", "/etc/passwd"])
def test_labels_csv_path_escaping_the_root_is_refused(tmp_path, bad):
    root = tmp_path / "ds"
    write_image(tmp_path / "x.png", 1)
    write_image(root / "a.png", 1)
    csv = write_csv(root, f"path,label\na.png,A\n{bad},B\n")
    e = raises_naming(csv, discover, root)
    assert "outside" in str(e) and "line 3" in str(e)


def test_labels_csv_unknown_split_value_is_refused_naming_it(tmp_path):
    # a name of one's own (letters, digits, '-', '_') is a split for evaluate; anything else is refused
    root = csv_dataset(tmp_path / "ds", [dict(path="a.png", label="A", split="train"),
                                         dict(path="b.png", label="B", split="hold out?")])
    e = raises_naming(root / "labels.csv", discover, root)
    assert "hold out?" in str(e) and "line 3" in str(e)


def test_labels_csv_partly_empty_split_column_is_refused(tmp_path):
    root = csv_dataset(tmp_path / "ds", [dict(path="a.png", label="A", split="train"),
                                         dict(path="b.png", label="B", split="")])
    raises_naming(root / "labels.csv", discover, root)


def test_label_only_in_valid_is_refused_as_having_no_training_images(tmp_path):
    rows = [dict(path="a1.png", label="A", split="train"), dict(path="b1.png", label="B", split="train"),
            dict(path="a2.png", label="A", split="valid"), dict(path="c1.png", label="C", split="valid")]
    ds = discover(csv_dataset(tmp_path / "ds", rows))
    e = raises_naming(ds.root, check_trainable, ds)
    assert "'C'" in str(e) and "valid" in str(e)


def test_no_training_images_is_refused(tmp_path):
    rows = [dict(path="a.png", label="A", split="valid"), dict(path="b.png", label="B", split="test")]
    ds = discover(csv_dataset(tmp_path / "ds", rows))
    e = raises_naming(ds.root, check_trainable, ds)
    assert "no training images" in str(e)


def test_no_validation_images_is_refused(tmp_path):
    rows = [dict(path="a.png", label="A", split="train"), dict(path="b.png", label="B", split="train")]
    ds = discover(csv_dataset(tmp_path / "ds", rows))
    raises_naming(ds.root, check_trainable, ds)


# ------------------------------------------------------------------------------------------- scan

def grey_dataset(root: Path) -> Path:
    """Train: mid greys (two levels, several sizes); valid: white. Folder layout."""
    for c, levels in (("A", (100, 140)), ("B", (120, 160))):
        for i, (v, size) in enumerate(zip(levels * 2, (16, 24, 40, 30))):
            a = np.full((size, size), v, np.uint8)
            a[: size // 3] = v - 40  # a darker band, so that squashing matters
            write_image(root / "train" / c / f"{i}.png", a)
        for i in range(2):
            write_image(root / "valid" / c / f"{i}.png", 255, size=20)
    return root


def hand_stats(paths, size: int) -> tuple[float, float]:
    x = np.concatenate([squash(read_grey(p), size).ravel() / 255.0 for p in paths])
    return float(x.mean()), float(x.std())


@pytest.mark.parametrize("workers", [1, 4])
def test_scan_stats_come_from_training_images_only(tmp_path, workers):
    ds = discover(grey_dataset(tmp_path / "ds"))
    items, skipped, stats = scan(ds, ("train", "valid"), size=16, stats_limit=1000, seed=0, workers=workers)
    assert len(skipped) == 0 and len(items) == len(ds.items)
    mean, std = hand_stats(ds.split("train").path, 16)
    assert stats.mean == pytest.approx(mean, abs=1e-9) and stats.std == pytest.approx(std, abs=1e-9)
    everything, _ = hand_stats(ds.items.path, 16)
    assert everything > mean + 0.05  # the white validation images would have raised it
    assert isinstance(stats, PixelStats) and stats.to_dict() == {"mean": stats.mean, "std": stats.std, "side": stats.side}
    assert stats.side == 27.0  # the median longer side of the training images (16, 24, 40, 30 px, twice)


def test_scan_stats_limit_uses_a_seeded_sample_of_training_images(tmp_path):
    ds = discover(grey_dataset(tmp_path / "ds"))
    a = scan(ds, ("train", "valid"), 16, stats_limit=3, seed=5, workers=1)[2]
    b = scan(ds, ("train", "valid"), 16, stats_limit=3, seed=5, workers=1)[2]
    full = scan(ds, ("train", "valid"), 16, stats_limit=1000, seed=5, workers=1)[2]
    assert a == b and a != full
    means = {round(hand_stats(list(c), 16)[0], 12) for c in itertools.combinations(ds.split("train").path, 3)}
    assert round(a.mean, 12) in means


def test_scan_drops_unreadable_images_and_lists_them(tmp_path):
    root = grey_dataset(tmp_path / "ds")
    bad_train = root / "train" / "A" / "broken.png"
    bad_train.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    bad_valid = root / "valid" / "B" / "empty.jpg"
    bad_valid.write_bytes(b"")
    ds = discover(root)
    items, skipped, stats = scan(ds, ("train", "valid"), 16, 1000, 0, workers=2)
    assert len(items) == len(ds.items) - 2
    assert str(bad_train) not in set(items.path) and str(bad_valid) not in set(items.path)
    listed = skipped.frame()
    assert list(listed.columns) == ["path", "error"]
    assert sorted(listed.path) == sorted([str(bad_train.resolve()), str(bad_valid.resolve())])
    assert all(p in e for p, e in zip(listed.path, listed.error))
    good_train = [p for p in ds.split("train").path if p != str(bad_train.resolve())]
    assert stats.mean == pytest.approx(hand_stats(good_train, 16)[0], abs=1e-9)


def test_scan_only_decodes_the_splits_asked_for(tmp_path, make_folder_dataset):
    root = make_folder_dataset(n=2, splits=("train", "valid", "test"))
    (root / "test" / "A" / "A_0.png").write_bytes(b"junk")  # unreadable, but not asked for
    items, skipped, _ = scan(discover(root), ("train", "valid"), 16, 1000, 0, workers=1)
    assert len(skipped) == 0 and set(items.split) == {"train", "valid"}


def test_scan_fails_when_no_training_image_is_readable(tmp_path):
    root = grey_dataset(tmp_path / "ds")
    for p in (root / "train").rglob("*.png"):
        p.write_bytes(b"broken")
    ds = discover(root)
    e = raises_naming(ds.root, scan, ds, ("train", "valid"), 16, 1000, 0, workers=1)
    assert "none of the training images" in str(e)


def test_scan_refuses_training_images_without_any_contrast(tmp_path, make_folder_dataset):
    root = tmp_path / "flat"
    for split in ("train", "valid"):
        for c in ("A", "B"):
            write_image(root / split / c / "x.png", 90)
    ds = discover(root)
    raises_naming(ds.root, scan, ds, ("train", "valid"), 16, 1000, 0, workers=1)


def test_decode_many_yields_in_order_with_errors_for_bad_files(tmp_path):
    paths = [str(write_image(tmp_path / f"{i}.png", i % 256, size=4)) for i in range(150)]
    (tmp_path / "bad.png").write_bytes(b"x")
    paths.insert(70, str(tmp_path / "bad.png"))
    for workers in (1, 4):
        got = list(decode_many(paths, workers, fn=lambda a: int(a[0, 0])))
        assert [i for i, _, _ in got] == list(range(len(paths)))
        assert got[70][1] is None and "bad.png" in got[70][2]
        assert [v for _, v, _ in got if v is not None] == list(range(150))


# ---------------------------------------------------------------------------------------- build_dls

@pytest.fixture(scope="module")
def dls_case(tmp_path_factory):
    """One tiny dataset turned into fastai DataLoaders (fastai is imported once for the module)."""
    root = tmp_path_factory.mktemp("dls") / "ds"
    rng = np.random.default_rng(0)
    for split, n in (("train", 5), ("valid", 3)):
        for ci, c in enumerate(("PNEUMONIA", "COVID19", "NORMAL")):
            for i in range(n):
                h, w = (24, 40) if i % 2 else (50, 30)  # non-square, bigger and smaller than 32
                a = np.clip(rng.normal(110 + 20 * ci, 35, (h, w)), 0, 255).astype(np.uint8)
                write_image(root / split / c / f"{c}_{i}.png", a)
    ds = discover(root)
    classes = check_trainable(ds)
    items, _, stats = scan(ds, ("train", "valid"), 32, 1000, 0, workers=1)
    cfg = TrainConfig(data=str(root), size=32, bs=4, workers=0, device="cpu")
    dls = build_dls(items, classes, stats, cfg, "cpu")
    return dict(ds=ds, items=items, classes=classes, stats=stats, cfg=cfg, dls=dls)


def test_first_validation_batch_equals_read_grey_squash_in_order(dls_case):
    import torch

    dls, items, stats = dls_case["dls"], dls_case["items"], dls_case["stats"]
    x, y = dls.valid.one_batch()
    assert x.dtype == torch.float32 and tuple(x.shape) == (4, 1, 32, 32)
    valid = items[items.split == "valid"].reset_index(drop=True)
    want = np.stack([squash(read_grey(p), 32) for p in valid.path[:4]]).astype(np.float32) / 255.0
    got = (x[:, 0].cpu().numpy() * stats.std + stats.mean)
    assert np.abs(got - want).max() <= 1 / 255 + 1e-6
    classes = dls_case["classes"]
    assert classes == ["COVID19", "NORMAL", "PNEUMONIA"]
    assert y.tolist() == [classes.index(lab) for lab in valid.label[:4]]


def test_dataloaders_use_the_sorted_class_order_as_vocab(dls_case):
    assert list(dls_case["dls"].vocab) == dls_case["classes"] == sorted(dls_case["classes"])
    assert dls_case["dls"].c == 3


def test_normalize_holds_the_single_channel_training_stats(dls_case):
    from fastai.data.transforms import Normalize

    stats = dls_case["stats"]
    norms = [t for t in dls_case["dls"].valid.after_batch if isinstance(t, Normalize)]
    assert len(norms) == 1
    m, s = norms[0].mean, norms[0].std
    assert m.numel() == 1 and s.numel() == 1 and m.shape[1] == 1
    assert float(m.flatten()[0]) == pytest.approx(stats.mean, rel=1e-6)
    assert float(s.flatten()[0]) == pytest.approx(stats.std, rel=1e-6)


def test_dataloaders_hold_train_and_valid_items_with_the_configured_batch_size(dls_case):
    dls = dls_case["dls"]
    assert len(dls.train_ds) == 15 and len(dls.valid_ds) == 9
    assert dls.train.bs == 4
    x, y = dls.train.one_batch()
    assert tuple(x.shape) == (4, 1, 32, 32)


def test_batch_size_is_clamped_to_the_training_set_size(dls_case):
    c = dls_case
    dls = build_dls(c["items"], c["classes"], c["stats"], c["cfg"].replace(bs=256), "cpu")
    assert dls.train.bs == 15
    assert len(dls.train) == 1  # one full batch, not zero
