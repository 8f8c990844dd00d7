"""Re-estimate a model's BatchNorm statistics on a hospital's own unlabelled films, into a new artifact.

AdaBN (Li, Wang, Shi, Liu & Hou, "Revisiting batch normalization for practical domain adaptation", 2016;
test-time BatchNorm adaptation in Schneider et al., NeurIPS 2020): every learned weight is kept and each
BatchNorm layer's running mean and variance are replaced by those of the new hospital's images, read the
way `predict` reads them. No label is used, so a hospital can do it with the films it wants read. The
statistics are gathered as torch's `update_bn` does (cumulative average over batches, train-mode
BatchNorm, no gradient), on the images in a seeded shuffled order, so that a batch is a mix of the folder
and not one sub-folder's class.

The new artifact is a whole one: model.safetensors, model.onnx, model.pkl (only when the caller trusts the
old one's pickle: rewriting it means unpickling it) and a manifest whose hashes are the new files' and
whose `adaptation` records what was done: how many images, the parent's weights hash, and the images'
SHA-256s (so `evaluate` can say when it scores images the statistics came from). No path or file name of
the images is written.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import ArtifactError, DataError
from .export import (Artifact, check_derived_destination, parent_record, read_manifest, seen_counts_of,
                     write_derived_artifact)

MIN_IMAGES = 32      # BatchNorm statistics from fewer images than this are mostly noise
METHOD = ("AdaBN: every BatchNorm layer's running mean and variance re-estimated on unlabelled images "
          "(cumulative average over shuffled batches, as torch.optim.swa_utils.update_bn); no weight changed")


@dataclass
class AdaptResult:
    artifact: Artifact
    n_images: int                        # images whose statistics the model now has
    skipped: list[tuple[str, str]]       # (path, error) of unreadable images, left out
    n_bn_layers: int
    shift: float                         # mean |new - old running mean| / sqrt(old running var) over the first layer's channels
    seen_in_training: int | None = None  # of the images, how many are training images of the model (same bytes)
    labels: dict[str, int] = field(default_factory=dict)   # label counts, where the images came from labelled roots


def gather(inputs: Sequence[str | Path], splits: Sequence[str] = (),
           sources: Sequence[str] = ()) -> tuple[list[Path], dict[str, int]]:
    """The images to adapt on: with `splits` or `sources`, the items of the labelled roots `inputs` (any layout
    `train` accepts) in those splits and sources; otherwise image files and folders as `predict` takes them.
    Returns the paths and, for labelled roots, the label counts (reported, never used)."""
    from .predict import collect_paths

    if not splits and not sources:
        return collect_paths(inputs), {}
    from ..data.discover import discover, select_items

    ds = discover(list(inputs))
    items = select_items(ds, tuple(splits) or ("all",), tuple(sources))
    return [Path(p) for p in items.path], {k: int(v) for k, v in items.label.value_counts().sort_index().items()}


def bn_layers(model) -> list:
    import torch

    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def adapt_model(model, batches, device="cpu"):
    """A copy of `model` with every BatchNorm layer's running statistics those of `batches` (an iterable of
    model-input tensors), by torch's update_bn; the copy is returned in eval mode."""
    import torch
    from torch.optim.swa_utils import update_bn

    m = copy.deepcopy(model)
    if not bn_layers(m):
        raise ArtifactError("this model has no BatchNorm layer: there are no statistics to adapt")
    with torch.no_grad():
        update_bn(batches, m, device=torch.device(device))
    return m.eval()


def _shift(old, new) -> float:
    a, b = bn_layers(old)[0], bn_layers(new)[0]
    return float(((b.running_mean - a.running_mean).abs() / (a.running_var + a.eps).sqrt()).mean())


def adapt_on_files(pred, paths: Sequence[str | Path], *, bs: int = 256, workers: int = 4, seed: int = 0,
                   progress: Callable[[int, int], None] | None = None):
    """A copy of the Predictor's model with BatchNorm statistics of the image files `paths`, read as `pred`
    reads them, in a seeded shuffled order, in batches of near-equal size (update_bn's cumulative average
    weighs every batch alike). Returns (model, paths used, (path, error) of the unreadable, batch size)."""
    from ..data.augment import to_model_input
    from ..io.images import decode_many

    order = np.random.default_rng(seed).permutation(len(paths))
    names = [str(paths[i]) for i in order]
    bs = math.ceil(len(names) / math.ceil(len(names) / bs)) if names else bs
    skipped: list[tuple[str, str]] = []
    used: list[str] = []

    def batches():
        batch: list[np.ndarray] = []
        for i, arr, err in decode_many(names, workers, fn=pred.shrink):
            if arr is None:
                skipped.append((names[i], err))
            else:
                batch.append(arr)
                used.append(names[i])
            if progress and (i + 1) % bs == 0:
                progress(i + 1, len(names))
            if len(batch) == bs:
                yield to_model_input(batch, pred.art.mean, pred.art.std, pred.device)
                batch = []
        if batch:
            yield to_model_input(batch, pred.art.mean, pred.art.std, pred.device)

    adapted = adapt_model(pred.model, batches(), pred.device)
    if progress and len(names) % bs:
        progress(len(names), len(names))
    return adapted, used, skipped, bs


def adapt_artifact(artifact: str | Path, inputs: Sequence[str | Path], to: str | Path, *,
                   splits: Sequence[str] = (), sources: Sequence[str] = (), bs: int = 256, workers: int = 4,
                   device: str = "cpu", seed: int = 0, trust_pickle: bool = False, force: bool = False,
                   min_images: int = MIN_IMAGES, progress: Callable[[int, int], None] | None = None) -> AdaptResult:
    """Write `to`: the artifact with BatchNorm statistics of the images in `inputs` (see `gather`)."""
    from ..io.files import hash_files
    from .predict import Predictor

    art = read_manifest(artifact)
    dest = Path(to)
    check_derived_destination(art, dest, force, "adapted")
    paths, labels = gather(inputs, splits, sources)
    if len(paths) < min_images:
        raise DataError(f"{len(paths)} image(s) given; adapting needs at least {min_images} of the new hospital's "
                        "films (BatchNorm statistics from fewer are mostly noise)")
    pred = Predictor(art, device)
    adapted, used, skipped, bs = adapt_on_files(pred, paths, bs=bs, workers=workers, seed=seed, progress=progress)
    if len(used) < min_images:
        first = f" (first: {skipped[0][1]})" if skipped else ""
        raise DataError(f"only {len(used)} of the {len(paths)} image(s) could be read{first}; adapting needs at "
                        f"least {min_images}")
    state = {k: v.detach().cpu().contiguous() for k, v in adapted.state_dict().items()}
    hashes = [h for h, _ in hash_files(used)]
    record = {"method": METHOD, "images": len(used), "unreadable": len(skipped), "batch_size": bs,
              "seed": seed, "bn_layers": len(bn_layers(adapted)),
              "selection": {"splits": list(splits), "sources": list(sources)} if (splits or sources) else "files",
              "parent": parent_record(art),
              "images_sha256": sorted({h for h in hashes if h is not None})}
    card = (f"BatchNorm statistics re-estimated on {len(used)} unlabelled images after training "
            "(cxr-fastai adapt). The validation figures in this manifest are the model's before "
            "adaptation and do not describe this one: evaluate it on labelled films of the hospital "
            "it was adapted to, other than those it was adapted on.")
    manifest = write_derived_artifact(art, state, dest, "adaptation", record, card, trust_pickle)
    return AdaptResult(Artifact(dest, manifest), len(used), skipped, len(bn_layers(adapted)),
                       _shift(pred.model, adapted), seen_counts_of(art.manifest, hashes)[0], labels)

