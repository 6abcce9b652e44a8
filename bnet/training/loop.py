"""The training loop shared by every gradient-trained model.

Adam (amsgrad, weight decay = ``l2_reg``), one validation pass per epoch, early stopping on
the validation loss with patience and a minimum number of epochs, and the weights of the
best validation epoch restored at the end, so test metrics are computed with the weights
that were selected (BehaveNet evaluated the last epoch's weights by mistake). Trackers and
pruners plug in as callbacks; a callback that raises stops training and the exception
propagates unchanged (Optuna's ``TrialPruned`` uses this).
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
import torch

from bnet.data.loader import prefetched, to_device
from bnet.errors import ConfigError
from bnet.training.augment import Augmentation


EARLY_STOP_MIN_DELTA = 1e-5
"""Relative val-loss gain that resets early stopping's patience (see :class:`TrainingConfig`)."""


@dataclass
class TrainingConfig:
    """How to fit (BehaveNet's ``training`` config keys, plus bnet's own).

    Attributes:
        learning_rate: Adam's step size.
        max_n_epochs: epochs at most.
        min_n_epochs: epochs before early stopping may stop training.
        enable_early_stop: stop when the val loss has not improved for
            ``early_stop_history`` epochs.
        early_stop_history: the patience, in epochs.
        early_stop_min_delta: what counts as an improvement for the patience: a val loss
            below ``reference - early_stop_min_delta * |reference|``, the reference being
            the val loss of the last epoch that improved by that much (relative, as
            ``ReduceLROnPlateau``'s ``threshold``; cumulative, as Keras' ``min_delta``).
            Smaller gains still update the best weights, but do not reset the patience:
            without the tolerance, weights creeping at float32 rounding level (a fit at
            learning rate 1e-9) "improved" the val loss by ~1e-7 relative every epoch or
            two and early stopping fired by chance, differently in bf16 and float32.
        val_check_interval: validate every this many epochs.
        batch_size: frames per batch; None uses whole trials (BehaveNet's batches).
        rng_seed_train: seed of the batch order (separate from data and model seeds).
        export_latents: write per-trial latents as an artifact.
        export_train_plots: write training-curve and reconstruction figures.
    """

    learning_rate: float = 1e-4
    max_n_epochs: int = 1000
    min_n_epochs: int = 0
    enable_early_stop: bool = True
    early_stop_history: int = 10
    early_stop_min_delta: float = EARLY_STOP_MIN_DELTA
    val_check_interval: int = 1
    batch_size: int | None = None
    rng_seed_train: int = 0
    export_latents: bool = True
    export_train_plots: bool = True

    def validate(self) -> None:
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.max_n_epochs < 1:
            raise ConfigError(f"max_n_epochs must be at least 1, got {self.max_n_epochs}")
        if self.early_stop_history < 1:
            raise ConfigError(f"early_stop_history must be at least 1, got {self.early_stop_history}")
        if not 0 <= self.early_stop_min_delta < 1:
            raise ConfigError(f"early_stop_min_delta must be in [0, 1), got {self.early_stop_min_delta}")
        if self.val_check_interval < 1:
            raise ConfigError(f"val_check_interval must be at least 1, got {self.val_check_interval}")


@dataclass
class EpochRecord:
    """One epoch: losses, and every named loss term the model reports (``pixel_mse``,
    ``kl``, ``label_mse``...) averaged over the epoch's frames."""

    epoch: int
    train_loss: float
    val_loss: float | None
    seconds: float
    frames: int
    train_terms: dict[str, float] = field(default_factory=dict)
    val_terms: dict[str, float] = field(default_factory=dict)
    state: Callable[[], "TrainingState"] | None = field(default=None, repr=False, compare=False)
    """The fit as it stands at this epoch's end, for a checkpoint to go on from (taken only
    when called: it copies the weights and the optimiser's state)."""

    def as_dict(self) -> dict:
        return {"epoch": self.epoch, "train_loss": self.train_loss, "val_loss": self.val_loss,
                "seconds": self.seconds, "frames": self.frames, "train_terms": dict(self.train_terms),
                "val_terms": dict(self.val_terms)}


@dataclass
class TrainingState:
    """Everything a fit needs to go on after an epoch, as plain values and tensors (a
    checkpoint loads with ``torch.load(weights_only=True)``): the weights and the optimiser's
    state, the best epoch so far and its weights, early stopping's account, the batch order's
    generator and the epochs trained. A population-based member goes on from another
    member's state, with its own learning rate and weight decay."""

    epoch: int
    model: dict
    optimizer: dict
    best_state: dict | None
    best_val: float
    best_epoch: int
    reference_val: float
    stale_epochs: int
    rng: dict
    history: list[dict]
    augmentation_rng: torch.Tensor | None = None

    def as_dict(self) -> dict:
        return dict(vars(self))

    @classmethod
    def from_dict(cls, values: dict) -> "TrainingState":
        return cls(**values)


@dataclass
class FitResult:
    """What a fit produced; the model holds the best-val weights."""

    history: list[EpochRecord]
    best_epoch: int
    best_val_loss: float
    stopped_early: bool
    train_seconds: float
    precision: str
    frames_per_second: float = field(default=0.0)


class TrainingCallback(Protocol):
    def on_epoch_end(self, record: EpochRecord) -> None: ...


@dataclass(frozen=True)
class OnEpochEnd:
    """A training callback made of one function of each epoch's record (reporting a trial's
    step to the study, for instance)."""

    call: Callable[[EpochRecord], None]

    def on_epoch_end(self, record: EpochRecord) -> None:
        self.call(record)


@dataclass
class ComputeConfig:
    """Where and how to compute (BehaveNet's ``compute`` keys, plus ``precision``).

    Attributes:
        device: ``cpu``, ``cuda`` or ``auto`` (CUDA when present).
        precision: precision of the training step: ``fp32``, ``bf16`` (bfloat16 autocast;
            weights, optimiser state and every reported loss stay float32) or ``auto``
            (bf16 on CUDA devices that support it, float32 on every CPU, AMX and AVX-512
            BF16 ones included: see :func:`resolve_precision`). The environment variable
            ``BNET_PRECISION`` (``auto``, ``fp32`` or ``bf16``) overrides what ``auto``
            resolves to, so a test run can force bf16 on any CPU (CPUs without bf16
            instructions emulate it, ~10x slower); an explicit ``fp32`` or ``bf16`` here
            is kept.
    """

    device: str = "auto"
    precision: str = "auto"

    def validate(self) -> None:
        resolve_device(self.device)
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got '{self.precision}'")


PRECISIONS = ("auto", "fp32", "bf16")
PRECISION_ENV = "BNET_PRECISION"


def precision_override() -> str:
    """What ``$BNET_PRECISION`` makes ``auto`` resolve to (``auto`` when unset or empty)."""
    value = os.environ.get(PRECISION_ENV, "").strip().lower() or "auto"
    if value not in PRECISIONS:
        raise ConfigError(f"${PRECISION_ENV} must be one of {', '.join(PRECISIONS)}, got '{value}'")
    return value


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` on CUDA devices with bf16, ``fp32`` elsewhere; ``$BNET_PRECISION``
    (``fp32`` or ``bf16``) overrides what ``auto`` resolves to, on any device; an explicit
    ``fp32`` or ``bf16`` is kept.

    CPUs train in float32 even where they multiply bfloat16 natively (AMX, AVX-512 BF16:
    :func:`cpu_has_native_bf16`) and a bf16 step is faster (1.34x on an AVX-512 BF16 EPYC).
    With ``bench/arhmm_science.py`` the ARHMM segmented AE latents trained in bf16 worse on
    an AMX Xeon (state accuracy 0.772 vs 0.878, seeds 0-3, AE val losses alike) and on an
    AVX-512 BF16 EPYC at 32 px (0.840 vs 0.910, seeds 0-2), better on that EPYC at 24 px
    (0.809 vs 0.774, seeds 0-7); float32 with only another batch order gave 0.853 there.
    One AE fit's downstream accuracy varies from run to run as much as any of these gaps,
    so bf16 could not be shown to stay within float32's spread, and no bf16-specific cause
    was found (README, "Training precision"). bf16 stays one setting away.
    """
    if precision != "auto":
        return precision
    override = precision_override()
    if override != "auto":
        return override
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "fp32"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bfloat16 matrix or dot-product instructions (AMX, AVX-512 BF16)."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, check, lambda: False)() for check in checks)


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without it is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{device}' asked for, but no CUDA device is available")
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError(f"device must be cpu, cuda or auto, got '{device}'")
    return torch.device(device)


def _n_frames(batch: dict[str, torch.Tensor]) -> int:
    return next(iter(batch.values())).shape[0]


def loss_terms(model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's named loss terms (``loss`` the total); a model with only ``loss`` has one."""
    if hasattr(model, "loss_terms"):
        return model.loss_terms(batch)
    return {"loss": model.loss(batch)}


class TermAverages:
    """Frame-weighted running means of named loss terms; the sums stay on the device until
    :meth:`means`, so a step does not wait for the device once per term."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.frames = 0

    def add(self, terms: dict[str, torch.Tensor], n: int) -> None:
        for name, value in terms.items():
            weighted = value.detach().float() * n
            self.sums[name] = self.sums[name] + weighted if name in self.sums else weighted
        self.frames += n

    def means(self) -> dict[str, float]:
        return {name: float(total) / max(self.frames, 1) for name, total in self.sums.items()}


def evaluate_terms(model, batches, device: torch.device = torch.device("cpu")) -> dict[str, float]:
    """Frame-weighted mean of every loss term over a dataset's batches, in float32.

    Selection and test metrics are always float32 so they do not depend on the precision
    the model was trained in, and a reloaded model reproduces them. Inference mode: no
    autograd records, no version counters.
    """
    model.to(device).eval()
    averages = TermAverages()
    with torch.inference_mode():
        for batch in prefetched(batches, range(len(batches)), device):
            averages.add(loss_terms(model, batch), _n_frames(batch))
    return averages.means()


def evaluate(model, batches, device: torch.device = torch.device("cpu")) -> float:
    """Frame-weighted mean loss over a dataset's batches, in float32."""
    return evaluate_terms(model, batches, device)["loss"]


def train_step(model, optimizer, batch: dict[str, torch.Tensor], device: torch.device,
               precision: str) -> dict[str, torch.Tensor]:
    """One optimiser step on one batch; returns the batch's loss terms (``loss`` the total)."""
    batch = to_device(batch, device)
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        terms = loss_terms(model, batch)
    terms["loss"].backward()
    optimizer.step()
    return terms


def make_optimizer(model, learning_rate: float, weight_decay: float) -> torch.optim.Optimizer:
    """BehaveNet's optimiser: Adam with amsgrad, L2 regularisation as weight decay.

    Fused (one kernel over all parameters) where torch has one for the parameters' device:
    the same update as the per-tensor loop, which on the CPU spent ~30 ms a step on the
    conv AE's 8.7 M parameters, a third of a 16-frame step.
    """
    parameters = [p for p in model.parameters() if p.requires_grad]
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in parameters)
    return torch.optim.Adam(parameters, lr=learning_rate, weight_decay=weight_decay, amsgrad=True,
                            fused=fused or None)


def prepare(model, device: torch.device):
    """Move a model to ``device``, its convolutions' weights in channels-last layout (faster
    conv kernels). Layers computed as one GEMM (``computed_as_gemm``) keep contiguous
    weights: their matrix is then a view, and the fused optimiser copies no weight of
    theirs (it makes channels-last tensors contiguous first: 7 ms a step for the conv AE's
    two 3.3 M-parameter layers)."""
    model = model.to(device)
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)) and not getattr(
                module, "computed_as_gemm", False):
            module.to(memory_format=torch.channels_last)
    return model


def improves(val_loss: float, reference: float, min_delta: float) -> bool:
    """Whether ``val_loss`` beats ``reference`` by more than ``min_delta`` of its size (any
    finite loss beats an infinite reference)."""
    if not math.isfinite(reference):
        return val_loss < reference
    return val_loss < reference - min_delta * abs(reference)


def fit(
    model: torch.nn.Module,
    train_batches,
    val_batches,
    config: TrainingConfig,
    weight_decay: float = 0.0,
    device: torch.device = torch.device("cpu"),
    precision: str = "auto",
    callbacks: list[TrainingCallback] = (),
    augmentation: Augmentation | None = None,
    resume: TrainingState | None = None,
) -> FitResult:
    """Fit ``model`` (which has ``loss(batch)``) on batches of a :class:`TrialBatches`;
    ``augmentation`` moves the training frames (never the validation ones). ``resume`` goes
    on from a fit's state after one of its epochs (this fit's learning rate and weight decay
    replace the state's).

    Returns with the best-validation weights loaded into ``model``.
    """
    config.validate()
    precision = resolve_precision(precision, device)
    prepare(model, device)
    optimizer = make_optimizer(model, config.learning_rate, weight_decay)
    rng = np.random.default_rng(config.rng_seed_train)
    min_epochs = min(config.min_n_epochs, config.max_n_epochs)
    history: list[EpochRecord] = []
    best_val, best_epoch, best_state = math.inf, -1, None
    reference_val = math.inf  # the val loss of the last epoch that reset the patience
    stale_epochs, stopped_early = 0, False
    started = time.perf_counter()
    train_frames_seen, train_seconds = 0, 0.0
    draws = augmentation.generator(device) if augmentation is not None and augmentation.active else None
    first_epoch = 0
    if resume is not None:
        model.load_state_dict(resume.model)
        optimizer.load_state_dict(resume.optimizer)
        for group in optimizer.param_groups:
            group["lr"], group["weight_decay"] = config.learning_rate, weight_decay
        rng.bit_generator.state = resume.rng
        if draws is not None and resume.augmentation_rng is not None:
            draws.set_state(resume.augmentation_rng)
        best_val, best_epoch, best_state = resume.best_val, resume.best_epoch, resume.best_state
        reference_val, stale_epochs = resume.reference_val, resume.stale_epochs
        history = [EpochRecord(**record) for record in resume.history]
        first_epoch = resume.epoch + 1

    def snapshot(epoch: int) -> Callable[[], TrainingState]:
        return lambda: TrainingState(
            epoch, copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()),
            best_state if best_state is None else dict(best_state), best_val, best_epoch, reference_val,
            stale_epochs, rng.bit_generator.state, [r.as_dict() for r in history],
            None if draws is None else draws.get_state())

    for epoch in range(first_epoch, config.max_n_epochs):
        epoch_start = time.perf_counter()
        model.train()
        if hasattr(model, "set_epoch"):
            model.set_epoch(epoch)  # annealed loss weights
        averages = TermAverages()
        for batch in prefetched(train_batches, rng.permutation(len(train_batches)), device):
            if draws is not None:
                batch = augmentation(batch, draws)
            averages.add(train_step(model, optimizer, batch, device, precision), _n_frames(batch))
        train_seconds += time.perf_counter() - epoch_start
        frames = averages.frames
        train_frames_seen += frames
        train_terms = averages.means()
        train_loss = train_terms.pop("loss")
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"training loss became {train_loss} at epoch {epoch}")

        val_loss, val_terms = None, {}
        if (epoch + 1) % config.val_check_interval == 0 or epoch + 1 == config.max_n_epochs:
            val_terms = evaluate_terms(model, val_batches, device)
            val_loss = val_terms.pop("loss")
            model.train()
            if val_loss < best_val:
                best_val, best_epoch = val_loss, epoch
                best_state = copy.deepcopy(model.state_dict())
            if improves(val_loss, reference_val, config.early_stop_min_delta):
                reference_val, stale_epochs = val_loss, 0
            else:
                stale_epochs += config.val_check_interval
        record = EpochRecord(epoch, train_loss, val_loss, time.perf_counter() - epoch_start, frames,
                             train_terms, val_terms)
        history.append(record)
        record.state = snapshot(epoch)
        for callback in callbacks:
            callback.on_epoch_end(record)
        if (
            config.enable_early_stop
            and epoch + 1 >= min_epochs
            and stale_epochs >= config.early_stop_history
        ):
            stopped_early = True
            break

    if best_state is None:
        raise FloatingPointError(f"no epoch had a finite validation loss (last: {history[-1].val_loss}): "
                                 f"there are no weights worth keeping")
    model.load_state_dict(best_state)
    return FitResult(
        history=history,
        best_epoch=best_epoch,
        best_val_loss=best_val,
        stopped_early=stopped_early,
        train_seconds=time.perf_counter() - started,
        precision=precision,
        frames_per_second=train_frames_seen / max(train_seconds, 1e-9),
    )
