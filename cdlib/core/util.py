"""Small helpers shared by the core and the layers above it: device choice, atomic
file writes and store reads, on-device counting, progress bars and true-fp32 arithmetic on CUDA."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import BinaryIO, Callable

import torch

from cdlib.errors import NO_SPACE, StoreError


def resolve_device(device=None) -> torch.device:
    """``None``/``"auto"`` -> CUDA when available, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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
