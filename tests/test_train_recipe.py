"""The training recipe: Adam with decoupled weight decay, none on BN weights and biases; GradientClip."""
import pytest
import torch

from cxr_fastai.config import TrainConfig


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from cxr_fastai.data import check_trainable, discover, scan
    from cxr_fastai.synth import make_synthetic_dataset

    root = make_synthetic_dataset(tmp_path_factory.mktemp("tr") / "d", {"train": 8, "valid": 4, "test": 0}, size=32)
    ds = discover(root)
    classes = check_trainable(ds)
    items, _, stats = scan(ds, ("train", "valid"), 16, 1000, 0)
    return items, classes, stats


@pytest.mark.parametrize("opt", ["adamw", "fastai"])
def test_weight_decay_is_decoupled_and_skips_norm_and_bias(tiny, opt):
    import fastai.callback.schedule  # noqa: F401
    from cxr_fastai.fastpath import build_cached_dls
    from cxr_fastai.train import make_learner

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
