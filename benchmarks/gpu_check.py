"""One script for a lent GPU: correctness, throughput, a real training run, one summary (issue 6).

Sections (each prints as it goes; a table and a JSON file come last):

1. correctness: the CUDA path (bf16 autocast, channels_last) against a float64 CPU
   reference on one small batch: logits and loss of one ResNet-18 and of a fused
   group of two; then two training steps of ``group.GroupTrainer`` against two
   ``train.Trainer`` runs on the device (weight updates must agree to bf16 rounding);
2. throughput (images/s) of ResNet-18/34/50/152 at batch 128: the reference loop of
   the paper's code (``benchmarks/train_throughput.py``: DataLoader workers, PIL
   transforms, fp32, a host sync per step) and ours, one model and fused groups of
   N, on the same card in the same process; plus the card's measured ceilings
   (bf16 matmul TFLOP/s, copy bandwidth);
3. a short real training run: ResNet-18 on CIFAR-10 (``imagefolder:<folder>``),
   one model with ``fit`` and a group with ``fit_group``, test accuracy and time;
4. the summary table, also written as JSON (``--out``; default ``$OUT/gpu_check.json``
   when ``$OUT`` is set, else ``outputs/gpu_check.json``).

CIFAR-10 comes from ``--c10`` (a folder ``train/<class>/*.jpg``, ``test/<class>/*.jpg``)
or, if that folder is missing, from ``<folder>.tar.gz`` (``../shared/data/cifar10-jpeg.tar.gz``
copied to ``data/``; 19 MB, so it fits a device call's carry), extracted to a temporary
folder. Planned to finish in under 8 minutes on an H100 (``--budget-s`` skips what
does not fit). ``--tiny`` runs every section end to end on a CPU in a few minutes
(width 1/8, few steps, 40 CIFAR-10 images per class).

    python benchmarks/gpu_check.py                      # on the lent GPU
    python benchmarks/gpu_check.py --tiny --device cpu  # plumbing check here
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from train_throughput import random_cifar, reference_images_per_second  # noqa: E402

from cdlib import group, paths  # noqa: E402
from cdlib.config import TrainConfig  # noqa: E402
from cdlib.data import DeviceData  # noqa: E402
from cdlib.estimate import DataSpec, measure  # noqa: E402
from cdlib.models import build_model  # noqa: E402
from cdlib.train import Trainer, fit  # noqa: E402

START = time.perf_counter()


def elapsed() -> float:
    return time.perf_counter() - START


def log(msg: str) -> None:
    print(f"[{elapsed():6.1f} s] {msg}", flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# --------------------------------------------------------------------------- 1. correctness

def check_correctness(device: torch.device, width: float) -> dict:
    out = {}
    C, B = 100, 32
    models = []
    for seed in range(2):
        torch.manual_seed(seed)
        models.append(build_model("resnet18", C, width))
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(B, 3, 32, 32, generator=g) for _ in models]
    labels = torch.randint(0, C, (B,), generator=g)
    # float64 CPU reference, train-mode BN (what training computes)
    refs = [_copy(m).double().train()(x.double()) for m, x in zip(models, xs)]
    ref_loss = [F.cross_entropy(r, labels) for r in refs]
    cuda_autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                     else torch.autocast("cpu", dtype=torch.bfloat16))
    single = _copy(models[0]).to(device).train()
    fused = group.fuse([_copy(m) for m in models]).to(device).train()
    if device.type == "cuda":
        single = single.to(memory_format=torch.channels_last)
        fused = fused.to(memory_format=torch.channels_last)
    x0 = xs[0].to(device).contiguous(memory_format=torch.channels_last)
    stacked = torch.stack(xs, 1).view(B, -1, 32, 32).to(device).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        with cuda_autocast:
            z_single = single(x0).float()
            z_fused = fused(stacked).float()
        z_fused32 = _copy(fused).float()(stacked)  # no autocast: fp32 (TF32 where the backend allows it)
    y = labels.to(device)
    out["single_bf16_logits_rel"] = rel(z_single, refs[0])
    out["single_bf16_loss_rel"] = abs(F.cross_entropy(z_single, y).item() / ref_loss[0].item() - 1)
    out["fused_bf16_logits_rel"] = max(rel(z_fused[:, i], refs[i]) for i in range(2))
    out["fused_bf16_loss_rel"] = max(abs(F.cross_entropy(z_fused[:, i], y).item() / ref_loss[i].item() - 1)
                                     for i in range(2))
    out["fused_fp32_logits_rel"] = max(rel(z_fused32[:, i], refs[i]) for i in range(2))

    # Two training steps: GroupTrainer (2 members) against two Trainers, on the device.
    spec = DataSpec(64, 64, 32, C)
    from cdlib.estimate import random_dataset
    data = DeviceData(random_dataset(64, spec), device, 15.0)
    configs = [TrainConfig(arch="resnet18", width=width, epochs=2, batch_size=32, seed=s, warmup_epochs=0)
               for s in range(2)]
    singles = [Trainer(c, device=device, data=data) for c in configs]
    before = [{k: v.detach().clone() for k, v in t.model.state_dict().items()} for t in singles]
    for t in singles:
        t.train_epoch(False)
    grouped = group.GroupTrainer(configs, device=device, data=data)
    try:
        grouped.train_epoch(False)
        worst = 0.0
        for i, t in enumerate(singles):
            after_single = t.model.state_dict()
            after_group = group.member_state(grouped.model, 2, i)
            deltas_s = torch.cat([(after_single[k] - before[i][k]).flatten().double().cpu()
                                  for k in before[i] if before[i][k].is_floating_point()])
            deltas_g = torch.cat([(after_group[k] - before[i][k]).flatten().double().cpu()
                                  for k in before[i] if before[i][k].is_floating_point()])
            worst = max(worst, float((deltas_s - deltas_g).norm() / deltas_s.norm()))
        out["group_vs_single_update_rel"] = worst
    finally:
        grouped.close()
    limits = {"single_bf16_logits_rel": 3e-2, "single_bf16_loss_rel": 1e-2, "fused_bf16_logits_rel": 3e-2,
              "fused_bf16_loss_rel": 1e-2, "fused_fp32_logits_rel": 5e-3, "group_vs_single_update_rel": 5e-2}
    if device.type == "cpu":
        limits["fused_fp32_logits_rel"] = 1e-5
    out["limits"] = limits
    out["passed"] = all(out[k] <= v for k, v in limits.items())
    return out


def _copy(module):
    import copy
    return copy.deepcopy(module)


# --------------------------------------------------------------------------- 2. throughput

def ceilings(device: torch.device) -> dict:
    """The card's measured bf16 matmul rate and copy bandwidth (METHOD.md: measure the two ceilings)."""
    if device.type != "cuda":
        return {}
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    start, reps = time.perf_counter(), 20
    for _ in range(reps):
        a @ b
    sync(device)
    tflops = 2 * n ** 3 * reps / (time.perf_counter() - start) / 1e12
    x = torch.empty(256 * 2 ** 20, device=device, dtype=torch.float32)  # 1 GiB
    y = torch.empty_like(x)
    y.copy_(x)
    sync(device)
    start, reps = time.perf_counter(), 10
    for _ in range(reps):
        y.copy_(x)
    sync(device)
    gbs = 2 * x.numel() * 4 * reps / (time.perf_counter() - start) / 1e9
    del a, b, x, y
    torch.cuda.empty_cache()
    return {"bf16_matmul_tflops": tflops, "copy_gb_per_s": gbs}


def throughput(device: torch.device, archs: dict, width: float, steps: int, workers: int, budget: float,
               cudnn_benchmark_check: bool) -> list[dict]:
    rows = []
    recipe = TrainConfig(width=width)
    spec = DataSpec(50000, 10000, 32, 100)
    for arch, sizes in archs.items():
        if elapsed() > budget:
            log(f"budget reached: skipping {arch}")
            rows.append({"arch": arch, "skipped": "time budget"})
            continue
        row = {"arch": arch, "width": width}
        ds = random_cifar(128 * (steps + 3))
        try:
            row["reference"] = reference_images_per_second(ds, arch, width, device, steps, workers)
        except Exception as err:  # e.g. no torchvision: report, go on
            row["reference"] = None
            row["reference_error"] = f"{type(err).__name__}: {err}"[:200]
        log(f"{arch}: reference loop {row['reference'] or float('nan'):.0f} images/s")
        for g in sizes:
            if elapsed() > budget:
                row[f"group{g}"] = None
                continue
            try:
                t = measure(arch, recipe.replace(arch=arch), spec, device, g, steps, 128)
                row[f"group{g}"] = g * 128 / t.step_s
            except torch.OutOfMemoryError:
                row[f"group{g}"] = "OOM"
                torch.cuda.empty_cache()
            log(f"{arch}: ours, group of {g}: {row[f'group{g}']} images/s")
        if cudnn_benchmark_check and device.type == "cuda" and arch == "resnet18" and elapsed() < budget:
            torch.backends.cudnn.benchmark = True
            try:
                g = max(sizes)
                t = measure(arch, recipe.replace(arch=arch), spec, device, g, steps, 128)
                row[f"group{g}_cudnn_benchmark"] = g * 128 / t.step_s
                log(f"{arch}: ours, group of {g}, cudnn.benchmark: {row[f'group{g}_cudnn_benchmark']:.0f} images/s")
            finally:
                torch.backends.cudnn.benchmark = False
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# --------------------------------------------------------------------------- 3. CIFAR-10

def cifar10_folder(spec: str, limit: int | None) -> tuple[Path | None, str]:
    """The CIFAR-10 image folder to train on (a subset of ``limit`` train images per class if given)."""
    folder = Path(spec)
    if not folder.is_absolute():
        folder = paths.REPO / folder
    archive = folder.with_name(folder.name + ".tar.gz")
    if folder.is_dir() and not limit:
        return folder, str(folder)
    target = Path(tempfile.mkdtemp(prefix="cifar10-"))
    if folder.is_dir():
        for split in ("train", "test"):
            keep = limit if split == "train" else max(1, limit // 4)
            for cls in sorted(p for p in (folder / split).iterdir() if p.is_dir()):
                (target / split / cls.name).mkdir(parents=True)
                for f in sorted(cls.iterdir())[:keep]:
                    shutil.copy(f, target / split / cls.name / f.name)
        return target, f"{folder} (subset of {limit} per class)"
    if archive.is_file():
        counts: dict = {}
        with tarfile.open(archive) as tar:
            for member in tar:
                parts = Path(member.name).parts
                if not member.isfile() or len(parts) < 3:
                    continue
                split, cls = parts[-3], parts[-2]
                keep = None if not limit else (limit if split == "train" else max(1, limit // 4))
                n = counts.get((split, cls), 0)
                if keep is not None and n >= keep:
                    continue
                counts[(split, cls)] = n + 1
                out = target / split / cls / parts[-1]
                out.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        return target, f"{archive} (extracted{f', subset of {limit} per class' if limit else ''})"
    return None, f"no CIFAR-10 at {folder} or {archive}"


def train_cifar10(device: torch.device, folder: Path, epochs: int, width: float, group_size: int,
                  budget: float) -> dict:
    out = {}
    work = Path(tempfile.mkdtemp(prefix="gpu-check-runs-"))
    os.environ.setdefault("CDLIB_OUTPUTS", str(work / "outputs"))  # the image cache goes there
    config = TrainConfig(name="c10", dataset=f"imagefolder:{folder}", arch="resnet18", width=width, epochs=epochs)
    from cdlib.data import load_dataset
    start = time.perf_counter()
    data = DeviceData(load_dataset(config.dataset), device, config.rotation)
    out["load_seconds"] = time.perf_counter() - start
    out["train_images"], out["test_images"] = data.num_train, len(data.test_labels)
    log(f"CIFAR-10: {data.num_train} train / {len(data.test_labels)} test images loaded in {out['load_seconds']:.0f} s")
    start = time.perf_counter()
    summary = fit(config, work / "single", device=device, progress=False, data=data)
    out["single"] = {"top1": summary["final_top1"], "seconds": time.perf_counter() - start,
                     "epoch_seconds": summary["train_seconds"] / epochs}
    log(f"CIFAR-10 ResNet-18 x{width}, {epochs} epochs: top-1 {summary['final_top1']:.2f}% "
        f"in {out['single']['seconds']:.0f} s")
    if group_size > 1 and elapsed() + group_size * out["single"]["seconds"] * 0.8 < budget:
        configs = [config.replace(seed=s) for s in range(1, group_size + 1)]
        start = time.perf_counter()
        summaries = group.fit_group(configs, [work / f"group{s}" for s in range(group_size)], device=device,
                                    progress=False, data=data)
        seconds = time.perf_counter() - start
        out["group"] = {"size": group_size, "top1": [s["final_top1"] for s in summaries], "seconds": seconds,
                        "epoch_seconds_per_model": summaries[0]["train_seconds"] / epochs / group_size}
        log(f"CIFAR-10 group of {group_size}: top-1 {[round(s, 2) for s in out['group']['top1']]} in {seconds:.0f} s")
    else:
        out["group"] = None
    shutil.rmtree(work, ignore_errors=True)
    return out


# --------------------------------------------------------------------------- 4. summary

def table(result: dict) -> str:
    lines = [f"gpu_check on {result['device']} | torch {result['torch']} | cuda {result['cuda']} | "
             f"cudnn {result['cudnn']} | {result['seconds']:.0f} s"]
    c = result.get("correctness")
    if c:
        lines.append("correctness (relative error, limit): " + ", ".join(
            f"{k} {c[k]:.1e} ({c['limits'][k]:.0e})" for k in c["limits"]) + f" -> {'PASS' if c['passed'] else 'FAIL'}")
    if result.get("ceilings"):
        lines.append("ceilings: " + ", ".join(f"{k} {v:.0f}" for k, v in result["ceilings"].items()))
    rows = result.get("throughput") or []
    if rows:
        sizes = sorted({int(k[5:]) for r in rows for k in r if k.startswith("group") and k[5:].isdigit()})
        lines.append(f"{'images/s':<12}{'reference':>11}" + "".join(f"{'group ' + str(g):>11}" for g in sizes)
                     + f"{'best/ref':>10}")
        for r in rows:
            if "skipped" in r:
                lines.append(f"{r['arch']:<12} skipped ({r['skipped']})")
                continue
            vals = [r.get(f"group{g}") for g in sizes]
            nums = [v for v in vals if isinstance(v, float)]
            ref = r.get("reference")
            fmt = lambda v: f"{v:>11.0f}" if isinstance(v, float) else f"{str(v if v is not None else '-'):>11}"  # noqa: E731
            lines.append(f"{r['arch']:<12}{fmt(ref)}" + "".join(fmt(v) for v in vals)
                         + (f"{max(nums) / ref:>9.1f}x" if nums and ref else f"{'-':>10}"))
            extra = {k: v for k, v in r.items() if k.endswith("cudnn_benchmark")}
            for k, v in extra.items():
                lines.append(f"{'':<12}{k}: {v:.0f}")
    c10 = result.get("cifar10")
    if c10:
        if "skipped" in c10:
            lines.append(f"cifar10: skipped ({c10['skipped']})")
        else:
            s = c10["single"]
            line = (f"cifar10 resnet18 {c10['epochs']} epochs ({c10['source']}): single top-1 {s['top1']:.2f}% "
                    f"({s['epoch_seconds']:.1f} s/epoch)")
            if c10.get("group"):
                gr = c10["group"]
                line += (f"; group of {gr['size']}: top-1 {min(gr['top1']):.2f}-{max(gr['top1']):.2f}% "
                         f"({gr['epoch_seconds_per_model']:.1f} s/epoch/model)")
            lines.append(line)
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--tiny", action="store_true", help="reduced sizes: every section in minutes on a CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per throughput measurement")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers of the reference loop")
    parser.add_argument("--c10", default="data/cifar10-jpeg", help="CIFAR-10 image folder (or FOLDER.tar.gz)")
    parser.add_argument("--c10-epochs", type=int, default=None)
    parser.add_argument("--c10-limit", type=int, default=None, help="train images per class (subset)")
    parser.add_argument("--c10-group", type=int, default=None, help="also train a group of this many")
    parser.add_argument("--budget-s", type=float, default=None, help="skip sections that would end later")
    parser.add_argument("--archs", default=None,
                        help="networks and group sizes to time, e.g. 'resnet18:1,4,8;resnet50:1,4'")
    parser.add_argument("--skip", default="", help="comma-separated: correctness,throughput,cifar10")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    tiny = args.tiny
    width = 0.125 if tiny else 1.0
    steps = args.steps or (2 if tiny else 20)
    workers = args.workers or (2 if tiny else min(8, os.cpu_count() or 1))
    budget = args.budget_s or (1800 if tiny else 420)
    skip = set(filter(None, args.skip.split(",")))
    archs = ({"resnet18": [1, 2], "resnet152": [1, 2]} if tiny else
             {"resnet18": [1, 2, 4, 8], "resnet34": [1, 2, 4, 8], "resnet50": [1, 2, 4], "resnet152": [1, 2, 4]})
    if args.archs:
        archs = {a.split(":")[0]: [int(g) for g in a.split(":")[1].split(",")] if ":" in a else [1]
                 for a in args.archs.split(";") if a}
    out_path = Path(args.out) if args.out else (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT")
                                                 else paths.outputs() / "gpu_check.json")
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else
              f"CPU x{torch.get_num_threads()} threads", "torch": torch.__version__, "cuda": torch.version.cuda,
              "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None, "tiny": tiny,
              "width": width, "steps": steps}

    def save():
        result["seconds"] = elapsed()
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=1, default=str))

    if "correctness" not in skip:
        log("1. correctness: CUDA path against a float64 CPU reference")
        result["correctness"] = check_correctness(device, width)
        log(json.dumps(result["correctness"]))
        save()
    if "throughput" not in skip:
        log("2. throughput")
        result["ceilings"] = ceilings(device)
        result["throughput"] = throughput(device, archs, width, steps, workers, budget * 0.6,
                                          cudnn_benchmark_check=True)
        save()
    if "cifar10" not in skip:
        limit = args.c10_limit or (40 if tiny else None)
        epochs = args.c10_epochs or (2 if tiny else 10)
        folder, source = cifar10_folder(args.c10, limit)
        if folder is None:
            result["cifar10"] = {"skipped": source}
            log(f"3. CIFAR-10 skipped: {source}")
        else:
            log(f"3. CIFAR-10 from {source}")
            c10 = train_cifar10(device, folder, epochs, width, args.c10_group or (2 if tiny else 4), budget)
            result["cifar10"] = {"epochs": epochs, "source": source, **c10}
            if folder != Path(args.c10) and str(folder).startswith(tempfile.gettempdir()):
                shutil.rmtree(folder, ignore_errors=True)
        save()
    save()
    print()
    print(table(result))
    print(f"\nJSON: {out_path}")
    return 0 if result.get("correctness", {}).get("passed", True) else 1


if __name__ == "__main__":
    sys.exit(main())
