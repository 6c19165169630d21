"""One call on a lent GPU: is ``fit`` right on CUDA, how fast is it, and which defaults follow?

1. correctness: ResNet-18 trained by ``fit`` for 3 one-batch epochs on 256 random images that are
   their own mirror image, without padding or rotation (every augmentation is the identity, so
   devices whose generators differ train on the same batches): the device against the CPU, and
   ``compile=True`` against eager; relative difference of the weight updates (limit 1e-1: bf16
   rounding gives some 1e-2, a wrong path order 1) and of the training losses (1e-2);
2. throughput: images/s at batch 128 for ResNet-18/34/50/152 and DenseNet-121 on random images: a
   hand-written reference loop (fit's network, bf16 autocast, channels_last and fused SGD on one
   fixed batch: no augmentation, no metrics) and ``fit`` eager, timed by ``estimate.measure``;
3. checkpoint: one ``runs.save_checkpoint`` of each network's state as ``fit`` writes it every
   epoch, beside a paper epoch (50,000 training and 10,000 test images at section 2's rates);
4. slots: 1, 2 and 4 processes on the GPU (``LocalGPUs(slots_per_gpu=n)``), each training ResNet-18
   (then ResNet-50) with ``fit`` for a warm-up and 3 timed epochs after a common start: summed
   images/s, and how much of the span the processes overlapped;
5. compile: ``fit(compile=True)`` for ResNet-18 and ResNet-50 while the guessed compilation fits
   the budget; its warm-up is its extra seconds over the eager measurement's;
6. the ``compile``, slots-per-GPU and ``checkpoint_every`` defaults the numbers imply (``RULES``).

Time plan on an H100/H200 (``--budget-s 420``): 1. ~70 s (mostly compiling), 2. ~50 s, 3. ~10 s,
4. ~90 s, 5. ~40 s, and ResNet-50's ~160 s if it fits: 4-7 minutes. The JSON is rewritten after
every measurement; a failed one is recorded ("OOM", or the error) and the script goes on; the
summary for docs/BENCHMARKS.md comes last. Exit status 1 if a check failed or a section crashed.

    python benchmarks/gpu_check.py                     # on the lent GPU; JSON in $OUT or outputs/
    python benchmarks/gpu_check.py --dry --device cpu  # all but compile at toy sizes: ~1 CPU-minute
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's cdlib, installed or not
from cdlib import paths  # noqa: E402
from cdlib.core import runs  # noqa: E402
from cdlib.core.config import TrainConfig  # noqa: E402
from cdlib.core.data import DeviceData  # noqa: E402
from cdlib.core.models import build_model  # noqa: E402
from cdlib.core.train import fit  # noqa: E402
from cdlib.scaleout.estimate import DataSpec, checkpoint_seconds, measure, random_dataset  # noqa: E402

START = time.perf_counter()
CLASSES, TRAIN, TEST, EPOCHS = 100, 50_000, 10_000, 200  # a paper run: CIFAR-100, 200 epochs
SPEC = DataSpec(TRAIN, TEST, 32, CLASSES)
UPDATE_LIMIT, LOSS_LIMIT = 1e-1, 1e-2  # bf16 rounding moves updates by some 1e-2; a wrong path by order 1
MARGIN = 1.10                # a setting replaces the default only when at least this much faster (timing noise)
MAX_CHECKPOINT_SHARE = 0.05  # of training time; above it, checkpoints are written less often
COMPILE_GUESS_S = {"resnet18": 60, "resnet34": 90, "resnet50": 160}  # others: 300 s (about 3 s per convolution)
SETTINGS = {  # full: the GPU run; dry: the same code at toy sizes, to check it on a CPU
    "full": dict(width=1.0, batch=128, steps=50, slot_steps=50, check_images=256, budget=420.0,
                 networks=["resnet18", "resnet34", "resnet50", "resnet152", "densenet121"],
                 slots=[1, 2, 4], slot_networks=["resnet18", "resnet50"], compile=["resnet18", "resnet50"]),
    "dry": dict(width=1 / 16, batch=16, steps=2, slot_steps=2, check_images=32, budget=120.0,
                networks=["resnet18", "resnet34"], slots=[1, 2], slot_networks=["resnet18"], compile=[]),
}


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f} s] {message}", flush=True)


def rate(cell) -> float | None:
    """The images/s of a successful measurement; None for a failed, skipped or missing one."""
    return cell.get("images_per_s") if isinstance(cell, dict) else None


# --------------------------------------------------------------------------- what is measured

def mirror_data(n: int, device) -> DeviceData:
    """``n`` random images equal to their own mirror image, without padding or rotation."""
    ds = random_dataset(n, DataSpec(n, n, 32, CLASSES))
    half = ds.train_images[:, :, :16]
    ds.train_images[:] = np.concatenate([half, half[:, :, ::-1]], axis=2)  # the test split is a view of these
    return DeviceData(ds, device, rotation=0, pad=0)


def weight_updates(device: torch.device, width: float, images: int, **fit_options) -> dict:
    """The weight change and per-epoch training losses of the correctness run on ``device``."""
    config = TrainConfig(name="check", arch="resnet18", width=width, batch_size=images, epochs=3,
                         warmup_epochs=0, lr=0.01, rotation=0)
    with tempfile.TemporaryDirectory() as folder:
        fit(config, folder, data=mirror_data(images, device), device=device, progress=False, **fit_options)
        run = runs.Run(Path(folder), config)
        after, losses = run.load_model().state_dict(), list(run.metrics["train_loss"])
    torch.manual_seed(config.seed)  # fit's initialisation
    before = build_model(config.arch, CLASSES, width).state_dict()
    return {"delta": torch.cat([(after[k] - v).double().flatten() for k, v in before.items()
                                if v.is_floating_point()]), "losses": losses}


def reference_loop(arch: str, width: float, device: torch.device, steps: int, batch: int) -> dict:
    """A hand-written training loop, as one would write it: fit's network, precision and optimiser on CUDA."""
    cuda = device.type == "cuda"
    layout = torch.channels_last if cuda else torch.contiguous_format
    torch.manual_seed(0)
    model = build_model(arch, CLASSES, width).to(device, memory_format=layout).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4,
                                **({"fused": True} if cuda else {}))
    x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=layout)
    y = torch.randint(0, CLASSES, (batch,), device=device)
    for _ in range(2):  # the first round warms up (allocations, cuDNN autotuning)
        start = time.perf_counter()
        for _ in range(steps):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                loss = F.cross_entropy(model(x).float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        loss.item()  # waits for the queued steps
    return {"images_per_s": steps * batch / (time.perf_counter() - start)}


def fit_rate(arch: str, ck: "Check", eager_s: float | None = None, **fit_options) -> dict:
    """Images/s of ``fit`` (``estimate.measure``), its wall seconds, and with ``eager_s`` (the eager
    measurement's) the warm-up beyond eager's."""
    start = time.perf_counter()
    t = measure(arch, ck.s["width"], SPEC, ck.device, ck.s["steps"], ck.s["batch"], **fit_options)
    seconds = time.perf_counter() - start
    return {"images_per_s": 1 / t.train, "forward_images_per_s": 1 / t.forward, "seconds": seconds,
            **({"warmup_s": max(0.0, seconds - eager_s)} if eager_s else {})}


def checkpoint_share(arch: str, ck: "Check", epoch_s: float) -> dict:
    """One checkpoint's seconds (as ``fit`` writes it after each of a paper run's epochs) and share of an epoch."""
    seconds = checkpoint_seconds(arch, ck.s["width"], CLASSES, EPOCHS, ck.device)
    return {"seconds": seconds, "epoch_s": epoch_s, "share": seconds / (epoch_s + seconds)}


def slot_rate(arch: str, count: int, ck: "Check") -> dict:
    """Summed images/s of ``count`` worker processes training ``arch`` with ``fit`` at once on the device."""
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // count))}
    command = [sys.executable, __file__, "--device", str(ck.device), "--worker", json.dumps(
        [arch, ck.s["width"], ck.s["slot_steps"], ck.s["batch"]])]
    workers = [subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
               for _ in range(count)]
    try:
        if any(w.stdout.readline().strip() != "ready" for w in workers):
            raise RuntimeError("a worker stopped before it was ready (its error is in the log above)")
        for w in workers:  # a common start, so that their timed epochs overlap
            w.stdin.write("go\n")
            w.stdin.flush()
        outputs = [w.communicate(timeout=600)[0].splitlines() for w in workers]
        if any(w.returncode or not out for w, out in zip(workers, outputs)):
            raise RuntimeError(f"a worker failed (exit codes {[w.returncode for w in workers]}; see the log above)")
        done = [json.loads(out[-1]) for out in outputs]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    # The sum is the GPU's rate only while all train at once: the share of the span they overlap says so.
    span = max(d["end"] for d in done) - min(d["start"] for d in done)
    return {"images_per_s": sum(d["images_per_s"] for d in done), "per_worker": [d["images_per_s"] for d in done],
            "overlap": (min(d["end"] for d in done) - max(d["start"] for d in done)) / span}


def worker(device: str, arch: str, width: float, steps: int, batch: int) -> None:
    """One slot's process: ready, wait for the common start, then train (a warm-up epoch and 3 timed ones)."""
    torch.zeros(1, device=device)  # initialise the device before the start
    print("ready", flush=True)
    sys.stdin.readline()
    start = time.time()
    t = measure(arch, width, SPEC, device, steps, batch, epochs=4)
    print(json.dumps({"images_per_s": 1 / t.train, "start": start, "end": time.time()}), flush=True)


# --------------------------------------------------------------------------- the sections

class Check:
    """Settings, the result dict and its JSON file, and the recording of measurements."""

    def __init__(self, args):
        self.device = torch.device(args.device)
        self.s = {**SETTINGS["dry" if args.dry else "full"], **({"budget": args.budget_s} if args.budget_s else {})}
        if args.compile is not None:
            self.s["compile"] = [a for a in args.compile.split(",") if a]
        self.out = Path(args.out) if args.out else (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT")
                                                    else paths.outputs() / "gpu_check.json")
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else \
            f"CPU x{torch.get_num_threads()} threads"
        self.result = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda, "settings": self.s,
                       "errors": []}

    def save(self) -> None:
        self.result["seconds"] = time.perf_counter() - START
        self.result["defaults"] = implied_defaults(self.result)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(self.out.name + ".tmp")  # a kill mid-write keeps the previous file whole
        tmp.write_text(json.dumps(self.result, indent=1, default=str))
        os.replace(tmp, self.out)

    def record(self, row: dict, key: str, where: str, fn, *args, **kwargs):
        """``row[key] = fn(...)``, or what went wrong ("OOM", or the error and its innermost frame); log; save."""
        try:
            value = fn(*args, **kwargs)
            log(f"{where}: " + (f"{value['images_per_s']:.0f} images/s" if rate(value) else "done"))
        except Exception as err:
            frame = traceback.extract_tb(err.__traceback__)[-1]
            value = "OOM" if isinstance(err, torch.OutOfMemoryError) else (
                f"{type(err).__name__}: {' '.join(str(err).split())[:300]} (at {Path(frame.filename).name}:"
                f"{frame.lineno})")
            self.result["errors"] += [] if value == "OOM" else [{"where": where, "error": value}]
            log(f"{where}: {value}")
        if isinstance(value, str):  # free the failed attempt's memory before the next
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        row[key] = value
        self.save()
        return value


def correctness(ck: Check) -> None:
    out = ck.result["correctness"] = {"limits": {"updates": UPDATE_LIMIT, "losses": LOSS_LIMIT}, "passed": False}
    trained = {}
    cases = [("cpu", "cpu", {}), ("device", ck.device, {})]
    cases += [("device compile", ck.device, {"compile": True})] if "resnet18" in ck.s["compile"] else []
    for name, device, options in cases:
        ck.record(trained, name, f"correctness {name}", weight_updates, torch.device(device), ck.s["width"],
                  ck.s["check_images"], **options)
    for name, against in [("device", "cpu"), ("device compile", "device")]:
        a, b = trained.get(name), trained.get(against)
        if isinstance(a, dict) and isinstance(b, dict):
            out[f"{name} vs {against}"] = {
                "updates": float((a["delta"] - b["delta"]).norm() / b["delta"].norm().clamp_min(1e-30)),
                "losses": max(abs(x / y - 1) for x, y in zip(a["losses"], b["losses"]))}
    compared = [v for k, v in out.items() if " vs " in k]
    out["passed"] = bool(compared) and not any(isinstance(v, str) for v in trained.values()) and all(
        v["updates"] <= UPDATE_LIMIT and v["losses"] <= LOSS_LIMIT for v in compared)
    torch.compiler.reset()  # free the compiled network's CUDA graphs
    ck.save()


def throughput(ck: Check) -> None:
    rows = ck.result["throughput"] = {}
    for arch in ck.s["networks"]:
        row = rows[arch] = {}
        ck.record(row, "reference", f"{arch} reference", reference_loop, arch, ck.s["width"], ck.device,
                  ck.s["steps"], ck.s["batch"])
        ck.record(row, "eager", f"{arch} fit eager", fit_rate, arch, ck)


def checkpoint(ck: Check) -> None:
    rows = ck.result["checkpoint"] = {}
    for arch, row in ck.result.get("throughput", {}).items():
        if rate(row.get("eager")):
            epoch_s = TRAIN / row["eager"]["images_per_s"] + TEST / row["eager"]["forward_images_per_s"]
            ck.record(rows, arch, f"{arch} checkpoint", checkpoint_share, arch, ck, epoch_s)


def slots(ck: Check) -> None:
    for arch in ck.s["slot_networks"]:
        row = ck.result.setdefault("slots", {})[arch] = {}
        for count in ck.s["slots"]:
            ck.record(row, str(count), f"{arch} {count} slot(s)", slot_rate, arch, count, ck)


def compile_rates(ck: Check) -> None:
    for arch in ck.s["compile"]:
        row = ck.result.setdefault("throughput", {}).setdefault(arch, {})
        guess = COMPILE_GUESS_S.get(arch, 300)
        if time.perf_counter() - START + guess > ck.s["budget"]:
            row["compile"] = f"skipped: budget (compilation guessed at {guess} s)"
            log(f"{arch} compile: {row['compile']}")
            continue
        eager_s = row["eager"]["seconds"] if rate(row.get("eager")) else None
        ck.record(row, "compile", f"{arch} fit compile", fit_rate, arch, ck, eager_s, compile=True)
        torch.compiler.reset()  # free this network's CUDA graphs before the next


RULES = {"compile": f"on only if a paper run with it, compilation included, is >= {MARGIN}x eager's speed for every "
                    f"network measured",
         "slots_per_gpu": f"n > 1 only if n slots sum to >= {MARGIN}x one slot's images/s: the fastest such n, the "
                          f"fewest any network gets",
         "checkpoint_every": f"1 while a checkpoint costs <= {MAX_CHECKPOINT_SHARE:.0%} of a paper epoch for every "
                             f"network, else the fewest of 2, 5, 10 epochs that bring it there"}


def implied_defaults(result: dict) -> dict:
    """The defaults the numbers imply (``RULES``), what they rest on (a paper run's speed-up with compile; summed
    images/s of n slots over one's; a checkpoint's share of an epoch), and which were not measured at all."""
    run_images = EPOCHS * TRAIN
    gains = {"compile": {a: round((run_images / rate(r["eager"])) / (run_images / rate(r["compile"])
                                                                      + r["compile"]["warmup_s"]), 3)
                         for a, r in result.get("throughput", {}).items()
                         if rate(r.get("eager")) and rate(r.get("compile")) and "warmup_s" in r["compile"]},
             "slots_per_gpu": {a: {int(n): round(rate(c) / rate(r["1"]), 3) for n, c in r.items() if rate(c)}
                               for a, r in result.get("slots", {}).items() if rate(r.get("1"))},
             "checkpoint_every": {a: round(c["share"], 4) for a, c in result.get("checkpoint", {}).items()
                                  if isinstance(c, dict)}}
    checkpoints = [c for c in result.get("checkpoint", {}).values() if isinstance(c, dict)]
    return {"compile": bool(gains["compile"]) and min(gains["compile"].values()) >= MARGIN,
            "slots_per_gpu": min((max((n for n, g in by_n.items() if g >= MARGIN), key=by_n.get, default=1)
                                  for by_n in gains["slots_per_gpu"].values()), default=1),
            "checkpoint_every": next((k for k in (1, 2, 5, 10) if all(
                c["seconds"] / (k * c["epoch_s"] + c["seconds"]) <= MAX_CHECKPOINT_SHARE for c in checkpoints)), 10),
            "gains": gains, "unmeasured": [name for name, g in gains.items() if not g]}


def summary(result: dict) -> str:
    def cell(c) -> str:
        return "-" if c is None else f"{rate(c):.0f}" if rate(c) else "OOM" if c == "OOM" else str(c).split(":")[0]

    s = result["settings"]
    lines = [f"gpu_check on {result['device']} | torch {result['torch']} | cuda {result['cuda']} | "
             f"{result['seconds']:.0f} s of a {s['budget']:.0f} s budget | width {s['width']:g}, batch {s['batch']}"]
    c = result.get("correctness")
    if c:
        lines.append(f"1. correctness {'PASS' if c['passed'] else 'FAIL'}: " + "; ".join(
            f"{k}: updates {v['updates']:.1e}, losses {v['losses']:.1e}" for k, v in c.items() if " vs " in k)
            + f" (limits {UPDATE_LIMIT:.0e}, {LOSS_LIMIT:.0e})")
    lines.append(f"2, 5. images/s {'':<10}{'reference':>10}{'fit eager':>11}{'fit compile':>13}{'compile warm-up':>17}")
    for arch, r in result.get("throughput", {}).items():
        warm = f"{r['compile']['warmup_s']:.0f} s" if rate(r.get("compile")) and "warmup_s" in r["compile"] else "-"
        lines.append(f"   {arch:<22}{cell(r.get('reference')):>10}{cell(r.get('eager')):>11}"
                     f"{cell(r.get('compile')):>13}{warm:>17}")
    for arch, c in result.get("checkpoint", {}).items():
        lines.append(f"3. checkpoint {arch}: " + (f"{c['seconds']:.2f} s beside a {c['epoch_s']:.1f} s epoch "
                                                  f"({c['share']:.1%})" if isinstance(c, dict) else cell(c)))
    for arch, r in result.get("slots", {}).items():
        lines.append(f"4. slots {arch}, summed images/s: " + ", ".join(f"{n}: {cell(v)}" + (
            f" ({v['overlap']:.0%} overlap)" if rate(v) and n != "1" else "") for n, v in r.items()))
    d = result["defaults"]
    for name, rule in RULES.items():
        evidence = "unmeasured: the default stays" if name in d["unmeasured"] else json.dumps(d["gains"][name])
        lines.append(f"6. {name} = {d[name]} ({evidence}); rule: {rule}")
    return "\n".join(lines + [f"error: {e['where']}: {e['error']}" for e in result["errors"]])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dry", action="store_true", help="toy sizes, no compile: a check of the script on a CPU")
    parser.add_argument("--compile", default=None, help="networks timed with compile=True (default resnet18,resnet50;"
                                                        " none with --dry)")
    parser.add_argument("--budget-s", type=float, default=None, help="seconds (420; 120 with --dry)")
    parser.add_argument("--skip", default="", help="comma-separated: correctness,throughput,checkpoint,slots,compile")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one slot's process (section 4)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # as fit without deterministic=True
    if args.worker:
        worker(args.device, *json.loads(args.worker))
        return 0
    # fit falls back to eager when torch.compile fails; here that must be an error, not an eager number.
    warnings.filterwarnings("error", message="torch.compile failed")
    ck = Check(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout's SIGTERM still saves and prints below
    sections = {"correctness": correctness, "throughput": throughput, "checkpoint": checkpoint, "slots": slots,
                "compile": compile_rates}
    crashed = False
    try:
        for number, (name, section) in enumerate(sections.items(), 1):
            if name in args.skip.split(","):
                continue
            log(f"{number}. {name}")
            try:
                section(ck)
            except Exception as err:  # a bug outside the guarded measurements: record it, go on
                crashed = True
                ck.result["errors"].append({"where": name, "error": f"section crashed: {type(err).__name__}: {err}"})
                traceback.print_exc()
    finally:
        ck.save()
        print("\n" + summary(ck.result) + f"\n\nJSON: {ck.out}", flush=True)
    return 1 if crashed or not ck.result.get("correctness", {}).get("passed", True) else 0


if __name__ == "__main__":
    sys.exit(main())
