"""Data-parallel training: one run in N processes (DDP), through accelerate's launcher and fastai's own
distributed path (`Learner.distrib_ctx`: accelerate's `Accelerator` wraps the model in
DistributedDataParallel; NCCL between GPUs, gloo between CPU processes).

How a run is started:
  accelerate launch --multi_gpu --num_processes N -m cxr_fastai train DATA --run R ...
  cxr-fastai train DATA --run R --procs N        (the same, for one machine: `launch_local`)
  (`accelerate launch --cpu --num_processes N` starts ONE process unless an MPI hostfile is configured:
  accelerate's only local multi-process launcher is torchrun's, behind `--multi_gpu`; on a machine without
  GPUs, or with `--device cpu`, the processes then train on the CPU over gloo. torchrun works as well.)

What each process does (`train`, called by `fit.train` when WORLD_SIZE > 1):
  - joins the process group (`accelerate.PartialState`, with a timeout: $CXR_DIST_TIMEOUT seconds,
    default 1800, so that a process whose peers are gone stops instead of waiting for ever);
  - rank 0 alone writes: it scans the data and writes the run folder (or checks the run on --resume)
    while the others wait (`rank0_first`, which also passes rank 0's failure on to them), then they read
    the folder it wrote. Checkpoints, history.csv, run.json, learner.pkl and the log lines are rank 0's;
  - every process decodes its own image cache (host memory x N on one machine; with --cache-dir rank 0
    decodes and saves it first, the others load it);
  - the global batch is --bs, whatever N: each process takes bs/N images of every batch (--bs must be a
    multiple of N). The number of steps per epoch, the one-cycle schedule over them and the lr are those
    of a one-process run with batch bs: keep --lr; scale it with --bs as for one process.
  - `ShardedDL` (a fastai DistributedDL) cuts every global batch of the one-process order into N
    consecutive pieces, one per process; the crops of each image are those the one-process run draws.
    fastai's own DistributedDL is not used as is: it broadcasts the order as a CUDA tensor (fails on
    gloo/CPU), gives each process a contiguous block of the epoch (its __len__ then differs from the
    batches it yields, which cuts the one-cycle schedule short) and averages scalar metrics over the
    padding it adds to the last validation batch.
  - validation is sharded too; `GatherValid` gathers every validation batch's predictions and targets,
    drops the padding and gives the Recorder the one-process batch: loss, accuracy and balanced accuracy
    are computed once over the whole validation set, the same on every process (run.json: valid_n).
    Before it, every process takes rank 0's BatchNorm statistics (the ones checkpointed).
  - BatchNorm: SyncBatchNorm on GPUs (statistics over the global batch, as one process); on CPU
    (gloo has no SyncBatchNorm) each process normalises over its own bs/N images.
  - the reported train_loss is rank 0's smoothed loss over its share of each batch.

Failures: a process that raises or dies ends the job: torchrun stops the others (SIGTERM: they exit 143
with the usual message); one left waiting in a collective gets a gloo/NCCL error or the timeout. The
checkpoints of the last finished epoch stay (atomic writes); --resume continues, under any N that
divides --bs.

Test hook (tests/test_distributed.py only; never set otherwise): CXR_TEST_FAIL_RANK=r and
CXR_TEST_FAIL_AT_BATCH=i make process r fail at its i-th training batch (CXR_TEST_FAIL_HOW=raise,
default, or exit: os._exit(3), a hard crash).
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from ..config import TrainConfig, resolve_device
from ..errors import CxrError, RunError

Log = Callable[[str], None]

TIMEOUT_ENV = "CXR_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0
FAIL_RANK_ENV, FAIL_AT_ENV, FAIL_HOW_ENV = "CXR_TEST_FAIL_RANK", "CXR_TEST_FAIL_AT_BATCH", "CXR_TEST_FAIL_HOW"


def _noop(msg: str) -> None:
    pass


class PeerStopped(RunError):
    """Another process of a data-parallel run failed or was stopped; this one stops too."""


# ------------------------------------------------------------------------------------- the group

def world_size() -> int:
    """Processes of this run, from the launcher's environment (1 when not launched data-parallel)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))
    except ValueError:
        return 1


def timeout_seconds() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "")
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        t = float(raw)
    except ValueError:
        t = -1.0
    if not t > 0:
        raise CxrError(f"${TIMEOUT_ENV}={raw!r}: give the process-group timeout in seconds (> 0)")
    return t


@dataclass(frozen=True)
class Group:
    rank: int
    world: int
    local_rank: int
    device: str      # this process's device: cpu or cuda:LOCAL_RANK
    backend: str     # gloo or nccl


def setup(device_name: str) -> Group:
    """Join the process group the launcher describes (accelerate's PartialState), with a timeout."""
    from datetime import timedelta

    import torch
    from accelerate import PartialState

    device = resolve_device(device_name)
    cpu = not device.startswith("cuda")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))
    if not cpu and torch.cuda.device_count() < local_world:
        raise CxrError(f"{local_world} processes on this machine but torch sees {torch.cuda.device_count()} GPU(s); "
                       "start one process per GPU, or train on the CPU with --device cpu")
    state = PartialState(cpu=cpu, timeout=timedelta(seconds=timeout_seconds()))
    if state.num_processes < 2:
        raise CxrError(f"WORLD_SIZE={world_size()} but accelerate set up {state.num_processes} process "
                       f"({state.distributed_type}); start the run with `accelerate launch --multi_gpu` or torchrun")
    if not _state["atexit"]:  # at the process's end, not the run's: several runs (crossval folds) share the group
        import atexit

        atexit.register(_destroy_group)
        _state["atexit"] = True
    return Group(rank=state.process_index, world=state.num_processes, local_rank=state.local_process_index,
                 device=str(state.device), backend=str(state.backend))


_state = {"atexit": False}


def _destroy_group() -> None:
    import torch.distributed as dist

    with contextlib.suppress(Exception):
        if dist.is_initialized():
            dist.destroy_process_group()


def joined() -> bool:
    """Whether this process joined a data-parallel group (`setup`)."""
    return _state["atexit"]


def exit_process(code) -> None:
    """End a process that joined a data-parallel group, with `code` (a SystemExit's): the atexit handlers
    run while the interpreter is whole (the group is destroyed there), the streams are flushed, and the
    process leaves with os._exit, without the interpreter's teardown. After a gloo group was destroyed,
    that teardown now and then aborts the process ("terminate called without an active exception",
    SIGABRT) once the run is over and written: a CI run failed on it, and 3 of 51 two-process test runs on
    2 busy cores aborted so (3 of the 31 run beside busy loops), after both processes had destroyed the
    group; none of 45 did with this exit, beside busy loops."""
    import atexit

    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # sys.exit("message"), as Python reports it
        print(code, file=sys.stderr)
        status = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


def rank0_first(first: Callable, then: Callable | None = None):
    """`first()` on rank 0; once it returned, `then()` (default `first`) on the other ranks. A failure on
    rank 0 is passed on: the others raise PeerStopped instead of waiting (fastai's `rank0_first` leaves
    them at a barrier until the timeout). Returns what the call on this rank returned."""
    import torch.distributed as dist

    if world_size() < 2 or not dist.is_initialized():
        return first()
    if dist.get_rank() == 0:
        try:
            res = first()
        except BaseException as e:
            with contextlib.suppress(Exception):
                dist.broadcast_object_list([f"{type(e).__name__}: {e}"], src=0)
            raise
        dist.broadcast_object_list([None], src=0)
        return res
    msg = [None]
    dist.broadcast_object_list(msg, src=0)
    if msg[0] is not None:
        raise PeerStopped(f"process {dist.get_rank()}: stopped because process 0 failed (its message is above: {msg[0]})")
    return (then or first)()


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """Rank 0 working by itself (finishing the run): fastai's helpers must not gather across processes,
    which they do whenever WORLD_SIZE > 1 (`maybe_gather`)."""
    old = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("WORLD_SIZE", None)
        else:
            os.environ["WORLD_SIZE"] = old


def split_batch(bs: int, n_train: int, world: int) -> tuple[int, int]:
    """(global batch, batch per process): --bs is the global batch, clamped to the training set as one
    process clamps it (then rounded down to a multiple of the processes)."""
    if bs % world:
        raise CxrError(f"--bs {bs} is not a multiple of the {world} processes: --bs is the global batch, split "
                       f"evenly across them; give e.g. --bs {max(world, bs // world * world)}")
    if n_train < world:
        raise CxrError(f"{n_train} training image(s) for {world} processes: every process needs at least one")
    global_bs = max(world, min(bs, n_train) // world * world)
    return global_bs, global_bs // world


# --------------------------------------------------------------------------------- fastai pieces
# ShardedDL, GatherValid and FailForTest subclass fastai classes: they are made on first use (`_classes`,
# or the module's __getattr__), so that `cxr-fastai train --procs N`, which only launches, imports no fastai.

def __getattr__(name: str):
    if name in ("ShardedDL", "GatherValid", "FailForTest"):
        _classes()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _fastai():
    import torch
    import torch.distributed as dist
    from fastai.callback.core import Callback
    from fastai.distributed import DistributedDL
    from fastai.torch_core import maybe_gather, to_detach

    return torch, dist, Callback, DistributedDL, maybe_gather, to_detach


def _classes():
    """The fastai subclasses, made on first use (importing this module must not import fastai)."""
    global ShardedDL, GatherValid, FailForTest
    if "ShardedDL" in globals():
        return
    torch, dist, Callback, DistributedDL, maybe_gather, to_detach = _fastai()

    class _ShardedDL(DistributedDL):
        """fastai's DistributedDL, sharding by global batch: batch j of the one-process order (global batch
        `bs * world`) is cut into `world` consecutive pieces of `bs`, piece r for rank r. The last, partial
        validation batch is padded (repeats) to a multiple of `world`; `gather` drops the padding. The order
        itself is the wrapped loader's (`CachedDL.get_idxs`: seeded by (seed, epoch), weighted draws
        included), made on every rank and checked by a broadcast from rank 0."""

        def __init__(self, dl, rank=None, world_size=None, device=None):
            super().__init__(dl, rank=rank, world_size=world_size, device=device)
            self._crop_shard(self.rank, self.world_size)

        def _crop_shard(self, rank, world):
            for f in getattr(getattr(self.dl, "after_batch", None), "fs", []):
                if hasattr(f, "shard"):
                    f.shard = (rank, world)

        def unwrap(self):
            self._crop_shard(0, 1)
            return self.dl

        # EpochSeed's hooks reach the wrapped loader (DistributedDL has neither)
        def set_epoch(self, epoch: int) -> None:
            if hasattr(self.dl, "set_epoch"):
                self.dl.set_epoch(epoch)

        @property
        def seed(self):
            return getattr(self.dl, "seed", 0)

        @property
        def global_bs(self) -> int:
            return self.bs * self.world_size

        def _broadcast(self, t, rank):
            # fastai's moves the order to CUDA (NCCL only takes CUDA tensors), which fails on gloo
            dev = "cuda" if dist.get_backend() == "nccl" else "cpu"
            t = torch.as_tensor(t, dtype=torch.long, device=dev)
            dist.broadcast(t, rank)
            return t.cpu().tolist()

        def __len__(self):
            n = self.dl.n or 0
            return n // self.global_bs if self.drop_last else math.ceil(n / self.global_bs)

        def get_idxs(self):
            idxs = list(self.dl.get_idxs())
            idxs = self._broadcast(idxs, 0)
            self.n = n = len(idxs)
            B, b, W, r = self.global_bs, self.bs, self.world_size, self.rank
            full = n // B
            mine = [i for j in range(full) for i in idxs[j * B + r * b:j * B + (r + 1) * b]]
            rest = idxs[full * B:]
            if rest and not self.drop_last:
                k = math.ceil(len(rest) / W)
                rest = rest + (rest * W)[:k * W - len(rest)]  # padding, dropped again by `gather`
                mine += rest[r * k:(r + 1) * k]
            return mine

        def n_real(self, s: int) -> int:
            """Images of the current global batch that are not padding, this rank's part being `s` images
            (the batch was drawn: self.i counts it). The padding is at the batch's end."""
            start = (self.i - s) * self.world_size  # global position of this batch in the epoch
            return max(0, min(s * self.world_size, self.n - start))

        def gather(self, x):
            """This rank's part of the current batch -> the whole batch (every rank's, in the one-process
            order), padding dropped."""
            return maybe_gather(x)[:self.n_real(x.shape[0])]

        def to_detach(self, b, cpu=True, gather=True):
            # batches reach the metrics already gathered (GatherValid): gathering again would count them twice
            return to_detach(b, cpu, gather=False)

    class _GatherValid(Callback):
        """Validation over the whole set, once: every process gets the whole (global) batch's predictions
        and targets, padding dropped, and its loss as one process computes it, before the Recorder (and
        the metrics) see the batch. Before validating, every process takes rank 0's BatchNorm statistics
        (DDP broadcasts them before each training step; the last step left each process its own)."""
        order = 12  # after DistributedTrainer (11) and MixedPrecision (10)

        def before_validate(self):
            from .callbacks import unwrap

            for buf in unwrap(self.learn.model).buffers():
                dist.broadcast(buf.data, 0)

        def after_loss(self):
            dl = self.learn.dl
            if self.training or not hasattr(dl, "gather"):
                return
            pred = dl.gather(self.learn.pred)
            yb = tuple(dl.gather(y) for y in self.learn.yb)
            self.learn.pred, self.learn.yb = pred, yb
            loss_pred = pred.float() if pred.is_floating_point() else pred
            self.learn.loss = self.learn.loss_func(loss_pred, *yb).detach()

    class _FailForTest(Callback):
        """Test hook only (see the module's docstring): this process fails at its i-th training batch."""
        order = 100

        def __init__(self, at: int, how: str):
            self.at, self.how, self.seen = at, how, 0

        def after_batch(self):
            if not self.training:
                return
            self.seen += 1
            if self.seen == self.at:
                if self.how == "exit":
                    os._exit(3)
                raise RuntimeError(f"injected failure ({FAIL_RANK_ENV}) at training batch {self.at}")

    ShardedDL, GatherValid, FailForTest = _ShardedDL, _GatherValid, _FailForTest


def revert_sync_batchnorm(module):
    """nn.SyncBatchNorm -> nn.BatchNorm2d in place, parameters and statistics kept (the exported model
    and learner.pkl hold plain BatchNorm, as a one-process run's)."""
    import torch.nn as nn

    for name, child in module.named_children():
        if isinstance(child, nn.SyncBatchNorm):
            bn = nn.BatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                child.track_running_stats)
            if child.affine:
                bn.weight, bn.bias = child.weight, child.bias
            bn.running_mean, bn.running_var = child.running_mean, child.running_var
            bn.num_batches_tracked = child.num_batches_tracked
            bn.train(child.training)
            setattr(module, name, bn)
        else:
            revert_sync_batchnorm(child)
    return module


@contextlib.contextmanager
def data_parallel(learn, group: Group) -> Iterator:
    """fastai's `learn.distrib_ctx` (DistributedTrainer: accelerate prepares the model, DDP), with our
    loaders already sharded (`ShardedDL`, which DistributedTrainer keeps as they are) and `GatherValid`.
    Afterwards the learner is a one-process learner again: plain loaders, plain module, plain BatchNorm."""
    import fastai.distributed  # noqa: F401  (patches Learner.distrib_ctx)

    from .callbacks import unwrap

    _classes()
    cpu = not group.device.startswith("cuda")
    learn.dls.loaders = [ShardedDL(dl) for dl in learn.dls.loaders]
    gv = GatherValid()
    learn.add_cb(gv)
    try:
        with learn.distrib_ctx(sync_bn=not cpu, cpu=cpu):
            yield learn
    finally:
        learn.remove_cb(gv)
        learn.dls.loaders = [dl.unwrap() if isinstance(dl, ShardedDL) else dl for dl in learn.dls.loaders]
        learn.model = revert_sync_batchnorm(unwrap(learn.model))


def _test_callbacks(rank: int) -> list:
    if os.environ.get(FAIL_RANK_ENV, "") != str(rank):
        return []
    _classes()
    return [FailForTest(int(os.environ.get(FAIL_AT_ENV, "1")), os.environ.get(FAIL_HOW_ENV, "raise"))]


_PEER_SIGNS = ("gloo", "nccl", "connection closed by peer", "connection reset by peer", "processgroup", "timed out")


def _peer_error(e: BaseException) -> bool:
    """A collective that failed because another process is gone (or the timeout ran out): torch raises
    DistError or, from inside autograd (DDP's all-reduce), a RuntimeError naming gloo/NCCL."""
    import torch.distributed as dist

    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(e, dist_error):
        return True
    return isinstance(e, RuntimeError) and any(k in str(e).lower() for k in _PEER_SIGNS)


# ------------------------------------------------------------------------------------------ train

def train(cfg: TrainConfig, *, resume: bool = False, force: bool = False, progress: bool = False,
          log: Log = _noop, warn: Log = _noop):
    """`fit.train` in one process of a data-parallel run (see the module's docstring)."""
    from .fit import TrainResult, build_learner, finish, fit, prepare_run, restore_run
    from .runs import load_run

    t_start = time.perf_counter()
    run = Path(cfg.run)
    device_name = cfg.device
    if resume:  # the run's own device decides the backend; a bad folder is reported by rank 0 below
        with contextlib.suppress(CxrError, OSError):
            device_name = load_run(run, need_best=False).cfg.device
    g = setup(device_name)
    if g.rank:
        log = warn = _noop
        progress = False

    def read_prepared():
        info = load_run(run, need_best=False)
        return info, info.items()

    info, items = rank0_first(lambda: restore_run(run) if resume else prepare_run(cfg, force=force, log=log, warn=warn),
                              (lambda: restore_run(run)) if resume else read_prepared)
    cfg = info.cfg
    n_train = int((items.split == "train").sum())
    global_bs, bs = split_batch(cfg.bs, n_train, g.world)
    log(f"data-parallel: {g.world} processes ({g.backend} on {g.device.split(':')[0]}); global batch {global_bs} = "
        f"{g.world} x {bs} per process; lr {cfg.lr:g} as for one process with batch {global_bs}")

    def build():
        return build_learner(info, items, resume=resume, log=log, device=g.device, bs=bs)

    learn, ck = rank0_first(build) if cfg.cache_dir else build()  # with --cache-dir, rank 0 decodes and saves first
    if g.rank == 0:
        info.meta["data_parallel"] = {"processes": g.world, "backend": g.backend, "global_bs": global_bs,
                                      "bs_per_process": bs}
    try:
        with data_parallel(learn, g):
            fit(learn, info, ck, progress=progress, log=log, warn=warn, write=g.rank == 0,
                extra_cbs=_test_callbacks(g.rank))
    except Exception as e:
        if _peer_error(e):
            raise PeerStopped(f"process {g.rank} of {g.world}: lost the other processes ({type(e).__name__}); one of "
                              f"them failed or was stopped (see its message)") from e
        raise

    def finish_alone():
        with alone():
            finish(learn, info)

    rank0_first(finish_alone, lambda: None)
    best = info.meta.get("best", {})
    return TrainResult(run=info.path, best_epoch=int(best.get("epoch", 0)), best=best, n_train=n_train,
                       n_valid=int((items.split == "valid").sum()), skipped=int(info.meta.get("skipped", 0)),
                       seconds=time.perf_counter() - t_start, rank=g.rank)


# ------------------------------------------------------------------------ `train --procs N` launcher

def command_line(ctx, drop: Sequence[str] = ()) -> list[str]:
    """The arguments a click command was given (options the user set, then arguments), less `drop`:
    what `--procs N` hands on to `accelerate launch ... -m cxr_fastai train`."""
    import enum

    def plain(v) -> str:
        return str(v.value if isinstance(v, enum.Enum) else v)

    def longest(opts) -> str:
        return max(opts, key=len)

    opts, positional = [], []
    for p in ctx.command.params:
        if p.name is None or p.name in drop:
            continue
        # duck-typed: typer carries its own copy of click (typer._click), whose classes are not click's
        src = ctx.get_parameter_source(p.name)
        if src is None or getattr(src, "name", "") in ("DEFAULT", "DEFAULT_MAP"):
            continue
        v = ctx.params.get(p.name)
        if getattr(p, "param_type_name", "") == "argument":
            positional += [plain(x) for x in v] if isinstance(v, (list, tuple)) else ([] if v is None else [plain(v)])
        elif getattr(p, "is_flag", False):
            if v:
                opts.append(longest(p.opts))
            elif p.secondary_opts:
                opts.append(longest(p.secondary_opts))
        elif getattr(p, "multiple", False):
            for x in v or ():
                opts += [longest(p.opts), plain(x)]
        elif v is not None:
            opts += [longest(p.opts), plain(v)]
    if any(a.startswith("-") for a in positional):
        positional = ["--", *positional]
    return opts + positional


def launcher_command(args: Sequence[str], procs: int) -> list[str]:
    """accelerate's launcher for `procs` processes on this machine (torchrun's, behind --multi_gpu: the
    processes train on GPUs, or on the CPU over gloo when there are none or --device cpu)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(procs),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
            "-m", "cxr_fastai", *args]


def launch_local(args: Sequence[str], procs: int, *, device: str, log: Log = _noop) -> int:
    """Run `cxr_fastai ARGS` in `procs` processes through accelerate's launcher and wait for it. Ctrl-C and
    SIGTERM are passed on to the launcher (which passes them on to the processes). Returns the exit code:
    the launcher's, or 130 / 143 when interrupted / terminated."""
    import torch

    dev = resolve_device(device)
    if dev.startswith("cuda") and torch.cuda.device_count() < procs:
        raise CxrError(f"--procs {procs}: torch sees {torch.cuda.device_count()} GPU(s); give at most that many, "
                       "or train on the CPU with --device cpu")
    env = dict(os.environ)
    if not dev.startswith("cuda"):  # torchrun would give each process 1 thread; share the cores instead
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // procs)))
    cmd = launcher_command(args, procs)
    log(f"launching {procs} processes: accelerate launch --multi_gpu --num_processes {procs} -m cxr_fastai "
        + " ".join(args))
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)  # signals reach it through us only
    got: list[int] = []

    def forward(signum, frame):
        got.append(signum)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)

    old = {}
    for s in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError):  # not the main thread: leave it
            old[s] = signal.signal(s, forward)
    try:
        rc = proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if got:
        return 130 if got[0] == signal.SIGINT else 143
    return rc
