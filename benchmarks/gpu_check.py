"""One call on a lent GPU: is the CUDA path right, which strategy is fastest, does real training work?

Sections (each logs as it goes; the JSON is rewritten after every measurement, so a run
cut short still leaves its results; the summary table and the chosen defaults come last):

1. correctness: one train-mode forward and loss of ResNet-18 on one batch, float64 on the
   CPU against the device path (bf16 autocast, channels_last on CUDA), alone and as a fused
   group of two (also in true fp32); then a few steps (batch 128) of the same two runs with
   every strategy of ``cdlib.core.engine`` (eager again, fused, compiled) against eager:
   relative difference of the weight updates (limit 5e-2, bf16 rounding). This is the
   first compilation of ResNet-18; section 2 reuses it;
2. throughput: images/s of the engine's training step at batch 128 on random CIFAR-shaped
   data for ResNet-18/34/50/152 and DenseNet-121, beside the paper code's loop
   (``benchmarks/train_throughput.py``) in the same process. First the cheap, decisive
   measurements: reference, eager (one model), fused groups (2, 4, 8 for ResNet-18/34;
   2, 4 for the others), cuDNN deterministic against autotuned (ResNet-18 eager); then
   compiled (one model; its warm-up, i.e. compilation and CUDA-graph capture, apart from the
   steady rate) for ResNet-18, ResNet-50, ResNet-34, DenseNet-121, ResNet-152 in that order,
   each only if its compile time (estimated from the conv layers, scaled by the compiles
   measured so far) fits;
3. CIFAR-10: ResNet-18 trained with ``engine.fit`` (eager), then with the fastest strategy
   of section 2 (a fused group trains several seeds), for as many epochs (at most 5) as
   the budget left allows, sized from the measured eager throughput; top-1 and s/epoch;
4. defaults: per network the fastest strategy (fused: its group size) by images/s, the
   ``engine.default_strategy`` that implies and the ``runs.FUSED_GROUP_SIZES`` to set.

Images/s counts the images of all models of a fused group, so it compares the cost of a
model-epoch. A measurement that fails is recorded ("OOM", or the error's type and
message, in the JSON and the table) and the script goes on; what would pass the budget
is recorded as "skipped: budget".

Time plan on an H100/H200 (``--budget-s 420``; the device call must end within 8 minutes):

    ~60 s   1.  mostly the torch.compile of ResNet-18 (~50 s)
    ~70 s   2.  reference, eager, fused and cuDNN for the five networks (seconds each)
    ~180 s  2.  compiled, while its estimate ends before 75% of the budget (315 s):
                ResNet-18 (compiled already: ~5 s), ResNet-50 (~2 min); ResNet-34,
                DenseNet-121, ResNet-152 only if time is left
    ~105 s  3.  the last 25%: CIFAR-10 extraction and decoding (~25 s), eager and the
                fastest strategy, up to 5 epochs each (ResNet-18 eager ~4 s per epoch)
             4.  instant; expected total 5-6 minutes

CIFAR-10 is ``--c10`` (default ``data/cifar10-jpeg``, relative to the repository), a folder
of ``train/<class>/*.jpg`` and ``test/<class>/*.jpg``, or ``<folder>.tar.gz`` beside it
(``../shared/data/cifar10-jpeg.tar.gz`` copied to ``data/`` and carried to the device, 19
MB), extracted to a scratch folder. Missing, it is an error (exit 2), except with
``--tiny``, where section 3 is skipped with a note.

Flags: ``--device`` (cuda when available), ``--tiny`` (width 1/8, 1 step, 40 CIFAR-10
train images per class, compiled for ResNet-18 only: every section on a CPU in minutes),
``--budget-s`` (420; 900 with --tiny), ``--steps`` (timed steps per measurement: 20; 1),
``--workers`` (the reference loop's DataLoader workers), ``--archs
"resnet18:2,4,8;resnet50:2,4"`` (networks and fused group sizes), ``--c10``,
``--c10-epochs`` (at most: 5; 2), ``--skip correctness,throughput,cifar10``, ``--out``
(default ``$OUT/gpu_check.json`` when ``$OUT`` is set, else ``outputs/gpu_check.json``).
Exit status: 0; 1 if a correctness check failed or a section crashed; 2 if CIFAR-10 is missing.

    python benchmarks/gpu_check.py                                     # on the lent GPU
    python benchmarks/gpu_check.py --tiny --device cpu --c10 ../shared/data/cifar10-jpeg
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import shutil
import signal
import sys
import tarfile
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))         # train_throughput
sys.path.insert(0, str(HERE.parent))  # the checkout's cdlib, installed or not

from train_throughput import WARMUP_STEPS, random_cifar, reference_images_per_second  # noqa: E402

from cdlib import paths  # noqa: E402
from cdlib.core import engine, fused, runs  # noqa: E402
from cdlib.core.config import TrainConfig  # noqa: E402
from cdlib.core.data import DeviceData, load_dataset  # noqa: E402
from cdlib.core.models import build_model  # noqa: E402
from cdlib.core.util import true_fp32  # noqa: E402
from cdlib.scaleout.estimate import DataSpec, random_dataset, synchronize  # noqa: E402

START = time.perf_counter()
CLASSES = 100                # CIFAR-100's head, the paper's data set
BATCH = 128                  # the recipe's batch
FORWARD_BATCH = 32           # section 1's float64 CPU reference: a small batch
FORWARD_LIMITS = {"single bf16 logits": 3e-2, "single bf16 loss": 1e-2, "fused bf16 logits": 3e-2,
                  "fused bf16 loss": 1e-2, "fused fp32 logits": 1e-4}
UPDATE_LIMIT = 5e-2          # weight updates of a strategy against eager's: bf16 rounding
MARGIN = 1.10                # a strategy replaces eager only when at least this much faster (timing noise)
CIFAR_SHARE = 0.25           # of the budget, kept for section 3
ARCHS = {"resnet18": [2, 4, 8], "resnet34": [2, 4, 8], "resnet50": [2, 4], "resnet152": [2, 4],
         "densenet121": [2, 4]}
TINY_ARCHS = {"resnet18": [2, 4], "resnet34": [2], "resnet50": [2], "resnet152": [], "densenet121": [2]}
COMPILE_ORDER = ["resnet18", "resnet50", "resnet34", "densenet121", "resnet152"]
COMPILE_S_PER_CONV = 2.5     # guess until a compile is measured (ResNet-18, 20 convolutions: ~50 s)
MIN_COMPILE_S_PER_CONV = 1.0  # floor: a compile that hit inductor's on-disk cache says little about the next network
LOAD_S_PER_IMAGE = 4e-4      # CIFAR-10 extraction and JPEG decoding on one core (2 CPU cores: 4.5e-4)
EPOCH_OVERHEAD_S = 2.0       # per epoch beyond the steps: evaluation set-up, metrics, checkpoint
SAFETY = 1.25                # on estimated seconds
SKIPPED = "skipped: budget"


def elapsed() -> float:
    return time.perf_counter() - START


def log(message: str) -> None:
    print(f"[{elapsed():6.1f} s] {message}", flush=True)


def images_per_s(cell) -> float | None:
    """The rate of a successful measurement; None for a failed, skipped or missing one."""
    return cell["images_per_s"] if isinstance(cell, dict) else None


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def attempt(fn, *args):
    """``fn(*args)``, or what went wrong: "OOM", or the error's type, message and innermost frame."""
    try:
        return fn(*args)
    except (torch.OutOfMemoryError, MemoryError):
        pass  # free memory below, outside the handler, where the traceback no longer holds the tensors
    except Exception as err:
        frame = traceback.extract_tb(err.__traceback__)[-1]
        message = " ".join(str(err).split())[:300]
        return f"{type(err).__name__}: {message} (at {Path(frame.filename).name}:{frame.lineno})"
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return "OOM"


# --------------------------------------------------------------------------- training through the engine

def random_data(device: torch.device, batch: int, steps: int) -> DeviceData:
    n = batch * steps  # whole batches only: a smaller last one would be another shape to compile
    return DeviceData(random_dataset(n, DataSpec(n, batch, 32, CLASSES)), device)


def build_engine(arch: str, strategy: str, group: int, data: DeviceData, device: torch.device, width: float,
                 batch: int) -> engine.Engine:
    configs = [TrainConfig(arch=arch, width=width, batch_size=batch, epochs=2, warmup_epochs=0, seed=s)
               for s in range(group)]
    return engine.Engine([engine.Member(c, data, device) for c in configs], data, device, strategy)


@contextlib.contextmanager
def raise_compile_failures():
    """The engine falls back to eager when torch.compile fails; here that must be an error, not an eager number."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="torch.compile failed")
        yield


def timed_epoch(run: engine.Engine, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    with raise_compile_failures():
        run.train_epoch()
    synchronize(device)
    run.epoch += 1
    return time.perf_counter() - start


def time_training(arch: str, strategy: str, group: int, device: torch.device, width: float, steps: int) -> dict:
    """Steady images/s of ``group`` runs trained by ``strategy`` at batch 128, and the warm-up's extra seconds."""
    run = build_engine(arch, strategy, group, random_data(device, BATCH, steps), device, width, BATCH)
    first = timed_epoch(run, device)  # allocations, cuDNN autotuning, compilation, CUDA-graph capture
    steady = timed_epoch(run, device)
    return {"images_per_s": group * BATCH * steps / steady, "warmup_s": max(0.0, first - steady)}


def deterministic_cudnn(fn, *args):
    """``fn`` with deterministic cuDNN algorithms and no autotuning (``engine.train(deterministic=True)``)."""
    saved = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        return fn(*args)
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved


def convolutions(arch: str) -> int:
    with torch.device("meta"):  # structure only: no memory, no compute
        return sum(isinstance(m, nn.Conv2d) for m in build_model(arch, CLASSES).modules())


# --------------------------------------------------------------------------- the report

class Check:
    """Settings, the result dict and its JSON file, and the recording of measurements."""

    def __init__(self, args):
        self.device = torch.device(args.device)
        self.tiny = args.tiny
        self.width = 0.125 if self.tiny else 1.0
        self.steps = args.steps or (1 if self.tiny else 20)
        self.workers = args.workers or (2 if self.tiny else min(8, os.cpu_count() or 1))
        self.budget = args.budget_s or (900.0 if self.tiny else 420.0)
        self.skip = set(filter(None, args.skip.split(",")))
        self.archs = (TINY_ARCHS if self.tiny else ARCHS) if not args.archs else {
            a.split(":")[0]: [int(g) for g in a.split(":")[1].split(",")] if ":" in a else []
            for a in args.archs.split(";") if a}
        self.compile_archs = [a for a in (["resnet18"] if self.tiny else COMPILE_ORDER) if a in self.archs]
        self.max_epochs = args.c10_epochs or (2 if self.tiny else 5)
        self.per_class = 40 if self.tiny else None
        self.out = Path(args.out) if args.out else (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT")
                                                    else paths.outputs() / "gpu_check.json")
        self.scratch = Path(tempfile.mkdtemp(prefix="gpu_check-"))
        os.environ["CDLIB_OUTPUTS"] = str(self.scratch / "outputs")  # load_dataset's image cache: not the checkout
        cuda = self.device.type == "cuda"
        self.result = {
            "device": torch.cuda.get_device_name(self.device) if cuda else f"CPU x{torch.get_num_threads()} threads",
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if cuda else None, "tiny": self.tiny, "width": self.width,
            "batch": BATCH, "steps": self.steps, "budget_s": self.budget, "errors": [],
            "compile_s": {}}  # by network, the first compilation's seconds: the basis of the estimates

    def save(self) -> None:
        self.result["seconds"] = elapsed()
        self.result["defaults"] = choose_defaults(self.result.get("throughput", {}))
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(self.out.name + ".tmp")  # a kill mid-write keeps the previous file whole
        tmp.write_text(json.dumps(self.result, indent=1, default=str))
        os.replace(tmp, self.out)

    def error(self, where: str, message: str) -> None:
        self.result["errors"].append({"where": where, "error": message})
        log(f"{where}: {message}")

    def attempt(self, where: str, fn, *args):
        value = attempt(fn, *args)
        if isinstance(value, str) and value != "OOM":
            self.error(where, value)
        return value

    def record(self, row: dict, key: str, where: str, fn, *args):
        """Measure into ``row[key]``, log it and save the JSON."""
        value = row[key] = self.attempt(where, fn, *args)
        if isinstance(value, dict) and "images_per_s" in value:
            log(f"{where}: {value['images_per_s']:.0f} images/s"
                + (f" (warm-up {value['warmup_s']:.1f} s)" if "warmup_s" in value else ""))
        elif value == "OOM":
            log(f"{where}: out of memory")
        self.save()
        return value

    def compile_estimate(self, arch: str) -> float:
        measured = self.result["compile_s"]
        per_conv = max((s / convolutions(a) for a, s in measured.items()), default=COMPILE_S_PER_CONV)
        return SAFETY * max(per_conv, MIN_COMPILE_S_PER_CONV) * convolutions(arch)


# --------------------------------------------------------------------------- 1. correctness

def forward_check(device: torch.device, width: float) -> dict:
    """Relative differences of the device path from a float64 CPU reference (train mode: batch statistics)."""
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(build_model("resnet18", CLASSES, width))
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(FORWARD_BATCH, 3, 32, 32, generator=g) for _ in models]
    y = torch.randint(0, CLASSES, (FORWARD_BATCH,), generator=g)
    cuda = device.type == "cuda"
    layout = torch.channels_last if cuda else torch.contiguous_format  # as the engine trains
    single = copy.deepcopy(models[0]).to(device, memory_format=layout)
    pair = fused.fuse(models).to(device, memory_format=layout)
    x0 = xs[0].to(device).contiguous(memory_format=layout)
    stacked = fused.stack_members([x.to(device) for x in xs], channels_last=cuda)
    with torch.no_grad():
        refs = [copy.deepcopy(m).double()(x.double()) for m, x in zip(models, xs)]
        with torch.autocast(device.type, dtype=torch.bfloat16):
            z_single, z_pair = single(x0), pair(stacked)
        with true_fp32():  # no TF32: fusing itself must be exact to fp32 rounding
            z_pair32 = pair(stacked)

    def loss_rel(z, ref):
        return abs(F.cross_entropy(z.double().cpu(), y).item() / F.cross_entropy(ref, y).item() - 1)

    return {"single bf16 logits": rel(z_single, refs[0]), "single bf16 loss": loss_rel(z_single, refs[0]),
            "fused bf16 logits": max(rel(z_pair[:, i], refs[i]) for i in range(2)),
            "fused bf16 loss": max(loss_rel(z_pair[:, i], refs[i]) for i in range(2)),
            "fused fp32 logits": max(rel(z_pair32[:, i], refs[i]) for i in range(2))}


def weight_updates(strategy: str, data: DeviceData, device: torch.device, width: float):
    """Each of two runs' weight change over one short epoch trained by ``strategy``, and the epoch's seconds."""
    run = build_engine("resnet18", strategy, 2, data, device, width, BATCH)
    before = [{k: v.detach().clone() for k, v in model.items()} for model, _ in run.states()]
    seconds = timed_epoch(run, device)
    deltas = [torch.cat([(after[k] - b[k]).double().flatten().cpu() for k in b if b[k].is_floating_point()])
              for (after, _), b in zip(run.states(), before)]
    return deltas, seconds


def correctness(ck: Check) -> None:
    out = ck.result["correctness"] = {"limits": {**FORWARD_LIMITS, "updates": UPDATE_LIMIT},
                                      "steps": 2 if ck.tiny else 3, "passed": False}
    forward = ck.record(out, "forward", "correctness forward", forward_check, ck.device, ck.width)
    if isinstance(forward, dict):
        log("correctness forward vs float64 CPU: " + ", ".join(f"{k} {v:.1e}" for k, v in forward.items()))
    # Batch 128, as in section 2: its compiled ResNet-18 reuses this compilation (and we pay one, not two).
    data = random_data(ck.device, BATCH, out["steps"])
    trained = {}
    for name in ("eager", "eager again", "fused", "compiled"):  # "eager again": cuDNN's run-to-run noise
        trained[name] = ck.attempt(f"correctness {name}", weight_updates, name.split()[0], data, ck.device, ck.width)
    eager = trained.pop("eager")
    out["updates"] = {name: (r if isinstance(r, str) else f"no eager reference ({eager})" if isinstance(eager, str)
                             else max(rel(d, e) for d, e in zip(r[0], eager[0])))
                      for name, r in trained.items()}
    out["first_epoch_s"] = {name: r[1] for name, r in [("eager", eager), *trained.items()] if not isinstance(r, str)}
    if {"compiled", "eager again"} <= set(out["first_epoch_s"]):
        ck.result["compile_s"]["resnet18"] = max(0.0, out["first_epoch_s"]["compiled"]
                                                 - out["first_epoch_s"]["eager again"])
    checks = ([(v, FORWARD_LIMITS[k]) for k, v in forward.items()] if isinstance(forward, dict) else [(forward, 0)])
    checks += [(v, UPDATE_LIMIT) for v in out["updates"].values()]
    out["passed"] = all(isinstance(v, float) and v <= limit for v, limit in checks)
    log(f"correctness weight updates vs eager: {out['updates']} -> {'PASS' if out['passed'] else 'FAIL'}")


# --------------------------------------------------------------------------- 2. throughput

def throughput(ck: Check) -> None:
    rows = ck.result["throughput"] = {}
    deadline = ck.budget * (1 - CIFAR_SHARE)
    dev, width, steps = ck.device, ck.width, ck.steps
    for arch, groups in ck.archs.items():  # the cheap, decisive measurements of every network first
        row = rows[arch] = {}
        plan = [("reference", lambda: {"images_per_s": reference_images_per_second(
                    random_cifar(BATCH * (steps + WARMUP_STEPS), CLASSES), arch, width, dev, steps, ck.workers)}),
                ("eager", lambda: time_training(arch, "eager", 1, dev, width, steps))]
        if arch == "resnet18":  # the price of bitwise-reproducible CUDA runs (engine.train(deterministic=True))
            plan.append(("eager deterministic",
                         lambda: deterministic_cudnn(time_training, arch, "eager", 1, dev, width, steps)))
        plan += [(f"fused x{g}", lambda g=g: time_training(arch, "fused", g, dev, width, steps)) for g in groups]
        for name, measure in plan:
            if elapsed() > deadline:
                row[name] = SKIPPED
                continue
            ck.record(row, name, f"{arch} {name}", measure)
    for arch in ck.compile_archs:  # minutes each: only while the estimate fits
        estimate = ck.compile_estimate(arch)
        if elapsed() + estimate > deadline:
            rows[arch]["compiled"] = f"{SKIPPED} (compile estimated at {estimate:.0f} s)"
            log(f"{arch} compiled: {rows[arch]['compiled']}")
            continue
        cell = ck.record(rows[arch], "compiled", f"{arch} compiled", time_training, arch, "compiled", 1, dev, width,
                         steps)
        if isinstance(cell, dict):
            ck.result["compile_s"].setdefault(arch, cell["warmup_s"])
        torch.compiler.reset()  # free this network's CUDA graphs before the next
    ck.save()


# --------------------------------------------------------------------------- 3. CIFAR-10

def find_cifar10(spec: str) -> tuple[Path | None, list[Path]]:
    """The CIFAR-10 folder, else its .tar.gz beside it, else None; and the paths looked at."""
    folder = Path(spec) if Path(spec).is_absolute() else paths.REPO / spec
    archive = folder.with_name(folder.name + ".tar.gz")
    found = folder if folder.is_dir() else archive if archive.is_file() else None
    return found, [folder, archive]


def _image_files(source: Path):
    """(path below the data folder, open file) of every file of a folder or a .tar.gz."""
    if source.is_dir():
        for f in sorted(source.glob("*/*/*")):
            with open(f, "rb") as file:
                yield f.relative_to(source), file
    else:
        with tarfile.open(source) as tar:
            for member in tar:
                if member.isfile():
                    with tar.extractfile(member) as file:
                        yield Path(member.name), file


def extract_cifar10(source: Path, target: Path, per_class: int | None) -> Path:
    """An image folder of ``source``: itself, or copied to ``target`` (only ``per_class`` train and a
    quarter as many test images of each class when given)."""
    if source.is_dir() and per_class is None:
        return source
    counts: Counter = Counter()
    for path, file in _image_files(source):
        split, cls = path.parts[-3:-1]
        limit = per_class if split == "train" else max(1, per_class // 4) if per_class else None
        if limit is not None and counts[split, cls] >= limit:
            continue
        counts[split, cls] += 1
        (target / split / cls).mkdir(parents=True, exist_ok=True)
        with open(target / split / cls / path.name, "wb") as dst:
            shutil.copyfileobj(file, dst)
    return target


def train_cifar10(ck: Check, data: DeviceData, dataset: str, strategy: str, group: int, epochs: int) -> dict:
    """``group`` ResNet-18 runs (seeds 0..group-1) trained together by ``strategy``, through run folders."""
    config = TrainConfig(name="c10", dataset=dataset, arch="resnet18", width=ck.width, epochs=epochs)
    dirs = [ck.scratch / "runs" / f"{strategy}-{group}-{s}" for s in range(group)]
    start = time.perf_counter()
    with raise_compile_failures():
        summaries = engine.train([config.replace(seed=s) for s in range(group)], dirs, data=data, device=ck.device,
                                 strategy=strategy, progress=False)
    epoch_s = [json.loads(line)["seconds"] for line in (dirs[0] / "metrics.jsonl").read_text().splitlines()]
    return {"strategy": strategy, "group": group, "top1": [s["final_top1"] for s in summaries], "epoch_s": epoch_s,
            "seconds": time.perf_counter() - start}


def cifar10(ck: Check, source: Path) -> None:
    out = ck.result["cifar10"] = {"source": str(source), "runs": {}}
    images = 60000 if ck.per_class is None else 10 * ck.per_class * 5 // 4
    if elapsed() + images * LOAD_S_PER_IMAGE > ck.budget:
        out["skipped"] = SKIPPED
        return
    start = time.perf_counter()
    folder = extract_cifar10(source, ck.scratch / "cifar10", ck.per_class)
    dataset = f"imagefolder:{folder}"
    data = DeviceData(load_dataset(dataset), ck.device, rotation=15)
    out.update(load_s=time.perf_counter() - start, train_images=data.num_train, test_images=len(data.test_labels))
    log(f"CIFAR-10: {data.num_train} train / {len(data.test_labels)} test images from {source} "
        f"in {out['load_s']:.1f} s")
    row = ck.result.get("throughput", {}).get("resnet18", {})
    eager = row.get("eager")
    if images_per_s(eager) is None:  # section 2 skipped or failed: time a few steps now
        eager = ck.record(out, "eager_timing", "cifar10 eager timing", time_training, "resnet18", "eager", 1,
                          ck.device, ck.width, ck.steps)
        if images_per_s(eager) is None:
            return
    best = choose_defaults(ck.result.get("throughput", {})).get("per_arch", {}).get("resnet18", {})
    strategy, group, speedup = best.get("strategy", "eager"), best.get("group", 1), best.get("speedup", 1.0)
    epoch_s = SAFETY * ((data.num_train + len(data.test_labels) / 2) / images_per_s(eager)  # evaluation: forwards
                        + EPOCH_OVERHEAD_S)

    def cost(name: str, epochs: int) -> float:
        if name == "eager":
            return eager["warmup_s"] + epochs * epoch_s
        if strategy == "eager":
            return 0.0
        if strategy == "compiled":  # compiled afresh (section 2 reset it), and again for the smaller last batch
            return 2 * ck.compile_estimate("resnet18") + epochs * epoch_s / speedup
        return row[f"fused x{group}"]["warmup_s"] + epochs * epoch_s * group / speedup

    def fits(seconds: float) -> bool:
        return elapsed() + seconds <= ck.budget

    epochs = next((e for e in range(ck.max_epochs, 0, -1) if fits(cost("eager", e) + cost("best", e))), None) or \
        next((e for e in range(ck.max_epochs, 0, -1) if fits(cost("eager", e))), None)
    if epochs is None:
        out["skipped"] = f"{SKIPPED} (one epoch estimated at {epoch_s:.0f} s)"
        log(f"CIFAR-10: {out['skipped']}")
        return
    out["epochs"] = epochs
    log(f"CIFAR-10: resnet18 eager, {epochs} epochs (estimated {cost('eager', epochs):.0f} s)")
    ran = ck.record(out["runs"], "eager", "cifar10 eager", train_cifar10, ck, data, dataset, "eager", 1, epochs)
    if isinstance(ran, dict):
        log(f"CIFAR-10 eager: top-1 {ran['top1'][0]:.2f}%, epochs {[round(s, 1) for s in ran['epoch_s']]} s")
        epoch_s = min(ran["epoch_s"])  # measured: the steady epoch
    name = "compiled" if strategy == "compiled" else f"fused x{group}"
    if strategy == "eager":
        out["runs"]["fastest"] = "eager is the fastest strategy"
    elif not fits(cost("best", epochs)):
        out["runs"][name] = f"{SKIPPED} (estimated {cost('best', epochs):.0f} s)"
    else:
        ran = ck.record(out["runs"], name, f"cifar10 {name}", train_cifar10, ck, data, dataset, strategy, group,
                        epochs)
        if isinstance(ran, dict):
            log(f"CIFAR-10 {name}: top-1 {[round(t, 2) for t in ran['top1']]}%, "
                f"epochs {[round(s, 1) for s in ran['epoch_s']]} s")
    ck.save()


# --------------------------------------------------------------------------- 4. defaults

def choose_defaults(throughput: dict) -> dict:
    """Per network the fastest strategy by images/s (another than eager only if MARGIN faster), the
    engine-wide default it implies (the strategy fastest for most networks; ties: eager) and group sizes."""
    per_arch = {}
    for arch, row in throughput.items():
        eager = images_per_s(row.get("eager"))
        if not eager:
            continue
        sizes = {int(k[7:]): images_per_s(v) for k, v in row.items() if k.startswith("fused x") and images_per_s(v)}
        group = max(sizes, key=sizes.get, default=1)
        group = group if group > 1 and sizes[group] >= MARGIN * eager else 1
        options = {"eager": (eager, 1)}
        if group > 1:
            options["fused"] = (sizes[group], group)
        compiled = images_per_s(row.get("compiled"))
        if compiled and compiled >= MARGIN * eager:
            options["compiled"] = (compiled, 1)
        strategy = max(options, key=lambda s: options[s][0])
        reference = images_per_s(row.get("reference"))
        per_arch[arch] = {"strategy": strategy, "group": options[strategy][1], "speedup": options[strategy][0] / eager,
                          "vs_reference": options[strategy][0] / reference if reference else None,
                          "fused_group": group}
    wins = Counter(p["strategy"] for p in per_arch.values())
    default = max(engine.STRATEGIES, key=lambda s: (wins[s], s == "eager"))
    if default == "eager":
        why = "no other strategy 10% faster on most networks" if per_arch else "nothing measured"
    else:
        arch = "resnet18" if per_arch.get("resnet18", {}).get("strategy") == default else \
            next(a for a, p in per_arch.items() if p["strategy"] == default)
        why = (f"{arch}{label(per_arch[arch])[len(default):]}: {per_arch[arch]['speedup']:.1f}x eager; "
               f"fastest for {wins[default]} of {len(per_arch)} networks")
    sizes = {**runs.FUSED_GROUP_SIZES, **{a: p["fused_group"] for a, p in per_arch.items()}}
    return {"per_arch": per_arch, "default_strategy": default, "line": f"default_strategy -> {default} ({why})",
            "fused_group_sizes": sizes, "unmeasured": sorted(set(runs.FUSED_GROUP_SIZES) - set(per_arch))}


# --------------------------------------------------------------------------- the summary

def label(choice: dict) -> str:
    """A network's chosen strategy: "eager", "compiled" or "fused x8"."""
    return f"fused x{choice['group']}" if choice["strategy"] == "fused" else choice["strategy"]


def cell_text(cell) -> str:
    if cell is None:
        return "-"
    if isinstance(cell, dict):
        return f"{cell['images_per_s']:.0f}"
    return "OOM" if cell == "OOM" else "skipped" if cell.startswith("skipped") else "error"


def summary(result: dict) -> str:
    lines = [f"gpu_check on {result['device']} | torch {result['torch']} | cuda {result['cuda']} | "
             f"cudnn {result['cudnn']} | {result['seconds']:.0f} s of a {result['budget_s']:.0f} s budget"]
    c = result.get("correctness")
    if c:
        lines.append(f"1. correctness -> {'PASS' if c['passed'] else 'FAIL'} (relative differences; limits)")
        forward = c.get("forward")
        if isinstance(forward, dict):
            lines.append("   vs float64 CPU: " + ", ".join(f"{k} {v:.1e} ({c['limits'][k]:.0e})"
                                                           for k, v in forward.items()))
        if "updates" in c:
            lines.append(f"   weight updates vs eager after {c['steps']} steps of 2 runs (limit {UPDATE_LIMIT:.0e}): "
                         + ", ".join(f"{k} {v:.1e}" if isinstance(v, float) else f"{k} {cell_text(v)}"
                                     for k, v in c["updates"].items()))
    rows = result.get("throughput")
    defaults = result.get("defaults", {})
    if rows:
        fused_cols = sorted({k for r in rows.values() for k in r if k.startswith("fused x")}, key=lambda k: int(k[7:]))
        cols = ["reference", "eager", "compiled", *fused_cols]
        lines.append(f"2. throughput: images/s of training at batch {BATCH}, width {result['width']:g} "
                     f"(a group's models together)")
        lines.append(f"   {'network':<12}" + "".join(f"{c:>11}" for c in cols) + "   fastest")
        for arch, r in rows.items():
            p = defaults.get("per_arch", {}).get(arch)
            best = "-" if not p else ", ".join(
                ([] if p["strategy"] == "eager" else [f"{p['speedup']:.1f}x eager"])
                + ([f"{p['vs_reference']:.1f}x reference"] if p["vs_reference"] else []))
            best = f"{label(p)} {best}" if p else best
            lines.append(f"   {arch:<12}" + "".join(f"{cell_text(r.get(c)):>11}" for c in cols) + f"   {best}")
        if result["compile_s"]:
            lines.append("   compiled: first epoch beyond a steady one (compilation, CUDA graphs): " + ", ".join(
                f"{a} {s:.0f} s" for a, s in result["compile_s"].items())
                + ("; resnet18's in section 1" if "compiled" in result.get("correctness", {}).get("first_epoch_s", {})
                   else ""))
        r18 = rows.get("resnet18", {})
        if "eager deterministic" in r18:
            a, d = images_per_s(r18.get("eager")), images_per_s(r18["eager deterministic"])
            lines.append(f"   cuDNN, resnet18 eager: autotuned {cell_text(r18.get('eager'))}, deterministic "
                         f"{cell_text(r18['eager deterministic'])} images/s" + (f" ({d / a:.2f}x)" if a and d else ""))
    c10 = result.get("cifar10")
    if c10:
        line = "3. CIFAR-10" + (f" ({c10['source']})" if "source" in c10 else "") + ": "
        if "error" in c10 or "skipped" in c10:
            line += c10.get("error") or c10["skipped"]
        else:
            line += f"resnet18 width {result['width']:g}, {c10.get('epochs', '-')} epochs"
            for name, r in c10["runs"].items():
                if isinstance(r, dict):
                    top1 = r["top1"]
                    steady = min(r["epoch_s"]) / r["group"]
                    line += (f"; {name}: top-1 " + (f"{top1[0]:.2f}%" if len(top1) == 1 else
                                                   f"{min(top1):.2f}-{max(top1):.2f}% (seed 0 {top1[0]:.2f}%)")
                             + f", {steady:.1f} s/epoch{' per model' if r['group'] > 1 else ''} "
                               f"(first epoch {r['epoch_s'][0]:.1f} s)")
                else:
                    line += f"; {name}: {r if r.startswith(('skipped', 'eager')) else cell_text(r)}"
        lines.append(line)
    if defaults:
        lines.append("4. defaults: " + (", ".join(f"{a} {label(p)}" for a, p in defaults["per_arch"].items())
                                        or "no throughput measured"))
        lines.append(f"   {defaults['line']}")
        lines.append(f"   FUSED_GROUP_SIZES = {defaults['fused_group_sizes']}"
                     + (f"  (unmeasured, kept: {', '.join(defaults['unmeasured'])})" if defaults["unmeasured"] else ""))
    if result["errors"]:
        lines.append(f"errors ({len(result['errors'])}):")
        lines += [f"   {e['where']}: {e['error']}" for e in result["errors"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="reduced sizes: every section in minutes on a CPU")
    parser.add_argument("--budget-s", type=float, default=None, help="seconds (default 420; 900 with --tiny)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per measurement (20; 1 with --tiny)")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers of the reference loop")
    parser.add_argument("--archs", default=None,
                        help="networks and fused group sizes, e.g. 'resnet18:2,4,8;resnet50:2'")
    parser.add_argument("--c10", default="data/cifar10-jpeg", help="CIFAR-10 image folder (or FOLDER.tar.gz)")
    parser.add_argument("--c10-epochs", type=int, default=None, help="most epochs of the CIFAR-10 runs (5; 2)")
    parser.add_argument("--skip", default="", help="comma-separated: correctness,throughput,cifar10")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args(argv)
    ck = Check(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout's SIGTERM still saves and prints below
    if ck.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as engine.train without deterministic=True
    source, looked = find_cifar10(args.c10)
    missing = "cifar10" not in ck.skip and source is None
    if missing:
        message = (f"CIFAR-10 not found: looked for the folder {looked[0]} and the archive {looked[1]}. Copy "
                   f"../shared/data/cifar10-jpeg.tar.gz to data/ and carry it to the device machine "
                   f"(carry=['data/cifar10-jpeg.tar.gz']), or pass --c10 FOLDER")
        if ck.tiny:
            ck.result["cifar10"] = {"skipped": f"{message} (--tiny: section skipped)"}
        else:
            ck.result["cifar10"] = {"error": message}
            ck.error("cifar10", f"ERROR: {message}")
    sections = {"correctness": correctness, "throughput": throughput,
                "cifar10": lambda ck: cifar10(ck, source)}
    crashed = False
    try:
        ck.save()
        for number, (name, section) in enumerate(sections.items(), 1):
            if name in ck.skip or (name == "cifar10" and source is None):
                continue
            log(f"{number}. {name}")
            try:
                section(ck)
            except Exception as err:  # a bug outside the guarded measurements: record it, go on
                crashed = True
                ck.error(name, f"section crashed: {type(err).__name__}: {err}\n{traceback.format_exc(limit=-4)}")
            ck.save()
    finally:
        ck.save()
        shutil.rmtree(ck.scratch, ignore_errors=True)
        print("\n" + summary(ck.result) + f"\n\nJSON: {ck.out}", flush=True)
    if missing and not ck.tiny:
        print(f"ERROR: {ck.result['cifar10']['error']}", file=sys.stderr)
        return 2
    return 1 if crashed or not ck.result.get("correctness", {}).get("passed", True) else 0


if __name__ == "__main__":
    sys.exit(main())
