"""Batches read ahead by a background thread, so the next batch's reading (an HDF5 slice,
uint8 -> float) and, on CUDA, its copy into pinned memory overlap the compute on this one.

A thread, not worker processes: torch's kernels and h5py's reads run outside the GIL for
most of their time, a batch is one slice of one trial (no collation), and processes would
copy every batch between address spaces and compete with the compute for the cores of a
small machine.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator, Sequence

import torch

READ_AHEAD = 2
"""Batches held ready: one being copied to the device, one being read."""

_END = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A batch on ``device``; frames (4-d tensors) in channels-last layout, which the
    convolutions of every device run fastest."""
    moved = {}
    for name, value in batch.items():
        value = value.to(device, non_blocking=True)
        if value.dim() == 4:
            value = value.contiguous(memory_format=torch.channels_last)
        moved[name] = value
    return moved


def prefetched(batches: Sequence[dict[str, torch.Tensor]], order: Iterable[int],
               device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """``batches[i]`` for each ``i`` of ``order``, on ``device``, read ahead by one thread.

    An error reading a batch is raised here, in the caller's thread, unchanged; a caller
    that stops early (a pruned trial) stops the reader.
    """
    pin = device.type == "cuda"
    ready: queue.Queue = queue.Queue(maxsize=READ_AHEAD)
    stopped = threading.Event()

    def hand_over(item) -> bool:
        while not stopped.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            for i in order:
                batch = batches[int(i)]
                if pin:
                    batch = {name: value.pin_memory() for name, value in batch.items()}
                if not hand_over(batch):
                    return
        except BaseException as error:  # handed to the caller, who raises it
            hand_over(_Failure(error))
            return
        hand_over(_END)

    reader = threading.Thread(target=read, name="bnet-batch-reader", daemon=True)
    reader.start()
    try:
        while True:
            item = ready.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield to_device(item, device)
    finally:
        stopped.set()
        reader.join()
