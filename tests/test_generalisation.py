"""Several datasets in one run, the levers against shortcuts, and the tool saying where it does worse.
Tiny synthetic roots (16 px, a narrow ResNet9), trained once for the module."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import interrupted_after_first_epoch
from cxr_fastai.config import PredictConfig, TrainConfig
from cxr_fastai.errors import CxrError

WIDTHS = (8, 16, 16, 32)


def _site(root: Path, seed: int, source: str = "") -> Path:
    """A synthetic labels.csv dataset whose source column is `source` (blank: the root's name is used)."""
    from cxr_fastai.synth import make_synthetic_dataset

    make_synthetic_dataset(root, n_per_class=14, size=32, seed=seed)
    df = pd.read_csv(root / "labels.csv", dtype=str, keep_default_na=False)
    df["source"] = source
    df.to_csv(root / "labels.csv", index=False)
    return root


@pytest.fixture(scope="module")
def two_sites(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("sites")
    return _site(base / "site_a", 1), _site(base / "site_b", 2)


@pytest.fixture(scope="module")
def two_site_run(two_sites, tmp_path_factory) -> Path:
    from cxr_fastai.train.fit import train

    run = tmp_path_factory.mktemp("two_site_run") / "run"
    train(TrainConfig(data=two_sites, run=str(run), size=16, epochs=2, bs=16, widths=WIDTHS,
                      balance="class-source", augment="texture", contrast="equalize", crop_border=0.125))
    return run


def test_a_run_on_two_roots_keeps_both_and_reports_both_sources(two_sites, two_site_run, tmp_path):
    from cxr_fastai.artifact.export import export_run
    from cxr_fastai.evaluate.evaluate import evaluate

    cfg = json.loads((two_site_run / "config.json").read_text())
    assert cfg["data"] == [str(p) for p in two_sites]
    items = pd.read_csv(two_site_run / "items.csv")
    assert sorted(items.source.unique()) == ["site_a", "site_b"]        # the roots' folder names
    art = export_run(two_site_run, to=tmp_path / "art")
    assert art.manifest["input"]["contrast"] == "equalize"
    assert art.manifest["input"]["crop_border"] == 0.125
    by_source = art.manifest["model_card"]["validation_by_source"]["per_source"]
    assert set(by_source) == {"site_a", "site_b"}
    res = evaluate(art.folder, list(two_sites), split="test", cfg=PredictConfig(workers=1))
    assert set(res.metrics.per_source) == {"site_a", "site_b"}
    assert sum(f["n"] for f in res.metrics.per_source.values()) == res.metrics.n


def test_the_safetensors_and_pickle_paths_apply_the_same_contrast_step(two_site_run, tmp_path):
    from cxr_fastai.artifact.export import export_run
    from cxr_fastai.artifact.predict import iter_probs, load_predictor

    art = export_run(two_site_run, to=tmp_path / "art")
    items = pd.read_csv(two_site_run / "items.csv")
    paths = [Path(p) for p in items[items.split == "valid"].path][:12]
    got = {}
    for trust in (False, True):
        cfg = PredictConfig(trust_pickle=trust, workers=1)
        got[trust] = np.stack([p for _, p, _ in iter_probs(load_predictor(art.folder, cfg), paths, cfg)])
    np.testing.assert_allclose(got[False], got[True], atol=1e-5)


def test_crop_border_cuts_each_edge_before_the_contrast_step():
    from cxr_fastai.io.images import crop_border, read_step

    film = np.full((40, 32), 100, np.uint8)
    film[10:30, 8:24] = np.arange(16, dtype=np.uint8)[None] * 10   # the kept centre: a ramp
    film[:4], film[-4:], film[:, :4], film[:, -4:] = 255, 255, 0, 0  # markers and collimation at the edges
    cut = crop_border(film, 0.125)                                   # 5 rows and 4 columns from each edge
    assert cut.shape == (30, 24) and cut.max() < 255 and cut.min() == 0   # min: the ramp's own 0
    np.testing.assert_array_equal(cut, film[5:35, 4:28])
    assert crop_border(film, 0.0) is film
    # equalisation sees the kept region only: the bright border no longer takes the top grey levels
    np.testing.assert_array_equal(read_step(film, "equalize", 0.125), read_step(cut, "equalize"))
    with pytest.raises(ValueError, match="above"):
        crop_border(film, 0.3)


def _painted_copies(paths: list[Path], folder: Path) -> list[Path]:
    """Copies of 32 x 32 films with their edges painted (a marker row, a ruler column), all inside the 4 px
    that a 0.125 border crop cuts."""
    from PIL import Image

    from cxr_fastai.io.images import read_grey

    out = []
    for i, p in enumerate(paths):
        a = read_grey(p).copy()
        a[:4] = 255
        a[:, -4:] = np.arange(4, dtype=np.uint8) * 60
        Image.fromarray(a).save(folder / f"painted{i}.png")
        out.append(folder / f"painted{i}.png")
    return out


def _valid_paths(run: Path, n: int) -> list[Path]:
    items = pd.read_csv(run / "items.csv")
    return [Path(p) for p in items[items.split == "valid"].path][:n]


@pytest.mark.parametrize("runtime,trust", [("torch", False), ("torch", True), ("onnx", False)],
                         ids=["safetensors", "pickle", "onnx"])
def test_a_border_cropped_model_ignores_its_films_edges_on_every_runtime(two_site_run, tmp_path, runtime, trust):
    """Painted edges inside the cut border change nothing the model sees: predict applies the crop on every
    runtime (the pickle's own item transforms on one)."""
    from PIL import Image

    from cxr_fastai.artifact.export import export_run
    from cxr_fastai.artifact.predict import iter_probs, load_predictor
    from cxr_fastai.io.images import read_grey

    art = export_run(two_site_run, to=tmp_path / "art")
    paths = _valid_paths(two_site_run, 6)
    painted = _painted_copies(paths, tmp_path)
    cfg = PredictConfig(runtime=runtime, trust_pickle=trust, workers=1)
    pred = load_predictor(art.folder, cfg)
    got = {k: np.stack([q for _, q, _ in iter_probs(pred, ps, cfg)]) for k, ps in (("as read", paths), ("painted", painted))}
    np.testing.assert_allclose(got["as read"], got["painted"], atol=1e-6)
    # the edges are not just ignored because the model ignores everything: the kept centre matters
    centre = read_grey(paths[0]).copy()
    centre[8:24, 8:24] = 255 - centre[8:24, 8:24]
    Image.fromarray(centre).save(tmp_path / "centre.png")
    moved = np.stack([q for _, q, _ in iter_probs(pred, [tmp_path / "centre.png"], cfg)])
    assert np.abs(moved[0] - got["as read"][0]).max() > 1e-4


def test_interprets_grad_cam_applies_the_border_crop(two_site_run, tmp_path):
    """interpret's Grad-CAM, on the run's own loader, gives a film and its edge-painted copy the same map."""
    from cxr_fastai.evaluate.report import grad_cams
    from cxr_fastai.train.fit import learner_from_run
    from cxr_fastai.train.runs import load_run

    path = _valid_paths(two_site_run, 1)[0]
    painted = _painted_copies([path], tmp_path)[0]
    learn = learner_from_run(load_run(two_site_run), device="cpu")
    cams = grad_cams(learn.model, [str(path), str(painted)], learn.dls.valid, learn.dls.vocab)
    np.testing.assert_allclose(cams[str(path)], cams[str(painted)], atol=1e-6)


def test_a_split_name_of_ones_own_is_evaluated_and_left_out_of_training(tmp_path):
    from cxr_fastai.data.discover import discover

    root = _site(tmp_path / "site_c", 3, source="site_c")
    df = pd.read_csv(root / "labels.csv", dtype=str, keep_default_na=False)
    df.loc[df.split == "test", "split"] = "external"
    df.to_csv(root / "labels.csv", index=False)
    ds = discover(root)
    assert set(ds.items.split) == {"train", "valid", "external"}
    df.loc[0, "split"] = "no spaces allowed"
    df.to_csv(root / "labels.csv", index=False)
    from cxr_fastai.errors import DataError

    with pytest.raises(DataError, match="split 'no spaces allowed'"):
        discover(root)


def test_class_source_balance_draws_every_stratum_equally_often():
    from cxr_fastai.data.loaders import sampling_weights

    train = pd.DataFrame({"label": ["P"] * 90 + ["P"] * 10 + ["N"] * 50 + ["N"] * 50,
                          "source": ["kids"] * 90 + ["adults"] * 10 + ["kids"] * 50 + ["adults"] * 50})
    w = sampling_weights(train, "class-source")
    strata = train.assign(w=w).groupby(["label", "source"]).w.sum()
    assert np.allclose(strata.to_numpy(), 0.25)
    w = sampling_weights(train, "class")
    assert np.allclose(train.assign(w=w).groupby("label").w.sum().to_numpy(), 0.5)
    w = sampling_weights(train, "class-then-source")
    assert np.allclose(train.assign(w=w).groupby(["label", "source"]).w.sum().to_numpy(), 0.25)
    single = pd.DataFrame({"label": ["C"] * 40 + ["P"] * 30 + ["P"] * 30, "source": ["db"] * 40 + ["a"] * 30 + ["b"] * 30})
    w = sampling_weights(single, "class-then-source")
    assert np.allclose(single.assign(w=w).groupby("label").w.sum().to_numpy(), 0.5)
    assert np.allclose(single.assign(w=w).groupby("source").w.sum().to_numpy(), [0.25, 0.25, 0.5])
    w = sampling_weights(single, "class-source")
    assert np.allclose(single.assign(w=w).groupby("label").w.sum().to_numpy(), [1 / 3, 2 / 3])
    assert sampling_weights(train, "none") is None


def test_balance_power_tempers_the_draws_between_shuffled_and_balanced():
    """--balance-power p: each image's draw weight is its balance weight to the power p. The 10 adult
    pneumonias (of 200 images) against 90 pediatric ones: 5% of the draws at p = 0 (as shuffled), a quarter
    (one stratum of four) at p = 1, and at p = 0.5 the ratio of the two strata's per-image weights is the
    square root of the full one's."""
    from cxr_fastai.data.loaders import sampling_weights

    train = pd.DataFrame({"label": ["P"] * 90 + ["P"] * 10 + ["N"] * 50 + ["N"] * 50,
                          "source": ["kids"] * 90 + ["adults"] * 10 + ["kids"] * 50 + ["adults"] * 50})
    adults = ((train.label == "P") & (train.source == "adults")).to_numpy()
    kids = ((train.label == "P") & (train.source == "kids")).to_numpy()
    share = {p: sampling_weights(train, "class-source", p)[adults].sum() for p in (0.0, 0.5, 1.0)}
    assert share[0.0] == pytest.approx(0.05) and share[1.0] == pytest.approx(0.25)
    assert share[0.0] < share[0.5] < share[1.0]
    w = sampling_weights(train, "class-source", 0.5)
    assert w[adults][0] / w[kids][0] == pytest.approx(3.0)   # full balance: 90/10 = 9 times; tempered: 3
    assert np.allclose(sampling_weights(train, "class-source", 0.0), 1 / 200)


def test_balanced_draws_are_seeded_by_epoch(two_site_run):
    from cxr_fastai.train.fit import learner_from_run
    from cxr_fastai.train.runs import load_run

    dl = learner_from_run(load_run(two_site_run), "cpu").dls.train
    assert dl.wgts is not None
    dl.set_epoch(1)
    a = dl.get_idxs()
    dl.set_epoch(2)
    b = dl.get_idxs()
    dl.set_epoch(1)
    assert dl.get_idxs() == a != b
    assert len(a) == dl.n and len(set(a)) < dl.n   # drawn with replacement


def test_lisa_partners_share_the_class_across_sources_or_the_source_across_classes():
    import torch

    from cxr_fastai.train.callbacks import pick_partners

    y, g = torch.tensor([0, 0, 1, 1, 2]), torch.tensor([0, 1, 0, 1, 0])
    by_label = torch.tensor([True, True, True, False, True])
    fallback = torch.tensor([4, 3, 2, 1, 0])
    for seed in range(3):  # whatever the scores, the rule decides where only one image qualifies
        scores = torch.rand(5, 5, generator=torch.Generator().manual_seed(seed))
        # 0, 1: same class, other source; 2: class 1 at source 1 is image 3; 3 (by source): source 1 with
        # another class is image 1; 4: no other image of class 2, so its fallback
        assert pick_partners(y, g, by_label, scores, fallback).tolist() == [1, 0, 3, 1, 0]


def test_lisa_mixup_pairs_real_batches_by_their_sources(two_site_run):
    """--mixup-pairs lisa on the cached loader: the source ids it reads are the batch's own, every partner
    follows the rule (or no image of the batch qualified), and the batch is lam * image + (1 - lam) * partner."""
    import fastai.callback.schedule  # noqa: F401
    import torch
    from fastai.callback.core import Callback

    from cxr_fastai.train.callbacks import SelectiveMixUp
    from cxr_fastai.train.fit import learner_from_run, make_learner
    from cxr_fastai.train.runs import load_run

    class Look(Callback):
        def __init__(self, order): self.order, self.seen = order, []
        def before_batch(self):
            if self.training:
                self.seen.append((self.learn.xb[0].detach().clone(), self.y.clone(),
                                  self.dl.groups[self.dl.last_idx].clone(), self.dl.last_idx.clone()))

    info = load_run(two_site_run)
    learn = learner_from_run(info, "cpu")
    assert make_learner(info.cfg.replace(mixup=0.4, mixup_pairs="lisa"), learn.dls, 3).cbs.filter(
        lambda cb: isinstance(cb, SelectiveMixUp))
    mix, before, after = SelectiveMixUp(0.4), Look(-5), Look(5)
    learn.add_cb(mix)
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(1, 1e-3, cbs=[before, after])
    train = learn.dls.train.dataset.items
    codes = pd.factorize(train.source.astype(str), sort=True)[0]
    rules = {"label": 0, "source": 0, "fallback": 0}
    assert len(before.seen) == len(after.seen) > 0
    for _, _, g, idx in before.seen:
        assert g.tolist() == codes[idx.numpy()].tolist()   # the ids are the batch's own sources
    x, y, g, _ = before.seen[-1]
    p, lam, m = mix.partner, mix.lam, after.seen[-1][0]
    assert torch.allclose(m, torch.lerp(x[p], x, lam.view(-1, 1, 1, 1)), atol=1e-6) and (lam >= 0.5).all()
    assert torch.equal(mix.yb1[0], y[p])
    for i, j in enumerate(p.tolist()):
        if y[j] == y[i] and g[j] != g[i]:
            rules["label"] += 1
        elif g[j] == g[i] and y[j] != y[i]:
            rules["source"] += 1
        else:   # a random partner only where no image of the batch qualifies for either rule
            rules["fallback"] += 1
            assert not (((y == y[i]) & (g != g[i])).any() and ((g == g[i]) & (y != y[i])).any())
    assert rules["label"] and rules["source"]


def _train_with(monkeypatch, cfg: TrainConfig, *cbs) -> None:
    """fit.train(cfg) with these callbacks added to its learner."""
    from cxr_fastai.train import fit

    make_learner = fit.make_learner

    def with_cbs(*a, **kw):
        learn = make_learner(*a, **kw)
        learn.add_cbs(list(cbs))
        return learn

    monkeypatch.setattr(fit, "make_learner", with_cbs)
    try:
        fit.train(cfg)
    finally:
        monkeypatch.setattr(fit, "make_learner", make_learner)


def test_group_dro_step_moves_weight_to_the_worst_fitted_group_present():
    import math

    import torch

    from cxr_fastai.train.callbacks import group_dro_step

    losses, k = torch.tensor([1.0, 1.0, 3.0, 2.0]), torch.tensor([0, 0, 1, 3])
    loss, q = group_dro_step(losses, k, torch.full((4,), 0.25), eta=0.5)
    # group means 1, 3, (absent), 2: weights grow by exp(0.5 * mean), the absent group's stays
    raw = [math.exp(0.5), math.exp(1.5), 1.0, math.exp(1.0)]
    want = [r / sum(raw) for r in raw]
    assert torch.allclose(q, torch.tensor(want)) and abs(q.sum().item() - 1) < 1e-6
    assert math.isclose(loss.item(), want[0] * 1 + want[1] * 3 + want[3] * 2, rel_tol=1e-6)
    assert q.argmax().item() == 1 and q[2] < 0.25


def test_group_dro_trains_on_the_strata_and_a_resumed_run_carries_its_weights(two_sites, tmp_path, monkeypatch):
    """--group-dro: each step minimises sum_g q_g * (mean loss of class x source stratum g in the batch) over the
    batch's own sources; the weights are in run.json by stratum and in the checkpoint, and a run interrupted after
    epoch 1 and resumed ends where the uninterrupted one does."""
    import torch
    from fastai.callback.core import Callback
    from fastai.learner import load_learner

    from cxr_fastai.train import callbacks, fit
    from cxr_fastai.train.callbacks import GroupDRO, group_dro_step, item_losses
    from cxr_fastai.train.runs import load_run

    seen = []

    class Look(Callback):  # q before GroupDRO's step (order 5), the loss it leaves (order 20)
        def __init__(self, order): self.order = order
        def after_loss(self):
            if not self.training:
                return
            dro = callbacks.group_dro_of(self.learn)
            if self.order < dro.order:
                per_item = item_losses(self.learn.loss_func, self.pred, self.y).detach()
                seen.append({"q": dro.q.clone(), "k": self.y * dro.n_sources + self.dl.groups[self.dl.last_idx],
                             "idx": self.dl.last_idx.clone(), "items": per_item})
            else:
                seen[-1].update(loss=self.learn.loss_grad.detach().clone(), q_after=dro.q.clone())

    cfg = TrainConfig(data=two_sites, size=16, epochs=2, bs=16, widths=WIDTHS, group_dro=0.5)
    _train_with(monkeypatch, cfg.replace(run=str(tmp_path / "full")), Look(5), Look(20))
    assert seen
    train_rows = pd.read_csv(tmp_path / "full" / "items.csv").query("split == 'train'")
    codes = pd.factorize(train_rows.source.astype(str), sort=True)[0]
    for s in seen:
        want_loss, want_q = group_dro_step(s["items"], s["k"], s["q"], 0.5)
        assert torch.allclose(s["loss"], want_loss, atol=1e-6) and torch.allclose(s["q_after"], want_q)
        assert (s["k"] % 2).tolist() == codes[s["idx"].numpy()].tolist()    # two sources: k = class * 2 + source
    weights = json.loads((tmp_path / "full" / "run.json").read_text())["group_dro_weights"]
    assert set(weights) == {f"{c} @ {s}" for c in ("COVID19", "NORMAL", "PNEUMONIA") for s in ("site_a", "site_b")}
    assert abs(sum(weights.values()) - 1) < 1e-4 and max(weights.values()) > 1.05 / 6   # moved off uniform

    # a stratum with no training image gets no weight, now or later
    lopsided = fit.learner_from_run(load_run(tmp_path / "full"), "cpu")
    dl = lopsided.dls.train
    keep = ~((dl.cache[1] == 0) & (dl.groups == 1))        # no COVID19 training image from site_b
    dl.cache, dl.groups = (dl.cache[0][keep], dl.cache[1][keep]), dl.groups[keep]
    dro = GroupDRO(0.5)
    dro.learn = lopsided
    dro.before_fit()
    assert torch.allclose(dro.q, torch.tensor([0.2, 0.0, 0.2, 0.2, 0.2, 0.2]))   # 5 strata; none for the empty one

    with interrupted_after_first_epoch(monkeypatch):
        fit.train(cfg.replace(run=str(tmp_path / "part")))
    fit.train(TrainConfig(run=str(tmp_path / "part")), resume=True)
    full, part = (torch.load(tmp_path / r / "checkpoints" / "last.pth", weights_only=False) for r in ("full", "part"))
    assert torch.allclose(full["group_dro_q"], part["group_dro_q"], atol=1e-6)
    assert max((full["model"][k].float() - part["model"][k].float()).abs().max().item() for k in full["model"]) <= 1e-5
    exported = callbacks.group_dro_of(load_learner(tmp_path / "full" / "learner.pkl"))
    assert isinstance(exported, GroupDRO) and exported.q is None    # no run state in the pickle


def test_gradient_reversal_and_the_class_conditional_source_loss():
    import torch
    import torch.nn.functional as F

    from cxr_fastai.train.callbacks import adversary_ramp, conditional_source_loss, reverse_grad

    x, w = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3)
    out = reverse_grad(x, 0.5)
    assert torch.equal(out, x)
    (out * w).sum().backward()
    assert torch.allclose(x.grad, -0.5 * w)                      # the gradient comes back reversed and scaled
    assert adversary_ramp(0) == 0 and 0.46 < adversary_ramp(0.1) < 0.47 and adversary_ramp(1) > 0.9999
    # 3 classes x 3 sources; class 0 has one source (as COVID19 does), class 2 two of the three
    allowed = torch.tensor([[True, False, False], [True, True, True], [False, True, True]])
    logits = torch.randn(5, 3, 3)
    y, g = torch.tensor([0, 1, 1, 2, 2]), torch.tensor([0, 2, 0, 1, 2])
    loss, n, hits = conditional_source_loss(logits, y, g, allowed)
    rows = [logits[1, 1], logits[2, 1], logits[3, 2, 1:], logits[4, 2, 1:]]   # class 0's item has nothing to tell
    want = torch.stack([F.cross_entropy(r[None], t[None]) for r, t in zip(rows, torch.tensor([2, 0, 0, 1]))]).mean()
    assert n == 4 and torch.isclose(loss, want)
    assert hits == sum(int(r.argmax() == t) for r, t in zip(rows, (2, 0, 0, 1)))
    zero, n0, _ = conditional_source_loss(logits[:1], y[:1], g[:1], allowed)
    assert n0 == 0 and zero.item() == 0


def test_source_adversary_adds_its_loss_and_a_resumed_run_carries_its_head(two_sites, tmp_path, monkeypatch):
    """--source-adversary: each training step adds the class-conditional source loss of its head on the batch's
    pooled features; run.json reports the head per epoch; the head is in the checkpoint (a run interrupted after
    epoch 1 and resumed ends where the uninterrupted one does) and not in learner.pkl."""
    import torch
    from fastai.callback.core import Callback
    from fastai.learner import load_learner

    from cxr_fastai.train import fit
    from cxr_fastai.train.callbacks import SourceAdversary, adversary_ramp, callback_of, conditional_source_loss

    seen = []

    class Look(Callback):  # the head's input before SourceAdversary (order 11) uses it, the loss after
        def __init__(self, order): self.order = order
        def after_loss(self):
            adv = callback_of(self.learn, SourceAdversary)
            if not self.training:
                return
            if self.order < adv.order:
                seen.append({"feats": adv.feats, "y": self.y.clone(), "g": self.dl.groups[self.dl.last_idx].clone(),
                             "before": self.learn.loss_grad})
                return
            y, s = self.y, seen[-1]
            feats = s["feats"].detach().clone().requires_grad_()
            plain = conditional_source_loss(adv.net(feats).view(len(y), -1, adv.n_sources), s["y"], s["g"], adv.allowed)[0]
            # what reaches the features from the added term: the head's own gradient, reversed and scaled
            added = self.learn.loss_grad - s["before"]
            s["grad"] = torch.autograd.grad(added, s["feats"], retain_graph=True)[0]
            s["plain_grad"] = torch.autograd.grad(plain, feats)[0]
            s["lam"] = adv.weight * adversary_ramp((self.epoch + self.iter / self.n_iter) / self.n_epoch)
            s.update(want=plain.detach(), after=self.learn.loss_grad.detach(), recorded=self.learn.loss.detach(),
                     before=s["before"].detach())

    cfg = TrainConfig(data=two_sites, size=16, epochs=2, bs=16, widths=WIDTHS, source_adversary=1.0)
    _train_with(monkeypatch, cfg.replace(run=str(tmp_path / "full")), Look(5), Look(20))
    assert seen
    for s in seen:   # both sites have every class: every item counts
        assert torch.allclose(s["after"], s["before"] + s["want"], atol=1e-5)
        assert torch.allclose(s["recorded"], s["before"])        # the loss a run records is the classifier's
        assert torch.allclose(s["grad"], -s["lam"] * s["plain_grad"], atol=1e-7)
    assert max(s["lam"] for s in seen) > 0.5 and max(s["plain_grad"].abs().max().item() for s in seen) > 0
    report = json.loads((tmp_path / "full" / "run.json").read_text())["source_adversary"]
    assert set(report) == {"1", "2"}
    for r in report.values():
        assert 0 <= r["within_class_source_accuracy"] <= 1 and r["images"] > 0 and r["loss"] > 0
        assert 0.5 <= r["commonest_source_share"] < 0.7        # two sites of about equal size
    assert report["1"]["reversal_weight_at_epoch_end"] < report["2"]["reversal_weight_at_epoch_end"] <= 1

    with interrupted_after_first_epoch(monkeypatch):
        fit.train(cfg.replace(run=str(tmp_path / "part")))
    fit.train(TrainConfig(run=str(tmp_path / "part")), resume=True)
    full, part = (torch.load(tmp_path / r / "checkpoints" / "last.pth", weights_only=False) for r in ("full", "part"))
    assert max((full["model"][k].float() - part["model"][k].float()).abs().max().item() for k in full["model"]) <= 1e-5
    heads = full["source_adversary"]["net"], part["source_adversary"]["net"]
    assert max((heads[0][k] - heads[1][k]).abs().max().item() for k in heads[0]) <= 1e-5
    exported = callback_of(load_learner(tmp_path / "full" / "learner.pkl"), SourceAdversary)
    assert isinstance(exported, SourceAdversary) and exported.net is None and exported.head_opt is None


def test_weight_average_covers_the_last_fraction_of_the_epochs():
    from cxr_fastai.train.callbacks import averaging_first_epoch

    assert [averaging_first_epoch(10, f) for f in (0.5, 1.0, 0.3, 0.01)] == [5, 0, 7, 9]
    assert averaging_first_epoch(2, 0.5) == 1 and averaging_first_epoch(1, 0.2) == 0


def test_weight_average_makes_the_mean_of_every_step_the_model_and_a_resumed_run_carries_it(two_sites, tmp_path,
                                                                                            monkeypatch):
    """--weight-average 1: the run's model is the mean of the weights after every training step (BatchNorm
    statistics recomputed for it); run.json's figures are the average's; the best single epoch is kept beside it;
    the mean is in the checkpoint (a run interrupted after epoch 1 and resumed ends with the same model) and not
    in learner.pkl."""
    import torch
    from fastai.callback.core import Callback
    from fastai.learner import load_learner

    from cxr_fastai.train import fit
    from cxr_fastai.train.callbacks import WeightAverage, callback_of
    from cxr_fastai.train.runs import load_run

    steps = []

    class Look(Callback):  # the weights after each optimizer step
        order = 80
        def after_step(self):
            steps.append({n: p.detach().clone() for n, p in self.learn.model.named_parameters()})

    cfg = TrainConfig(data=two_sites, size=16, epochs=2, bs=16, widths=WIDTHS, weight_average=1.0)
    _train_with(monkeypatch, cfg.replace(run=str(tmp_path / "full")), Look())
    full = tmp_path / "full"
    meta = json.loads((full / "run.json").read_text())
    assert len(steps) >= 4 and meta["weight_average"] == {"from_epoch": 1, "to_epoch": 2, "steps": len(steps)}
    best = torch.load(full / "checkpoints" / "best.pth", weights_only=True)
    for name in steps[0]:
        want = torch.stack([s[name] for s in steps]).mean(0)
        assert torch.allclose(best[name], want, atol=1e-6), name
    last = torch.load(full / "checkpoints" / "last.pth", weights_only=False)
    bn = [k for k in best if k.endswith("running_mean")]
    assert bn and all(not torch.allclose(best[k], last["model"][k]) for k in bn)   # statistics of its own
    assert all(torch.isfinite(best[k]).all() for k in bn)
    # the figures run.json gives are the averaged model's own, and the single best epoch is kept
    assert meta["best"]["averaged_from_epoch"] == 1 and "balanced_accuracy_score" in meta["best_single_epoch"]
    assert (full / "checkpoints" / "best_epoch.pth").is_file()
    again = fit.learner_from_run(load_run(full), "cpu")
    with again.no_bar():
        loss, acc, bal = again.validate()
    assert abs(acc - meta["best"]["accuracy"]) < 1e-6 and abs(loss - meta["best"]["valid_loss"]) < 1e-5

    with interrupted_after_first_epoch(monkeypatch):
        fit.train(cfg.replace(run=str(tmp_path / "part")))
    assert torch.load(tmp_path / "part" / "checkpoints" / "last.pth", weights_only=False)["weight_average"]["n"] > 0
    fit.train(TrainConfig(run=str(tmp_path / "part")), resume=True)
    part = torch.load(tmp_path / "part" / "checkpoints" / "best.pth", weights_only=True)
    assert max((best[k].float() - part[k].float()).abs().max().item() for k in best) <= 1e-5
    exported = callback_of(load_learner(full / "learner.pkl"), WeightAverage)
    assert isinstance(exported, WeightAverage) and exported.avg is None


def test_mix_style_gives_each_image_its_partners_statistics_and_keeps_its_content():
    import torch

    from cxr_fastai.train.callbacks import mix_style

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, 5, generator=g) * torch.tensor([1.0, 3.0, 0.5]).view(1, 3, 1, 1) + 2
    perm = torch.tensor([1, 2, 3, 0])

    def stats(t):
        return t.mean((2, 3)), t.var((2, 3)).sqrt()

    assert torch.allclose(mix_style(x, torch.ones(4), perm), x, atol=1e-5)          # lam 1: itself
    swapped = mix_style(x, torch.zeros(4), perm)                                      # lam 0: the partner's style
    for got, want in zip(stats(swapped), stats(x[perm])):
        assert torch.allclose(got, want, atol=1e-3)

    def content(t):
        m, s = stats(t)
        return (t - m[..., None, None]) / s[..., None, None]

    assert torch.allclose(content(swapped), content(x), atol=1e-3)
    half = mix_style(x, torch.full((4,), 0.5), perm)
    assert torch.allclose(stats(half)[0], (stats(x)[0] + stats(x[perm])[0]) / 2, atol=1e-3)


def test_mix_style_mixes_training_batches_only_and_a_resumed_run_matches(two_sites, tmp_path, monkeypatch):
    """--mix-style 1: every training batch's layer1 and layer2 outputs are mixed (no validation batch is);
    the run differs from one without it; a run interrupted after epoch 1 and resumed ends with the same
    model; learner.pkl's model carries no hook."""
    import torch
    from fastai.callback.core import Callback
    from fastai.learner import load_learner

    from cxr_fastai.train import callbacks, fit

    seen = {"train": 0, "valid": 0}
    mix = callbacks.MixStyle._mix

    def counting(self, module, args, out):
        res = mix(self, module, args, out)
        if res is not None:
            seen["train" if self.learn.training else "valid"] += 1
            assert not torch.allclose(res, out)
        return res

    class Batches(Callback):
        n = 0

        def after_batch(self):
            self.n += int(self.training)

    batches = Batches()
    monkeypatch.setattr(callbacks.MixStyle, "_mix", counting)
    cfg = TrainConfig(data=two_sites, size=16, epochs=2, bs=16, widths=WIDTHS, mix_style=1.0)
    _train_with(monkeypatch, cfg.replace(run=str(tmp_path / "full")), batches)
    assert seen["valid"] == 0 and seen["train"] == 2 * batches.n > 0                   # two layers per batch
    monkeypatch.setattr(callbacks.MixStyle, "_mix", mix)
    fit.train(cfg.replace(run=str(tmp_path / "plain"), mix_style=0.0))
    full = torch.load(tmp_path / "full" / "checkpoints" / "last.pth", weights_only=False)["model"]
    plain = torch.load(tmp_path / "plain" / "checkpoints" / "last.pth", weights_only=False)["model"]
    assert any(not torch.allclose(full[k].float(), plain[k].float()) for k in full)

    with interrupted_after_first_epoch(monkeypatch):
        fit.train(cfg.replace(run=str(tmp_path / "part")))
    fit.train(TrainConfig(run=str(tmp_path / "part")), resume=True)
    part = torch.load(tmp_path / "part" / "checkpoints" / "last.pth", weights_only=False)["model"]
    assert max((full[k].float() - part[k].float()).abs().max().item() for k in full) <= 1e-5
    learn = load_learner(tmp_path / "full" / "learner.pkl")
    assert not any(m._forward_hooks for m in learn.model.modules())
    assert callbacks.callback_of(learn, callbacks.MixStyle).hooks == []
    with pytest.raises(CxrError, match="--mix-style 1.5 is outside 0..1"):
        fit.validate_config(cfg.replace(mix_style=1.5))


def test_audit_names_a_source_that_stands_for_a_class():
    from cxr_fastai.data.audit import confounds

    items = pd.DataFrame({"split": "train", "label": ["PNEUMONIA"] * 80 + ["NORMAL"] * 20 + ["NORMAL"] * 100,
                          "source": ["kids"] * 100 + ["adults"] * 100})
    lines = confounds(items)
    assert any("source 'kids': 80% PNEUMONIA (80 of 100 training images) against 0% in the other sources" in m
               for m in lines)


def test_a_source_far_below_the_pooled_figure_gets_a_plain_sentence():
    from cxr_fastai.metrics import source_gaps

    per_source = {"big": {"n": 900, "balanced_accuracy": 0.93, "per_class_sensitivity": {"P": 0.95}},
                  "nih": {"n": 77, "balanced_accuracy": 0.48, "per_class_sensitivity": {"P": 0.16}}}
    (line,) = source_gaps(per_source, 0.91)
    assert "source 'nih' (n=77): balanced accuracy 0.48 against 0.91 pooled" in line and "P 0.16" in line


def test_the_report_shows_a_per_source_table(two_site_run, tmp_path):
    from cxr_fastai.evaluate.report import interpret_run

    rep = interpret_run(two_site_run, k=4, out=tmp_path / "rep", device="cpu")
    page = (rep.folder / "report.html").read_text()
    assert "<h2>Per source</h2>" in page and "site_a" in page and "site_b" in page
