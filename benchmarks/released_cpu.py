"""How long ``python -m cdlib released`` takes on this machine, measured on generated files of the released
sizes (the real ones are not downloadable here): ``python benchmarks/released_cpu.py [--images 500]``.

Per network: the time of a forward pass over ``--images`` CIFAR-size images at full width, scaled to the
10,000 test images and multiplied by the number of test-set passes that need that network: one per released
checkpoint and distinct input normalisation (CS-KD and PS-KD are evaluated under their own statistics and
under the authors' evaluate_models.py's, so twice; baseline and CD once). For the
Omega tensors: a generated 0/1 tensor of the KD file's shape (60, 10000, T) is written, memory-mapped and
run through the statistics; the time is scaled linearly in T to the released T (not stated by the
authors; about 800 from the file size).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from cdlib.core import feature_statistics
from cdlib.core.models import build_model
from cdlib.released import artifacts as art

RELEASED_T = {"kd": 800, "cd": 580}  # estimates from the file sizes (1.8 GB, 0.9 GB of int32)


def forward_seconds(network: str, images: int) -> float:
    model = build_model(network, art.CIFAR100_CLASSES).eval()
    x = torch.randn(min(images, 250), 3, 32, 32)
    with torch.no_grad():
        model(x[:8])  # warm-up
        start = time.perf_counter()
        for _ in range(max(1, images // len(x))):
            model(x)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--features", type=int, default=200, help="T of the generated tensor")
    args = parser.parse_args()
    needed = Counter()
    for method in art.TABLE2_METHODS:
        passes = len({art.NORMALISATION[s] for s in art.normalisations(method).values()}) * len(art.RUNS)
        for arch in art.TABLE2_ARCHS:
            needed[art.network_for(method, arch)] += passes
    needed["resnet152"] += 1  # the Section 4.1 teacher
    needed["resnet18"] += 1  # Section 4.1 evaluates its baseline, Table 2 baseline run1, once more
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'network':<18} {'passes':>6} {'s / 10k images':>15} {'s in all':>9}")
    total = 0.0
    for network, passes in sorted(needed.items()):
        per_pass = forward_seconds(network, args.images) * art.TEST_IMAGES / args.images
        total += per_pass * passes
        print(f"{network:<18} {passes:>6} {per_pass:>15.1f} {per_pass * passes:>9.0f}")
    print(f"{'test-set passes':<18} {sum(needed.values()):>6} {'':>15} {total:>9.0f}  ({total / 3600:.2f} h)")
    with tempfile.TemporaryDirectory() as folder:
        rng = np.random.default_rng(0)
        omega = (rng.random((60, art.TEST_IMAGES, args.features), dtype=np.float32) < 0.05).astype(np.int32)
        torch.save(torch.from_numpy(omega), Path(folder) / art.OMEGA_FILES["kd"][0])
        del omega
        start = time.perf_counter()
        tensor = art.load_omega(Path(folder), "kd")
        for name, models in tensor.groups.items():
            feature_statistics.group_statistics(tensor, name, list(models))
        seconds = time.perf_counter() - start
    for which, t in RELEASED_T.items():
        models = max(r.stop for r in art.OMEGA_FILES[which][1].values())
        scaled = seconds * (t / args.features) * (models / 60)
        print(f"Omega {which}: measured {seconds:.1f} s at (60, 10000, {args.features}); "
              f"projected {scaled:.0f} s at ({models}, 10000, {t})")


if __name__ == "__main__":
    main()
