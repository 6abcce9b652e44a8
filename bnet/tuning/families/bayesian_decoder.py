"""`bnet tune bayesian-decoder`: Bayesian decoding of AE latents and ARHMM states from neural
activity (:mod:`bnet.models.bayesian_decoding`), tuned and tracked like every family.

A study reads three tracked runs fitted to one session and one AE: an ARHMM of the AE's
latents (``--arhmm``), a decoder of those latents (``--decoder``, target ``ae``) and a decoder
of the ARHMM's states (``--state-decoder``, target ``arhmm``); each defaults to ``best`` of its
experiment, and a set that does not fit together is refused. A trial fits nothing by gradient:
it combines them with its prior scale c and number of sampled state paths S, and is scored on
the validation trials' latent MSE. Every trial logs, per held-out split, the latents' R^2 and
MSE, the frames' MSE through the AE's decoder and the states' accuracy against the ARHMM's own
Viterbi states, each beside the direct decoders' and the trivial answer's (the training mean
latents, the most common training state), with the share of clamped pseudo-observations and the
coverage of its 90% intervals.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bnet.config import Categorical, ProjectConfig, Range, dataclass_from_values
from bnet.data import open_session
from bnet.data.exports import write_export
from bnet.data.session import Session, trial_name
from bnet.data.splits import TrialSplits
from bnet.errors import ConfigError, DataError
from bnet.models.bayesian_decoding import ARHMMPrior, BayesianDecoder, BayesianDecoderConfig
from bnet.models.decoder_metrics import r2_score, trim_lags
from bnet.models.serving import FRAMES_PER_CHUNK, reads_labels
from bnet.plotting.decoders import INTERVAL_90, plot_posterior_latents, plot_state_rasters
from bnet.tracking import conventions as tags
from bnet.tracking.query import RunSummary
from bnet.tracking.registry import load_model
from bnet.tracking.store import Store
from bnet.tuning.common import resolve_data_path, upstream_export, upstream_run
from bnet.tuning.family import (
    LOCATION_KEYS, Family, FamilyOption, Objective, PreparedStudy, StudyRequest, TrialResult, register_family,
)
from bnet.tuning.study import StudyOutcome, TrialContext
from bnet.tuning.trivial import TrivialComparison

FAMILY = "bayesian-decoder"
OBJECTIVE = Objective(metric="val_latent_mse", direction="minimize", step_metric="")
DEFAULT_SPACE = {"prior_scale": Range(1.0, 1e6, log=True), "n_posterior_samples": Categorical((4, 8, 16))}
DEFAULT_BUDGET: dict[str, Any] = {}
MAX_CLAMPED = 0.5
"""A trial warns above this share of clamped pseudo-observations: the scaled prior is then
narrower than the decoder almost everywhere, so the decoder's information is discarded."""


@dataclass
class Upstream:
    """What a study combines, read once: the models, the session's latents, states and inputs."""

    arhmm: RunSummary
    decoder: RunSummary
    state_decoder: RunSummary
    latents: dict[int, np.ndarray]
    states: dict[int, np.ndarray]
    inputs: dict[int, np.ndarray]
    splits: TrialSplits
    n_max_lags: int
    models: dict[str, Any]


def read_upstream(session: Session, refs: dict[str, tuple[str | None, str | None]], store: Store) -> Upstream:
    """Resolve and check the three runs; read the latents, the ARHMM's states and the inputs."""
    from bnet.apply.sessions import decoder_inputs

    for name in ("arhmm", "decoder", "state_decoder"):
        reference, experiment = refs.get(name, (None, None))
        if reference in (None, "best") and not experiment:
            flag = name.replace("_", "-")
            raise ConfigError(f"--{flag} best needs --{flag}-experiment NAME (or name the run with --{flag})")
    arhmm = upstream_run("arhmm", *refs.get("arhmm", (None, None)), session, store)
    decoder = upstream_run("decoder", *refs.get("decoder", (None, None)), session, store)
    state_decoder = upstream_run("decoder", *refs.get("state_decoder", (None, None)), session, store)
    for run, flag, target in ((decoder, "--decoder", "ae"), (state_decoder, "--state-decoder", "arhmm")):
        if run.tags.get(tags.TAG_TARGET) != target:
            raise ConfigError(f"{flag} resolves to decoder run {run.run_id}, which decodes "
                              f"{run.tags.get(tags.TAG_TARGET)}, not {'AE latents' if target == 'ae' else 'ARHMM states'}"
                              f" (name its experiment with {flag}-experiment, or the run)")
    ae_id = arhmm.tags.get(f"{tags.UPSTREAM_TAG_PREFIX}ae_run_id")
    if not ae_id:
        raise ConfigError(f"ARHMM run {arhmm.run_id} segments labels: the Bayesian decoder needs an ARHMM of AE latents")
    if decoder.tags.get(f"{tags.UPSTREAM_TAG_PREFIX}ae_run_id") != ae_id:
        raise ConfigError(f"decoder run {decoder.run_id} decodes the latents of AE run "
                          f"{decoder.tags.get(f'{tags.UPSTREAM_TAG_PREFIX}ae_run_id')}, but ARHMM run {arhmm.run_id} "
                          f"segments those of AE run {ae_id}: all three must be fitted on one AE")
    if state_decoder.tags.get(f"{tags.UPSTREAM_TAG_PREFIX}arhmm_run_id") != arhmm.run_id:
        raise ConfigError(f"state decoder run {state_decoder.run_id} decodes the states of ARHMM run "
                          f"{state_decoder.tags.get(f'{tags.UPSTREAM_TAG_PREFIX}arhmm_run_id')}, not of "
                          f"{arhmm.run_id}")
    ae = upstream_run("ae", ae_id, None, session, store)
    if ae.tags.get(tags.TAG_N_SESSIONS, "1") != "1":
        raise ConfigError(f"AE run {ae.run_id} was fitted to several sessions: the Bayesian decoder draws frames "
                          f"through one session's AE")
    latents = upstream_export(ae, "latents", "latents", session, store)
    states = upstream_export(arhmm, "states", "states", session, store)
    if latents is None or states is None:
        raise DataError(f"AE run {ae.run_id} or ARHMM run {arhmm.run_id} exported no latents or states to combine")
    if states[1] != latents[1]:
        raise ConfigError(f"ARHMM run {arhmm.run_id} split {session.path}'s trials otherwise than AE run {ae.run_id}")
    if not latents[1].val or not latents[1].test:
        raise DataError(f"{session.path}: the splits of AE run {ae.run_id} hold no validation or no test trials "
                        f"(the decoder's error variance and the scores need both)")
    models = [load_model(run.run_id, store) for run in (decoder, state_decoder)]
    inputs = [decoder_inputs(model, run, session, store) for model, run in zip(models, (decoder, state_decoder))]
    if any(not np.array_equal(inputs[0][t], inputs[1][t]) for t in session.trials):
        raise ConfigError(f"decoder runs {decoder.run_id} and {state_decoder.run_id} read different neurons: the "
                          f"Bayesian decoder combines decoders of the same activity")
    ae_model = load_model(ae.run_id, store)
    if reads_labels(ae_model):
        raise ConfigError(f"AE run {ae.run_id} ({ae_model.config.model_class}) draws frames from labels too: the "
                          f"Bayesian decoder draws them from latents alone")
    n_max_lags = max(int(run.params.get("n_max_lags") or 0) for run in (decoder, state_decoder))
    return Upstream(arhmm, decoder, state_decoder, latents[0], states[0], inputs[0], latents[1], n_max_lags,
                    {"decoder": models[0], "state_decoder": models[1], "ae": ae_model,
                     "arhmm": load_model(arhmm.run_id, store)})


class BayesianTrials:
    """Combines the upstream models once per trial (the family's TrialFitter)."""

    def __init__(self, upstream: Upstream, session: Session):
        self.upstream = upstream
        self.models = upstream.models
        lags = upstream.n_max_lags
        train = np.concatenate(trim_lags([upstream.latents[t] for t in upstream.splits.train], lags))
        self.train_mean = train.mean(0)
        self.prior = ARHMMPrior.from_engine(self.models["arhmm"].engine, torch.from_numpy(self.train_mean),
                                            torch.from_numpy(np.atleast_2d(np.cov(train.T))))
        with torch.no_grad():
            self.direct = {t: self.models["decoder"].eval().predict(torch.from_numpy(x)).double().numpy()
                           for t, x in upstream.inputs.items()}
            self.direct_state_probs = {t: self.models["state_decoder"].eval().predict(torch.from_numpy(x)).numpy()
                                       for t, x in upstream.inputs.items()}
        self.direct_states = {t: p.argmax(-1) for t, p in self.direct_state_probs.items()}
        # the decoder's Gaussian, from its errors on trials it was not fitted to (its training
        # errors are smaller than its errors anywhere else); its bias counts as error
        errors = np.concatenate(trim_lags([upstream.latents[t] - self.direct[t] for t in upstream.splits.val], lags))
        self.error_var = torch.from_numpy((errors ** 2).mean(0))
        counts = np.bincount(np.concatenate([upstream.states[t] for t in upstream.splits.train]),
                             minlength=self.models["arhmm"].config.n_arhmm_states)
        self.common_state = int(counts.argmax())
        # what every trial compares with: the held-out frames and the direct decoder's drawing of them
        self.held_out = [t for split in ("val", "test") for t in upstream.splits[split]]
        self.frames = {t: session.read("images", t) for t in self.held_out}
        self.direct_frame_errors = {t: self._frame_errors(t, self.direct[t]) for t in self.held_out}

    @torch.no_grad()
    def _frame_errors(self, trial: int, latents: np.ndarray) -> np.ndarray:
        """Per-frame MSE of the frames the AE's decoder draws from ``latents``, decoder lags trimmed."""
        ae, frames = self.models["ae"].eval(), self.frames[trial]
        errors = []
        for start in range(0, len(frames), FRAMES_PER_CHUNK):
            stop = start + FRAMES_PER_CHUNK
            drawn = ae.decode(torch.from_numpy(np.ascontiguousarray(latents[start:stop], np.float32)))
            original = torch.from_numpy(frames[start:stop]).float() / 255
            errors.append(((drawn.float() - original) ** 2).flatten(1).mean(1).numpy())
        lags = self.upstream.n_max_lags
        return np.concatenate(errors)[lags:len(frames) - lags]

    def config(self, hparams: dict[str, Any]) -> BayesianDecoderConfig:
        arhmm = self.models["arhmm"].config
        config = dataclass_from_values(BayesianDecoderConfig, {
            **hparams, "model_class": FAMILY, "latent_decoder": asdict(self.models["decoder"].config),
            "state_decoder": asdict(self.models["state_decoder"].config), "n_states": arhmm.n_arhmm_states,
            "n_dims": self.prior.dynamics.n_dims, "n_lags": arhmm.n_arhmm_lags})
        config.validate()
        return config

    def check(self, hparams: dict[str, Any]) -> None:
        self.config(hparams)

    def metric_names(self, hparams: dict[str, Any]) -> dict[str, str]:
        names = {"clamped_fraction": "minimize"}
        for split in ("val", "test"):
            names.update({f"{split}_latent_mse": "minimize", f"{split}_latent_r2": "maximize",
                          f"{split}_frame_mse": "minimize", f"{split}_state_accuracy": "maximize",
                          f"{split}_coverage_90": "maximize"})
        return names

    def resolve(self, hparams: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        config = self.config(hparams)
        params = {k: v for k, v in asdict(config).items() if k not in ("latent_decoder", "state_decoder")}
        params.update({"n_max_lags": self.upstream.n_max_lags,
                       **{f"n_{k}_trials": len(v) for k, v in self.upstream.splits.as_dict().items()}})
        return params, {tags.TAG_MODEL_CLASS: FAMILY, tags.TAG_MODEL_TYPE: config.method}

    def model(self, config: BayesianDecoderConfig) -> BayesianDecoder:
        model = BayesianDecoder(config)
        model.latent_decoder.load_state_dict(self.models["decoder"].state_dict())
        model.state_decoder.load_state_dict(self.models["state_decoder"].state_dict())
        model.set_prior(self.prior, self.error_var)
        return model.eval()

    def fit(self, context: TrialContext) -> TrialResult:
        config = self.config(context.hparams)
        model = self.model(config)
        up = self.upstream
        shown = self.held_out
        # the decoders' own answers do not change between trials: computed once, in __init__
        direct = [(torch.from_numpy(self.direct[t]), torch.from_numpy(self.direct_state_probs[t]).double())
                  for t in shown]
        posteriors = dict(zip(shown, model.posterior([torch.from_numpy(up.inputs[t]) for t in shown], keys=shown,
                                                     direct=direct)))
        context.report(config.n_posterior_samples, {}, config.n_posterior_samples)
        metrics: dict[str, float] = {}
        for split in ("val", "test"):
            metrics.update(self.scores(split, posteriors))
        lengths = [len(up.inputs[t]) for t in up.splits.val]
        clamped = [float(posteriors[t].clamped_fraction) for t in up.splits.val]
        metrics["clamped_fraction"] = float(np.average(clamped, weights=lengths))
        if metrics["clamped_fraction"] > MAX_CLAMPED:
            context.echo(f"  warning: prior_scale {config.prior_scale:.3g} clamps {100 * metrics['clamped_fraction']:.0f}% "
                         f"of the latent decoder's variances (the prior is wider than the decoder there): a larger "
                         f"scale lets the decoder speak")
        self._log_artifacts(context, shown, posteriors)
        return TrialResult(metrics, model)

    def scores(self, split: str, posteriors) -> dict[str, float]:
        """Latent, frame and state scores of the Bayesian and direct decoders and the trivial answer."""
        up, lags = self.upstream, self.upstream.n_max_lags
        trials = list(up.splits[split])

        def pooled(per_trial):
            return np.concatenate(trim_lags(per_trial, lags))

        truth = pooled([up.latents[t] for t in trials])
        bayes = pooled([posteriors[t].mean.numpy() for t in trials])
        spread = pooled([posteriors[t].spread.numpy() for t in trials])

        def latent_scores(estimate, name):
            return {f"{split}_{name}latent_mse": float(((truth - estimate) ** 2).mean()),
                    f"{split}_{name}latent_r2": float(r2_score(truth, estimate)[0])}

        scores = {**latent_scores(bayes, ""), **latent_scores(pooled([self.direct[t] for t in trials]), "direct_"),
                  f"{split}_mean_latent_mse": float(((truth - self.train_mean) ** 2).mean()),
                  f"{split}_coverage_90": float((np.abs(truth - bayes) <= INTERVAL_90 * spread).mean())}
        true_states = pooled([up.states[t] for t in trials])
        viterbi = pooled([posteriors[t].viterbi.numpy() for t in trials])
        argmax = pooled([self.direct_states[t] for t in trials])
        scores.update({f"{split}_state_accuracy": float((viterbi == true_states).mean()),
                       f"{split}_direct_state_accuracy": float((argmax == true_states).mean()),
                       f"{split}_common_state_accuracy": float((true_states == self.common_state).mean()),
                       f"{split}_frame_mse": float(np.concatenate(
                           [self._frame_errors(t, posteriors[t].mean.numpy()) for t in trials]).mean()),
                       f"{split}_direct_frame_mse": float(np.concatenate(
                           [self.direct_frame_errors[t] for t in trials]).mean())})
        return scores

    def _log_artifacts(self, context: TrialContext, shown: list[int], posteriors) -> None:
        up = self.upstream
        groups = {"means": {}, "spreads": {}, "samples": {}, "probs": {}, "viterbi": {}, "direct": {},
                  "direct_probs": {}}
        for t in shown:
            p = posteriors[t]
            for name, value in (("means", p.mean), ("spreads", p.spread), ("samples", p.samples),
                                ("probs", p.state_probabilities), ("viterbi", p.viterbi)):
                groups[name][t] = value.numpy().astype(np.int64 if name == "viterbi" else np.float32)
            groups["direct"][t] = self.direct[t].astype(np.float32)
            groups["direct_probs"][t] = self.direct_state_probs[t].astype(np.float32)
        with tempfile.TemporaryDirectory() as tmp:
            path = write_export(Path(tmp) / "posterior.hdf5", groups, up.splits, {"run_id": context.run.run_id})
            context.run.log_file(path, tags.EXPORTS_DIR)
        examples = list(up.splits.test[:2])
        context.run.log_figure(plot_posterior_latents(
            [up.latents[t] for t in examples], [self.direct[t] for t in examples],
            [posteriors[t].mean.numpy() for t in examples], [posteriors[t].spread.numpy() for t in examples],
            [f"held-out {trial_name(t)}" for t in examples]), "posterior_latents")
        context.run.log_figure(plot_state_rasters(
            [{"ARHMM (true latents)": up.states[t], "state decoder": self.direct_states[t],
              "Bayesian Viterbi": posteriors[t].viterbi.numpy()} for t in examples],
            [f"held-out {trial_name(t)}" for t in examples], self.models["arhmm"].config.n_arhmm_states),
            "posterior_states")


def against_mean_latents(metrics) -> TrivialComparison | None:
    """A Bayesian decoder run against the training mean latents (and the most common state),
    beside the direct decoders it combines."""
    if "val_latent_mse" not in metrics or "val_mean_latent_mse" not in metrics:
        return None
    figure = (f"predicts held-out latents with R² {metrics['val_latent_r2']:.3f} (the direct decoder "
              f"{metrics['val_direct_latent_r2']:.3f}, the training mean 0) and states with accuracy "
              f"{metrics['val_state_accuracy']:.3f} (the state decoder {metrics['val_direct_state_accuracy']:.3f}, "
              f"the most common state {metrics['val_common_state_accuracy']:.3f})")
    caveat = ("it is no better than the direct decoder it starts from: the neural signal is strong or the "
              "ARHMM's dynamics weak" if metrics["val_latent_mse"] >= metrics["val_direct_latent_mse"] else "")
    return TrivialComparison(figure, metrics["val_latent_mse"] < metrics["val_mean_latent_mse"], (
        "the latents are predicted no better than by their training mean: check the decoders and the ARHMM"), caveat)


def prepare(request: StudyRequest, store: Store) -> list[PreparedStudy]:
    session = open_session(resolve_data_path(request.values, request.data), require=("images", "neural"))
    upstream = read_upstream(session, request.upstream, store)
    run_tags = {f"{tags.UPSTREAM_TAG_PREFIX}{name}_run_id": getattr(upstream, name).run_id
                for name in ("arhmm", "decoder", "state_decoder")}
    return [PreparedStudy(session, BayesianTrials(upstream, session), OBJECTIVE, run_tags)]


register_family(Family(
    name=FAMILY, default_space=DEFAULT_SPACE, default_budget=DEFAULT_BUDGET, conditions={},
    step_name="sample", budget_key="n_posterior_samples", prepare=prepare,
    default_model_class=lambda request: FAMILY, machinery=LOCATION_KEYS,
    trivial=against_mean_latents,
    summary="Tune Bayesian decoders: an ARHMM prior combined with decoders of AE latents and of ARHMM states.",
    upstream=("arhmm", "decoder", "state_decoder"), behavenet_configs=(), budget_flag="samples",
    options=(FamilyOption("method", "Inference: sampled state paths then the smoother, or Gibbs sampling over "
                                    "states and latents (slower; a cross-check) [default sample].",
                          choices=("sample", "gibbs"), config_key=True),),
    default_device="cpu", shown_params=("prior_scale", "n_posterior_samples"),
))


def tune_bayesian_decoder(data: str | Path | None = None, experiment: str | None = None,
                          config: ProjectConfig | None = None, **options) -> StudyOutcome:
    """Run (or resume) a Bayesian decoder study; the Python face of ``bnet tune bayesian-decoder``
    (``arhmm``, ``decoder``, ``state_decoder`` and their ``*_experiment`` name the runs)."""
    from bnet.tuning.tune import tune

    return tune(FAMILY, data, experiment, config, **options)[0]
