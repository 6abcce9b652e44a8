"""``bnet data``: make and check session files."""

from __future__ import annotations

import click


@click.group()
def data():
    """Make and check session HDF5 files."""


@data.command()
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--n-trials", default=40, show_default=True, help="Trials in the session.")
@click.option("--n-frames", default=100, show_default=True, help="Frames per trial.")
@click.option("--y-pixels", default=64, show_default=True)
@click.option("--x-pixels", default=64, show_default=True)
@click.option("--n-channels", default=1, show_default=True, help="Image channels (camera views).")
@click.option("--n-neurons", default=50, show_default=True, help="Neurons (0: no neural group).")
@click.option("--n-states", default=4, show_default=True, help="Discrete states of the latent process.")
@click.option("--n-latents", default=4, show_default=True, help="Latent dimensions (even; 2 per body part).")
@click.option("--neural-noise", type=click.Choice(["poisson", "gaussian"]), default="poisson", show_default=True)
@click.option("--neural-noise-std", default=0.5, show_default=True,
              help="Standard deviation of gaussian neural noise (the signal-to-noise knob).")
@click.option("--seed", default=0, show_default=True, help="Seed of the animal, rig and neurons (and the trials).")
@click.option("--recording-seed", type=int, default=None,
              help="Seed of the trials alone: another recording of the --seed animal (a new session).")
def synth(out, n_trials, n_frames, y_pixels, x_pixels, n_channels, n_neurons, n_states, n_latents,
          neural_noise, neural_noise_std, seed, recording_seed):
    """Write a synthetic session with known states, latents and neural rates."""
    from bnet.data import SynthConfig, open_session, synthesize

    config = SynthConfig(n_trials=n_trials, n_frames=n_frames, y_pixels=y_pixels, x_pixels=x_pixels,
                         n_channels=n_channels, n_neurons=n_neurons, n_states=n_states,
                         n_latents=n_latents, neural_noise=neural_noise, neural_noise_std=neural_noise_std, seed=seed,
                         recording_seed=recording_seed)
    path = synthesize(out, config)
    session = open_session(path)
    click.echo(f"wrote {path}: {session.n_trials} trials x {n_frames} frames of "
               f"{'x'.join(map(str, session.image_shape))} images, {n_latents} latents, "
               f"{n_states} states, {n_neurons} neurons (ground truth in /ground_truth)")


@data.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--trial-splits", default="8;1;1;0", show_default=True, help="train;val;test;gap trials per block.")
@click.option("--rng-seed-data", default=0, show_default=True)
@click.option("--require", multiple=True, type=click.Choice(["images", "masks", "labels", "labels_masks", "neural"]),
              help="A group the file must have (repeatable).")
def check(paths, trial_splits, rng_seed_data, require):
    """Validate session files and summarise them (trials, frames, shapes, groups, splits)."""
    from bnet.data import SIGNALS, open_session, split_trials

    for path in paths:
        session = open_session(path, require=tuple(require))
        splits = split_trials(session.trials, trial_splits, rng_seed_data, source=str(session.path))
        click.echo(f"{session.path}  [{session.dataset_id}]  ok")
        lengths = session.n_frames
        click.echo(f"  trials   {session.n_trials} (trial_{session.trials[0]:04d} .. trial_{session.trials[-1]:04d})")
        click.echo(f"  frames   {session.total_frames} (per trial {min(lengths)}..{max(lengths)})")
        shapes = {"images": session.image_shape, "masks": session.image_shape,
                  "labels": (session.n_labels,), "labels_masks": (session.n_labels,),
                  "neural": (session.n_neurons,)}
        for signal in SIGNALS:
            if signal in session.signals:
                click.echo(f"  {signal:<13s}(T, {', '.join(map(str, shapes[signal]))})")
        for grouping, regions in session.regions.items():
            click.echo(f"  regions/{grouping}: " + ", ".join(f"{r} ({len(i)})" for r, i in regions.items()))
        click.echo(f"  splits   '{trial_splits}' seed {rng_seed_data}: " + ", ".join(
            f"{name} {len(splits[name])}" for name in ("train", "val", "test")))


@data.command()
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--mat", "mat_path", type=click.Path(dir_okay=False), default=None,
              help="m1_stevenson_2011.mat [default ../shared/data/spykesml_m1_s1/ beside the working folder].")
@click.option("--trial-frames", default=100, show_default=True, help="Bins (50 ms) per pseudo-trial.")
def m1(out, mat_path, trial_frames):
    """Build a neural-only session from real macaque M1 spikes (labels = hand velocity)."""
    from pathlib import Path

    from bnet.data import open_session
    from bnet.data.m1 import build_m1_session

    mat_path = mat_path or Path("..") / "shared" / "data" / "spykesml_m1_s1" / "m1_stevenson_2011.mat"
    session = open_session(build_m1_session(mat_path, out, trial_frames), require=("neural", "labels"))
    click.echo(f"wrote {session.path}: {session.n_trials} trials x {trial_frames} bins, "
               f"{session.n_neurons} neurons, labels = hand velocity (x, y)")


def _crop(ctx, param, value):
    if value is None:
        return None
    try:
        parts = tuple(int(v) for v in value.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 4:
        raise click.BadParameter(f"expected X,Y,WIDTH,HEIGHT in source pixels, got '{value}'")
    return parts


def _align(ctx, param, value):
    if value is None:
        return None
    parts = tuple(v.strip() for v in value.split(","))
    if len(parts) != 2 or not all(parts) or parts[0] == parts[1]:
        raise click.BadParameter(f"expected HEAD,TAIL: two different keypoints of --labels, got '{value}'")
    return parts


@data.command()
@click.option("--video", "videos", multiple=True, type=click.Path(dir_okay=False),
              help="A video (mp4, avi, ...); repeat for camera views, stacked as channels.")
@click.option("--labels", type=click.Path(dir_okay=False), default=None,
              help="Pose labels: DeepLabCut/lightning-pose CSV or H5, SLEAP analysis H5, plain CSV/NPY. "
                   "Without --video, a label table of stills builds from the stills it names.")
@click.option("--label-format", type=click.Choice(["dlc-csv", "sleap", "dlc-h5", "csv", "npy"]), default=None,
              help="The label format [default: detected from the file].")
@click.option("--min-likelihood", type=float, default=None, help="Mask keypoints below this likelihood.")
@click.option("--keypoints", default=None, help="Comma-separated keypoints to keep as labels [default: all].")
@click.option("--neural", type=click.Path(dir_okay=False), default=None, help="Neural data, frames x neurons "
              "(NPY, MAT, HDF5).")
@click.option("--neural-key", default=None, help="The MAT variable or HDF5 dataset holding it.")
@click.option("--neural-fps", type=float, default=None, help="Its sampling rate [default: one row per video frame].")
@click.option("--out", required=True, type=click.Path(), help="The session file (or folder: data.hdf5 inside).")
@click.option("--y-pixels", default=128, show_default=True)
@click.option("--x-pixels", default=128, show_default=True)
@click.option("--crop", callback=_crop, default=None, help="X,Y,WIDTH,HEIGHT of the source frame to keep.")
@click.option("--centre-on", default=None, help="A keypoint of the labels (e.g. track0_thorax): each frame is a "
              "square --window around it, labels moved with it (for freely moving animals).")
@click.option("--track-animal", is_flag=True, help="Centre each frame's --window on the animal found without pose: "
              "the largest blob that differs from the arena's background (the median of frames sampled over the "
              "video), its smoothed centroid. For one freely moving animal on a static background; the track and "
              "a figure of it (OUT.track.png) are written.")
@click.option("--window", type=int, default=None, help="The side of the square around the animal, in source "
              "pixels (with --centre-on or --track-animal; make it hold the whole animal, tail and legs included).")
# None leaves BuildConfig's default, bnet.data.animal.DEFAULT_TRACK_SMOOTH (not imported here, as for
# --trim-extra-frames below; a test holds the help's number to it)
@click.option("--track-smooth", type=float, default=None, metavar="FRAMES",
              help="Smooth the tracked centre and the --align angle over time: a running median of up to 5 "
                   "frames, then a Gaussian of this sigma in source frames [default: 2; 0: no smoothing].")
@click.option("--align", callback=_align, default=None, metavar="HEAD,TAIL",
              help="Rotate each centred window so that the body axis TAIL -> HEAD (keypoints of --labels) points "
                   "up, labels rotated with it (egocentric, as VAME and keypoint-moseq align). Where either is "
                   "missing the last angle holds.")
@click.option("--masks", is_flag=True, help="Write BehaveNet's masks group from the animal's foreground (cut, "
              "rotated and resized like the frames): weight 1 on the animal, --mask-background-weight elsewhere; "
              "the data config then sets use_output_mask. With --track-animal or --centre-on, one --video.")
@click.option("--mask-background-weight", type=float, default=0.1, show_default=True,
              help="The masks' weight off the animal (relative: the masked loss divides by the masks' sum; 0 "
                   "leaves the background unconstrained).")
@click.option("--max-frames", type=int, default=None, help="Build from the first N source frames only (and the "
              "first N label rows, and the neural rows of those frames).")
# None leaves BuildConfig's default, bnet.data.build.TOLERATED_EXTRA_FRAMES (imported there, not here,
# so that `bnet --help` does not load the data stack; a test holds the help's number to it)
@click.option("--trim-extra-frames", type=int, default=None, metavar="N",
              help="Label and neural rows that run on past the video's last frame by at most N frames are "
                   "dropped, said so and recorded in the file (labels_rows_trimmed, neural_rows_trimmed); more "
                   "is an error [default: 2, a tracker's and ffmpeg's routine disagreement; 0 refuses any].")
@click.option("--fit", type=click.Choice(["pad", "crop", "stretch"]), default="pad", show_default=True,
              help="Keep the aspect by padding or by cropping, or stretch.")
@click.option("--color", type=click.Choice(["gray", "rgb"]), default="gray", show_default=True)
@click.option("--trial-length", default=100, show_default=True, help="Frames per trial.")
@click.option("--fps", type=float, default=None, help="Resample to this frame rate [default: the video's].")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
def build(videos, labels, label_format, min_likelihood, keypoints, neural, neural_key, neural_fps, out, y_pixels, x_pixels,
          crop, centre_on, track_animal, window, track_smooth, align, masks, mask_background_weight, max_frames,
          trim_extra_frames, fit, color, trial_length, fps, overwrite):
    """Build a session HDF5 from videos, pose labels and neural data (streamed)."""
    from pathlib import Path

    from bnet.data.build import BuildConfig, build_session

    config = BuildConfig(out=Path(out), videos=[Path(v) for v in videos], labels=Path(labels) if labels else None,
                         label_format=label_format, min_likelihood=min_likelihood,
                         keypoints=[k.strip() for k in keypoints.split(",")] if keypoints else None,
                         neural=Path(neural) if neural else None, neural_key=neural_key, neural_fps=neural_fps,
                         y_pixels=y_pixels, x_pixels=x_pixels, crop=crop, centre_on=centre_on, window=window,
                         track_animal=track_animal, align=align, masks=masks,
                         mask_background_weight=mask_background_weight, max_frames=max_frames, fit=fit, color=color,
                         trial_length=trial_length, fps=fps, overwrite=overwrite,
                         **({} if trim_extra_frames is None else {"trim_extra_frames": trim_extra_frames}),
                         **({} if track_smooth is None else {"track_smooth": track_smooth}))
    summary = build_session(config, echo=click.echo)
    c, y, x = summary.frame_shape
    click.echo(f"wrote {summary.path}: {summary.n_trials} trials x {summary.trial_length} frames of {c}x{y}x{x}"
               + (f" at {summary.fps:g} fps" if summary.fps else "")
               + (f", {summary.n_labels // 2} keypoints" if summary.n_labels else "")
               + (f", {summary.n_neurons} neurons" if summary.n_neurons else "")
               + f" in {summary.seconds:.1f} s")
    if summary.n_frames_dropped:
        click.echo(f"  the last {summary.n_frames_dropped} frames make no whole trial and were left out")
    if summary.centring:
        around = ("the animal found by background subtraction" if summary.centring == "track-animal"
                  else f"keypoint {summary.centring.split(':', 1)[1]}")
        click.echo(f"  windows:     {summary.window} px around {around}"
                   + (f", rotated so that {summary.align[1]} -> {summary.align[0]} points up" if summary.align else "")
                   + "; centres and angles in group animal_track")
    if summary.n_frames_tracked:
        missing = summary.n_frames_tracked - summary.n_frames_found
        click.echo(f"  animal:      found in {summary.n_frames_found} of {summary.n_frames_tracked} frames"
                   + (f" ({missing} interpolated between found neighbours)" if missing else ""))
    if summary.masks:
        click.echo(f"  masks:       1 on the animal, {summary.mask_background_weight:g} elsewhere "
                   f"(use_output_mask in the data config)")
    if summary.track_figure:
        click.echo(f"  track:       {summary.track_figure}  (look at it: is the window on the animal?)")
    click.echo(f"  data config: {summary.config_path}  (bnet tune ae --data-config {summary.config_path} ...)")
    click.echo(f"  check it:    bnet data check {summary.path}")


@data.command()
@click.option("--lab", required=True)
@click.option("--expt", required=True)
@click.option("--animal", required=True)
@click.option("--session", required=True)
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="The folder above lab/expt/animal/session/data.hdf5 [default: the working folder].")
@click.option("--from-file", "session_file", type=click.Path(dir_okay=False), default=None,
              help="Read channels, pixels, frame rate and neural type from this built session.")
@click.option("--n-input-channels", type=int, default=None)
@click.option("--y-pixels", type=int, default=None)
@click.option("--x-pixels", type=int, default=None)
@click.option("--frame-rate", type=float, default=None)
@click.option("--neural-type", type=click.Choice(["spikes", "ca", "none"]), default=None)
@click.option("--neural-bin-size", type=float, default=None, help="Seconds per neural bin.")
@click.option("--replace", is_flag=True, help="Replace an entry with other values.")
def add(lab, expt, animal, session, data_dir, session_file, n_input_channels, y_pixels, x_pixels, frame_rate,
        neural_type, neural_bin_size, replace):
    """Record a dataset in your bnet catalogue (BehaveNet's add_dataset), so configs can name
    it by lab/expt/animal/session. Missing values are asked for only at a terminal."""
    import sys
    from pathlib import Path

    from bnet.data.catalog import DatasetEntry, add_dataset
    from bnet.errors import ConfigError

    data_dir = Path(data_dir or ".").resolve()
    known = {"n_input_channels": n_input_channels, "y_pixels": y_pixels, "x_pixels": x_pixels,
             "frame_rate": frame_rate, "neural_type": neural_type}
    found = _session_facts(Path(session_file) if session_file else data_dir / lab / expt / animal / session
                           / "data.hdf5")
    values = {k: v if v is not None else found.get(k) for k, v in known.items()}
    for name, value in values.items():
        if value is None:
            if not sys.stdin.isatty():
                raise ConfigError(f"--{name.replace('_', '-')} is needed (no session file to read it from, "
                                  f"and no terminal to ask at)")
            values[name] = click.prompt(name.replace("_", " "), type=float if name == "frame_rate" else
                                        click.Choice(["spikes", "ca", "none"]) if name == "neural_type" else int)
    entry = DatasetEntry(lab, expt, animal, session, str(data_dir), neural_bin_size=neural_bin_size, **values)
    path = add_dataset(entry, replace)
    click.echo(f"recorded {entry.key} in {path}: {entry.n_input_channels}x{entry.y_pixels}x{entry.x_pixels} "
               f"at {entry.frame_rate:g} fps, neural {entry.neural_type}; file {entry.path}")


def _session_facts(path) -> dict:
    """Channels, pixels, frame rate and neural type of a built session, where it exists."""
    import json

    import h5py

    if not path.is_file():
        return {}
    from bnet.data import open_session

    session = open_session(path)
    c, y, x = session.image_shape
    with h5py.File(path, "r") as f:
        rate = float(f.attrs.get("frame_rate", 0.0)) or None
    config = path.with_suffix(".json")
    neural = json.loads(config.read_text()).get("neural_type") if config.is_file() else None
    return {"n_input_channels": c, "y_pixels": y, "x_pixels": x, "frame_rate": rate,
            "neural_type": neural or ("none" if "neural" not in session.signals else None)}
