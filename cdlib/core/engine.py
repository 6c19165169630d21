"""The training engine: one loop that trains N >= 1 runs of one recipe.

``train(configs, run_dirs, data=...)`` reads top to bottom: build each run (a
``Member``: network, SGD, generator, objective, per-epoch confusions), resume it from
its run folder's checkpoint, then per epoch train, evaluate, let each objective update
its state, rewrite each ``metrics.jsonl`` and write each checkpoint; at the end
write the final artefacts. ``fit(config, run_dir)`` is N = 1.

Each epoch is evaluated on the test split and, when the config holds training images out
(``TrainConfig.validation``), on that validation split; an objective that asks for it
(``Objective.needs_train_eval``) also gets an eval-mode pass over the un-augmented training
images. The summary's "selected" epoch is the one of best validation top-1 (best test top-1,
the paper's code's choice, without a validation split); "best" is always the test-selected one.

Every file goes to a temporary name first and is then renamed (``util.atomic_write``),
so a process killed at any byte leaves each file whole, old or new. The checkpoint
holds everything a resume needs, the metrics history included: ``metrics.jsonl`` is
a view of it, rewritten from it on resume (lines written after the last checkpoint
are dropped and redone). A group's checkpoints are all written before any is renamed;
a kill between those renames is completed on resume (``checkpoint_cut_in_renames``), so
the group resumes together. A write that fails for lack of space stops the run with a
``StoreError`` and leaves the last good checkpoint.

The engine runs every forward pass (objectives score logits, ``cdlib.core.objectives``):
the student's, CS-KD's gradient-free partner pass and the KD teacher's. How the members
execute is one switch, ``strategy``:

    eager     one member at a time, each its own network and optimiser
    compiled  the same with each network's forward under ``torch.compile`` (CUDA
              graphs on CUDA); falls back to eager, with a warning, if compiling fails
    fused     all members as one network of grouped convolutions (``cdlib.core.fused``)

Each member keeps its own seed (its initialisation is ``build_model`` under
``torch.manual_seed(seed)``), its generator reseeded from (seed, epoch) at every epoch
start (shuffling, augmentation, objective draws), its BatchNorm statistics, its
objective state and its run folder, so every strategy gives each member the result of
training it alone, to float rounding (``tests/test_engine.py``), and a run killed
anywhere resumes from its last checkpoint to the weights of an uninterrupted one.

On CUDA the step runs under bf16 autocast with channels_last and fused SGD (float32
master weights); augmentation and the networks' heads stay float32. Metrics
accumulate on the device: the host synchronises once per epoch and every
``SYNC_EVERY`` steps to check for a non-finite loss. What is exact where: on the CPU a
resume is bitwise; on CUDA it is bitwise only with ``deterministic=True`` (deterministic
cuDNN algorithms, no autotuning), otherwise equal to cuDNN's run-to-run noise.
A checkpoint resumes only on the device type that wrote it (generators, optimiser
flags and memory layouts differ between devices).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import time
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from cdlib.core import fused
from cdlib.core.calibration import expected_calibration_error
from cdlib.core.config import TrainConfig
from cdlib.core.data import Batch, DeviceData, hold_out, load_dataset
from cdlib.core.models import build_model
from cdlib.core.objectives import EpochEnd, make_objective
from cdlib.core.util import (add_counts, atomic_save, atomic_write, atomic_write_all, atomic_write_text, progress,
                             read_json, resolve_device, temporary_path)
from cdlib.errors import ConfigError, StoreError, UserError

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = 2  # 2: the checkpoint carries the metrics history; 1 (no "format" field): it did not
CHECKPOINT_KEYS = ("config", "epoch", "model", "optimizer", "objective", "train_confusions", "test_confusions",
                   "torch_rng")
SYNC_EVERY = 100  # steps between host checks for a non-finite loss
STRATEGIES = ("eager", "compiled", "fused")
# Fields in which runs trained together may differ; everything else is the shared recipe.
VARYING_FIELDS = ("name", "seed", "objective_args")
# What to do about a damaged file of a finished run: its other files are finished work, never deleted.
FINISHED_FILE_ADVICE = ("The run's other files are untouched. Restore the file from a backup, or move the run folder "
                        "away to train the run again.")


def default_strategy(device=None) -> str:
    """``eager`` everywhere: no GPU measurement has shown another strategy faster yet
    (docs/BENCHMARKS.md; ``benchmarks/gpu_check.py`` measures them)."""
    return "eager"


class NonFiniteLossError(UserError, FloatingPointError):
    pass


class CheckpointError(StoreError):
    """A checkpoint cannot be resumed: damaged, unsafe, another run's, another device's or version's."""


class MembersDivergedError(NonFiniteLossError):
    """Some runs' losses turned non-finite; the others finished. ``failures``: run id -> error."""

    def __init__(self, message: str, failures: dict[str, NonFiniteLossError]):
        super().__init__(message)
        self.failures = failures


def learning_rate(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Learning rate at optimisation step ``step`` (0-based): linear warm-up, then multistep or cosine."""
    warmup_steps = round(config.warmup_epochs * steps_per_epoch)
    if step < warmup_steps:
        return config.lr * (step + 1) / warmup_steps
    if config.schedule == "cosine":
        total = config.epochs * steps_per_epoch
        progress_ = (step - warmup_steps) / max(1, total - warmup_steps)
        return 0.5 * config.lr * (1 + math.cos(math.pi * progress_))
    epoch = step // steps_per_epoch
    return config.lr * config.gamma ** sum(epoch >= m for m in config.milestone_epochs())


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919 + 17) % (2**63)


def recipe_key(config: TrainConfig) -> str:
    """Configs with equal keys share a recipe and can train in one ``train`` call."""
    d = config.to_dict()
    for k in VARYING_FIELDS:
        d.pop(k)
    return json.dumps(d, sort_keys=True)


def check_recipe(configs: Sequence[TrainConfig]) -> None:
    """Raise a clear error unless ``configs`` may train together."""
    if not configs:
        raise ValueError("train needs at least one config")
    ref = configs[0].to_dict()
    for c in configs[1:]:
        diff = {k: (ref[k], v) for k, v in c.to_dict().items() if k not in VARYING_FIELDS and ref[k] != v}
        if diff:
            raise ConfigError(
                f"runs trained together may differ only in {', '.join(VARYING_FIELDS)}; {c.run_id()} differs "
                f"from {configs[0].run_id()} in {diff} (first, second). Train them in separate calls "
                f"(runs.get_or_train_many groups them for you).")
    ids = [c.run_id() for c in configs]
    if len(set(ids)) != len(ids):
        raise ValueError(f"the same run is listed twice: {sorted({i for i in ids if ids.count(i) > 1})}")


# --------------------------------------------------------------------------- one run

class Member:
    """One run: its network, optimiser, generator, objective, teacher and per-epoch records."""

    def __init__(self, config: TrainConfig, data: DeviceData, device: torch.device,
                 teachers: Mapping[str, nn.Module] | None = None):
        self.config = config
        cuda = device.type == "cuda"
        torch.manual_seed(config.seed)
        model = build_model(config.arch, data.num_classes, config.width).to(device)
        self.model = model.to(memory_format=torch.channels_last) if cuda else model
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
            weight_decay=config.weight_decay, **({"fused": True} if cuda else {}))
        self.torch_rng = torch.get_rng_state()
        self.generator = torch.Generator(device)
        self.objective = make_objective(config.objective, config.objective_args)
        self.objective.setup(config, data.train_labels, data.num_classes)
        self.teacher = None
        if "teacher" in self.objective.extra_forwards:
            name = config.objective_args.get("teacher")
            if not teachers or name not in teachers:
                raise ValueError(f"{config.run_id()}: objective {config.objective!r} needs its teacher {name!r}; "
                                 f"pass teachers={{{name!r}: network}} (the run store loads it: runs.load_teachers)")
            self.teacher = teachers[name]
        self.epoch = 0
        self.history: list[dict] = []  # one metrics record per finished epoch
        C = data.num_classes
        # Per-epoch confusion counts by split, kept on the host for checkpoints (300 epochs x 100 x 100
        # int32 = 12 MB each): the training batches, the test split, and where the run has them the
        # validation split and the eval-mode training pass (zero at epochs that skip it).
        splits = ["train", "test"] + ["validation"] * bool(data.num_validation) + ["train_eval"] * any(
            self.objective.needs_train_eval(e) for e in range(config.epochs))
        self.confusions = {split: torch.zeros(config.epochs, C, C, dtype=torch.int32) for split in splits}

    def checkpoint(self, model_state: dict, optimizer_state: dict, device: torch.device) -> dict:
        return {"format": CHECKPOINT_FORMAT, "config": self.config.to_dict(), "epoch": self.epoch,
                "history": self.history, "model": model_state,
                "optimizer": optimizer_state, "objective": self.objective.state_dict(),
                **{f"{split}_confusions": counts for split, counts in self.confusions.items()},
                "torch_rng": self.torch_rng, "device_type": device.type}

    def load(self, state: dict, run_dir: Path) -> None:
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.objective.load_state_dict(state["objective"])
            for split, counts in self.confusions.items():
                counts.copy_(state[f"{split}_confusions"])
        except (RuntimeError, KeyError, ValueError, TypeError) as err:  # another network, objective or version
            raise CheckpointError(
                f"checkpoint {run_dir / CHECKPOINT} does not fit run {self.config.run_id()} "
                f"({type(err).__name__}: {' '.join(str(err).split())[:300]}); it was written by another version "
                f"of cdlib or altered. Delete it to restart the run from scratch, or resume it with the cdlib "
                f"that wrote it.") from err
        self.torch_rng = state["torch_rng"]
        self.epoch = int(state["epoch"])
        self.history = state["history"] if "history" in state else history_from_metrics(run_dir, self.epoch)


# --------------------------------------------------------------------------- strategies

class CompiledModule:
    """``torch.compile(module)`` that falls back to ``module`` itself if compiling fails."""

    def __init__(self, module: nn.Module, cuda: bool):
        self.module = module
        # CUDA graphs ("reduce-overhead") on CUDA. On the CPU, inductor's layout optimisation is off: it
        # makes convolutions channels_last, and oneDNN's 1x1 stride-2 weight gradient in that layout
        # writes out of bounds below 8 (AVX2) or 16 (AVX-512) input channels (oneDNN issue 6035):
        # crashes, hangs or wrong gradients at narrow widths (docs/BENCHMARKS.md).
        self.compiled = (torch.compile(module, mode="reduce-overhead", dynamic=False) if cuda else
                         torch.compile(module, dynamic=False, options={"layout_optimization": False}))
        self.cuda = cuda

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.compiled is not None:
            try:
                if self.cuda:
                    torch.compiler.cudagraph_mark_step_begin()
                return self.compiled(x)
            except Exception as err:  # compiler or backend failure: the eager module computes the same
                warnings.warn(f"torch.compile failed ({type(err).__name__}: {str(err)[:300]}); "
                              f"continuing without compilation", RuntimeWarning, stacklevel=2)
                self.compiled = None
        return self.module(x)


class Separate:
    """One member's network and optimiser (strategies ``eager`` and ``compiled``)."""

    def __init__(self, member: Member, compiled: bool, cuda: bool):
        self.members = [member]
        self.network = member.model
        self.optimizer = member.optimizer
        self._forward = CompiledModule(member.model, cuda) if compiled else member.model
        teacher = member.teacher
        self._teacher = (CompiledModule(teacher, cuda) if compiled else teacher) if teacher is not None else None

    def forward(self, xs: list[torch.Tensor], training: bool = True) -> list[torch.Tensor]:
        # Evaluation runs the eager module: it would add graphs for another mode and shape.
        return [(self._forward if training else self.network)(xs[0])]

    def teacher(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self._teacher(xs[0])]

    def states(self, k: int) -> tuple[dict, dict]:
        return self.network.state_dict(), self.optimizer.state_dict()


class Fused:
    """All members as one network of grouped convolutions and one SGD (strategy ``fused``)."""

    def __init__(self, members: list[Member], cuda: bool):
        self.members, self.n, self.cuda = members, len(members), cuda
        optimizer_states = [m.optimizer.state_dict() for m in members]
        self.network = fused.fuse([m.model for m in members])
        if cuda:
            self.network = self.network.to(memory_format=torch.channels_last)
        c = members[0].config
        self.optimizer = torch.optim.SGD(
            self.network.parameters(), lr=c.lr, momentum=c.momentum, nesterov=c.nesterov,
            weight_decay=c.weight_decay, **({"fused": True} if cuda else {}))
        if optimizer_states[0]["state"]:
            self.optimizer.load_state_dict(fused.fuse_optimizer_states(optimizer_states))
        for m in members:  # the fused network holds the weights now
            m.model = m.optimizer = None
        teachers = [m.teacher for m in members]
        if teachers[0] is None:
            self._teacher = None
        elif all(t is teachers[0] for t in teachers):
            self._teacher, self._shared_teacher = teachers[0], True
        else:
            self._teacher, self._shared_teacher = fused.fuse(teachers).eval().requires_grad_(False), False
            if cuda:
                self._teacher = self._teacher.to(memory_format=torch.channels_last)

    def _run(self, network: nn.Module, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        out = network(fused.stack_members(xs, channels_last=self.cuda))
        return list(out.unbind(1))

    def forward(self, xs: list[torch.Tensor], training: bool = True) -> list[torch.Tensor]:
        return self._run(self.network, xs)

    def teacher(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        if self._shared_teacher:  # one teacher for all: one forward over the members' batches
            return list(self._teacher(torch.cat(xs)).split(len(xs[0])))
        return self._run(self._teacher, xs)

    def states(self, k: int) -> tuple[dict, dict]:
        return (fused.member_state(self.network, self.n, k),
                fused.member_optimizer_state(self.optimizer.state_dict(), self.n, k))


# --------------------------------------------------------------------------- the loop

class MemberFailure(Exception):
    """Members' losses turned non-finite; ``errors`` maps member position to its error."""

    def __init__(self, errors: dict[int, NonFiniteLossError]):
        super().__init__("; ".join(f"member {i}: {e}" for i, e in errors.items()))
        self.errors = errors


class Engine:
    """N members of one recipe at the same epoch, executed by ``strategy``."""

    def __init__(self, members: list[Member], data: DeviceData, device: torch.device, strategy: str):
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if len({m.epoch for m in members}) != 1:
            raise ValueError(f"members must be at the same epoch, got {sorted({m.epoch for m in members})}")
        self.members, self.data, self.device = members, data, device
        self.config, self.n = members[0].config, len(members)
        self.epoch = members[0].epoch
        self.cuda = device.type == "cuda"
        self.steps_per_epoch = math.ceil(data.num_train / self.config.batch_size)
        self.extra_forwards = members[0].objective.extra_forwards
        for m in members:
            if m.teacher is not None:
                m.teacher = m.teacher.to(device).eval().requires_grad_(False)
                if self.cuda:
                    m.teacher = m.teacher.to(memory_format=torch.channels_last)
        if strategy == "fused" and self.n > 1:
            self.units = [Fused(members, self.cuda)]
        else:
            self.units = [Separate(m, strategy == "compiled", self.cuda) for m in members]

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else contextlib.nullcontext()

    def states(self) -> list[tuple[dict, dict]]:
        """(model state, optimiser state) of every member, in members' order."""
        return [unit.states(k) for unit in self.units for k in range(len(unit.members))]

    def _step(self, unit, batches: list[Batch], lr: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One optimisation step of ``unit``'s members: every forward, the losses, backward, SGD."""
        members = unit.members
        for group in unit.optimizer.param_groups:
            group["lr"] = lr
        with self.autocast():
            logits = unit.forward([b.images for b in batches])
        if "partner" in self.extra_forwards:  # after the anchors, as in CS-KD's code (BN statistics)
            partners = [self.data.augment(m.objective.partners(b.labels, m.generator), m.generator)
                        for m, b in zip(members, batches)]
            with torch.no_grad(), self.autocast():
                for b, z in zip(batches, unit.forward(partners)):
                    b.partner_logits = z
        if "teacher" in self.extra_forwards:
            with torch.no_grad(), self.autocast():
                for b, z in zip(batches, unit.teacher([b.images for b in batches])):
                    b.teacher_logits = z
        losses = [m.objective.loss(z, b, self.epoch) for m, z, b in zip(members, logits, batches)]
        unit.optimizer.zero_grad(set_to_none=True)
        (losses[0] if len(losses) == 1 else torch.stack(losses).sum()).backward()
        unit.optimizer.step()
        return list(zip(losses, logits))

    def train_epoch(self, show_progress: bool = False) -> list[dict]:
        """One epoch for every member; returns each member's train loss, top-1 and last lr."""
        n, C, config, dev = self.n, self.data.num_classes, self.config, self.device
        for unit in self.units:
            unit.network.train()
        for m in self.members:
            m.generator.manual_seed(epoch_seed(m.config.seed, self.epoch))
        iterators = [self.data.train_batches(config.batch_size, m.generator) for m in self.members]
        loss_sum = torch.zeros(n, device=dev)
        correct = torch.zeros(n, device=dev, dtype=torch.long)
        confusion = torch.zeros(n * C * C, device=dev, dtype=torch.long)
        first_bad_step = torch.full((n,), -1, device=dev, dtype=torch.long)
        offsets = torch.arange(n, device=dev)[:, None] * (C * C)
        lr = config.lr
        for i in progress(range(self.steps_per_epoch), show_progress, leave=False,
                          desc=f"epoch {self.epoch + 1}/{config.epochs}"):
            lr = learning_rate(config, self.epoch * self.steps_per_epoch + i, self.steps_per_epoch)
            batches = [next(it) for it in iterators]
            if self.cuda:
                for b in batches:
                    b.images = b.images.contiguous(memory_format=torch.channels_last)
            results, start = [], 0
            for unit in self.units:
                results += self._step(unit, batches[start:start + len(unit.members)], lr)
                start += len(unit.members)
            losses = torch.stack([loss.detach().float() for loss, _ in results])
            labels = torch.stack([b.labels for b in batches])
            bad = ~torch.isfinite(losses) & (first_bad_step < 0)
            first_bad_step = torch.where(bad, torch.full_like(first_bad_step, i), first_bad_step)
            loss_sum += losses * labels.shape[1]
            predictions = torch.stack([z.detach().argmax(1) for _, z in results])
            correct += (predictions == labels).sum(1)
            add_counts(confusion, (offsets + labels * C + predictions).flatten())
            if (i + 1) % SYNC_EVERY == 0:
                self._check_finite(first_bad_step)
        self._check_finite(first_bad_step)
        self.last_train_confusions = confusion.view(n, C, C)
        total = self.data.num_train
        return [{"train_loss": loss_sum[k].item() / total, "train_top1": 100 * correct[k].item() / total, "lr": lr}
                for k in range(n)]

    def _check_finite(self, first_bad_step: torch.Tensor) -> None:
        errors = {}
        for k, bad in enumerate(first_bad_step.tolist()):
            if bad >= 0:
                c = self.members[k].config
                errors[k] = NonFiniteLossError(
                    f"{c.run_id()}: the loss became NaN or infinite at epoch {self.epoch + 1} (1-based), step "
                    f"{bad} of that epoch (objective {c.objective!r}, lr schedule peak {c.lr}). The run stopped; "
                    f"its last checkpoint (end of epoch {self.epoch}) is kept. Lower the learning rate or check "
                    f"the objective's inputs, then train again under a new config.")
        if errors:
            raise MemberFailure(errors)

    @torch.no_grad()
    def evaluate(self, split: str = "test", return_logits: bool = False) -> list[dict]:
        """Per member: loss (NLL), top-1, top-5 and confusion counts on ``split`` (``DeviceData.eval_batches``),
        in eval mode."""
        n, C, dev = self.n, self.data.num_classes, self.device
        for unit in self.units:
            unit.network.eval()
        loss_sum = torch.zeros(n, device=dev)
        top1 = torch.zeros(n, device=dev, dtype=torch.long)
        top5 = torch.zeros(n, device=dev, dtype=torch.long)
        confusion = torch.zeros(n * C * C, device=dev, dtype=torch.long)
        offsets = torch.arange(n, device=dev)[:, None] * (C * C)
        all_logits = []
        for images, labels in self.data.eval_batches(split):
            if self.cuda:
                images = images.contiguous(memory_format=torch.channels_last)
            with self.autocast():
                outputs = [z for unit in self.units for z in unit.forward([images] * len(unit.members), False)]
            logits = torch.stack(outputs).float()  # (N, B, C)
            B = len(labels)
            loss_sum += F.cross_entropy(logits.reshape(n * B, C), labels.repeat(n), reduction="none").view(n, B).sum(1)
            topk = logits.topk(min(5, C), dim=2).indices
            top1 += (topk[..., 0] == labels).sum(1)
            top5 += (topk == labels[None, :, None]).any(2).sum(1)
            add_counts(confusion, (offsets + labels * C + topk[..., 0]).flatten())
            if return_logits:
                all_logits.append(logits)
        total = len(self.data.labels(split))
        confusion = confusion.view(n, C, C)
        results = []
        for k in range(n):
            r = {"loss": loss_sum[k].item() / total, "top1": 100 * top1[k].item() / total,
                 "top5": 100 * top5[k].item() / total, "confusion": confusion[k]}
            if return_logits:
                r["logits"] = torch.cat([z[k] for z in all_logits])
            results.append(r)
        return results


# --------------------------------------------------------------------------- run folders

def load_checkpoint(path: Path, config: TrainConfig | None = None, device=None) -> dict:
    """Load a checkpoint safely (tensors and plain values only) and check, before any use, that it
    is complete, of a format this cdlib reads, ``config``'s, and when ``device`` is given, of that
    device type."""
    run = f"run {Path(path).parent.name}"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only refused an arbitrary Python object
        raise CheckpointError(
            f"cannot load checkpoint {path} of {run}: it holds Python objects other than tensors and plain values, "
            f"and loading it could run arbitrary code, so it was refused ({str(err).splitlines()[-1][:200]}). "
            f"cdlib never writes such files: delete it (the run restarts from scratch) unless you trust its "
            f"source.") from err
    except Exception as err:  # truncated or corrupted archive
        raise CheckpointError(
            f"cannot load checkpoint {path} of {run}: {type(err).__name__}: {str(err)[:300]}. The file is "
            f"truncated or damaged (a copy that stopped, a full disk, another program): delete it to restart that "
            f"run from scratch (other runs are unaffected); never load checkpoints from untrusted sources.") from err
    state = state if isinstance(state, dict) else {}
    if config is not None and state.get("config") != config.to_dict():
        raise CheckpointError(
            f"checkpoint {path} was written for another config ({state.get('config')}), not {config.to_dict()}. "
            f"Move it away or delete it; it will not be resumed.")
    written_on = state.get("device_type", "cpu")  # checkpoints before this field was added came from CPUs
    if device is not None and written_on != torch.device(device).type:
        raise CheckpointError(
            f"checkpoint {path} was written on {written_on} and cannot resume exactly on "
            f"{torch.device(device).type}: random generators, optimiser flags and memory layouts differ between "
            f"devices. Resume it on a {written_on} device, or delete it to restart the run on this one.")
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing or state.get("format", 1) > CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"checkpoint {path} of {run} is not one this cdlib can resume (format {state.get('format', 1)}, this "
            f"cdlib writes {CHECKPOINT_FORMAT}; missing {missing}). Resume it with the cdlib that wrote it, or "
            f"delete it to restart the run.")
    return state


def checkpoint_cut_in_renames(run_dir: Path, config: TrainConfig, device, epoch: int) -> dict | None:
    """The checkpoint of ``epoch`` that a kill between the renames of a group's checkpoints left under
    its temporary name (``atomic_write_all`` writes them all before renaming any), now renamed into
    place; None where there is none. Moved forward, the member resumes with its group, exactly:
    apart, a fused group of another size would sum in another order."""
    tmp = temporary_path(run_dir / CHECKPOINT)
    if not tmp.is_file():
        return None
    try:
        state = load_checkpoint(tmp, config, device)
    except CheckpointError:  # a write cut short, of an earlier epoch
        return None
    if state["epoch"] != epoch:
        return None
    os.replace(tmp, run_dir / CHECKPOINT)
    return state


def history_from_metrics(run_dir: Path, epochs: int) -> list[dict]:
    """The first ``epochs`` lines of ``metrics.jsonl``, for checkpoints of format 1 (which lack the history)."""
    path = run_dir / "metrics.jsonl"
    try:
        history = [json.loads(line) for line in path.read_text().splitlines()[:epochs]]
    except (OSError, ValueError) as err:
        raise StoreError(f"cannot read {path} of run {run_dir.name} ({err}), which this run's older checkpoint "
                         f"needs. Delete {CHECKPOINT} to restart the run from scratch.") from err
    if len(history) < epochs:
        raise StoreError(f"{path} of run {run_dir.name} has {len(history)} lines, but its older checkpoint stands at "
                         f"epoch {epochs}. Delete {CHECKPOINT} to restart the run from scratch.")
    return history


def write_metrics(run_dir: Path, history: list[dict]) -> None:
    """``metrics.jsonl``: one line per finished epoch, rewritten whole so a kill never tears a line."""
    atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))


def remove_leftover_checkpoint(run_dir: Path) -> None:
    """A finished run's checkpoint is left by a kill between its summary and the checkpoint's removal."""
    with contextlib.suppress(OSError):  # tidying only: a read-only store still serves its runs
        (run_dir / CHECKPOINT).unlink(missing_ok=True)


def selected_epoch(history: list[dict]) -> dict:
    """The epoch record a "best epoch" column reports: the highest validation top-1 when the run held
    a validation split out, else the highest test top-1 (the paper's code: selection on test data).
    Ties go to the earliest epoch."""
    key = "validation_top1" if "validation_top1" in history[0] else "test_top1"
    return max(history, key=lambda h: h[key])


def _finish(engine: Engine, run_dirs: list[Path], start: float) -> list[dict]:
    """Write each member's final artefacts; ``summary.json`` last: it marks a finished run."""
    finals = engine.evaluate("test", return_logits=True)
    labels = engine.data.labels("test").cpu()
    summaries = []
    for m, (model_state, _), run_dir, final in zip(engine.members, engine.states(), run_dirs, finals):
        logits = final["logits"].cpu()
        atomic_write(run_dir / "test_logits.npy", lambda f: np.save(f, logits.numpy()))
        atomic_write(run_dir / "confusions.npz", lambda f: np.savez_compressed(
            f, **{split: counts.numpy() for split, counts in m.confusions.items()}))
        atomic_save(model_state, run_dir / "model.pt")
        best = max(m.history, key=lambda h: h["test_top1"])
        selected = selected_epoch(m.history)
        summary = {
            "run_id": m.config.run_id(), "num_classes": engine.data.num_classes, "final_top1": final["top1"],
            "final_top5": final["top5"], "final_nll": final["loss"],
            "final_ece": expected_calibration_error(logits, labels),
            "best_top1": best["test_top1"], "best_top5": best["test_top5"], "best_epoch": best["epoch"],
            "selection": "validation" if "validation_top1" in selected else "test",
            "selected_epoch": selected["epoch"], "selected_top1": selected["test_top1"],
            "selected_top5": selected["test_top5"], "train_seconds": sum(h["seconds"] for h in m.history),
            "device": str(engine.device), "torch": torch.__version__,
            "seconds_this_session": time.perf_counter() - start, "group_size": engine.n,
        }
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=1))
        (run_dir / CHECKPOINT).unlink()
        summaries.append(summary)
    return summaries


def _evaluate_epoch(engine: Engine) -> dict[str, list[dict]]:
    """The epoch's evaluations by split: test; validation when the data hold one out; the eval-mode
    pass over the training images when a member's objective asks for it (all members get it then)."""
    splits = ["test"] + ["validation"] * bool(engine.data.num_validation)
    if any(m.objective.needs_train_eval(engine.epoch) for m in engine.members):
        splits.append("train")
    return {split: engine.evaluate(split) for split in splits}


def _train_from(members: list[Member], run_dirs: list[Path], data: DeviceData, device: torch.device,
                strategy: str, show_progress: bool) -> list[dict]:
    """Train members that stand at the same epoch to the end; raises MemberFailure."""
    engine = Engine(members, data, device, strategy)
    for m, run_dir in zip(members, run_dirs):  # drops lines written after the checkpoint, before a kill
        write_metrics(run_dir, m.history)
    config = engine.config
    start = time.perf_counter()
    desc = config.run_id() if engine.n == 1 else f"{config.name} x{engine.n} ({strategy})"
    for _ in progress(range(engine.epoch, config.epochs), show_progress, initial=engine.epoch,
                      total=config.epochs, desc=desc):
        epoch_start = time.perf_counter()
        train_records = engine.train_epoch(show_progress)
        evaluations = _evaluate_epoch(engine)
        e = engine.epoch
        for k, m in enumerate(members):
            confusion = {"train": engine.last_train_confusions[k],
                         **{"train_eval" if split == "train" else split: results[k]["confusion"]
                            for split, results in evaluations.items()}}
            for split, counts in m.confusions.items():
                if split in confusion:
                    counts[e] = confusion[split].cpu().int()
            m.objective.end_epoch(EpochEnd(e, confusion["train"], confusion["test"], confusion.get("validation"),
                                           confusion.get("train_eval")))
        seconds = time.perf_counter() - epoch_start
        engine.epoch += 1
        for k, (m, run_dir, train_record) in enumerate(zip(members, run_dirs, train_records)):
            m.epoch = engine.epoch
            evaluated = {f"{split}_{metric}": evaluations[split][k][metric]
                         for split in ("test", "validation") if split in evaluations
                         for metric in ("loss", "top1", "top5")}
            m.history.append({"epoch": e + 1, **train_record, **evaluated, "seconds": seconds,
                              "group_size": engine.n})
            write_metrics(run_dir, m.history)
        # All members' checkpoints at once, so the group resumes together: runs left at different epochs
        # would resume apart, and a fused group of another size sums in another order (not bitwise).
        checkpoints = [m.checkpoint(model_state, optimizer_state, device)
                       for m, (model_state, optimizer_state) in zip(members, engine.states())]
        atomic_write_all([(run_dir / CHECKPOINT, lambda f, c=c: torch.save(c, f))
                          for run_dir, c in zip(run_dirs, checkpoints)])
    return _finish(engine, run_dirs, start)


def train(configs: Sequence[TrainConfig], run_dirs: Sequence[str | Path], *, data: DeviceData | None = None,
          device=None, data_root=None, strategy: str | None = None,
          teachers: Mapping[str, nn.Module] | None = None, progress: bool = True,
          deterministic: bool = False) -> list[dict]:
    """Train ``configs`` (one recipe: they may differ in seed, objective_args and name) in ``run_dirs``.

    Finished folders are skipped and interrupted ones resumed from their checkpoints.
    ``teachers`` maps a KD objective's ``teacher`` argument to its network.
    ``deterministic`` makes cuDNN deterministic (bitwise resume on CUDA; slower).
    Returns the summaries in the order of ``configs``. A run whose loss turns
    non-finite stops with its last checkpoint kept; the others train on, and
    ``MembersDivergedError`` is raised at the end.
    """
    configs, run_dirs = list(configs), [Path(d) for d in run_dirs]
    check_recipe(configs)
    if len(run_dirs) != len(configs):
        raise ValueError(f"{len(configs)} configs but {len(run_dirs)} run folders")
    if len({d.resolve() for d in run_dirs}) != len(run_dirs):
        raise ValueError("two runs share a run folder")
    device = resolve_device(device)
    strategy = strategy or default_strategy(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic
    data = data or DeviceData(hold_out(load_dataset(configs[0].dataset, data_root), configs[0].validation), device,
                              configs[0].rotation)
    if data.num_validation != configs[0].validation:
        raise ValueError(f"the data passed hold out {data.num_validation} validation images, the configs "
                         f"{configs[0].validation}")
    summaries: dict[int, dict] = {}
    failures: dict[int, NonFiniteLossError] = {}
    for i, d in enumerate(run_dirs):
        d.mkdir(parents=True, exist_ok=True)
        if (d / "summary.json").is_file():
            summaries[i] = read_json(d / "summary.json", FINISHED_FILE_ADVICE)
            remove_leftover_checkpoint(d)
    while pending := [i for i in range(len(configs)) if i not in summaries and i not in failures]:
        members = {}
        for i in pending:
            members[i] = Member(configs[i], data, device, teachers)
            path = run_dirs[i] / CHECKPOINT
            if path.is_file():
                members[i].load(load_checkpoint(path, configs[i], device), run_dirs[i])
        newest = max(m.epoch for m in members.values())
        for i in pending:
            if members[i].epoch < newest and (state := checkpoint_cut_in_renames(run_dirs[i], configs[i], device,
                                                                                 newest)):
                members[i].load(state, run_dirs[i])
        # Members still at different epochs (trained in other groups before) train apart, the lowest first.
        epoch = min(m.epoch for m in members.values())
        chosen = [i for i in pending if members[i].epoch == epoch]
        try:
            done = _train_from([members[i] for i in chosen], [run_dirs[i] for i in chosen], data, device,
                               strategy, progress)
        except MemberFailure as failure:  # the others restart this epoch from their checkpoints: exact
            failures.update({chosen[k]: err for k, err in failure.errors.items()})
            continue
        summaries.update(zip(chosen, done))
    if failures:
        if len(configs) == 1:
            raise failures[0]
        raise MembersDivergedError(
            f"{len(failures)} of {len(configs)} runs diverged (the others finished): "
            + " | ".join(str(e) for e in failures.values()),
            {configs[i].run_id(): err for i, err in failures.items()})
    return [summaries[i] for i in range(len(configs))]


def fit(config: TrainConfig, run_dir: str | Path, **kwargs) -> dict:
    """Train one run (``train`` with N = 1); returns its summary."""
    return train([config], [run_dir], **kwargs)[0]
