"""Every bad input ends with a non-zero exit, a message naming the culprit, no traceback,
and nothing written to the store."""

import h5py
import numpy as np
import pytest

from conftest import assert_clean_failure, frames, run_cli, write_session


def good_trials(n=12, t=10):
    return {f"trial_{i:04d}": frames(t) for i in range(n)}


def make_bad_files(tmp_path):
    bad = {}
    bad["not_hdf5"] = tmp_path / "notes.hdf5"
    bad["not_hdf5"].write_text("hello")
    bad["no_images"] = write_session(tmp_path / "no_images.hdf5", {"neural": {"trial_0000": np.zeros((5, 2))}})
    neural = {f"trial_{i:04d}": np.zeros((10, 3)) for i in range(12)}
    neural["trial_0004"] = np.zeros((9, 3))
    bad["frame_mismatch"] = write_session(tmp_path / "mismatch.hdf5", {"images": good_trials(), "neural": neural})
    images = good_trials()
    images["trial_0002"] = frames(10, dtype=np.float32)
    bad["not_uint8"] = write_session(tmp_path / "float.hdf5", {"images": images})
    images = good_trials()
    images["trial_0003"] = np.zeros((10, 16, 16), np.uint8)
    bad["not_4d"] = write_session(tmp_path / "3d.hdf5", {"images": images})
    images = good_trials()
    images["clip_7"] = frames(10)
    bad["bad_name"] = write_session(tmp_path / "names.hdf5", {"images": images})
    bad["empty_group"] = tmp_path / "empty.hdf5"
    with h5py.File(bad["empty_group"], "w") as f:
        f.create_group("images")
    bad["too_few_trials"] = write_session(tmp_path / "few.hdf5", {"images": good_trials(n=6)})
    return bad


EXPECTED = {
    "not_hdf5": ["notes.hdf5", "not an HDF5 file"],
    "no_images": ["no_images.hdf5", "no group 'images'"],
    "frame_mismatch": ["mismatch.hdf5", "trial_0004", "10 frames in 'images' but 9 in 'neural'"],
    "not_uint8": ["float.hdf5", "images/trial_0002", "expected uint8"],
    "not_4d": ["3d.hdf5", "images/trial_0003", "expected 4-D"],
    "bad_name": ["names.hdf5", "'clip_7'", "not a trial name"],
    "empty_group": ["empty.hdf5", "group 'images' is empty"],
    "too_few_trials": ["few.hdf5", "6 trials are fewer than one block", "8;1;1;0"],
}


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_tune_ae_rejects_bad_data(tmp_path, case):
    path = make_bad_files(tmp_path)[case]
    store = tmp_path / "store"
    result = run_cli("tune", "ae", "--data", path, "--experiment", "x", "--n-trials", 1, "--store", store)
    assert_clean_failure(result, *EXPECTED[case], store=store)


@pytest.mark.parametrize("case", sorted(set(EXPECTED) - {"too_few_trials"}))
def test_data_check_rejects_bad_data(tmp_path, case):
    path = make_bad_files(tmp_path)[case]
    assert_clean_failure(run_cli("data", "check", "--require", "images", path), *EXPECTED[case])


@pytest.mark.parametrize("yaml_text, fragments", [
    ("model: {n_latent: 4}", ["unknown key 'n_latent' in section 'model'"]),
    ("model: {model_class: vae-x}", ["unknown model_class 'vae-x'"]),
    ("model: {model_class: [ae, vae-x]}", ["unknown model_class 'vae-x'"]),
    ("model: {n_ae_latents: []}", ["'n_ae_latents' is an empty list"]),
    ("training: {learning_rate: {low: 0.01, high: 0.001}}", ["'learning_rate' range is empty"]),
    ("model: {model_type: [conv, transformer]}", ["model_type 'transformer'"]),
    ("data: {trial_splits: '8;1'}", ["trial_splits '8;1'"]),
])
def test_tune_ae_rejects_bad_configs(tmp_path, tiny_session, yaml_text, fragments):
    config = tmp_path / "study.yaml"
    config.write_text(yaml_text)
    store = tmp_path / "store"
    result = run_cli("tune", "ae", "--data", tiny_session, "--experiment", "x", "--n-trials", 1,
                     "--config", config, "--store", store)
    assert_clean_failure(result, *fragments, store=store)


def test_tune_ae_rejects_zero_trials(tmp_path, tiny_session):
    store = tmp_path / "store"
    result = run_cli("tune", "ae", "--data", tiny_session, "--experiment", "x", "--n-trials", 0, "--store", store)
    assert_clean_failure(result, "'--n-trials': 0 is not in the range x>=1", store=store, code=2)


def test_tune_ae_rejects_image_shape_that_disagrees_with_config(tmp_path, tiny_session):
    config = tmp_path / "study.yaml"
    config.write_text("data: {y_pixels: 128}")
    store = tmp_path / "store"
    result = run_cli("tune", "ae", "--data", tiny_session, "--experiment", "x", "--n-trials", 1,
                     "--config", config, "--store", store)
    assert_clean_failure(result, "tiny.hdf5", "y_pixels=128", store=store)


def test_missing_experiment_and_unknown_queries(tmp_path, tiny_session):
    store = tmp_path / "store"
    assert_clean_failure(run_cli("tune", "ae", "--data", tiny_session, "--n-trials", 1, "--store", store),
                         "no experiment name", store=store)
    assert_clean_failure(run_cli("best", "ae", "--experiment", "nothing-here", "--store", store),
                         "no MLflow experiment named 'nothing-here'")


def test_data_check_summarises_a_good_file(tiny_session):
    result = run_cli("data", "check", tiny_session)
    assert result.exit_code == 0, result.output
    for fragment in ["trials   12", "frames   240", "images       (T, 1, 16, 16)", "neural       (T, 10)",
                     "regions/indxs: region-0 (5), region-1 (5)", "train 8, val 1, test 1"]:
        assert fragment in result.output
