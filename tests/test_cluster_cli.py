"""Workers on a cluster (issue 18): `bnet server --host 0.0.0.0` accepts workers that name it
by IP or domain name, `--n-workers K` exits 130 when stopped, `bnet slurm` writes no secret
into its script and keeps `--sbatch-opts` options with their values."""

import base64
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.server.security_utils import get_default_allowed_hosts

from bnet.errors import ConfigError
from bnet.tracking.local_postgres import free_port, wait_for_port
from conftest import invoke

PG = "postgresql+psycopg://bnet@db.example:5432/optuna"
SECRET_PG = "postgresql+psycopg://bnet:hunter2@db.example:5432/optuna"


# -------------------------------------------------- bnet server: allowed Host headers

def kernel_ipv4_addresses() -> set[str]:
    """This machine's IPv4 addresses as Linux lists them (empty elsewhere), not through bnet."""
    try:
        lines = Path("/proc/net/fib_trie").read_text().splitlines()
    except OSError:
        return set()
    return {previous.split("|--")[1].strip() for previous, line in zip(lines, lines[1:])
            if "/32 host LOCAL" in line and "|--" in previous}


def test_allowed_hosts_keep_mlflows_defaults_and_add_the_machines_names():
    from bnet.cli.server import allowed_hosts

    names = ["node7", "node7.cluster.example.org", "203.0.113.7", "2001:db8::7"]
    hosts = allowed_hosts(5000, names, extra=["mlflow.lab.example", "proxy.example:8443,gw.example"])
    assert set(get_default_allowed_hosts()) <= set(hosts)  # localhost, 127.0.0.1 and the private ranges
    assert {"localhost", "localhost:*", "127.0.0.1", "10.*", "192.168.*", "172.16.*", "172.31.*"} <= set(hosts)
    for name in ("node7", "node7.cluster.example.org", "203.0.113.7"):
        assert name in hosts and f"{name}:5000" in hosts
    assert "[2001:db8::7]" in hosts and "[2001:db8::7]:5000" in hosts  # how a Host header writes IPv6
    assert {"mlflow.lab.example", "mlflow.lab.example:5000", "proxy.example:8443", "gw.example"} <= set(hosts)
    assert len(hosts) == len(set(hosts)) and "*" not in hosts and all("," not in h for h in hosts)


def test_machine_names_hold_the_hostname_fqdn_and_every_address():
    from bnet.cli.server import machine_names

    names = machine_names()
    assert socket.gethostname() in names and socket.getfqdn() in names
    assert kernel_ipv4_addresses() <= set(names)


@pytest.mark.slow
def test_a_server_on_every_interface_answers_workers_that_name_it_by_ip_or_fqdn(tmp_path):
    port = free_port()
    (tmp_path / "admin").write_text("a-long-admin-password\n")
    server = subprocess.Popen([sys.executable, "-m", "bnet", "server", "--store", str(tmp_path / "store"),
                               "--host", "0.0.0.0", "--port", str(port), "--allowed-host", "mlflow.lab.example",
                               "--admin-password-file", str(tmp_path / "admin")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    admin = "Basic " + base64.b64encode(b"admin:a-long-admin-password").decode()

    def status(host: str) -> int:
        # always to 127.0.0.1: only the Host header says which name the worker used
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            connection.request("GET", "/api/2.0/mlflow/experiments/search?max_results=1",
                               headers={"Host": host, "Authorization": admin})
            return connection.getresponse().status
        finally:
            connection.close()

    try:
        deadline = time.time() + 120
        while server.poll() is None and time.time() < deadline and not wait_for_port(port, 1):
            pass
        assert server.poll() is None, server.communicate()[0]
        addresses = {a for a in kernel_ipv4_addresses() if not a.startswith("127.")} or {"127.0.0.1"}
        named = [socket.getfqdn(), socket.gethostname(), "localhost", "10.1.2.3", "mlflow.lab.example",
                 *sorted(addresses)]
        for name in named:
            assert status(f"{name}:{port}") == 200, name
            assert status(name) == 200, name
        assert status("evil.example.com") == 403 and status(f"evil.example.com:{port}") == 403
    finally:
        server.send_signal(signal.SIGTERM)
        output = server.communicate(timeout=60)[0]
    assert "workers join with" in output, output


# -------------------------------------------------- --n-workers K: exit 130 when stopped

@pytest.mark.parametrize("codes, signalled, outcome", [
    ([0, 0], False, "finished"),
    ([0, 0], True, "finished"),
    ([130, 130], True, "interrupted"),
    ([0, 130], True, "interrupted"),  # one had finished its share when the signal came
    ([-signal.SIGTERM, 130], True, "interrupted"),  # one was still starting up
    ([130, 130], False, "interrupted"),  # Slurm signals every process of the job, not only bnet's
    ([1, 130], True, "failed"),  # an error is not hidden by a later stop
    ([2, 0], False, "failed"),
    ([-signal.SIGKILL, 0], False, "failed"),
    ([-signal.SIGKILL, 130], True, "failed"),
])
def test_workers_outcome_from_their_exit_codes(codes, signalled, outcome):
    from bnet.cli.workers import workers_outcome

    assert workers_outcome(codes, signalled) == outcome


LONG_STUDY = """
experiment: stopped
model: {model_class: neural-labels, n_lags: 0, n_hid_layers: 0}
training: {learning_rate: 1.0e-2, max_n_epochs: 1000, min_n_epochs: 1000}
tuning: {n_trials: 4, pruner: none, seed: 0}
"""


@pytest.mark.slow
@pytest.mark.postgres
def test_sigterm_stops_several_workers_with_exit_130(postgres, tmp_path, tiny_session):
    config = tmp_path / "study.yaml"
    config.write_text(LONG_STUDY)
    storage, tracking = postgres.create_database("stopped_optuna"), postgres.create_database("stopped_mlflow")
    group = subprocess.Popen([sys.executable, "-m", "bnet", "tune", "decoder", "--data", str(tiny_session),
                              "--target", "labels", "--config", str(config), "--storage", storage,
                              "--tracking-uri", tracking, "--store", str(tmp_path / "store"), "--n-workers", "2"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 300
        running = []
        while len(running) < 2 and time.time() < deadline and group.poll() is None:
            time.sleep(0.5)
            try:
                study = optuna.load_study(study_name="stopped", storage=storage)
            except KeyError:
                continue
            running = [t for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
                       if t.intermediate_values]
        assert len(running) == 2, "both workers should be fitting a trial"
        group.send_signal(signal.SIGTERM)
        output = group.communicate(timeout=300)[0]
    finally:
        if group.poll() is None:
            os.killpg(group.pid, signal.SIGKILL)
    assert group.returncode == 130, output
    parents = [line for line in output.splitlines() if not line.startswith("[worker ")]
    assert any(line.startswith("interrupted: finished trials are kept") for line in parents), output
    assert "workers exited with" not in output
    assert output.count("SIGTERM: stopping") == 2, output


# -------------------------------------------------- bnet slurm: no secrets, whole options

def run_script_command(text: str, env: dict[str, str]) -> list[str]:
    """The words the script's last line would exec, as bash expands them."""
    body = text.replace("exec ", "printf '%s\\n' ", 1)
    result = subprocess.run(["bash", "-c", body], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_slurm_script_holds_no_password(tmp_path, tiny_session, monkeypatch):
    monkeypatch.setenv("BNET_TRACKING_URI", "http://bnet:envsecret@mlflow.example:5000")
    monkeypatch.setenv("BNET_STORE", str(tmp_path / "store"))
    script = tmp_path / "job.sbatch"
    output = invoke("slurm", "tune", "ae", "--data", tiny_session, "--storage", SECRET_PG, "--array", 4,
                    "--script", script)
    text = script.read_text()
    assert "hunter2" not in text and "envsecret" not in text and "hunter2" not in output
    assert "inherited from the submitting shell" in text
    assert "BNET_TRACKING_URI" in text and "BNET_STORE" in text  # named, not copied
    assert not any(line.startswith("export ") for line in text.splitlines())
    assert "export BNET_OPTUNA_STORAGE" in output  # the note telling the user what to set
    command = text.splitlines()[-1]
    assert '--storage "$BNET_OPTUNA_STORAGE"' in command and "--data" in command
    env = {"PATH": os.environ["PATH"], "BNET_OPTUNA_STORAGE": SECRET_PG}
    words = run_script_command(text, env)
    assert words[words.index("--storage") + 1] == SECRET_PG
    # without the variable the task stops at once, saying what to export
    result = subprocess.run(["bash", "-c", text.replace("exec ", "echo ", 1)], env={"PATH": os.environ["PATH"]},
                            capture_output=True, text=True)
    assert result.returncode != 0 and "BNET_OPTUNA_STORAGE" in result.stderr


def test_slurm_keeps_urls_without_password_as_they_are(tmp_path, tiny_session, monkeypatch):
    monkeypatch.delenv("BNET_TRACKING_URI", raising=False)
    text = invoke("slurm", "tune", "ae", "--data", tiny_session, f"--storage={PG}", "--tracking-uri",
                  "http://mlflow.example:5000", "--array", 2, "--dry-run")
    command = text.splitlines()[-1]
    assert f"--storage={PG}" in command and "--tracking-uri http://mlflow.example:5000" in command
    assert "$BNET_" not in text


def test_slurm_passwords_of_tracking_uri_and_equals_form_go_to_the_environment(tiny_session):
    text = invoke("slurm", "worker", "--study", "s", f"--storage={SECRET_PG}", "--tracking-uri",
                  "postgresql+psycopg://bnet:pw2@db.example/mlflow", "--array", 2, "--dry-run")
    assert "hunter2" not in text and "pw2" not in text
    command = text.splitlines()[-1]
    assert '--storage "$BNET_OPTUNA_STORAGE"' in command and '--tracking-uri "$BNET_TRACKING_URI"' in command


@pytest.mark.parametrize("opts, lines", [
    ("--time 12:00:00", ["--time=12:00:00"]),
    ("--gres=gpu:1 --time=12:00:00", ["--gres=gpu:1", "--time=12:00:00"]),
    ("-p gpu --gres gpu:1 --exclusive -N 1", ["-p gpu", "--gres=gpu:1", "--exclusive", "-N 1"]),
    ("--exclusive --mem 16G", ["--exclusive", "--mem=16G"]),
    ("--comment 'two words' --nice -5", ['--comment="two words"', "--nice=-5"]),
    ("--comment='say \"hi\"' -J x", ['--comment="say \\"hi\\""', "-J x"]),
    ("", []),
])
def test_sbatch_options_keep_their_values(opts, lines):
    from bnet.cli.workers import sbatch_lines

    assert sbatch_lines(opts) == lines


@pytest.mark.parametrize("opts", ["gpu:1", "--time 12:00:00 extra", "-N2 4", "--time '1:00"])
def test_sbatch_options_that_cannot_be_written_are_refused(opts):
    from bnet.cli.workers import sbatch_lines

    with pytest.raises(ConfigError, match="--sbatch-opts"):
        sbatch_lines(opts)


def test_slurm_script_writes_separate_option_values_on_one_line(tiny_session):
    text = invoke("slurm", "tune", "ae", "--data", tiny_session, "--storage", PG, "--array", 2, "--dry-run",
                  "--sbatch-opts", "--time 12:00:00 -p gpu --gres=gpu:1 --exclusive")
    directives = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert directives[3:] == ["#SBATCH --time=12:00:00", "#SBATCH -p gpu", "#SBATCH --gres=gpu:1",
                              "#SBATCH --exclusive"]
    assert "#SBATCH 12:00:00" not in text and "#SBATCH gpu" not in text
