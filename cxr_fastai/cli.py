"""The `cxr-fastai` command line: each command parses options, calls one library function, prints a
summary. Heavy modules (torch, fastai) are imported inside commands so that `--help` stays fast."""
from __future__ import annotations

import contextlib
import signal
import sys
import time
import warnings
from enum import Enum
from pathlib import Path
from typing import Iterator, List, Optional

import typer

from .config import AUGMENT, BALANCE, CONTRAST, MIXUP_PAIRS, REFIT_DRAWS, AuditConfig, BenchConfig, DemoConfig, EvalConfig, InterpretConfig, PredictConfig, TrainConfig
from .errors import CxrError

app = typer.Typer(
    name="cxr-fastai",
    help="Train, inspect and export a small chest X-ray classifier (fastai + ResNet9). "
    "Research use only; not for diagnosis.",
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

_state = {"debug": False}


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class DataPath(str, Enum):
    cached = "cached"
    pil = "pil"


class OptKind(str, Enum):
    adamw = "adamw"
    fastai = "fastai"


Balance = Enum("Balance", {v: v for v in BALANCE}, type=str)
Augment = Enum("Augment", {v: v for v in AUGMENT}, type=str)
Contrast = Enum("Contrast", {v: v for v in CONTRAST}, type=str)
MixupPairs = Enum("MixupPairs", {v: v for v in MIXUP_PAIRS}, type=str)


class Format(str, Enum):
    csv = "csv"
    json = "json"


class Runtime(str, Enum):
    torch = "torch"
    onnx = "onnx"


RUNTIME_HELP = ("torch: model.safetensors in PyTorch (CPU or CUDA; --tta, --trust-pickle); onnx: model.onnx in "
                "onnxruntime on the CPU, without loading torch or fastai (same output; no --tta or --trust-pickle).")


class Terminated(BaseException):
    """SIGTERM, turned into an exception so that `finally` blocks and checkpoints run."""


def _echo(msg: str) -> None:
    typer.echo(msg, err=True)


def _warn(msg: str) -> None:
    typer.echo(f"warning: {msg}", err=True)


def _one_line(msg: object) -> str:
    """An error message on one line: some library messages (pandas' parser errors) carry newlines."""
    return " ".join(part.strip() for part in str(msg).splitlines() if part.strip())


def _out_file(path: Optional[Path], opt: str, example: str) -> None:
    """An output FILE option must not name an existing folder (checked before any work is done)."""
    if path is not None and path.is_dir():
        raise CxrError(f"{path}: is a folder; give a file path for {opt} (e.g. {path / example})")


def _out_folder(path: Optional[Path], opt: str) -> None:
    """An output FOLDER option must not name an existing file (it would be replaced by a folder)."""
    if path is not None and path.exists() and not path.is_dir():
        raise CxrError(f"{path}: exists and is a file; give a folder path for {opt}")


def _quiet_log(quiet: bool):
    return (lambda m: None) if quiet else _echo


def _trust_pickle_warning(trust_pickle: bool) -> None:
    if trust_pickle:
        _warn("--trust-pickle: loading model.pkl unpickles it, which can run arbitrary code; "
              "use it only for artifacts you made or trust")


@contextlib.contextmanager
def _errors(interrupt_hint: str = "") -> Iterator[None]:
    """Our exceptions become one line on stderr and exit 1; Ctrl-C exits 130, SIGTERM 143."""
    old = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)

    def on_term(signum, frame):
        raise Terminated()

    with contextlib.suppress(ValueError):  # not in the main thread (some test runners): leave it
        signal.signal(signal.SIGTERM, on_term)
        # a process started in the background by a non-interactive shell inherits SIGINT ignored;
        # `kill -INT` must still stop a training cleanly
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    except CxrError as e:
        if _state["debug"]:
            raise
        _echo(f"error: {_one_line(e)}")
        raise typer.Exit(1)
    except KeyboardInterrupt:
        if _state["debug"]:
            raise
        _echo(f"interrupted{'; ' + interrupt_hint if interrupt_hint else ''}")
        raise typer.Exit(130)
    except Terminated:
        _echo(f"terminated{'; ' + interrupt_hint if interrupt_hint else ''}")
        raise typer.Exit(143)
    except BrokenPipeError:
        # stdout closed early (`cxr-fastai predict ... | head`): stop quietly, as other Unix tools do
        import os

        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(141)
    except (typer.Exit, typer.Abort, SystemExit):
        raise
    except Exception as e:  # a bug of ours: still one line, the traceback with --debug
        if _state["debug"]:
            raise
        _echo(f"error: unexpected {type(e).__name__}: {_one_line(e)} (this is a bug; rerun with --debug for the traceback)")
        raise typer.Exit(1)
    finally:
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGTERM, old[0])
            signal.signal(signal.SIGINT, old[1])


@app.callback(invoke_without_command=True)
def _main(ctx: typer.Context,
          debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors.")):
    _state["debug"] = debug
    if not debug:
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"(torch|fastai|fastcore)\b.*")
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(0)


D = TrainConfig()



# The training recipe's options, shared by `train` and `crossval` (one definition of each flag and its help).
RECIPE = {
    "size": typer.Option(D.size, min=16, max=1024, help="Image side in px the model sees."),
    "epochs": typer.Option(D.epochs, min=1, max=10_000, help="Length of the one-cycle schedule."),
    "bs": typer.Option(D.bs, min=1, max=8192, help="Batch size (clamped to the training-set size)."),
    "lr": typer.Option(D.lr, min=1e-7, max=10.0, help="Peak learning rate of the one-cycle schedule."),
    "wd": typer.Option(D.wd, min=0.0, max=1.0, help="Decoupled weight decay (not on BN/bias)."),
    "clip": typer.Option(D.clip, min=1e-6, help="Gradient-norm clip (fastai GradientClip)."),
    "seed": typer.Option(D.seed, min=0, help="Seed: the same seed gives the same numbers on the same CPU machine (close, not identical, elsewhere)."),
    "min_scale": typer.Option(D.min_scale, min=0.01, max=1.0, help="RandomResizedCrop: smallest crop area fraction."),
    "device": typer.Option(Device(D.device), help="Where to train."),
    "workers": typer.Option(D.workers, min=0, max=64, help="DataLoader worker processes (--data-path pil)."),
    "data_path": typer.Option(DataPath(D.data_path), "--data-path", help="cached: decode once, augment per batch on the device; pil: fastai per-item transforms."),
    "cache_dir": typer.Option(None, "--cache-dir", help="Keep the decoded image cache here between runs (keyed by file content and size)."),
    "label_smoothing": typer.Option(D.label_smoothing, "--label-smoothing", min=0.0, max=0.5, help="Cross-entropy label smoothing."),
    "class_weights": typer.Option(D.class_weights, "--class-weights/--no-class-weights", help="Weight the loss by inverse class frequency."),
    "exclude_source": typer.Option([], "--exclude-source", help="Leave images of this labels.csv source out of train and valid (repeatable)."),
    "balance": typer.Option(Balance(D.balance), "--balance", help="Draw training images so that every class (class), every class x source stratum (class-source), or every class and within it every source (class-then-source) is seen equally often."),
    "balance_power": typer.Option(D.balance_power, "--balance-power", min=0.0, max=1.0,
                                  help="Temper --balance: each image's draw weight is its balance weight to this power "
                                       "(1: full balance; 0.5: halfway)."),
    "augment": typer.Option(Augment(D.augment), "--augment", help="light: per-image brightness/contrast (20%), rotation (5 deg) and zoom (1.1x) on the batch; texture: light plus per-image gamma, blur and noise."),
    "contrast": typer.Option(Contrast(D.contrast), "--contrast", help="Per-image contrast normalisation at read time (equalize: histogram equalisation), applied by predict/evaluate too."),
    "crop_border": typer.Option(D.crop_border, "--crop-border", min=0.0, max=0.25, help="Cut this fraction of the height and width from each edge of every image at read time (markers, text, collimation), applied by predict/evaluate too; 0 = off."),
    "mixup": typer.Option(D.mixup, "--mixup", min=0.0, max=10.0, help="MixUp: blend each training image and its loss with another of the batch, weight from Beta(ALPHA, ALPHA) (fastai's MixUp; 0.4 is its default); 0 = off."),
    "mixup_pairs": typer.Option(MixupPairs(D.mixup_pairs), "--mixup-pairs", help="With --mixup: random (fastai's MixUp) or lisa: half the time a partner of the same class from another source, else of the same source and another class (Yao et al. 2022)."),
    "group_dro": typer.Option(D.group_dro, "--group-dro", min=0.0, max=10.0, help="Group DRO (Sagawa et al. 2020): weight each class x source stratum's loss, the worst-fitted most; ETA is the step size of those weights (0.01 is the paper's); 0 = off."),
    "source_adversary": typer.Option(D.source_adversary, "--source-adversary", min=0.0, max=10.0,
                                     help="Class-conditional source adversary (Li et al. 2018): a small head learns "
                                          "each training image's source from the features given its class, and the "
                                          "network learns to defeat it through a reversed gradient of weight up to W "
                                          "(DANN's ramp from 0); 0 = off."),
    "weight_average": typer.Option(D.weight_average, "--weight-average", min=0.0, max=1.0,
                                   help="Average the weights over every training step of the last FRACTION of the "
                                        "epochs (SWA/SWAD; e.g. 0.5) and make the average, BatchNorm statistics "
                                        "recomputed, the run's model; 0 = off (the best epoch is)."),
    "mix_style": typer.Option(D.mix_style, "--mix-style", min=0.0, max=1.0,
                              help="MixStyle (Zhou et al. 2021): in this fraction of the training batches (0.5 is the "
                                   "paper's), mix each image's feature statistics after the first two blocks with "
                                   "another image's, making new 'hospitals' from the batch; 0 = off."),
    "opt": typer.Option(OptKind(D.opt), "--opt", help="adamw: torch AdamW (foreach/fused); fastai: fastai's Adam."),
}


def _train_config(data, values: dict, **extra) -> TrainConfig:
    """A TrainConfig from a command's recipe options (its locals()), the data roots and any extra fields."""
    v = {n: values[n] for n in RECIPE}
    return TrainConfig(data=tuple(str(d) for d in data or ()), size=v["size"], epochs=v["epochs"], bs=v["bs"],
                       lr=v["lr"], wd=v["wd"], clip=v["clip"], seed=v["seed"], min_scale=v["min_scale"],
                       device=v["device"].value, workers=v["workers"], data_path=v["data_path"].value,
                       cache_dir=str(v["cache_dir"] or ""), label_smoothing=v["label_smoothing"],
                       class_weights=v["class_weights"], exclude_sources=tuple(v["exclude_source"]),
                       balance=v["balance"].value, balance_power=v["balance_power"], augment=v["augment"].value,
                       contrast=v["contrast"].value,
                       crop_border=v["crop_border"],
                       mixup=v["mixup"], mixup_pairs=v["mixup_pairs"].value, group_dro=v["group_dro"],
                       source_adversary=v["source_adversary"], weight_average=v["weight_average"],
                       mix_style=v["mix_style"],
                       opt=v["opt"].value, **extra)


@app.command()
def train(
    ctx: typer.Context,
    data: Optional[List[Path]] = typer.Argument(None, help="Dataset root(s), each ROOT/{train,valid[,test]}/CLASS/*, ROOT/CLASS/* or ROOT/labels.csv; several roots train one model (an item's source: its labels.csv source, else its root's folder name). Not needed with --resume."),
    run: Path = typer.Option(..., "--run", help="Run folder to create (config, stats, checkpoints, logs)."),
    size: int = RECIPE["size"],
    epochs: int = RECIPE["epochs"],
    bs: int = RECIPE["bs"],
    lr: float = RECIPE["lr"],
    wd: float = RECIPE["wd"],
    clip: float = RECIPE["clip"],
    seed: int = RECIPE["seed"],
    min_scale: float = RECIPE["min_scale"],
    device: Device = RECIPE["device"],
    workers: int = RECIPE["workers"],
    data_path: DataPath = RECIPE["data_path"],
    cache_dir: Optional[Path] = RECIPE["cache_dir"],
    label_smoothing: float = RECIPE["label_smoothing"],
    class_weights: bool = RECIPE["class_weights"],
    exclude_source: List[str] = RECIPE["exclude_source"],
    balance: Balance = RECIPE["balance"],
    balance_power: float = RECIPE["balance_power"],
    augment: Augment = RECIPE["augment"],
    contrast: Contrast = RECIPE["contrast"],
    crop_border: float = RECIPE["crop_border"],
    mixup: float = RECIPE["mixup"],
    mixup_pairs: MixupPairs = RECIPE["mixup_pairs"],
    group_dro: float = RECIPE["group_dro"],
    source_adversary: float = RECIPE["source_adversary"],
    weight_average: float = RECIPE["weight_average"],
    mix_style: float = RECIPE["mix_style"],
    opt: OptKind = RECIPE["opt"],
    compile_model: bool = typer.Option(False, "--compile/--no-compile", help="torch.compile the model (exports hold the plain module)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing run folder."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its last checkpoint."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or per-epoch lines."),
    procs: int = typer.Option(1, "--procs", min=1, max=256, help="Train data-parallel in N processes on this machine, through `accelerate launch` (one per GPU; on the CPU over gloo). --bs stays the global batch, split across them; keep --lr."),
):
    """Train ResNet9 with fastai's fit_one_cycle and keep the epoch with the best validation balanced accuracy."""
    from .train.fit import train as train_run

    if resume and force:
        raise typer.BadParameter("--resume and --force exclude each other", param_hint="--resume")
    if not data and not resume:
        raise typer.BadParameter("give DATA_DIR (or --resume to continue an existing run)", param_hint="DATA")
    if procs > 1:  # the same command in N processes, started by accelerate's launcher
        from .train.distributed import command_line, launch_local, world_size

        if world_size() > 1:
            raise typer.BadParameter("already running data-parallel (the launcher set the processes); drop --procs",
                                     param_hint="--procs")
        hint = f"the best model so far is kept in {run}; continue with `cxr-fastai train --resume --run {run} --procs {procs}`"
        with _errors(hint):
            _out_folder(run, "--run")
            args = ["--debug"] * _state["debug"] + ["train", *command_line(ctx, drop=("procs",))]
            code = launch_local(args, procs, device=device.value, log=_quiet_log(quiet))
        if code:
            kept = f"; {hint}" if (run / "checkpoints" / "last.pth").is_file() else ""
            _echo({130: f"interrupted{kept}", 143: f"terminated{kept}"}.get(
                code, f"error: data-parallel training failed (exit code {code}; the processes' messages are above){kept}"))
        raise typer.Exit(code)
    cfg = _train_config(data, locals(), run=str(run), compile=compile_model)
    with _errors(f"the best model so far is kept in {run}; continue with `cxr-fastai train --resume --run {run}`"):
        _out_folder(run, "--run")
        res = train_run(cfg, resume=resume, force=force, progress=not quiet and sys.stderr.isatty(),
                        log=_quiet_log(quiet), warn=_warn)
    if res.rank:  # data-parallel: rank 0 reports
        return
    b = res.best
    typer.echo(f"trained {res.n_train} images ({res.n_valid} validation, {res.skipped} skipped) in {res.seconds:.0f} s; "
               + (f"weights averaged over epoch(s) {b['averaged_from_epoch']}..{res.best_epoch}" if "averaged_from_epoch" in b
                  else f"best epoch {res.best_epoch}") + f": valid accuracy {b.get('accuracy', float('nan')):.4f}, "
               f"balanced accuracy {b.get('balanced_accuracy_score', float('nan')):.4f}")
    typer.echo(f"run folder: {res.run}  (next: cxr-fastai interpret {res.run}; cxr-fastai export {res.run})")


@app.command()
def interpret(
    run: Path = typer.Argument(..., help="A run folder made by `cxr-fastai train`."),
    k: int = typer.Option(InterpretConfig.k, "--k", min=1, max=400, help="How many top losses to show."),
    out: Optional[Path] = typer.Option(None, "--out", help="Report folder (default RUN/report)."),
    device: Device = typer.Option(Device.auto, help="Where to run the model."),
    force: bool = typer.Option(True, "--force/--no-force", help="Replace an existing report folder."),
):
    """Top losses and confusion reports on the validation set (PNG, CSV), written headless."""
    from .evaluate.report import interpret_run

    with _errors():
        _out_folder(out, "--out")
        rep = interpret_run(run, k=k, out=out, device=device.value, force=force)
    typer.echo(f"report: {rep.folder}")
    for f in rep.files:
        typer.echo(f"  {f}")


@app.command("export")
def export_cmd(
    run: Path = typer.Argument(..., help="A finished run folder."),
    to: Optional[Path] = typer.Option(None, "--to", help="Artifact folder (default export/RUN_NAME)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing artifact."),
):
    """Write model.pkl (fastai learn.export), model.safetensors, model.onnx and manifest.json into one folder, atomically."""
    from .artifact.export import export_run

    with _errors():
        art = export_run(run, to=to, force=force)
    typer.echo(f"exported to {art.folder}: " + ", ".join(sorted(art.files)))


@app.command()
def predict(
    artifact: Path = typer.Argument(..., help="An exported model folder (manifest.json + model.safetensors)."),
    inputs: List[Path] = typer.Argument(..., help="Image files and/or folders (searched recursively)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write here instead of stdout."),
    fmt: Format = typer.Option(Format.csv, "--format", help="csv or json."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Load model.pkl with fastai (a pickle can run code: only for artifacts you trust)."),
    bs: int = typer.Option(PredictConfig.bs, min=1, max=8192, help="Images per forward pass."),
    workers: int = typer.Option(PredictConfig.workers, min=1, max=64, help="Decoding threads."),
    tta: bool = typer.Option(False, "--tta", help="Test-time augmentation: average the whole image and five fixed crops (6x the compute)."),
    device: Device = typer.Option(Device.auto, help="Where to run the model."),
    runtime: Runtime = typer.Option(Runtime.torch, "--runtime", help=RUNTIME_HELP),
):
    """Class probabilities for images; unreadable files get an `error` entry instead of failing the run."""
    from .artifact.predict import predict_paths, write_predictions

    cfg = PredictConfig(bs=bs, workers=workers, device=device.value, trust_pickle=trust_pickle, tta=tta,
                        runtime=runtime.value)
    with _errors():
        _out_file(out, "--out", f"predictions.{fmt.value}")
        _trust_pickle_warning(trust_pickle and runtime is Runtime.torch)
        res = predict_paths(artifact, inputs, cfg)
        write_predictions(res, out, fmt.value)
    if out is not None:
        _echo(f"{res.n - res.n_errors} image(s) predicted, {res.n_errors} unreadable; written to {out}")
    if res.n_errors:
        _warn(f"{res.n_errors} unreadable image(s) skipped: see the error column")


@app.command()
def evaluate(
    artifact: Path = typer.Argument(..., help="An exported model folder."),
    data: List[Path] = typer.Argument(..., help="Labelled images: one or more roots, each in any layout `train` accepts."),
    split: str = typer.Option(EvalConfig.split, "--split", help="train, valid, test, all (every split) or a labels.csv split name of your own (e.g. external), where the layout has splits; otherwise all images count."),
    out: Optional[Path] = typer.Option(None, "--out", help="Metrics JSON path (default: print to stdout)."),
    bs: int = typer.Option(PredictConfig.bs, min=1, max=8192, help="Images per forward pass."),
    workers: int = typer.Option(PredictConfig.workers, min=1, max=64, help="Decoding threads."),
    source: List[str] = typer.Option([], "--source", help="Only images of this labels.csv source (repeatable)."),
    tta: bool = typer.Option(False, "--tta", help="Test-time augmentation: average the whole image and five fixed crops (6x the compute)."),
    device: Device = typer.Option(Device.auto, help="Where to run the model."),
    runtime: Runtime = typer.Option(Runtime.torch, "--runtime", help=RUNTIME_HELP),
):
    """Accuracy, balanced accuracy, confusion matrix and per-class sensitivity/specificity/PPV/NPV/F1."""
    import json

    from .evaluate.evaluate import evaluate as evaluate_data
    from .evaluate.evaluate import write_metrics

    import re

    from .data.discover import SPLIT_NAME

    if not re.fullmatch(SPLIT_NAME, split):
        raise typer.BadParameter(f"{split!r} is not a split name (train, valid, test, or letters, digits, '-', '_')",
                                 param_hint="--split")
    with _errors():
        _out_file(out, "--out", "metrics.json")
        res = evaluate_data(artifact, data, split=split, cfg=PredictConfig(bs=bs, workers=workers, device=device.value, tta=tta,
                                                                                     runtime=runtime.value),
                            warn=_warn, sources=tuple(source))
        if out is not None:
            write_metrics(res, out)
    if out is None:
        typer.echo(json.dumps(res.to_dict(), indent=2))
    else:
        _echo(f"{res.n} images: accuracy {res.accuracy:.4f}, balanced accuracy {res.balanced_accuracy:.4f}; written to {out}")


# the options of the commands that write a new artifact from an old one (adapt, refit)
DERIVED = {
    "trust_pickle": typer.Option(False, "--trust-pickle", help="Also write model.pkl with the new weights (loads the old model.pkl: a pickle can run code; only for artifacts you trust). Without it the new artifact has no model.pkl."),
    "device": typer.Option(Device.auto, help="Where to run the model."),
    "force": typer.Option(False, "--force", help="Replace an existing --to folder."),
    "quiet": typer.Option(False, "--quiet", "-q", help="No progress lines."),
}


@app.command()
def adapt(
    artifact: Path = typer.Argument(..., help="An exported model folder."),
    inputs: List[Path] = typer.Argument(..., help="The new hospital's images: files and/or folders (searched recursively); with --split or --source, labelled dataset roots (labels are not used)."),
    to: Path = typer.Option(..., "--to", help="Folder for the adapted artifact (never the one adapted)."),
    split: List[str] = typer.Option([], "--split", help="INPUTS are dataset roots: take this split's images (repeatable; all: every split)."),
    source: List[str] = typer.Option([], "--source", help="INPUTS are dataset roots: take only this labels.csv source's images (repeatable)."),
    bs: int = typer.Option(256, "--bs", min=2, max=8192, help="Images per batch of statistics (batches are made near-equal in size)."),
    workers: int = typer.Option(PredictConfig.workers, min=1, max=64, help="Decoding threads."),
    seed: int = typer.Option(0, "--seed", help="Seed of the shuffled order the batches are made in."),
    trust_pickle: bool = DERIVED["trust_pickle"],
    device: Device = DERIVED["device"],
    force: bool = DERIVED["force"],
    quiet: bool = DERIVED["quiet"],
):
    """Re-estimate the model's BatchNorm statistics on a hospital's own unlabelled films (AdaBN) and write them as a new artifact."""
    from .artifact.adapt import adapt_artifact

    def progress(done: int, total: int) -> None:
        _echo(f"adapt: {done}/{total} images")

    with _errors():
        _trust_pickle_warning(trust_pickle)
        res = adapt_artifact(artifact, inputs, to, splits=split, sources=source, bs=bs, workers=workers,
                             device=device.value, seed=seed, trust_pickle=trust_pickle, force=force,
                             progress=None if quiet else progress)
    if res.skipped:
        _warn(f"{len(res.skipped)} unreadable image(s) left out (first: {res.skipped[0][1]})")
    if res.seen_in_training:
        _warn(f"{res.seen_in_training} of the {res.n_images} images are training images of this model (same file "
              "content): adapt on the new hospital's films")
    if res.labels:
        total = sum(res.labels.values())
        top, k = max(res.labels.items(), key=lambda kv: kv[1])
        _echo("labels of these images (not used): " + ", ".join(f"{c} {n}" for c, n in res.labels.items()))
        if k >= 0.8 * total:
            _warn(f"{k} of the {total} images are labelled {top}: statistics of a one-sided mix move every film "
                  "towards it; adapt on a representative mix of the hospital's films")
    typer.echo(f"adapted on {res.n_images} images: {res.n_bn_layers} BatchNorm layers re-estimated (first layer's "
               f"means moved {res.shift:.2f} standard deviations on average); written to {res.artifact.folder}: "
               + ", ".join(sorted(res.artifact.files)))
    if not res.artifact.has_pickle:
        typer.echo("  model.pkl left out (pass --trust-pickle to carry it over); predict, evaluate and serve use the "
                   "safetensors and ONNX files")


RefitBalance = Enum("RefitBalance", {v: v for v in ("class-source", "class-then-source")}, type=str)


@app.command()
def refit(
    artifact: Path = typer.Argument(..., help="An exported model folder."),
    data: List[Path] = typer.Argument(..., help="Labelled dataset root(s) (any layout train accepts): the head is fitted on their train split and chosen on their valid split; test is never read."),
    to: Path = typer.Option(..., "--to", help="Folder for the refitted artifact (never the one refitted)."),
    balance: List[RefitBalance] = typer.Option([], "--balance", help="Weightings to try (repeatable; default both): every class x source stratum alike (class-source), or every class and within it every source alike (class-then-source), each raised to alpha 0.25-1."),
    max_drop: float = typer.Option(0.01, "--max-drop", min=0.0, max=1.0, help="Pooled validation accuracy a head may lose against the trained head's and still be chosen."),
    holdout: List[str] = typer.Option([], "--holdout", help="A source kept out of the fit and the choice (repeatable): a crossval fold's held-out source."),
    draws: int = typer.Option(REFIT_DRAWS, "--draws", min=0, max=64, help="Fit the head on this many training crops of each train image (the crop training used) instead of the whole images, whose features the network partly memorised; 0: the whole images."),
    bs: int = typer.Option(256, "--bs", min=1, max=8192, help="Images per forward pass."),
    workers: int = typer.Option(PredictConfig.workers, min=1, max=64, help="Decoding threads."),
    trust_pickle: bool = DERIVED["trust_pickle"],
    device: Device = DERIVED["device"],
    force: bool = DERIVED["force"],
    quiet: bool = DERIVED["quiet"],
):
    """Refit only the last layer on class-and-source-balanced data, chosen on the worst validation source (deep feature reweighting), into a new artifact."""
    from .artifact.refit import refit_artifact

    t0 = time.monotonic()

    def progress(done: int, total: int) -> None:
        rate = done / max(time.monotonic() - t0, 1e-9)
        left = f", about {(total - done) / rate / 60:.0f} min left" if done < total else ""
        _echo(f"refit: features of {done}/{total} images ({rate:.0f} img/s{left})")

    def on_row(r: dict) -> None:
        _echo(f"refit: {r['balance']} alpha {r['alpha']} C {r['C']}: valid worst source {r['worst_source']} "
              f"{r['worst_balanced_accuracy']:.3f}, pooled {r['pooled_accuracy']:.3f}"
              + ("" if r["allowed"] else " (drops more than --max-drop)"))

    with _errors():
        _trust_pickle_warning(trust_pickle)
        res = refit_artifact(artifact, data, to, balances=[b.value for b in balance] or None, max_drop=max_drop,
                             holdout=holdout, draws=draws, bs=bs, workers=workers, device=device.value,
                             trust_pickle=trust_pickle, force=force, progress=None if quiet else progress,
                             on_row=None if quiet else on_row)
    if res.skipped:
        _warn(f"{len(res.skipped)} unreadable image(s) left out (first: {res.skipped[0][1]})")
    if res.held_out_by_model:
        _echo(f"held out as the model's training left them out: {', '.join(res.held_out_by_model)}")
    if res.valid_seen_in_training:
        _warn(f"{res.valid_seen_in_training} of the {res.n_valid} valid images are training images of this model "
              "(same file content): the choice favours heads that fit them; refit on roots whose valid split the "
              "model did not train on")
    if res.trained.get("one_class_sources"):
        _echo("not ranked for the choice (one class in valid): " + ", ".join(res.trained["one_class_sources"]))
    t = res.trained
    typer.echo(f"trained head: valid worst source {t['worst_source']} {t['worst_balanced_accuracy']:.3f}, pooled "
               f"accuracy {t['pooled_accuracy']:.3f} ({res.n_train} train, {res.n_valid} valid images"
               + (f"; held out: {', '.join(res.held_out)}" if res.held_out else "") + ")")
    if res.artifact is None:
        _warn(f"no refitted head keeps pooled validation accuracy within --max-drop {max_drop:g} of the trained "
              "head's; nothing written")
        raise typer.Exit(1)
    c = res.chosen
    typer.echo(f"chosen on validation: {c['balance']} alpha {c['alpha']} C {c['C']}: worst source {c['worst_source']} "
               f"{c['worst_balanced_accuracy']:.3f}, pooled accuracy {c['pooled_accuracy']:.3f}; written to "
               f"{res.artifact.folder}: " + ", ".join(sorted(res.artifact.files)))
    if c["worst_balanced_accuracy"] <= t["worst_balanced_accuracy"]:
        _warn("the chosen head's worst validation source is no better than the trained head's: keep the trained model")
    typer.echo("  score it on a test split before use: cxr-fastai evaluate " + str(res.artifact.folder) + " DATA --split test")


@app.command("audit")
def audit_cmd(
    data: List[Path] = typer.Argument(..., help="Dataset root(s) (any layout train accepts)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the full report (counts, example pairs, tables) as JSON here."),
    strict: bool = typer.Option(False, "--strict", help="Exit 1 when anything leaks across splits (duplicates, shared patients or groups)."),
    near_distance: int = typer.Option(AuditConfig.near_distance, "--near-distance", min=0, max=15, help="Perceptual-hash bits (of 64) at or below which two images are near-duplicate candidates."),
    min_similarity: float = typer.Option(AuditConfig.min_similarity, "--min-similarity", min=-1.0, max=1.0, help="Correlation of the two 32 px grey thumbnails at or above which a candidate is confirmed as a near duplicate (only confirmed ones count as leakage; -1 confirms every candidate)."),
    workers: int = typer.Option(AuditConfig.workers, min=1, max=64, help="Decoding and hashing threads."),
):
    """Leakage across splits (exact and near-duplicate images, patients or groups in two splits) and class-by-source counts.

    Near duplicates: phash candidates confirmed by thumbnail correlation."""
    from .data.audit import audit, write_report
    from .errors import DataError

    with _errors():
        _out_file(out, "--out", "audit.json")
        rep = audit(data, workers=workers, near_distance=near_distance, min_similarity=min_similarity)
        if out is not None:
            write_report(rep, out)
        for line in rep.summary_lines():
            typer.echo(line)
        if out is not None:
            typer.echo(f"report: {out}")
        for p, err in rep.unreadable[:3]:
            _warn(f"unreadable, left out of the image checks: {err}")
        if len(rep.unreadable) > 3:
            _warn(f"... and {len(rep.unreadable) - 3} more unreadable image(s)" + (f" (all listed in {out})" if out else ""))
        for w in rep.source_warnings:
            _warn(w)
        leaks = rep.leak_messages()
        where = f"see {out}" if out is not None else "rerun with --out REPORT.json for the pairs and ids"
        if strict and leaks:
            raise DataError(f"{rep.root}: leakage across splits: {'; '.join(leaks)}; {where}, then give each image, "
                            "patient and group a single split")
        for m in leaks:
            _warn(f"{m}: held-out metrics will be optimistic ({where})")


@app.command()
def demo(
    out: Path = typer.Option(Path(DemoConfig.out), "--out", help="Folder for the synthetic data and every output (replaced)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only the final summary."),
):
    """The whole path on a small SYNTHETIC dataset made on the spot: train, interpret, export, predict, evaluate."""
    from .demo import run_demo

    with _errors():
        res = run_demo(DemoConfig(out=str(out)), log=_quiet_log(quiet), warn=_warn)
    typer.echo("demo finished (synthetic images: this shows the tool works, it says nothing about medicine)")
    typer.echo(f"  held-out synthetic test accuracy: {res.test_accuracy:.3f}, balanced accuracy {res.test_balanced_accuracy:.3f}")
    for name, path in res.files.items():
        typer.echo(f"  {name}: {path}")


def main() -> None:
    try:
        app()
    except SystemExit as e:
        from .train import distributed

        if distributed.joined():  # a data-parallel process: leave without the interpreter's teardown
            distributed.exit_process(e.code)
        raise


@app.command()
def bench(
    data: Path = typer.Argument(..., help="Dataset root (any layout train accepts)."),
    device: Device = typer.Option(Device.auto, help="cpu or cuda (auto picks cuda when available)."),
    size: int = typer.Option(BenchConfig.size, min=16, max=1024, help="Image side in px."),
    epochs: int = typer.Option(BenchConfig.epochs, min=1, max=1000, help="Epochs per counted run."),
    limit: int = typer.Option(BenchConfig.limit, min=0, help="Training images (0: 2,048 on CPU, all on CUDA)."),
    bs: int = typer.Option(D.bs, min=1, max=8192, help="Batch size."),
    target_acc: float = typer.Option(BenchConfig.target_acc, "--target-acc", min=0.0, max=1.0, help="Validation accuracy for time-to-target (0: 0.95 on CUDA, 0.85 on CPU)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Training img/s of the fastai path vs a fair plain-PyTorch loop (same data, model, recipe), and predict img/s."""
    import json

    from .bench import run_bench

    cfg = BenchConfig(data=str(data), device=device.value, size=size, epochs=epochs, limit=limit, bs=bs,
                      target_acc=target_acc)
    with _errors():
        res = run_bench(cfg, log=_echo)
    if as_json:
        typer.echo(json.dumps(res))
    else:
        for k, v in res.items():
            typer.echo(f"{k:>24}: {v}")


# ------------------------------------------------------------------------------------------ crossval

from .config import CrossvalConfig  # noqa: E402


class CrossvalBy(str, Enum):
    source = "source"
    group = "group"


class CrossvalSplit(str, Enum):
    all = "all"
    test = "test"
    valid = "valid"


@app.command("crossval")
def crossval_cmd(
    data: List[Path] = typer.Argument(..., help="Dataset roots (any layout train accepts): an image's source is its labels.csv source, else its root's folder name."),
    out: Path = typer.Option(..., "--out", help="Series folder: folds/NAME/{run,model,result.json}, crossval.json/.md/.png. Rerun the same command to resume."),
    by: CrossvalBy = typer.Option(CrossvalBy(CrossvalConfig.by), "--by", help="What is held out: source (leave one source out) or group (patient-grouped K-fold: a patient's and a duplicate group's images stay in one fold)."),
    folds: int = typer.Option(CrossvalConfig.folds, "--folds", min=2, max=100, help="--by group: number of folds K."),
    source: Optional[str] = typer.Option(None, "--source", help="--by group: K-fold over this source's images only (the others are left out of every fold)."),
    split: CrossvalSplit = typer.Option(CrossvalSplit(CrossvalConfig.split), "--split", help="Held-out images scored: all (every split of the held-out source or fold; none was seen in training), test or valid. The pooled fold uses test for all."),
    all_sources: bool = typer.Option(CrossvalConfig.all_sources, "--all-sources", help="Also hold out sources that have a single class."),
    pooled: bool = typer.Option(CrossvalConfig.pooled, "--pooled/--no-pooled", help="Also train on every source and score the pooled test split (the in-distribution figure). --by group has no pooled fold: it reports the out-of-fold figure."),
    size: int = RECIPE["size"],
    epochs: int = RECIPE["epochs"],
    bs: int = RECIPE["bs"],
    lr: float = RECIPE["lr"],
    wd: float = RECIPE["wd"],
    clip: float = RECIPE["clip"],
    seed: int = RECIPE["seed"],
    min_scale: float = RECIPE["min_scale"],
    device: Device = RECIPE["device"],
    workers: int = RECIPE["workers"],
    data_path: DataPath = RECIPE["data_path"],
    cache_dir: Optional[Path] = RECIPE["cache_dir"],
    label_smoothing: float = RECIPE["label_smoothing"],
    class_weights: bool = RECIPE["class_weights"],
    opt: OptKind = RECIPE["opt"],
    balance: Balance = RECIPE["balance"],
    balance_power: float = RECIPE["balance_power"],
    augment: Augment = RECIPE["augment"],
    contrast: Contrast = RECIPE["contrast"],
    crop_border: float = RECIPE["crop_border"],
    mixup: float = RECIPE["mixup"],
    mixup_pairs: MixupPairs = RECIPE["mixup_pairs"],
    group_dro: float = RECIPE["group_dro"],
    source_adversary: float = RECIPE["source_adversary"],
    weight_average: float = RECIPE["weight_average"],
    mix_style: float = RECIPE["mix_style"],
    exclude_source: List[str] = RECIPE["exclude_source"],
    set_: List[str] = typer.Option([], "--set", help="Any other training option as FIELD=VALUE, a TrainConfig field (e.g. widths=32,64,128,256); repeatable."),
    n_boot: int = typer.Option(CrossvalConfig.n_boot, "--n-boot", min=0, max=100_000, help="Bootstrap resamples for the 95% intervals."),
    tta: bool = typer.Option(False, "--tta", help="Test-time augmentation when scoring (6x the compute)."),
    fold: List[str] = typer.Option([], "--fold", help="Compute only this fold (a held-out source's name, its folder name holdout-NAME, pooled, or a group fold's number); repeatable. The others stay pending: several machines or sessions can share one --out."),
    force: bool = typer.Option(False, "--force", help="Start the series again (removes OUT/folds and the summaries)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress lines."),
):
    """Leave-one-source-out: train on all sources but one, score the held-out one; plus a pooled in-distribution fold.
    --by group --folds K: patient-grouped K-fold instead."""
    from .evaluate.crossval import crossval, parse_train_overrides, write_crossval

    values = locals()
    with _errors(f"finished folds are kept in {out}; rerun the same command to resume"):
        _out_folder(out, "--out")
        extra = parse_train_overrides(set_)
        tcfg = _train_config(data, values).replace(**extra)
        cfg = CrossvalConfig(by=by.value, folds=folds, source=source or "", split=split.value, all_sources=all_sources,
                             pooled=pooled and by is CrossvalBy.source, n_boot=n_boot)
        pcfg = PredictConfig(device=device.value, tta=tta)
        res = crossval(tcfg, out, cfg, pcfg=pcfg, force=force, progress=not quiet and sys.stderr.isatty(),
                       only=fold, log=_quiet_log(quiet), warn=_warn)
        files = write_crossval(res)
    for f in res.folds:
        if f.status == "done":
            ci = f.balanced_accuracy_ci95
            typer.echo(f"{f.name:>24}: n {f.n:>6}, accuracy {f.accuracy:.3f}, balanced accuracy {f.balanced_accuracy:.3f}"
                       + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))
        else:
            typer.echo(f"{f.name:>24}: {f.status} ({f.reason})")
    s = res.summary()
    if s["held_out_balanced_accuracy_mean"] is not None:
        typer.echo(f"mean held-out balanced accuracy {s['held_out_balanced_accuracy_mean']:.3f} over "
                   f"{s['held_out_folds_done']} {'fold' if by is CrossvalBy.group else 'source'}(s)"
                   + (f"; pooled {s['pooled_balanced_accuracy']:.3f}" if s["pooled_balanced_accuracy"] is not None else ""))
    if s.get("out_of_fold"):
        o = s["out_of_fold"]
        typer.echo(f"out of fold (every image once): n {o['n']}, accuracy {o['accuracy']:.3f}, "
                   f"balanced accuracy {o['balanced_accuracy']:.3f}")
    for name, path in files.items():
        typer.echo(f"  {name}: {path}")


# ------------------------------------------------------------------------------------------ serve

from .config import ServeConfig  # noqa: E402


@app.command()
def serve(
    artifact: Path = typer.Argument(..., help="An exported model folder (manifest.json + model.safetensors / model.onnx)."),
    host: str = typer.Option(ServeConfig.host, "--host", help="Address to listen on. Anything but loopback (127.0.0.1, ::1, localhost) needs --token."),
    port: int = typer.Option(ServeConfig.port, "--port", min=1, max=65535, help="TCP port."),
    token: Optional[str] = typer.Option(None, "--token", envvar="CXR_SERVE_TOKEN", help="Bearer token every request but GET /health and the page needs (Authorization: Bearer TOKEN). Also read from $CXR_SERVE_TOKEN, which keeps it out of the process list."),
    max_mb: float = typer.Option(ServeConfig.max_mb, "--max-mb", min=0.001, max=10_000, help="MB of files per request; more is refused with 413."),
    workers: int = typer.Option(ServeConfig.workers, "--workers", min=1, max=64, help="Server processes, each with its own copy of the model and its own batching (1 suits a small machine)."),
    runtime: Runtime = typer.Option(Runtime.torch, "--runtime", help="torch: model.safetensors (Grad-CAM and TTA available); onnx: model.onnx in onnxruntime on the CPU."),
    device: Device = typer.Option(Device.auto, help="Where to run the model (torch runtime)."),
    threads: int = typer.Option(ServeConfig.threads, "--threads", min=0, max=256, help="The model's threads per worker (0: the library's default, one per physical core, as predict uses; with --workers N, the cores divided by N)."),
    decode_threads: int = typer.Option(ServeConfig.decode_threads, "--decode-threads", min=1, max=64, help="Threads that decode uploaded images."),
):
    """HTTP API (POST /predict, GET /model, GET /health) and a one-page UI over an exported model; Ctrl-C stops it."""
    with _errors("the server stopped"):
        from .serve.app import check_bind, run

        check_bind(host, token)   # before anything is loaded
        run(artifact, host=host, port=port, token=token, max_mb=max_mb, workers=workers, runtime=runtime.value,
            device=device.value, threads=threads, decode_threads=decode_threads, log_fn=_echo)
    # uvicorn shuts down gracefully on Ctrl-C / SIGTERM (in-flight requests finish) and returns
    _echo("server stopped")
