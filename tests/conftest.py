import os
import shutil
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# the developer's own servers and stores stay out of the tests (tests that want one set it)
for _name in ("MLFLOW_TRACKING_URI", "BNET_TRACKING_URI", "BNET_STORE", "BNET_OPTUNA_STORAGE"):
    os.environ.pop(_name, None)
# `pytest -n N` (make test): N test processes share the cores. Each one's torch, and every bnet
# command a test starts (through the environment), takes its share instead of every core, which
# would oversubscribe them; set before torch is first imported
_PROCESSES = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _PROCESSES > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _PROCESSES)))

from bnet.data import SynthConfig, synthesize  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"

TINY = SynthConfig(n_trials=12, n_frames=20, y_pixels=16, x_pixels=16, n_channels=1, n_neurons=10,
                   n_states=3, seed=3)


def run_cli(*args):
    """``bnet ARGS`` run in this process; its click Result, whatever the exit code."""
    from click.testing import CliRunner

    from bnet.cli.main import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def invoke(*args, code: int = 0) -> str:
    """``bnet ARGS`` run in this process: its output, once it exited with ``code`` and
    printed no traceback."""
    result = run_cli(*args)
    assert result.exit_code == code, result.output + repr(result.exception)
    assert "Traceback" not in result.output, result.output
    return result.output


def assert_clean_failure(result, *fragments, store=None, code=1):
    """A command that failed as bnet promises: exit ``code`` (1 for bad data or a failed
    run, 2 for a usage error), a message holding every fragment, no traceback, nothing
    written to ``store``."""
    assert result.exit_code == code, result.output + repr(result.exception)
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}"
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, result.output
    if store is not None:
        assert not store.exists(), "a failed command wrote to the store"


@pytest.fixture(scope="session")
def tiny_session(tmp_path_factory) -> Path:
    """A 12-trial, 16x16 synthetic session shared by the tests (read-only)."""
    return synthesize(tmp_path_factory.mktemp("data") / "tiny.hdf5", TINY)


@pytest.fixture
def store_dir(tmp_path) -> Path:
    return tmp_path / "store"


def write_session(path: Path, trials: dict[str, dict[str, np.ndarray]]) -> Path:
    """A session file from {group: {dataset name: array}} (for crafting bad files)."""
    with h5py.File(path, "w") as f:
        for group, members in trials.items():
            g = f.create_group(group)
            for name, value in members.items():
                g.create_dataset(name, data=value)
    return path


def frames(n: int, c: int = 1, y: int = 16, x: int = 16, dtype=np.uint8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, size=(n, c, y, x)).astype(dtype)


@pytest.fixture(scope="module")
def postgres():
    """A local PostgreSQL server (bnet.tracking.local_postgres) for one test module; skipped
    where none is installed."""
    from bnet.tracking.local_postgres import LocalPostgres, postgres_binaries

    if postgres_binaries() is None:
        pytest.skip("no PostgreSQL server installed (apt-get install postgresql; .ci/run does)")
    root = tempfile.mkdtemp(prefix="bnet-pg-")  # the postgres user cannot enter pytest's root-only folders
    server = LocalPostgres(root).start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
