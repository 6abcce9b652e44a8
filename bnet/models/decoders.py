"""BehaveNet's decoders: neural activity <-> behaviour, over a window of frames or a whole trial.

Every direction (``model_class``) has the same architectures: neural activity to AE latents
(``neural-ae``), to their motion energy (``neural-ae-me``), to ARHMM states
(``neural-arhmm``) or to labels (``neural-labels``), and the encoding direction, AE latents,
ARHMM state probabilities or labels to neural activity (``ae-neural``, ``arhmm-neural``,
``labels-neural``).

``mlp`` (BehaveNet's): the first layer is a 1-D convolution over time with kernel
``2 * n_lags + 1`` and 'same' zero padding, so the output at frame t sees inputs
t - n_lags .. t + n_lags; ``n_hid_layers - 1`` linear layers follow, then the output layer.
With no hidden layers the convolution maps straight to the outputs: a linear filter.
``lstm`` (named in BehaveNet, never written there): ``n_hid_layers`` stacked LSTM layers
read the whole trial, both ways by default so frame t sees its past and its future as the
MLP's window does, then a linear readout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from itertools import pairwise

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from bnet.config import FILLED
from bnet.errors import ConfigError
from bnet.models.registry import register

MODEL_CLASSES = ("neural-ae", "neural-ae-me", "neural-arhmm", "neural-labels", "ae-neural", "arhmm-neural",
                 "labels-neural")
MODEL_TYPES = ("mlp", "mlp-mv", "lstm")
DEFAULT_N_LAGS = 4
"""The MLP's window when none is given (an LSTM has none: it reads the whole trial)."""
NOISE_DISTS = ("gaussian", "gaussian-full", "categorical", "poisson")


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


ACTIVATIONS = {
    "relu": F.relu,
    "lrelu": partial(F.leaky_relu, negative_slope=0.05),  # BehaveNet's slope
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "linear": _identity,
}

DEFAULT_NOISE_DIST = {
    "neural-ae": "gaussian",
    "neural-ae-me": "gaussian",
    "neural-arhmm": "categorical",
    "neural-labels": "gaussian",
    # BehaveNet's choice for spike counts; set "gaussian" for calcium traces.
    "ae-neural": "poisson",
    "arhmm-neural": "poisson",
    "labels-neural": "poisson",
}

POISSON_EPS = 1e-8
"""Added to rates inside the log: softplus underflows to exactly 0 for very negative inputs."""


@dataclass
class DecoderConfig:
    """A decoder (BehaveNet's decoding ``model`` config keys).

    Attributes:
        model_class: the direction, one of :data:`MODEL_CLASSES`.
        model_type: ``mlp``; ``mlp-mv``: an MLP whose Gaussian noise has a learned full
            covariance over the outputs (requires ``noise_dist`` ``gaussian-full``; the
            covariance is one for all frames, BehaveNet predicted a precision per frame); or
            ``lstm``: stacked LSTM layers over the whole trial and a linear readout.
        n_input: input dimensions (neurons, latents or states; filled from the data).
        n_output: output dimensions; for ``categorical`` noise, the number of classes.
        n_lags: the MLP's frames of context either side: the output at t sees inputs
            t-n_lags..t+n_lags. None means 4 for an MLP and 0, the only value, for an LSTM.
        n_hid_layers: hidden layers; 0 is a linear filter. For ``lstm``, the LSTM layers
            (at least 1).
        n_hid_units: units per hidden layer (0, unused, without hidden layers); for a
            bidirectional ``lstm``, per direction.
        activation: ``relu``, ``lrelu`` (slope 0.05), ``sigmoid``, ``tanh`` or ``linear``
            (the MLP's; an LSTM has its own gates).
        bidirectional: ``lstm`` only: read each trial backwards too, so frame t sees the
            frames after it as well as those before.
        l2_reg: weight decay of the optimiser.
        rng_seed_model: seed of the weight initialisation.
        noise_dist: ``gaussian`` (loss: MSE), ``gaussian-full`` (full-covariance NLL),
            ``categorical`` (cross-entropy over ``n_output`` classes) or ``poisson``
            (softplus rates, Poisson NLL). None picks :data:`DEFAULT_NOISE_DIST` of the
            model class (``gaussian-full`` for ``mlp-mv``).
        n_max_lags: frames dropped from both ends of every batch before the loss; None
            means ``n_lags``. A study over ``n_lags`` should fix it at the largest
            ``n_lags`` searched, so every trial is scored on the same frames.
        standardize_inputs: z-score each input dimension with the training trials' mean
            and spread (kept in the model's state, so predictions need raw inputs only).
            Inputs come in any units (hand velocity in m/s has a spread of ~0.05, spike
            counts of several): unscaled, small inputs barely move the first layer and a
            Poisson encoder stays at each neuron's mean rate. BehaveNet fed inputs raw.
    """

    model_class: str = "neural-ae"
    model_type: str = "mlp"
    n_input: int = field(default=1, metadata=FILLED)
    n_output: int = field(default=1, metadata=FILLED)
    n_lags: int | None = None
    n_hid_layers: int = 1
    n_hid_units: int = 32
    activation: str = "relu"
    bidirectional: bool = True
    l2_reg: float = 0.0
    rng_seed_model: int = 0
    noise_dist: str | None = None
    n_max_lags: int | None = None
    standardize_inputs: bool = True

    def __post_init__(self) -> None:
        # Resolved here so checkpoints and run params record the values actually used.
        if self.noise_dist is None:
            default = DEFAULT_NOISE_DIST.get(self.model_class)
            self.noise_dist = "gaussian-full" if self.model_type == "mlp-mv" else default
        if self.n_lags is None:
            self.n_lags = 0 if self.model_type == "lstm" else DEFAULT_N_LAGS
        if self.n_max_lags is None:
            self.n_max_lags = self.n_lags

    def validate(self) -> None:
        for name, value, known in (
            ("model_class", self.model_class, MODEL_CLASSES),
            ("model_type", self.model_type, MODEL_TYPES),
            ("noise_dist", self.noise_dist, NOISE_DISTS),
            ("activation", self.activation, tuple(ACTIVATIONS)),
        ):
            if value not in known:
                raise ConfigError(f"{name} '{value}' is not a decoder {name} (known: {', '.join(known)})")
        if (self.model_type == "mlp-mv") != (self.noise_dist == "gaussian-full"):
            raise ConfigError(
                f"model_type '{self.model_type}' with noise_dist '{self.noise_dist}': the full "
                f"covariance belongs to model_type 'mlp-mv', which needs noise_dist 'gaussian-full'"
            )
        if (self.model_class == "neural-arhmm") != (self.noise_dist == "categorical"):
            raise ConfigError(
                f"model_class '{self.model_class}' with noise_dist '{self.noise_dist}': ARHMM "
                f"states are the only categorical targets (neural-arhmm needs 'categorical')"
            )
        recurrent = self.model_type == "lstm"
        if recurrent and self.n_lags != 0:
            raise ConfigError(f"n_lags={self.n_lags} with model_type 'lstm': the LSTM reads the whole trial, "
                              f"n_lags is the MLP's window (leave it unset, or 0)")
        minimum_output = 2 if self.noise_dist == "categorical" else 1
        for name, value, minimum in (
            ("n_input", self.n_input, 1),
            ("n_output", self.n_output, minimum_output),
            ("n_lags", self.n_lags, 0),
            ("n_hid_layers" + (" (LSTM layers)" if recurrent else ""), self.n_hid_layers, 1 if recurrent else 0),
            ("n_hid_units", self.n_hid_units, 1 if self.n_hid_layers > 0 else 0),
        ):
            if value < minimum:
                raise ConfigError(f"{name} must be at least {minimum}, got {value}")
        if self.n_max_lags < self.n_lags:
            raise ConfigError(
                f"n_max_lags ({self.n_max_lags}) must be at least n_lags ({self.n_lags}), or the "
                f"loss scores frames whose window reaches into the zero padding"
            )
        if self.l2_reg < 0:
            raise ConfigError(f"l2_reg must be non-negative, got {self.l2_reg}")


class Decoder(nn.Module):
    """A decoder (MLP or LSTM, :class:`DecoderConfig`); ``noise_dist`` sets the output
    nonlinearity and the loss.

    ``forward`` returns what the loss consumes: means (``gaussian``, ``gaussian-full``),
    logits (``categorical``) or rates (``poisson``).
    """

    def __init__(self, config: DecoderConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.activation = ACTIVATIONS[config.activation]
        widths = [config.n_hid_units] * config.n_hid_layers + [config.n_output]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.rng_seed_model)
            if config.model_type == "lstm":
                self.lstm = nn.LSTM(config.n_input, config.n_hid_units, num_layers=config.n_hid_layers,
                                    batch_first=True, bidirectional=config.bidirectional)
                self.readout = nn.Linear(config.n_hid_units * (2 if config.bidirectional else 1), config.n_output)
            else:
                self.conv = nn.Conv1d(
                    config.n_input, widths[0], kernel_size=2 * config.n_lags + 1, padding=config.n_lags
                )
                self.linears = nn.ModuleList(nn.Linear(n_in, n_out) for n_in, n_out in pairwise(widths))
        self.register_buffer("input_mean", torch.zeros(config.n_input))
        self.register_buffer("input_scale", torch.ones(config.n_input))
        if config.noise_dist == "gaussian-full":
            # Cholesky factor of the precision, its diagonal stored as logs so it stays
            # positive; zeros start at unit covariance.
            self.precision_factor = nn.Parameter(torch.zeros(config.n_output, config.n_output))

    @torch.no_grad()
    def set_input_statistics(self, inputs: torch.Tensor) -> None:
        """Standardise inputs by the mean and spread of ``inputs`` ``(frames, n_input)``
        (the training frames); a constant dimension is centred only."""
        spread = inputs.std(dim=0)
        self.input_mean.copy_(inputs.mean(dim=0))
        self.input_scale.copy_(torch.where(spread > 1e-8, spread, torch.ones_like(spread)))

    @torch.no_grad()
    def start_at(self, prediction: torch.Tensor) -> None:
        """Start at the trivial answer: the output layer's weights zero and its bias the
        constant ``prediction`` (means, class probabilities or rates), so training begins at
        R² 0 rather than at random outputs on the targets' scale (a decoder of small latents
        started far below 0 and had not recovered in 40 epochs)."""
        noise = self.config.noise_dist
        prediction = prediction.to(torch.float32)
        if noise == "categorical":
            bias = torch.log(prediction)
        elif noise == "poisson":
            bias = prediction + torch.log(-torch.expm1(-prediction))  # softplus's inverse, without overflow
        else:
            bias = prediction
        layer = self.readout if self.config.model_type == "lstm" else (self.linears[-1] if self.linears else self.conv)
        layer.weight.zero_()
        layer.bias.copy_(bias)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before inputs were standardised hold no statistics: raw inputs
        for name, default in (("input_mean", self.input_mean), ("input_scale", self.input_scale)):
            state_dict.setdefault(prefix + name, torch.zeros_like(default) if name == "input_mean"
                                  else torch.ones_like(default))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """``(T, n_input)`` -> ``(T, n_output)`` (a leading batch axis of trials also works)."""
        inputs = (inputs - self.input_mean) / self.input_scale
        if self.config.model_type == "lstm":
            h = self.readout(self.lstm(inputs)[0])
        else:
            h = self.conv(inputs.transpose(-1, -2)).transpose(-1, -2)
            for linear in self.linears:
                h = linear(self.activation(h))
        return F.softplus(h) if self.config.noise_dist == "poisson" else h

    @torch.no_grad()
    def predict(self, inputs: torch.Tensor) -> torch.Tensor:
        """Means, class probabilities or rates of ``inputs`` ``(T, n_input)``."""
        outputs = self(inputs)
        return torch.softmax(outputs, dim=-1) if self.config.noise_dist == "categorical" else outputs

    def precision_cholesky(self) -> torch.Tensor:
        """Lower-triangular L with precision ``L @ L.T`` (``gaussian-full`` only)."""
        factor = self.precision_factor
        return torch.tril(factor, diagonal=-1) + torch.diag(torch.exp(torch.diagonal(factor)))

    @torch.no_grad()
    def covariance(self) -> torch.Tensor:
        """The learned ``(n_output, n_output)`` noise covariance (``gaussian-full`` only)."""
        return torch.cholesky_inverse(self.precision_cholesky())

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean negative log-likelihood of ``batch['targets']`` given ``batch['inputs']``.

        ``inputs`` is ``(T, n_input)``; ``targets`` is ``(T, n_output)``, or ``(T,)`` class
        indices for ``categorical``. The first and last ``n_max_lags`` frames are
        predicted (they are context) but not scored. Per noise: ``gaussian`` the mean
        squared error (BehaveNet's loss: unit-variance NLL up to scale and a constant);
        ``gaussian-full`` the exact NLL per frame; ``categorical`` the cross-entropy per
        frame; ``poisson`` the exact NLL per frame and dimension.
        """
        inputs, targets = batch["inputs"], batch["targets"]
        n_frames, n_max_lags = inputs.shape[0], self.config.n_max_lags
        if n_frames <= 2 * n_max_lags:
            raise ConfigError(
                f"a batch of {n_frames} frames has none left once n_max_lags={n_max_lags} frames "
                f"are dropped at each end; use longer batches or fewer lags"
            )
        scored = slice(n_max_lags, n_frames - n_max_lags)
        # float32 whatever the autocast precision: the NLLs are sums of logs and squares.
        outputs = self(inputs)[scored].float()
        targets = targets[scored]
        noise = self.config.noise_dist
        if noise == "gaussian":
            return F.mse_loss(outputs, targets.float())
        if noise == "categorical":
            # Datasets serve every signal as float; states are whole numbers.
            return F.cross_entropy(outputs, targets.long())
        if noise == "poisson":
            targets = targets.float()
            return (outputs - targets * torch.log(outputs + POISSON_EPS) + torch.lgamma(targets + 1)).mean()
        return self._full_gaussian_nll(outputs, targets.float())

    def _full_gaussian_nll(self, means: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        cholesky = self.precision_cholesky()
        whitened = (targets - means) @ cholesky  # rows are L.T @ (y - mu)
        log_det_precision = 2.0 * torch.diagonal(self.precision_factor).sum()
        n_output = self.config.n_output
        per_frame = 0.5 * (whitened**2).sum(-1) - 0.5 * log_det_precision + 0.5 * n_output * math.log(2 * math.pi)
        return per_frame.mean()


for _model_class in MODEL_CLASSES:
    register(_model_class, family="decoder", config_type=DecoderConfig)(Decoder)


def motion_energy(latents: np.ndarray) -> np.ndarray:
    """BehaveNet's motion energy of ``(T, D)`` latents: ``|x_t - x_{t-1}|``, frame 0 is 0.

    The targets of ``neural-ae-me``; compute it per trial, so no difference spans two trials.
    """
    latents = np.asarray(latents)
    energy = np.zeros_like(latents)
    energy[1:] = np.abs(np.diff(latents, axis=0))
    return energy
