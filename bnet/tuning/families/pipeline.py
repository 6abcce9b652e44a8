"""`bnet tune pipeline`: autoencoders tuned for what comes after them.

Each trial trains an AE with the trial's hyperparameters, then fits fixed, small downstream
stages on its latents: an ARHMM of the user's states and lags, and a decoder of the latents
from the session's neural activity. Every stage is fitted by its family's own code as an
MLflow run nested under the trial's run (``bnet.role`` stage, lineage in
``bnet.upstream.ae_run_id``), so each stage run ranks, registers and applies like a trial of
its family. The trial reports reconstruction and the downstream scores, by default as a
multi-objective study (the Pareto front), or one of them (``tuning.metric``).

Downstream scores of different AEs are compared in one set of coordinates: each AE's latents
*whitened* by its training frames (centred, rotated onto their principal axes and scaled to
unit variance). The ARHMM is fitted to the whitened latents and scored per step and per
whitened dimension; the decoder predicts the whitened latents and is scored by their R². Neither an AE's latent scale nor its rotation decides these scores, and per
dimension its latent count does not either: white noise scores the same at 4 latents as at
32. Both stages' models are saved in the AE's own latent coordinates (the same posteriors,
the same predictions), so they apply like any ARHMM or decoder over that AE.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bnet.config import Categorical, ProjectConfig, Range, dataclass_from_values, named_values
from bnet.data import open_session
from bnet.data.session import Session
from bnet.errors import ConfigError, DataError
from bnet.models import build_model
from bnet.models.arhmm.registered import SegmentationConfig
from bnet.models.serving import encode_session
from bnet.tracking import conventions as tags
from bnet.tracking.store import Store
from bnet.training import resolve_device
from bnet.tuning import trivial
from bnet.tuning.common import resolve_data_path, session_splits, split_settings
from bnet.tuning.families import ae as ae_family
from bnet.tuning.families import arhmm as arhmm_family
from bnet.tuning.families import decoder as decoder_family
from bnet.tuning.family import (
    LOCATION_KEYS, Family, FamilyOption, Objective, PreparedStudy, StudyRequest, TrialResult, register_family,
)
from bnet.tuning.study import StudyOutcome, TrialContext

FAMILY = "pipeline"
STAGES = ("arhmm", "decoder")
# what a trial reports of its ARHMM stage (held-out, per step and whitened dimension)
ARHMM_SCORES = tuple(f"{split}_{score}" for split in ("val", "test")
                     for score in ("ll_per_step", "ll_per_step_one_state", "ll_gain_per_step")) + (
    "n_states_used", "median_state_duration", "best_iteration")
RANK_TOLERANCE = 1e-10
"""Whitening needs latents of full rank over the training frames: an AE whose latents span
fewer dimensions (a dead latent, one latent copying another) has no whitened coordinates."""


@dataclass
class DownstreamConfig:
    """The fixed downstream stages of a pipeline study (YAML section ``downstream``). They are
    the same for every trial, so that their scores compare the AEs; tune them in their own
    studies (``bnet tune arhmm``, ``bnet tune decoder``) once the AE is chosen.

    Attributes:
        stages: ``arhmm``, ``decoder`` or ``arhmm,decoder``; ``auto``: the ARHMM, and the
            decoder too where the session holds neural activity.
        n_arhmm_states: the ARHMM's states (K).
        n_arhmm_lags: the ARHMM's autoregressive lags.
        arhmm_n_iters: EM iterations at most (the fit keeps the iteration with the best
            held-out log-likelihood, as ``bnet tune arhmm`` does).
        decoder_n_lags: frames of neural activity either side of each predicted frame.
        decoder_n_hid_layers: hidden layers of the decoder (0: a linear decoder).
        decoder_n_hid_units: units per hidden layer.
        decoder_learning_rate: Adam's learning rate.
        decoder_l2_reg: weight decay.
        decoder_max_n_epochs: epochs at most (early stopping on the val trials).
    """

    stages: str = "auto"
    n_arhmm_states: int = 4
    n_arhmm_lags: int = 1
    arhmm_n_iters: int = 50
    decoder_n_lags: int = 4
    decoder_n_hid_layers: int = 0
    decoder_n_hid_units: int = 32
    decoder_learning_rate: float = 1e-3
    decoder_l2_reg: float = 1e-4
    decoder_max_n_epochs: int = 100

    def chosen_stages(self, session: Session) -> tuple[str, ...]:
        if self.stages == "auto":
            return ("arhmm", "decoder") if "neural" in session.signals else ("arhmm",)
        chosen = tuple(s.strip() for s in self.stages.split(",") if s.strip())
        unknown = [s for s in chosen if s not in STAGES]
        if unknown or not chosen:
            raise ConfigError(f"downstream stages '{self.stages}': name arhmm, decoder or both (arhmm,decoder)")
        if "decoder" in chosen and "neural" not in session.signals:
            raise DataError(f"{session.path}: no group 'neural' for the decoder stage (stages: {self.stages})")
        return chosen

    def arhmm_hparams(self) -> dict[str, Any]:
        return {"model_class": "arhmm", "n_arhmm_states": self.n_arhmm_states, "n_arhmm_lags": self.n_arhmm_lags,
                "n_iters": self.arhmm_n_iters, "arhmm_es_tol": 1e-6, "device": "cpu"}

    def decoder_hparams(self, device: str) -> dict[str, Any]:
        return {"model_class": "neural-ae", "model_type": "mlp", "n_lags": self.decoder_n_lags,
                "n_hid_layers": self.decoder_n_hid_layers, "n_hid_units": self.decoder_n_hid_units,
                "learning_rate": self.decoder_learning_rate, "l2_reg": self.decoder_l2_reg,
                "max_n_epochs": self.decoder_max_n_epochs, "early_stop_history": 10, "device": device}


DOWNSTREAM_KEYS = frozenset(f.name for f in fields(DownstreamConfig))


@dataclass(frozen=True)
class Whitening:
    """Latents moved to coordinates of zero mean and identity covariance over the training
    frames: ``(x - mean) @ matrix``."""

    mean: np.ndarray
    matrix: np.ndarray

    @classmethod
    def fit(cls, train: list[np.ndarray], source: str) -> "Whitening":
        frames = np.concatenate(train).astype(np.float64)
        mean = frames.mean(axis=0)
        variances, axes = np.linalg.eigh(np.cov(frames - mean, rowvar=False).reshape(frames.shape[1], -1))
        if variances[0] <= RANK_TOLERANCE * variances[-1]:
            rank = int((variances > RANK_TOLERANCE * variances[-1]).sum())
            raise DataError(f"{source}: the latents span {rank} of {frames.shape[1]} dimensions over the training "
                            f"frames (dead or copied latents), so they have no whitened coordinates to score the "
                            f"downstream stages in")
        return cls(mean, axes / np.sqrt(variances))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float64) - self.mean) @ self.matrix

    @property
    def n_dims(self) -> int:
        return len(self.mean)



class PipelineTrials:
    """Fits an AE and its downstream stages per trial (the family's TrialFitter)."""

    def __init__(self, session: Session, downstream: DownstreamConfig):
        self.session = session
        self.downstream = downstream
        self.stages = downstream.chosen_stages(session)
        self.ae = ae_family.AETrials(session)

    def check(self, hparams: dict[str, Any]) -> None:
        self.ae.check(hparams)
        if "arhmm" in self.stages:
            config = dataclass_from_values(SegmentationConfig, self.downstream.arhmm_hparams(), "downstream")
            shortest = min(self.session.n_frames)
            if config.n_arhmm_lags >= shortest:
                raise DataError(f"{self.session.path}: downstream n_arhmm_lags={config.n_arhmm_lags} is not less "
                                f"than the shortest trial ({shortest} frames)")
        if "decoder" in self.stages and 2 * self.downstream.decoder_n_lags >= min(self.session.n_frames):
            raise DataError(f"{self.session.path}: downstream decoder_n_lags={self.downstream.decoder_n_lags} "
                            f"leaves no frames to score in the shortest trial ({min(self.session.n_frames)} frames)")

    def resolve(self, hparams: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        params, model_tags = self.ae.resolve(hparams)
        downstream = {f"downstream.{k}": v for k, v in named_values(self.downstream).items()}
        return {**params, **downstream, "downstream.stages": ",".join(self.stages)}, model_tags

    def metric_names(self, hparams: dict[str, Any]) -> dict[str, str]:
        names = {f"ae_{k}": v for k, v in self.ae.metric_names(hparams).items()}
        if "arhmm" in self.stages:
            names.update({f"arhmm_{split}_{k}": "maximize" for split in ("val", "test")
                          for k in ("ll_per_step", "ll_gain_per_step")})
        if "decoder" in self.stages:
            names.update({f"decoder_{split}_r2": "maximize" for split in ("val", "test")})
        return names

    def fit(self, context: TrialContext) -> TrialResult:
        hparams, session = context.hparams, self.session
        ae_result, ae_run = context.fit_stage("ae", ae_family.FAMILY, ae_family.OBJECTIVE, self.ae, hparams, {},
                                              step_name="epoch", spends_budget=True)
        metrics = {f"ae_{k}": v for k, v in ae_result.metrics.items()}
        latents = encode_session(ae_result.model, session, resolve_device(str(hparams.get("device", "auto"))))
        splits = session_splits(session, hparams)
        source = f"{session.path} (latents of AE run {ae_run})"
        whitening = Whitening.fit([latents[t] for t in splits.train], source)
        lineage = {f"{tags.UPSTREAM_TAG_PREFIX}ae_run_id": ae_run}
        if "arhmm" in self.stages:
            observations = arhmm_family.Observations({t: whitening(x) for t, x in latents.items()}, splits,
                                                     "whitened latent", split_settings(hparams))
            arhmm_family.check_observations(observations, source)
            fitter = InLatentCoordinates(arhmm_family.ARHMMTrials(observations, session, source), whitening,
                                         arhmm_in_latent_coordinates, {"observations": "latent"})
            arhmm_hparams = self.downstream.arhmm_hparams()
            fitter.check(arhmm_hparams)
            result, _ = context.fit_stage("arhmm", arhmm_family.FAMILY, arhmm_family.OBJECTIVE, fitter,
                                          arhmm_hparams, lineage, step_name="EM iteration")
            metrics.update({f"arhmm_{k}": result.metrics[k] for k in ARHMM_SCORES})
        if "decoder" in self.stages:
            metrics.update(self._decode(context, latents, splits, whitening, lineage, hparams))
        return TrialResult(metrics, None)

    def _decode(self, context: TrialContext, latents, splits, whitening: Whitening, lineage, hparams) -> dict[str, float]:
        session = self.session
        neural = dict(zip(session.trials, session.read_all("neural")))
        inputs = {t: x.astype(np.float32) for t, x in neural.items()}
        whitened, raw = (decoder_family.DecodingData(inputs, {t: transform(x).astype(np.float32) for t, x in
                                                              latents.items()}, splits, "continuous", 0, {},
                                                     split_settings(hparams))
                         for transform in (whitening, lambda x: x))
        objective = decoder_family.OBJECTIVES["continuous"]
        lags = self.downstream.decoder_n_lags
        in_latents = decoder_family.DecoderTrials(raw, session, lags, objective)
        fitter = InLatentCoordinates(
            decoder_family.DecoderTrials(whitened, session, lags, objective), whitening, decoder_in_latent_coordinates,
            export=lambda context, model: in_latents.log_artifacts(context, in_latents.predict(model, session.trials)))
        decoder_hparams = self.downstream.decoder_hparams(str(hparams.get("device", "cpu")))
        fitter.check(decoder_hparams)
        run_tags = {tags.TAG_TARGET: "ae", tags.TAG_TARGET_KIND: "continuous", tags.TAG_NEURON_SUBSET: "all", **lineage}
        result, _ = context.fit_stage("decoder", decoder_family.FAMILY, objective, fitter, decoder_hparams, run_tags,
                                      step_name="epoch")
        return {f"decoder_{split}_r2": result.metrics[f"{split}_r2"] for split in ("val", "test")}


class InLatentCoordinates:
    """A downstream stage: its family's fitter on the whitened latents (so its scores compare
    between AEs), whose model is saved in the AE's own latent coordinates by ``convert`` (so
    the stage run applies, registers and feeds later studies like any model over that AE)."""

    def __init__(self, fitter, whitening: Whitening, convert, metadata: dict[str, Any] | None = None,
                 export=None):
        self.fitter, self.whitening, self.convert = fitter, whitening, convert
        self.metadata = metadata or {}
        self.export = export  # (context, converted model): the stage's exports, redone in latent coordinates

    def check(self, hparams: dict[str, Any]) -> None:
        self.fitter.check(hparams)

    def resolve(self, hparams: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        params, model_tags = self.fitter.resolve(hparams)
        return {**params, "scored_in": "whitened latents"}, model_tags

    def metric_names(self, hparams: dict[str, Any]) -> dict[str, str]:
        return self.fitter.metric_names(hparams)

    def fit(self, context: TrialContext) -> TrialResult:
        result = self.fitter.fit(context)
        model = self.convert(result.model, self.whitening)
        if self.export is not None:
            self.export(context, model)
        return replace(result, model=model, checkpoint_metadata={**result.checkpoint_metadata, **self.metadata})


def arhmm_in_latent_coordinates(model, whitening: Whitening):
    """An ARHMM fitted to whitened latents ``z = P (x - mean)`` as the same model of the
    latents ``x``: each state's ``z_t = sum_l A_l z_{t-l} + b + e`` is ``x_t = sum_l A'_l
    x_{t-l} + b' + e'`` with ``A'_l = P^-1 A_l P``, ``b' = mean - sum_l A'_l mean + P^-1 b``
    and ``Cov e' = P^-1 Cov e P^-T``. State probabilities and transitions are unchanged, so
    both give the same posteriors; only log-likelihoods differ (by the change of variables,
    and where the first frames are scored by N(0, I) in either coordinates)."""
    state = model.state_dict()
    dtype = state["As"].dtype
    P = torch.from_numpy(whitening.matrix.T).to(torch.float64)
    P_inv = torch.linalg.inv(P)
    mean = torch.from_numpy(whitening.mean).to(torch.float64)
    D, lags = whitening.n_dims, model.config.n_arhmm_lags
    As = state["As"].to(torch.float64)
    blocks = [P_inv @ As[:, :, l * D:(l + 1) * D] @ P for l in range(lags)]
    bs = state["bs"].to(torch.float64) @ P_inv.T + mean - sum((block @ mean for block in blocks), torch.zeros_like(mean))
    moved = {**state, "As": torch.cat(blocks, dim=-1).to(dtype) if blocks else state["As"], "bs": bs.to(dtype),
             "Sigmas": (P_inv @ state["Sigmas"].to(torch.float64) @ P_inv.T).to(dtype)}
    converted = build_model(model.config)
    converted.load_state_dict(moved)
    return converted


def decoder_in_latent_coordinates(model, whitening: Whitening):
    """A decoder of whitened latents ``z = (x - mean) W`` as a decoder of the latents ``x =
    z W^-1 + mean``: its (linear) output layer's rows mixed by ``W^-1`` and its bias moved."""
    converted = build_model(model.config)
    converted.load_state_dict(model.state_dict())
    layer = converted.linears[-1] if converted.linears else converted.conv
    unwhiten = torch.linalg.inv(torch.from_numpy(whitening.matrix)).to(torch.float64)
    with torch.no_grad():
        weight = torch.tensordot(unwhiten.T, layer.weight.to(torch.float64), dims=1)
        layer.weight.copy_(weight.to(layer.weight.dtype))
        bias = layer.bias.to(torch.float64) @ unwhiten + torch.from_numpy(whitening.mean)
        layer.bias.copy_(bias.to(layer.bias.dtype))
    return converted


def objective_of(stages: tuple[str, ...]) -> Objective:
    """Reconstruction against each downstream score: the Pareto front is the answer."""
    downstream = {"arhmm": ("arhmm_val_ll_per_step", "maximize"), "decoder": ("decoder_val_r2", "maximize")}
    return Objective("ae_best_val_loss", "minimize", "", tuple(downstream[s] for s in stages))


def against_trivial(metrics) -> trivial.TrivialComparison | None:
    """Every stage of a pipeline run against its family's trivial answer: the AE against the
    mean frame, the ARHMM against one state, the decoder against a constant."""
    comparisons = []
    for stage, compare in (("ae", trivial.against_mean_frame), ("arhmm", trivial.against_one_state),
                           ("decoder", trivial.against_constant)):
        own = {k[len(stage) + 1:]: v for k, v in metrics.items() if k.startswith(f"{stage}_")}
        comparison = compare(own)
        if comparison is not None:
            comparisons.append((stage, comparison))
    if not comparisons:
        return None
    failing = [(stage, c) for stage, c in comparisons if not c.beats]
    return trivial.TrivialComparison(
        "; ".join(f"({stage}) {c.figure}" for stage, c in comparisons), not failing,
        "; ".join(f"({stage}) {c.advice}" for stage, c in failing),
        "; ".join(f"({stage}) {c.caveat}" for stage, c in comparisons if c.caveat))


def prepare(request: StudyRequest, store: Store) -> list[PreparedStudy]:
    values = request.values
    searched = sorted(k for k in DOWNSTREAM_KEYS if isinstance(values.get(k), (Categorical, Range)))
    if searched:
        raise ConfigError(f"downstream {', '.join(searched)} is searched, but the downstream stages are fixed so "
                          f"that they compare the AEs: set one value (tune them later with bnet tune arhmm/decoder)")
    downstream = dataclass_from_values(DownstreamConfig, {k: v for k, v in values.items() if k in DOWNSTREAM_KEYS},
                                       "downstream")
    session = open_session(resolve_data_path(values, request.data), require=("images",))
    ae_family.check_image_shape(session, values)
    trials = PipelineTrials(session, downstream)
    return [PreparedStudy(session, trials, objective_of(trials.stages))]


register_family(Family(
    name=FAMILY, default_space=ae_family.DEFAULT_SPACE, default_budget=ae_family.DEFAULT_BUDGET, conditions={},
    step_name="epoch", budget_key="max_n_epochs", prepare=prepare, default_model_class=lambda request: "ae",
    machinery=LOCATION_KEYS | {"export_latents", "export_train_plots", "ae_arch_json"},
    expand_fixed=ae_family.expanded_fixed, trivial=against_trivial,
    summary="Tune autoencoders for what comes after them: each trial fits an AE, then a fixed ARHMM and/or "
            "decoder on its latents (the Pareto front of reconstruction against their scores).",
    options=(FamilyOption("stages", "The downstream stages: arhmm, decoder or arhmm,decoder [default: the ARHMM, "
                                    "and the decoder where the session has neural activity].", config_key=True),),
    behavenet_configs=("data", "model", "training", "compute"),
    shown_params=("model_type", "n_ae_latents", "learning_rate", "l2_reg"),
))


def tune_pipeline(data: str | Path | None = None, experiment: str | None = None,
                  config: ProjectConfig | None = None, max_epochs: int | None = None, **options) -> StudyOutcome:
    """Run (or resume) a pipeline study; the Python face of ``bnet tune pipeline``.

    ``max_epochs`` is the AE's ``max_n_epochs``; the downstream stages are the config's
    ``downstream`` values (:class:`DownstreamConfig`); the other ``options`` are those of
    :func:`bnet.tuning.tune.tune` (``stages=`` among them).
    """
    from bnet.tuning.tune import tune

    return tune(FAMILY, data, experiment, config, max_steps=max_epochs, **options)[0]
