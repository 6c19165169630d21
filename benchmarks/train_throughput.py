"""Training throughput of the cdlib loop against the conventional loop of the paper's code.

Both train the same network on random CIFAR-shaped images in the same process:
- reference: torchvision transforms on PIL images in DataLoader workers (crop, flip,
  rotation, ToTensor, Normalize), float32, batch 128, ``loss.item()`` every step;
- cdlib: ``cdlib.core.train.fit`` as ``python -m cdlib estimate`` times it (``estimate.measure``):
  the data set resident on the device as uint8, augmentation in batch there, bf16 autocast +
  channels_last on CUDA, no host synchronisation in the step; a warm-up epoch, then a timed one.
Prints images/s of both and their ratio; ``--record`` appends a row to docs/BENCHMARKS.md.

    python benchmarks/train_throughput.py                   # CPU: width 1/4 ResNet-18
    python benchmarks/train_throughput.py --arch resnet50   # CUDA: full width by default
"""
from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's cdlib, installed or not
from cdlib import paths  # noqa: E402
from cdlib.core.data import Dataset  # noqa: E402
from cdlib.core.models import build_model  # noqa: E402
from cdlib.scaleout.estimate import DataSpec, measure, random_dataset  # noqa: E402


WARMUP_STEPS = 3  # untimed batches of the reference loop (workers starting, allocations)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timing); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reference_images_per_second(ds: Dataset, arch: str, width: float, device, steps: int, workers: int) -> float:
    import torchvision.transforms as T
    from PIL import Image

    mean, std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.RandomRotation(15),
                           T.ToTensor(), T.Normalize(mean, std)])

    class PilDataset(torch.utils.data.Dataset):
        def __len__(self):
            return len(ds.train_labels)

        def __getitem__(self, i):
            return transform(Image.fromarray(ds.train_images[i])), int(ds.train_labels[i])

    loader = torch.utils.data.DataLoader(PilDataset(), batch_size=128, shuffle=True, num_workers=workers,
                                         pin_memory=device.type == "cuda", drop_last=True)
    torch.manual_seed(0)
    model = build_model(arch, ds.num_classes, width).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    warmup, seen, start = WARMUP_STEPS, 0, None
    for i, (x, y) in enumerate(loader):
        if i == warmup:
            synchronize(device)
            start, seen = time.perf_counter(), 0
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss.item()  # the per-step host synchronisation of the paper's training script
        seen += len(y)
        if i == warmup + steps - 1:
            break
    synchronize(device)
    return seen / (time.perf_counter() - start)


def record_row(path, header_start: str, row: str) -> None:
    """Insert ``row`` at the end of the Markdown table whose header starts with ``header_start``."""
    lines = path.read_text().splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    while at + 1 < len(lines) and lines[at + 1].startswith("|"):
        at += 1
    lines.insert(at + 1, row)
    path.write_text("".join(lines))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--width", type=float, default=1.0 if cuda else 0.25)
    parser.add_argument("--steps", type=int, default=100 if cuda else 12, help="timed steps of batch 128")
    parser.add_argument("--workers", type=int, default=4 if cuda else 2, help="DataLoader workers of the reference")
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--record", action="store_true", help="append the result to docs/BENCHMARKS.md")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    spec = DataSpec(128 * (args.steps + WARMUP_STEPS), 256, 32, 100)  # the reference skips its first batches
    ref = reference_images_per_second(random_dataset(spec.num_train, spec), args.arch, args.width, device, args.steps,
                                      args.workers)
    ours = 1 / measure(args.arch, args.width, spec, device, args.steps, 128).train  # seconds per image
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"device: {name}; {args.arch} width {args.width}; batch 128; {args.steps} timed steps")
    print(f"reference loop (DataLoader + torchvision, fp32): {ref:10.0f} images/s")
    print(f"cdlib loop (on-device data and augmentation):   {ours:10.0f} images/s")
    print(f"ratio cdlib / reference: {ours / ref:.2f}x")
    if args.record:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=paths.REPO).stdout.strip()
        row = (f"| {datetime.date.today()} | {commit} | {name} | torch {torch.__version__} | {args.arch} x{args.width} "
               f"| {ref:.0f} | {ours:.0f} | {ours / ref:.2f}x |\n")
        record_row(paths.REPO / "docs" / "BENCHMARKS.md", "| date | commit | device | torch | network |", row)


if __name__ == "__main__":
    main()
