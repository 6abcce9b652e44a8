"""Time per EM iteration and held-out log-likelihood of the batched ARHMM engine.

K=8 states, D=12 dimensions, 1 lag, 100 training sequences of 500 steps (and 20 held-out
ones) sampled from a random ARHMM. Every backend starts from the same k-means
initialisation and runs the same number of EM iterations: float64 and float32 on the CPU,
CUDA when available, and ssm and dynamax when they are importable (neither is a
dependency). Prints a table; ratios are relative to this engine in float64 on the CPU.

    python bench/arhmm_em.py [--iters 10] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from bnet.models.arhmm import ARHMM, ARHMMConfig, ARHMMParameters

N_STATES, N_DIMS, N_LAGS = 8, 12, 1
N_TRAIN, N_TEST, N_STEPS = 100, 20, 500


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
    config = ARHMMConfig(n_arhmm_states=N_STATES, n_arhmm_lags=N_LAGS)
    return ARHMM(config, ARHMMParameters(**{k: torch.tensor(v) for k, v in values.items()}))


def time_engine(train, test, start: ARHMM, n_iters: int, dtype: str, device: str) -> tuple[float, float]:
    start.to(dtype=dtype, device=device).fit(train, n_iters=1)  # warm-up: allocator, kernels
    model = start.to(dtype=dtype, device=device)
    stamps = []
    # The callback runs after each iteration's M-step and E-step (its .item() synchronises a
    # GPU), so the time between callbacks is one full iteration, without the padding.
    model.fit(train, n_iters=n_iters, callback=lambda *_: stamps.append(time.perf_counter()))
    return (stamps[-1] - stamps[0]) / (n_iters - 1), model.log_likelihood_per_step(test)


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


def time_dynamax(train, test, start: ARHMM, n_iters: int) -> tuple[float, float]:
    import jax

    jax.config.update("jax_enable_x64", True)  # the same precision as the other float64 rows
    import jax.numpy as jnp
    from dynamax.hidden_markov_model import LinearAutoregressiveHMM

    p = {name: t.numpy() for name, t in start.state_dict().items()}
    hmm = LinearAutoregressiveHMM(N_STATES, N_DIMS, num_lags=N_LAGS)
    params, props = hmm.initialize(
        initial_probs=jnp.exp(p["log_pi0"]), transition_matrix=jnp.exp(p["log_Ps"]),
        emission_weights=jnp.asarray(p["As"]), emission_biases=jnp.asarray(p["bs"]),
        emission_covariances=jnp.asarray(p["Sigmas"]))
    emissions = jnp.stack(train)
    inputs = jnp.stack([hmm.compute_inputs(x) for x in emissions])

    # fit_em compiles its loop afresh on every call, so time one EM step compiled once.
    @jax.jit
    def em_step(params, m_step_state):
        stats, lls = jax.vmap(lambda x, u: hmm.e_step(params, x, u))(emissions, inputs)
        params, m_step_state = hmm.m_step(params, props, stats, m_step_state)
        return params, m_step_state, lls.sum()

    m_step_state = hmm.initialize_m_step_state(params, props)
    jax.block_until_ready(em_step(params, m_step_state))  # compile
    began = time.perf_counter()
    for _ in range(n_iters):
        params, m_step_state, train_ll = em_step(params, m_step_state)
    jax.block_until_ready(train_ll)
    elapsed = (time.perf_counter() - began) / n_iters
    # dynamax conditions the first frame on zero lags instead of scoring it by N(0, I):
    # its held-out value is close to, not the same quantity as, the others.
    held_out = sum(float(hmm.marginal_log_prob(params, x, inputs=hmm.compute_inputs(x)))
                   for x in map(jnp.asarray, test))
    return elapsed, held_out / (sum(len(x) for x in test) * N_DIMS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=10, help="EM iterations per backend (at least 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    truth = ground_truth()
    _, samples = truth.sample(N_STEPS, n_sequences=N_TRAIN + N_TEST, seed=1)
    train = [x.numpy() for x in samples[:N_TRAIN]]
    test = [x.numpy() for x in samples[N_TRAIN:]]
    start = ARHMM(ARHMMConfig(n_arhmm_states=N_STATES, n_arhmm_lags=N_LAGS, rng_seed_model=0))
    start.initialize(train)

    print(f"ARHMM EM: K={N_STATES}, D={N_DIMS}, lags={N_LAGS}, {N_TRAIN} x {N_STEPS} training steps, "
          f"{N_TEST} held-out sequences, {args.iters} timed iterations, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU thread(s)")
    print(f"held-out log-likelihood per step and dimension of the generating model: "
          f"{truth.log_likelihood_per_step(test):.5f}")
    def engine(dtype: str, device: str):
        return lambda: time_engine(train, test, start, args.iters, dtype, device)

    backends = [("bnet float64 cpu", engine("float64", "cpu")),
                ("bnet float32 cpu", engine("float32", "cpu"))]
    if torch.cuda.is_available():
        backends += [("bnet float32 cuda", engine("float32", "cuda")),
                     ("bnet float64 cuda", engine("float64", "cuda"))]
    else:
        print("CUDA: not available on this machine")
    backends += [("ssm (numpy, float64)", lambda: time_ssm(train, test, start, args.iters)),
                 ("dynamax (jax)", lambda: time_dynamax(train, test, start, args.iters))]

    rows = []
    for name, run in backends:
        try:
            rows.append((name, *run()))
        except ImportError as error:
            print(f"{name}: skipped ({error.name} is not installed)")
    reference = rows[0][1]
    print(f"\n{'backend':<24}{'s / EM iteration':>18}{'vs float64 cpu':>16}{'held-out ll / step':>20}")
    for name, seconds, held_out in rows:
        print(f"{name:<24}{seconds:>18.4f}{reference / seconds:>15.2f}x{held_out:>20.5f}")
    for name, _, held_out in rows:
        if not np.isfinite(held_out):
            print(f"{name}: EM reached non-finite parameters within {args.iters} iterations")


if __name__ == "__main__":
    main()
