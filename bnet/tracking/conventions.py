"""The tags, params and artifact paths every bnet run follows (DESIGN.md, tracking)."""

TAG_ROLE = "bnet.role"  # "study" for the parent run of a study, "trial" for a fit, "stage" for a part of one
TAG_STAGE = "bnet.stage"  # a pipeline trial's stage run: which stage (ae, arhmm, decoder)
# a stage run: the pipeline trial's run it is a part of (not an upstream: it reads nothing from it)
TAG_PIPELINE_RUN = "bnet.pipeline_run_id"
TAG_FAMILY = "bnet.family"  # ae, arhmm, decoder, ensemble
TAG_MODEL_CLASS = "bnet.model_class"
TAG_MODEL_TYPE = "bnet.model_type"
TAG_DATASET = "bnet.dataset"
TAG_DATA_HASH = "bnet.data_hash"
TAG_DATA_PATH = "bnet.data_path"
TAG_SESSION_HASHES = "bnet.session_hashes"  # a multi-session fit: its members' data hashes, in order
TAG_N_SESSIONS = "bnet.n_sessions"
TAG_STUDY = "bnet.study"
TAG_SCHEDULER = "bnet.scheduler"  # "pbt" for a population-based study's runs (Optuna's: none)
TAG_TRIAL = "bnet.trial"
TAG_TRIAL_STATE = "bnet.trial_state"  # COMPLETE, PRUNED, FAIL (Optuna's words)
TAG_OBJECTIVE = "bnet.objective"  # the metric the run's study optimised
TAG_DIRECTION = "bnet.direction"  # minimize or maximize
TAG_OBJECTIVES = "bnet.objectives"  # a multi-objective study's objectives ("minimize a, minimize b")
TAG_CONFIG_HASH = "bnet.config_hash"  # family, data, upstream runs and every hyperparameter
TAG_ERROR = "bnet.error"  # why a trial failed or was killed
TAG_RETRY_OF = "bnet.retry_of_run"  # the run of a killed trial that this one fits again
# A trial answered by an earlier fit of another study: the run that holds its model and exports
TAG_REUSED_RUN = "bnet.reused_run"
TAG_BEATS_TRIVIAL = "bnet.beats_trivial"  # parent run: whether its best run beats the family's trivial answer
TAG_NEURON_SUBSET = "bnet.neuron_subset"
TAG_TARGET = "bnet.target"
TAG_TARGET_KIND = "bnet.target_kind"
UPSTREAM_TAG_PREFIX = "bnet.upstream."  # + "<family>_run_id"
TAG_BEST = "bnet.best"  # parent run: the study's answer so far ("best_val_loss 0.0033 (trial 3)")
TAG_VERSION = "bnet.version"  # the bnet that made the run
TAG_PYFUNC_ERROR = "bnet.pyfunc_error"  # why a run's checkpoint could not be saved as an MLflow Model
MLFLOW_PARENT = "mlflow.parentRunId"
MLFLOW_RUN_NAME = "mlflow.runName"
MLFLOW_GIT_COMMIT = "mlflow.source.git.commit"  # the project's commit, where it is a git repository

ROLE_STUDY = "study"
ROLE_TRIAL = "trial"
ROLE_STAGE = "stage"

MODEL_DIR = "checkpoint"  # an MLflow Model (bnet.tracking.pyfunc); a registered version's source
CHECKPOINT_PATH = "checkpoint/artifacts/model.pt"
LEGACY_CHECKPOINT_PATH = "checkpoint/model.pt"  # runs logged before checkpoints were MLflow Models
EXPORTS_DIR = "exports"
PLOTS_DIR = "plots"
