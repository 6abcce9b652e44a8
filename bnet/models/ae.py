"""The autoencoder family's common parts: its config, the conv and linear architectures,
and the plain autoencoder (``ae``) every other class of the family extends.

The conv architecture defaults to BehaveNet's paper default: five conv layers of
32-64-128-256-512 channels, kernel 5, strides 2-2-2-2-5 with TensorFlow-style 'same' zero
padding and LeakyReLU(0.05), a linear layer to the latents, and the mirror-image decoder of
transposed convolutions ending in a sigmoid (1x128x128 -> 8,758,285 parameters at 12
latents), He-initialised. Other depths, widths and kernels come from an ``ae_arch_json``
file or from the searchable ``ae_n_conv_layers`` / ``ae_first_channels`` /
``ae_kernel_size`` (:mod:`bnet.models.ae_arch`).

A model of the family computes its loss as named terms (:meth:`AutoEncoder.loss_terms`,
``loss`` the total), which the training loop averages per epoch and the trials log.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from bnet.config import FILLED
from bnet.errors import ConfigError
from bnet.models.ae_losses import label_mask, masked_mse
from bnet.models.registry import register

CONV_CHANNELS = (32, 64, 128, 256, 512)
CONV_STRIDES = (2, 2, 2, 2, 5)
CONV_KERNELS = (5, 5, 5, 5, 5)
LEAKY_SLOPE = 0.05


@dataclass
class AEConfig:
    """A model of the autoencoder family: what every class of it takes (BehaveNet's
    ``model`` config keys). A class with hyperparameters of its own declares them in a
    subclass registered with it (:class:`bnet.models.vae.VAEConfig` ...); the ``model``
    section of a config accepts every registered class's keys.

    Attributes:
        model_class: ``ae``, ``vae``, ``beta-tcvae``, ``cond-ae``, ``cond-vae``,
            ``cond-ae-msp``, ``ps-vae``, ``msps-vae`` or ``labels-images``.
        model_type: ``conv`` or ``linear``.
        n_ae_latents: latent dimensions; for ``ps-vae`` and ``msps-vae`` the unsupervised
            ones (the model adds one supervised latent per label and ``n_background``).
        n_input_channels, y_pixels, x_pixels: frame shape (filled from the data).
        n_labels: label dimensions (filled from the data for classes that read labels).
        n_sessions: sessions the model is fitted to (filled from the data).
        fit_sess_io_layers: one first encoder layer and one last decoder layer per session,
            the rest shared (sessions filmed with different cameras or lighting).
        conv_channels, conv_kernels, conv_strides: the encoder's conv layers (the decoder
            mirrors them); set from ``ae_arch_json`` or the architecture search keys.
        l2_reg: weight decay of the optimiser.
        rng_seed_model: seed of the weight initialisation.

    A field whose metadata has ``minimum`` is checked against it by :meth:`validate`; one
    whose metadata has ``key`` is that hyperparameter (BehaveNet's dotted names:
    ``vae.beta`` is the field ``vae_beta``).
    """

    model_class: str = "ae"
    model_type: str = "conv"
    n_ae_latents: int = field(default=12, metadata={"minimum": 1})
    n_input_channels: int = 1
    y_pixels: int = 64
    x_pixels: int = 64
    n_labels: int = field(default=0, metadata=FILLED)
    n_sessions: int = field(default=1, metadata=FILLED)
    fit_sess_io_layers: bool = False
    conv_channels: tuple = field(default=CONV_CHANNELS, metadata=FILLED)
    conv_kernels: tuple = field(default=CONV_KERNELS, metadata=FILLED)
    conv_strides: tuple = field(default=CONV_STRIDES, metadata=FILLED)
    l2_reg: float = field(default=0.0, metadata={"minimum": 0})
    rng_seed_model: int = 0

    def validate(self) -> None:
        if self.model_type not in AE_ARCHITECTURES:
            raise ConfigError(
                f"model_type '{self.model_type}' is not an autoencoder type "
                f"(known: {', '.join(AE_ARCHITECTURES)})"
            )
        for f in fields(self):
            minimum = f.metadata.get("minimum")
            if minimum is not None and getattr(self, f.name) < minimum:
                word = "non-negative" if minimum == 0 else f"at least {minimum}"
                raise ConfigError(f"{f.metadata.get('key', f.name)} must be {word}, got {getattr(self, f.name)}")
        layers = (len(self.conv_channels), len(self.conv_kernels), len(self.conv_strides))
        if len(set(layers)) != 1 or layers[0] < 1:
            raise ConfigError(f"the conv architecture needs as many channels, kernels and strides, at least one "
                              f"layer each (got {layers[0]}, {layers[1]}, {layers[2]})")


@dataclass
class LabelReadingConfig(AEConfig):
    """A class that reads the session's labels (conditional classes, ``cond-ae-msp``, the PS-VAEs).

    Attributes:
        conditional_encoder: the encoder reads the labels too, beside the frame.
    """

    conditional_encoder: bool = False


def loss_weight(key: str, default: float = 1.0) -> Any:
    """A non-negative loss weight field named ``key`` in configs (BehaveNet's dotted name)."""
    return field(default=default, metadata={"key": key, "minimum": 0})


def anneal_epochs(key: str) -> Any:
    """Epochs over which a loss weight rises from 0 (0: none), named ``key`` in configs."""
    return field(default=0, metadata={"key": key, "minimum": 0})


def same_padding(size: int, stride: int, kernel: int) -> tuple[int, int, int]:
    """Output size and (before, after) zero padding of TensorFlow's 'same' convolution."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return out, total // 2, total - total // 2


def patch_conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """A conv whose stride equals its kernel, as one matrix product over patches.

    Non-overlapping patches make the convolution a GEMM; computing it as one avoids conv
    kernels that are slow for tiny outputs (BehaveNet's last layer: 1x1 or 2x2 outputs).
    ``x`` must be padded to a multiple of the kernel.
    """
    k = conv.kernel_size[0]
    batch, channels, height, width = x.shape
    patches = x.reshape(batch, channels, height // k, k, width // k, k).permute(0, 2, 4, 1, 3, 5)
    out = F.linear(patches.reshape(-1, channels * k * k), conv.weight.flatten(1), conv.bias)
    return out.view(batch, height // k, width // k, -1).permute(0, 3, 1, 2)


def patch_conv_transpose(x: torch.Tensor, conv: nn.ConvTranspose2d) -> torch.Tensor:
    """The transposed :func:`patch_conv`: each input pixel paints its own k x k patch
    (returned in channels-last layout, as the next conv reads it)."""
    k = conv.kernel_size[0]
    batch, channels, height, width = x.shape
    out_channels = conv.weight.shape[1]
    patches = x.permute(0, 2, 3, 1).reshape(-1, channels) @ conv.weight.flatten(1)
    patches = patches.view(batch, height, width, out_channels, k, k).permute(0, 1, 4, 2, 5, 3)
    out = patches.reshape(batch, height * k, width * k, out_channels).permute(0, 3, 1, 2)
    return out + conv.bias.view(1, -1, 1, 1)


def per_session(layers: nn.ModuleList, x: torch.Tensor, session: torch.Tensor | None, run) -> torch.Tensor:
    """``run(layers[s], x)`` with each frame's own session's layer (one layer: all frames)."""
    if len(layers) == 1 or session is None:
        return run(layers[0], x)
    present = torch.unique(session)
    if present.numel() == 1:
        return run(layers[int(present)], x)
    parts = {int(s): run(layers[int(s)], x[session == s]) for s in present}
    # the layers' output dtype, not the input's: under bf16 autocast a float32 frame comes
    # out of its session's conv or linear layer in bfloat16
    first = next(iter(parts.values()))
    out = first.new_empty((x.shape[0], *first.shape[1:]))
    for s, part in parts.items():
        out[session == s] = part.to(out.dtype)
    return out


class ConvCoder(nn.Module):
    """A conv encoder (conv layers with 'same' padding, then a linear layer) and its
    mirror-image decoder (a linear layer, then transposed convolutions).

    Args:
        config: the architecture (``conv_*``), frame shape and session count.
        n_outputs: encoder outputs (latents, or means and log-variances); 0 builds the
            decoder alone.
        n_extra_inputs: values appended to the encoder's flattened features (labels of a
            conditional encoder).
        n_decoder_inputs: decoder inputs (latents, plus labels for conditional decoders).

    Attributes:
        patch_gemm: compute layers whose stride equals their kernel as one GEMM (same
            parameters, same result); False runs torch's conv kernels for every layer,
            exactly BehaveNet's ops (benchmarks compare the two).
    """

    def __init__(self, config: AEConfig, n_outputs: int, n_extra_inputs: int, n_decoder_inputs: int):
        super().__init__()
        self.patch_gemm = True
        self.pads: list[tuple[int, int, int, int]] = []
        self.sizes: list[tuple[int, int]] = [(config.y_pixels, config.x_pixels)]
        channels = tuple(int(c) for c in config.conv_channels)
        kernels = tuple(int(k) for k in config.conv_kernels)
        strides = tuple(int(s) for s in config.conv_strides)
        n_io = config.n_sessions if config.fit_sess_io_layers else 1
        in_channels = (config.n_input_channels,) + channels[:-1]
        for kernel, stride in zip(kernels, strides):
            y, x = self.sizes[-1]
            y_out, top, bottom = same_padding(y, stride, kernel)
            x_out, left, right = same_padding(x, stride, kernel)
            self.pads.append((left, right, top, bottom))
            self.sizes.append((y_out, x_out))
        y, x = self.sizes[-1]
        self.bottleneck = (channels[-1], y, x)
        flat = channels[-1] * y * x
        if n_outputs:
            self.first_convs = nn.ModuleList(nn.Conv2d(in_channels[0], channels[0], kernels[0], strides[0])
                                             for _ in range(n_io))
            self.encoder_convs = nn.ModuleList(nn.Conv2d(in_channels[i], channels[i], kernels[i], strides[i])
                                               for i in range(1, len(channels)))
            self.to_latents = nn.Linear(flat + n_extra_inputs, n_outputs)
        self.from_latents = nn.Linear(n_decoder_inputs, flat)
        self.decoder_convs = nn.ModuleList(
            nn.ConvTranspose2d(channels[i], in_channels[i], kernels[i], strides[i])
            for i in reversed(range(1, len(channels)))
        )
        self.last_convs = nn.ModuleList(nn.ConvTranspose2d(channels[0], in_channels[0], kernels[0], strides[0])
                                        for _ in range(n_io))
        # A per-pixel offset before the sigmoid, set to the training mean frame's logit when a fit
        # starts (start_at): the decoder then learns what differs from the mean frame. Without it
        # (BehaveNet's decoder, all zeros) an open-field video's AE sat on a plateau worse than the
        # mean frame for 60 epochs (variance explained -0.33, the dark frame's pixels saturating the
        # sigmoid); started at the mean frame it explained 0.52 after 40.
        self.frame_logits = nn.Parameter(torch.zeros(n_io, config.n_input_channels, config.y_pixels, config.x_pixels))
        self._register_load_state_dict_pre_hook(_zero_frame_logits_if_absent, with_module=True)
        for layer in self.modules():
            if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                # He initialisation for LeakyReLU: torch's default (BehaveNet's) shrinks the
                # signal layer by layer, and the demo's AE sat on the mean-image plateau
                # (val MSE 0.021) for 8 epochs in 4 of 4 fits; He-initialised, 0.008 by epoch 2.
                nn.init.kaiming_normal_(layer.weight, a=LEAKY_SLOPE, nonlinearity="leaky_relu")
                nn.init.zeros_(layer.bias)
            if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
                layer.computed_as_gemm = layer.stride == layer.kernel_size

    def _run_layer(self, conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.patch_gemm and conv.computed_as_gemm:
            return patch_conv_transpose(x, conv) if isinstance(conv, nn.ConvTranspose2d) else patch_conv(x, conv)
        return conv(x)

    def encode(self, images: torch.Tensor, session: torch.Tensor | None = None,
               extra: torch.Tensor | None = None) -> torch.Tensor:
        h = F.leaky_relu(per_session(self.first_convs, F.pad(images, self.pads[0]), session, self._run_layer),
                         LEAKY_SLOPE)
        for conv, pad in zip(self.encoder_convs, self.pads[1:]):
            h = F.leaky_relu(self._run_layer(conv, F.pad(h, pad)), LEAKY_SLOPE)
        h = h.flatten(1)
        return self.to_latents(h if extra is None else torch.cat([h, extra.to(h.dtype)], 1))

    def _crop(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        # The transposed conv is the adjoint of the padded conv: crop the same padding.
        left, _, top, _ = self.pads[layer]
        y, x = self.sizes[layer]
        return h[:, :, top : top + y, left : left + x]

    def decode(self, inputs: torch.Tensor, session: torch.Tensor | None = None) -> torch.Tensor:
        h = F.leaky_relu(self.from_latents(inputs), LEAKY_SLOPE)
        h = h.view(-1, *self.bottleneck)
        n_layers = len(self.decoder_convs) + 1
        for i, conv in enumerate(self.decoder_convs):
            h = F.leaky_relu(self._crop(self._run_layer(conv, h), n_layers - 1 - i), LEAKY_SLOPE)
        out = self._crop(per_session(self.last_convs, h, session, self._run_layer), 0)
        offset = self.frame_logits[0] if session is None or len(self.frame_logits) == 1 else self.frame_logits[session]
        return torch.sigmoid(out + offset)

    @torch.no_grad()
    def start_at(self, mean_frames: torch.Tensor) -> None:
        """Offset the output by each session's mean frame ``(n_sessions, C, Y, X)`` in [0, 1]
        (their mean where the sessions share the last layer)."""
        means = mean_frames if len(self.frame_logits) == len(mean_frames) else mean_frames.mean(0, keepdim=True)
        self.frame_logits.copy_(torch.logit(means.clamp(1e-3, 1 - 1e-3)))


def _zero_frame_logits_if_absent(coder: "ConvCoder", state_dict, prefix, *_) -> None:
    # checkpoints saved before the output offset existed decode as they were fitted: no offset
    state_dict.setdefault(prefix + "frame_logits", torch.zeros_like(coder.frame_logits))


class LinearCoder(nn.Module):
    """A linear encoder and decoder (the subspace PCA finds, fitted by gradient descent);
    with ``fit_sess_io_layers`` each session has its own pair."""

    def __init__(self, config: AEConfig, n_outputs: int, n_extra_inputs: int, n_decoder_inputs: int):
        super().__init__()
        self.shape = (config.n_input_channels, config.y_pixels, config.x_pixels)
        n_pixels = math.prod(self.shape)
        n_io = config.n_sessions if config.fit_sess_io_layers else 1
        if n_outputs:
            self.encoders = nn.ModuleList(nn.Linear(n_pixels + n_extra_inputs, n_outputs) for _ in range(n_io))
        self.decoders = nn.ModuleList(nn.Linear(n_decoder_inputs, n_pixels) for _ in range(n_io))

    def encode(self, images: torch.Tensor, session: torch.Tensor | None = None,
               extra: torch.Tensor | None = None) -> torch.Tensor:
        h = images.flatten(1)
        h = h if extra is None else torch.cat([h, extra.to(h.dtype)], 1)
        return per_session(self.encoders, h, session, lambda layer, x: layer(x))

    def decode(self, inputs: torch.Tensor, session: torch.Tensor | None = None) -> torch.Tensor:
        return per_session(self.decoders, inputs, session, lambda layer, x: layer(x)).view(-1, *self.shape)

    @torch.no_grad()
    def start_at(self, mean_frames: torch.Tensor) -> None:
        """Each decoder's bias at its session's mean frame (their mean where sessions share one)."""
        means = mean_frames if len(self.decoders) == len(mean_frames) else mean_frames.mean(0, keepdim=True)
        for decoder, mean in zip(self.decoders, means):
            decoder.bias.copy_(mean.flatten())


AE_ARCHITECTURES: dict[str, type[nn.Module]] = {"conv": ConvCoder, "linear": LinearCoder}


class EncoderMayReadLabels:
    """Mixin of the classes whose encoder reads the labels beside the frame when their config
    says ``conditional_encoder`` (appended to its flattened conv features)."""

    @property
    def n_encoder_extra_inputs(self) -> int:
        return self.config.n_labels if self.config.conditional_encoder else 0


def anneal(weight: float, epochs: int, epoch: int, training: bool) -> float:
    """A loss weight rising linearly from 0 over the first ``epochs`` training epochs
    (reaching ``weight`` at epoch ``epochs - 1``); evaluation always uses the full weight,
    so validation losses of different epochs compare."""
    if not training or epochs <= 0:
        return weight
    return weight * min(1.0, (epoch + 1) / epochs)


@register("ae", family="ae", config_type=AEConfig)
class AutoEncoder(nn.Module):
    """Frames -> latents -> frames; the base of every class of the family.

    Subclasses say how many values the encoder produces (:attr:`n_encoder_outputs`), what
    the decoder reads (:meth:`decoder_inputs`) and which terms make the loss
    (:meth:`loss_terms`). ``encode`` returns the latents downstream stages read (posterior
    means for variational classes).
    """

    uses_labels = False  # the class needs the session's labels
    variational = False
    has_encoder = True  # False: a decoder alone (no encoder layers are built)
    exports_latents = True

    def __init__(self, config: AEConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.check_config(config)
        self.epoch = 0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.rng_seed_model)
            self.coder = AE_ARCHITECTURES[config.model_type](
                config, self.n_encoder_outputs if self.has_encoder else 0, self.n_encoder_extra_inputs,
                self.n_decoder_inputs)
            self.build_heads()

    @classmethod
    def sessions_per_batch(cls, config: AEConfig) -> int:
        """Sessions each training batch mixes (one: a batch is a slice of one trial)."""
        return 1

    def check_config(self, config: AEConfig) -> None:
        """Raise a ConfigError if the class cannot be built from ``config``."""
        if self.uses_labels and config.n_labels < 1:
            raise ConfigError(f"model_class '{config.model_class}' needs labels (n_labels is {config.n_labels}): "
                              f"fit it to a session with a 'labels' group")

    def build_heads(self) -> None:
        """Layers beyond the coder (label readouts, projections)."""

    def start_at_mean_frame(self, mean_frames: torch.Tensor) -> None:
        """Start the decoder at the trivial answer: its output, with latents at zero, near each
        session's training mean frame ``(n_sessions, C, Y, X)`` in [0, 1]."""
        self.coder.start_at(mean_frames.to(next(self.parameters()).dtype))

    @property
    def n_latents(self) -> int:
        """Dimensions of the latents ``encode`` returns."""
        return self.config.n_ae_latents

    @property
    def n_encoder_outputs(self) -> int:
        return 2 * self.n_latents if self.variational else self.n_latents

    @property
    def n_encoder_extra_inputs(self) -> int:
        """Values the encoder reads beside the frame (a conditional encoder's labels)."""
        return 0

    @property
    def n_decoder_inputs(self) -> int:
        return self.n_latents

    def set_epoch(self, epoch: int) -> None:
        """The training epoch about to run (annealed loss weights follow it)."""
        self.epoch = epoch

    def posterior(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encoder outputs: (latents, None), or (means, log-variances) for variational classes."""
        extra = clean_labels(batch) if self.n_encoder_extra_inputs else None
        out = self.coder.encode(batch["images"], batch.get("session"), extra)
        if not self.variational:
            return out, None
        return out[:, : self.n_latents], out[:, self.n_latents :]

    def decoder_inputs(self, latents: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return latents

    def latent_groups(self) -> dict[str, slice]:
        """Where each subspace sits in the latents ``encode`` returns (one, here)."""
        return {"latent": slice(0, None)}

    def encode(self, images: torch.Tensor, session: torch.Tensor | None = None,
               labels: torch.Tensor | None = None) -> torch.Tensor:
        batch = {"images": images, **({"session": session} if session is not None else {}),
                 **({"labels": labels} if labels is not None else {})}
        return self.posterior(batch)[0]

    def decode(self, latents: torch.Tensor, session: torch.Tensor | None = None,
               labels: torch.Tensor | None = None) -> torch.Tensor:
        batch = {"labels": labels} if labels is not None else {}
        return self.coder.decode(self.decoder_inputs(latents, batch), session)

    def forward(self, images: torch.Tensor, session: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        latents = self.encode(images, session, labels)
        return self.decode(latents, session, labels), latents

    def reconstruct(self, batch: dict[str, torch.Tensor], latents: torch.Tensor) -> torch.Tensor:
        return self.coder.decode(self.decoder_inputs(latents, batch), batch.get("session"))

    def pixel_mse(self, batch: dict[str, torch.Tensor], reconstruction: torch.Tensor) -> torch.Tensor:
        return masked_mse(reconstruction.float(), batch["images"], batch.get("masks"))

    def loss_terms(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The loss (``loss``) and its named terms on one batch, each a frame mean."""
        latents, _ = self.posterior(batch)
        mse = self.pixel_mse(batch, self.reconstruct(batch, latents))
        return {"loss": mse, "pixel_mse": mse}

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.loss_terms(batch)["loss"]


def clean_labels(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Labels as model inputs: unobserved ones (NaN or masked) read as 0."""
    labels = batch["labels"]
    return torch.where(label_mask(labels, batch.get("labels_masks")) > 0, labels, torch.zeros_like(labels))
