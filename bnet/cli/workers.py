"""Several workers on one study: ``--n-workers K``, ``bnet worker`` and ``bnet slurm``.

bnet coordinates nothing itself: every worker runs the same study against one Optuna
storage and one MLflow tracking URI, and the database hands out the trials.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading

import click

from bnet.cli.options import device_option, echo, resolve, storage_option, store_option, tracking_uri_option
from bnet.tracking.secrets import holds_password, redact

SQLITE_FOR_ONE = (
    "the Optuna storage {url} is an embedded SQLite file, which serves one process (Optuna's FAQ "
    "advises against parallel writers): give the workers a PostgreSQL --storage "
    "(postgresql+psycopg://USER@HOST:PORT/DB; the README shows a local database in one command)"
)


def refuse_sqlite_for_many(storage_url: str) -> None:
    from bnet.errors import ConfigError

    if storage_url.startswith("sqlite"):
        raise ConfigError(SQLITE_FOR_ONE.format(url=storage_url))


def command_line(ctx: click.Context, drop: tuple[str, ...] = ("n_workers",)) -> list[str]:
    """The bnet command being run, rebuilt from its parsed options (minus ``drop``). Values
    read from the environment stay there: the workers inherit it, and a password in a URL
    must not reach a command line or a script."""
    words = ctx.command_path.split()[1:]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.name in drop or value is None or value is False or param.name == "help":
            continue
        if ctx.get_parameter_source(param.name) == click.core.ParameterSource.ENVIRONMENT:
            continue
        if isinstance(param, click.Argument):
            words.append(str(value))
        elif getattr(param, "is_flag", False):
            words.append(param.opts[0])
        else:
            words += [param.opts[0], str(value)]
    return words


def run_workers(n_workers: int, words: list[str]) -> None:
    """Start ``n_workers`` processes of ``bnet <words>``, prefix their output, wait for all;
    SIGTERM or Ctrl-C is passed on so each stops its trial cleanly."""
    from bnet.errors import BnetError

    kept, hidden = hide_secret_urls(words)
    command = [sys.executable, "-m", "bnet", *kept]
    env = dict(os.environ, PYTHONUNBUFFERED="1", **hidden)
    # K processes each running torch on every core oversubscribe the machine: share the cores
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n_workers)))
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                  start_new_session=True) for _ in range(n_workers)]
    passed = f" (and {', '.join(sorted(hidden))} in their environment)" if hidden else ""
    click.echo(f"{n_workers} workers: {shlex.join(['bnet', *kept])}{passed}")

    def relay(index: int, process: subprocess.Popen) -> None:
        for line in process.stdout:
            click.echo(f"[worker {index}] {redact(line.rstrip())}")

    relays = [threading.Thread(target=relay, args=(i, p), daemon=True) for i, p in enumerate(processes)]
    for thread in relays:
        thread.start()

    signalled = []

    def pass_on(signum, frame):
        signalled.append(signum)
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, pass_on) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        codes = [process.wait() for process in processes]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for thread in relays:
            thread.join(timeout=5)
    outcome = workers_outcome(codes, bool(signalled))
    if outcome == "interrupted":
        raise KeyboardInterrupt  # bnet's exit 130, as one worker stopped the same way
    if outcome == "failed":
        raise BnetError(f"workers exited with {codes}; finished trials are kept, re-run to resume")
    click.echo(f"{n_workers} workers finished")


# how a worker ends when SIGTERM or Ctrl-C stops it: bnet's exit 130 once its trial is stopped,
# or killed by the signal itself while it was still starting up
STOPPED_CODES = {130, -signal.SIGTERM, -signal.SIGINT}


def workers_outcome(codes: list[int], signalled: bool) -> str:
    """"finished", "interrupted" (stopped by a signal: re-run to resume) or "failed", from the
    workers' exit codes and whether bnet itself was signalled."""
    unfinished = [code for code in codes if code != 0]
    if not unfinished:
        return "finished"
    # a failure before the stop must not pass for an interruption; Slurm signals every process
    # of a job, so workers stopped without bnet's own signal are interrupted all the same
    if all(code in STOPPED_CODES for code in unfinished) and (signalled or 130 in unfinished):
        return "interrupted"
    return "failed"


n_workers_option = click.option(
    "--n-workers", type=click.IntRange(min=1), default=1, show_default=True,
    help="Worker processes on this machine, all on the same study (needs a PostgreSQL --storage).")


@click.command()
@click.option("--study", required=True, help="The Optuna study to join (started by bnet tune).")
@storage_option
@store_option
@tracking_uri_option
@click.option("--data", "data_path", type=click.Path(dir_okay=False), default=None,
              help="The session file where this machine sees it [default the path the study recorded].")
@click.option("--n-trials", type=click.IntRange(min=1), default=None, help="Top the study up to this many.")
@device_option("the family's")
@n_workers_option
def worker(study, storage, store, tracking_uri, data_path, n_trials, device, n_workers):
    """Join a study from any machine: same family, data, config and upstream runs as recorded."""
    from bnet.cli.tune import summary
    from bnet.tuning.tune import join_study

    resolved = resolve(store, tracking_uri, storage)
    if n_workers > 1:
        refuse_sqlite_for_many(resolved.optuna_storage)
        run_workers(n_workers, command_line(click.get_current_context()))
        return
    for outcome in join_study(study, resolved, data_path, n_trials, device, echo):
        summary(outcome, resolved)


SCRIPT = """#!/bin/bash
#SBATCH --job-name={name}
#SBATCH --array=0-{last}
#SBATCH --output={log}
{options}
# {count} workers of one Optuna study; the database hands out the trials, so every array
# task runs the same command. A preempted or timed-out task gets SIGTERM: its running
# trial stops at the end of an epoch and is queued again for another worker.
# The environment is inherited from the submitting shell (sbatch's default --export=ALL),
# BNET_* variables included{names}; no value of theirs is written here.
set -euo pipefail
{required}exec {command}
"""

# The URL options that may hold a password, and the variable bnet also reads each URL from
URL_OPTIONS = {"--storage": "BNET_OPTUNA_STORAGE", "--tracking-uri": "BNET_TRACKING_URI"}


def hide_secret_urls(words: list[str]) -> tuple[list[str], dict[str, str]]:
    """``words`` without the URL options whose URL holds a password, and those URLs by the
    variable in URL_OPTIONS that bnet also reads each from: a worker gets them in its
    environment, never on a command line (``ps`` shows it to every user) or in a script."""
    hidden, kept = {}, []
    index = 0
    while index < len(words):
        word = words[index]
        option, equals, value = word.partition("=")
        if equals and option in URL_OPTIONS and holds_password(value):
            hidden[URL_OPTIONS[option]] = value
        elif word in URL_OPTIONS and index + 1 < len(words) and holds_password(words[index + 1]):
            hidden[URL_OPTIONS[word]] = words[index + 1]
            index += 1
        else:
            kept.append(word)
        index += 1
    return kept, hidden


def script_command(words: list[str]) -> tuple[str, dict[str, str]]:
    """The shell command line running ``bnet <words>``, each URL with a password replaced by a
    reference to the variable in URL_OPTIONS; and those variables with the URLs they stand for."""
    kept, hidden = hide_secret_urls(words)
    references = [f'{option} "${variable}"' for option, variable in URL_OPTIONS.items() if variable in hidden]
    return " ".join([shlex.join([sys.executable, "-m", "bnet", *kept]), *references]), hidden


def sbatch_lines(sbatch_opts: str) -> list[str]:
    """``--sbatch-opts`` as the options of #SBATCH lines, one each: a word that is no option is
    the value of the option before it (``--time 12:00:00`` -> ``--time=12:00:00``, ``-p gpu``)."""
    import re

    from bnet.errors import ConfigError

    try:
        words = shlex.split(sbatch_opts)
    except ValueError as err:
        raise ConfigError(f"--sbatch-opts {sbatch_opts!r}: {err}") from None
    options: list[list[str]] = []  # [option] or [option, value]
    for word in words:
        if word.startswith("-") and not re.fullmatch(r"-\d+", word):  # --nice -5: a negative value
            option, equals, value = word.partition("=") if word.startswith("--") else (word, "", "")
            options.append([option, value] if equals else [option])
        # --time=12:00:00 and -N2 have their value already
        elif options and len(options[-1]) == 1 and (options[-1][0].startswith("--") or len(options[-1][0]) == 2):
            options[-1].append(word)
        else:
            raise ConfigError(f"--sbatch-opts {sbatch_opts!r}: {word!r} follows no option that takes a value")
    lines = []
    for option, *value in options:
        if value and (not value[0] or re.search(r"[\s\"'\\]", value[0])):
            # sbatch reads #SBATCH lines with quotes and backslash escapes, like a shell
            value = ['"' + value[0].replace("\\", "\\\\").replace('"', '\\"') + '"']
        lines.append(option if not value else f"{option}={value[0]}" if option.startswith("--")
                     else f"{option} {value[0]}")
    return lines


@click.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": True})
@click.option("--array", "count", type=click.IntRange(min=1), required=True, help="Workers (array tasks).")
@click.option("--sbatch-opts", default="", help='More sbatch options, e.g. "--gres=gpu:1 --time=12:00:00".')
@click.option("--script", type=click.Path(dir_okay=False), default=None, help="Write the script here [default print].")
@click.option("--submit", is_flag=True, help="Submit it with sbatch.")
@click.option("--dry-run", is_flag=True, help="Only print the script.")
@click.option("--log", default="bnet-%A_%a.log", show_default=True, help="sbatch --output pattern.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED, required=True)
def slurm(count, sbatch_opts, script, submit, dry_run, log, command):
    """Write (and with --submit, submit) an sbatch array script whose tasks are workers of one
    study: bnet slurm tune ae --data ... --storage postgresql://... --array 8."""
    import shutil
    from pathlib import Path

    from bnet.errors import ConfigError

    words = list(command)
    context = _checked(words)
    options = context.params
    storage = resolve(options.get("store"), options.get("tracking_uri"), options.get("storage"))
    if count > 1:
        refuse_sqlite_for_many(storage.optuna_storage)
    if storage.tracking_uri.startswith("sqlite"):
        click.echo(f"note: the MLflow store {redact(storage.tracking_uri)} must be on a filesystem every node shares; "
                   f"an mlflow server (bnet server) is the robust choice", err=True)
    name = "bnet-" + (options.get("study") or options.get("experiment") or "-".join(words[:2]))
    # a script is read by others and kept in job records: a password stays in the environment
    command_text, hidden = script_command(words)
    inherited = sorted({*(k for k in os.environ if k.startswith("BNET_")), *hidden})
    text = SCRIPT.format(
        name=name, last=count - 1, count=count, log=log,
        options="\n".join(f"#SBATCH {option}" for option in sbatch_lines(sbatch_opts)),
        names=f" ({', '.join(inherited)})" if inherited else "",
        required="".join(f': "${{{variable}:?export {variable} (the {option} URL) before sbatch}}"\n'
                         for option, variable in URL_OPTIONS.items() if variable in hidden),
        command=command_text)
    for option, variable in URL_OPTIONS.items():
        if variable in hidden:
            where = ("bnet gives it to sbatch" if submit and not dry_run else
                     f"export {variable}='<that URL>' in the shell that runs sbatch")
            click.echo(f"note: the {option} URL holds a password, so the script reads it from ${variable}: "
                       f"{where}", err=True)
    if script:
        Path(script).write_text(text)
        click.echo(f"wrote {script}")
    if dry_run or not (script or submit):
        click.echo(text, nl=False)
    if submit and not dry_run:
        if shutil.which("sbatch") is None:
            raise ConfigError("sbatch is not on this machine: use --dry-run (or --script FILE) and submit it on a "
                              "login node")
        target = script or _temporary(text)
        result = subprocess.run(["sbatch", target], capture_output=True, text=True, env={**os.environ, **hidden})
        if result.returncode:
            raise ConfigError(f"sbatch refused {target}: {result.stderr.strip()}")
        click.echo(result.stdout.strip())


def _checked(words: list[str]) -> click.Context:
    """The parsed options of the bnet command a script will run (errors name the option)."""
    from bnet.cli.main import cli
    from bnet.errors import ConfigError

    if words[:1] not in (["tune"], ["worker"]):
        raise ConfigError("bnet slurm runs 'tune <family> ...' or 'worker ...' commands")
    group = cli
    context = None
    try:
        parent = click.Context(cli, info_name="bnet")
        remaining = list(words)
        while isinstance(group, click.Group):
            name, command, remaining = group.resolve_command(parent, remaining)
            parent = command.make_context(name, remaining, parent=parent) if not isinstance(command, click.Group) \
                else click.Context(command, info_name=name, parent=parent)
            group = command
            context = parent
    except click.UsageError as err:
        raise ConfigError(f"bnet slurm: {' '.join(words)}: {err.format_message()}") from None
    return context


def _temporary(text: str) -> str:
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".sbatch", delete=False) as f:
        f.write(text)
    return f.name
