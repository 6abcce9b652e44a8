"""Autoencoders: BehaveNet's default convolutional AE and a linear AE.

The conv architecture is BehaveNet's paper default: five conv layers of 32-64-128-256-512
channels, kernel 5, strides 2-2-2-2-5 with TensorFlow-style 'same' zero padding and
LeakyReLU(0.05), a linear layer to the latents, and the mirror-image decoder of transposed
convolutions ending in a sigmoid (1x128x128 -> 8,758,285 parameters at 12 latents).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from bnet.errors import ConfigError
from bnet.models.registry import register

CONV_CHANNELS = (32, 64, 128, 256, 512)
CONV_STRIDES = (2, 2, 2, 2, 5)
CONV_KERNEL = 5
LEAKY_SLOPE = 0.05


@dataclass
class AEConfig:
    """An autoencoder (BehaveNet's ``model`` config keys).

    Attributes:
        model_class: ``ae``.
        model_type: ``conv`` (BehaveNet's default architecture) or ``linear``.
        n_ae_latents: latent dimensions.
        n_input_channels, y_pixels, x_pixels: frame shape (filled from the data).
        l2_reg: weight decay of the optimiser.
        rng_seed_model: seed of the weight initialisation.
    """

    model_class: str = "ae"
    model_type: str = "conv"
    n_ae_latents: int = 12
    n_input_channels: int = 1
    y_pixels: int = 64
    x_pixels: int = 64
    l2_reg: float = 0.0
    rng_seed_model: int = 0

    def validate(self) -> None:
        if self.model_type not in AE_ARCHITECTURES:
            raise ConfigError(
                f"model_type '{self.model_type}' is not an autoencoder type "
                f"(known: {', '.join(AE_ARCHITECTURES)})"
            )
        if self.n_ae_latents < 1:
            raise ConfigError(f"n_ae_latents must be at least 1, got {self.n_ae_latents}")
        if self.l2_reg < 0:
            raise ConfigError(f"l2_reg must be non-negative, got {self.l2_reg}")


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
    """The transposed :func:`patch_conv`: each input pixel paints its own k x k patch."""
    k = conv.kernel_size[0]
    batch, channels, height, width = x.shape
    out_channels = conv.weight.shape[1]
    patches = x.permute(0, 2, 3, 1).reshape(-1, channels) @ conv.weight.flatten(1)
    patches = patches.view(batch, height, width, out_channels, k, k).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(batch, out_channels, height * k, width * k) + conv.bias.view(1, -1, 1, 1)


class ConvCoder(nn.Module):
    """BehaveNet's conv encoder and its mirror-image decoder.

    Attributes:
        patch_gemm: compute layers whose stride equals their kernel as one GEMM (same
            parameters, same result); False runs torch's conv kernels for every layer,
            exactly BehaveNet's ops (benchmarks compare the two).
    """

    def __init__(self, config: AEConfig):
        super().__init__()
        self.patch_gemm = True
        self.pads: list[tuple[int, int, int, int]] = []
        self.sizes: list[tuple[int, int]] = [(config.y_pixels, config.x_pixels)]
        in_channels = config.n_input_channels
        encoder = []
        for channels, stride in zip(CONV_CHANNELS, CONV_STRIDES):
            y, x = self.sizes[-1]
            y_out, top, bottom = same_padding(y, stride, CONV_KERNEL)
            x_out, left, right = same_padding(x, stride, CONV_KERNEL)
            self.pads.append((left, right, top, bottom))
            self.sizes.append((y_out, x_out))
            encoder.append(nn.Conv2d(in_channels, channels, CONV_KERNEL, stride))
            in_channels = channels
        self.encoder_convs = nn.ModuleList(encoder)
        y, x = self.sizes[-1]
        self.bottleneck = (CONV_CHANNELS[-1], y, x)
        flat = CONV_CHANNELS[-1] * y * x
        self.to_latents = nn.Linear(flat, config.n_ae_latents)
        self.from_latents = nn.Linear(config.n_ae_latents, flat)
        out_channels = (config.n_input_channels,) + CONV_CHANNELS[:-1]
        self.decoder_convs = nn.ModuleList(
            nn.ConvTranspose2d(CONV_CHANNELS[i], out_channels[i], CONV_KERNEL, CONV_STRIDES[i])
            for i in reversed(range(len(CONV_CHANNELS)))
        )

    def _run_layer(self, x: torch.Tensor, conv: nn.Module) -> torch.Tensor:
        if self.patch_gemm and conv.stride == conv.kernel_size:
            return patch_conv_transpose(x, conv) if isinstance(conv, nn.ConvTranspose2d) else patch_conv(x, conv)
        return conv(x)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        h = images
        for conv, pad in zip(self.encoder_convs, self.pads):
            h = F.leaky_relu(self._run_layer(F.pad(h, pad), conv), LEAKY_SLOPE)
        return self.to_latents(h.flatten(1))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.from_latents(latents), LEAKY_SLOPE)
        h = h.view(-1, *self.bottleneck)
        n_layers = len(self.decoder_convs)
        for i, conv in enumerate(self.decoder_convs):
            layer = n_layers - 1 - i
            left, _, top, _ = self.pads[layer]
            y, x = self.sizes[layer]
            # The transposed conv is the adjoint of the padded conv: crop the same padding.
            h = self._run_layer(h, conv)[:, :, top : top + y, left : left + x]
            h = torch.sigmoid(h) if layer == 0 else F.leaky_relu(h, LEAKY_SLOPE)
        return h


class LinearCoder(nn.Module):
    """A linear encoder and decoder (the subspace PCA finds, fitted by gradient descent)."""

    def __init__(self, config: AEConfig):
        super().__init__()
        self.shape = (config.n_input_channels, config.y_pixels, config.x_pixels)
        n_pixels = math.prod(self.shape)
        self.to_latents = nn.Linear(n_pixels, config.n_ae_latents)
        self.from_latents = nn.Linear(config.n_ae_latents, n_pixels)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.to_latents(images.flatten(1))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.from_latents(latents).view(-1, *self.shape)


AE_ARCHITECTURES: dict[str, type[nn.Module]] = {"conv": ConvCoder, "linear": LinearCoder}


def masked_mse(reconstruction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error over the pixels the mask keeps (all pixels without a mask)."""
    squared = (reconstruction - target) ** 2
    if mask is None:
        return squared.mean()
    return (squared * mask).sum() / mask.sum().clamp_min(1.0)


@register("ae", family="ae", config_type=AEConfig)
class AutoEncoder(nn.Module):
    """Frames -> latents -> frames; ``model_type`` picks the architecture."""

    def __init__(self, config: AEConfig):
        super().__init__()
        config.validate()
        self.config = config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.rng_seed_model)
            self.coder = AE_ARCHITECTURES[config.model_type](config)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.coder.encode(images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.coder.decode(latents)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        latents = self.encode(images)
        return self.decode(latents), latents

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Masked MSE of the reconstruction of ``batch['images']``."""
        reconstruction, _ = self(batch["images"])
        return masked_mse(reconstruction.float(), batch["images"], batch.get("masks"))
