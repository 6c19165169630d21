"""Learning on real images: a few thousand real CIFAR-10 images from ``../shared/data`` and three epochs
must reach well above chance on real test images. Skipped where the shared data is absent."""
from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED_DATA
from cdlib.core.config import TrainConfig
from cdlib.core.data import DeviceData, load_dataset
from cdlib.core.train import fit

TRAIN_PER_CLASS, TEST_PER_CLASS = 400, 100  # 4,000 training and 1,000 test images of the 10 classes


@pytest.fixture(scope="module")
def cifar10_subset(tmp_path_factory) -> Path:
    """An image folder with the first images of each class, read straight from the archive (the whole
    set would take longer to decode than the test may run)."""
    archive = SHARED_DATA / "cifar10-jpeg.tar.gz"
    if not archive.is_file():
        pytest.skip(f"shared real data {archive} not present")
    target = tmp_path_factory.mktemp("cifar10-subset")
    taken: dict[tuple[str, str], int] = {}
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 3 or parts[-3] not in ("train", "test"):
                continue
            key = (parts[-3], parts[-2])
            if taken.get(key, 0) < (TRAIN_PER_CLASS if key[0] == "train" else TEST_PER_CLASS):
                taken[key] = taken.get(key, 0) + 1
                member.name = "/".join(parts[-3:])
                tar.extract(member, target, filter="data")
    return target


def test_three_epochs_on_real_cifar10_images_learn_well_above_chance(cifar10_subset, tmp_path):
    config = TrainConfig(name="learn", dataset=f"imagefolder:{cifar10_subset}", width=0.0625, epochs=3,
                         batch_size=64, seed=0)
    dataset = load_dataset(config.dataset)
    assert dataset.num_classes == 10 and len(dataset.train_labels) == 10 * TRAIN_PER_CLASS
    assert np.bincount(dataset.test_labels).tolist() == [TEST_PER_CLASS] * 10
    summary = fit(config, tmp_path / "run", data=DeviceData(dataset, "cpu", config.rotation), progress=False)
    # Chance is 10%. Seeds 0-4 of this setting reached 32.7-33.9% here (seed 0: 32.7%), so 25% leaves
    # a margin of 6 times that spread for other machines and torch versions.
    assert summary["final_top1"] > 25, summary
