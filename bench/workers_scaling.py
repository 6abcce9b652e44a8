"""Trials per hour with 1, 2 and 4 workers on one tiny study, and MLflow logging latency.

Every row runs the same fixed decoder study (synthetic session, 40 epochs a trial) from a
fresh database: SQLite with one worker (the embedded default; it serves one process), then
PostgreSQL (a throwaway local server) with 1, 2 and 4 workers (`--n-workers`). Then the
latency of one batched `log_metrics` call into the embedded SQLite store, straight into
PostgreSQL, and through `bnet server` over HTTP. On a 2-core machine the CPUs saturate at 2
workers: the figures say how much of the step is the trials' own compute.

    python bench/workers_scaling.py [--trials 16]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bnet.data import SynthConfig, synthesize
from bnet.tracking.local_postgres import LocalPostgres, free_port, wait_for_port
from bnet.tracking.store import resolve_store
from bnet.tracking.tracker import Tracker
from machine import describe  # the machine the figures were taken on

STUDY = """
experiment: scaling
model: {{model_class: neural-labels, n_lags: 1, n_hid_layers: 1, n_hid_units: 32}}
training: {{learning_rate: {{low: 1.0e-3, high: 3.0e-2, log: true}}, max_n_epochs: 40, min_n_epochs: 40}}
tuning: {{n_trials: {n}, pruner: none, seed: 0}}
"""


def run_study(root: Path, data: Path, n_trials: int, workers: int, storage: str | None, tracking: str | None) -> float:
    config = root / f"study-{workers}-{storage is not None}.yaml"
    config.write_text(STUDY.format(n=n_trials))
    command = [sys.executable, "-m", "bnet", "tune", "decoder", "--data", str(data), "--target", "labels",
               "--config", str(config), "--store", str(root / f"store-{workers}-{storage is not None}"),
               "--n-workers", str(workers)]
    if storage:
        command += ["--storage", storage, "--tracking-uri", tracking]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode:
        raise SystemExit(result.stdout[-3000:] + result.stderr[-3000:])
    return n_trials / seconds * 3600


def logging_latency(store, calls: int = 50) -> float:
    tracker = Tracker(store)
    run = tracker.create_run(tracker.experiment("latency"), "latency", {})
    times = []
    for step in range(calls):
        started = time.perf_counter()
        run.log_metrics({"train_loss": 0.5, "val_loss": 0.4, "epoch_val_r2": 0.1}, step=step)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    args = parser.parse_args()
    print(describe(), flush=True)
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        root = Path(tmp)
        root.chmod(0o755)  # the PostgreSQL server runs as its own user
        data = synthesize(root / "data.hdf5", SynthConfig(n_trials=20, n_frames=50, y_pixels=16, x_pixels=16,
                                                          n_neurons=30, seed=0))
        server = LocalPostgres(root / "pg").start()
        try:
            rows = [("SQLite (embedded)", 1, run_study(root, data, args.trials, 1, None, None))]
            for workers in (1, 2, 4):
                storage = server.create_database(f"optuna_{workers}")
                tracking = server.create_database(f"mlflow_{workers}")
                rows.append(("PostgreSQL", workers, run_study(root, data, args.trials, workers, storage, tracking)))
            print(f"{args.trials} trials of a 40-epoch decoder study (each row a fresh database):")
            base = rows[1][2]
            for backend, workers, rate in rows:
                print(f"  {backend:18s} {workers} worker(s): {rate:8.0f} trials/hour  ({rate / base:.2f}x PostgreSQL x1)")

            embedded = logging_latency(resolve_store(root / "latency-store"))
            direct = logging_latency(resolve_store(root / "latency-pg", tracking_uri=server.create_database("mlflow_lat")))
            port = free_port()
            served = subprocess.Popen([sys.executable, "-m", "bnet", "server", "--store", str(root / "served"),
                                       "--backend-store-uri", server.create_database("mlflow_served"),
                                       "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                if not wait_for_port(port):
                    raise SystemExit(f"bnet server did not listen on {port}")
                http = logging_latency(resolve_store(root / "latency-http", tracking_uri=f"http://127.0.0.1:{port}"))
            finally:
                served.terminate()
                served.wait(timeout=60)
            print("median latency of one batched log_metrics call (3 metrics):")
            print(f"  embedded SQLite {embedded:6.1f} ms,  PostgreSQL direct {direct:6.1f} ms,  "
                  f"bnet server over HTTP {http:6.1f} ms ({http / embedded:.1f}x embedded)")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
