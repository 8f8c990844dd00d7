"""cxr3-adult with only RSNA's "Normal" films as training controls: a root `train` and `crossval` read as is.

cxr3-adult's NORMAL is RSNA's `Target = 0`, "no lung opacity"; 80% of those films are "No Lung Opacity /
Not Normal" (effusion, cardiomegaly, lines, nodules...). cxr3's NORMAL films are healthy chests (NIH films
with no finding, Kermany normals, RSNA "Normal"). Trained on both, the model is told that an abnormal adult
film without an opacity is NORMAL in one source and sees no such films in the others; the NIH pneumonias of
cxr3 come from text-mined reports, and RSNA's readers found no opacity in 22 of them (cxr3-adult's README). Cohen et al. (MIDL 2020, "On the limits of cross-domain generalization in
automated X-ray prediction") found such label disagreement between datasets, not only image shift, to
limit transfer.

This writes OUT/labels.csv and a link OUT/img to cxr3-adult (no image is copied). Every row keeps its label
and split, except the training controls whose RSNA class is not "Normal" (or unknown): their split becomes
`nonopacity`, a split name of the user's own, which `train` leaves out and counts ("N image(s) of other
splits left out of training"). Validation and test are unchanged, so figures stay comparable with models
trained on the whole set, and `evaluate OUT --split nonopacity` scores the films left out.

    python benchmarks/adult_controls.py OUT [--data ../shared/data/cxr3-adult] [--splits train]
    cxr-fastai train ../shared/data/cxr3 OUT --run RUN --size 32 --epochs 10

--data defaults to cxr3-adult beside the repository ($CXR_DATA_ROOT for its parent folder).
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from last_layer import default_roots  # the benchmarks' one default for the data roots

MOVED = "nonopacity"


def rewrite(rows: list[dict], classes: dict[str, str], splits: set[str]) -> tuple[list[dict], int]:
    """The rows with paths under img/ and the non-"Normal" NORMAL rows of `splits` moved to split MOVED."""
    out, moved = [], 0
    for r in rows:
        r = dict(r)
        if r["split"] in splits and r["label"] == "NORMAL" and classes.get(r["path"], "") != "Normal":
            r["split"] = MOVED
            moved += 1
        r["path"] = f"img/{r['path']}"
        out.append(r)
    return out, moved


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="folder to create (must not exist)")
    ap.add_argument("--data", type=Path, default=default_roots()[1])
    ap.add_argument("--splits", nargs="+", default=["train"], help="splits whose non-Normal controls move out")
    a = ap.parse_args(argv)
    data = a.data.resolve()
    for f in ("labels.csv", "rsna_class.csv"):
        if not (data / f).is_file():
            print(f"error: {data / f} not found (is --data cxr3-adult?)", file=sys.stderr)
            return 2
    if a.out.exists():
        print(f"error: {a.out} exists; choose a new folder", file=sys.stderr)
        return 2
    with open(data / "rsna_class.csv", newline="") as f:
        classes = {r["path"]: r["rsna_class"] for r in csv.DictReader(f)}
    with open(data / "labels.csv", newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)
    out_rows, moved = rewrite(rows, classes, set(a.splits))
    a.out.mkdir(parents=True)
    (a.out / "img").symlink_to(data, target_is_directory=True)
    with open(a.out / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(out_rows)
    print(f"{a.out}: {len(out_rows)} rows, {moved} NORMAL row(s) of {', '.join(sorted(a.splits))} moved to "
          f"split '{MOVED}' (RSNA class not 'Normal')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
