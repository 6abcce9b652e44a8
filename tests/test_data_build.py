"""`bnet data build` and `bnet data add` on the real videos and label files in ../shared/data."""

import json

import h5py
import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image

from bnet.data import open_session
from bnet.data.build import TOLERATED_EXTRA_FRAMES, FrameGeometry, neural_per_frame, resampled
from bnet.data.pose import flat_labels, read_pose
from bnet.errors import DataError
from conftest import SHARED, assert_clean_failure, invoke, run_cli

MOUSE = SHARED / "data" / "lp_mirror_mouse"
MOUSE_VIDEO = MOUSE / "videos" / "test_vid.mp4"
FLIES = SHARED / "data" / "sleap_flies"
FLY_VIDEO = FLIES / "20190128_113421.120s.mp4"
needs_data = pytest.mark.skipif(not (MOUSE_VIDEO.is_file() and FLY_VIDEO.is_file()), reason="../shared/data is absent")
VAME = SHARED / "data" / "vame_openfield"
VAME_VIDEO, VAME_LABELS = VAME / "cropped_video.mp4", VAME / "cropped_video.csv"
needs_vame = pytest.mark.skipif(not (VAME_VIDEO.is_file() and VAME_LABELS.is_file()),
                                reason="../shared/data/vame_openfield is absent")


def write_video(path, n_frames: int, size: int = 32, fps: int = 25):
    """A small gray h264 video that ffmpeg decodes to exactly ``n_frames`` frames."""
    writer = imageio_ffmpeg.write_frames(str(path), (size, size), pix_fmt_in="gray", fps=fps, macro_block_size=16)
    writer.send(None)
    for k in range(n_frames):
        writer.send(np.full((size, size), 4 * k % 256, np.uint8).tobytes())
    writer.close()
    return path


def write_label_table(path, n_rows: int):
    """A plain label table whose row k puts one keypoint at (k / 4, k / 8): rows tell their frame."""
    path.write_text("nose_x,nose_y\n" + "".join(f"{k / 4},{k / 8}\n" for k in range(n_rows)))
    return path


def trial_rows(path, group: str) -> np.ndarray:
    with h5py.File(path) as f:
        return np.concatenate([f[group][name][()] for name in sorted(f[group])])


# ---------------------------------------------------------------- geometry


@pytest.mark.parametrize("fit, crop", [("pad", None), ("crop", None), ("stretch", None), ("pad", (40, 10, 200, 120))])
def test_labels_move_with_the_pixels_they_mark(fit, crop):
    """A bright square in a source frame lands where the geometry maps its centre."""
    source = np.zeros((240, 320), np.uint8)
    source[100:108, 150:158] = 255  # centre (154, 104) in continuous pixel coordinates
    geometry = FrameGeometry.plan((320, 240), (64, 48), crop, fit)
    frame = geometry.frame(Image.fromarray(source))[0].astype(float)
    assert frame.shape == (48, 64)
    ys, xs = np.indices(frame.shape)
    weight = frame / frame.sum()
    centroid = np.array([(xs * weight).sum() + 0.5, (ys * weight).sum() + 0.5])
    assert np.allclose(geometry.points(np.array([154.0, 104.0])), centroid, atol=0.25)


def test_pad_keeps_the_aspect_and_centres_the_frame():
    geometry = FrameGeometry.plan((396, 406), (64, 64), None, "pad")
    assert geometry.size == (62, 64) and geometry.offset == (1, 0)
    frame = geometry.frame(Image.new("L", (396, 406), 200))[0]
    assert frame[:, 0].max() == 0 and frame[:, 63].max() == 0 and frame[:, 1:63].min() == 200


def test_resampling_takes_the_nearest_source_frame_and_bins_neural_counts():
    assert [i for i, _ in resampled(iter(range(10)), 10.0, 5.0)] == [0, 2, 4, 6, 8]
    assert [i for i, _ in resampled(iter(range(4)), 10.0, 20.0)] == [0, 1, 1, 2, 2, 3, 3]
    counts = np.arange(12, dtype=float).reshape(6, 2)
    assert np.array_equal(neural_per_frame(counts, 30.0, 10.0, 2), [[0 + 2 + 4, 1 + 3 + 5], [6 + 8 + 10, 7 + 9 + 11]])
    traces = counts + 0.5
    assert np.allclose(neural_per_frame(traces, 30.0, 10.0, 2), [[2.5, 3.5], [8.5, 9.5]])


# ---------------------------------------------------------------- label files


@needs_data
def test_label_formats_read_to_the_same_positions(tmp_path):
    pose = read_pose(MOUSE / "CollectedData.csv")
    assert pose.xy.shape == (90, 17, 2) and pose.names[0] == "paw1LH_top" and len(pose.images) == 90
    assert all(p.is_file() for p in pose.images)
    assert 0.05 < np.isnan(pose.xy[..., 0]).mean() < 0.15  # occluded keypoints (8.8% of values)
    plain = tmp_path / "plain.csv"
    plain.write_text("nose_x,nose_y,tail_x,tail_y\n" + "\n".join(
        f"{a},{b},{c},{d}" for a, b, c, d in pose.xy[:, [6, 4]].reshape(90, 4)))
    read = read_pose(plain)
    assert read.names == ["nose", "tail"] and np.allclose(read.xy, pose.xy[:, [6, 4]], equal_nan=True)
    np.save(tmp_path / "pose.npy", pose.xy)
    assert np.allclose(read_pose(tmp_path / "pose.npy").xy, pose.xy, equal_nan=True)
    sleap = read_pose(FLIES / "predictions.analysis.h5")
    assert sleap.xy.shape == (3000, 26, 2) and sleap.names[:2] == ["track0_head", "track0_thorax"]
    with pytest.raises(DataError, match="unknown label format '.txt'"):
        (tmp_path / "labels.txt").write_text("1 2\n")
        read_pose(tmp_path / "labels.txt")


# ---------------------------------------------------------------- whole builds


@needs_data
def test_the_mouse_video_becomes_a_session_and_tunes(tmp_path):
    out = tmp_path / "mouse" / "data.hdf5"
    output = invoke("data", "build", "--video", MOUSE_VIDEO, "--out", out, "--y-pixels", 32, "--x-pixels", 32,
                    "--trial-length", 50)
    assert "19 trials x 50 frames of 1x32x32 at 250 fps" in output and "the last 44 frames" in output
    session = open_session(out)
    assert session.n_trials == 19 and session.image_shape == (1, 32, 32)
    first = session.read("images", 0)
    assert first.dtype == np.uint8 and first.std() > 10  # real frames
    config = json.loads(out.with_suffix(".json").read_text())
    assert config["data"] == str(out.resolve()) and config["y_pixels"] == 32 and config["n_input_channels"] == 1
    # resampled to 125 fps: every other source frame
    half = tmp_path / "half.hdf5"
    invoke("data", "build", "--video", MOUSE_VIDEO, "--out", half, "--y-pixels", 32, "--x-pixels", 32,
           "--trial-length", 50, "--fps", 125)
    resampled_session = open_session(half)
    assert resampled_session.n_trials == 9
    assert np.array_equal(resampled_session.read("images", 0)[:25], first[0:50:2])
    # a short AE study on the real frames, configured by the written data config
    (tmp_path / "ae.yaml").write_text("experiment: mouse\nmodel: {model_type: linear, n_ae_latents: 4}\n"
                                      "training: {max_n_epochs: 2, batch_size: 50}\ntuning: {n_trials: 1}\n")
    output = invoke("tune", "ae", "--data-config", out.with_suffix(".json"), "--config", tmp_path / "ae.yaml",
                    "--store", tmp_path / "store")
    assert "1 complete" in output


@needs_data
def test_the_fly_video_and_its_sleap_labels_become_a_session(tmp_path):
    out = tmp_path / "fly.hdf5"
    invoke("data", "build", "--video", FLY_VIDEO, "--labels", FLIES / "predictions.analysis.h5", "--out", out,
           "--y-pixels", 64, "--x-pixels", 64, "--trial-length", 500)
    session = open_session(out, require=("images", "labels", "labels_masks"))
    assert session.n_trials == 6 and session.n_labels == 52 and session.image_shape == (1, 64, 64)
    pose = read_pose(FLIES / "predictions.analysis.h5")
    expected = np.concatenate([pose.xy[..., 0], pose.xy[..., 1]], axis=1) * 64 / 1024
    with h5py.File(out) as f:
        labels = np.concatenate([f["labels"][f"trial_{t:04d}"][()] for t in range(6)])
        masks = np.concatenate([f["labels_masks"][f"trial_{t:04d}"][()] for t in range(6)])
        assert json.loads(f.attrs["label_names"])[:2] == ["track0_head_x", "track0_thorax_x"]
        assert f.attrs["frame_rate"] == 25.0
    assert np.array_equal(masks == 0, np.isnan(expected))
    assert np.allclose(labels[masks > 0], expected[masks > 0], atol=1e-3)


@needs_data
def test_labelled_stills_become_a_session(tmp_path):
    out = tmp_path / "stills.hdf5"
    invoke("data", "build", "--labels", MOUSE / "CollectedData.csv", "--out", out, "--y-pixels", 64,
           "--x-pixels", 64, "--trial-length", 10)
    session = open_session(out, require=("labels", "labels_masks"))
    assert session.n_trials == 9 and session.n_labels == 34
    pose = read_pose(MOUSE / "CollectedData.csv")
    # pad: 396x406 becomes 62x64, 1 px of padding left and right; x scales with the pixels
    scale = 62 / 396
    with h5py.File(out) as f:
        labels, masks = f["labels"]["trial_0000"][()], f["labels_masks"]["trial_0000"][()]
        image = f["images"]["trial_0003"][()][5, 0]
    x = pose.xy[:10, :, 0] * scale + 1
    assert np.allclose(labels[:, :17][masks[:, :17] > 0], x[np.isfinite(x)], atol=0.05)
    still = np.asarray(Image.open(pose.images[35]).convert("L").resize((62, 64), Image.Resampling.BOX))
    assert np.abs(image[:, 1:63].astype(int) - still).max() <= 1


@needs_data
def test_neural_data_is_checked_and_binned_to_the_frames(tmp_path):
    counts = np.random.default_rng(0).poisson(0.5, (994 * 2, 7))
    np.save(tmp_path / "spikes.npy", counts)
    out = tmp_path / "n.hdf5"
    invoke("data", "build", "--video", MOUSE_VIDEO, "--neural", tmp_path / "spikes.npy", "--neural-fps", 500,
           "--out", out, "--y-pixels", 16, "--x-pixels", 16, "--trial-length", 100)
    session = open_session(out, require=("neural",))
    assert session.n_neurons == 7
    assert np.array_equal(session.read("neural", 1), counts[200:400].reshape(100, 2, 7).sum(axis=1))
    assert json.loads(out.with_suffix(".json").read_text())["neural_type"] == "spikes"
    result = run_cli("data", "build", "--video", str(MOUSE_VIDEO), "--neural",
                     str(tmp_path / "spikes.npy"), "--out", str(tmp_path / "bad.hdf5"))
    assert_clean_failure(result, "spikes.npy has 1988 rows", "has 994 frames")
    assert not (tmp_path / "bad.hdf5").exists()


@needs_data
@pytest.mark.parametrize("case, fragments", [
    ("truncated", ["truncated.mp4", "cannot be read as video: truncated"]),
    ("not-video", ["notes.mp4", "cannot be read as video"]),
    ("label-count", ["predictions.analysis.h5 has 3000 labelled frames", "test_vid.mp4 has about 99"]),
    ("label-format", ["unknown label format '.txt'"]),
    ("view-sizes", ["the views differ in size", "396x406", "1024x1024"]),
    ("trial-length", ["--trial-length 5000 is longer than", "test_vid.mp4"]),
    ("exists", ["exists (pass --overwrite to replace it)"]),
])
def test_bad_input_is_a_clear_error_and_leaves_no_file(tmp_path, case, fragments):
    out = tmp_path / "out.hdf5"
    args = ["--video", MOUSE_VIDEO]
    if case == "truncated":
        data = MOUSE_VIDEO.read_bytes()
        (tmp_path / "truncated.mp4").write_bytes(data[: len(data) // 3])
        args = ["--video", tmp_path / "truncated.mp4"]
    elif case == "not-video":
        (tmp_path / "notes.mp4").write_text("not a video")
        args = ["--video", tmp_path / "notes.mp4"]
    elif case == "label-count":
        args += ["--labels", FLIES / "predictions.analysis.h5"]
    elif case == "label-format":
        (tmp_path / "labels.txt").write_text("1 2\n")
        args += ["--labels", tmp_path / "labels.txt"]
    elif case == "view-sizes":
        args += ["--video", FLY_VIDEO]
    elif case == "trial-length":
        args += ["--trial-length", 5000]
    elif case == "exists":
        out.write_text("keep me")
    result = run_cli("data", "build", *map(str, args), "--out", str(out), "--y-pixels", "16",
                     "--x-pixels", "16", "--trial-length", str(5000 if case == "trial-length" else 50))
    assert_clean_failure(result, *fragments)
    if case == "exists":
        assert out.read_text() == "keep me"
    else:
        assert not out.exists() and not list(tmp_path.glob(".out.hdf5.partial*"))


@needs_data
def test_data_add_records_a_session_that_configs_then_name(tmp_path, monkeypatch):
    monkeypatch.setenv("BNET_HOME", str(tmp_path / "home"))
    session_dir = tmp_path / "data" / "lab1" / "run" / "m1" / "s1"
    invoke("data", "build", "--video", MOUSE_VIDEO, "--out", session_dir, "--y-pixels", 16, "--x-pixels", 16,
           "--trial-length", 50)
    output = invoke("data", "add", "--lab", "lab1", "--expt", "run", "--animal", "m1", "--session", "s1",
                    "--data-dir", tmp_path / "data")
    assert "1x16x16 at 250 fps, neural none" in output
    catalog = json.loads((tmp_path / "home" / "datasets.json").read_text())
    assert catalog["lab1/run/m1/s1"]["frame_rate"] == 250.0
    (tmp_path / "ae.yaml").write_text("experiment: named\ndata: {lab: lab1, expt: run, animal: m1, session: s1}\n"
                                      "model: {model_type: linear, n_ae_latents: 2}\n"
                                      "training: {max_n_epochs: 1, batch_size: 50}\ntuning: {n_trials: 1}\n")
    assert "1 complete" in invoke("tune", "ae", "--config", tmp_path / "ae.yaml", "--store", tmp_path / "store")
    # values that cannot be read from a file are needed as options when no terminal can ask
    result = run_cli("data", "add", "--lab", "x", "--expt", "y", "--animal", "z", "--session", "w")
    assert_clean_failure(result, "--n-input-channels is needed")


@needs_data
def test_frames_centred_on_a_keypoint_follow_the_animal(tmp_path):
    out = tmp_path / "centred.hdf5"
    invoke("data", "build", "--video", FLY_VIDEO, "--labels", FLIES / "predictions.analysis.h5", "--keypoints",
           "track0_thorax,track0_head", "--centre-on", "track0_thorax", "--window", 128, "--max-frames", 100,
           "--out", out, "--y-pixels", 32, "--x-pixels", 32, "--trial-length", 50)
    with h5py.File(out) as f:
        labels, masks = f["labels"]["trial_0001"][()], f["labels_masks"]["trial_0001"][()]
        images = f["images"]["trial_0001"][()]
    found = masks[:, 0] > 0
    # the centre keypoint sits mid-frame (to within the rounding of the window to whole pixels)
    assert np.abs(labels[found][:, [0, 2]] - 16).max() <= 0.5 / 4 + 1e-6
    head = np.hypot(labels[found, 1] - labels[found, 0], labels[found, 3] - labels[found, 2])
    assert 7 < np.median(head) < 11.5  # the head is ~37 source px from the thorax: ~9 px at 32/128
    assert images[:, 0, 12:20, 12:20].mean() > 3 * images.mean()
    result = run_cli("data", "build", "--video", str(FLY_VIDEO), "--labels",
                     str(FLIES / "predictions.analysis.h5"), "--centre-on", "thorax", "--window",
                     "64", "--out", str(tmp_path / "x.hdf5"))
    assert_clean_failure(result, "no keypoint 'thorax' to centre on", "track0_thorax")


# ---------------------------------------------------------------- tables longer or shorter than the video


@needs_vame
@pytest.mark.parametrize("max_frames, n_trials, n_trimmed", [(None, 14, 1), (749, 14, 0), (200, 4, 0)])
def test_the_vame_sample_builds_its_extra_label_row_dropped_and_said(tmp_path, max_frames, n_trials, n_trimmed):
    """VAME's DeepLabCut table has 750 rows for 749 decoded frames: the build drops the last row,
    says so and records it; --max-frames takes as many label rows as frames."""
    out = tmp_path / "vame.hdf5"
    limit = [] if max_frames is None else ["--max-frames", max_frames]
    output = invoke("data", "build", "--video", VAME_VIDEO, "--labels", VAME_LABELS, "--out", out, "--y-pixels", 32,
                    "--x-pixels", 32, "--trial-length", 50, *limit)
    note = (f"note: {VAME_LABELS} has 750 labelled frames but {VAME_VIDEO} has 749 frames: its last row, past the "
            f"video's end, was dropped (--trim-extra-frames allows {TOLERATED_EXTRA_FRAMES}; recorded in the file as "
            f"labels_rows_trimmed = 1)")
    assert (note in output) == bool(n_trimmed), output
    session = open_session(out, require=("labels", "labels_masks"))
    assert session.n_trials == n_trials and session.n_labels == 12
    with h5py.File(out) as f:
        assert (f.attrs["labels_rows_in_file"], f.attrs["labels_rows_trimmed"]) == (750, n_trimmed)
    labels, masks = trial_rows(out, "labels"), trial_rows(out, "labels_masks")
    assert len(labels) == len(masks) == len(trial_rows(out, "images")) == n_trials * 50
    # row k of the table labels frame k, from the first frame on
    pose = read_pose(VAME_LABELS)
    expected = flat_labels(FrameGeometry.plan((1064, 1070), (32, 32)).points(pose.xy[: len(labels)]))
    assert np.array_equal(masks > 0, np.isfinite(expected))
    assert np.allclose(labels[masks > 0], expected[masks > 0], atol=1e-4)


@pytest.mark.parametrize("n_rows, trim, fragments", [
    # duration x frame rate already tells 65 rows from 60 frames, before the decode
    (65, [], ["labels.csv has 65 labelled frames but", "video.mp4 has about 60 frames", "--trim-extra-frames N"]),
    # one row over is within the estimate's slack: the exact count after the decode refuses it
    (61, ["--trim-extra-frames", 0], ["labels.csv has 61 labelled frames but", "video.mp4 has 60 frames",
                                      "more than --trim-extra-frames allows (0)", "--trim-extra-frames 1 drops them"]),
])
def test_a_label_table_longer_than_the_video_is_refused_unless_trimming_is_asked_for(tmp_path, n_rows, trim,
                                                                                       fragments):
    assert f"[default: {TOLERATED_EXTRA_FRAMES}," in " ".join(invoke("data", "build", "--help").split())
    video, table = write_video(tmp_path / "video.mp4", 60), write_label_table(tmp_path / "labels.csv", n_rows)
    out = tmp_path / "out.hdf5"
    args = ["data", "build", "--video", video, "--labels", table, "--out", out, "--y-pixels", 32, "--x-pixels", 32,
            "--trial-length", 20]
    assert_clean_failure(run_cli(*args, *trim), *fragments)
    assert not out.exists() and not list(tmp_path.glob(".out.hdf5.partial*"))
    n_extra = n_rows - 60
    output = invoke(*args, "--trim-extra-frames", n_extra)
    dropped = "row, past the video's end, was" if n_extra == 1 else f"{n_extra} rows, past the video's end, were"
    assert (f"note: {table} has {n_rows} labelled frames but {video} has 60 frames: its last {dropped} dropped "
            f"(--trim-extra-frames allows {n_extra}; recorded in the file as labels_rows_trimmed = {n_extra})") in output
    with h5py.File(out) as f:
        assert (f.attrs["labels_rows_in_file"], f.attrs["labels_rows_trimmed"]) == (n_rows, n_extra)
    labels = trial_rows(out, "labels")
    assert np.allclose(labels, np.arange(60)[:, None] / [4, 8])  # frame k keeps row k (the 32 px frame is not scaled)


@pytest.mark.parametrize("n_rows, fragments", [
    (59, ["labels.csv has 59 labelled frames but", "video.mp4 has 60 frames", "the video's last frame has no labels",
          "--max-frames 59 builds from the labelled frames only"]),
    (50, ["labels.csv has 50 labelled frames but", "video.mp4 has about 60 frames"]),
])
def test_a_label_table_shorter_than_the_video_stays_an_error(tmp_path, n_rows, fragments):
    video, table = write_video(tmp_path / "video.mp4", 60), write_label_table(tmp_path / "labels.csv", n_rows)
    out = tmp_path / "out.hdf5"
    # trimming is for rows past the video's end: it never pads a short table
    result = run_cli("data", "build", "--video", str(video), "--labels", str(table), "--out", str(out),
                     "--trial-length", "20", "--trim-extra-frames", "20")
    assert_clean_failure(result, *fragments)
    assert not out.exists() and not list(tmp_path.glob(".out.hdf5.partial*"))


def test_neural_rows_past_the_video_are_dropped_and_said_and_max_frames_takes_the_rows_of_its_frames(tmp_path):
    video = write_video(tmp_path / "video.mp4", 60)
    counts = np.random.default_rng(1).poisson(2.0, (65, 3))
    np.save(tmp_path / "spikes.npy", counts[:61])
    args = ["data", "build", "--video", video, "--neural", tmp_path / "spikes.npy", "--y-pixels", 16, "--x-pixels",
            16, "--trial-length", 20]
    output = invoke(*args, "--out", tmp_path / "one.hdf5")
    assert "spikes.npy has 61 rows (2.440 s at 25 Hz) but" in output
    assert "its last row, past the video's end, was dropped" in output and "neural_rows_trimmed = 1" in output
    with h5py.File(tmp_path / "one.hdf5") as f:
        assert (f.attrs["neural_rows_in_file"], f.attrs["neural_rows_trimmed"]) == (61, 1)
    assert np.array_equal(trial_rows(tmp_path / "one.hdf5", "neural"), counts[:60])
    # the first 40 frames take the first 40 rows
    output = invoke(*args, "--max-frames", 40, "--out", tmp_path / "forty.hdf5")
    assert "note:" not in output
    assert np.array_equal(trial_rows(tmp_path / "forty.hdf5", "neural"), counts[:40])
    np.save(tmp_path / "spikes.npy", counts)
    result = run_cli(*args, "--out", tmp_path / "five.hdf5")
    assert_clean_failure(result, "spikes.npy has 65 rows", "video.mp4 has 60 frames", "--trim-extra-frames 5 drops them")
    assert not (tmp_path / "five.hdf5").exists()
