"""Every checkpoint bnet logs is also an MLflow Model with a python-function flavour.

The run's ``checkpoint/`` folder is the model: ``MLmodel`` (signature, input example, pip
requirements), ``pyfunc_model.py`` (what MLflow executes to load it: no pickled object is
stored) and ``artifacts/model.pt`` (the state dict and the config that rebuilds it). So
``mlflow.pyfunc.load_model("models:/NAME@ALIAS").predict(x)``, ``mlflow models predict`` and
``mlflow models serve`` use a registered version, answering as ``bnet apply`` does
(:mod:`bnet.models.serving`): an AE maps frames ``(n, C, Y, X)`` in [0, 1] to latents, an
ARHMM one trial's latents to a table of Viterbi states and state probabilities, a decoder
(or an ensemble) one trial's neural activity to predictions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np

CODE = Path(__file__).with_name("pyfunc_model.py")
CHECKPOINT_ARTIFACT = "checkpoint"  # the checkpoint's name among the MLflow Model's artifacts


class BnetModel(mlflow.pyfunc.PythonModel):
    """A bnet checkpoint behind MLflow's python-function interface."""

    def load_context(self, context) -> None:
        from bnet.models.checkpoint import load_checkpoint

        self.model = load_checkpoint(context.artifacts[CHECKPOINT_ARTIFACT])

    def predict(self, context, model_input: np.ndarray, params: dict[str, Any] | None = None):
        from bnet.models.serving import serving_spec

        return pyfunc_answer(serving_spec(self.model)(self.model, _as_arrays(model_input), "model input"))


def pyfunc_answer(answer: dict[str, np.ndarray]):
    """The python-function answer: an array (latents, predictions), or for an ARHMM a table
    with the Viterbi ``state`` and ``p_state_<k>`` per frame."""
    if "states" in answer:
        import pandas as pd

        table = pd.DataFrame(answer["probs"], columns=[f"p_state_{k}" for k in range(answer["probs"].shape[1])])
        table.insert(0, "state", answer["states"])
        return table
    return next(iter(answer.values()))


def _as_arrays(model_input):
    """An array, or named arrays (frames and labels), as the signature's tensors arrive."""
    if isinstance(model_input, dict):
        return {name: np.asarray(value) for name, value in model_input.items()}
    if hasattr(model_input, "to_numpy"):  # a DataFrame of a serving request's rows
        return model_input.to_numpy()
    return np.asarray(model_input)


def requirements() -> list[str]:
    """What loading needs: bnet itself (installed from its project, as the README says) and
    the versions it was saved with."""
    import h5py
    import mlflow
    import torch

    import bnet

    return [f"bnet=={bnet.__version__}", f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}",
            f"numpy=={np.__version__}", f"h5py=={h5py.__version__}"]


def save_model(folder: Path, checkpoint: Path) -> bool:
    """Write the checkpoint at ``checkpoint`` as an MLflow Model in ``folder``, its example and
    signature from the model rebuilt from it as every load will; False where the model's
    family has no serving spec (an extension's family that registered none)."""
    import warnings

    from mlflow.models import infer_signature

    from bnet.models.checkpoint import load_checkpoint
    from bnet.models.serving import serving_spec

    model = load_checkpoint(checkpoint)
    spec = serving_spec(model)
    if spec is None:
        return False
    example = spec.example(model)
    if len(example) == 1:  # one input goes bare: predict(frames)
        example = next(iter(example.values()))
    answer = pyfunc_answer(spec(model, example, "the example input"))
    with warnings.catch_warnings():
        # an ARHMM's integer states: MLflow's hint about integer inputs with missing values
        warnings.filterwarnings("ignore", message=".*integer column.*", category=UserWarning)
        signature = infer_signature(example, answer)
        mlflow.pyfunc.save_model(folder, python_model=str(CODE), artifacts={CHECKPOINT_ARTIFACT: str(checkpoint)},
                                 signature=signature, input_example=example, pip_requirements=requirements())
    return True
