"""How long will a profile's training take here? ``python -m cdlib estimate --profile paper``.

Before a notebook starts, this prints what each notebook's plan and the whole profile will
cost on this device, one run after another:

* a run's epoch = its training images x (a training step's cost per image, plus a forward per
  image for each extra forward its objective declares: a KD teacher's, a CS-KD partner's)
  + its test and validation images x a forward + the eval-mode passes over the training
  images its objective asks for + one checkpoint write (``fit``'s default: one every epoch);
* those costs are measured now through the real training code: ``fit`` trains each network
  for two epochs on random CIFAR-shaped images (the first warms up: allocations, cuDNN
  autotuning), the second epoch's ``seconds`` give the step; eval-mode forwards of the
  trained network (``evaluate``) give the forward; ``runs.save_checkpoint`` of a state of the
  network's size gives the checkpoint. On the CPU the timing batch is smaller, and the cost
  per image is taken to be the same at the recipe's batch;
* finished runs in the store of the same network, width, objective, batch, data set and
  device give measured epoch times instead (the median of their ``seconds`` per epoch, which
  leave the checkpoint out);
* runs already finished cost nothing, partial ones only their remaining epochs; a run shared
  by several notebooks is counted at the first one.

It also prints the arithmetic floor: forward FLOPs x 3 per training image (plus the extra
forwards) at a given rate (``--tflops``, default 400, a good H100 bf16 convolution rate).

    python -m cdlib estimate --profile paper              # on the GPU that will train
    python -m cdlib estimate --profile smoke --steps 2    # a CPU check in seconds
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from cdlib import paths
from cdlib.core import runs
from cdlib.core.config import TrainConfig
from cdlib.core.data import DeviceData, load_dataset, synthetic
from cdlib.core.readers import CIFAR_COUNTS, Dataset
from cdlib.core.models import build_model
from cdlib.core.objectives import make_objective
from cdlib.core.train import evaluate, fit
from cdlib.core.util import resolve_device
from cdlib.errors import ArgumentParser, UserError
from cdlib.experiments import plans
from cdlib.experiments.profiles import Profile, add_profile_arguments, profile_from_args

NOTEBOOKS = [f"{n:02d}" for n in range(1, 10)]


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
    """``n`` random training images of ``spec``'s size and classes; the first ``spec.num_test`` (at most) are
    also the test split."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, spec.size, spec.size, 3), dtype=np.uint8)
    labels = rng.integers(0, spec.num_classes, n).astype(np.int64)
    return Dataset("random", images, labels, images[:spec.num_test], labels[:spec.num_test],
                   [str(i) for i in range(spec.num_classes)])


def forward_flops(arch: str, width: float, size: int, num_classes: int) -> float:
    """Forward FLOPs of one image (counted on the meta device: no memory, no compute)."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        model = build_model(arch, num_classes, width)
        x = torch.empty(1, 3, size, size)
    with FlopCounterMode(display=False) as counter:
        model(x)
    return float(counter.get_total_flops())


# --------------------------------------------------------------------------- measuring

@dataclass
class Timing:
    """Seconds per image of one network at one batch size, measured through ``fit``."""
    train: float    # a training step's share (CE): augmentation, forward, backward, SGD, metrics
    forward: float  # an eval-mode forward without gradient: evaluation, a KD teacher, a CS-KD partner


def measure(arch: str, width: float, spec: DataSpec, device, steps: int, batch: int, rotation: float = 15.0,
            epochs: int = 2, **fit_options) -> Timing:
    """Train ``arch`` with ``fit`` for ``epochs`` epochs of ``steps`` batches of random images in a
    temporary folder (the first epoch warms up, the median of the others is timed; the test split is
    one image, so an epoch is training alone), then time eval-mode forwards of the trained network
    over its training images (again after a warm-up pass). ``fit_options`` go to ``fit`` (``compile=True``)."""
    device = resolve_device(device)
    config = TrainConfig(name="timing", arch=arch, width=width, batch_size=batch, epochs=epochs, warmup_epochs=0,
                         rotation=rotation)
    data = DeviceData(random_dataset(steps * batch, replace(spec, num_test=1)), device, rotation)
    with tempfile.TemporaryDirectory(prefix="cdlib-timing-") as folder:
        # No checkpoint before the last epoch: its write is timed on its own (checkpoint_seconds).
        fit(config, folder, data=data, device=device, progress=False, checkpoint_every=epochs, **fit_options)
        run = runs.Run(Path(folder), config)
        epoch_s = statistics.median(run.metrics["seconds"].iloc[1:])
        model = run.load_model(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)  # as fit trains and evaluates
    for _ in range(2):  # evaluate ends with a host synchronisation: no other is needed around it
        start = time.perf_counter()
        evaluate(model, data, "train")
    return Timing(epoch_s / data.num_train, (time.perf_counter() - start) / data.num_train)


def checkpoint_seconds(arch: str, width: float, num_classes: int, epochs: int, device, folder=None) -> float:
    """Seconds of one ``runs.save_checkpoint`` of a run of ``arch`` as ``fit`` writes it: weights, SGD
    momentum and per-epoch train and test confusion counts, from ``device``; the faster of two writes,
    in a temporary folder inside ``folder`` (default: the system's)."""
    model = build_model(arch, num_classes, width).to(resolve_device(device))
    state = {"model": model.state_dict(), "optimizer": {"momentum": [p.detach().clone() for p in model.parameters()]},
             **{f"{split}_confusions": torch.zeros(epochs, num_classes, num_classes, dtype=torch.int32)
                for split in ("train", "test")}}
    seconds = []
    with tempfile.TemporaryDirectory(prefix="cdlib-timing-", dir=folder) as tmp:
        for _ in range(2):
            start = time.perf_counter()
            runs.save_checkpoint(Path(tmp), state)
            seconds.append(time.perf_counter() - start)
    return min(seconds)


def stored_epoch_seconds(root: Path | None = None) -> dict[tuple, list[float]]:
    """Median seconds per epoch of each finished run in the store, by (dataset, arch, width, batch, objective,
    device type)."""
    found: dict[tuple, list[float]] = {}
    folder = Path(root or paths.runs())
    for run_folder in sorted(folder.iterdir()) if folder.is_dir() else []:
        if not runs.is_finished(run_folder):
            continue
        try:
            run = runs.find_run(run_folder)
            seconds = statistics.median(run.metrics["seconds"])
            device = str(run.summary.get("device", "")).split(":")[0]
        except (UserError, KeyError):  # a damaged or older run says nothing reliable about speed
            continue
        c = run.config
        found.setdefault((c.dataset, c.arch, c.width, c.batch_size, c.objective, device), []).append(seconds)
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
    folder = runs.run_dir(config, root)
    return config.epochs if runs.is_finished(folder) else min(config.epochs, runs.epochs_done(folder))


def trained_images(config: TrainConfig, spec: DataSpec) -> int:
    """Images a run trains on per epoch: its ``train_images``, else all that are not held out."""
    return config.train_images or spec.num_train - config.validation


def estimate(profile: Profile, device=None, steps: int | None = None, timing_batch: int | None = None,
             root: Path | None = None, tflops: float = 400.0, data_root=None, log=print) -> dict:
    """The estimate as a dict (also what ``--json`` prints); ``log`` gets progress lines."""
    device = resolve_device(device)
    cuda = device.type == "cuda"
    steps = steps or (20 if cuda else 2)
    by_notebook = notebook_runs(profile)
    every = {c.run_id(): c for cs in by_notebook.values() for c in cs}
    recipe = profile.recipe()
    spec = data_spec(profile.dataset, data_root)
    batch = timing_batch or (recipe.batch_size if cuda else min(recipe.batch_size, 32))
    stored = stored_epoch_seconds(root)
    remaining = {rid: c.epochs - epochs_done(c, root) for rid, c in every.items()}
    todo = [c for c in every.values() if remaining[c.run_id()] > 0]

    def teacher_of(config: TrainConfig) -> tuple[str, float] | None:
        """(arch, width) of a run's teacher, when its objective forwards one."""
        if "teacher" not in make_objective(config.objective, config.objective_args).extra_forwards:
            return None
        teacher = every.get(config.objective_args.get("teacher"))  # else a teacher outside the plan: the profile's
        return (teacher.arch, teacher.width) if teacher else (profile.teacher_arch,
                                                              profile.teacher_width or profile.width)

    networks = {(c.arch, c.width) for c in todo} | {teacher_of(c) for c in todo if teacher_of(c)}
    store = Path(root or paths.runs())  # checkpoints are timed on the store's file system when it exists
    timings, checkpoints = {}, {}
    for arch, width in sorted(networks):
        start = time.perf_counter()
        t = timings[arch, width] = measure(arch, width, spec, device, steps, batch, recipe.rotation)
        epochs = max((c.epochs for c in todo if (c.arch, c.width) == (arch, width)), default=recipe.epochs)
        ck = checkpoints[arch, width] = checkpoint_seconds(arch, width, spec.num_classes, epochs, device,
                                                            store if store.is_dir() else None)
        log(f"  timed {arch:<12} x{width:<6g} {t.train * batch * 1e3:8.1f} ms/step, {t.forward * batch * 1e3:8.1f} "
            f"ms/forward (batch {batch}), checkpoint {ck:.2f} s ({time.perf_counter() - start:.0f} s)")

    def epoch_seconds(config: TrainConfig) -> tuple[float, str]:
        """Seconds of one epoch (without its checkpoint), averaged over the run's epochs, and their source."""
        key = (config.dataset, config.arch, config.width, config.batch_size, config.objective, device.type)
        if key in stored:
            return statistics.median(stored[key]), f"store ({len(stored[key])} runs)"
        t = timings[config.arch, config.width]
        objective = make_objective(config.objective, config.objective_args)
        per_image = t.train + t.forward * ("partner" in objective.extra_forwards)
        if teacher_of(config):
            per_image += timings[teacher_of(config)].forward
        train_evals = sum(map(objective.needs_train_eval, range(config.epochs))) / config.epochs
        n_train, n_evaluated = trained_images(config, spec), spec.num_test + config.validation
        return n_train * (per_image + train_evals * t.forward) + n_evaluated * t.forward, "measured"

    flops: dict[tuple, float] = {}

    def floor_per_image(config: TrainConfig) -> float:
        """Training FLOPs per image: 3 forwards of the student, plus its objective's extra forwards."""
        for net in [(config.arch, config.width), teacher_of(config)]:
            if net and net not in flops:
                flops[net] = forward_flops(*net, spec.size, spec.num_classes)
        partner = "partner" in make_objective(config.objective, config.objective_args).extra_forwards
        student = flops[config.arch, config.width]
        return (3 + partner) * student + (flops[teacher_of(config)] if teacher_of(config) else 0.0)

    report = {"profile": profile.name, "device": _device_name(device), "timing_batch": batch, "notebooks": {},
              "per_epoch": {}}
    for nb, nb_runs in by_notebook.items():
        seconds = floor = 0.0
        nb_todo = [c for c in nb_runs if remaining[c.run_id()] > 0]
        for c in nb_todo:
            per_epoch, source = epoch_seconds(c)
            checkpoint = checkpoints[c.arch, c.width]
            seconds += (per_epoch + checkpoint) * remaining[c.run_id()]
            report["per_epoch"].setdefault(f"{c.arch} x{c.width:g} {c.objective}", {
                "seconds": per_epoch, "checkpoint_seconds": checkpoint, "source": source})
            floor += remaining[c.run_id()] * trained_images(c, spec) * floor_per_image(c) / (tflops * 1e12)
        report["notebooks"][nb] = {"runs": len(nb_runs), "to_train": len(nb_todo),
                                   "epochs": sum(remaining[c.run_id()] for c in nb_todo),
                                   "seconds": seconds, "floor_seconds": floor}
    notebooks = report["notebooks"].values()
    report["total"] = {"runs": len(every), "to_train": len(todo), "epochs": sum(remaining.values()),
                       "seconds": sum(v["seconds"] for v in notebooks),
                       "floor_seconds": sum(v["floor_seconds"] for v in notebooks), "tflops": tflops}
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
    lines = [f"profile {report['profile']} on {report['device']}; one run at a time; timing batch "
             f"{report['timing_batch']}", "", "seconds per epoch of a run (training and evaluation + checkpoint):"]
    for name, v in sorted(report["per_epoch"].items()):
        lines.append(f"  {name:<32} {v['seconds']:10.2f} s + {v['checkpoint_seconds']:6.2f} s   {v['source']}")
    lines += ["", f"{'notebook':<9} {'runs':>5} {'to train':>9} {'epochs':>8} {'estimate':>11} "
                  f"{'floor @' + str(int(report['total']['tflops'])) + ' TFLOP/s':>18}"]
    for nb, v in [*report["notebooks"].items(), ("total", report["total"])]:
        lines.append(f"{nb:<9} {v['runs']:>5} {v['to_train']:>9} {v['epochs']:>8} {_hours(v['seconds']):>11} "
                     f"{_hours(v['floor_seconds']):>18}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m cdlib estimate", description=__doc__.splitlines()[0])
    add_profile_arguments(parser)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per network (default 20 CUDA, 2 CPU)")
    parser.add_argument("--timing-batch", type=int, default=None,
                        help="batch for timing (default: the recipe's on CUDA, at most 32 on CPU)")
    parser.add_argument("--tflops", type=float, default=400.0, help="rate for the arithmetic floor")
    parser.add_argument("--json", action="store_true", help="print the estimate as JSON")
    args = parser.parse_args(argv)
    profile = profile_from_args(args, announce=not args.json)
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if args.json else (lambda s: print(s, flush=True))
    report = estimate(profile, args.device, args.steps, args.timing_batch, tflops=args.tflops,
                      data_root=args.data_root, log=log)
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0
