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
@click.option("--seed", default=0, show_default=True)
def synth(out, n_trials, n_frames, y_pixels, x_pixels, n_channels, n_neurons, n_states, n_latents,
          neural_noise, seed):
    """Write a synthetic session with known states, latents and neural rates."""
    from bnet.data import SynthConfig, open_session, synthesize

    config = SynthConfig(n_trials=n_trials, n_frames=n_frames, y_pixels=y_pixels, x_pixels=x_pixels,
                         n_channels=n_channels, n_neurons=n_neurons, n_states=n_states,
                         n_latents=n_latents, neural_noise=neural_noise, seed=seed)
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
