"""Benchmark: build the Interaction Tensor at the paper's size and compute its statistics.

Default size: 60 models x 10,000 images x 512 features (ResNet-18's pooled layer),
K = 50 components. Activations are synthetic and seeded, with planted features
(:func:`cdlib.core.planted.planted_features`): each model sees 40 of 100 shared
features plus 10 of its own, 700 planted features in all (the paper's tensor has
about 750; at K = 50 PCA blends some planted features of similar variance, and the
build finds about 570). Activations are generated one model at a time inside the build, as
:func:`cdlib.core.interaction.iter_activations` would deliver them, and their
generation is timed as the "activations" stage.

Targets: under 10 minutes on 2 CPU cores, peak memory under 2 GB.

    python benchmarks/interaction_tensor.py                      # full size, default device
    python benchmarks/interaction_tensor.py --models 12 --images 2000 --features 128 --device cpu
    python benchmarks/interaction_tensor.py --json outputs/benchmarks.jsonl   # also append a JSON line

Peak memory is reported two ways: the process's peak resident set (ru_maxrss,
which includes the interpreter, numpy and torch libraries, shown also net of the
resident set before the run) and tracemalloc's peak of Python and numpy
allocations during the run. On CUDA, torch.cuda.max_memory_allocated as well.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
import tracemalloc
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cdlib.core import interaction as it  # noqa: E402
from cdlib.core.feature_statistics import group_statistics, summary_table  # noqa: E402
from cdlib.core.planted import planted_features  # noqa: E402

GROUP_NAMES = ("baseline", "student", "teacher")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=60)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--features", type=int, default=512, help="activation width D")
    parser.add_argument("--components", type=int, default=50, help="PCA components K per model")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="append the result as one JSON line here")
    args = parser.parse_args()

    device = it.resolve_device(args.device)
    private = max(1, args.components // 5)
    shared_per_model = args.components - private
    planted = planted_features(
        n_models=args.models, n_images=args.images, n_dims=args.features,
        n_shared=(5 * shared_per_model) // 2, shared_per_model=shared_per_model,
        private_per_model=private, seed=args.seed,
    )

    rss_before = peak_rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tracemalloc.start()
    start = time.perf_counter()
    tensor = it.build_interaction_tensor(planted, n_components=args.components, device=device)
    clock = time.perf_counter()
    thirds = [range(g * args.models // 3, (g + 1) * args.models // 3) for g in range(3)]
    stats = [group_statistics(tensor, name, models) for name, models in zip(GROUP_NAMES, thirds)]
    table = summary_table(stats)
    stage_seconds = dict(tensor.stage_seconds, statistics=time.perf_counter() - clock)
    total = time.perf_counter() - start
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    result = {
        "benchmark": "interaction_tensor",
        "models": args.models, "images": args.images, "features": args.features,
        "components": args.components, "device": str(device), "cpu_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "clusters": tensor.n_clusters, "gamma_corr": tensor.gamma_corr,
        "seconds": {name: round(s, 3) for name, s in stage_seconds.items()},
        "total_seconds": round(total, 3),
        "peak_rss_gb": round(peak_rss_bytes() / 2**30, 3),
        "peak_rss_above_start_gb": round((peak_rss_bytes() - rss_before) / 2**30, 3),
        "traced_peak_gb": round(traced_peak / 2**30, 3),
        "tensor_mb": round(tensor.nbytes / 2**20, 1),
        "dense_int32_omega_gb": round(args.models * args.images * tensor.n_clusters * 4 / 2**30, 2),
    }
    if device.type == "cuda":
        result["cuda_peak_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)

    print(table.to_string(index=False))
    stages = ", ".join(f"{name} {s:.1f}" for name, s in stage_seconds.items())
    print(f"interaction_tensor M={args.models} N={args.images} D={args.features} K={args.components} "
          f"device={device} threads={result['cpu_threads']}: total {total:.1f} s ({stages}); "
          f"T={tensor.n_clusters}; peak RSS {result['peak_rss_gb']:.2f} GB "
          f"(+{result['peak_rss_above_start_gb']:.2f} GB over start), traced peak {result['traced_peak_gb']:.2f} GB; "
          f"tensor {result['tensor_mb']:.0f} MB vs dense int32 Omega {result['dense_int32_omega_gb']:.2f} GB"
          + (f"; CUDA peak {result['cuda_peak_gb']:.2f} GB" if "cuda_peak_gb" in result else ""))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        with args.json.open("a") as out:
            out.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
