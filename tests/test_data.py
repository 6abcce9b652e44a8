import h5py
import numpy as np
import pytest
import torch

from bnet.data import SynthConfig, TrialBatches, open_session, read_ground_truth, split_trials, synthesize
from bnet.data.exports import read_export, write_export
from bnet.data.synth import pose_distances
from bnet.errors import ConfigError, DataError
from conftest import frames, write_session


# --- splits: BehaveNet's block semantics ---------------------------------------------

@pytest.mark.parametrize("n_trials, expected", [(100, (80, 10, 10)), (10, (8, 1, 1)), (11, (8, 1, 1)),
                                                (25, (16, 2, 2))])
def test_split_sizes_follow_behavenet(n_trials, expected):
    splits = split_trials(list(range(n_trials)), "8;1;1;0", rng_seed_data=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == expected
    assert not set(splits.train) & set(splits.val) and not set(splits.val) & set(splits.test)


def test_too_few_trials_for_one_block_is_an_error():
    with pytest.raises(DataError, match="6 trials are fewer than one block"):
        split_trials(list(range(6)), "8;1;1;0")


def test_splits_are_seeded_blocks_with_gaps():
    a = split_trials(list(range(43)), "3;1;1;1", rng_seed_data=0)
    assert a == split_trials(list(range(43)), "3;1;1;1", rng_seed_data=0)
    # the seed places the blocks among the left-over trials, as in BehaveNet
    assert len({split_trials(list(range(43)), "3;1;1;1", rng_seed_data=s) for s in range(10)}) > 1
    per_block = 3 + 1 + 1 + 3
    assert len(a.train) == 3 * (43 // per_block)
    # a gap trial follows each train run: no val trial directly after a train trial
    assert all(v - 1 not in a.train for v in a.val)


def test_splits_use_trial_names_not_positions():
    trials = [5, 7, 9, 11, 13, 15, 17, 19, 21, 23]
    splits = split_trials(trials, "8;1;1;0")
    assert set(splits.train) | set(splits.val) | set(splits.test) == set(trials)


def test_train_frac_subsamples_training_trials_only():
    full = split_trials(list(range(100)), "8;1;1;0", 0)
    half = split_trials(list(range(100)), "8;1;1;0", 0, train_frac=0.5)
    count = split_trials(list(range(100)), "8;1;1;0", 0, train_frac=12)
    assert len(half.train) == 40 and set(half.train) <= set(full.train)
    assert len(count.train) == 12 and half.val == full.val and half.test == full.test


@pytest.mark.parametrize("spec", ["8;1;1", "8;0;1;0", "a;b;c;d", "8;1;1;-1"])
def test_bad_trial_splits_name_the_option(spec):
    with pytest.raises(ConfigError, match="trial_splits"):
        split_trials(list(range(100)), spec)


# --- session files: every bad input is a clear error ---------------------------------

def test_synthetic_session_reads_back(tiny_session):
    session = open_session(tiny_session)
    assert session.n_trials == 12 and session.image_shape == (1, 16, 16)
    assert session.signals == ("images", "labels", "neural")
    assert session.n_labels == 4 and session.n_neurons == 10
    assert set(session.regions["indxs"]) == {"region-0", "region-1"}
    assert session.dataset_id.startswith("synthetic/")
    assert session.read("images", 3).dtype == np.uint8


def test_not_hdf5(tmp_path):
    path = tmp_path / "movie.hdf5"
    path.write_text("not hdf5")
    with pytest.raises(DataError, match=r"movie.hdf5: not an HDF5 file"):
        open_session(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        open_session(tmp_path / "absent.hdf5")


def test_missing_images_group(tmp_path):
    path = write_session(tmp_path / "s.hdf5", {"neural": {"trial_0000": np.zeros((5, 3))}})
    with pytest.raises(DataError, match=r"s.hdf5: no group 'images'"):
        open_session(path)


def test_frame_count_mismatch_names_trial_and_groups(tmp_path):
    path = write_session(tmp_path / "s.hdf5", {
        "images": {"trial_0000": frames(5), "trial_0001": frames(6)},
        "neural": {"trial_0000": np.zeros((5, 3)), "trial_0001": np.zeros((7, 3))},
    })
    with pytest.raises(DataError, match=r"trial_0001 has 6 frames in 'images' but 7 in 'neural'"):
        open_session(path)


def test_images_not_uint8(tmp_path):
    path = write_session(tmp_path / "s.hdf5", {"images": {"trial_0000": frames(5, dtype=np.float32)}})
    with pytest.raises(DataError, match=r"images/trial_0000 has dtype float32; expected uint8"):
        open_session(path)


def test_images_not_4d(tmp_path):
    path = write_session(tmp_path / "s.hdf5", {"images": {"trial_0000": np.zeros((5, 16, 16), np.uint8)}})
    with pytest.raises(DataError, match=r"images/trial_0000 has shape \(5, 16, 16\); expected 4-D"):
        open_session(path)


@pytest.mark.parametrize("name", ["trial_1", "trial0001", "frames", "trial_00001"])
def test_trial_names_out_of_pattern(tmp_path, name):
    path = write_session(tmp_path / "s.hdf5", {"images": {"trial_0000": frames(5), name: frames(5)}})
    with pytest.raises(DataError, match=f"holds '{name}', which is not a trial name"):
        open_session(path)


def test_empty_group(tmp_path):
    path = tmp_path / "s.hdf5"
    with h5py.File(path, "w") as f:
        f.create_group("images")
    with pytest.raises(DataError, match="group 'images' is empty"):
        open_session(path)


def test_trial_missing_from_one_group(tmp_path):
    path = write_session(tmp_path / "s.hdf5", {
        "images": {"trial_0000": frames(5), "trial_0001": frames(5)},
        "labels": {"trial_0000": np.zeros((5, 2))},
    })
    with pytest.raises(DataError, match=r"trial trial_0001 is missing from group 'labels'"):
        open_session(path)


def test_image_shape_must_agree_across_trials(tmp_path):
    path = write_session(tmp_path / "s.hdf5", {"images": {"trial_0000": frames(5), "trial_0001": frames(5, y=12)}})
    with pytest.raises(DataError, match=r"images/trial_0001 has shape"):
        open_session(path)


def test_region_indices_out_of_range(tmp_path):
    path = write_session(tmp_path / "s.hdf5", {"images": {"trial_0000": frames(5)},
                                               "neural": {"trial_0000": np.zeros((5, 4))}})
    with h5py.File(path, "a") as f:
        f.create_dataset("regions/indxs/motor", data=np.array([0, 9]))
    with pytest.raises(DataError, match="regions/indxs/motor indexes neurons outside 0..3"):
        open_session(path)


def test_unequal_trial_lengths_any_shape_and_ground_truth_skipped(tmp_path):
    path = write_session(tmp_path / "s.hdf5", {
        "images": {"trial_0000": frames(7, c=2, y=10, x=14), "trial_0003": frames(4, c=2, y=10, x=14)},
        "masks": {"trial_0000": np.ones((7, 2, 10, 14)), "trial_0003": np.ones((4, 2, 10, 14))},
        "ground_truth": {"anything": np.zeros(3)},
    })
    session = open_session(path)
    assert session.trials == (0, 3) and session.n_frames == (7, 4)
    assert session.image_shape == (2, 10, 14) and session.signals == ("images", "masks")
    batches = TrialBatches(session, (0, 3), ("images", "masks"), chunk_size=3)
    assert [b - a for _, a, b in batches.index] == [3, 3, 1, 3, 1]
    first = batches[0]
    assert first["images"].dtype == torch.float32 and 0 <= float(first["images"].min()) <= float(first["images"].max()) <= 1
    whole = TrialBatches(session, (3,), ("images",))
    assert len(whole) == 1 and whole[0]["images"].shape == (4, 2, 10, 14)


# --- synthetic data ------------------------------------------------------------------

def test_synth_is_deterministic_by_seed(tmp_path):
    config = SynthConfig(n_trials=3, n_frames=15, y_pixels=12, x_pixels=20, n_channels=2, n_neurons=5, seed=4)
    a, b = synthesize(tmp_path / "a.hdf5", config), synthesize(tmp_path / "b.hdf5", config)
    c = synthesize(tmp_path / "c.hdf5", SynthConfig(**{**config.__dict__, "seed": 5}))
    sa, sc = open_session(a), open_session(c)
    assert sa.image_shape == (2, 12, 20)
    assert np.array_equal(sa.read("images", 1), open_session(b).read("images", 1))
    assert not np.array_equal(sa.read("images", 1), sc.read("images", 1))


def test_synth_ground_truth_is_consistent(tiny_session):
    states = read_ground_truth(tiny_session, "states")
    latents = read_ground_truth(tiny_session, "latents")
    session = open_session(tiny_session)
    assert len(states) == 12 and states[0].shape == (20,) and latents[0].shape == (20, 4)
    assert set(np.concatenate(states)) <= {0, 1, 2}
    with h5py.File(tiny_session) as f:
        As, bs = f["ground_truth/params/As"][()], f["ground_truth/params/bs"][()]
        noise = f["ground_truth/params"].attrs["noise_std"]
    # the latents follow the stored AR dynamics of the stored states, up to the noise
    z, x = states[0], latents[0]
    residuals = np.array([x[t] - As[z[t]] @ x[t - 1] - bs[z[t]] for t in range(1, 20)])
    assert residuals.std() < 2 * noise
    # labels are the body-part positions (pixels) the frames were rendered from
    labels = session.read("labels", 0)
    assert labels.shape == (20, 4) and labels.min() >= 0 and labels.max() <= 15


def test_synth_states_are_distinct_poses_whichever_part_is_which(tmp_path):
    pose = np.array([0.5, -0.5, -0.5, 0.5])
    swapped, moved = np.array([-0.5, 0.5, 0.5, -0.5]), np.array([0.5, -0.5, -0.5, 0.2])
    assert np.allclose(pose_distances(np.stack([swapped, moved]), pose), [0.0, 0.3])
    path = synthesize(tmp_path / "s.hdf5", SynthConfig(n_trials=1, n_frames=5, y_pixels=8, x_pixels=8,
                                                       n_states=4, seed=0))
    with h5py.File(path) as f:
        fixed_points = f["ground_truth/params/fixed_points"][()]
    nearest = min(pose_distances(fixed_points[j:j + 1], fixed_points[i])[0]
                  for i in range(4) for j in range(i + 1, 4))
    assert nearest > 1.0  # plain farthest-point sampling left two states 0.48 apart: one pose, parts swapped


def test_synth_bad_options(tmp_path):
    with pytest.raises(ConfigError, match="n_latents must be even"):
        synthesize(tmp_path / "x.hdf5", SynthConfig(n_latents=3))


def test_export_round_trip(tmp_path):
    splits = split_trials(list(range(10)), "8;1;1;0")
    values = {t: np.full((5, 2), t, float) for t in range(10)}
    path = write_export(tmp_path / "latents.hdf5", {"latents": values}, splits)
    read, read_splits = read_export(path, "latents")
    assert read_splits == splits and np.array_equal(read[7], values[7])
    with pytest.raises(DataError, match="no group 'states'"):
        read_export(path, "states")
