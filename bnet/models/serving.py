"""What a fitted model takes and gives outside its study: one array in, named arrays out.

``bnet apply`` (new sessions), the MLflow python-function models of :mod:`bnet.tracking.pyfunc`
(``mlflow.pyfunc.load_model``, ``mlflow models serve``) and notebooks call the same functions,
so a model answers alike wherever it runs. Each family registers a :class:`ServingSpec`: the input it
reads (one array: frames, latents of one trial, neural activity of one trial), how to check an
input against the model with an error naming the mismatch, how to predict, and an example
input made from the model itself (the frame its decoder draws at zero latents, a trial sampled
from an ARHMM, a decoder's mean input), so a checkpoint carries a working example without the
data it was fitted to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from bnet.data.datasets import TrialBatches
from bnet.data.session import Session
from bnet.errors import DataError
from bnet.models.registry import model_entry


@dataclass(frozen=True)
class ServingSpec:
    """How a family's models are used on data they were not fitted to.

    Attributes:
        inputs: ``model -> {name: shape}``, -1 where any length goes: what the model reads (one
            array, given bare or by name, or several by name: frames and labels).
        input_docs: each input's shape and values in words, for errors and documentation.
        predict: ``(model, {name: checked float32 array}) -> {name: array}``; the first name
            is the main answer (latents, states, predictions).
        example: a small input made from the model alone (``{name: array}``).
    """

    inputs: Callable[[Any], dict[str, tuple[int, ...]]]
    input_docs: dict[str, str]
    predict: Callable[[Any, dict[str, np.ndarray]], dict[str, np.ndarray]]
    example: Callable[[Any], dict[str, np.ndarray]]

    def check(self, model, values, source: str) -> dict[str, np.ndarray]:
        """``values`` by name as float32 if they fit the model; a DataError naming ``source``
        and the mismatch otherwise."""
        expected = self.inputs(model)
        if not isinstance(values, dict):
            if len(expected) > 1:
                raise DataError(f"{source}: {model.config.model_class} model reads {' and '.join(expected)}: give "
                                f"them by name")
            values = {next(iter(expected)): values}
        missing = [name for name in expected if name not in values]
        if missing:
            raise DataError(f"{source}: no {', '.join(missing)} ({model.config.model_class} model reads "
                            f"{' and '.join(expected)})")
        checked = {}
        for name, shape in expected.items():
            array = np.asarray(values[name])
            if array.ndim != len(shape) or any(e not in (-1, a) for e, a in zip(shape, array.shape)):
                shown = "(" + ", ".join("n" if e == -1 else str(e) for e in shape) + ")"
                raise DataError(f"{source}: {name} of shape {array.shape}, but {model.config.model_class} model "
                                f"reads {self.input_docs[name]} {shown}")
            if not np.issubdtype(array.dtype, np.number):
                raise DataError(f"{source}: {name} of type {array.dtype}, not numbers")
            array = array.astype(np.float32, copy=False)
            if not np.all(np.isfinite(array)):
                raise DataError(f"{source}: {name} hold NaN or infinite values")
            checked[name] = array
        return checked

    def __call__(self, model, values, source: str = "input") -> dict[str, np.ndarray]:
        return self.predict(model, self.check(model, values, source))


_SPECS: dict[str, ServingSpec] = {}


def register_serving(family: str, spec: ServingSpec) -> None:
    _SPECS[family] = spec


def serving_spec(model) -> ServingSpec | None:
    """How a fitted model is served (None where its family registered nothing)."""
    return _SPECS.get(model_entry(model.config.model_class).family)


# --- autoencoders: frames -> latents --------------------------------------------------------

def frame_shape(model) -> tuple[int, int, int]:
    config = model.config
    return int(config.n_input_channels), int(config.y_pixels), int(config.x_pixels)


def reads_labels(model) -> bool:
    """Whether the AE reads labels beside the frames: a conditional encoder, or a decoder that
    draws from latents and labels (``cond-ae``, ``cond-vae``)."""
    return bool(model.n_encoder_extra_inputs) or model.n_decoder_inputs > model.n_latents


@torch.no_grad()
def encode_frames(model, frames: torch.Tensor, session_index: int | None = None,
                  labels: torch.Tensor | None = None) -> torch.Tensor:
    """Latents ``(n, n_latents)`` of frames ``(n, C, Y, X)`` in [0, 1] (``session_index`` picks a
    multi-session model's own layers; ``labels`` feed a conditional encoder)."""
    batch = {"images": frames.contiguous(memory_format=torch.channels_last)}
    if session_index is not None:
        batch["session"] = torch.full((len(frames),), session_index, dtype=torch.long, device=frames.device)
    if labels is not None:
        batch["labels"] = labels
    return model.posterior(batch)[0].float()


FRAMES_PER_CHUNK = 256
"""Frames through an AE's encoder or decoder at once outside training (bounded memory)."""


@torch.no_grad()
def encode_session(model, session: Session, device: torch.device, session_index: int | None = None,
                   labels: bool = False, chunk: int = FRAMES_PER_CHUNK) -> dict[int, np.ndarray]:
    """Latents (T, n_latents) of every trial of a session, read ``chunk`` frames at a time
    (a session larger than the preload limit is never all in memory)."""
    model.to(device).eval()
    signals = ("images", "labels") if labels else ("images",)
    batches = TrialBatches(session, session.trials, signals, chunk)
    latents: dict[int, list[np.ndarray]] = {t: [] for t in session.trials}
    for i, (trial, _, _) in enumerate(batches.index):
        batch = {k: v.to(device) for k, v in batches[i].items()}
        latents[trial].append(encode_frames(model, batch["images"], session_index, batch.get("labels")).cpu().numpy())
    return {t: np.concatenate(parts) for t, parts in latents.items()}


def _ae_inputs(model) -> dict[str, tuple[int, ...]]:
    labels = {"labels": (-1, int(model.config.n_labels))}
    if not model.has_encoder:  # labels-images: frames drawn from labels
        return labels
    frames = {"frames": (-1, *frame_shape(model))}
    return {**frames, **labels} if reads_labels(model) else frames


def _ae_predict(model, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Latents of frames; frames of labels for a class with no encoder."""
    if not model.has_encoder:
        model.eval()
        with torch.no_grad():
            return {"frames": model.decode(torch.from_numpy(inputs["labels"])).float().numpy()}
    frames = inputs["frames"]
    if frames.size and float(frames.max()) > 1.5:
        raise DataError(f"frames range up to {float(frames.max()):g}: the model reads frames in [0, 1] "
                        f"(divide 8-bit frames by 255)")
    labels = torch.from_numpy(inputs["labels"]) if "labels" in inputs else None
    model.eval()
    return {"latents": encode_frames(model, torch.from_numpy(frames), labels=labels).numpy()}


@torch.no_grad()
def _ae_example(model) -> dict[str, np.ndarray]:
    """The frame the decoder draws at zero latents (near the training mean frame)."""
    model.eval()
    labels = torch.zeros(1, model.config.n_labels) if reads_labels(model) or not model.has_encoder else None
    if not model.has_encoder:
        return {"labels": labels.numpy()}
    frame = model.decode(torch.zeros(1, model.n_latents), None, labels).float().clamp(0, 1).numpy()
    return {"frames": frame, **({"labels": labels.numpy()} if labels is not None else {})}


register_serving("ae", ServingSpec(
    inputs=_ae_inputs, predict=_ae_predict, example=_ae_example,
    input_docs={"frames": "frames (n, channels, y pixels, x pixels) in [0, 1]",
             "labels": "labels (n, label dimensions)"}))


# --- segmentation: latents of one trial -> states ---------------------------------------------

def segment(model, trials: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Viterbi states ``(T,)`` and state posteriors ``(T, K)`` of each trial."""
    engine = model.engine
    sequences = [np.asarray(x, dtype=np.float64) for x in trials]
    states = [z.cpu().numpy().astype(np.int64) for z in engine.viterbi(sequences)]
    probs = [p.cpu().numpy().astype(np.float32) for p in engine.expected_states(sequences).expected_states]
    return states, probs


def _arhmm_predict(model, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    latents = inputs["latents"]
    lags = int(model.config.n_arhmm_lags)
    if len(latents) <= lags:
        raise DataError(f"a trial of {len(latents)} frames: the model's {lags} lag(s) need more")
    states, probs = segment(model, [latents])
    return {"states": states[0], "probs": probs[0]}


def _arhmm_example(model) -> dict[str, np.ndarray]:
    _, x = model.engine.sample(int(model.config.n_arhmm_lags) + 8, seed=0)
    return {"latents": x[0].cpu().numpy().astype(np.float32)}


register_serving("arhmm", ServingSpec(
    inputs=lambda model: {"latents": (-1, model.engine.n_dims)}, predict=_arhmm_predict, example=_arhmm_example,
    input_docs={"latents": "one trial's latents (frames, dimensions)"}))


# --- decoders and their ensembles: neural activity of one trial -> predictions ---------------

def decoder_input_size(model) -> int:
    """What a decoder (or each member of an ensemble) reads per frame."""
    return int(model.config.members[0]["n_input"] if hasattr(model.config, "members") else model.config.n_input)


def _decoder_predict(model, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    model.eval()
    with torch.no_grad():
        return {"predictions": model.predict(torch.from_numpy(inputs["inputs"])).float().numpy()}


def decoder_example(model) -> dict[str, np.ndarray]:
    """Ten frames of the mean training input of a decoder (or an ensemble's first member)."""
    decoder = model.members[0] if hasattr(model, "members") else model
    return {"inputs": np.repeat(decoder.input_mean.float().numpy()[None], 10, axis=0)}


DECODER_SERVING = ServingSpec(
    inputs=lambda model: {"inputs": (-1, decoder_input_size(model))}, predict=_decoder_predict,
    example=decoder_example,
    input_docs={"inputs": "one trial's inputs (frames, neurons or behaviour dimensions)"})
register_serving("decoder", DECODER_SERVING)
register_serving("ensemble", DECODER_SERVING)
