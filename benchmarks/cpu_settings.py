"""Which CPU settings train the ``cpu`` profile's networks fastest on this machine?

Times training steps (forward, backward, SGD) of the profile's student (width-1/16 ResNet-18) and
teacher (width-1/8 ResNet-34) on random 32x32 batches, and prints images/s of each setting as a
ratio to the reference, all measured here in one invocation:

- reference: one process, torch's default threads (one per core), contiguous tensors, batch 128;
- one thread; channels_last memory format; batch 256 (a different recipe: shown, not used);
- ``--workers`` processes of one thread each, side by side (``--executor local --cpu-workers N``),
  their images/s summed.

    python benchmarks/cpu_settings.py [--steps 20] [--workers 2]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's cdlib, installed or not
from cdlib.core.models import build_model  # noqa: E402

NETWORKS = {"student": ("resnet18", 0.0625), "teacher": ("resnet34", 0.125)}


def images_per_second(arch: str, width: float, batch: int, steps: int, threads: int | None = None,
                      channels_last: bool = False, warmup: int = 3) -> float:
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(arch, 10, width=width)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    images, labels = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    if channels_last:
        model, images = model.to(memory_format=torch.channels_last), images.contiguous(memory_format=torch.channels_last)

    def step():
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):  # allocations, oneDNN primitive creation
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - start)


def _worker(args, queue) -> None:
    queue.put(images_per_second(*args, threads=1))


def side_by_side(arch: str, width: float, steps: int, workers: int) -> float:
    context = mp.get_context("spawn")
    queue = context.Queue()
    procs = [context.Process(target=_worker, args=((arch, width, 128, steps), queue)) for _ in range(workers)]
    for p in procs:
        p.start()
    rates = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    return sum(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads by default; "
          f"{args.steps} timed steps per setting")
    print(f"| network | setting | images/s | ratio to reference |\n|---|---|---|---|")
    for name, (arch, width) in NETWORKS.items():
        threads = torch.get_num_threads()
        reference = images_per_second(arch, width, 128, args.steps, threads=threads)
        settings = {
            f"reference: 1 process, {threads} threads, batch 128": reference,
            "1 thread": images_per_second(arch, width, 128, args.steps, threads=1),
            # one step after one warm-up: a channels_last step takes minutes here (oneDNN's backward)
            "channels_last": images_per_second(arch, width, 128, 1, threads=threads, channels_last=True, warmup=1),
            "batch 256 (another recipe)": images_per_second(arch, width, 256, args.steps // 2, threads=threads),
            f"{args.workers} processes x 1 thread": side_by_side(arch, width, args.steps, args.workers),
        }
        torch.set_num_threads(threads)
        for setting, rate in settings.items():
            print(f"| {name} ({arch} width {width:g}) | {setting} | {rate:.0f} | {rate / reference:.2f} |", flush=True)


if __name__ == "__main__":
    main()
