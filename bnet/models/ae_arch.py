"""Conv architectures of the autoencoder family beyond BehaveNet's default: read from an
``ae_arch_json`` file as BehaveNet allowed, or drawn by the study from searchable keys, and
a memory estimate so a search skips architectures that would not fit (``mem_limit_gb``).

Searchable keys (model section): ``ae_n_conv_layers`` (depth), ``ae_first_channels``
(channels of the first layer, doubling per layer up to 512), ``ae_kernel_size``; every layer
has stride 2, the last one the stride that brings the frame to at most 4 x 4 pixels.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bnet.errors import ConfigError

SEARCH_KEYS = ("ae_n_conv_layers", "ae_first_channels", "ae_kernel_size")
MAX_CHANNELS = 512
_JSON_LAYER_KEYS = ("ae_encoding_n_channels", "ae_encoding_kernel_size", "ae_encoding_stride_size")
# BehaveNet's keys that bnet reads only at their default (anything else is refused, not dropped)
_JSON_NEUTRAL = {"ae_network_type": ("strides_only",), "ae_padding_type": ("same",), "ae_batch_norm": (0, False),
                 "symmetric_arch": (1, True), "ae_decoding_last_FF_layer": (0, False)}
_JSON_IGNORED = {"ae_batch_norm_momentum", "ae_encoding_layer_type", "ae_decoding_n_channels",
                 "ae_decoding_kernel_size", "ae_decoding_stride_size", "ae_decoding_layer_type",
                 "ae_decoding_starting_dim", "ae_input_dim", "n_ae_latents"}


def architecture_from_json(path: str | Path) -> dict[str, tuple[int, ...]]:
    """``conv_channels``/``conv_kernels``/``conv_strides`` from a BehaveNet ``ae_arch_json``
    (symmetric, strided convolutions with 'same' padding: the decoder mirrors the encoder)."""
    from bnet.config import read_behavenet_json

    path = Path(path)
    content = read_behavenet_json(path)  # BehaveNet's JSON: comments and trailing commas allowed
    missing = [k for k in _JSON_LAYER_KEYS if k not in content]
    if missing:
        raise ConfigError(f"{path}: ae_arch_json lacks {', '.join(missing)}")
    for key, allowed in _JSON_NEUTRAL.items():
        if key in content and content[key] not in allowed:
            raise ConfigError(f"{path}: '{key}: {content[key]}' is not supported (bnet builds symmetric strided "
                              f"conv architectures with 'same' padding, no batch norm); use {allowed[0]!r}")
    unknown = set(content) - set(_JSON_LAYER_KEYS) - set(_JSON_NEUTRAL) - _JSON_IGNORED
    if unknown:
        raise ConfigError(f"{path}: unknown ae_arch_json key(s) {', '.join(sorted(unknown))}")
    layer_types = content.get("ae_encoding_layer_type", [])
    if any(t != "conv" for t in layer_types):
        raise ConfigError(f"{path}: ae_encoding_layer_type {layer_types}: only 'conv' layers are supported "
                          f"(no max-pooling)")
    layers = [list(content[k]) for k in _JSON_LAYER_KEYS]
    if len({len(layer) for layer in layers}) != 1 or not layers[0]:
        raise ConfigError(f"{path}: {', '.join(_JSON_LAYER_KEYS)} must be lists of one length")
    for key, layer in zip(_JSON_LAYER_KEYS, layers):
        if not all(isinstance(v, int) and v >= 1 for v in layer):
            raise ConfigError(f"{path}: {key} must hold positive integers, got {layer}")
    return {"conv_channels": tuple(layers[0]), "conv_kernels": tuple(layers[1]), "conv_strides": tuple(layers[2])}


def searched_architecture(n_layers: int, first_channels: int, kernel: int, frame: tuple[int, int]) -> dict[str, tuple]:
    """The architecture the search keys describe, for frames of ``frame`` (Y, X) pixels."""
    if n_layers < 1 or first_channels < 1 or kernel < 1:
        raise ConfigError(f"ae_n_conv_layers, ae_first_channels and ae_kernel_size must be positive "
                          f"(got {n_layers}, {first_channels}, {kernel})")
    channels = tuple(min(first_channels * 2**i, MAX_CHANNELS) for i in range(n_layers))
    strides = [2] * n_layers
    side = max(math.ceil(s / 2 ** (n_layers - 1)) for s in frame)
    strides[-1] = max(1, math.ceil(side / 4)) if side > 4 else 1
    return {"conv_channels": channels, "conv_kernels": (kernel,) * n_layers, "conv_strides": tuple(strides)}


def architecture_values(hparams: dict[str, Any], frame: tuple[int, int]) -> dict[str, tuple]:
    """The ``conv_*`` values a trial's hyperparameters ask for (none: BehaveNet's default)."""
    searched = [k for k in SEARCH_KEYS if k in hparams]
    if hparams.get("ae_arch_json") and searched:
        raise ConfigError(f"ae_arch_json and {', '.join(searched)} are alternatives: a file's architecture, "
                          f"or a searched one")
    if hparams.get("ae_arch_json"):
        return architecture_from_json(hparams["ae_arch_json"])
    if searched:
        defaults = {"ae_n_conv_layers": 5, "ae_first_channels": 32, "ae_kernel_size": 5}
        n, c, k = (int(hparams.get(key, defaults[key])) for key in SEARCH_KEYS)
        return searched_architecture(n, c, k, frame)
    return {}


def estimate_memory_gb(config, batch_frames: int) -> float:
    """Training memory of a conv AE in GB, as BehaveNet estimated it: 4 bytes x (the input
    batch + parameters x 4 (weights, gradients, Adam's two moments) + every encoder layer's
    activations x 2 (the mirrored decoder) x 2 (their gradients)), plus 20%."""
    from bnet.models.ae import same_padding

    y, x = config.y_pixels, config.x_pixels
    values = batch_frames * config.n_input_channels * y * x
    activations = 0
    in_channels = config.n_input_channels
    for channels, kernel, stride in zip(config.conv_channels, config.conv_kernels, config.conv_strides):
        y, x = same_padding(y, stride, kernel)[0], same_padding(x, stride, kernel)[0]
        activations += batch_frames * channels * y * x
        values += 4 * 2 * (in_channels * channels * kernel * kernel + channels)  # conv + transposed conv
        in_channels = channels
    values += 4 * 2 * in_channels * y * x * config.n_ae_latents
    values += activations * 2 * 2
    return 1.2 * 4 * values / 1e9
