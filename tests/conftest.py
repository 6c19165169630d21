import os
import tarfile
from pathlib import Path

import pytest

from cdlib import paths

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
