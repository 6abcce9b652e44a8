"""Animal-centred windows without pose (`--track-animal`), egocentric alignment (`--align`)
and foreground masks (`--masks`) in `bnet data build`, on tiny synthetic videos whose animal
is known to the pixel: a bright elliptic Gaussian blob moving (and turning) over a static,
textured arena, written losslessly (h264 -qp 0, gray)."""

import json
import math

import h5py
import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image

import bnet
from bnet.data import open_session
from bnet.data.animal import Windows, body_rotation, smooth_over_time, track_animal
from bnet.errors import DataError
from bnet.models.ae import AEConfig
from bnet.tracking import resolve_store
from bnet.tuning.families.ae import AETrials
from conftest import assert_clean_failure, invoke, run_cli

SIZE, N_FRAMES = 96, 60
AMPLITUDE = 150.0


def truth(n_frames: int = N_FRAMES):
    """Centre (x, y, continuous pixel coordinates) and heading (radians, counter-clockwise on
    screen) per frame: a circle of radius 20 around the middle, the body turning 3/4 round."""
    t = np.arange(n_frames)
    phase = 2 * np.pi * t / n_frames
    centres = np.stack([SIZE / 2 + 20 * np.cos(phase), SIZE / 2 + 20 * np.sin(phase)], axis=1)
    return centres, 1.5 * np.pi * t / n_frames + 0.3


def arena(seed: int = 0) -> np.ndarray:
    """A static textured floor: noise and stripes, 20..60 grey levels."""
    rng = np.random.default_rng(seed)
    ys, xs = np.indices((SIZE, SIZE))
    return 20 + 20 * rng.random((SIZE, SIZE)) + 20 * (np.sin(xs / 3.0) > 0) * (ys % 16 < 8)


def animal(centre, heading, long_sd=6.0, short_sd=2.5) -> np.ndarray:
    """An elliptic Gaussian blob, long axis along ``heading``, sampled at pixel centres."""
    ys, xs = np.indices((SIZE, SIZE)) + 0.5
    dx, dy = xs - centre[0], ys - centre[1]
    along = dx * math.cos(heading) - dy * math.sin(heading)  # screen: y points down
    across = dx * math.sin(heading) + dy * math.cos(heading)
    return AMPLITUDE * np.exp(-0.5 * ((along / long_sd) ** 2 + (across / short_sd) ** 2))


def write_video(path, frames):
    writer = imageio_ffmpeg.write_frames(str(path), (SIZE, SIZE), pix_fmt_in="gray", pix_fmt_out="gray", fps=25,
                                         quality=None, output_params=["-qp", "0"], macro_block_size=16)
    writer.send(None)
    for frame in frames:
        writer.send(np.clip(np.rint(frame), 0, 255).astype(np.uint8).tobytes())
    writer.close()
    return path


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """The video (sensor noise of 2 grey levels on every frame), a pose table of its head and
    tail (10 px either side of the centre along the body), and the truth."""
    folder = tmp_path_factory.mktemp("arena")
    centres, headings = truth()
    floor, rng = arena(), np.random.default_rng(1)
    frames = [floor + animal(c, h) + rng.normal(0, 2, floor.shape) for c, h in zip(centres, headings)]
    video = write_video(folder / "arena.mp4", frames)
    axis = np.stack([np.cos(headings), -np.sin(headings)], axis=1) * 10
    head, tail = centres + axis, centres - axis
    table = folder / "pose.csv"
    table.write_text("head_x,head_y,tail_x,tail_y\n" + "".join(
        f"{a:.3f},{b:.3f},{c:.3f},{d:.3f}\n" for (a, b), (c, d) in zip(head, tail)))
    return {"video": video, "pose": table, "centres": centres, "headings": headings, "floor": floor}


def rows(path, group):
    with h5py.File(path) as f:
        return np.concatenate([f[group][name][()] for name in sorted(f[group])])


def blob_moments(image: np.ndarray, floor: np.ndarray | None = None):
    """Centroid (x, y, continuous), the long axis' angle from vertical (degrees) and the
    elongation of the animal: the pixels above 100 (the floor never is) weighted by their
    excess over the floor (given) or over its brightest (else)."""
    excess = image.astype(float) - (60 if floor is None else floor)
    weights = np.clip(excess, 0, None) * (excess > 30 if floor is not None else image > 100)
    ys, xs = np.indices(image.shape) + 0.5
    total = weights.sum()
    x, y = (weights * xs).sum() / total, (weights * ys).sum() / total
    cxx = (weights * (xs - x) ** 2).sum() / total
    cyy = (weights * (ys - y) ** 2).sum() / total
    cxy = (weights * (xs - x) * (ys - y)).sum() / total
    values, vectors = np.linalg.eigh([[cxx, cxy], [cxy, cyy]])
    long_axis = vectors[:, 1]
    return x, y, math.degrees(math.acos(min(1.0, abs(long_axis[1])))), values[1] / values[0]


# ---------------------------------------------------------------- the tracker


@pytest.mark.parametrize("smooth", [0, 2])
def test_the_tracker_finds_the_blob_to_within_a_pixel(scene, smooth):
    track = track_animal(scene["video"], (SIZE, SIZE), estimate=N_FRAMES, smooth=smooth)
    assert track.found.all() and track.n_frames == N_FRAMES
    error = np.hypot(*(track.centres - scene["centres"]).T)
    assert error.max() < 1.0, error.max()
    # the floor was learnt: the background is the arena without the animal
    assert np.abs(track.background - scene["floor"]).mean() < 2.0
    low, high = track.thresholds
    assert 8 <= low < high < AMPLITUDE


def test_frames_without_the_animal_are_interpolated_and_never_finding_it_is_an_error(scene, tmp_path):
    centres, headings = truth()
    frames = [scene["floor"] + (0 if 20 <= k < 25 else animal(c, h)) for k, (c, h) in enumerate(zip(centres,
                                                                                                       headings))]
    track = track_animal(write_video(tmp_path / "gap.mp4", frames), (SIZE, SIZE), estimate=N_FRAMES, smooth=0)
    assert np.flatnonzero(~track.found).tolist() == [20, 21, 22, 23, 24]
    assert np.isnan(track.raw[20:25]).all()
    between = centres[19] + (centres[25] - centres[19]) * (np.arange(1, 6) / 6)[:, None]
    assert np.abs(track.centres[20:25] - between).max() < 1.0
    with pytest.raises(DataError, match="empty.mp4: the animal is never found"):
        track_animal(write_video(tmp_path / "empty.mp4", [scene["floor"]] * 10), (SIZE, SIZE), estimate=10)


def test_of_two_similar_animals_the_track_keeps_to_one(tmp_path):
    """Two blobs whose sizes take turns at being the larger: the largest blob alone would jump
    between them every frame; the track stays on the one it started on."""
    t = np.arange(40)
    first = np.stack([20 + 1.2 * t, np.full(40, 30.0)], axis=1)
    second = np.stack([76 - 1.2 * t, np.full(40, 66.0)], axis=1)
    floor = arena()
    frames = [floor + animal(a, 0.0, 6.5 if k % 2 else 5.0, 3.0) + animal(b, 0.0, 5.75, 3.0)
              for k, (a, b) in enumerate(zip(first, second))]
    track = track_animal(write_video(tmp_path / "two.mp4", frames), (SIZE, SIZE), estimate=40, smooth=0)
    followed = second if np.hypot(*(track.raw[0] - second[0])) < 3 else first
    assert np.abs(track.raw - followed).max() < 1.0


def test_the_help_states_the_smoothing_default():
    from bnet.data.animal import DEFAULT_TRACK_SMOOTH

    assert f"[default: {DEFAULT_TRACK_SMOOTH:g};" in " ".join(invoke("data", "build", "--help").split())


def test_frames_that_do_not_fit_in_memory_are_decoded_twice_to_the_same_track(scene):
    once = track_animal(scene["video"], (SIZE, SIZE), estimate=N_FRAMES, smooth=0)
    twice = track_animal(scene["video"], (SIZE, SIZE), estimate=N_FRAMES, smooth=0, memory=1)
    assert (once.n_passes, twice.n_passes) == (1, 2)
    assert np.allclose(once.centres, twice.centres, atol=0.05)


def test_smoothing_keeps_a_steady_drift_and_removes_a_glitch():
    line = np.stack([np.arange(40.0), -3 * np.arange(40.0)], axis=1)
    assert np.allclose(smooth_over_time(line, 2.0), line)
    assert np.array_equal(smooth_over_time(line, 0), line)
    glitched = line.copy()
    glitched[20] += 50  # one frame off by 50 px moves the track by about a frame's drift, no more
    assert np.abs(smooth_over_time(glitched, 2.0) - line).max() < 3


def test_missing_head_or_tail_holds_the_last_angle():
    xy = np.zeros((5, 2, 2), np.float32)
    xy[:, 0] = [[0, -10], [10, 0], [np.nan, np.nan], [0, 10], [0, 10]]  # head: up, right, -, down, down
    rotation = body_rotation(xy, ["head", "tail"], "head", "tail", 0, "pose.csv")
    assert np.allclose(rotation[:3], [0, 90, 90]) and np.allclose(np.abs(rotation[3:]), 180)
    with pytest.raises(DataError, match=r"no keypoint\(s\) nose \(has head, tail\)"):
        body_rotation(xy, ["head", "tail"], "nose", "tail", 0, "pose.csv")


def test_rotated_windows_move_labels_with_the_pixels_they_mark():
    source = np.zeros((120, 160), np.uint8)
    source[70:74, 100:104] = 255  # centre (102, 72)
    windows = Windows.around(np.array([[90.0, 60.0]]), 40, np.array([30.0]))
    cut = np.asarray(windows.cut(Image.fromarray(source), 0)).astype(float)
    ys, xs = np.indices(cut.shape) + 0.5
    centroid = np.array([(xs * cut).sum(), (ys * cut).sum()]) / cut.sum()
    assert np.allclose(windows.points(np.array([[[102.0, 72.0]]]))[0, 0], centroid, atol=0.1)


# ---------------------------------------------------------------- builds


def test_track_animal_builds_windows_that_follow_the_animal(scene, tmp_path):
    out = tmp_path / "tracked.hdf5"
    output = invoke("data", "build", "--video", scene["video"], "--out", out, "--track-animal", "--window", 48,
                    "--y-pixels", 48, "--x-pixels", 48, "--trial-length", 20)
    figure = tmp_path / "tracked.track.png"
    assert "found in 60 of 60 frames" in output and str(figure) in output
    assert figure.is_file() and Image.open(figure).size[0] > 300
    session = open_session(out)
    assert session.n_trials == 3 and session.image_shape == (1, 48, 48)
    # windows that follow the animal are not moved unless asked: moved, the open-field AE drew the wall, not the mouse
    assert session.follows_animal
    assert AETrials(session).augmentation(AEConfig(), {}).params() == {"augment_shift": 0, "augment_rotation": 0}
    assert AETrials(session).augmentation(AEConfig(), {"augment_rotation": 15}).rotation == 15
    track = rows(out, "animal_track")
    assert track.shape == (60, 3) and track.dtype == np.float32
    # the window starts at whole pixels: its centre is within half a pixel of the tracked one
    assert np.abs(track[:, :2] - scene["centres"]).max() < 1.5 and (track[:, 2] == 0).all()
    images = rows(out, "images")
    for k in range(0, 60, 7):
        left, top = (track[k, :2] - 24).astype(int)  # whole pixels
        seen = np.array(blob_moments(images[k, 0], scene["floor"][top : top + 48, left : left + 48])[:2])
        assert np.abs(seen - 24).max() < 1.5  # the animal in the middle of the window
        assert np.abs(seen - (scene["centres"][k] - track[k, :2] + 24)).max() < 0.2  # where animal_track says
    with h5py.File(out) as f:
        attrs = dict(f["animal_track"].attrs)
        assert f.attrs["centring"] == "track-animal"
    assert attrs["method"] == "track-animal" and attrs["window"] == 48
    assert (attrs["source_width"], attrs["source_height"]) == (SIZE, SIZE) and attrs["frames_found"] == 60
    assert json.loads(out.with_suffix(".json").read_text())["use_output_mask"] is False


def test_align_turns_the_body_axis_up_in_frames_and_labels(scene, tmp_path):
    out = tmp_path / "aligned.hdf5"
    output = invoke("data", "build", "--video", scene["video"], "--labels", scene["pose"], "--out", out,
                    "--track-animal", "--window", 40, "--align", "head,tail", "--y-pixels", 40, "--x-pixels", 40,
                    "--trial-length", 20)
    assert "rotated so that tail -> head points up" in output
    labels = rows(out, "labels")  # head_x, tail_x, head_y, tail_y
    assert np.abs(labels[:, :2] - 20).max() < 1.0  # on the vertical through the centre
    assert np.allclose(labels[:, 2], 10, atol=1.0) and np.allclose(labels[:, 3], 30, atol=1.0)  # head up, tail down
    for frame in rows(out, "images")[::5]:
        x, y, from_vertical, elongation = blob_moments(frame[0])
        assert abs(x - 20) < 1.0 and abs(y - 20) < 1.0
        assert elongation > 3 and from_vertical < 5
    assert not open_session(out).follows_animal  # turned with the animal: it faces one way
    track = rows(out, "animal_track")
    expected = (90 - np.degrees(scene["headings"]) + 180) % 360 - 180
    assert np.abs((track[:, 2] - expected + 180) % 360 - 180).max() < 1.0
    # centred on a keypoint instead: the tail sits at the centre, the head straight above it
    out = tmp_path / "keypoint.hdf5"
    invoke("data", "build", "--video", scene["video"], "--labels", scene["pose"], "--out", out, "--centre-on",
           "tail", "--window", 40, "--align", "head,tail", "--y-pixels", 40, "--x-pixels", 40, "--trial-length", 20)
    labels = rows(out, "labels")
    assert np.abs(labels[:, :2] - 20).max() < 0.01 and np.allclose(labels[:, 2:], [0, 20], atol=0.01)
    assert (tmp_path / "keypoint.track.png").is_file()


def test_masks_weigh_the_animal_and_say_so_in_the_data_config(scene, tmp_path):
    out = tmp_path / "masked.hdf5"
    output = invoke("data", "build", "--video", scene["video"], "--out", out, "--track-animal", "--window", 48,
                    "--masks", "--mask-background-weight", 0.25, "--y-pixels", 24, "--x-pixels", 24,
                    "--trial-length", 20)
    assert "1 on the animal, 0.25 elsewhere" in output
    session = open_session(out, require=("images", "masks"))
    masks, images = rows(out, "masks"), rows(out, "images")
    assert masks.shape == images.shape and masks.dtype == np.float32
    assert set(np.unique(masks)) == {0.25, 1.0}
    on = masks == 1
    assert (on[images > 100]).all()  # the animal's bright core is weighed in full
    assert on[:, :, 10:14, 10:14].all() and not on[:, :, :3, :3].any()  # the middle, not the corners
    assert 0.02 < on.mean() < 0.4
    assert json.loads(out.with_suffix(".json").read_text())["use_output_mask"] is True
    assert session.signals == ("images", "masks")
    # an AE of these windows is scored on the animal's pixels too, whether or not its loss weighs them
    config = tmp_path / "ae.yaml"
    config.write_text("data: {trial_splits: '1;1;1;0'}\n"
                      "model: {n_ae_latents: 4, ae_n_conv_layers: 2, ae_first_channels: 8}\n"
                      "training: {max_n_epochs: 2, learning_rate: 1.0e-3}\n"
                      "tuning: {n_trials: 1, metric: val_masked_var_explained}\n")  # a study may rank by it
    summary = invoke("tune", "ae", "--data", out, "--config", config, "--experiment", "masked", "--store",
                     tmp_path / "store")
    assert "on the masked (the animal's) pixels" in summary
    assert "objective maximize val_masked_var_explained" in summary
    (run,) = bnet.best_runs("masked", family="ae", store=resolve_store(tmp_path / "store"))
    assert {"val_masked_var_explained", "test_masked_var_explained"} <= set(run.metrics)
    assert run.params["use_output_mask"] == "False"


@pytest.mark.parametrize("extra, fragments", [
    (["--track-animal"], ["--track-animal needs --window PX"]),
    (["--track-animal", "--window", 40, "--centre-on", "head", "--labels", "POSE"],
     ["--track-animal and --centre-on", "give one"]),
    (["--track-animal", "--window", 40, "--align", "head,tail"], ["--align HEAD,TAIL", "needs --labels"]),
    (["--track-animal", "--window", 40, "--align", "nose,tail", "--labels", "POSE"],
     ["--align nose,tail: no keypoint(s) nose (has head, tail)"]),
    (["--align", "head,tail", "--labels", "POSE"], ["--align rotates an animal-centred window"]),
    (["--align", "head", "--labels", "POSE"], ["--align", "expected HEAD,TAIL"]),
    (["--masks"], ["--masks weights the animal in an animal-centred window", "--track-animal"]),
    (["--track-animal", "--window", 40, "--masks", "--mask-background-weight", 2], ["--mask-background-weight",
                                                                                     "within 0..1"]),
    (["--track-animal", "--window", 40, "--track-smooth", -1], ["--track-smooth must be at least 0"]),
    (["STILL", "--track-animal", "--window", 40], ["the animal is never found", "still.mp4"]),
    (["NO-VIDEO", "--labels", "POSE", "--track-animal", "--window", 40], ["--track-animal finds the animal in a "
                                                                           "video: give --video"]),
])
def test_bad_centring_options_are_clear_errors(scene, tmp_path, extra, fragments):
    video = scene["video"]
    if extra[0] == "STILL":  # nothing moves: nothing differs from the background
        video, extra = write_video(tmp_path / "still.mp4", [scene["floor"]] * 30), extra[1:]
    source = ["--video", video]
    if extra[0] == "NO-VIDEO":
        source, extra = [], extra[1:]
    extra = [scene["pose"] if a == "POSE" else a for a in extra]
    out = tmp_path / "out.hdf5"
    result = run_cli("data", "build", *map(str, source), "--out", str(out), "--y-pixels", "16",
                     "--x-pixels", "16", "--trial-length", "10", *map(str, extra))
    # --align's form is checked by Click as it parses (a usage error); the rest by bnet
    assert_clean_failure(result, *fragments, code=2 if "expected HEAD,TAIL" in fragments else 1)
    assert not out.exists() and not (tmp_path / "out.track.png").exists()
