"""Write ``tests/data/engine_reference.json`` with the engine before the current one (commit dbcac7b).

    git worktree add /tmp/engine-dbcac7b dbcac7b
    PYTHONPATH=/tmp/engine-dbcac7b python tests/engine_reference.py

It trains each config of ``CONFIGS`` with that commit's ``cdlib.train.fit`` on the tiny synthetic
set of ``tests/test_engine.py``, single-threaded on the CPU, and stores the per-epoch metrics and,
per weight tensor, its ``fingerprint``. ``test_engine`` checks today's engine against that file.

The learning rate is 0.02 (DenseNet: 0.002 for one epoch), not the paper's 0.1. At 0.1 these tiny
networks are chaotic: the rounding differences between CPUs (oneDNN and ATen pick their kernels by
instruction set) grow to ~1e-2 within six steps, so the reference held only on the machine that
wrote it. ``test_engine`` says how far apart instruction sets land at these settings.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import torch

OUT = Path(__file__).parent / "data" / "engine_reference.json"
BASE = dict(name="ref", dataset="synthetic", rotation=15.0, arch="resnet18", width=0.0625, epochs=3,
            batch_size=32, lr=0.02)
CONFIGS = {  # "kd" last: the "ce" run is its teacher
    "ce": {},
    "densenet_ce": dict(arch="densenet121", width=0.125, lr=0.002, epochs=1),  # 121 layers: see test_engine
    "ls": dict(objective="ls"),
    "cskd": dict(objective="cskd"),
    "pskd": dict(objective="pskd"),
    "cd": dict(objective="cd", objective_args={"schedule": [1, 1, 1]}),
    "kd": dict(objective="kd", objective_args={"teacher": "ce"}),
}
METRICS = ("train_loss", "train_top1", "test_loss", "test_top1")


def fingerprint(state: dict) -> dict:
    """Per tensor: sum, sum of squares and a seeded random projection (float64)."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for k, v in state.items():
        v = v.double().flatten()
        out[k] = [v.sum().item(), (v * v).sum().item(),
                  (v * torch.randn(v.numel(), generator=g, dtype=torch.float64)).sum().item()]
    return out


def main() -> None:
    torch.set_num_threads(1)
    import cdlib
    if not (Path(cdlib.__file__).parent / "train.py").is_file():
        sys.exit(f"cdlib here is {cdlib.__file__}, not commit dbcac7b's; put a checkout of it first on PYTHONPATH.")
    from cdlib.config import TrainConfig
    from cdlib.data import DeviceData, synthetic
    from cdlib.train import fit

    data = DeviceData(synthetic(superclasses=2, classes_per_superclass=2, train_per_class=12, test_per_class=8,
                                size=16), "cpu", rotation=15)
    reference = {}
    with tempfile.TemporaryDirectory() as root:
        os.chdir(root)  # the old store finds the KD teacher "ce" as the folder ./ce
        for name, changes in CONFIGS.items():
            config = TrainConfig(**{**BASE, **changes})
            fit(config, name, data=data, progress=False)
            Path(name, "config.json").write_text(json.dumps(config.to_dict()))
            metrics = [json.loads(line) for line in Path(name, "metrics.jsonl").read_text().splitlines()]
            reference[name] = {
                "config": config.to_dict(),
                "weights": fingerprint(torch.load(Path(name, "model.pt"), weights_only=True)),
                "metrics": [{k: m[k] for k in METRICS} for m in metrics],
            }
    OUT.write_text(json.dumps(reference))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
