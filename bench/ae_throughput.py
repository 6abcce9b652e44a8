"""Conv AE training throughput (frames/s): BehaveNet's code beside bnet's, step and epoch.

Part 1, the bare training step of BehaveNet's default architecture (1 channel, 12 latents,
batch 128, Adam with amsgrad), rows timed in this one process, interleaved round by round
so machine noise hits them alike:
  * BehaveNet's AE      - its own ``behavenet.models.aes.AE`` class, imported from the
                          checkout ``--behavenet PATH`` names (not a dependency of bnet),
                          trained as its fitting code does (NCHW, float32, per-tensor Adam);
  * BehaveNet's ops     - the same computation in bnet's model (torch's conv kernel for
                          every layer, NCHW, float32, per-tensor Adam): the baseline when no
                          checkout is given;
  * bnet fp32 / bf16    - bnet's training step (channels-last, the stride-5 layer as one
                          GEMM, fused Adam; bf16 is autocast with float32 weights, optimiser
                          state and losses). bf16 rows run only where the CPU multiplies
                          bfloat16 natively (AMX or AVX-512 BF16; elsewhere torch emulates it
                          ~10x slower), or with ``--bf16``;
  * CUDA fp32 / bf16 AMP channels-last, when a GPU is present.
The GFLOP/s column counts the step's multiply-adds (forward, input and weight gradients);
"of GEMM" divides it by the machine's own 2048 x 2048 matrix-product rate in the row's
precision (float32 or bf16), measured here too, which bounds what a step can reach.

Part 2, the whole epoch: a one-trial ``bnet tune ae`` study on a synthetic session of that
size in a temporary SQLite store, batches read from the HDF5 file per batch (as a session
over the preload limit is), validated every epoch, metrics logged to MLflow and reported to
Optuna every epoch. An epoch's wall time is the interval between consecutive epochs'
``val_loss`` timestamps in the MLflow store, so it holds everything an epoch costs; its
frames/s is printed beside the bare step's, measured just before and after.

    python bench/ae_throughput.py [--sizes 64 128] [--rounds 3] [--behavenet PATH] [--bf16]
"""

from __future__ import annotations

import argparse
import copy
import importlib
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import torch
import torch.nn.functional as F

from bnet.models import build_model
from bnet.models.ae import AEConfig
from bnet.training import make_optimizer, prepare, train_step
from bnet.training.loop import cpu_has_native_bf16
from machine import describe, gemm_rate  # the machine the figures were taken on

BATCH = 128
EPOCH_TRAIN_TRIALS = 10  # of one batch each, plus one val and one test trial
LATENTS = 12


def behavenet_model(checkout: Path, size: int) -> torch.nn.Module:
    """BehaveNet's own AE class, built as its fitting code builds the default architecture."""
    sys.path.insert(0, str(checkout))
    try:
        aes = importlib.import_module("behavenet.models.aes")
        generator = importlib.import_module("behavenet.models.ae_model_architecture_generator")
    except ImportError as error:
        sys.exit(f"--behavenet {checkout}: cannot import BehaveNet's models from it ({error})")
    hparams = generator.load_handcrafted_arch([1, size, size], LATENTS, None, check_memory=False)
    hparams.update({"model_type": "conv", "model_class": "ae", "n_input_channels": 1, "y_pixels": size,
                    "x_pixels": size, "n_ae_latents": LATENTS, "fit_sess_io_layers": False})
    return aes.AE(hparams)


def per_tensor_adam(model) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=1e-4, amsgrad=True, foreach=False, fused=False)


def behavenet_step(model, images):
    optimizer = per_tensor_adam(model)

    def step():
        optimizer.zero_grad(set_to_none=True)
        reconstruction, _ = model(images)
        F.mse_loss(reconstruction, images).backward()
        optimizer.step()
    return step


def behavenets_ops_step(base, images):
    model = copy.deepcopy(base)
    model.coder.patch_gemm = False
    optimizer = per_tensor_adam(model)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model.loss({"images": images}).backward()
        optimizer.step()
    return step


def bnet_step(base, images, device, precision):
    model = prepare(copy.deepcopy(base), device)
    optimizer = make_optimizer(model, 1e-4, 0.0)
    batch = {"images": images}
    return lambda: train_step(model, optimizer, batch, device, precision)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_macs(model, size) -> float:
    """Multiply-adds of one training step per frame: each conv/linear layer's forward, plus
    its weight gradient and (except the first layer's) input gradient."""
    macs = []

    def count(module, inputs, output):
        if isinstance(module, torch.nn.Linear):
            macs.append(module.in_features * module.out_features)
        elif isinstance(module, torch.nn.Conv2d):
            macs.append(output[0].numel() * module.in_channels * module.kernel_size[0] * module.kernel_size[1])
        elif isinstance(module, torch.nn.ConvTranspose2d):
            macs.append(inputs[0][0].numel() * module.out_channels * module.kernel_size[0] * module.kernel_size[1])

    model = copy.deepcopy(model)
    model.coder.patch_gemm = False
    hooks = [m.register_forward_hook(count) for m in model.modules()
             if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    with torch.no_grad():
        model.loss({"images": torch.rand(1, 1, size, size)})
    for hook in hooks:
        hook.remove()
    return 3 * sum(macs) - macs[0]


def time_rows(steps: dict, rounds: int) -> dict[str, float]:
    """Best seconds per step of each row, rows interleaved round by round."""
    best = {name: float("inf") for name in steps}
    for step, device in steps.values():  # warm-up: allocations, oneDNN kernel choice
        step()
        synchronize(device)
    for _ in range(rounds):
        for name, (step, device) in steps.items():
            repeats = 10 if device.type == "cuda" else 2
            start = time.perf_counter()
            for _ in range(repeats):
                step()
            synchronize(device)
            best[name] = min(best[name], (time.perf_counter() - start) / repeats)
    return best


def step_table(args, size: int) -> float:
    cpu = torch.device("cpu")
    base = build_model(AEConfig(y_pixels=size, x_pixels=size, n_ae_latents=LATENTS))
    images = torch.rand(BATCH, 1, size, size)
    steps = {}
    if args.behavenet:
        theirs = behavenet_model(args.behavenet, size)
        count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
        # an older checkout's default is Batty et al. 2019's 4-layer net, not the 5-layer one
        print(f"{size:>6}  parameters: BehaveNet's AE {count(theirs):,}, bnet's {count(base):,}")
        steps["BehaveNet's AE (its code)"] = (behavenet_step(theirs, images), cpu)
    steps["BehaveNet's ops in bnet"] = (behavenets_ops_step(base, images), cpu)
    steps["bnet fp32"] = (bnet_step(base, images, cpu, "fp32"), cpu)
    if args.bf16 or cpu_has_native_bf16():
        steps["bnet bf16"] = (bnet_step(base, images, cpu, "bf16"), cpu)
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        steps["cuda fp32"] = (bnet_step(base, images.to(gpu), gpu, "fp32"), gpu)
        steps["cuda bf16 AMP"] = (bnet_step(base, images.to(gpu), gpu, "bf16"), gpu)
    best = time_rows(steps, args.rounds)
    baseline_name = next(iter(steps))
    gflop = 2 * step_macs(base, size) * BATCH / 1e9
    for name in steps:
        fps = BATCH / best[name]
        rate = gflop / best[name]
        precision = "bf16" if "bf16" in name else "float32"
        share = f"{rate / gemm_rate(precision):>7.0%}" if steps[name][1].type == "cpu" else f"{'-':>7}"
        print(f"{size:>6}  {name:<27} {fps:>9.1f}  {best[baseline_name] / best[name]:>9.2f}x  {rate:>7.1f}  {share}")
    return BATCH / best["bnet fp32"]


def epoch_figure(size: int, step_fps: float, epochs: int) -> float:
    """Frames/s of whole epochs of a real one-trial study (see the module's docstring)."""
    import mlflow
    import yaml

    import bnet
    from bnet.data import datasets

    datasets.PRELOAD_LIMIT_BYTES = 0  # read every batch from the file
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        session = bnet.SynthConfig(n_trials=EPOCH_TRAIN_TRIALS + 2, n_frames=BATCH, y_pixels=size, x_pixels=size)
        data = bnet.synthesize(tmp / "session.hdf5", session)
        (tmp / "config.yaml").write_text(yaml.safe_dump({
            "data": {"trial_splits": f"{EPOCH_TRAIN_TRIALS};1;1;0"},
            "model": {"model_class": "ae", "n_ae_latents": LATENTS},
            "training": {"learning_rate": 1e-4, "max_n_epochs": epochs, "enable_early_stop": False,
                         "batch_size": BATCH, "export_latents": False, "export_train_plots": False,
                         "augment_shift": 0},  # the bare step moves no frames either
            "compute": {"device": "cpu", "precision": "fp32"},
        }))
        store = bnet.resolve_store(tmp / "store")
        outcome = bnet.tune_ae(data=data, experiment=f"epoch-bench-{size}",
                               config=bnet.load_project_config(tmp / "config.yaml"), n_trials=1, pruner="median",
                               seed=0, store=store, echo=lambda line: None)
        client = mlflow.MlflowClient(outcome.tracking_uri)
        history = sorted(client.get_metric_history(outcome.best_run_id, "val_loss"), key=lambda m: m.step)
        intervals = [(b.timestamp - a.timestamp) / 1000 for a, b in zip(history, history[1:])]
    frames = EPOCH_TRAIN_TRIALS * BATCH
    fps = frames / min(intervals)
    print(f"{size:>6}  {'bnet fp32 whole epoch':<27} {fps:>9.1f}  {fps / step_fps:>9.2f}x of the bare step "
          f"({len(intervals)} epochs timed, HDF5 per batch, val + MLflow + Optuna each epoch)")
    return fps


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the whole-epoch study")
    parser.add_argument("--behavenet", type=Path, help="a checkout of themattinthehatt/behavenet")
    parser.add_argument("--bf16", action="store_true", help="time bf16 rows on CPUs without native bf16 too")
    parser.add_argument("--no-epoch", action="store_true", help="time the bare step only")
    args = parser.parse_args()
    print(describe(), flush=True)
    if not args.behavenet:
        print("no --behavenet checkout: the baseline is BehaveNet's ops computed in bnet's model")
    print(f"{'pixels':>6}  {'row':<27} {'frames/s':>9}  {'vs row 1':>10}  {'GFLOP/s':>7}  {'of GEMM':>7}")
    for size in args.sizes:
        step_fps = step_table(args, size)
        if not args.no_epoch:
            epoch_figure(size, step_fps, args.epochs)


if __name__ == "__main__":
    main()
