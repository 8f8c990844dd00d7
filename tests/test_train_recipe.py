"""The training recipe: Adam with decoupled weight decay, none on BN weights and biases; GradientClip."""
import pytest
import torch

from cxr_fastai.config import TrainConfig


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from cxr_fastai.data.discover import check_trainable, discover, scan
    from cxr_fastai.synth import make_synthetic_dataset

    root = make_synthetic_dataset(tmp_path_factory.mktemp("tr") / "d", {"train": 8, "valid": 4, "test": 0}, size=32)
    ds = discover(root)
    classes = check_trainable(ds)
    items, _, stats = scan(ds, ("train", "valid"), 16, 1000, 0)
    return items, classes, stats


@pytest.mark.parametrize("opt", ["adamw", "fastai"])
def test_weight_decay_is_decoupled_and_skips_norm_and_bias(tiny, opt):
    import fastai.callback.schedule  # noqa: F401
    from cxr_fastai.data.loaders import build_cached_dls
    from cxr_fastai.train.fit import make_learner

    items, classes, stats = tiny
    cfg = TrainConfig(size=16, bs=8, epochs=1, wd=0.5, opt=opt, widths=(4, 8, 8, 8))
    learn = make_learner(cfg, build_cached_dls(items, classes, stats, cfg, "cpu"), len(classes))
    bn_w = learn.model.prep[1].weight
    conv_w = learn.model.prep[0].weight
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(1, 1e-3, wd=cfg.wd)
    if opt == "adamw":
        groups = learn.opt.opt.param_groups
        assert isinstance(learn.opt.opt, torch.optim.AdamW) and groups[0]["foreach"]
        assert groups[0]["weight_decay"] == 0.5 and groups[1]["weight_decay"] == 0.0
        assert any(p is bn_w for p in groups[1]["params"]) and any(p is conv_w for p in groups[0]["params"])
    else:
        assert learn.opt.state[bn_w].get("do_wd") is False and learn.opt.state[conv_w].get("do_wd", True)
    assert any(type(cb).__name__ == "GradientClip" for cb in learn.cbs)


def test_smoothed_training_loss_stays_on_device_and_equals_fastais(tiny):
    """The Recorder's smoothed loss is not copied to the host each step, yet its numbers are fastai's."""
    import fastai.callback.schedule  # noqa: F401
    from fastai.learner import AvgSmoothLoss
    from fastai.torch_core import set_seed

    from cxr_fastai.data.loaders import build_cached_dls
    from cxr_fastai.train.fit import make_learner

    items, classes, stats = tiny
    cfg = TrainConfig(size=16, bs=4, epochs=2, widths=(4, 8, 8, 8))
    runs = []
    for ours in (True, False):
        set_seed(0, reproducible=True)
        learn = make_learner(cfg, build_cached_dls(items, classes, stats, cfg, "cpu"), len(classes))
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
def test_a_compiled_model_trains_and_still_exports_the_plain_module(tmp_path):
    import json

    from safetensors.torch import load_file

    from conftest import run_cli
    from cxr_fastai.synth import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "d", {"train": 12, "valid": 6, "test": 3}, size=32)
    run, art = tmp_path / "run", tmp_path / "art"
    r = run_cli("train", data, "--run", run, "--size", 16, "--epochs", 1, "--bs", 12, "--compile", "--quiet")
    assert r.returncode == 0, r.stderr
    assert json.loads((run / "config.json").read_text())["compile"] is True
    assert run_cli("export", run, "--to", art).returncode == 0
    keys = load_file(str(art / "model.safetensors")).keys()
    assert keys and not any(k.startswith("_orig_mod") for k in keys)
    for extra in ([], ["--trust-pickle"]):
        p = run_cli("predict", art, data / "test", *extra)
        assert p.returncode == 0, p.stderr
        assert len(p.stdout.strip().splitlines()) == 1 + 9


def test_label_smoothing_and_inverse_frequency_class_weights_reach_the_loss(tiny):
    from cxr_fastai.data.loaders import build_cached_dls
    from cxr_fastai.train.fit import make_loss

    items, classes, stats = tiny
    items = items[~((items.split == "train") & (items.label == "NORMAL") & (items.index % 2 == 0))]
    cfg = TrainConfig(size=16, bs=4, label_smoothing=0.1, class_weights=True)
    dls = build_cached_dls(items, classes, stats, cfg, "cpu")
    loss = make_loss(cfg, dls)
    assert loss.func.label_smoothing == 0.1
    counts = torch.bincount(dls.train.y, minlength=3).float()
    w = loss.func.weight
    assert torch.allclose(w * counts, (w * counts)[0].expand(3))  # weight x count is the same for every class
    assert w[classes.index("NORMAL")] > w[classes.index("COVID19")]
    plain = make_loss(TrainConfig(size=16), dls)
    assert plain.func.weight is None and plain.func.label_smoothing == 0.0


def test_exclude_source_leaves_those_images_out_and_names_an_unknown_source(tiny, tmp_path):
    import pandas as pd

    from conftest import run_cli
    from cxr_fastai.synth import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "d", {"train": 6, "valid": 3, "test": 0}, size=32)
    df = pd.read_csv(data / "labels.csv", dtype=str)
    df.loc[df.index % 3 == 0, "source"] = "siteB"
    df.to_csv(data / "labels.csv", index=False)
    r = run_cli("train", data, "--run", tmp_path / "run", "--size", 16, "--epochs", 1, "--exclude-source", "siteB",
                "--quiet")
    assert r.returncode == 0, r.stderr
    used = pd.read_csv(tmp_path / "run" / "items.csv")
    assert len(used) == int((df.source != "siteB").sum())
    bad = run_cli("train", data, "--run", tmp_path / "run2", "--exclude-source", "nowhere")
    assert bad.returncode == 1 and "nowhere" in bad.stderr and not (tmp_path / "run2").exists()
