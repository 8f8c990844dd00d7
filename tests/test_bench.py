"""`cxr-fastai bench` runs both paths on the same data and reports the figures the speed issue asks for."""
import json

from conftest import cli


def test_bench_json_reports_both_paths_their_ratio_and_predict_figures(tmp_path):
    from cxr_fastai.synth import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "d", {"train": 24, "valid": 6, "test": 0}, size=32, seed=1)
    r = cli("bench", data, "--device", "cpu", "--size", 16, "--epochs", 2, "--bs", 16, "--limit", 64, "--json")
    assert r.exit_code == 0, (r.output, r.exception)
    res = json.loads(r.stdout)
    for key in ("plain_train_img_s", "fastai_train_img_s", "ratio", "predict_img_s", "device", "size",
                "predict_cache_img_s", "raw_forward_img_s", "import_s", "peak_rss_mib"):
        assert key in res, key
    assert res["device"] == "cpu" and res["size"] == 16 and res["n_train"] == 64 and res["epochs"] == 2
    assert res["plain_train_img_s"] > 0 and res["fastai_train_img_s"] > 0 and res["predict_img_s"] > 0
    f, p = res["fastai_train_img_s"], res["plain_train_img_s"]
    # the img/s figures are rounded to 0.1 and the ratio (from the unrounded ones) to 0.001
    assert abs(res["ratio"] - f / p) <= 0.0005 + 0.05 / p + 0.05 * f / p**2 + 1e-9
    # one accuracy per counted epoch, for each path; time-to-target is a number or null, never made up
    assert len(res["plain_valid_acc"]) == len(res["fastai_valid_acc"]) == 2
    assert all(0 <= a <= 1 for a in res["plain_valid_acc"] + res["fastai_valid_acc"])
    for k in ("plain_time_to_target_s", "fastai_time_to_target_s"):
        reached = max(res[k.split("_time")[0] + "_valid_acc"]) >= res["target_acc"]
        assert (res[k] is not None) == reached


def test_bench_on_a_missing_folder_is_one_clear_error(tmp_path):
    r = cli("bench", tmp_path / "nope", "--device", "cpu")
    assert r.exit_code == 1 and "nope" in r.stderr and "Traceback" not in r.output
