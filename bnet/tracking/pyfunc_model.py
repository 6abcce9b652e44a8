"""The code MLflow runs to load a bnet model (MLflow's models-from-code).

MLflow copies this file into each model's ``code/`` folder and executes it at load time in
place of unpickling a Python object; the model it sets rebuilds the network from bnet's model
registry and reads its weights with ``torch.load(weights_only=True)``
(:class:`bnet.tracking.pyfunc.BnetModel`).
"""

from mlflow.models import set_model

from bnet.tracking.pyfunc import BnetModel

set_model(BnetModel())
