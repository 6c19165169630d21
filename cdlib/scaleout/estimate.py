"""How long will a profile's training take here? ``python -m cdlib estimate --profile paper``.

Before a notebook starts, this prints what each notebook's plan and the whole
profile will cost on this device, with the grouping that ``runs.get_or_train_many``
uses (one run at a time, or fused groups with ``--strategy fused``):

* per-epoch time of a run = steps x (one training step, amortised over the group)
  + the objective's extra work per step (KD: a teacher forward; CS-KD: a second
  student forward) + the test-set evaluation;
* those times come from finished runs in the run store when there are any of the
  same network, objective, data set, width and device (``seconds`` in their
  ``metrics.jsonl``, divided by the ``group_size`` they trained in), and are
  otherwise measured now: a few steps of each network on random CIFAR-shaped data
  through the real training code (``cdlib.core.engine.Engine``), alone and as a fused
  group; on the CPU with a smaller timing batch, scaled up linearly;
* runs already finished cost nothing, partial ones only their remaining epochs; a
  run shared by several notebooks is counted at the first one.

It also prints the arithmetic floor: forward FLOPs x 3 per training image at a
given rate (``--tflops``, default 400, a good H100 bf16 convolution rate).

    python -m cdlib estimate --profile paper                  # on the GPU that will train
    python -m cdlib estimate --profile smoke --steps 2        # a CPU check in seconds
    python -m cdlib estimate --profile paper --strategy fused # fused groups (default sizes per network)
"""
from __future__ import annotations

import contextlib
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from cdlib import paths
from cdlib.experiments import plans
from cdlib.core.config import TrainConfig
from cdlib.core.data import CIFAR_COUNTS, Dataset, DeviceData, load_dataset, synthetic
from cdlib.experiments.profiles import Profile, add_profile_arguments, profile_from_args
from cdlib.core.engine import STRATEGIES, default_strategy
from cdlib.core.runs import default_group_size, plan_groups
from cdlib.core.util import resolve_device
from cdlib.errors import ArgumentParser

NOTEBOOKS = [f"{n:02d}" for n in range(1, 10)]
EXTRA_FORWARDS = {"cskd": 1.0}  # student forwards per step beyond the training step's own


@dataclass
class DataSpec:
    num_train: int
    num_test: int
    size: int
    num_classes: int


def data_spec(dataset: str, data_root=None) -> DataSpec:
    """Sizes of a data set without reading it when they are known (CIFAR)."""
    if dataset in ("cifar100", "cifar10"):
        return DataSpec(CIFAR_COUNTS["train"], CIFAR_COUNTS["test"], 32, 100 if dataset == "cifar100" else 10)
    ds = synthetic() if dataset == "synthetic" else load_dataset(dataset, data_root)
    return DataSpec(len(ds.train_labels), len(ds.test_labels), ds.train_images.shape[1], ds.num_classes)


def random_dataset(n: int, spec: DataSpec, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, spec.size, spec.size, 3), dtype=np.uint8)
    labels = rng.integers(0, spec.num_classes, n).astype(np.int64)
    return Dataset("random", images, labels, images[:min(n, 256)], labels[:min(n, 256)],
                   [str(i) for i in range(spec.num_classes)])


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timing); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_flops(arch: str, width: float, size: int, num_classes: int) -> float:
    """Forward FLOPs of one image (counted on the meta device: no memory, no compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    from cdlib.core.models import build_model
    with torch.device("meta"):
        model = build_model(arch, num_classes, width)
        x = torch.empty(1, 3, size, size)
    with FlopCounterMode(display=False) as counter:
        model(x)
    return float(counter.get_total_flops())


# --------------------------------------------------------------------------- measuring

@dataclass
class ArchTiming:
    """Seconds per batch of ``batch`` images for ``group`` models (one fused network when group > 1)."""
    arch: str
    group: int
    step_s: float | None  # one training step (CE) of the whole group; None when only forwards were timed
    forward_s: float      # one eval-mode forward without gradient of the whole group
    source: str


def _time_forwards(model, x, steps: int, device: torch.device, autocast) -> float:
    model.eval()
    with torch.no_grad(), autocast:
        for rep in range(2):  # the first round warms up
            if rep == 1:
                synchronize(device)
                start = time.perf_counter()
            for _ in range(steps):
                model(x)
        synchronize(device)
    return (time.perf_counter() - start) / steps


def measure(arch: str, recipe: TrainConfig, spec: DataSpec, device: torch.device, group: int, steps: int,
            batch: int, train: bool = True) -> ArchTiming:
    """Time ``steps`` training steps (after a warm-up epoch of as many) and forwards of ``arch``.

    Training goes through the engine (one member, or ``group`` members fused) on random
    images; ``train=False`` times forwards only (KD teachers).
    """
    from cdlib.core.engine import Engine, Member
    from cdlib.core.fused import fuse, stack_members
    from cdlib.core.models import build_model
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    x = torch.randn(batch, 3, spec.size, spec.size, device=device)
    x = stack_members([x] * group, channels_last=cuda) if group > 1 else x
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    if not train:
        models = []
        for seed in range(group):
            torch.manual_seed(seed)
            models.append(build_model(arch, spec.num_classes, recipe.width))
        model = (fuse(models) if group > 1 else models[0]).to(device)
        if cuda:
            model = model.to(memory_format=torch.channels_last)
        forward_s = _time_forwards(model, x, steps, device, autocast)
        return ArchTiming(arch, group, None, forward_s, f"measured ({steps} forwards of {batch})")
    data = DeviceData(random_dataset(batch * steps, spec), device, recipe.rotation)
    configs = [recipe.replace(arch=arch, batch_size=batch, epochs=2, objective="ce", objective_args={}, seed=s,
                              warmup_epochs=0) for s in range(group)]
    engine = Engine([Member(c, data, device) for c in configs], data, device, "fused" if group > 1 else "eager")
    engine.train_epoch()  # warm-up: allocations, cuDNN autotuning
    synchronize(device)
    start = time.perf_counter()
    engine.epoch = 1
    engine.train_epoch()
    synchronize(device)
    step_s = (time.perf_counter() - start) / steps
    forward_s = _time_forwards(engine.units[0].network, x, steps, device, autocast)
    return ArchTiming(arch, group, step_s, forward_s, f"measured ({steps} steps of {batch})")


@dataclass
class Costs:
    """Measured timings by network and group size; per-model seconds at the recipe's batch."""
    batch: int
    timings: dict = field(default_factory=dict)  # arch -> {group: ArchTiming}
    scale: float = 1.0                            # recipe batch / timing batch

    def _per_model(self, arch: str, group: int, attribute: str) -> float:
        points = sorted((g, getattr(t, attribute) / g) for g, t in self.timings[arch].items()
                        if getattr(t, attribute) is not None)
        if not points:
            raise KeyError(f"no {attribute} timing of {arch}")
        sizes = [g for g, _ in points]
        value = float(np.interp(group, sizes, [v for _, v in points]))  # flat outside the measured sizes
        return value * self.scale

    def step(self, arch: str, group: int) -> float:
        """Seconds of one training step per model in a group of ``group``, interpolated in the group size."""
        return self._per_model(arch, group, "step_s")

    def forward(self, arch: str, group: int) -> float:
        return self._per_model(arch, group, "forward_s")


def stored_epoch_seconds(root: Path | None = None) -> dict[tuple, list[float]]:
    """Per-model seconds per epoch of finished runs in the store, by (dataset, arch, width, batch, objective, device)."""
    found: dict[tuple, list[float]] = {}
    folder = Path(root or paths.runs())
    if not folder.is_dir():
        return found
    for summary_path in folder.glob("*/summary.json"):
        try:
            config = TrainConfig.from_dict(json.loads((summary_path.parent / "config.json").read_text()))
            summary = json.loads(summary_path.read_text())
            lines = [json.loads(x) for x in (summary_path.parent / "metrics.jsonl").read_text().splitlines()]
        except (OSError, ValueError, TypeError):
            continue
        if not lines:
            continue
        per_model = [line["seconds"] / line.get("group_size", 1) for line in lines]
        key = (config.dataset, config.arch, config.width, config.batch_size, config.objective,
               str(summary.get("device", "")).split(":")[0])
        found.setdefault(key, []).append(statistics.median(per_model))
    return found


# --------------------------------------------------------------------------- the plan

def notebook_runs(profile: Profile) -> dict[str, list[TrainConfig]]:
    """Runs each notebook adds (a run shared by several notebooks belongs to the first)."""
    seen, out = set(), {}
    for nb in NOTEBOOKS:
        try:
            plan = plans.notebook_plan(profile, nb)
        except ValueError:
            continue
        out[nb] = [c for c in plan if c.run_id() not in seen]
        seen.update(c.run_id() for c in plan)
    return out


def epochs_done(config: TrainConfig, root: Path | None = None) -> int:
    folder = Path(root or paths.runs()) / config.run_id()
    if (folder / "summary.json").is_file():
        return config.epochs
    metrics = folder / "metrics.jsonl"
    if metrics.is_file():
        return min(config.epochs, len(metrics.read_text().splitlines()))
    return 0


def estimate(profile: Profile, device=None, group_size: int | None = None, steps: int | None = None,
             timing_batch: int | None = None, root: Path | None = None, tflops: float = 400.0,
             data_root=None, log=print, strategy: str | None = None) -> dict:
    """The estimate as a dict (also what ``--json`` prints); ``log`` gets progress lines."""
    device = resolve_device(device)
    strategy = strategy or default_strategy(device)
    cuda = device.type == "cuda"
    steps = steps or (20 if cuda else 2)
    by_notebook = notebook_runs(profile)
    every = {c.run_id(): c for runs in by_notebook.values() for c in runs}
    recipe = profile.recipe()
    spec = data_spec(profile.dataset, data_root)
    # Held-out images are evaluated each epoch, not trained on: a test-sized pass of their own.
    spec = replace(spec, num_train=spec.num_train - profile.validation, num_test=spec.num_test + profile.validation)
    batch = timing_batch or (recipe.batch_size if cuda else min(recipe.batch_size, 32))
    costs = Costs(batch=batch, scale=recipe.batch_size / batch)
    stored = stored_epoch_seconds(root)

    def teacher_arch(config: TrainConfig) -> str | None:
        if config.objective != "kd":
            return None
        teacher = every.get(config.objective_args.get("teacher"))
        return teacher.arch if teacher is not None else profile.teacher_arch

    def size_for(arch: str) -> int:
        return group_size or default_group_size(strategy, arch)

    # Each network at the width the profile trains it (teachers may be wider than students).
    widths = {c.arch: c.width for c in every.values()}
    remaining = {rid: c.epochs - epochs_done(c, root) for rid, c in every.items()}
    needed: dict[tuple, set] = {}  # (arch, train?) -> group sizes to time
    for c in every.values():
        if remaining[c.run_id()] > 0:
            needed.setdefault((c.arch, True), set()).update({1, size_for(c.arch)})
            if teacher_arch(c):
                needed.setdefault((teacher_arch(c), False), set()).update({1, size_for(c.arch)})
    for (arch, train), sizes in sorted(needed.items(), key=lambda kv: (kv[0][0], not kv[0][1])):
        timings = costs.timings.setdefault(arch, {})
        for g in sorted(sizes):
            if g in timings:
                continue
            start = time.perf_counter()
            try:
                t = measure(arch, recipe.replace(arch=arch, width=widths.get(arch, recipe.width)), spec, device, g,
                            steps, batch, train=train)
            except torch.OutOfMemoryError:
                log(f"  {arch} group {g}: out of memory; using the sizes that fit")
                if cuda:
                    torch.cuda.empty_cache()
                continue
            timings[g] = t
            step = f"{t.step_s * costs.scale / g * 1e3:8.1f} ms/step/model, " if t.step_s is not None else ""
            log(f"  timed {arch:<12} group {g}: {step}{t.forward_s * costs.scale / g * 1e3:8.1f} ms/forward/model "
                f"({time.perf_counter() - start:.0f} s)")

    steps_per_epoch = math.ceil(spec.num_train / recipe.batch_size)
    eval_batches = spec.num_test / recipe.batch_size

    def epoch_seconds(config: TrainConfig, group: int) -> tuple[float, str]:
        key = (config.dataset, config.arch, config.width, config.batch_size, config.objective, device.type)
        if key in stored:
            return statistics.median(stored[key]), f"store ({len(stored[key])} runs)"
        step, fwd = costs.step(config.arch, group), costs.forward(config.arch, group)
        extra = EXTRA_FORWARDS.get(config.objective, 0.0) * fwd
        if teacher_arch(config):
            extra += costs.forward(teacher_arch(config), group)
        return steps_per_epoch * (step + extra) + eval_batches * fwd, "measured"

    flops = {}
    report = {"profile": profile.name, "device": _device_name(device), "strategy": strategy, "group_size": group_size,
              "timing_batch": batch, "notebooks": {}, "per_epoch": {}}
    total_s = total_floor = 0.0
    for nb, runs in by_notebook.items():
        todo = [c for c in runs if remaining[c.run_id()] > 0]
        seconds = floor = 0.0
        for members in plan_groups(todo, group_size, strategy) if todo else []:
            g = len(members)
            for c in members:
                per_epoch, source = epoch_seconds(c, g)
                seconds += per_epoch * remaining[c.run_id()]
                report["per_epoch"].setdefault(f"{c.arch} {c.objective} (group {g})",
                                               {"seconds": per_epoch, "source": source})
                if c.arch not in flops:
                    flops[c.arch] = forward_flops(c.arch, c.width, spec.size, spec.num_classes)
                per_image = 3 * flops[c.arch]
                if teacher_arch(c):
                    t = teacher_arch(c)
                    if t not in flops:
                        flops[t] = forward_flops(t, widths.get(t, c.width), spec.size, spec.num_classes)
                    per_image += flops[t]
                floor += remaining[c.run_id()] * spec.num_train * per_image / (tflops * 1e12)
        report["notebooks"][nb] = {"runs": len(runs), "to_train": len(todo),
                                   "epochs": sum(remaining[c.run_id()] for c in todo),
                                   "seconds": seconds, "floor_seconds": floor}
        total_s += seconds
        total_floor += floor
    report["total"] = {"runs": len(every), "to_train": sum(1 for r in remaining.values() if r > 0),
                       "epochs": sum(remaining.values()), "seconds": total_s, "floor_seconds": total_floor,
                       "tflops": tflops}
    return report


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU x{torch.get_num_threads()} threads"


def _hours(seconds: float) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:8.1f} d"
    if seconds >= 3600:
        return f"{seconds / 3600:8.1f} h"
    return f"{seconds / 60:8.1f} min"


def format_report(report: dict) -> str:
    lines = [f"profile {report['profile']} on {report['device']}; strategy {report['strategy']}; groups: "
             f"{report['group_size'] or 'default per network'}; timing batch {report['timing_batch']}",
             "", "per-model seconds per epoch:"]
    for name, v in sorted(report["per_epoch"].items()):
        lines.append(f"  {name:<36} {v['seconds']:10.2f} s   {v['source']}")
    lines += ["", f"{'notebook':<9} {'runs':>5} {'to train':>9} {'epochs':>8} {'estimate':>11} "
                  f"{'floor @' + str(int(report['total']['tflops'])) + ' TFLOP/s':>18}"]
    for nb, v in report["notebooks"].items():
        lines.append(f"{nb:<9} {v['runs']:>5} {v['to_train']:>9} {v['epochs']:>8} {_hours(v['seconds']):>11} "
                     f"{_hours(v['floor_seconds']):>18}")
    t = report["total"]
    lines.append(f"{'total':<9} {t['runs']:>5} {t['to_train']:>9} {t['epochs']:>8} {_hours(t['seconds']):>11} "
                 f"{_hours(t['floor_seconds']):>18}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m cdlib estimate", description=__doc__.splitlines()[0])
    add_profile_arguments(parser)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    parser.add_argument("--strategy", default=None, choices=STRATEGIES,
                        help="how runs execute (default: cdlib.core.engine.default_strategy)")
    parser.add_argument("--group-size", type=int, default=None,
                        help="models per fused group (default: cdlib.core.runs.default_group_size per network)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per network (default 20 CUDA, 2 CPU)")
    parser.add_argument("--timing-batch", type=int, default=None,
                        help="batch for timing, scaled to the recipe's (default: the recipe's on CUDA, 32 on CPU)")
    parser.add_argument("--tflops", type=float, default=400.0, help="rate for the arithmetic floor")
    parser.add_argument("--json", action="store_true", help="print the estimate as JSON")
    args = parser.parse_args(argv)
    profile = profile_from_args(args, announce=not args.json)
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if args.json else (lambda s: print(s, flush=True))
    report = estimate(profile, args.device, args.group_size, args.steps, args.timing_batch, tflops=args.tflops,
                      data_root=args.data_root, log=log, strategy=args.strategy)
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0

