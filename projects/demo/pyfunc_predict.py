"""The demo's champion AE as a plain MLflow Model: `mlflow.pyfunc.load_model` on the registry
alias, frames of the second recording in, latents out, checked against `bnet apply`'s file.

Run by `make demo` after `bnet apply` (usage: python pyfunc_predict.py STORE SESSION LATENTS).
"""

import sys

import h5py
import mlflow
import numpy as np

import bnet

store, session, applied = sys.argv[1:4]
mlflow.set_tracking_uri(bnet.resolve_store(store).tracking_uri)
model = mlflow.pyfunc.load_model("models:/ae-demo@champion")
with h5py.File(session) as f:
    frames = f["images/trial_0000"][()].astype(np.float32) / 255
with h5py.File(applied) as f:
    expected = f["latents/trial_0000"][()]
latents = model.predict(frames)
print(f"mlflow.pyfunc.load_model('models:/ae-demo@champion').predict(frames {frames.shape}) -> latents "
      f"{latents.shape}; largest difference from bnet apply's: {np.abs(latents - expected).max():.2g}")
print(f"signature: {model.metadata.get_input_schema()} -> {model.metadata.get_output_schema()}")
