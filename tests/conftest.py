import os
import re
import tarfile
from pathlib import Path

import pytest

# Tiny test networks are dominated by per-op overhead: one thread is faster on the shared
# 2-core machines, and subprocesses started by tests (kill/resume checks) inherit the same
# setting, so their arithmetic matches this process's.
os.environ["OMP_NUM_THREADS"] = "1"
import torch  # noqa: E402

torch.set_num_threads(1)

from cdlib import paths  # noqa: E402

# The project's shared real data sits beside the checkout (../shared/data); users do not have it.
SHARED_DATA = Path(os.environ.get("CDLIB_SHARED_DATA", paths.REPO.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def isolated_outputs(tmp_path, monkeypatch):
    """Every test writes runs, figures and tables into its own temporary folder."""
    monkeypatch.setenv("CDLIB_OUTPUTS", str(tmp_path / "outputs"))
    return tmp_path / "outputs"


def _extract(tmp_path_factory, archive: str) -> Path:
    path = SHARED_DATA / archive
    if not path.is_file():
        pytest.skip(f"shared real data {path} not present")
    target = tmp_path_factory.mktemp(archive.split(".")[0])
    with tarfile.open(path) as tar:
        tar.extractall(target, filter="data")
    return target


@pytest.fixture(scope="session")
def cifar100_sample(tmp_path_factory) -> Path:
    return _extract(tmp_path_factory, "cifar100-sample.tar.gz")


@pytest.fixture(scope="session")
def cifar10_jpeg(tmp_path_factory) -> Path:
    return _extract(tmp_path_factory, "cifar10-jpeg.tar.gz")


# The fault matrix: every fault a test injected, what happened, and whether finished work was kept.
# Tests add rows through the ``record_fault`` fixture; the table prints at the end of the run.
FAULT_MATRIX: dict[str, tuple[str, str]] = {}


@pytest.fixture
def record_fault():
    def record(fault: str, outcome: str, kept: bool | None) -> None:
        """``kept``: whether finished work survived; None where none was at stake."""
        outcome = re.sub(r"/\S*/", "…/", " ".join(outcome.split()))  # temporary folders say nothing
        FAULT_MATRIX[fault] = (outcome[:120], {True: "kept", False: "LOST", None: "-"}[kept])
    return record


def pytest_terminal_summary(terminalreporter):
    if not FAULT_MATRIX:
        return
    write = terminalreporter.write_line
    width = max(map(len, FAULT_MATRIX))
    lost = sum(kept == "LOST" for _, kept in FAULT_MATRIX.values())
    write(f"\nfault matrix: {len(FAULT_MATRIX)} faults injected, finished work lost in {lost}")
    write(f"  {'fault':<{width}}  {'finished work':<13}  what happened")
    for fault, (outcome, kept) in sorted(FAULT_MATRIX.items()):
        write(f"  {fault:<{width}}  {kept:<13}  {outcome}")


def pytest_collection_modifyitems(items):
    """nbval waits only 5 s for each output message once a cell has finished; on a loaded shared
    machine the kernel can take longer than that to flush a training cell's output (CI failed so
    once). Give it a minute; the cells' own time limit (nbval's --nbval-cell-timeout) is unchanged."""
    for item in items:
        if hasattr(item, "output_timeout"):
            item.output_timeout = 60
