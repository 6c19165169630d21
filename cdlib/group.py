"""Training several runs of one recipe at once, as one fused network (issue 6).

With batch 128 one CIFAR ResNet-18 cannot fill a large GPU: the step is a few
hundred small kernels. The plans train groups of runs that share the whole recipe
and differ only in seed (and objective arguments: KD teacher, CD ablation). The
group path trains such a group as ONE network:

* every convolution of the N members becomes one convolution with ``groups=N``
  (member ``i`` owns channel block ``i`` of every layer), every BatchNorm one
  BatchNorm over N*C channels (BN is per channel, so this *is* per-member BN, in
  train and eval mode), every linear head one batched matmul (``GroupedLinear``),
  and DenseNet's concatenation interleaves per member (``GroupedDenseLayer``);
* the input is each member's own augmented batch, stacked along channels;
* one SGD over the fused parameters equals N separate SGDs (momentum and weight
  decay are elementwise); the loss minimised is the sum of the members' losses,
  whose gradient with respect to member ``i``'s weights is exactly that of
  member ``i``'s loss.

Every fused tensor is the concatenation of the members' tensors along dim 0, so
state-dict keys are those of ``build_model`` and member ``i``'s weights are chunk
``i`` of every tensor (``fuse`` / ``member_state``).

What stays per member, so a member ends as if trained alone by
:func:`cdlib.train.fit`: its initialisation (``build_model`` under
``torch.manual_seed(seed)``), its generator reseeded with ``epoch_seed(seed,
epoch)`` (shuffling, augmentation, objective draws), its objective and that
objective's state, its BatchNorm statistics, its metrics, confusions and run
folder. Objectives are used unchanged: each member's ``objective.loss`` runs in
its own worker thread and sees a stand-in for its network; the stand-ins of the N
members meet at a rendezvous and run as one fused call, round by round (CS-KD's
second, gradient-free forward is a second round). KD teachers are fused the same
way (or, shared by all members, run once on the concatenated batches), or looked
up in a :class:`TeacherCache` when augmentation has finitely many views.

Checkpoints are fit's: each member's run folder gets ``checkpoint.pt`` in
exactly the format ``fit`` writes, so a group resumes from single runs and a
single run resumes from a group checkpoint. If a kill leaves members at different
epochs, the ones behind train alone-as-a-smaller-group until they catch up, then
the group is fused again. A member whose loss turns non-finite is dropped (the
others restart the epoch from their checkpoints, which is exact) and reported at
the end with fit's message.

Equality with ``fit`` is exact in exact arithmetic; in floats the fused kernels
sum in another order, so results agree to rounding (tests/test_group.py checks
weights and metrics against separate ``fit`` runs on the CPU).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import json
import math
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import TrainConfig
from .data import DeviceData, load_dataset
from .models import DenseLayer, build_model
from .objectives import Batch, EpochEnd, make_objective
from .train import (CHECKPOINT, SYNC_EVERY, NonFiniteLossError, _progress, add_counts, atomic_save,
                    atomic_write_text, epoch_seed, learning_rate, load_checkpoint, resolve_device)

# Fields in which the members of one group may differ; everything else is the shared recipe.
VARYING_FIELDS = ("name", "seed", "objective_args")

# Default group sizes on CUDA (members per fused network). Not yet measured on an H100:
# benchmarks/gpu_check.py measures images/s for groups of several sizes to set them.
CUDA_GROUP_SIZES = {"resnet18": 8, "resnet34": 8, "resnet50": 4, "resnet101": 4, "resnet152": 4,
                    "densenet121": 4}


def default_group_size(device=None, arch: str = "resnet18") -> int:
    """Members per group: 1 (plain ``fit``) on the CPU, where fusing gains nothing; per network on CUDA."""
    device = resolve_device(device)
    if device.type != "cuda":
        return 1
    return CUDA_GROUP_SIZES.get(arch, 4)


# --------------------------------------------------------------------------- fused layers

class GroupedLinear(nn.Module):
    """N linear heads as one batched matmul: (B, N*D) -> (B, N, K); weight (N*K, D), bias (N*K)."""

    def __init__(self, groups: int, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.groups, self.in_features, self.out_features = groups, in_features, out_features
        self.weight = nn.Parameter(torch.empty(groups * out_features, in_features))
        if bias:
            self.bias = nn.Parameter(torch.empty(groups * out_features))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, D, K = self.groups, self.in_features, self.out_features
        x = x.reshape(x.shape[0], N, D).transpose(0, 1)          # (N, B, D)
        w = self.weight.view(N, K, D).transpose(1, 2)             # (N, D, K)
        out = torch.bmm(x, w) if self.bias is None else torch.baddbmm(self.bias.view(N, 1, K), x, w)
        return out.transpose(0, 1)                                # (B, N, K)


class GroupedDenseLayer(nn.Module):
    """DenseLayer of N members: concatenates input and new maps member by member."""

    def __init__(self, body: nn.Module, groups: int):
        super().__init__()
        self.body, self.groups = body, groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        B, _, H, W = x.shape
        N = self.groups
        if x.is_contiguous() and y.is_contiguous():
            return torch.cat([x.view(B, N, -1, H, W), y.view(B, N, -1, H, W)], 2).view(B, -1, H, W)
        # channels_last: concatenate in NHWC so the result stays channels_last.
        xl = x.permute(0, 2, 3, 1).reshape(B, H, W, N, -1)
        yl = y.permute(0, 2, 3, 1).reshape(B, H, W, N, -1)
        return torch.cat([xl, yl], 4).view(B, H, W, -1).permute(0, 3, 1, 2)


def _fuse_children(module: nn.Module, n: int) -> None:
    """Replace (in place) every layer below ``module`` by its n-member version, with meta tensors."""
    for name, child in list(module.named_children()):
        _fuse_children(child, n)
        if isinstance(child, nn.Conv2d):
            with torch.device("meta"):
                new = nn.Conv2d(child.in_channels * n, child.out_channels * n, child.kernel_size, child.stride,
                                child.padding, child.dilation, child.groups * n, child.bias is not None,
                                child.padding_mode)
        elif isinstance(child, nn.BatchNorm2d):
            with torch.device("meta"):
                new = nn.BatchNorm2d(child.num_features * n, child.eps, child.momentum, child.affine,
                                     child.track_running_stats)
        elif isinstance(child, nn.Linear):
            with torch.device("meta"):
                new = GroupedLinear(n, child.in_features, child.out_features, child.bias is not None)
        elif isinstance(child, DenseLayer):
            new = GroupedDenseLayer(child.body, n)
        elif any(True for _ in child.parameters(recurse=False)) or any(True for _ in child.buffers(recurse=False)):
            raise TypeError(f"cannot fuse layer {name!r} of type {type(child).__name__}: the group path knows "
                            f"Conv2d, BatchNorm2d, Linear and DenseLayer (add a fused version here)")
        else:
            continue
        setattr(module, name, new)


def fuse(models: Sequence[nn.Module]) -> nn.Module:
    """One network computing ``len(models)`` networks of identical structure side by side.

    Input (B, N*3, H, W): member i's images in channels 3i..3i+2; output (B, N, classes).
    Same state-dict keys as the members; every tensor is the members' concatenated along dim 0.
    """
    models = list(models)
    n = len(models)
    states = [m.state_dict() for m in models]
    keys = list(states[0])
    if any(list(s) != keys for s in states):
        raise ValueError("cannot fuse networks of different structure")
    fused = copy.deepcopy(models[0])
    _fuse_children(fused, n)
    state = {k: torch.cat([s[k] for s in states]) if states[0][k].dim() else states[0][k].clone() for k in keys}
    fused.load_state_dict(state, assign=True)
    fused.train(models[0].training)
    return fused


def stack_members(xs: Sequence[torch.Tensor], channels_last: bool = False) -> torch.Tensor:
    """N batches (B, c, H, W) -> the fused network's input (B, N*c, H, W), member i in channel block i."""
    shape = xs[0].shape
    if any(x.shape != shape for x in xs):
        raise GroupCallError(f"members passed batches of different shapes: {[tuple(x.shape) for x in xs]}")
    B, c, H, W = shape
    if channels_last:  # built in NHWC directly: one copy
        return torch.stack([x.permute(0, 2, 3, 1) for x in xs], 3).view(B, H, W, -1).permute(0, 3, 1, 2)
    return torch.stack(list(xs), 1).view(B, -1, H, W)


def member_slice(tensor: torch.Tensor, n: int, i: int) -> torch.Tensor:
    """Member i's part of a fused tensor (a copy, so saving it does not save the whole group)."""
    return tensor.chunk(n)[i].clone() if tensor.dim() else tensor.clone()


def member_state(fused: nn.Module, n: int, i: int) -> dict:
    """Member i's ``state_dict`` (the keys and shapes of ``build_model``'s) from a fused network."""
    return {k: member_slice(v, n, i) for k, v in fused.state_dict().items()}


# --------------------------------------------------------------------------- rendezvous

class GroupCallError(RuntimeError):
    pass


class _Rendezvous:
    """N member threads each make the same sequence of network calls; each round runs as one fused call.

    ``call`` blocks until every member has submitted its input for the round (or
    finished its step, which is an error if others are still calling); the last
    one to arrive runs the fused function for all.
    """

    def __init__(self, n: int):
        self.n = n
        self.cond = threading.Condition()
        self.start()

    def start(self) -> None:
        with self.cond:
            self.pending: dict[int, tuple] = {}
            self.results: dict[int, torch.Tensor] = {}
            self.done: set[int] = set()
            self.error: BaseException | None = None

    def abort(self, error: BaseException) -> None:
        with self.cond:
            if self.error is None:
                self.error = error
            self.cond.notify_all()

    def _fail_if_unbalanced(self) -> None:
        if self.pending and len(self.pending) + len(self.done) == self.n:
            calls = sorted({c for c, _, _, _ in self.pending.values()})
            self.error = GroupCallError(
                f"members of a group made different network calls in one step (members "
                f"{sorted(self.done)} finished while {sorted(self.pending)} called {calls}); the group path "
                f"needs objectives that make the same sequence of calls for every member")
            self.cond.notify_all()

    def call(self, member: int, channel: str, x: torch.Tensor, fn: Callable) -> torch.Tensor:
        with self.cond:
            if self.error is not None:
                raise GroupCallError("another member of the group failed") from self.error
            self.pending[member] = (channel, x, torch.is_grad_enabled(), fn)
            if len(self.pending) == self.n:
                self._run_round()
            else:
                self._fail_if_unbalanced()
            while member not in self.results:
                if self.error is not None:
                    raise GroupCallError("another member of the group failed") from self.error
                self.cond.wait(timeout=1.0)
            return self.results.pop(member)

    def _run_round(self) -> None:
        entries = [self.pending[i] for i in range(self.n)]
        if len({e[0] for e in entries}) > 1 or len({e[2] for e in entries}) > 1:
            self.error = GroupCallError(f"members called different networks or grad modes in one round: "
                                        f"{[(e[0], e[2]) for e in entries]}")
            self.cond.notify_all()
            raise self.error
        try:
            with torch.set_grad_enabled(entries[0][2]):
                outputs = entries[0][3]([e[1] for e in entries])
        except BaseException as err:
            self.error = err
            self.cond.notify_all()
            raise
        self.pending = {}
        self.results = dict(enumerate(outputs))
        self.cond.notify_all()

    def finished(self, member: int) -> None:
        with self.cond:
            self.done.add(member)
            self._fail_if_unbalanced()


class _GroupCall:
    """What an objective holds as a network (its model or its teacher) inside a group."""

    def __init__(self, rendezvous: _Rendezvous, member: int, channel: str, fn: Callable):
        self.rendezvous, self.member, self.channel, self.fn = rendezvous, member, channel, fn

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.rendezvous.call(self.member, self.channel, x, self.fn)


# --------------------------------------------------------------------------- teacher cache

def _num_views(pad: int) -> int:
    return (2 * pad + 1) ** 2 * 2


def peek_views(data: DeviceData, size: int, generator: torch.Generator) -> torch.Tensor:
    """The view ids (crop offset and flip) that ``data.augment`` will draw next from ``generator``.

    Replays augment's draws (dy, dx, flip; see ``DeviceData.augment``) on a copy of
    the generator, which is left untouched. Only for augmentation without rotation.
    """
    g = torch.Generator(data.device)
    g.set_state(generator.get_state())
    span = 2 * data.pad + 1
    dy = torch.randint(0, span, (size,), device=data.device, generator=g)
    dx = torch.randint(0, span, (size,), device=data.device, generator=g)
    flip = torch.rand(size, device=data.device, generator=g) < 0.5
    return (dy * span + dx) * 2 + flip.long()


def view_images(data: DeviceData, indices: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
    """The augmented, normalised images of (index, view) pairs (crop + flip, no rotation)."""
    span, p = 2 * data.pad + 1, data.pad
    x = F.pad(data.train_images[indices].float() / 255, (p, p, p, p))
    B, _, H, W = data.train_images[indices].shape
    dy, dx, flip = views // 2 // span, views // 2 % span, (views % 2).bool()
    out = torch.stack([x[b, :, dy[b]:dy[b] + H, dx[b]:dx[b] + W] for b in range(B)])
    out = torch.where(flip[:, None, None, None], out.flip(3), out)
    return (out - data.mean) / data.std


def batches_with_views(data: DeviceData, batch_size: int, generator: torch.Generator):
    """``data.train_batches`` plus each batch's view ids (same draws, same batches)."""
    order = torch.randperm(data.num_train, device=data.device, generator=generator)
    for start in range(0, data.num_train, batch_size):
        idx = order[start:start + batch_size]
        views = peek_views(data, len(idx), generator)
        yield Batch(data.augment(idx, generator), data.train_labels[idx], idx), views


class TeacherCache:
    """A teacher's outputs for every (training image, view), computed at first use and then reused.

    With crop (padding p) and flip but no rotation an image has (2p+1)^2 * 2 = 162
    views, so after about 162 epochs' worth of visits every view has been seen once;
    each later visit (other epochs, other students of the same teacher) reuses the
    stored output instead of running the teacher. The stored value is the teacher's
    output on exactly that view (same function, same input pixels); only the batch
    it was computed in differs, which changes rounding, not the value.
    Memory: num_train x views x classes in the teacher's output dtype (CIFAR-100 in
    bf16: 1.6 GB).
    """

    def __init__(self, teacher: nn.Module, data: DeviceData):
        if data.rotation:
            raise ValueError(f"a teacher cache needs augmentation with finitely many views; rotation "
                             f"{data.rotation} draws a continuous angle. Use rotation=0 or no cache.")
        self.teacher, self.data = teacher, data
        self.views = _num_views(data.pad)
        self.table: torch.Tensor | None = None
        self.filled = torch.zeros(data.num_train, self.views, dtype=torch.bool, device=data.device)
        self.lock = threading.Lock()
        self.computed = 0  # teacher forwards run, in images
        self.served = 0    # outputs returned, in images

    def __call__(self, indices: torch.Tensor, views: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        with self.lock:
            missing = (~self.filled[indices, views]).nonzero().squeeze(1)
            if len(missing):
                out = self.teacher(images[missing])
                if self.table is None:
                    self.table = torch.empty(self.data.num_train, self.views, out.shape[1], dtype=out.dtype,
                                             device=self.data.device)
                self.table[indices[missing], views[missing]] = out.to(self.table.dtype)
                self.filled[indices[missing], views[missing]] = True
                self.computed += len(missing)
            self.served += len(indices)
            return self.table[indices, views]


class _CachedTeacher:
    """A KD objective's teacher inside a group with a cache: the cache for the member's current batch."""

    def __init__(self, cache: TeacherCache, member: "_Member"):
        self.cache, self.member = cache, member

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        m = self.member
        if m.views is not None and images is m.batch.images:
            return self.cache(m.batch.indices, m.views, images)
        return self.cache.teacher(images)  # any other images: run the teacher


# --------------------------------------------------------------------------- the group trainer

class _Member:
    """One run of a group; objectives see it as their trainer (config, device, data, generator, model)."""

    def __init__(self, config: TrainConfig, group: "GroupTrainer"):
        self.config = config
        self.device, self.data, self.cuda = group.device, group.data, group.cuda
        self.generator = torch.Generator(group.device)
        self.steps_per_epoch = group.steps_per_epoch
        C = group.data.num_classes
        self.train_confusions = torch.zeros(config.epochs, C, C, dtype=torch.int32)
        self.test_confusions = torch.zeros(config.epochs, C, C, dtype=torch.int32)
        self.batch: Batch | None = None
        self.views: torch.Tensor | None = None
        self.model = None
        self.objective = None
        self.rng_state = None
        self.last_train_confusion = None


class GroupDivergedError(NonFiniteLossError):
    """Raised by ``fit_group`` after the other members finished; ``failures`` maps run id to its error."""

    def __init__(self, message: str, failures: dict[str, BaseException]):
        super().__init__(message)
        self.failures = failures


class MemberFailure(Exception):
    """Members of a group failed (non-finite loss); ``errors`` maps member position to its error."""

    def __init__(self, errors: dict[int, BaseException]):
        super().__init__("; ".join(f"member {i}: {e}" for i, e in errors.items()))
        self.errors = errors


def group_key(config: TrainConfig) -> str:
    """Configs with equal keys can train in one group."""
    d = config.to_dict()
    for k in VARYING_FIELDS:
        d.pop(k)
    return json.dumps(d, sort_keys=True)


def check_group(configs: Sequence[TrainConfig]) -> None:
    """Raise a clear error unless ``configs`` may train as one group."""
    if not configs:
        raise ValueError("a group needs at least one config")
    ref = configs[0].to_dict()
    for c in configs[1:]:
        diff = {k: (ref[k], v) for k, v in c.to_dict().items() if k not in VARYING_FIELDS and ref[k] != v}
        if diff:
            raise ValueError(
                f"configs of one group may differ only in {', '.join(VARYING_FIELDS)}; {c.run_id()} differs "
                f"from {configs[0].run_id()} in {diff} (first, second). Train them in separate groups "
                f"(runs.get_or_train_many groups them for you).")
    ids = [c.run_id() for c in configs]
    if len(set(ids)) != len(ids):
        raise ValueError(f"a group holds the same run twice: {sorted({i for i in ids if ids.count(i) > 1})}")


def plan_groups(configs: Sequence[TrainConfig], group_size: int | None = None,
                device=None) -> list[list[TrainConfig]]:
    """Split ``configs`` into groups that can train together, keeping the training order.

    Configs with equal ``group_key`` are split into near-equal consecutive chunks of
    at most ``group_size`` (default ``default_group_size(device, arch)``); groups are
    returned in the order of their first member, so runs listed before others (KD
    teachers before their students) are trained first.
    """
    buckets: dict[str, list[int]] = {}
    for position, config in enumerate(configs):
        buckets.setdefault(group_key(config), []).append(position)
    groups = []
    for positions in buckets.values():
        size = group_size or default_group_size(device, configs[positions[0]].arch)
        if size < 1:
            raise ValueError(f"group_size must be at least 1, got {size}")
        count = math.ceil(len(positions) / size)
        groups += [[int(p) for p in chunk] for chunk in np.array_split(positions, count)]
    groups.sort(key=lambda g: g[0])
    return [[configs[p] for p in g] for g in groups]


class GroupTrainer:
    """N runs of one recipe trained as one fused network; the group analogue of ``train.Trainer``.

    ``states``: per member, a checkpoint dict in fit's format (or None for a fresh
    start); all given ones must be at the same epoch. ``teacher_cache``: use a
    :class:`TeacherCache` for KD teachers (needs rotation 0); pass a dict to share
    caches (keyed by teacher run) between groups on the same data.
    """

    def __init__(self, configs: Sequence[TrainConfig], device=None, data_root=None, data: DeviceData | None = None,
                 states: Sequence[dict | None] | None = None, teacher_cache: bool | dict = False):
        configs = list(configs)
        check_group(configs)
        self.config = configs[0]
        self.n = len(configs)
        self.device = resolve_device(device)
        self.cuda = self.device.type == "cuda"
        self.data = data or DeviceData(load_dataset(self.config.dataset, data_root), self.device, self.config.rotation)
        self.steps_per_epoch = math.ceil(self.data.num_train / self.config.batch_size)
        self.rendezvous = _Rendezvous(self.n)
        self._pool = concurrent.futures.ThreadPoolExecutor(self.n, "cdlib-group") if self.n > 1 else None
        states = list(states) if states is not None else [None] * self.n
        epochs = {int(s["epoch"]) for s in states if s is not None} | ({0} if None in states else set())
        if len(epochs) > 1:
            raise ValueError(f"members of a group must resume from the same epoch, got epochs {sorted(epochs)}")
        self.epoch = epochs.pop()

        C = self.data.num_classes
        self.members: list[_Member] = []
        models = []
        for i, (config, state) in enumerate(zip(configs, states)):
            member = _Member(config, self)
            member.model = _GroupCall(self.rendezvous, i, "model", self._student_forward)
            torch.manual_seed(config.seed)  # as Trainer: the member's init is build_model under its seed
            model = build_model(config.arch, C, config.width)
            member.objective = make_objective(config.objective, config.objective_args)
            member.objective.setup(member)
            member.rng_state = torch.get_rng_state()
            if state is not None:
                model.load_state_dict(state["model"])
                member.objective.load_state_dict(state["objective"])
                member.train_confusions.copy_(state["train_confusions"])
                member.test_confusions.copy_(state["test_confusions"])
                member.rng_state = state["torch_rng"]
            models.append(model)
            self.members.append(member)
        names = [k for k, _ in models[0].named_parameters()]
        self.model = fuse(models).to(self.device)
        if [k for k, _ in self.model.named_parameters()] != names:
            raise AssertionError("fused parameters are not in the members' order")
        del models
        if self.cuda:
            self.model = self.model.to(memory_format=torch.channels_last)
        c = self.config
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=c.lr, momentum=c.momentum, nesterov=c.nesterov,
            weight_decay=c.weight_decay, **({"fused": True} if self.cuda else {}))
        if states[0] is not None:
            self.optimizer.load_state_dict(self._fused_optimizer_state([s["optimizer"] for s in states]))
        self._setup_teachers(teacher_cache)

    # ------------------------------------------------------------------ pieces
    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else contextlib.nullcontext()

    def _stack(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return stack_members(xs, channels_last=self.cuda)

    def _student_forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        out = self.model(self._stack(xs))
        return [out[:, i] for i in range(self.n)]

    def _setup_teachers(self, teacher_cache: bool | dict) -> None:
        objectives = [m.objective for m in self.members]
        with_teacher = [isinstance(getattr(o, "teacher", None), nn.Module) for o in objectives]
        self.caches: dict = {}
        if not any(with_teacher):
            return
        if not all(with_teacher):
            raise ValueError("either every member of a group has a teacher or none")
        runs = [getattr(o, "teacher_run", None) for o in objectives]
        if teacher_cache is not False and teacher_cache is not None:
            self.caches = teacher_cache if isinstance(teacher_cache, dict) else {}
            for m, run in zip(self.members, runs):
                key = run if run is not None else id(m.objective.teacher)
                if key not in self.caches:
                    self.caches[key] = TeacherCache(m.objective.teacher, self.data)
                m.objective.teacher = _CachedTeacher(self.caches[key], m)
            return
        if runs[0] is not None and len(set(runs)) == 1:
            # One teacher for all: run it once on the members' batches concatenated along the batch.
            teacher = objectives[0].teacher

            def forward(xs):
                return list(teacher(torch.cat(xs)).split(len(xs[0])))
        else:
            teacher = fuse([o.teacher for o in objectives]).eval().requires_grad_(False)
            if self.cuda:
                teacher = teacher.to(memory_format=torch.channels_last)

            def forward(xs):
                out = teacher(self._stack(xs))
                return [out[:, i] for i in range(self.n)]
        self.teacher = teacher
        for i, o in enumerate(objectives):
            o.teacher = _GroupCall(self.rendezvous, i, "teacher", forward)

    def _fused_optimizer_state(self, member_states: list[dict]) -> dict:
        state = {}
        for pid in member_states[0]["state"]:
            entries = [s["state"][pid] for s in member_states]
            state[pid] = {k: torch.cat([e[k] for e in entries]) if torch.is_tensor(v) and v.dim() else v
                          for k, v in entries[0].items()}
        return {"state": state, "param_groups": copy.deepcopy(member_states[0]["param_groups"])}

    def member_state_dict(self, i: int) -> dict:
        """Member i's checkpoint, in exactly the format of ``train.Trainer.state_dict``."""
        m, n = self.members[i], self.n
        opt = self.optimizer.state_dict()
        member_opt = {"state": {pid: {k: member_slice(v, n, i) if torch.is_tensor(v) and v.dim() else v
                                      for k, v in s.items()} for pid, s in opt["state"].items()},
                      "param_groups": copy.deepcopy(opt["param_groups"])}
        return {
            "config": m.config.to_dict(),
            "epoch": self.epoch,
            "model": member_state(self.model, n, i),
            "optimizer": member_opt,
            "objective": m.objective.state_dict(),
            "train_confusions": m.train_confusions,
            "test_confusions": m.test_confusions,
            "torch_rng": m.rng_state,
        }

    def close(self) -> None:
        if self._pool is not None:
            self.rendezvous.abort(GroupCallError("group closed"))
            self._pool.shutdown(wait=True)
            self._pool = None

    # ------------------------------------------------------------------ one step
    def _member_loss(self, i: int, epoch: int):
        m = self.members[i]
        try:
            with self.autocast():
                return m.objective.loss(m.model, m.batch, epoch)
        finally:
            self.rendezvous.finished(i)

    def _losses(self, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        self.rendezvous.start()
        if self._pool is None:
            return [self._member_loss(0, epoch)]
        futures = [self._pool.submit(self._member_loss, i, epoch) for i in range(self.n)]
        try:
            concurrent.futures.wait(futures)
        except BaseException as err:  # e.g. KeyboardInterrupt: release the waiting workers
            self.rendezvous.abort(err)
            concurrent.futures.wait(futures)
            raise
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            original = [e for e in errors if not isinstance(e, GroupCallError)] or errors
            raise original[0]
        return [f.result() for f in futures]

    def _batches(self, member: _Member, with_views: bool):
        if with_views:
            return batches_with_views(self.data, self.config.batch_size, member.generator)
        return ((b, None) for b in self.data.train_batches(self.config.batch_size, member.generator))

    # ------------------------------------------------------------------ one epoch
    def train_epoch(self, progress: bool = False) -> list[dict]:
        n, C, config, dev = self.n, self.data.num_classes, self.config, self.device
        self.model.train()
        for m in self.members:
            m.generator.manual_seed(epoch_seed(m.config.seed, self.epoch))
        with_views = bool(self.caches)
        iterators = [self._batches(m, with_views) for m in self.members]
        loss_sum = torch.zeros(n, device=dev)
        correct = torch.zeros(n, device=dev, dtype=torch.long)
        confusion = torch.zeros(n * C * C, device=dev, dtype=torch.long)
        first_bad_step = torch.full((n,), -1, device=dev, dtype=torch.long)
        offsets = torch.arange(n, device=dev)[:, None] * (C * C)
        steps = _progress(range(self.steps_per_epoch), progress, leave=False,
                          desc=f"epoch {self.epoch + 1}/{config.epochs} (group of {n})")
        lr = config.lr
        for i in steps:
            step = self.epoch * self.steps_per_epoch + i
            lr = learning_rate(config, step, self.steps_per_epoch)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            for m, it in zip(self.members, iterators):
                batch, m.views = next(it)
                if self.cuda:
                    batch.images = batch.images.contiguous(memory_format=torch.channels_last)
                m.batch = batch
            results = self._losses(self.epoch)
            self.optimizer.zero_grad(set_to_none=True)
            torch.stack([loss for loss, _ in results]).sum().backward()
            self.optimizer.step()
            losses = torch.stack([loss.detach().float() for loss, _ in results])
            labels = torch.stack([m.batch.labels for m in self.members])
            bad = ~torch.isfinite(losses) & (first_bad_step < 0)
            first_bad_step = torch.where(bad, torch.full_like(first_bad_step, i), first_bad_step)
            loss_sum += losses * labels.shape[1]
            predictions = torch.stack([logits.detach().argmax(1) for _, logits in results])
            correct += (predictions == labels).sum(1)
            add_counts(confusion, (offsets + labels * C + predictions).flatten())
            if (i + 1) % SYNC_EVERY == 0:
                self._check_finite(first_bad_step)
        for m in self.members:
            m.batch = m.views = None
        self._check_finite(first_bad_step)
        confusion = confusion.view(n, C, C)
        total = self.data.num_train
        out = []
        for k, m in enumerate(self.members):
            m.last_train_confusion = confusion[k]
            out.append({"train_loss": loss_sum[k].item() / total, "train_top1": 100 * correct[k].item() / total,
                        "lr": lr})
        return out

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
    def evaluate(self, return_logits: bool = False) -> list[dict]:
        """Per member: loss, top-1, top-5 and confusion counts on the test split (eval mode)."""
        self.model.eval()
        n, C, dev = self.n, self.data.num_classes, self.device
        loss_sum = torch.zeros(n, device=dev)
        top1 = torch.zeros(n, device=dev, dtype=torch.long)
        top5 = torch.zeros(n, device=dev, dtype=torch.long)
        confusion = torch.zeros(n * C * C, device=dev, dtype=torch.long)
        offsets = torch.arange(n, device=dev)[:, None] * (C * C)
        all_logits = []
        for images, labels in self.data.test_batches():
            if self.cuda:
                images = images.contiguous(memory_format=torch.channels_last)
            with self.autocast():
                out = self.model(self._stack([images] * n))
            logits = out.float().transpose(0, 1)  # (N, B, C)
            B = len(labels)
            loss_sum += F.cross_entropy(logits.reshape(n * B, C), labels.repeat(n), reduction="none").view(n, B).sum(1)
            topk = logits.topk(min(5, C), dim=2).indices
            top1 += (topk[..., 0] == labels).sum(1)
            top5 += (topk == labels[None, :, None]).any(2).sum(1)
            add_counts(confusion, (offsets + labels * C + topk[..., 0]).flatten())
            if return_logits:
                all_logits.append(logits)
        total = len(self.data.test_labels)
        confusion = confusion.view(n, C, C)
        results = []
        for k in range(n):
            r = {"test_loss": loss_sum[k].item() / total, "test_top1": 100 * top1[k].item() / total,
                 "test_top5": 100 * top5[k].item() / total, "confusion": confusion[k]}
            if return_logits:
                r["logits"] = torch.cat([lg[k] for lg in all_logits])
            results.append(r)
        return results


# --------------------------------------------------------------------------- fit_group

def _read_history(run_dir: Path, epochs: int) -> list[dict]:
    """metrics.jsonl lines of the first ``epochs`` epochs; later ones (written before a crash) are dropped."""
    path = run_dir / "metrics.jsonl"
    history = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    history = history[:epochs]
    atomic_write_text(path, "".join(json.dumps(h) + "\n" for h in history))
    return history


def fit_group(configs: Sequence[TrainConfig], run_dirs: Sequence[str | Path], device=None, data_root=None,
              progress: bool = True, data: DeviceData | None = None,
              teacher_cache: bool | dict = False) -> list[dict]:
    """Train ``configs`` (one recipe; they may differ in seed, objective_args and name) together.

    Each run folder ends exactly as ``fit`` leaves it (metrics.jsonl, model.pt,
    test_logits.npy, confusions.npz, summary.json; checkpoint.pt while training, in
    fit's format). Finished folders are skipped, interrupted ones resumed. Metric
    lines and summaries carry one more field, ``group_size``; ``seconds`` is the
    wall time of the group's epoch. Returns the summaries in the order of ``configs``.
    Raises ``GroupDivergedError`` (a ``NonFiniteLossError``) at the end if members diverged; the
    others finish first.
    """
    configs = list(configs)
    run_dirs = [Path(d) for d in run_dirs]
    check_group(configs)
    if len(run_dirs) != len(configs):
        raise ValueError(f"{len(configs)} configs but {len(run_dirs)} run folders")
    if len({d.resolve() for d in run_dirs}) != len(run_dirs):
        raise ValueError("two members of a group share a run folder")
    device = resolve_device(device)
    data = data or DeviceData(load_dataset(configs[0].dataset, data_root), device, configs[0].rotation)
    caches = teacher_cache if isinstance(teacher_cache, dict) else ({} if teacher_cache else False)
    for d in run_dirs:
        d.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    summaries: list[dict | None] = [None] * len(configs)
    pending = []
    for i, d in enumerate(run_dirs):
        if (d / "summary.json").is_file():
            summaries[i] = json.loads((d / "summary.json").read_text())
        else:
            pending.append(i)
    failures: dict[int, BaseException] = {}
    epoch_of: dict[int, int] = {}
    histories: dict[int, list[dict]] = {}
    trainer: GroupTrainer | None = None
    active: list[int] = []
    total_epochs = configs[0].epochs
    bar = _progress(range(total_epochs), progress, total=total_epochs,
                    desc=f"{configs[0].name} x{len(configs)} (group)")
    try:
        while pending:
            if trainer is None:
                states = {}
                for i in pending:
                    path = run_dirs[i] / CHECKPOINT
                    states[i] = load_checkpoint(path, configs[i]) if path.is_file() else None
                    epoch_of[i] = int(states[i]["epoch"]) if states[i] is not None else 0
                epoch = min(epoch_of[i] for i in pending)
                active = [i for i in pending if epoch_of[i] == epoch]
                trainer = GroupTrainer([configs[i] for i in active], device, data=data,
                                       states=[states[i] for i in active], teacher_cache=caches)
                del states
                for i in active:
                    histories[i] = _read_history(run_dirs[i], epoch)
                if progress:
                    bar.n = epoch
                    bar.refresh()
            if trainer.epoch == total_epochs:
                _finish(trainer, [configs[i] for i in active], [run_dirs[i] for i in active],
                        [histories[i] for i in active], summaries, active, start)
                pending = [i for i in pending if i not in active]
                trainer.close()
                trainer = None
                continue
            try:
                _train_one_epoch(trainer, [run_dirs[i] for i in active], [histories[i] for i in active], progress)
            except MemberFailure as failure:
                for k, err in failure.errors.items():
                    failures[active[k]] = err
                pending = [i for i in pending if i not in failures]
                trainer.close()
                trainer = None  # the others restart this epoch from their checkpoints
                continue
            for i in active:
                epoch_of[i] = trainer.epoch
            if progress:
                bar.update(1)
            if any(epoch_of[i] == trainer.epoch for i in pending if i not in active):
                trainer.close()  # members that were ahead join the group now
                trainer = None
    finally:
        if trainer is not None:
            trainer.close()
        if progress:
            bar.close()
    if failures:
        raise GroupDivergedError(
            f"{len(failures)} of {len(configs)} runs of the group diverged (the others finished): "
            + " | ".join(str(e) for e in failures.values()),
            {configs[i].run_id(): err for i, err in failures.items()})
    return summaries


def _train_one_epoch(trainer: GroupTrainer, run_dirs: list[Path], histories: list[list[dict]], progress: bool):
    epoch_start = time.perf_counter()
    train = trainer.train_epoch(progress)
    results = trainer.evaluate()
    e = trainer.epoch
    for m, result in zip(trainer.members, results):
        m.train_confusions[e] = m.last_train_confusion.cpu().int()
        m.test_confusions[e] = result["confusion"].cpu().int()
        m.objective.end_epoch(EpochEnd(e, m.last_train_confusion, result["confusion"]))
    seconds = time.perf_counter() - epoch_start
    for run_dir, history, tr, result in zip(run_dirs, histories, train, results):
        record = {"epoch": e + 1, **tr, **{k: result[k] for k in ("test_loss", "test_top1", "test_top5")},
                  "seconds": seconds, "group_size": trainer.n}
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        history.append(record)
    trainer.epoch += 1
    for k, run_dir in enumerate(run_dirs):
        atomic_save(trainer.member_state_dict(k), run_dir / CHECKPOINT)


def _finish(trainer: GroupTrainer, configs, run_dirs, histories, summaries, positions, start):
    finals = trainer.evaluate(return_logits=True)
    for k, (config, run_dir, history, final) in enumerate(zip(configs, run_dirs, histories, finals)):
        m = trainer.members[k]
        np.save(run_dir / "test_logits.npy", final["logits"].cpu().numpy())
        np.savez_compressed(run_dir / "confusions.npz", train=m.train_confusions.numpy(),
                            test=m.test_confusions.numpy())
        atomic_save(member_state(trainer.model, trainer.n, k), run_dir / "model.pt")
        best = max(history, key=lambda h: h["test_top1"])
        summary = {
            "run_id": config.run_id(), "num_classes": trainer.data.num_classes, "final_top1": final["test_top1"],
            "final_top5": final["test_top5"], "best_top1": best["test_top1"], "best_top5": best["test_top5"],
            "best_epoch": best["epoch"], "train_seconds": sum(h["seconds"] for h in history),
            "device": str(trainer.device), "torch": torch.__version__,
            "seconds_this_session": time.perf_counter() - start, "group_size": trainer.n,
        }
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=1))
        (run_dir / CHECKPOINT).unlink()
        summaries[positions[k]] = summary
