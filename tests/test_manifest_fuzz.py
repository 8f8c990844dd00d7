"""The manifest parser never lets a malformed manifest through and never fails with anything but
ArtifactError (which the CLI turns into one line)."""
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cxr_fastai.errors import ArtifactError
from cxr_fastai.artifact.export import FORMAT_VERSION, read_manifest, validate_manifest

GOOD = {
    "format_version": FORMAT_VERSION,
    "classes": ["COVID19", "NORMAL", "PNEUMONIA"],
    "input": {"size": 32, "channels": 1},
    "normalization": {"mean": 0.5, "std": 0.25},
    "architecture": {"name": "ResNet9", "n_in": 1, "n_out": 3, "widths": [64, 128, 256, 512]},
    "files": {"model.safetensors": {"sha256": "0" * 64}, "model.pkl": {"sha256": "0" * 64}},
}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


def _mutate(d, path, value):
    """Copy of d with the value at `path` (a list of keys) replaced."""
    d = json.loads(json.dumps(d))
    cur = d
    for k in path[:-1]:
        cur = cur[k]
    cur[path[-1]] = value
    return d


PATHS = [["format_version"], ["classes"], ["input"], ["input", "size"], ["normalization", "mean"],
         ["normalization", "std"], ["architecture"], ["architecture", "name"], ["architecture", "n_out"],
         ["architecture", "widths"], ["files"], ["files", "model.safetensors"]]


def test_the_reference_manifest_is_accepted():
    validate_manifest(GOOD)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(PATHS), json_values)
def test_a_mutated_field_is_accepted_only_when_still_valid_else_artifact_error(path, value):
    m = _mutate(GOOD, path, value)
    try:
        validate_manifest(m)
    except ArtifactError:
        return
    # accepted: then the fields the loader relies on have the right types and ranges
    assert isinstance(m["classes"], list) and len(set(m["classes"])) == len(m["classes"]) >= 2
    assert isinstance(m["input"]["size"], int) and m["input"]["size"] >= 16
    assert m["normalization"]["std"] > 0 and m["architecture"]["n_out"] == len(m["classes"])
    assert 1 <= m["format_version"] <= FORMAT_VERSION


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_arbitrary_manifest_bytes_give_artifact_error_not_a_crash(tmp_path, raw):
    (tmp_path / "manifest.json").write_bytes(raw)
    try:
        read_manifest(tmp_path)
    except ArtifactError as e:
        assert "manifest.json" in str(e) and "\n" not in str(e)
