"""The training recipe: Adam with decoupled weight decay, none on BN weights and biases; GradientClip."""
import functools

import pytest
import torch

from conftest import TINY_WIDTHS, cli
from cxr_fastai.config import TrainConfig


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from cxr_fastai.data.discover import check_trainable, discover, scan
    from cxr_fastai.data.loaders import cache_side_for
    from cxr_fastai.synth import make_synthetic_dataset

    root = make_synthetic_dataset(tmp_path_factory.mktemp("tr") / "d", {"train": 8, "valid": 4, "test": 0}, size=32)
    ds = discover(root)
    classes = check_trainable(ds)
    items, _, stats = scan(ds, ("train", "valid"), 16, 1000, 0)
    return items, classes, stats, cache_side_for(16, stats.side), root


def _dls(tiny, cfg):
    from cxr_fastai.data.loaders import build_cached_dls

    items, classes, stats, side, _ = tiny
    return build_cached_dls(items, classes, stats, cfg, "cpu", side)


@pytest.mark.parametrize("opt", ["adamw", "fastai"])
def test_weight_decay_is_decoupled_and_skips_norm_and_bias(tiny, opt, tmp_path, monkeypatch):
    """Read from the live optimizer of a real `train` run once its fit is over: per-group weight decay,
    cfg.wd on conv/linear weights, 0 on every BN weight and bias; decoupled from the gradient."""
    from cxr_fastai.train import fit as fit_mod

    seen = {}
    real_finish = fit_mod.finish

    def finish(learn, info):
        seen["learn"] = learn
        real_finish(learn, info)

    monkeypatch.setattr(fit_mod, "finish", finish)
    cfg = TrainConfig(data=str(tiny[4]), run=str(tmp_path / "run"), size=16, bs=8, epochs=1, wd=0.5, opt=opt,
                      widths=TINY_WIDTHS, device="cpu")
    fit_mod.train(cfg)
    learn = seen["learn"]
    assert learn.epoch == 0 and len(learn.recorder.values) == 1  # the fit ran
    params = dict(learn.model.named_parameters())
    no_decay = {n for n, p in params.items() if p.ndim == 1}    # BN weights and biases, every bias
    assert "prep.1.weight" in no_decay and "prep.0.weight" not in no_decay and "head.bias" in no_decay
    if opt == "adamw":
        groups = learn.opt.opt.param_groups
        assert isinstance(learn.opt.opt, torch.optim.AdamW) and groups[0]["foreach"]  # AdamW: decoupled
        assert groups[0]["weight_decay"] == 0.5 and groups[1]["weight_decay"] == 0.0
        in_group = [{id(p) for p in g["params"]} for g in groups]
    else:
        from fastai.optimizer import l2_reg, weight_decay

        assert weight_decay in learn.opt.cbs and l2_reg not in learn.opt.cbs  # fastai's true_wd: decoupled
        assert learn.opt.hypers[0]["wd"] == 0.5 and learn.opt.hypers[1]["wd"] == 0.0
        in_group = [{id(p) for p in g} for g in learn.opt.param_lists]
    assert in_group[1] == {id(params[n]) for n in no_decay}
    assert in_group[0] == {id(p) for n, p in params.items() if n not in no_decay}
    assert any(type(cb).__name__ == "GradientClip" for cb in learn.cbs)


def test_smoothed_training_loss_stays_on_device_and_equals_fastais(tiny):
    """The Recorder's smoothed loss is not copied to the host each step, yet its numbers are fastai's."""
    import fastai.callback.schedule  # noqa: F401
    from fastai.learner import AvgSmoothLoss
    from fastai.torch_core import set_seed

    from cxr_fastai.train.fit import make_learner

    items, classes, stats, _, _ = tiny
    cfg = TrainConfig(size=16, bs=4, epochs=2, widths=(4, 8, 8, 8))
    runs = []
    for ours in (True, False):
        set_seed(0, reproducible=True)
        learn = make_learner(cfg, _dls(tiny, cfg), len(classes))
        if not ours:
            learn.remove_cbs([cb for cb in learn.cbs if type(cb).__name__ == "SmoothLossOnDevice"])
        with learn.no_bar(), learn.no_logging():
            learn.fit_one_cycle(2, 1e-3, wd=cfg.wd)
        sl = learn.recorder.smooth_loss
        assert (type(sl).__name__ == "DeviceSmoothLoss") == ours and isinstance(sl, AvgSmoothLoss)
        runs.append((torch.stack(learn.recorder.losses), learn.recorder.values))
    (ours_l, ours_v), (theirs_l, theirs_v) = runs
    assert len(ours_l) == len(theirs_l) == 2 * (len(items[items.split == "train"]) // 4)
    assert torch.allclose(ours_l, theirs_l, rtol=1e-6) and ours_l.device.type == "cpu"
    flat = lambda vals: [float(v) for row in vals for v in row]  # noqa: E731
    assert flat(ours_v) == pytest.approx(flat(theirs_v), rel=1e-6)


@pytest.mark.slow
def test_a_compiled_model_trains_and_still_exports_the_plain_module(tmp_path, monkeypatch):
    import json

    from safetensors.torch import load_file

    from cxr_fastai import cli as cli_module
    from cxr_fastai.synth import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "d", {"train": 12, "valid": 6, "test": 3}, size=32)
    run, art = tmp_path / "run", tmp_path / "art"
    monkeypatch.setattr(cli_module, "TrainConfig", functools.partial(TrainConfig, widths=TINY_WIDTHS))
    # dynamo's graph capture without inductor's C++ code generation (~90 s on 2 cores): the model is still an
    # OptimizedModule whose parameters are named _orig_mod.*, which is what checkpoints and exports must undo
    compiled = []
    real_compile = torch.compile

    def compile_eager(model, **kw):
        compiled.append(model)
        return real_compile(model, **{**kw, "backend": "eager"})

    monkeypatch.setattr(torch, "compile", compile_eager)
    r = cli("train", data, "--run", run, "--size", 16, "--epochs", 1, "--bs", 12, "--compile", "--quiet")
    assert r.exit_code == 0, (r.output, r.exception)
    assert json.loads((run / "config.json").read_text())["compile"] is True and len(compiled) == 1
    r = cli("export", run, "--to", art)
    assert r.exit_code == 0, (r.output, r.exception)
    keys = load_file(str(art / "model.safetensors")).keys()
    assert keys and not any(k.startswith("_orig_mod") for k in keys)
    for extra in ([], ["--trust-pickle"]):
        p = cli("predict", art, data / "test", *extra)
        assert p.exit_code == 0, (p.output, p.exception)
        assert len(p.stdout.strip().splitlines()) == 1 + 9


def test_label_smoothing_and_inverse_frequency_class_weights_reach_the_loss(tiny):
    from cxr_fastai.train.fit import make_loss

    items, classes, stats, side, root = tiny
    items = items[~((items.split == "train") & (items.label == "NORMAL") & (items.index % 2 == 0))]
    cfg = TrainConfig(size=16, bs=4, label_smoothing=0.1, class_weights=True)
    dls = _dls((items, classes, stats, side, root), cfg)
    loss = make_loss(cfg, dls)
    assert loss.func.label_smoothing == 0.1
    counts = torch.bincount(dls.train.cache[1], minlength=3).float()
    assert counts.tolist() == [8, 4, 8]  # NORMAL lost half its training images
    w = loss.func.weight
    assert torch.allclose(w * counts, (w * counts)[0].expand(3))  # weight x count is the same for every class
    assert w[classes.index("NORMAL")] > w[classes.index("COVID19")]
    plain = make_loss(TrainConfig(size=16), dls)
    assert plain.func.weight is None and plain.func.label_smoothing == 0.0


def test_exclude_source_leaves_those_images_out_and_names_an_unknown_source(tmp_path, monkeypatch):
    from cxr_fastai import cli as cli_module
    import pandas as pd

    from cxr_fastai.synth import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "d", {"train": 6, "valid": 3, "test": 0}, size=32)
    df = pd.read_csv(data / "labels.csv", dtype=str)
    df.loc[df.index % 3 == 0, "source"] = "siteB"
    df.to_csv(data / "labels.csv", index=False)
    monkeypatch.setattr(cli_module, "TrainConfig", functools.partial(TrainConfig, widths=TINY_WIDTHS))
    r = cli("train", data, "--run", tmp_path / "run", "--size", 16, "--epochs", 1, "--exclude-source", "siteB",
            "--quiet")
    assert r.exit_code == 0, (r.output, r.exception)
    used = pd.read_csv(tmp_path / "run" / "items.csv")
    assert len(used) == int((df.source != "siteB").sum())
    assert not set(used.path) & {str((data / q).resolve()) for q in df.path[df.source == "siteB"]}
    bad = cli("train", data, "--run", tmp_path / "run2", "--exclude-source", "nowhere")
    assert bad.exit_code == 1 and "nowhere" in bad.stderr and not (tmp_path / "run2").exists()


def test_mixup_blends_training_batches_only_and_a_seeded_run_repeats(tiny):
    """--mixup: each training image becomes lam * itself + (1 - lam) * another image of the batch (lam >= 0.5),
    validation batches are left alone, the loss function is put back after training, and the draws are seeded."""
    import fastai.callback.schedule  # noqa: F401
    from fastai.callback.core import Callback
    from fastai.callback.mixup import MixUp
    from fastai.torch_core import set_seed

    from cxr_fastai.train.fit import make_learner

    class Look(Callback):  # sees the batch before MixUp (order -5) or after it (order 5)
        def __init__(self, order): self.order, self.seen = order, []
        def before_batch(self): self.seen.append((self.training, self.learn.xb[0].detach().clone()))

    items, classes, stats, _, _ = tiny
    cfg = TrainConfig(size=16, bs=4, epochs=1, widths=(4, 8, 8, 8), mixup=0.4)
    losses = []
    for _ in range(2):
        set_seed(0, reproducible=True)
        learn = make_learner(cfg, _dls(tiny, cfg), len(classes))
        mix = [cb for cb in learn.cbs if isinstance(cb, MixUp)]
        assert len(mix) == 1
        plain_loss = learn.loss_func
        before, after = Look(-5), Look(5)
        with learn.no_bar(), learn.no_logging():
            learn.fit_one_cycle(1, 1e-3, cbs=[before, after])
        assert learn.loss_func is plain_loss
        losses.append(torch.stack(learn.recorder.losses))
    pairs = list(zip(before.seen, after.seen))
    train = [(x, m) for (t, x), (_, m) in pairs if t]
    valid = [(x, m) for (t, x), (_, m) in pairs if not t]
    assert len(train) == len(items[items.split == "train"]) // 4 and valid
    assert all(torch.equal(x, m) for x, m in valid)
    lam = mix[0].lam  # the last training batch's weights
    x, m = train[-1]
    assert (lam >= 0.5).all() and not torch.equal(x, m)
    keep = lam < 0.999  # where the other image's share is big enough to recover it
    w = lam.view(-1, 1, 1, 1)
    other = ((m - w * x) / (1 - w))[keep].flatten(1)
    dist = torch.cdist(other, x.flatten(1))  # each recovered partner is one of the batch's own images
    assert dist.min(1).values.max() < 1e-3 * x.abs().max()
    assert torch.equal(losses[0], losses[1])
    plain = make_learner(cfg.replace(mixup=0.0), _dls(tiny, cfg), len(classes))
    assert not [cb for cb in plain.cbs if isinstance(cb, MixUp)]
