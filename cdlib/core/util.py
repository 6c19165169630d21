"""Small helpers shared by the core and the layers above it: device choice, atomic
file writes, on-device counting, progress bars and true-fp32 arithmetic on CUDA."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch


def resolve_device(device=None) -> torch.device:
    """``None``/``"auto"`` -> CUDA when available, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` to a temporary file, then rename: a crash never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_save_all(items: list[tuple[object, Path]]) -> None:
    """``atomic_save`` for several files: every file is written under a temporary name first,
    then all are renamed in a row, so a kill leaves them all at their old or all at their new
    contents, except inside the microseconds of the renames."""
    written = []
    for obj, path in items:
        tmp = path.with_name(path.name + ".tmp")
        torch.save(obj, tmp)
        written.append((tmp, path))
    for tmp, path in written:
        os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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
