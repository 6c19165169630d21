"""A CUDA dry run of ``fit`` without a GPU: device placement, host synchronisation, dtypes and the CUDA-graph
step protocol of every objective, eager and compiled. Not checked: numbers, speed, memory, what CUDA kernels
accept beyond devices and dtypes, whether inductor compiles the networks.

``python tests/cuda_dry_run.py SCENARIO...`` runs each scenario (2 epochs of 4 steps on tiny synthetic data;
``bug-*`` with a bug injected) in a process forked from a clean one (fake tensors left over from one run crash
the next) and prints a JSON object, scenario -> report: ``findings`` (``kind``, ``message``, ``where``: the
file:line of the offending call, the innermost frame in cdlib/ or in a ``bug_*`` function), the ``syncs``
seen, and ``steps``, ``compiled_calls``, ``marks`` to show the run trained. tests/test_cuda_dry_run.py drives it.

``fit`` runs on device "cuda" under ``FakeTensorMode`` (a CUDA build of torch makes fake CUDA tensors without a
driver and raises on a CUDA/CPU mix as CUDA would: ``device-mix``), under ``Recorder``, a ``TorchFunctionMode``
that sees every torch call and reports what fake tensors let pass:
  generator  a random op drawing from a generator of another device (a CPU generator for a CUDA op);
  cpu-index  a CPU tensor indexed by a CUDA index;
  sync       a host synchronisation of a CUDA tensor (.item(), .cpu(), .to(cpu), .tolist(), bool(tensor),
             nonzero, bincount, unique, boolean masks, ...) in the per-step loop. Rule (no hook in production
             code): steps are counted at ``loss.backward()``; a call site that synchronises in more than half
             of the steps is per-step. Per-epoch syncs (metrics at the epoch's end, checkpoints, the
             non-finite check every SYNC_EVERY steps) fall in at most 2 of the 8 steps and pass;
  bf16       a loss or softmax of bf16 inputs outside autocast, a prediction (argmax, topk, ...) of bf16 logits
             (it feeds the confusion counts), or a backward of a loss that is not float32;
  cudagraph  a read of a CUDA-graph output that a later step's replay overwrote (pytorch#170604);
  fused-sgd  fused SGD of tensors that are not float32 on one CUDA device;
  error      any other exception or RuntimeWarning of the run.
Stand-ins for what fake tensors cannot run: ``loss.backward()`` (pytorch#92627) gives the graph's leaves zero
gradients; ``torch._fused_sgd_`` (no meta kernel) only checks; ``torch.Generator("cuda")`` (needs the driver)
is a CPU generator that says "cuda"; ``torch.autocast("cuda")`` (off without CUDA) casts the inputs of
conv/linear/matmul to its dtype and of losses and softmaxes to float32 as CUDA's does, so network outputs are
bf16 unless the network makes them float32; ``torch.compile`` runs the module eagerly and, with CUDA graphs,
tags its outputs with the step's generation (``cudagraph_mark_step_begin`` starts the next one; the first
compiled call of a new generation overwrites older outputs); ``torch.save`` writes a placeholder; a sync of a
fake tensor says 0.0, False or -1 (-1: "no bad step" to the loop's non-finite check), nonzero and bincount
give empty or zero tensors. Host-side work on real CPU tensors runs for real (data-dependent shapes work).
"""
from __future__ import annotations

import contextlib
import functools
import json
import multiprocessing
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.overrides import TorchFunctionMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from cdlib.core import data as cddata, models, objectives, train  # noqa: E402
from cdlib.core.config import TrainConfig  # noqa: E402

CDLIB, HARNESS = REPO / "cdlib", Path(__file__).resolve()
EPOCHS, BATCH, STEPS = 2, 12, 8  # 48 synthetic training images: 4 steps an epoch


def run_fit(config, run_dir, data, device, teachers, compile):
    """The one call into the training loop."""
    return train.fit(config, run_dir, data=data, device=device, teachers=teachers, progress=False,
                     compile=compile)


# ----------------------------------------------------------------------------- scenarios

def _cd(source, targets):
    return ("cd", {"schedule": [1, 1], "source": source, "targets": targets,  # a hard epoch, then a soft one
                   **({"allow_test_leak": True} if source == "test" else {})})


BASE = {"ce": ("ce", {}), "ls": ("ls", {}), "kd": ("kd", {"teacher": "teacher"}), "tfkd_reg": ("tfkd_reg", {}),
        "cskd": ("cskd", {}), "pskd": ("pskd", {}),
        # every CD source with the default targets, every other target with the default source
        **{f"cd-{s}-confusion": _cd(s, "confusion") for s in objectives.ConfusionDistillation.SOURCES},
        **{f"cd-train-{t}": _cd("train", t) for t in objectives.ConfusionDistillation.TARGETS if t != "confusion"}}


# ----------------------------------------------------------------------------- injected bugs (the teeth tests)

def bug_loss_full_without_device(self, logits, batch, epoch):
    return F.cross_entropy(logits.float(), batch.labels) + (torch.full(logits.shape, 1e-3) * logits).mean()


def bug_augment_cpu_generator(self, indices, generator):
    flip = torch.rand(len(indices), device=self.device, generator=torch.Generator()) < 0.5
    images = self.normalise(self.train_images[indices])
    return torch.where(flip[:, None, None, None], images.flip(3), images)


def bug_loss_syncs(self, logits, batch, epoch):
    loss = F.cross_entropy(logits.float(), batch.labels)
    if loss.item() > 1e6:
        raise FloatingPointError("diverged")
    if bool(torch.isnan(loss)):
        raise FloatingPointError("NaN")
    return loss + 0 * torch.bincount(batch.labels, minlength=logits.shape[1]).sum()


def bug_loss_cpu_index(self, logits, batch, epoch):
    class_weights = torch.ones(logits.shape[1])
    weights = class_weights[batch.labels].to(logits.device)
    return (weights * F.cross_entropy(logits.float(), batch.labels, reduction="none")).mean()


def bug_float32_head(classifier, features):  # the network's head left in autocast: bf16 logits
    return classifier(features)


def bug_loss_bf16(self, logits, batch, epoch):
    return F.cross_entropy(logits, batch.labels)


def bug_partners_mark_step(self, labels, generator, partners=objectives.CSKD.partners):
    torch.compiler.cudagraph_mark_step_begin()  # a second mark in the step, before CS-KD's second forward
    return partners(self, labels, generator)


# scenario -> (the scenario it breaks, its patches: owner, attribute, bug)
BUGS = {"bug-full-without-device": ("ce", [(objectives.CrossEntropy, "loss", bug_loss_full_without_device)]),
        "bug-cpu-generator": ("ce", [(cddata.DeviceData, "augment", bug_augment_cpu_generator)]),
        "bug-syncs": ("ce", [(objectives.CrossEntropy, "loss", bug_loss_syncs)]),
        "bug-cpu-index": ("ce", [(objectives.CrossEntropy, "loss", bug_loss_cpu_index)]),
        "bug-bf16": ("ce", [(models, "float32_head", bug_float32_head),
                            (objectives.CrossEntropy, "loss", bug_loss_bf16)]),
        "bug-double-mark": ("cskd+compile", [(objectives.CSKD, "partners", bug_partners_mark_step)])}
SCENARIOS = [name + suffix for name in BASE for suffix in ("", "+compile")] + list(BUGS)


# ----------------------------------------------------------------------------- findings

S = SimpleNamespace(findings={}, syncs={}, steps=0, generation=0, dead_before=0, replayed=0, mark_site="",
                    compiled_calls=0, marks=0, autocast=[], fake=None, grads={})  # one scenario per process


def site(frames=None) -> str:
    """file:line of the innermost frame in cdlib/ or in a bug_* function, of ``frames`` or of the stack."""
    if frames is None:
        frame, frames = sys._getframe(1), []
        while frame is not None:
            frames.append((frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name))
            frame = frame.f_back
    for filename, line, function in frames:
        path = Path(filename).resolve()
        if path.is_relative_to(CDLIB) or (path == HARNESS and function.startswith("bug_")):
            return f"{path.relative_to(REPO)}:{line}"
    return "?"


def find(kind, message, where=None):
    where = where or site()
    S.findings.setdefault((kind, where), {"kind": kind, "message": message, "where": where, "count": 0})["count"] += 1


def sync(what):
    """Note a host synchronisation at its call site, in the current training step (see the module doc)."""
    S.syncs.setdefault((what, site()), set()).add(S.steps)


# ----------------------------------------------------------------------------- the recording mode

T = torch.Tensor
SYNCS = {T.item: ".item()", T.tolist: ".tolist()", T.numpy: ".numpy()", T.cpu: ".cpu()", T.__bool__: "bool(tensor)",
         T.__int__: "int(tensor)", T.__float__: "float(tensor)", T.__index__: "tensor as an index",
         **{getattr(owner, name): name for owner in (torch, T)
            for name in ("nonzero", "argwhere", "bincount", "unique", "masked_select", "equal")}}
SCALARS = {T.item, T.__bool__, T.__int__, T.__float__, T.__index__}
INDEXING = {T.__getitem__: 1, T.__setitem__: 1, T.index_put_: 1, T.index_put: 1, T.take: 1, torch.take: 1,
            T.index_select: 2, torch.index_select: 2, T.gather: 2, torch.gather: 2, T.index_add_: 2,
            T.index_copy_: 2, T.scatter_: 2, T.scatter_add_: 2}  # -> the position of the index argument
LOWER = {torch.conv2d, F.linear, torch.matmul, T.matmul, T.__matmul__, torch.mm, T.mm, torch.bmm, torch.addmm}
LOSSES = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, T.softmax, T.log_softmax,
          F.cross_entropy, F.nll_loss, F.kl_div, F.mse_loss, F.binary_cross_entropy_with_logits, torch.logsumexp}
PREDICTIONS = {torch.argmax, T.argmax, torch.topk, T.topk, torch.max, T.max, torch.sort, T.sort,
               torch.argsort, T.argsort}
LOW = (torch.bfloat16, torch.float16)


def _tensors(*values):
    for a in values:
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (t for t in a if isinstance(t, torch.Tensor))


def _cast(args, kwargs, dtype, only=lambda t: True):
    to = lambda a: a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() and only(a) else a  # noqa: E731
    return tuple(to(a) for a in args), {k: to(v) for k, v in kwargs.items()}


def _cuda(a):  # a device argument that asks for CUDA
    return (isinstance(a, torch.device) and a.type == "cuda") or (isinstance(a, str) and a.startswith("cuda"))


def _value(t):  # what a sync of a fake tensor says; see the module doc
    return False if t.dtype == torch.bool else 0.0 if t.is_floating_point() else -1


class Recorder(TorchFunctionMode):
    """Checks every torch call of the run (above FakeTensorMode) and stands in where fake tensors cannot."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = list(_tensors(*args, *kwargs.values()))
        self_ = args[0] if args and isinstance(args[0], torch.Tensor) else None
        for t in tensors:  # CUDA graphs: an output whose memory a later replay reused
            if getattr(t, "_dry_generation", S.dead_before) < S.dead_before:
                find("cudagraph", f"{getattr(func, '__name__', func)} reads a CUDA-graph output of generation "
                     f"{t._dry_generation}, overwritten once a compiled module ran after cudagraph_mark_step_begin "
                     f"at {S.mark_site} (accessing tensor output of CUDAGraphs that has been overwritten)")
        if func in INDEXING and self_ is not None:
            at = INDEXING[func]
            indices = list(_tensors(args[at] if len(args) > at else kwargs.get("index", kwargs.get("indices"))))
            if not self_.is_cuda and any(i.is_cuda for i in indices):
                find("cpu-index", f"{func.__name__}: a CPU tensor indexed by a CUDA index (CUDA refuses it)")
            if func is T.__getitem__ and any(i.is_cuda and i.dtype == torch.bool for i in indices):
                sync("boolean-mask indexing")
        if func in SYNCS and self_ is not None and self_.is_cuda:
            sync(SYNCS[func])
        # dtypes: autocast's casts, and losses or predictions in bf16
        autocast = S.autocast[-1] if S.autocast else None
        if func in LOWER and autocast:
            args, kwargs = _cast(args, kwargs, autocast, lambda t: t.is_cuda)
        if func in LOSSES and any(t.dtype in LOW for t in tensors):
            if autocast:  # CUDA's autocast runs these in float32
                args, kwargs = _cast(args, kwargs, torch.float32)
            else:
                find("bf16", f"{func.__name__} of {[t.dtype for t in tensors if t.dtype in LOW][0]} inputs outside "
                     f"autocast: compute losses and softmaxes from .float()")
        if func in PREDICTIONS and self_ is not None and self_.dtype in LOW:
            find("bf16", f"{func.__name__} of {self_.dtype} logits: predictions and confusion counts from bf16")
        # stand-ins for what fake tensors cannot do
        fake = any(isinstance(t, FakeTensor) for t in tensors)
        if func is T.backward:
            return backward(self_)
        if fake and func in SCALARS:
            return _value(self_)
        if fake and func in (T.tolist, T.numpy):
            array = np.full(self_.shape, _value(self_), dtype=str(self_.dtype).removeprefix("torch."))
            return array.tolist() if func is T.tolist else array
        if fake and func in (torch.nonzero, T.nonzero, torch.argwhere, T.argwhere):
            empty = torch.zeros(0, self_.dim(), dtype=torch.long, device=self_.device)
            return empty.T.unbind() if kwargs.get("as_tuple") else empty
        if fake and func in (torch.bincount, T.bincount):
            return torch.zeros(max(kwargs.get("minlength", 0), 1), dtype=torch.long, device=self_.device)
        if fake or func is T.cuda or any(_cuda(a) for a in (*args, *kwargs.values())):
            result = func(*args, **kwargs)
        else:  # host-side work on real CPU tensors runs for real, so data-dependent shapes work there
            with unset_fake_temporarily():
                result = func(*args, **kwargs)
        if not isinstance(result, torch.Tensor):
            return result
        if func in (T.to, T.copy_) and any(t.is_cuda for t in tensors) and not result.is_cuda:
            sync(f"{func.__name__} to the CPU")
        generator = kwargs.get("generator") or next((a for a in args if isinstance(a, torch._C.Generator)), None)
        if generator is not None and generator.device.type != result.device.type:
            find("generator", f"{func.__name__} on {result.device} draws from a {generator.device} generator")
        for t in tensors if S.compiled_calls else ():
            if hasattr(t, "_dry_generation") and torch._C._is_alias_of(result, t):
                result._dry_generation = t._dry_generation  # a view of a graph output is that memory too
        return result


# ----------------------------------------------------------------------------- stand-ins

def backward(loss, *args, **kwargs):
    """Zero gradients for the graph's leaves (fake tensors cannot run backward); counts a training step."""
    S.steps += 1
    if loss.dtype != torch.float32 or loss.dim() != 0 or not loss.is_cuda:
        find("bf16" if loss.dtype != torch.float32 else "device-mix",
             f"backward of a {loss.dtype} loss of shape {tuple(loss.shape)} on {loss.device}: want a float32 "
             f"scalar on CUDA")
    nodes, seen = [loss.grad_fn], set()
    while nodes:
        node = nodes.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        leaf = getattr(node, "variable", None)
        if leaf is not None and leaf.grad is None:  # one zero gradient per leaf, reused: fake work is slow
            if id(leaf) not in S.grads:
                S.grads[id(leaf)] = leaf, torch.zeros_like(leaf)
            leaf.grad = S.grads[id(leaf)][1]
        nodes.extend(next_node for next_node, _ in node.next_functions)


def fused_sgd(params, grads, momentum_buffers, **kwargs):
    devices = {t.device for t in (*params, *grads, *momentum_buffers)}
    dtypes = {t.dtype for t in (*params, *grads, *momentum_buffers)}
    if len(devices) != 1 or next(iter(devices)).type != "cuda" or dtypes != {torch.float32}:
        find("fused-sgd", f"fused SGD of tensors on {sorted(map(str, devices))} in {sorted(map(str, dtypes))}")


class Generator(torch._C.Generator):
    """A CUDA generator needs the driver: a CPU generator that says it is on CUDA."""

    def __new__(cls, device="cpu"):
        generator = super().__new__(cls)
        generator.dry_device = torch.device(device)
        return generator

    def __init__(self, device="cpu"):
        pass

    device = property(lambda self: self.dry_device)


REAL_AUTOCAST, REAL_IS_AUTOCAST_ENABLED = torch.autocast, torch.is_autocast_enabled


@contextlib.contextmanager
def autocast(device_type, dtype=None, enabled=True, cache_enabled=None):
    """``torch.autocast``: a "cuda" region pushes its dtype (None: off) for ``Recorder``."""
    if device_type != "cuda":
        with REAL_AUTOCAST(device_type, dtype, enabled, cache_enabled):
            yield
        return
    S.autocast.append((dtype or torch.float16) if enabled else None)
    try:
        yield
    finally:
        S.autocast.pop()


def is_autocast_enabled(device_type="cuda"):
    return bool(S.autocast and S.autocast[-1]) if device_type == "cuda" else REAL_IS_AUTOCAST_ENABLED(device_type)


def compile(model=None, *, mode=None, options=None, **kwargs):
    """Eager, and in CUDA-graph modes each output tagged with the step generation it belongs to."""
    if model is None:
        return lambda m: compile(m, mode=mode, options=options, **kwargs)
    graphs = mode in ("reduce-overhead", "max-autotune") or bool((options or {}).get("triton.cudagraphs"))

    def run(*args, **kw):
        S.compiled_calls += 1
        if graphs and S.generation > S.replayed:  # a new step's first replay reuses the memory pool
            S.dead_before = S.replayed = S.generation
        out = model(*args, **kw)
        for t in (out if isinstance(out, (tuple, list)) else [out]) if graphs else ():
            t._dry_generation = S.generation
        return out
    return run


def mark_step_begin():
    S.generation, S.marks, S.mark_site = S.generation + 1, S.marks + 1, site()


def save(obj, f, *args, **kwargs):
    """Fake tensors cannot be saved; the dry run never resumes."""
    data = b"cuda dry run: fake tensors are not saved\n"
    f.write(data) if hasattr(f, "write") else Path(f).write_bytes(data)


def swap_tensors(t1, t2, real=torch.utils.swap_tensors):
    # Module.to swaps fake parameters, and swap_tensors refuses tensors with weak references, which
    # FakeTensorMode's memo of the tensors it made holds: forget the memo (it only saves conversions).
    S.fake.fake_tensor_converter.meta_converter.tensor_memo.clear()
    return real(t1, t2)


def install_stand_ins():
    for owner, name, value in [
            (torch, "Generator", Generator), (torch, "autocast", autocast), (torch.amp, "autocast", autocast),
            (torch, "is_autocast_enabled", is_autocast_enabled), (torch, "compile", compile),
            (torch.compiler, "cudagraph_mark_step_begin", mark_step_begin), (torch, "save", save),
            (torch, "_fused_sgd_", fused_sgd), (torch.utils, "swap_tensors", swap_tensors)]:
        setattr(owner, name, value)


# ----------------------------------------------------------------------------- running

@functools.cache
def tiny_dataset(validation: int) -> cddata.Dataset:
    """4 classes of 16x16 images, 48 for training once ``validation`` are held out (numpy: made before forking)."""
    return cddata.synthetic(superclasses=2, classes_per_superclass=2, train_per_class=12 + validation // 4,
                            test_per_class=8, size=16)


def scenario(name: str, folder: Path) -> dict:
    base, patches = BUGS.get(name, (name, []))
    objective, args = BASE[base.removesuffix("+compile")]
    validation = 8 if args.get("source") == "holdout" else 0  # CD's "holdout" source needs a validation split
    config = TrainConfig(name=name.replace("+", "-"), dataset="synthetic", arch="resnet18", width=0.0625,
                         epochs=EPOCHS, batch_size=BATCH, validation=validation, objective=objective,
                         objective_args=args)
    install_stand_ins()
    for owner, attribute, bug in patches:  # in a forked process: never undone
        setattr(owner, attribute, bug)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught, FakeTensorMode(allow_non_fake_inputs=True) as S.fake, \
            Recorder():
        warnings.simplefilter("always")
        data = cddata.DeviceData(cddata.hold_out(tiny_dataset(validation), validation), "cuda", rotation=15)
        teachers = {"teacher": models.build_model("resnet18", data.num_classes, 0.0625)} if objective == "kd" else None
        try:
            run_fit(config, folder / "run", data, "cuda", teachers, base.endswith("+compile"))
        except Exception as err:
            frames = [(f.filename, f.lineno, f.name) for f in reversed(traceback.extract_tb(err.__traceback__))]
            mix = ("found two different devices", "Expected all tensors to be on the same device")  # 2.11, 2.14
            kind = "device-mix" if any(text in str(err) for text in mix) else "error"
            find(kind, f"{type(err).__name__}: {' '.join(str(err).split())[:400]}", site(frames))
    for (what, where), steps in S.syncs.items():
        if len(steps) > S.steps / 2:
            find("sync", f"{what} of a CUDA tensor in {len(steps)} of {S.steps} training steps: a host "
                 f"synchronisation per step", where)
    for w in caught:
        if issubclass(w.category, RuntimeWarning):
            find("error", f"RuntimeWarning: {w.message}", site([(w.filename, w.lineno, "")]))
    return {"findings": list(S.findings.values()), "steps": S.steps, "compiled_calls": S.compiled_calls,
            "marks": S.marks, "seconds": round(time.perf_counter() - start, 1),
            "syncs": {f"{what} at {where}": len(steps) for (what, where), steps in S.syncs.items()}}


def _child(name, connection):
    try:
        with tempfile.TemporaryDirectory() as folder:
            connection.send(scenario(name, Path(folder)))
    except BaseException:  # the harness itself failed
        connection.send({"findings": [{"kind": "error", "where": "?", "message": traceback.format_exc()[-2000:]}]})


def run_all(names: list[str], jobs: int) -> dict:
    """Each scenario in a process forked from this clean one (torch imported once), ``jobs`` at a time."""
    import torch._dynamo  # noqa: F401  (FakeTensorMode imports it when first made: here, once, before forking)
    for validation in (0, 8):
        tiny_dataset(validation)
    context, pending, running, reports = multiprocessing.get_context("fork"), list(names), [], {}
    while pending or running:
        while pending and len(running) < jobs:
            receive, send = context.Pipe(duplex=False)
            process = context.Process(target=_child, args=(pending[0], send))
            process.start()
            send.close()  # so that a child dying unreported reads as the end of the pipe
            running.append((pending.pop(0), process, receive))
        name, process, receive = running.pop(0)
        try:
            reports[name] = receive.recv() if receive.poll(600) else None
        except EOFError:
            reports[name] = None
        process.join(10)
        if reports[name] is None:
            process.kill()
            reports[name] = {"findings": [{"kind": "error", "where": "?", "message": f"the scenario's process "
                                           f"died or hung (exit code {process.exitcode})"}]}
    return reports


if __name__ == "__main__":
    unknown = sorted(set(sys.argv[1:]) - set(SCENARIOS))
    if unknown or not sys.argv[1:]:
        sys.exit(f"usage: python tests/cuda_dry_run.py SCENARIO...; unknown {unknown}; known: {' '.join(SCENARIOS)}")
    if torch.version.cuda is None:
        sys.exit("this torch has no CUDA build: FakeTensorMode stops at its first CUDA device guard")
    print(json.dumps(run_all(sys.argv[1:], int(os.environ.get("DRY_RUN_JOBS", len(os.sched_getaffinity(0)))))))
