"""Training-step throughput of BehaveNet's default conv AE (frames/s), side by side.

Rows, each timed in this one process, interleaved round by round so machine noise hits
them alike:
  * fp32 NCHW          - the same ops BehaveNet runs (torch conv kernels, its layout and
                          precision);
  * fp32 channels-last - bnet's layout, last layer as one GEMM (stride = kernel);
  * bf16 channels-last - bnet's default where the CPU has AMX (autocast; weights, optimiser
                          state and reported losses stay float32);
  * CUDA fp32 / bf16 AMP channels-last, when a GPU is present.
Batch 128 frames, Adam(amsgrad), one thread per core. For scale, BehaveNet's own code
reached about 34 frames/s at 128x128 and 152 at 64x64 on a 2-core machine of this kind.

    python bench/ae_throughput.py [--sizes 64 128] [--rounds 4]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from bnet.models import build_model
from bnet.models.ae import AEConfig
from bnet.training import make_optimizer, prepare, resolve_precision, train_step

BEHAVENET_FRAMES_PER_S = {128: 34.0, 64: 152.0}


def make_step(base, images, device, layout, precision):
    model = copy.deepcopy(base)
    model = prepare(model, device) if layout == "channels-last" else model.to(device)
    optimizer = make_optimizer(model, 1e-4, 0.0)
    batch = {"images": images}
    if layout == "NCHW":
        # BehaveNet's ops: torch's conv kernels for every layer, NCHW, float32
        model.coder.patch_gemm = False

        def step():
            optimizer.zero_grad(set_to_none=True)
            loss = model.loss({"images": images.to(device)})
            loss.backward()
            optimizer.step()
        return step
    return lambda: train_step(model, optimizer, batch, device, precision)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    cpu = torch.device("cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"CPU bf16 by default: {resolve_precision('auto', cpu) == 'bf16'}, "
          f"CUDA: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    print(f"{'pixels':>6}  {'row':<28} {'frames/s':>9}  {'vs fp32 NCHW':>12}  {'vs BehaveNet ref':>16}")
    for size in args.sizes:
        base = build_model(AEConfig(y_pixels=size, x_pixels=size, n_ae_latents=12))
        images = torch.rand(args.batch, 1, size, size)
        rows = {
            "cpu fp32 NCHW (BehaveNet)": (cpu, "NCHW", "fp32"),
            "cpu fp32 channels-last": (cpu, "channels-last", "fp32"),
            "cpu bf16 channels-last": (cpu, "channels-last", "bf16"),
        }
        if torch.cuda.is_available():
            gpu = torch.device("cuda")
            rows["cuda fp32 channels-last"] = (gpu, "channels-last", "fp32")
            rows["cuda bf16 AMP channels-last"] = (gpu, "channels-last", "bf16")
        steps = {name: (make_step(base, images, *spec), spec[0]) for name, spec in rows.items()}
        best = {name: float("inf") for name in rows}
        for name, (step, device) in steps.items():  # warm-up (allocations, oneDNN kernels)
            step()
            synchronize(device)
        for _ in range(args.rounds):
            for name, (step, device) in steps.items():
                repeats = 10 if device.type == "cuda" else 1
                start = time.perf_counter()
                for _ in range(repeats):
                    step()
                synchronize(device)
                best[name] = min(best[name], (time.perf_counter() - start) / repeats)
        baseline = args.batch / best["cpu fp32 NCHW (BehaveNet)"]
        for name in rows:
            fps = args.batch / best[name]
            reference = BEHAVENET_FRAMES_PER_S.get(size)
            versus = f"{fps / reference:>15.2f}x" if reference else f"{'-':>16}"
            print(f"{size:>6}  {name:<28} {fps:>9.1f}  {fps / baseline:>11.2f}x  {versus}")


if __name__ == "__main__":
    main()
