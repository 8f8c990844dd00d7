"""Write and read artifacts: fastai pickle, safetensors weights, model.onnx and manifest.json, in one folder.

Reading never unpickles: weights come from safetensors, checked against the manifest's SHA-256 first
(that detects corruption and accidental edits; it is not a signature, the manifest sits beside them).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import CONTRAST, MAX_CROP_BORDER, EvalConfig
from ..metrics import source_gaps
from ..errors import ArtifactError, RunError
from ..io.files import atomic_folder, recover_folder, sha256_file

FORMAT_VERSION = 1
WEIGHTS, PICKLE, MANIFEST = "model.safetensors", "model.pkl", "manifest.json"
MODEL_ONNX = "model.onnx"          # the same weights as an ONNX graph (image -> probabilities); absent in older artifacts
ONNX_OPSET = 18                    # the opset the dynamo exporter's torchlib is written for (no version conversion)
ONNX_INPUT, ONNX_OUTPUT = "image", "probabilities"
DEFAULT_EXPORT_DIR = Path("export")



@dataclass
class Artifact:
    folder: Path
    manifest: dict[str, Any]

    @property
    def files(self) -> list[str]:
        return [MANIFEST, WEIGHTS] + ([PICKLE] if self.has_pickle else []) + ([MODEL_ONNX] if self.has_onnx else [])

    @property
    def has_pickle(self) -> bool:
        """Whether the manifest lists a model.pkl (`cxr-fastai adapt` without --trust-pickle writes none)."""
        return PICKLE in self.manifest.get("files", {})

    @property
    def has_onnx(self) -> bool:
        """Whether the manifest lists a model.onnx (artifacts exported before ONNX output have none)."""
        return MODEL_ONNX in self.manifest.get("files", {}) and isinstance(self.manifest.get("onnx"), dict)

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def size(self) -> int:
        return int(self.manifest["input"]["size"])

    @property
    def cache_side(self) -> int:
        """px: the side training's crops were cut from (TTA cuts its crops at it); 2x the input before
        it was recorded."""
        return int(self.manifest["input"].get("cache_side") or 2 * self.size)

    @property
    def contrast(self) -> str:
        """The per-image contrast step applied after reading, before resizing (io.images.apply_contrast)."""
        return str(self.manifest["input"].get("contrast") or "none")

    @property
    def crop_border(self) -> float:
        """The fraction cut from each edge after reading, before the contrast step (io.images.crop_border)."""
        return float(self.manifest["input"].get("crop_border") or 0.0)

    @property
    def mean(self) -> float:
        return float(self.manifest["normalization"]["mean"])

    @property
    def std(self) -> float:
        return float(self.manifest["normalization"]["std"])


def export_run(run: str | Path, to: str | Path | None = None, force: bool = False) -> Artifact:
    import torch
    from safetensors.torch import save_file

    from ..train.runs import load_run

    info = load_run(run)
    pkl = info.path / "learner.pkl"
    if not info.meta.get("finished") or not pkl.is_file():
        raise RunError(f"{info.path}: training has not finished (no learner.pkl); "
                       f"finish it with `cxr-fastai train --resume --run {info.path}`")
    dest = Path(to) if to is not None else DEFAULT_EXPORT_DIR / info.path.resolve().name
    check_destination(dest, force)
    try:
        state = torch.load(info.best_path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RunError(f"{info.best_path}: checkpoint cannot be read ({type(e).__name__}); retrain the run") from e
    with atomic_folder(dest) as tmp:
        shutil.copyfile(pkl, tmp / PICKLE)
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / WEIGHTS), metadata={"format": "pt"})
        onnx = export_onnx(state, info.classes, info.cfg.widths, info.cfg.size, tmp / MODEL_ONNX)
        manifest = build_manifest(info, tmp, onnx=onnx)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n")
    return Artifact(dest, manifest)


def check_destination(dest: Path, force: bool) -> None:
    """An artifact folder about to be written: put back what a killed swap left aside, then refuse an existing
    folder without `force` and a file always."""
    recover_folder(dest)
    if dest.exists() and not force:
        raise ArtifactError(f"{dest}: already exists; pass --force to replace it or --to another folder")
    if dest.exists() and not dest.is_dir():
        raise ArtifactError(f"{dest}: exists and is a file; choose another --to folder")


def export_onnx(state: dict, classes: list[str], widths, size: int, path: Path) -> dict[str, Any]:
    """Write the ResNet9 with these weights as ONE self-contained ONNX file (weights inside, no external
    data) whose output is the softmax, so a runtime outside Python gets probabilities directly. Input
    "image" (batch, 1, size, size) float32, already normalised; the batch dimension is dynamic.
    Returns the manifest's "onnx" section. The exporter's progress lines and warnings are swallowed."""
    import io
    import logging
    import warnings

    import torch
    from torch import nn

    from ..model import ResNet9

    class WithSoftmax(nn.Module):
        def __init__(self, model: nn.Module):
            super().__init__()
            self.model = model

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return torch.softmax(self.model(image), dim=1)

    model = ResNet9(n_in=1, n_out=len(classes), widths=tuple(widths))
    model.load_state_dict(state, strict=True)
    wrapped = WithSoftmax(model).eval()
    example = torch.zeros((2, 1, size, size), dtype=torch.float32)  # batch 2: a batch of 1 would be specialised
    chatter = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                wrapped, (example,), dynamo=True, opset_version=ONNX_OPSET, input_names=[ONNX_INPUT],
                output_names=[ONNX_OUTPUT], dynamic_shapes={"image": {0: torch.export.Dim("batch")}},
                verbose=False, external_data=False)
            program.save(str(path), external_data=False)
    except ImportError as e:
        raise ArtifactError(f"ONNX export needs onnx and onnxscript ({e}); pip install onnx onnxscript") from e
    except Exception as e:
        said = " ".join(chatter.getvalue().split())[-300:]
        raise ArtifactError(f"ONNX export of the model failed ({type(e).__name__}: {e})"
                            + (f"; exporter said: {said}" if said else "")) from e
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    opset = _onnx_opset(path)
    return onnx_section(size, len(classes), opset)


def _onnx_opset(path: Path) -> int:
    """The default-domain opset the saved file declares (what the exporter actually wrote)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return next((int(o.version) for o in m.opset_import if o.domain in ("", "ai.onnx")), ONNX_OPSET)


def onnx_section(size: int, n_classes: int, opset: int) -> dict[str, Any]:
    return {
        "file": MODEL_ONNX,
        "opset": opset,
        "input": {"name": ONNX_INPUT, "shape": ["batch", 1, size, size], "dtype": "float32",
                  "preprocessing": "read as 8-bit grey, cut input.crop_border of the height and width from "
                                   "each edge, apply input.contrast, squash the whole image to "
                                   "input.size x input.size (bilinear), then x / 255, then "
                                   "(x - normalization.mean) / normalization.std"},
        "output": {"name": ONNX_OUTPUT, "shape": ["batch", n_classes],
                   "meaning": "softmax probabilities in manifest classes order"},
    }


def build_manifest(info, folder: Path, onnx: dict[str, Any] | None = None) -> dict[str, Any]:
    from ..train.runs import cache_side

    cfg = info.cfg
    meta = info.meta
    by_source = meta.get("best_by_source") or {}
    train_sha, train_missing = training_hashes(info)
    return {
        "format_version": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "classes": info.classes,
        "input": {"size": cfg.size, "channels": 1, "resize": "squash whole image to size x size, bilinear",
                  "scale": "pixel / 255 after reading as 8-bit grey", "cache_side": cache_side(info),
                  "contrast": cfg.contrast, "crop_border": cfg.crop_border},
        "normalization": {"mean": info.stats.mean, "std": info.stats.std},
        "architecture": {"name": "ResNet9", "n_in": 1, "n_out": len(info.classes), "widths": list(cfg.widths)},
        "training": {**cfg.to_dict(), "layout": meta.get("layout"), "counts": meta.get("counts"),
                     "skipped": meta.get("skipped", 0)},
        "validation": meta.get("best", {}),
        "versions": meta.get("versions", {}),
        "files": {name: {"sha256": sha256_file(folder / name), "bytes": (folder / name).stat().st_size}
                  for name in (WEIGHTS, PICKLE, *([MODEL_ONNX] if onnx is not None else []))},
        **({"onnx": onnx} if onnx is not None else {}),
        # content hashes of the training images: `evaluate` warns when it is shown them again
        "training_images_sha256": train_sha,
        "training_images_missing": train_missing,
        "model_card": {
            "intended_use": "Research and teaching only. Not a medical device; not for diagnosis or triage.",
            "data": f"trained on {' + '.join(cfg.data)} ({meta.get('layout')}); class counts {meta.get('counts')}",
            "known_confounds": "Classes that come from different sources (hospitals, age groups) let a model "
                               "learn the source instead of the disease; check per-source metrics.",
            "validation_by_source": meta.get("best_by_source"),
            "source_warnings": source_gaps(by_source.get("per_source"), by_source.get("balanced_accuracy", 0.0),
                                           EvalConfig.source_gap),
        },
    }


def training_hashes(info) -> tuple[list[str], int]:
    """Sorted SHA-256 hex digests of the run's training images (items.csv train rows) and how many of them
    could not be read (moved or deleted since training: export still works, those just go unlisted)."""
    from ..io.files import hash_files

    items = info.items()
    paths = items.loc[items.split == "train", "path"].tolist()
    hashes = [h for h, _ in hash_files(paths)]
    found = sorted({h for h in hashes if h is not None})
    return found, sum(h is None for h in hashes)


# ------------------------------------------------------------------------------------------ reading

def read_manifest(folder: str | Path) -> Artifact:
    folder = Path(folder)
    if not folder.exists():
        # an export killed between its two renames leaves only FOLDER's aside copy: put it back
        with contextlib.suppress(OSError):  # read-only location, or another process got there first
            recover_folder(folder, drop_temps=False)
    if not folder.exists():
        raise ArtifactError(f"{folder}: no such artifact folder; make one with `cxr-fastai export RUN --to {folder}`")
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: is a file; give the artifact folder that holds {MANIFEST}")
    mpath = folder / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"{mpath}: missing; {folder} is not a cxr-fastai artifact (re-export it)")
    try:
        m = json.loads(mpath.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mpath}: not valid JSON ({e}); re-export the model") from e
    validate_manifest(m, mpath)
    return Artifact(folder, m)


def validate_manifest(m: Any, where: Path | str = MANIFEST) -> None:
    if not isinstance(m, dict):
        raise ArtifactError(f"{where}: not a JSON object; re-export the model")
    v = m.get("format_version")
    if not isinstance(v, int) or isinstance(v, bool):
        raise ArtifactError(f"{where}: no integer format_version; re-export the model")
    if v > FORMAT_VERSION:
        raise ArtifactError(f"{where}: format_version {v} is newer than this cxr-fastai reads ({FORMAT_VERSION}); "
                            "upgrade cxr-fastai")
    if v < 1:
        raise ArtifactError(f"{where}: format_version {v} is not valid; re-export the model")
    try:
        classes = m["classes"]
        size = m["input"]["size"]
        mean, std = m["normalization"]["mean"], m["normalization"]["std"]
        arch = m["architecture"]
        files = m["files"]
        ok = (isinstance(classes, list) and len(classes) >= 2 and all(isinstance(c, str) and c for c in classes)
              and len(set(classes)) == len(classes)
              and isinstance(size, int) and 16 <= size <= 4096
              and isinstance(mean, (int, float)) and isinstance(std, (int, float)) and std > 0
              and arch.get("name") == "ResNet9" and arch.get("n_out") == len(classes)
              and isinstance(arch.get("n_in"), int) and isinstance(arch.get("widths"), list)
              and len(arch["widths"]) == 4 and all(isinstance(w, int) and 0 < w <= 8192 for w in arch["widths"])
              and isinstance(files.get(WEIGHTS, {}).get("sha256"), str)
              and _valid_cache_side(m["input"].get("cache_side"), size)
              and m["input"].get("contrast", "none") in CONTRAST
              and isinstance(m["input"].get("crop_border", 0.0), (int, float))
              and 0 <= m["input"].get("crop_border", 0.0) <= MAX_CROP_BORDER)
    except (KeyError, TypeError, AttributeError) as e:
        raise ArtifactError(f"{where}: missing or malformed field ({type(e).__name__}: {e}); re-export the model") from e
    if not ok:
        raise ArtifactError(f"{where}: fields have wrong types or values (classes, input.size, normalization, "
                            "architecture, files); re-export the model")


def _valid_cache_side(side: Any, size: int) -> bool:
    """Absent (artifacts made before it was recorded) or a whole number of px from size to 4096."""
    return side is None or (isinstance(side, int) and not isinstance(side, bool) and size <= side <= 4096)


def verify_file(art: Artifact, name: str) -> Path:
    path = art.folder / name
    if not path.is_file():
        raise ArtifactError(f"{path}: missing from the artifact; re-export the model")
    want = art.manifest["files"].get(name, {}).get("sha256")
    got = sha256_file(path)
    if want != got:
        raise ArtifactError(f"{path}: SHA-256 does not match the manifest (file changed or corrupt); "
                            "re-export the model or restore the file")
    return path


def load_model(art: Artifact):
    """ResNet9 with the artifact's weights, via safetensors only (no pickle, no code execution)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..model import ResNet9

    path = verify_file(art, WEIGHTS)
    a = art.manifest["architecture"]
    model = ResNet9(n_in=a["n_in"], n_out=a["n_out"], widths=tuple(a["widths"]))
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{path}: not a readable safetensors file ({e}); re-export the model") from e
    want = model.state_dict()
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    wrong = [k for k in want if k in state and tuple(state[k].shape) != tuple(want[k].shape)]
    if missing or unexpected or wrong:
        parts = [f"{len(ks)} {what} (first: {ks[0]})" for ks, what in
                 ((missing, "ResNet9 tensor(s) missing"), (unexpected, "unexpected tensor(s)"),
                  (wrong, "tensor(s) of the wrong shape")) if ks]
        raise ArtifactError(f"{path}: this is not a cxr-fastai model file for this manifest ({'; '.join(parts)}); "
                            "re-export the model with `cxr-fastai export`")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = " ".join(str(e).split())
        raise ArtifactError(f"{path}: weights do not fit a ResNet9 of this manifest ({first}); "
                            "this is not a cxr-fastai model file; re-export the model") from e
    return model.eval()


def load_pickle_learner(art: Artifact):
    """fastai's load_learner on model.pkl (unpickling: runs code). Only for trusted artifacts."""
    from fastai.learner import load_learner

    from ..data import types  # noqa: F401  (the pickle refers to it; load_learner hides import errors)

    if not art.has_pickle:
        raise ArtifactError(f"{art.folder}: has no {PICKLE} (written by adapt or refit without --trust-pickle); use the "
                            "safetensors weights (drop --trust-pickle) or write it again with --trust-pickle")
    path = verify_file(art, PICKLE)
    try:
        return load_learner(path, cpu=True)
    except Exception as e:
        raise ArtifactError(f"{path}: fastai could not load the pickle ({type(e).__name__}: {e})") from e


def parent_record(art: Artifact) -> dict[str, Any]:
    """What a derived artifact (`adapt`, `refit`) records of the one it was made from."""
    old = art.manifest
    return {"weights_sha256": old["files"][WEIGHTS]["sha256"], "created": old.get("created"),
            "adapted": bool(old.get("adaptation")), "refit": bool(old.get("refit"))}


def check_derived_destination(art: Artifact, dest: Path, force: bool, verb: str) -> None:
    """`dest` for an artifact derived from `art` (`adapt`, `refit`): not `art`'s own folder, and free (or
    `force`), as `check_destination` rules."""
    if dest.resolve() == art.folder.resolve():
        raise ArtifactError(f"{dest}: is the artifact being {verb}; write the new model to another --to folder")
    check_destination(dest, force)


def write_derived_artifact(art: Artifact, state: dict, dest: Path, key: str, record: dict[str, Any],
                           card_note: str, trust_pickle: bool) -> dict[str, Any]:
    """Write `dest` atomically: `art` with new weights `state` (model.safetensors, model.onnx, and model.pkl
    only when the caller trusts the old pickle: rewriting it means unpickling it), its manifest copied with
    the new files' hashes, `record` under `key` and `card_note` in the model card under `key`. Returns the
    new manifest."""
    import copy

    from safetensors.torch import save_file

    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    old = art.manifest
    with atomic_folder(dest) as tmp:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        onnx = export_onnx(state, art.classes, old["architecture"]["widths"], art.size, tmp / MODEL_ONNX)
        if trust_pickle:
            _rewrite_pickle(art, state, tmp / PICKLE)
        files = [WEIGHTS, MODEL_ONNX] + ([PICKLE] if trust_pickle else [])
        manifest = {**copy.deepcopy(old), "created": now,
                    "files": {n: {"sha256": sha256_file(tmp / n), "bytes": (tmp / n).stat().st_size} for n in files},
                    "onnx": onnx, key: {**record, "created": now}}
        manifest["model_card"] = {**(manifest.get("model_card") or {}), key: card_note}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n")
    return manifest


def _rewrite_pickle(art: Artifact, state: dict, path: Path) -> None:
    """model.pkl with new weights: fastai's learner from the old pickle (unpickling: trusted artifacts only),
    its weights replaced, written by learn.export."""
    learn = load_pickle_learner(art)
    learn.model.load_state_dict(state, strict=True)
    learn.path = path.parent
    learn.export(path.name)
    if not path.is_file():   # learn.export writes nothing on a non-zero distributed rank
        raise ArtifactError(f"{path}: fastai wrote no pickle; write it from a single process")


def seen_in_training(manifest: dict[str, Any], paths: list[str]) -> int | None:
    """How many of `paths` have the content (SHA-256) of a training image listed in the manifest; None for
    artifacts exported before the list existed."""
    return seen_counts(manifest, paths)[0]


def _known_hashes(manifest: dict[str, Any]) -> list[set[str] | None]:
    """The manifest's SHA-256 lists: training images, the images an adapted model's BatchNorm statistics came
    from (`cxr-fastai adapt`), and the images a refitted head was fitted and chosen on (`cxr-fastai refit`);
    None for a list it does not have."""
    def listed(section: Any):
        return section.get("images_sha256") if isinstance(section, dict) else None

    lists = [manifest.get("training_images_sha256"), listed(manifest.get("adaptation")), listed(manifest.get("refit"))]
    return [set(x) if isinstance(x, list) else None for x in lists]


def seen_counts(manifest: dict[str, Any], paths: list[str]) -> tuple[int | None, int | None, int | None]:
    """How many of `paths` have the content (SHA-256) of a training image, of an image that gave an adapted
    model's BatchNorm statistics, and of an image a refitted head was fitted or chosen on, as the manifest lists
    them; None where it has no such list (exported before training hashes were kept; never adapted; never
    refitted). Each file is hashed once, and not at all without a list."""
    from ..io.files import hash_files

    if all(known is None for known in _known_hashes(manifest)):
        return None, None, None
    return seen_counts_of(manifest, [h for h, _ in hash_files(paths)])


def seen_counts_of(manifest: dict[str, Any], hashes: list[str | None]) -> tuple[int | None, int | None, int | None]:
    """`seen_counts` for SHA-256s already computed (None for a file that could not be read)."""
    return tuple(None if known is None else sum(h in known for h in hashes) for known in _known_hashes(manifest))
