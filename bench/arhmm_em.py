"""Time per EM iteration and held-out log-likelihood of the ARHMM engine, beside dynamax and ssm.

K=8 states, D=12 dimensions, 1 lag, 100 training sequences of 500 steps (and 20 held-out
ones) sampled from a random ARHMM. Every backend starts from the same k-means
initialisation and runs the same EM iterations: bnet's default (float32) and float64 on the
CPU, both on CUDA when available, ssm (numpy, float64) and dynamax in float32 (jax's
default) and float64 (x64) when they are importable. Neither is a dependency:
``pip install -e '.[bench]'`` adds dynamax (and jax) beside bnet. Each row's ratio is
against dynamax in the same precision on the same device. The backends run in turn, round
after round (``--rounds``), and each keeps its best round's median iteration, so that a
noisy machine's slow spells do not decide the ratios.

Then the size sweep: the default engine on 1x, 4x and 16x the training frames, as more
sequences and as longer ones, in seconds per EM iteration per million frames (flat means
linear in frames), with dynamax float32 beside the more-sequences rows.

    python bench/arhmm_em.py [--iters 10] [--rounds 3] [--threads N] [--sweep 1 4 16] [--no-sweep]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from bnet.models.arhmm import ARHMM, ARHMMConfig, ARHMMParameters
from machine import describe  # the machine the figures were taken on

N_STATES, N_DIMS, N_LAGS = 8, 12, 1
N_TRAIN, N_TEST, N_STEPS = 100, 20, 500
FLOAT32_TOLERANCE = 1e-4
"""How far float32's held-out log-likelihood per step may lie from float64's."""


def ground_truth(seed: int = 0) -> ARHMM:
    """A random stable ARHMM with distinct fixed points and sticky transitions."""
    rng = np.random.default_rng(seed)
    rotations = np.linalg.qr(rng.normal(size=(N_STATES, N_DIMS, N_DIMS)))[0]
    As = rng.uniform(0.8, 0.95, (N_STATES, 1, 1)) * rotations
    fixed_points = 2.0 * rng.normal(size=(N_STATES, N_DIMS)) / np.sqrt(N_DIMS)
    bs = fixed_points - np.einsum("kde,ke->kd", As, fixed_points)
    factors = rng.normal(0, 0.1 / np.sqrt(N_DIMS), (N_STATES, N_DIMS, N_DIMS))
    Sigmas = factors @ factors.transpose(0, 2, 1) + 0.01 * np.eye(N_DIMS)
    P = np.full((N_STATES, N_STATES), 0.05 / (N_STATES - 1))
    np.fill_diagonal(P, 0.95)
    values = {"log_pi0": np.full(N_STATES, -np.log(N_STATES)), "As": As, "bs": bs, "Sigmas": Sigmas,
              "log_Ps": np.log(P)}
    config = ARHMMConfig(n_arhmm_states=N_STATES, n_arhmm_lags=N_LAGS, dtype="float64")
    return ARHMM(config, ARHMMParameters(**{k: torch.tensor(v) for k, v in values.items()}))


def problem(truth: ARHMM, n_train: int, n_steps: int, seed: int = 1):
    """Training and held-out sequences, and the k-means start every backend shares."""
    _, samples = truth.sample(n_steps, n_sequences=n_train + N_TEST, seed=seed)
    train = [x.numpy() for x in samples[:n_train]]
    test = [x.numpy() for x in samples[n_train:]]
    start = ARHMM(ARHMMConfig(n_arhmm_states=N_STATES, n_arhmm_lags=N_LAGS, rng_seed_model=0, dtype="float64"))
    start.initialize(train)
    return train, test, start


def time_engine(train, test, start: ARHMM, n_iters: int, dtype: str, device: str) -> tuple[float, float]:
    model = start.to(dtype=dtype, device=device)
    batch = model.batch(train)
    start.to(dtype=dtype, device=device).fit(batch, n_iters=1)  # warm-up: allocator, kernels
    stamps = [time.perf_counter()]
    # The callback runs after each iteration's M-step and E-step (its .item() synchronises a
    # GPU), so the time between callbacks is one full iteration.
    model.fit(batch, n_iters=n_iters, callback=lambda *_: stamps.append(time.perf_counter()))
    return statistics.median(np.diff(stamps[1:])), model.log_likelihood_per_step(test)


def time_ssm(train, test, start: ARHMM, n_iters: int) -> tuple[float, float]:
    import ssm

    p = {name: t.numpy() for name, t in start.state_dict().items()}
    hmm = ssm.HMM(N_STATES, N_DIMS, observations="ar", observation_kwargs={"lags": N_LAGS})
    hmm.init_state_distn.log_pi0 = p["log_pi0"]
    hmm.transitions.log_Ps = p["log_Ps"]
    hmm.observations.As, hmm.observations.bs = p["As"], p["bs"]
    hmm.observations.Sigmas = p["Sigmas"]
    began = time.perf_counter()
    hmm.fit(train, method="em", num_iters=n_iters, initialize=False, verbose=0)
    elapsed = (time.perf_counter() - began) / n_iters
    return elapsed, hmm.log_likelihood(test) / (sum(len(x) for x in test) * N_DIMS)


def time_dynamax(train, test, start: ARHMM, n_iters: int, precision: str) -> tuple[float, float]:
    import jax

    jax.config.update("jax_enable_x64", precision == "float64")
    import jax.numpy as jnp
    from dynamax.hidden_markov_model import LinearAutoregressiveHMM

    dtype = jnp.float64 if precision == "float64" else jnp.float32
    p = {name: jnp.asarray(t.numpy(), dtype=dtype) for name, t in start.state_dict().items()}
    hmm = LinearAutoregressiveHMM(N_STATES, N_DIMS, num_lags=N_LAGS)
    params, props = hmm.initialize(
        initial_probs=jnp.exp(p["log_pi0"]), transition_matrix=jnp.exp(p["log_Ps"]),
        emission_weights=p["As"], emission_biases=p["bs"], emission_covariances=p["Sigmas"])
    emissions = jnp.asarray(np.stack(train), dtype=dtype)
    inputs = jnp.stack([hmm.compute_inputs(x) for x in emissions])

    # fit_em compiles its loop afresh on every call, so time one EM step compiled once.
    @jax.jit
    def em_step(params, m_step_state):
        stats, lls = jax.vmap(lambda x, u: hmm.e_step(params, x, u))(emissions, inputs)
        params, m_step_state = hmm.m_step(params, props, stats, m_step_state)
        return params, m_step_state, lls.sum()

    m_step_state = hmm.initialize_m_step_state(params, props)
    jax.block_until_ready(em_step(params, m_step_state))  # compile
    seconds = []
    for _ in range(n_iters):
        began = time.perf_counter()
        params, m_step_state, train_ll = em_step(params, m_step_state)
        jax.block_until_ready(train_ll)
        seconds.append(time.perf_counter() - began)
    # dynamax conditions the first frame on zero lags instead of scoring it by N(0, I):
    # its held-out value is close to, not the same quantity as, the others.
    held_out = sum(float(hmm.marginal_log_prob(params, x, inputs=hmm.compute_inputs(x)))
                   for x in (jnp.asarray(x, dtype=dtype) for x in test))
    return statistics.median(seconds), held_out / (sum(len(x) for x in test) * N_DIMS)


def comparison_table(truth: ARHMM, n_iters: int, n_rounds: int) -> None:
    train, test, start = problem(truth, N_TRAIN, N_STEPS)
    print(f"\nARHMM EM: K={N_STATES}, D={N_DIMS}, lags={N_LAGS}, {N_TRAIN} x {N_STEPS} training steps, "
          f"{N_TEST} held-out sequences, {n_iters} iterations per round, best of {n_rounds} rounds")
    print(f"held-out log-likelihood per step and dimension of the generating model: "
          f"{truth.log_likelihood_per_step(test):.5f}")

    def engine(dtype: str, device: str):
        return lambda: time_engine(train, test, start, n_iters, dtype, device)

    def dynamax(precision: str):
        return lambda: time_dynamax(train, test, start, n_iters, precision)

    backends = [("bnet float32 cpu (default)", "cpu", "float32", engine("float32", "cpu")),
                ("bnet float64 cpu", "cpu", "float64", engine("float64", "cpu"))]
    if torch.cuda.is_available():
        backends += [("bnet float32 cuda", "cuda", "float32", engine("float32", "cuda")),
                     ("bnet float64 cuda", "cuda", "float64", engine("float64", "cuda"))]
    backends += [("ssm (numpy, float64)", "cpu", "float64", lambda: time_ssm(train, test, start, n_iters)),
                 ("dynamax float32", "jax", "float32", dynamax("float32")),
                 ("dynamax float64", "jax", "float64", dynamax("float64"))]
    best = {}
    for _ in range(n_rounds):
        for name, device, precision, run in list(backends):
            try:
                seconds, held_out = run()
            except ImportError as error:
                print(f"{name}: skipped ({error.name} is not installed)")
                backends.remove((name, device, precision, run))
                continue
            if name not in best or seconds < best[name][0]:
                best[name] = (seconds, held_out)
    rows = [(name, device, precision, *best[name]) for name, device, precision, _ in backends]
    # jax runs on its default device: the GPU when jax has one, as the CUDA rows do
    jax_device = "cuda" if torch.cuda.is_available() else "cpu"
    dynamax_seconds = {precision: seconds for name, _, precision, seconds, _ in rows if name.startswith("dynamax")}
    print(f"\n{'backend':<28}{'s / EM iteration':>18}{'vs dynamax':>12}{'held-out ll / step':>20}")
    for name, device, precision, seconds, held_out in rows:
        reference = dynamax_seconds.get(precision) if device in ("jax", jax_device) else None
        ratio = f"{reference / seconds:>11.2f}x" if reference and not name.startswith("dynamax") else f"{'-':>12}"
        print(f"{name:<28}{seconds:>18.4f}{ratio}{held_out:>20.5f}")
    held = {(device, precision): held_out for name, device, precision, _, held_out in rows if name.startswith("bnet")}
    gap = abs(held[("cpu", "float32")] - held[("cpu", "float64")])
    print(f"float32 vs float64 held-out ll / step: {gap:.1e} apart "
          f"({'within' if gap <= FLOAT32_TOLERANCE else 'OUTSIDE'} the stated {FLOAT32_TOLERANCE:g})")
    for name, *_, held_out in rows:
        if not np.isfinite(held_out):
            print(f"{name}: EM reached non-finite parameters within {n_iters} iterations")


def size_sweep(truth: ARHMM, n_iters: int, factors: list[int]) -> None:
    print(f"\nSize sweep, the default engine (float32, {torch.get_num_threads()} CPU threads; dynamax float32 "
          f"beside the more-sequences rows): seconds per EM iteration per million training frames")
    print(f"{'frames':>8}{'sequences x steps':>20}{'s / iteration':>15}{'s / it / 1M frames':>20}"
          f"{'dynamax s / it':>16}{'vs dynamax':>12}")
    shapes = [(N_TRAIN * factor, N_STEPS) for factor in factors]
    shapes += [(N_TRAIN, N_STEPS * factor) for factor in factors if factor > 1]
    for n_train, n_steps in shapes:
        train, test, start = problem(truth, n_train, n_steps)
        seconds, _ = time_engine(train, test, start, n_iters, "float32", "cpu")
        frames = n_train * n_steps
        line = f"{frames:>8}{f'{n_train} x {n_steps}':>20}{seconds:>15.4f}{seconds / frames * 1e6:>20.3f}"
        if n_steps == N_STEPS:
            try:
                theirs, _ = time_dynamax(train, test, start, n_iters, "float32")
                line += f"{theirs:>16.4f}{theirs / seconds:>11.2f}x"
            except ImportError:
                pass
        print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=10, help="EM iterations per backend (at least 2)")
    parser.add_argument("--rounds", type=int, default=3, help="turns each backend takes in the comparison")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--sweep", type=int, nargs="+", default=[1, 4, 16],
                        help="multiples of the training frames the size sweep runs")
    parser.add_argument("--no-sweep", action="store_true", help="only the comparison table")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(describe(), flush=True)
    truth = ground_truth()
    comparison_table(truth, args.iters, args.rounds)
    if not args.no_sweep:
        size_sweep(truth, args.iters, args.sweep)


if __name__ == "__main__":
    main()
