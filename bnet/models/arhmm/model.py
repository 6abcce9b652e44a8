"""The ARHMM: parameters as plain tensors, batched inference, exact EM as in ssm."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch

from bnet.models.arhmm import observations, transitions
from bnet.models.arhmm.batch import ARHMMDataError, SequenceBatch
from bnet.models.arhmm.config import ARHMMConfig, ARHMMConfigError
from bnet.models.arhmm.kmeans import kmeans
from bnet.models.arhmm.messages import ForwardBackward, forward_backward, viterbi

Sequences = SequenceBatch | Sequence[np.ndarray | torch.Tensor]
"""A list of (frames, dimensions) arrays, or a batch already built for this model."""

FitCallback = Callable[[int, float, float | None], bool | None]
"""Called after EM iteration i (1-based) with the training and validation log-likelihoods
of the parameters after that iteration; a true return value stops the fit, and an
exception raised in it propagates unchanged (e.g. ``optuna.TrialPruned``)."""

INITIAL_SELF_TRANSITION = 0.95
"""Initial probability of staying in a state, the rest spread evenly over the others."""
INITIAL_DOF = 4.0
"""Initial Student-t degrees of freedom: heavy tails with a finite variance."""


@dataclass
class ARHMMParameters:
    """Everything an ARHMM learns, in ssm's layout (K states, D dimensions, L lags).

    Attributes:
        log_pi0: (K,) initial-state log-probabilities, normalised on use.
        As: (K, D, D*L) AR matrices; block ``As[k][:, l*D:(l+1)*D]`` multiplies x_{t-l-1}.
        bs: (K, D) AR biases.
        Sigmas: (K, D, D) noise covariances (Student-t: scale matrices) as used; diagonal
            for the diagonal noise types.
        log_Ps: (K, K) transition log-weights, row-normalised on use (stationary, sticky,
            recurrent).
        Rs: (K, D) weights of the previous observation on the next state (recurrent,
            recurrent_only).
        r: (K,) next-state bias (recurrent_only).
        nus: (K,) Student-t degrees of freedom (studentst, diagonal_studentst).
    """

    log_pi0: torch.Tensor
    As: torch.Tensor
    bs: torch.Tensor
    Sigmas: torch.Tensor
    log_Ps: torch.Tensor | None = None
    Rs: torch.Tensor | None = None
    r: torch.Tensor | None = None
    nus: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {name: value for name, value in values.items() if value is not None}

    def to(self, dtype: torch.dtype, device: torch.device) -> ARHMMParameters:
        return ARHMMParameters(**{name: t.to(dtype=dtype, device=device)
                                  for name, t in self.tensors().items()})


def parameter_names(config: ARHMMConfig) -> set[str]:
    """The parameters a model with this config has."""
    names = {"log_pi0", "As", "bs", "Sigmas"}
    if config.transitions in ("stationary", "sticky", "recurrent"):
        names.add("log_Ps")
    if config.is_recurrent:
        names.add("Rs")
    if config.transitions == "recurrent_only":
        names.add("r")
    if config.is_studentst:
        names.add("nus")
    return names


def _check_parameter_names(config: ARHMMConfig, names: set[str]) -> None:
    expected = parameter_names(config)
    if names != expected:
        raise ARHMMConfigError(
            f"noise_type={config.noise_type!r} with transitions={config.transitions!r} needs "
            f"parameters {sorted(expected)}, got {sorted(names)}")


@dataclass
class Posterior:
    """Posterior over the discrete states of N sequences.

    Attributes:
        log_likelihoods: (N,) log p(x) per sequence.
        expected_states: per sequence, (T_n, K) E[z_t = k].
        expected_joints: (K, K) sum over the sequences and t of E[z_t = i, z_{t+1} = j].
    """

    log_likelihoods: torch.Tensor
    expected_states: list[torch.Tensor]
    expected_joints: torch.Tensor


@dataclass
class FitHistory:
    """What EM did. Index i of each list refers to the parameters after i iterations.

    Attributes:
        train_log_likelihoods: total training log-likelihood, from the initial parameters on.
        val_log_likelihoods: the same on the validation sequences; empty without them.
        log_priors: the model's log prior (sticky transitions; 0 otherwise).
        stop_reason: ``n_iters``, ``tolerance`` (``arhmm_es_tol`` reached) or ``callback``.
    """

    train_log_likelihoods: list[float] = field(default_factory=list)
    val_log_likelihoods: list[float] = field(default_factory=list)
    log_priors: list[float] = field(default_factory=list)
    stop_reason: str = "n_iters"

    @property
    def n_iters(self) -> int:
        return len(self.train_log_likelihoods) - 1

    def ssm_lp_trace(self) -> list[float]:
        """ssm's EM trace: [ll(θ0) + prior(θ0)] then ll(θ_{i-1}) + prior(θ_i) for i >= 1."""
        ll, prior = self.train_log_likelihoods, self.log_priors
        return [ll[0] + prior[0]] + [ll[i - 1] + prior[i] for i in range(1, len(ll))]


class ARHMM:
    """Autoregressive HMM over batches of sequences, numerically matching ssm.

    Build one from a config and fit it (``fit`` initialises by k-means first), or restore one
    with :meth:`from_state_dict` or :meth:`from_ssm`. Every method that takes sequences
    accepts a list of (T_n, D) arrays or tensors of any lengths (all longer than the number
    of lags) or a :class:`SequenceBatch` from :meth:`batch`.
    """

    def __init__(self, config: ARHMMConfig, parameters: ARHMMParameters | None = None):
        self.config = config
        self.parameters: ARHMMParameters | None = None
        if parameters is not None:
            self._set_parameters(parameters)

    # ----------------------------------------------------------------- parameters

    def _set_parameters(self, parameters: ARHMMParameters) -> None:
        config = self.config
        _check_parameter_names(config, set(parameters.tensors()))
        n_states, n_dims = parameters.bs.shape
        shapes = {"log_pi0": (n_states,), "As": (n_states, n_dims, n_dims * config.n_arhmm_lags),
                  "bs": (n_states, n_dims), "Sigmas": (n_states, n_dims, n_dims),
                  "log_Ps": (n_states, n_states), "Rs": (n_states, n_dims), "r": (n_states,),
                  "nus": (n_states,)}
        if n_states != config.n_arhmm_states:
            raise ARHMMConfigError(
                f"n_arhmm_states={config.n_arhmm_states} but the parameters have {n_states} states")
        for name, tensor in parameters.tensors().items():
            if tuple(tensor.shape) != shapes[name]:
                raise ARHMMConfigError(f"parameter {name} has shape {tuple(tensor.shape)}; expected "
                                       f"{shapes[name]} for n_arhmm_lags={config.n_arhmm_lags}")
        self.parameters = parameters.to(config.torch_dtype, config.torch_device)

    def _require_parameters(self) -> ARHMMParameters:
        if self.parameters is None:
            raise RuntimeError("the ARHMM has no parameters yet: call fit() or initialize() first")
        return self.parameters

    def to(self, dtype: str | None = None, device: str | None = None) -> ARHMM:
        """A copy computing in another dtype (``float32``/``float64``) or on another device."""
        changes = {name: value for name, value in (("dtype", dtype), ("device", device))
                   if value is not None}
        return ARHMM(replace(self.config, **changes), self._require_parameters())

    @property
    def n_dims(self) -> int:
        return self._require_parameters().bs.shape[1]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The parameters as CPU tensors (nothing else), for ``torch.save``."""
        return {name: t.detach().cpu().clone()
                for name, t in self._require_parameters().tensors().items()}

    @classmethod
    def from_state_dict(cls, config: ARHMMConfig, state: Mapping[str, torch.Tensor]) -> ARHMM:
        _check_parameter_names(config, set(state))
        return cls(config, ARHMMParameters(**state))

    @classmethod
    def from_ssm(cls, config: ARHMMConfig, arrays: Mapping[str, np.ndarray], prefix: str = "") -> ARHMM:
        """A model with parameters read from ssm's attributes, e.g. a reference ``.npz``.

        Reads ``{prefix}As``, ``bs``, ``Sigmas``, ``log_pi0`` (or ``pi0``) and, as the config
        needs them, ``log_Ps``, ``Rs``, ``r`` and ``nus``.
        """
        def read(name: str) -> torch.Tensor:
            return torch.as_tensor(np.asarray(arrays[prefix + name]), dtype=torch.float64)

        log_pi0 = read("log_pi0") if prefix + "log_pi0" in arrays else read("pi0").log()
        values = {"log_pi0": log_pi0}
        values.update({name: read(name) for name in parameter_names(config) - {"log_pi0"}})
        return cls(config, ARHMMParameters(**values))

    def permute(self, permutation: torch.Tensor | Sequence[int]) -> None:
        """Relabel the states: new state i is old state ``permutation[i]``."""
        p = self._require_parameters()
        perm = torch.as_tensor(permutation, device=p.bs.device)
        permuted = {name: t[perm] for name, t in p.tensors().items()}
        if p.log_Ps is not None:
            permuted["log_Ps"] = p.log_Ps[perm][:, perm]
        self.parameters = ARHMMParameters(**permuted)

    def permute_states_by_usage(self, sequences: Sequences) -> torch.Tensor:
        """Relabel states by decreasing expected usage on ``sequences``; returns the permutation."""
        usage = self._e_step(self.batch(sequences)).expected_states.sum((1, 2))
        permutation = torch.argsort(usage, descending=True, stable=True)
        self.permute(permutation)
        return permutation

    # ----------------------------------------------------------------- inference

    def batch(self, sequences: Sequences) -> SequenceBatch:
        """Validate and pad sequences once, for repeated use with this model."""
        batch = self._as_batch(sequences)
        if self.parameters is not None and batch.n_dims != self.n_dims:
            raise ARHMMDataError(f"the sequences have {batch.n_dims} dimensions, the model {self.n_dims}")
        return batch

    def _as_batch(self, sequences: Sequences) -> SequenceBatch:
        config = self.config
        if not isinstance(sequences, SequenceBatch):
            return SequenceBatch.from_sequences(sequences, config.n_arhmm_lags, config.torch_dtype,
                                                config.torch_device)
        if sequences.lags != config.n_arhmm_lags:
            raise ARHMMDataError(f"the batch was built for {sequences.lags} lags, the model has "
                                 f"n_arhmm_lags={config.n_arhmm_lags}")
        return sequences.to(config.torch_dtype, config.torch_device)

    def _emission_log_likelihoods(self, batch: SequenceBatch) -> torch.Tensor:
        """(K, Tmax, N), the layout of the messages."""
        p = self._require_parameters()
        return observations.emission_log_likelihoods(batch, p.As, p.bs, p.Sigmas, p.nus,
                                                     self.config.is_diagonal)

    def _log_transition_matrices(self, x: torch.Tensor) -> torch.Tensor:
        p = self._require_parameters()
        return transitions.log_transition_matrices(self.config.transitions, x, p.log_Ps, p.Rs, p.r)

    def _message_inputs(self, batch: SequenceBatch) -> tuple[torch.Tensor, ...]:
        """log pi0, transitions, emissions and mask in the layout of the messages."""
        log_pi0 = torch.log_softmax(self._require_parameters().log_pi0, dim=-1)
        log_trans = self._log_transition_matrices(batch.x)
        if log_trans.dim() > 2:
            log_trans = log_trans.permute(2, 3, 1, 0)
        return log_pi0, log_trans, self._emission_log_likelihoods(batch), batch.time_mask

    def _e_step(self, batch: SequenceBatch) -> ForwardBackward:
        return forward_backward(*self._message_inputs(batch))

    def emission_log_likelihoods(self, sequences: Sequences) -> list[torch.Tensor]:
        """Per sequence, (T_n, K) log p(x_t | z_t = k, past); the first L rows are N(0, I)."""
        batch = self.batch(sequences)
        return batch.unpad(self._emission_log_likelihoods(batch).permute(2, 1, 0))

    def log_transition_matrices(self, sequences: Sequences) -> list[torch.Tensor]:
        """Per sequence, normalised log p(z_{t+1} = j | z_t = i, x_t): (T_n - 1, K, K), or
        (1, K, K) when one matrix serves every step (stationary, sticky)."""
        batch = self.batch(sequences)
        log_trans = self._log_transition_matrices(batch.x)
        if log_trans.dim() == 2:
            return [log_trans.unsqueeze(0)] * batch.n_sequences
        return [log_trans[n, :length - 1] for n, length in enumerate(batch.lengths.tolist())]

    def log_likelihood(self, sequences: Sequences, per_sequence: bool = False) -> float | torch.Tensor:
        """Total log p(x) over the sequences, or the (N,) values when ``per_sequence``."""
        log_normalizers = self._e_step(self.batch(sequences)).log_normalizers
        return log_normalizers if per_sequence else log_normalizers.double().sum().item()

    def log_likelihood_per_step(self, sequences: Sequences) -> float:
        """Total log-likelihood / (frames * dimensions): comparable across data sets (the
        tuning objective on held-out data)."""
        batch = self.batch(sequences)
        return self._e_step(batch).log_normalizers.double().sum().item() / (batch.n_frames * batch.n_dims)

    def log_prior(self) -> float:
        """ssm's log prior: the sticky Dirichlet prior, 0 for other transitions."""
        p = self._require_parameters()
        if self.config.transitions != "sticky":
            return 0.0
        return transitions.sticky_log_prior(p.log_Ps, self.config.kappa, self.config.alpha).item()

    def expected_states(self, sequences: Sequences) -> Posterior:
        batch = self.batch(sequences)
        result = self._e_step(batch)
        return Posterior(result.log_normalizers, batch.unpad(result.expected_states.permute(2, 1, 0)),
                         result.expected_joints)

    def viterbi(self, sequences: Sequences) -> list[torch.Tensor]:
        """Per sequence, the (T_n,) most likely state path (ties go to the lowest state)."""
        batch = self.batch(sequences)
        paths = viterbi(*self._message_inputs(batch))
        return batch.unpad(paths)

    def sample(self, n_steps: int, n_sequences: int = 1,
               seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw (n_sequences, n_steps) states and (n_sequences, n_steps, D) observations.

        The first L frames come from N(0, I), as the model scores them. ``seed`` defaults to
        ``rng_seed_model``.
        """
        p = self._require_parameters()
        n_states, n_dims, lags = self.config.n_arhmm_states, self.n_dims, self.config.n_arhmm_lags
        rng = np.random.default_rng(self.config.rng_seed_model if seed is None else seed)
        like = {"dtype": p.bs.dtype, "device": p.bs.device}
        uniforms = torch.as_tensor(rng.random((n_sequences, n_steps)), **like)
        noise = torch.as_tensor(rng.standard_normal((n_sequences, n_steps, n_dims)), **like)
        if p.nus is not None:
            half_dof = p.nus.cpu().double().numpy() / 2
            # tau ~ Gamma(nu/2, rate nu/2) per state; the state drawn picks its column.
            gammas = rng.standard_gamma(half_dof, (n_sequences, n_steps, n_states))
            taus = torch.as_tensor(gammas / half_dof, **like)

        weights = observations.regression_weights(p.As, p.bs)
        chol = torch.linalg.cholesky(p.Sigmas)
        rows = torch.arange(n_sequences, device=like["device"])
        x = torch.zeros(n_sequences, n_steps, n_dims, **like)
        z = torch.zeros(n_sequences, n_steps, dtype=torch.long, device=like["device"])
        for t in range(n_steps):
            if t == 0:
                log_probs = torch.log_softmax(p.log_pi0, dim=-1).expand(n_sequences, n_states)
            else:
                log_trans = self._log_transition_matrices(x[:, t - 1:t + 1])
                previous = z[:, t - 1]
                log_probs = log_trans[previous] if log_trans.dim() == 2 else log_trans[rows, 0, previous]
            cumulative = log_probs.exp().cumsum(-1)
            z[:, t] = (cumulative < uniforms[:, t, None]).sum(-1).clamp_max(n_states - 1)
            if t < lags:
                x[:, t] = noise[:, t]
                continue
            lagged = [x[:, t - lag] for lag in range(1, lags + 1)]
            design = torch.cat(lagged + [x.new_ones(n_sequences, 1)], dim=-1)
            innovation = (chol[z[:, t]] @ noise[:, t].unsqueeze(-1)).squeeze(-1)
            if p.nus is not None:
                innovation = innovation / taus[rows, t, z[:, t]].sqrt().unsqueeze(-1)
            x[:, t] = (design.unsqueeze(1) @ weights[z[:, t]]).squeeze(1) + innovation
        return z, x

    # ----------------------------------------------------------------- fitting

    def initialize(self, train_sequences: Sequences) -> None:
        """k-means on the AR frames, each dimension standardised (seeded by
        ``rng_seed_model``), then per-cluster least squares with ssm's regularisers; uniform
        pi0, sticky-looking transitions.

        Standardising makes the start independent of each dimension's scale: AE latents come
        in arbitrary units, and on raw latents the widest one decides the clusters alone.
        """
        config = self.config
        batch = self._as_batch(train_sequences)
        n_states, n_dims = config.n_arhmm_states, batch.n_dims
        frames = batch.x[batch.ar_mask]
        if frames.shape[0] < n_states:
            raise ARHMMDataError(
                f"n_arhmm_states={n_states} is more than the {frames.shape[0]} frames the AR model "
                f"can fit (frames after the first n_arhmm_lags={config.n_arhmm_lags} of each sequence)")
        generator = torch.Generator(device=batch.x.device).manual_seed(config.rng_seed_model)
        spread = frames.std(0) if frames.shape[0] > 1 else torch.ones_like(frames[0])
        standardised = (frames - frames.mean(0)) / torch.where(spread > 0, spread, 1.0)
        labels = kmeans(standardised, n_states, generator)
        weights = torch.zeros(n_states, *batch.time_mask.shape, dtype=batch.x.dtype, device=batch.x.device)
        weights.permute(2, 1, 0)[batch.ar_mask] = torch.nn.functional.one_hot(labels, n_states).to(weights.dtype)
        As, bs, Sigmas = observations.gaussian_m_step(batch, weights, config.is_diagonal)

        like = {"dtype": bs.dtype, "device": bs.device}
        values = {"log_pi0": torch.full((n_states,), -math.log(n_states), **like),
                  "As": As, "bs": bs, "Sigmas": Sigmas}
        if config.transitions != "recurrent_only":
            off_diagonal = (1 - INITIAL_SELF_TRANSITION) / max(n_states - 1, 1)
            matrix = torch.full((n_states, n_states), off_diagonal, **like)
            matrix.fill_diagonal_(INITIAL_SELF_TRANSITION if n_states > 1 else 1.0)
            values["log_Ps"] = matrix.log()
        if config.is_recurrent:
            values["Rs"] = torch.zeros(n_states, n_dims, **like)
        if config.transitions == "recurrent_only":
            values["r"] = torch.zeros(n_states, **like)
        if config.is_studentst:
            values["nus"] = torch.full((n_states,), INITIAL_DOF, **like)
        self._set_parameters(ARHMMParameters(**values))

    def _m_step(self, batch: SequenceBatch, posterior: ForwardBackward) -> None:
        config, p = self.config, self._require_parameters()
        states, joints = posterior.expected_states, posterior.expected_joints
        log_Ps, Rs, r = p.log_Ps, p.Rs, p.r
        if config.transitions == "stationary":
            log_Ps = transitions.stationary_m_step(joints)
        elif config.transitions == "sticky":
            log_Ps = transitions.sticky_m_step(joints, config.kappa, config.alpha)
        else:
            log_Ps, Rs, r = transitions.recurrent_m_step(config.transitions, batch, states.permute(2, 1, 0),
                                                         joints, log_Ps, Rs, r)
        nus = None
        if config.is_studentst:
            As, bs, Sigmas, nus = observations.studentst_m_step(batch, states, p.As, p.bs, p.Sigmas,
                                                                p.nus, config.is_diagonal)
        else:
            As, bs, Sigmas = observations.gaussian_m_step(batch, states * batch.ar_time_mask,
                                                          config.is_diagonal)
        log_pi0 = transitions.initial_state_m_step(states[:, 0].sum(-1))
        self.parameters = ARHMMParameters(log_pi0=log_pi0, As=As, bs=bs, Sigmas=Sigmas,
                                          log_Ps=log_Ps, Rs=Rs, r=r, nus=nus)

    def fit(self, train_sequences: Sequences, n_iters: int | None = None, tol: float | None = None,
            callback: FitCallback | None = None, val_sequences: Sequences | None = None) -> FitHistory:
        """Exact EM (ssm's M-steps), initialising by k-means if the model has no parameters.

        Args:
            train_sequences: sequences to fit.
            n_iters: EM iterations; defaults to ``n_iters`` of the config.
            tol: stop once |ll_i - ll_{i-1}| <= tol |ll_{i-1}| for the training
                log-likelihood; defaults to ``arhmm_es_tol``; 0 runs every iteration.
            callback: see :data:`FitCallback`; it runs before the tolerance check.
            val_sequences: held-out sequences scored after every iteration.

        Raises:
            FloatingPointError: the training log-likelihood became NaN or infinite.
        """
        n_iters = self.config.n_iters if n_iters is None else n_iters
        tol = self.config.arhmm_es_tol if tol is None else tol
        train = self.batch(train_sequences)
        if self.parameters is None:
            self.initialize(train)
        val = None if val_sequences is None else self.batch(val_sequences)

        history = FitHistory()
        posterior = self._e_step(train)
        self._record(history, posterior, val)
        for iteration in range(1, n_iters + 1):
            self._m_step(train, posterior)
            posterior = self._e_step(train)
            train_ll, val_ll = self._record(history, posterior, val)
            if not math.isfinite(train_ll):
                raise FloatingPointError(
                    f"the training log-likelihood is {train_ll} after EM iteration {iteration}")
            if callback is not None and callback(iteration, train_ll, val_ll):
                history.stop_reason = "callback"
                break
            previous = history.train_log_likelihoods[-2]
            if tol > 0 and abs(train_ll - previous) <= tol * abs(previous):
                history.stop_reason = "tolerance"
                break
        return history

    def _record(self, history: FitHistory, posterior: ForwardBackward,
                val: SequenceBatch | None) -> tuple[float, float | None]:
        train_ll = posterior.log_normalizers.double().sum().item()
        val_ll = None if val is None else self.log_likelihood(val)
        history.train_log_likelihoods.append(train_ll)
        history.log_priors.append(self.log_prior())
        if val_ll is not None:
            history.val_log_likelihoods.append(val_ll)
        return train_ll, val_ll

