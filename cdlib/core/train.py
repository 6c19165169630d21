"""Training one run: ``fit(config, run_dir)``, read top to bottom.

Build the run (network, SGD, generator, objective, KD teacher), resume it from its checkpoint,
then per epoch: train (the step is inline), evaluate (test; validation when the config holds images
out; the training images in eval mode when the objective asks), let the objective update its state,
append the epoch's metrics, checkpoint. At the end write the run's final files. Every file goes
through the run store (``cdlib.core.runs``), atomically: a process killed at any byte resumes to
the weights of an uninterrupted run, bitwise on the CPU (on CUDA with ``deterministic=True``).

The loop runs every forward pass (objectives score logits, ``cdlib.core.objectives``): the
student's, CS-KD's gradient-free partner pass after the anchors, and the KD teacher's in eval mode.
Every random draw of an epoch (shuffling, augmentation, partners) comes from one generator on the
training device, reseeded from (seed, epoch) at the epoch's start, so a resumed epoch draws what the
uninterrupted one did.

On CUDA the step runs under bf16 autocast with channels_last and fused SGD (float32 master
weights); augmentation, the networks' heads, losses and counts stay float32. Metrics accumulate on
the device: the host synchronises at the epoch's end and every ``SYNC_EVERY`` steps to check for a
non-finite loss. ``compile=True`` runs the training forwards under ``torch.compile`` (CUDA graphs on
CUDA); it is off by default, since no GPU measurement has shown it faster yet (docs/BENCHMARKS.md).
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from cdlib.core import runs
from cdlib.core.calibration import expected_calibration_error
from cdlib.core.config import TrainConfig
from cdlib.core.data import DeviceData, hold_out, load_dataset
from cdlib.core.models import build_model
from cdlib.core.losses import EpochEnd
from cdlib.core.objectives import make_objective
from cdlib.core.util import add_counts, progress as progress_bar, resolve_device
from cdlib.errors import UserError

SYNC_EVERY = 100  # steps between host checks for a non-finite loss


class NonFiniteLossError(UserError, FloatingPointError):
    pass


def learning_rate(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Learning rate at optimisation step ``step`` (0-based): linear warm-up, then multistep or cosine."""
    warmup_steps = round(config.warmup_epochs * steps_per_epoch)
    if step < warmup_steps:
        return config.lr * (step + 1) / warmup_steps
    if config.schedule == "cosine":
        total = config.epochs * steps_per_epoch
        done = (step - warmup_steps) / max(1, total - warmup_steps)
        return 0.5 * config.lr * (1 + math.cos(math.pi * done))
    epoch = step // steps_per_epoch
    return config.lr * config.gamma ** sum(epoch >= m for m in config.milestone_epochs())


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919 + 17) % (2**63)


def compiled(module: nn.Module, cuda: bool):
    """``torch.compile(module)`` that falls back to ``module`` itself, with a warning, if compiling fails.

    On CUDA it uses CUDA graphs ("reduce-overhead"); the loop then marks each optimisation step's
    start once (``cudagraph_mark_step_begin``), before the step's first forward: a second mark
    inside the step would free outputs the step still uses. On the CPU inductor's layout
    optimisation is off: it makes convolutions channels_last, where oneDNN's 1x1 stride-2 weight
    gradient writes out of bounds at narrow widths (oneDNN issue 6035, docs/BENCHMARKS.md).
    """
    graph = (torch.compile(module, mode="reduce-overhead", dynamic=False) if cuda else
             torch.compile(module, dynamic=False, options={"layout_optimization": False}))

    def forward(x: torch.Tensor) -> torch.Tensor:
        nonlocal graph
        if graph is not None:
            try:
                return graph(x)
            except Exception as err:  # a compiler or backend failure: the eager module computes the same
                warnings.warn(f"torch.compile failed ({type(err).__name__}: {str(err)[:300]}); continuing "
                              f"without compilation", RuntimeWarning, stacklevel=2)
                graph = None
        return module(x)
    return forward


@torch.no_grad()
def evaluate(model: nn.Module, data: DeviceData, split: str, return_logits: bool = False) -> dict:
    """Loss (NLL), top-1, top-5 and confusion counts of ``model`` on ``split`` in eval mode; one host
    synchronisation at the end."""
    model.eval()
    cuda, C, dev = data.device.type == "cuda", data.num_classes, data.device
    loss_sum = torch.zeros((), device=dev)
    top1 = torch.zeros((), device=dev, dtype=torch.long)
    top5 = torch.zeros((), device=dev, dtype=torch.long)
    confusion = torch.zeros(C * C, device=dev, dtype=torch.long)
    all_logits = []
    for images, labels in data.eval_batches(split):
        with autocast(cuda):
            logits = model(images.contiguous(memory_format=torch.channels_last) if cuda else images).float()
        loss_sum += F.cross_entropy(logits, labels, reduction="none").sum()
        topk = logits.topk(min(5, C), dim=1).indices
        top1 += (topk[:, 0] == labels).sum()
        top5 += (topk == labels[:, None]).any(1).sum()
        add_counts(confusion, labels * C + topk[:, 0])
        if return_logits:
            all_logits.append(logits)
    total = len(data.labels(split))
    result = {"loss": loss_sum.item() / total, "top1": 100 * top1.item() / total, "top5": 100 * top5.item() / total,
              "confusion": confusion.view(C, C)}
    if return_logits:
        result["logits"] = torch.cat(all_logits)
    return result


def autocast(cuda: bool):
    return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()


def selected_epoch(history: list[dict]) -> dict:
    """The epoch record a "best epoch" column reports: the highest validation top-1 when the run held
    a validation split out, else the highest test top-1 (selection on test data, as the paper's code
    does). Ties go to the earliest epoch."""
    key = "validation_top1" if "validation_top1" in history[0] else "test_top1"
    return max(history, key=lambda h: h[key])


def run_data(config: TrainConfig, device, data_root=None) -> DeviceData:
    """The data a run trains on: its data set, validation split and training subset, on ``device``."""
    return DeviceData(hold_out(load_dataset(config.dataset, data_root), config.validation, config.train_images),
                      device, config.rotation)


def fit(config: TrainConfig, run_dir: str | Path, *, data: DeviceData | None = None, device=None, data_root=None,
        teachers: Mapping[str, nn.Module] | None = None, progress: bool = True, deterministic: bool = False,
        compile: bool = False, checkpoint_every: int = 1) -> dict:
    """Train ``config`` in ``run_dir`` (resuming its checkpoint); return its summary.

    A finished folder (with ``summary.json``) is returned as it is. ``teachers`` maps a KD objective's
    ``teacher`` argument to its network (the run store loads them: ``runs.load_teachers``).
    ``deterministic`` makes cuDNN deterministic (bitwise resume on CUDA; slower). ``checkpoint_every``
    epochs a checkpoint is written (and always after the last). A loss that turns non-finite stops
    the run with ``NonFiniteLossError`` naming its epoch and step; the last checkpoint is kept.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if runs.is_finished(run_dir):
        runs.remove_leftover_checkpoint(run_dir)
        return runs.read_summary(run_dir)
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be at least 1, got {checkpoint_every}")
    device = data.device if data is not None and device is None else resolve_device(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic
    if data is None:
        data = run_data(config, device, data_root)
    if (data.num_validation != config.validation or data.device.type != device.type
            or config.train_images and data.num_train != config.train_images):
        raise ValueError(f"the data passed hold out {data.num_validation} validation images and train on "
                         f"{data.num_train} on {data.device}; the config asks for {config.validation} and "
                         f"{config.train_images or 'all the other'} training images on {device}")
    C, E = data.num_classes, config.epochs

    # ---- the run: network, optimiser, generator, objective, teacher
    torch.manual_seed(config.seed)  # the initialisation is build_model under the run's seed
    model = build_model(config.arch, C, config.width).to(device)
    model = model.to(memory_format=torch.channels_last) if cuda else model
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                nesterov=config.nesterov, weight_decay=config.weight_decay,
                                **({"fused": True} if cuda else {}))
    generator = torch.Generator(device)
    objective = make_objective(config.objective, config.objective_args)
    objective.setup(config, data.train_labels, C)
    teacher = None
    if "teacher" in objective.extra_forwards:
        name = config.objective_args.get("teacher")
        if not teachers or name not in teachers:
            raise ValueError(f"{config.run_id()}: objective {config.objective!r} needs its teacher {name!r}; pass "
                             f"teachers={{{name!r}: network}} (the run store loads it: runs.load_teachers)")
        teacher = teachers[name].to(device).eval().requires_grad_(False)
        teacher = teacher.to(memory_format=torch.channels_last) if cuda else teacher
    forward = compiled(model, cuda) if compile else model
    teacher_forward = compiled(teacher, cuda) if compile and teacher is not None else teacher
    # Per-epoch confusion counts by split, kept on the host for checkpoints: the training batches, the
    # test split, and where the run has them the validation split and the eval-mode training pass.
    splits = ["train", "test"] + ["validation"] * bool(data.num_validation) + ["train_eval"] * any(
        objective.needs_train_eval(e) for e in range(E))
    confusions = {split: torch.zeros(E, C, C, dtype=torch.int32) for split in splits}
    start_epoch, history = 0, []

    # ---- resume
    if runs.has_checkpoint(run_dir):
        state = runs.load_checkpoint(runs.checkpoint_path(run_dir), config, device)
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            objective.load_state_dict(state["objective"])
            for split, counts in confusions.items():
                counts.copy_(state[f"{split}_confusions"])
        except (RuntimeError, KeyError, ValueError, TypeError) as err:  # another network, objective or version
            raise runs.CheckpointError(
                f"checkpoint {runs.checkpoint_path(run_dir)} does not fit run {config.run_id()} ({type(err).__name__}: "
                f"{' '.join(str(err).split())[:300]}); it was written by another version of cdlib or altered. Delete "
                f"it to restart the run from scratch, or resume it with the cdlib that wrote it.") from err
        start_epoch, history = int(state["epoch"]), state["history"]
    runs.write_metrics(run_dir, history)  # drops lines written after the checkpoint, before a kill

    # ---- the epochs
    steps_per_epoch = math.ceil(data.num_train / config.batch_size)
    session_start = time.perf_counter()
    for epoch in progress_bar(range(start_epoch, E), progress, initial=start_epoch, total=E, desc=config.run_id()):
        epoch_start = time.perf_counter()
        model.train()
        generator.manual_seed(epoch_seed(config.seed, epoch))
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        train_confusion = torch.zeros(C * C, device=device, dtype=torch.long)
        first_bad_step = torch.full((), -1, device=device, dtype=torch.long)
        batches = data.train_batches(config.batch_size, generator)
        for step in progress_bar(range(steps_per_epoch), progress, leave=False, desc=f"epoch {epoch + 1}/{E}"):
            lr = learning_rate(config, epoch * steps_per_epoch + step, steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = next(batches)
            if cuda:
                batch.images = batch.images.contiguous(memory_format=torch.channels_last)
            if compile and cuda:
                torch.compiler.cudagraph_mark_step_begin()  # once per step: see ``compiled``
            with autocast(cuda):
                logits = forward(batch.images)
            if "partner" in objective.extra_forwards:  # after the anchors, as in CS-KD's code (BN statistics)
                partners = data.augment(objective.partners(batch.labels, generator), generator)
                with torch.no_grad(), autocast(cuda):
                    batch.partner_logits = forward(partners.contiguous(memory_format=torch.channels_last)
                                                   if cuda else partners)
            if teacher is not None:
                with torch.no_grad(), autocast(cuda):
                    batch.teacher_logits = teacher_forward(batch.images)
            loss = objective.loss(logits, batch, epoch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

            loss = loss.detach().float()
            first_bad_step = torch.where(~torch.isfinite(loss) & (first_bad_step < 0), step, first_bad_step)
            loss_sum += loss * len(batch.labels)
            predictions = logits.detach().argmax(1)
            correct += (predictions == batch.labels).sum()
            add_counts(train_confusion, batch.labels * C + predictions)
            if (step + 1) % SYNC_EVERY == 0 or step + 1 == steps_per_epoch:
                check_finite(first_bad_step, config, epoch)

        evaluations = {split: evaluate(model, data, split) for split in ["test"] + ["validation"] * bool(
            data.num_validation)}
        if objective.needs_train_eval(epoch):
            evaluations["train_eval"] = evaluate(model, data, "train")
        epoch_confusions = {"train": train_confusion.view(C, C),
                            **{split: result["confusion"] for split, result in evaluations.items()}}
        for split, counts in confusions.items():
            if split in epoch_confusions:
                counts[epoch] = epoch_confusions[split].cpu().int()
        objective.end_epoch(EpochEnd(epoch, epoch_confusions["train"], epoch_confusions["test"],
                                     epoch_confusions.get("validation"), epoch_confusions.get("train_eval")))
        total = data.num_train
        history.append({"epoch": epoch + 1, "train_loss": loss_sum.item() / total,
                        "train_top1": 100 * correct.item() / total, "lr": lr,
                        **{f"{split}_{metric}": evaluations[split][metric] for split in ("test", "validation")
                           if split in evaluations for metric in ("loss", "top1", "top5")},
                        "seconds": time.perf_counter() - epoch_start})
        runs.write_metrics(run_dir, history)
        if (epoch + 1) % checkpoint_every == 0 or epoch + 1 == E:
            runs.save_checkpoint(run_dir, {
                "format": runs.CHECKPOINT_FORMAT, "config": config.to_dict(), "epoch": epoch + 1, "history": history,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "objective": objective.state_dict(),
                **{f"{split}_confusions": counts for split, counts in confusions.items()},
                "device_type": device.type})

    # ---- the run's final files; the summary last, since it marks a finished run
    final = evaluate(model, data, "test", return_logits=True)
    logits, labels = final["logits"].cpu(), data.labels("test").cpu()
    best = max(history, key=lambda h: h["test_top1"])
    selected = selected_epoch(history)
    summary = {
        "run_id": config.run_id(), "num_classes": C, "final_top1": final["top1"], "final_top5": final["top5"],
        "final_nll": final["loss"], "final_ece": expected_calibration_error(logits, labels),
        "best_top1": best["test_top1"], "best_top5": best["test_top5"], "best_epoch": best["epoch"],
        "selection": "validation" if "validation_top1" in selected else "test", "selected_epoch": selected["epoch"],
        "selected_top1": selected["test_top1"], "selected_top5": selected["test_top5"],
        "train_seconds": sum(h["seconds"] for h in history), "device": str(device), "torch": torch.__version__,
        "seconds_this_session": time.perf_counter() - session_start,
    }
    runs.write_results(run_dir, logits=logits, confusions=confusions, model_state=model.state_dict(), summary=summary)
    return summary


def check_finite(first_bad_step: torch.Tensor, config: TrainConfig, epoch: int) -> None:
    bad = first_bad_step.item()
    if bad >= 0:
        raise NonFiniteLossError(
            f"{config.run_id()}: the loss became NaN or infinite at epoch {epoch + 1} (1-based), step {bad} of that "
            f"epoch (objective {config.objective!r}, lr schedule peak {config.lr}). The run stopped; its last "
            f"checkpoint is kept. Lower the learning rate or check the objective's inputs, "
            f"then train again under a new config.")
