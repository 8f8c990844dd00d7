"""One frozen dataclass per job: the only place defaults live. Saved in every run and artifact."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SPLITS = ("train", "valid", "test")
BALANCE = ("none", "class", "class-source", "class-then-source")
AUGMENT = ("none", "light", "texture")
CONTRAST = ("none", "equalize")
MAX_CROP_BORDER = 0.25  # --crop-border: the most cut from each edge (half the height and width stay)
MIXUP_PAIRS = ("random", "lisa")
REFIT_DRAWS = 0   # refit: training crops of each train image the head is fitted on (0: the images themselves;
                  # 2 kept cxr3 test better but tied on validation and on the NIH fold: docs/generalisation.md)
RUNTIMES = ("torch", "onnx")    # predict/evaluate: the safetensors weights in PyTorch | model.onnx in onnxruntime

# fastai's Adam defaults, used whichever optimizer class runs them (train, and the bench's plain loop)
ADAM = {"mom": 0.9, "sqr_mom": 0.99, "eps": 1e-5}
# fastai's fit_one_cycle defaults, written out so that the bench's plain loop can follow the same schedule:
# lr rises from lr/div to lr over pct_start of the steps (cosine), then falls to lr/div_final; momentum
# (Adam's beta1) moves the other way, moms[0] -> moms[1] -> moms[2]
ONE_CYCLE = {"pct_start": 0.25, "div": 25.0, "div_final": 1e5, "moms": (0.95, 0.85, 0.95)}


@dataclass(frozen=True)
class TrainConfig:
    data: tuple[str, ...] = ()     # dataset roots (each in any layout that data.discover accepts)
    run: str = ""                  # run folder: config, class order, stats, checkpoints, logs
    size: int = 128                # px; images are seen as size x size
    epochs: int = 30               # length of the one-cycle schedule
    bs: int = 256                  # batch size; clamped to the training-set size
    lr: float = 2e-3               # peak of the one-cycle schedule, for batch 256
    wd: float = 1e-4               # decoupled weight decay (none on BN weights and biases)
    clip: float = 0.1              # GradientClip max norm
    seed: int = 0
    min_scale: float = 0.6         # RandomResizedCrop: smallest crop, as a fraction of the image area (0.6 beat 0.35 on valid: docs/accuracy.md)
    widths: tuple[int, int, int, int] = (64, 128, 256, 512)
    valid_pct: float = 0.2         # only for layouts without a split: share of items (or patients) held out
    workers: int = 0               # DataLoader workers; 0 is fastest on a 2-core machine
    device: str = "auto"           # auto | cpu | cuda
    stats_limit: int = 20_000      # images used for the pixel mean/std (seeded sample when more)
    data_path: str = "cached"      # cached: decode once, crop/normalise per batch on the device | pil: fastai per-item
    cache_dir: str = ""            # keep the decoded cache here between runs ("" = in memory only)
    label_smoothing: float = 0.0   # cross-entropy label smoothing (0 = plain cross-entropy)
    class_weights: bool = False    # weight the loss by inverse class frequency of the training set
    exclude_sources: tuple[str, ...] = ()  # leave these `source` values (labels.csv) out of train and valid
    group_folds: int = 0           # with holdout_fold: patient-grouped k-fold (data.discover.group_folds over the
    holdout_fold: int = 0          # images left after exclude_sources, seeded by `seed`); fold holdout_fold
                                   # (0-based) of group_folds stays out of training (crossval --by group)
    compile: bool = False          # torch.compile the model (exports still hold the plain module)
    opt: str = "adamw"             # adamw: torch AdamW, foreach (CPU) / fused (CUDA) | fastai: fastai's Adam (per-param loop)
    balance: str = "none"          # none | class | class-source | class-then-source: draw training images so that every
                                   # class (or every class x source stratum, or every class and within it every
                                   # source) is seen equally often per epoch (cached path)
    balance_power: float = 1.0     # temper --balance: draw each image with probability ~ (its balance weight)^POWER,
                                   # 1 = full balance, 0.5 = halfway (geometrically) to plain shuffled draws
    augment: str = "none"          # none | light: per-image brightness, contrast (+-20%), rotation (+-5 deg) and
                                   # zoom (up to 1.1x) on the batch, fastai's batch transforms (cached path);
                                   # texture: light, then per-image gamma, blur and noise
    contrast: str = "none"         # none | equalize: per-image histogram equalisation at read time, applied by
                                   # every consumer (recorded in run.json and the manifest)
    crop_border: float = 0.0       # cut this fraction of the height and width from each edge at read time, before the
                                   # contrast step (markers, text, collimation); every consumer does it too; 0 = off
    mixup: float = 0.0             # MixUp (fastai's callback) with this Beta(alpha, alpha); 0 = off. Training batches
                                   # only: each image is blended with another of the batch, the loss likewise
    mixup_pairs: str = "random"    # random: fastai's MixUp (any partner) | lisa: selective (Yao et al. 2022): per image,
                                   # half the time a partner of the same class from another source, else one of
                                   # the same source and another class (cached path)
    group_dro: float = 0.0         # online group DRO (Sagawa et al. 2020) over class x source strata with this step size
                                   # eta for the group weights; 0 = off (plain mean loss). Cached path, one process
    source_adversary: float = 0.0  # class-conditional source adversary (Li et al. 2018, DANN's gradient reversal): a small
                                   # head learns each training image's source from the pooled features given its class,
                                   # the network gets its gradient reversed, weighted up to this; 0 = off. Cached
                                   # path, one process
    weight_average: float = 0.0    # average the weights over every training step of the last FRACTION of the epochs
                                   # (SWA / SWAD); the average, BatchNorm statistics recomputed, is the run's model;
                                   # 0 = off (the best epoch by validation is)
    mix_style: float = 0.0         # MixStyle (Zhou et al. 2021): in this fraction of the training batches, mix each
                                   # image's channel statistics after layer1 and layer2 with a random partner's,
                                   # weight ~ Beta(0.1, 0.1); 0 = off. Training only: the model is unchanged

    def __post_init__(self):
        if isinstance(self.data, (str, Path)):  # one root, as older runs and callers give it
            object.__setattr__(self, "data", (str(self.data),) if str(self.data) else ())
        else:
            object.__setattr__(self, "data", tuple(str(d) for d in self.data))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["data"] = list(self.data)
        d["widths"] = list(self.widths)
        d["exclude_sources"] = list(self.exclude_sources)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if "widths" in d:
            d["widths"] = tuple(int(w) for w in d["widths"])
        if isinstance(d.get("data"), list):
            d["data"] = tuple(d["data"])
        if "exclude_sources" in d:
            d["exclude_sources"] = tuple(d["exclude_sources"])
        return cls(**d)

    def replace(self, **kw: Any) -> "TrainConfig":
        return dataclasses.replace(self, **kw)


@dataclass(frozen=True)
class PredictConfig:
    bs: int = 128                  # images per forward pass
    workers: int = 4               # decoding threads (Pillow releases the GIL while decoding)
    device: str = "auto"
    trust_pickle: bool = False     # load model.pkl with fastai (can execute code) instead of safetensors
    tta: bool = False              # average the whole image and five fixed crops (6 forward passes)
    runtime: str = "torch"         # torch: safetensors weights in PyTorch | onnx: model.onnx in onnxruntime (CPU, no torch import)
    onnx_threads: int = 0          # onnxruntime's intra-op threads (0: its default, one per physical core)


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"        # loopback only; any other address needs a token
    port: int = 8000
    max_mb: float = 20.0           # MB (10^6 bytes) of upload per request; more is refused with 413
    workers: int = 1               # server processes (uvicorn workers), each with its own model and batcher
    max_files: int = 64            # files per request
    max_batch: int = 64            # images per forward pass when concurrent requests are batched
    batch_wait_ms: float = 5.0     # how long the batcher waits for more images after the first one
    decode_threads: int = 2        # threads that decode uploads (Pillow and pydicom drop the GIL)
    threads: int = 0               # the model's threads (torch / onnxruntime intra-op); 0: the library's default
                                   # (one per physical core), as predict runs: the model is most of the work;
                                   # with workers > 1, the CPU cores divided by workers


@dataclass(frozen=True)
class EvalConfig:
    split: str = "test"
    n_boot: int = 1000             # bootstrap resamples for the 95% intervals
    seed: int = 0
    source_gap: float = 0.10       # a source whose balanced accuracy is this far below the pooled one is named


@dataclass(frozen=True)
class DemoConfig:
    out: str = "demo-out"
    n_train: int = 180             # synthetic images per class in train
    image_size: int = 64           # px of the synthetic PNGs
    size: int = 32                 # px the model sees
    epochs: int = 6
    bs: int = 64
    lr: float = 4e-3
    seed: int = 0
    widths: tuple[int, int, int, int] = (32, 64, 128, 256)  # half the default width: ~2x faster, synthetic test 0.99


@dataclass(frozen=True)
class InterpretConfig:
    k: int = 16                    # top losses shown
    n_boot: int = 500              # bootstrap resamples for the report's intervals
    cams_per_class: int = 2        # confidently correct images per class given a Grad-CAM


@dataclass(frozen=True)
class AuditConfig:
    near_distance: int = 4         # bits of 64: phash Hamming distance at or below which two images are candidates
    min_similarity: float = 0.95   # thumbnail correlation at or above which a candidate is a near duplicate
    workers: int = 4               # decoding and hashing threads


@dataclass(frozen=True)
class BenchConfig:
    data: str = ""
    device: str = "auto"
    size: int = 64
    epochs: int = 3
    limit: int = 0            # training images; 0 = 2,048 on CPU, all on CUDA
    # the recipe of both paths: train's defaults
    bs: int = TrainConfig.bs
    lr: float = TrainConfig.lr
    wd: float = TrainConfig.wd
    clip: float = TrainConfig.clip
    min_scale: float = TrainConfig.min_scale
    target_acc: float = 0.0   # 0 = 0.95 on CUDA, 0.85 on CPU
    seed: int = 0
    predict_n: int = 0        # images for the predict figures; 0 = 512 on CPU, 4,096 on CUDA


@dataclass(frozen=True)
class CrossvalConfig:
    by: str = "source"             # source: leave one source out | group: patient-grouped k-fold
    folds: int = 5                 # --by group: k
    source: str = ""               # --by group: only this source's images (others left out of every fold); "" = all
    split: str = "all"             # held-out images evaluated: all (every split of the held-out source) | test | valid
    all_sources: bool = False      # also hold out sources with a single class (their balanced accuracy is one sensitivity)
    pooled: bool = True            # also train on every source and evaluate on the pooled test split (or `split`)
    n_boot: int = EvalConfig.n_boot  # bootstrap resamples for the 95% intervals
    eval_seed: int = EvalConfig.seed


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        from .errors import CxrError

        raise CxrError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu or auto")
    return name


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically: a reader sees the old file or the new one, never half of one."""
    from .io.files import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")
