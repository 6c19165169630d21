"""Small helpers shared by the core and the layers above it: device choice, atomic
file writes and store reads, on-device counting, progress bars and true-fp32 arithmetic on CUDA."""
from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import BinaryIO, Callable

import torch

from cdlib.errors import NO_SPACE, StoreError, UserError


def resolve_device(device=None) -> torch.device:
    """``None``/``"auto"`` -> CUDA when available, else the CPU.

    On a machine with an NVIDIA GPU that this PyTorch cannot use, ``"auto"`` still falls back to
    the CPU (the user may have chosen a CPU profile) but warns loudly, and asking for a CUDA
    device raises a :class:`GPUUnusableError` that says why and what to do.
    """
    if device not in (None, "auto"):
        device = torch.device(device)
        problem = unusable_gpu() if device.type == "cuda" else None
        if problem:
            raise GPUUnusableError(f"cannot use device {str(device)!r}: {problem}")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    problem = unusable_gpu()
    if problem:
        warnings.warn(f"running on the CPU: {problem}", GPUUnusableWarning, stacklevel=2)
    return torch.device("cpu")


class GPUUnusableError(UserError, RuntimeError):
    """An NVIDIA GPU is installed but this PyTorch cannot use it."""


class GPUUnusableWarning(UserWarning):
    """Work falls back to the CPU although an NVIDIA GPU is installed."""


# The oldest NVIDIA driver branch each CUDA major version runs on (NVIDIA's CUDA minor version
# compatibility table).
MIN_DRIVER_BRANCH = {11: 450, 12: 525, 13: 580}
NVIDIA_KERNEL_MODULE = Path("/proc/driver/nvidia/version")  # present while the driver is loaded


@functools.cache
def nvidia_driver() -> str | None:
    """The installed NVIDIA driver's version, found without PyTorch (which may be unable to see the
    GPU): from the loaded kernel module, else from ``nvidia-smi``. None when there is no driver."""
    try:
        module = NVIDIA_KERNEL_MODULE.read_text()
    except OSError:
        module = ""
    found = re.search(r"Kernel Module\b.*?\s(\d+(?:\.\d+)+)\s", module)
    if found:
        return found.group(1)
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.match(r"\s*(\d+(?:\.\d+)+)", smi)  # an error message instead (no driver loaded): None
    return found.group(1) if found else None


def unusable_gpu() -> str | None:
    """Why PyTorch cannot use the NVIDIA GPU installed here, and the fixes; None when it can, when
    there is none, or when ``CUDA_VISIBLE_DEVICES`` hides every GPU on purpose."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if torch.cuda.is_available() or (visible is not None and visible.strip() in ("", "-1")):
        return None
    driver = nvidia_driver()
    if driver is None:
        return None
    built_for = torch.version.cuda
    if built_for is None:
        why, fix = f"this PyTorch ({torch.__version__}) is a CPU-only build", "install a CUDA build of PyTorch"
    else:
        need = MIN_DRIVER_BRANCH.get(int(built_for.split(".")[0]))
        if need is not None and int(driver.split(".")[0]) < need:
            why = (f"this PyTorch ({torch.__version__}) is built for CUDA {built_for}, which needs driver {need} "
                   "or newer")
        else:
            why = f"torch.cuda.is_available() is False with this PyTorch ({torch.__version__}, CUDA {built_for})"
        fix = ("update the NVIDIA driver, or install the PyTorch build for the CUDA version your driver supports "
               "(`nvidia-smi` shows it; https://pytorch.org/get-started/locally/)")
    return (f"an NVIDIA GPU is installed (driver {driver}) but PyTorch cannot use it: {why}. To train on the GPU, "
            f"{fix}. To run on the CPU on purpose, choose a CPU profile (--profile smoke or cpu) or device 'cpu'.")


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """``write(f)`` into a temporary file beside ``path``, then rename it to ``path``.

    A process killed at any byte leaves ``path`` at its old contents or its new ones (the
    rename is atomic). A write that fails (full disk, quota, file-size limit, permissions)
    removes the temporary file, keeps the old ``path`` and raises a ``StoreError`` that
    names the file and what to do.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except Exception as err:
        cause = _os_error(err)
        if cause is None:
            raise
        tmp.unlink(missing_ok=True)
        raise write_error(path, cause) from err


def _os_error(err: BaseException) -> OSError | None:
    """The OSError behind ``err``: itself, or one it was raised while handling. torch.save's zip writer
    answers a full disk with an OSError, then fails closing the archive with a RuntimeError, depending on
    the byte where the limit hits."""
    while err is not None and not isinstance(err, OSError):
        err = err.__cause__ or err.__context__
    return err


def write_error(path: Path, err: OSError) -> StoreError:
    """The error for a failed write of ``path``: lack of space, or a folder that is not writable."""
    if err.errno in NO_SPACE or err.errno is None:  # None: a short write (numpy's tofile says only that)
        fix = ("Free space on that file system (or raise the quota or file-size limit) and run again: finished runs "
               "are kept, and an interrupted run resumes from its last checkpoint.")
    else:
        fix = "Make the folder writable, or point CDLIB_OUTPUTS at a writable folder."
    return StoreError(f"cannot write {path}: {err.strerror or err}. Its previous contents, if any, are kept. {fix}")


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` through ``atomic_write``."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def read_store_file(path: Path, read: Callable[[Path], object], advice: str):
    """``read(path)`` of a run-store file; a damaged or unreadable file is a ``StoreError`` naming
    the file, its run folder and ``advice`` (what to do)."""
    try:
        return read(Path(path))
    except StoreError:
        raise
    except Exception as err:  # truncated, not the format, or altered by another program
        raise StoreError(f"cannot read {path} of run {Path(path).parent.name} ({type(err).__name__}: "
                         f"{' '.join(str(err).split())[:300]}). Nothing was changed. {advice}") from err


def read_json(path: Path, advice: str):
    """``json.loads`` of a run-store file, through ``read_store_file``."""
    return read_store_file(path, lambda p: json.loads(p.read_bytes()), advice)


def add_counts(counts: torch.Tensor, index: torch.Tensor) -> None:
    """counts[index] += 1 with repeats; unlike torch.bincount it never synchronises with the host on CUDA."""
    counts.index_add_(0, index, torch.ones_like(index))


def progress(iterable, enabled: bool, **kwargs):
    """A tqdm bar around ``iterable`` when ``enabled``. ``CDLIB_PROGRESS=0`` turns every bar off
    (the test run does: a busy machine must not be asked to stream bar updates to nbval)."""
    if not enabled or os.environ.get("CDLIB_PROGRESS", "1") == "0":
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, **kwargs)


@contextlib.contextmanager
def true_fp32():
    """Disable TF32 in CUDA matmuls and convolutions inside the block (no effect on the CPU).

    PyTorch lets cuDNN convolutions use TF32 by default (about 1e-3 relative error);
    analyses that threshold activations need float32 proper, as on the CPU.
    """
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
