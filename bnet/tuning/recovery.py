"""What a study does for workers that died, and for workers that start together.

* Every trial records which process runs it (host, pid and the process's start time, so a
  reused pid is not mistaken for the worker). When a study opens, trials left RUNNING by a
  dead process on this host fail at once; trials of other hosts fail when their Optuna
  heartbeat is older than the grace period. Their MLflow runs end KILLED with the reason.
* One parent run per study whatever the race: creating it is guarded by a lock that is an
  Optuna study of its own (study names are unique in the storage, so exactly one worker
  creates the lock; the others wait for the parent run id it writes).
"""

from __future__ import annotations

import os
import socket
import time
from typing import Callable

import optuna
from optuna.trial import TrialState

from bnet.progress import Echo
from bnet.tracking.tracker import Tracker

MLFLOW_RUN_ATTR = "mlflow_run_id"
PARENT_RUN_ATTR = "mlflow_parent_run_id"
WORKER_ATTR = "bnet_worker"
# Optuna's heartbeat: a trial whose worker has not written for GRACE_SECONDS is failed by
# the next worker that looks. BNET_HEARTBEAT_SECONDS shortens it (tests of a database restart
# need epochs longer than a beat) or lengthens it (a slow shared database).
HEARTBEAT_SECONDS = int(os.environ.get("BNET_HEARTBEAT_SECONDS", "20"))
GRACE_SECONDS = 3 * HEARTBEAT_SECONDS
# A parent-run lock whose holder is alive is never taken; one held from another machine is
# taken after this long (creating a parent run takes seconds; its holder is gone or stuck).
LOCK_WAIT_SECONDS = 600
LOCK_HOLDER_ATTR = "bnet_lock_holder"



def _start_ticks(pid: int) -> str | None:
    """A process's start time in clock ticks since boot (Linux), None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # the command name (field 2) may hold spaces: count from the closing parenthesis
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def this_worker() -> str:
    return f"{socket.gethostname()}/{os.getpid()}/{_start_ticks(os.getpid()) or '-'}"


def worker_is_dead(worker: str) -> bool:
    """Whether the worker named by :func:`this_worker` is known to be gone (same host only)."""
    try:
        host, pid_text, ticks = worker.rsplit("/", 2)
        pid = int(pid_text)
    except ValueError:
        return False
    if host != socket.gethostname():
        return False  # another machine: the heartbeat decides
    if ticks != "-":
        return _start_ticks(pid) != ticks
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


RETRY_OF_ATTR = "bnet_retry_of_trial"
RETRY_OF_RUN_ATTR = "bnet_retry_of_run"
RETRIES_ATTR = "bnet_retries"
MAX_RETRIES = 2


def dead_trial_handler(tracker: Tracker, echo: Echo):
    """What happens to a trial whose worker is gone (also Optuna's heartbeat callback): its
    run ends KILLED, and the same hyperparameters are queued again (up to MAX_RETRIES
    times), the retry linked to the run it replaces."""

    def handle(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        run_id = trial.user_attrs.get(MLFLOW_RUN_ATTR)
        reason = "its worker is gone (killed, preempted or lost)"
        if run_id:
            tracker.close_if_running(run_id, "KILLED", "FAIL", reason)
        retried = queue_retry(study, trial.number, trial.params, trial.user_attrs)
        echo(f"trial {trial.number}" + (f" (run {run_id[:8]})" if run_id else "")
             + ": its worker is gone; trial FAIL, run KILLED" + ("; queued again" if retried else ""))

    return handle


def queue_retry(study: optuna.Study, number: int, params: dict, user_attrs: dict) -> bool:
    """Queue a trial's hyperparameters again (a trial that never finished through no fault
    of its own); False once it was retried MAX_RETRIES times."""
    retries = int(user_attrs.get(RETRIES_ATTR, 0))
    if retries >= MAX_RETRIES:
        return False
    study.enqueue_trial(params, user_attrs={RETRY_OF_ATTR: number, RETRY_OF_RUN_ATTR: user_attrs.get(MLFLOW_RUN_ATTR, ""),
                                            RETRIES_ATTR: retries + 1})
    return True


def recover_dead_trials(study: optuna.Study, storage, tracker: Tracker, echo: Echo) -> None:
    """Fail trials whose worker is gone, close their runs and queue them again, before this
    worker starts. Called between trials, so this process's own RUNNING trials (left by a
    lost database connection) are gone too."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # other hosts: by heartbeat (handled by the callback)
    handle = dead_trial_handler(tracker, echo)
    me = this_worker()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get(WORKER_ATTR)
        if worker and (worker == me or worker_is_dead(worker)):
            try:
                storage.set_trial_state_values(storage_id(storage, study, trial.number), TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another worker recovered it first
            handle(study, trial)


def storage_id(storage, study: optuna.Study, number: int) -> int:
    """A trial's id in the storage, by Optuna's public storage API (trials keep theirs private)."""
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name), number)


def close_orphaned_runs(study: optuna.Study, tracker: Tracker) -> None:
    """Runs of failed trials still RUNNING (their worker died while closing them) end
    KILLED; one MLflow query per failed trial, so when a study opens, not while polling."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        run_id = trial.user_attrs.get(MLFLOW_RUN_ATTR)
        if run_id:
            tracker.close_if_running(run_id, "KILLED", "FAIL", "its worker ended before the run was closed")


def parent_run_id(study: optuna.Study, storage, create: Callable[[], str]) -> str:
    """The study's parent run id, created by exactly one of the workers that ask at once."""
    lock_name = f"{study.study_name}#bnet-parent-run"
    waited_since = time.monotonic()
    while True:
        existing = study.user_attrs.get(PARENT_RUN_ATTR)
        if existing:
            return existing
        try:
            lock = optuna.create_study(study_name=lock_name, storage=storage)
        except optuna.exceptions.DuplicatedStudyError:
            if _lock_is_abandoned(lock_name, storage, time.monotonic() - waited_since):
                _delete_lock(lock_name, storage)
                waited_since = time.monotonic()
            time.sleep(0.2)
            continue
        try:
            lock.set_user_attr(LOCK_HOLDER_ATTR, this_worker())
            existing = study.user_attrs.get(PARENT_RUN_ATTR)  # written before the last holder let go
            if existing:
                return existing
            run_id = create()
            study.set_user_attr(PARENT_RUN_ATTR, run_id)
            return run_id
        finally:
            _delete_lock(lock_name, storage)


def _lock_is_abandoned(lock_name: str, storage, waited: float) -> bool:
    """Whether the parent-run lock's holder died between taking it and writing the id: a
    holder on this host is checked directly, one elsewhere after LOCK_WAIT_SECONDS."""
    try:
        holder = optuna.load_study(study_name=lock_name, storage=storage).user_attrs.get(LOCK_HOLDER_ATTR)
    except KeyError:
        return False  # released meanwhile
    if holder and worker_is_dead(holder):
        return True
    # no holder yet (it is writing its name) or alive here: wait; elsewhere: wait long
    return waited > LOCK_WAIT_SECONDS and not (holder and holder.split("/", 1)[0] == socket.gethostname())


def _delete_lock(lock_name: str, storage) -> None:
    try:
        optuna.delete_study(study_name=lock_name, storage=storage)
    except KeyError:
        pass
