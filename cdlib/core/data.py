"""Data sets by name, the validation split, and GPU-resident augmentation.

Data sets by name (``load_dataset``):
- ``cifar100`` / ``cifar10`` and ``imagefolder:<folder>``: read from disk by ``cdlib.core.readers``
  (the folder is absolute or relative to the data root);
- ``synthetic``: generated from a seed, no files; classes grouped into super-classes
  whose members look alike, so confusion matrices have CIFAR-100-like blocks.

``DeviceData`` keeps the whole set on the training device as uint8 and augments
in batch there (crop with zero padding 4, horizontal flip, optional rotation,
normalisation with the train mean/std): no DataLoader workers, no host copies.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from cdlib.core.readers import CIFAR, Dataset, load_cifar, load_imagefolder
from cdlib.errors import DataError


@dataclass
class Batch:
    """One training batch. ``fit`` fills the logits an objective asks for (``extra_forwards``)."""
    images: torch.Tensor   # (B, 3, H, W) float, augmented and normalised
    labels: torch.Tensor   # (B,) int64
    indices: torch.Tensor  # (B,) int64 positions in the training set
    teacher_logits: torch.Tensor | None = None  # KD: the teacher's logits of ``images``
    partner_logits: torch.Tensor | None = None  # CS-KD: gradient-free logits of the partners' images


VALIDATION_SEED = 0  # one fixed split per data set and size, whatever the run's seed
SUBSET_SEED = 1  # and one fixed training subset (TrainConfig.train_images) of what is left


def validation_indices(labels: np.ndarray, n: int, seed: int = VALIDATION_SEED) -> np.ndarray:
    """``n`` training positions, stratified: class k gets its share ``n * count_k / N``, rounded by
    largest remainders so the shares sum to ``n``, drawn at random (``seed``) within the class.
    Sorted, so the split does not depend on the order classes are visited."""
    classes, counts = np.unique(labels, return_counts=True)
    exact = n * counts / counts.sum()
    shares = np.floor(exact).astype(int)
    shares[np.argsort(-(exact - shares), kind="stable")[:n - shares.sum()]] += 1
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels == k))[:share] for k, share in zip(classes, shares)]
    return np.sort(np.concatenate(chosen))


def hold_out(dataset: Dataset, n: int, train_images: int = 0) -> Dataset:
    """``dataset`` with ``n`` stratified training images moved to a validation split (``n = 0``: none), then
    only ``train_images`` of the rest kept for training, stratified and fixed (``0``: all of them)."""
    labels = dataset.train_labels
    if n:
        held = np.zeros(len(labels), dtype=bool)
        if 0 < n < len(labels):
            held[validation_indices(labels, n)] = True
        if not held.any() or np.bincount(labels[~held], minlength=dataset.num_classes).min() == 0:
            raise DataError(f"cannot hold out {n} of the {len(labels)} training images of {dataset.name} for "
                            f"validation: every class must keep some training images. Choose a smaller validation size.")
        dataset = replace(dataset, train_images=dataset.train_images[~held], train_labels=labels[~held],
                          validation_images=dataset.train_images[held], validation_labels=labels[held])
    if train_images:
        rest = dataset.train_labels
        if train_images > len(rest) or train_images < dataset.num_classes:
            raise DataError(f"cannot train on {train_images} images of {dataset.name}: {len(rest)} training images "
                            f"are left after holding {n} out, and each of its {dataset.num_classes} classes needs one. "
                            f"Choose train_images between {dataset.num_classes} and {len(rest)}, or 0 for all.")
        kept = validation_indices(rest, train_images, seed=SUBSET_SEED)
        dataset = replace(dataset, train_images=dataset.train_images[kept], train_labels=rest[kept])
    return dataset


# --------------------------------------------------------------------------- synthetic

def _smooth_field(rng: np.random.Generator, n: int, grid: int, size: int) -> np.ndarray:
    """n random RGB fields of low spatial frequency: a grid x grid noise upsampled to size x size."""
    coarse = torch.from_numpy(rng.standard_normal((n, 3, grid, grid)).astype(np.float32))
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).numpy()


def synthetic(seed: int = 0, superclasses: int = 5, classes_per_superclass: int = 4,
              train_per_class: int = 100, test_per_class: int = 25, size: int = 16) -> Dataset:
    """A small data set with CIFAR-100-like structure, generated deterministically.

    Each super-class has a smooth prototype image; its classes add a weaker smooth
    pattern of their own, so classes of one super-class look alike. Images are 16x16 by
    default to keep CPU smoke runs fast (the CIFAR networks take any size >= 8). A sample is its
    class template, shifted by a few pixels, blended with a random class of (mostly)
    the same super-class, rescaled in contrast and noised. The blending is what makes
    within-super-class confusions common, as on CIFAR-100.
    """
    rng = np.random.default_rng(seed)
    C = superclasses * classes_per_superclass
    superclass_of = np.repeat(np.arange(superclasses), classes_per_superclass)
    templates = (_smooth_field(rng, superclasses, 4, size)[superclass_of]
                 + 1.0 * _smooth_field(rng, C, 6, size))

    def draw(per_class: int):
        labels = np.repeat(np.arange(C), per_class)
        n = len(labels)
        same_super = rng.random(n) < 0.8
        partner_in_super = superclass_of[labels] * classes_per_superclass + rng.integers(0, classes_per_superclass, n)
        partner = np.where(same_super, partner_in_super, rng.integers(0, C, n))
        mix = rng.uniform(0.0, 0.45, n)[:, None, None, None]
        x = (1 - mix) * templates[labels] + mix * templates[partner]
        shifts = rng.integers(-(size // 8), size // 8 + 1, (n, 2))
        rows = (np.arange(size)[None, :] - shifts[:, :1]) % size  # np.roll of each image by its own shift
        cols = (np.arange(size)[None, :] - shifts[:, 1:]) % size
        x = x[np.arange(n)[:, None, None, None], np.arange(3)[None, :, None, None],
              rows[:, None, :, None], cols[:, None, None, :]]
        x = x * rng.uniform(0.8, 1.2, (n, 1, 1, 1)) + 0.2 * rng.standard_normal(x.shape)
        images = np.clip(128 + 45 * x, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
        return np.ascontiguousarray(images), labels.astype(np.int64)

    xtr, ytr = draw(train_per_class)
    xte, yte = draw(test_per_class)
    classes = [f"s{s}c{c}" for s in range(superclasses) for c in range(classes_per_superclass)]
    return Dataset("synthetic", xtr, ytr, xte, yte, classes, superclass_of,
                   [f"super{s}" for s in range(superclasses)])


def load_dataset(name: str, root: str | Path | None = None, download: bool = False) -> Dataset:
    """Load a data set by name (see module docstring). ``root`` overrides ``$CDLIB_DATA``."""
    if name in CIFAR:
        return load_cifar(name, Path(root) if root else None, download)
    if name.startswith("imagefolder:"):
        folder = Path(name.split(":", 1)[1])
        if root and not folder.is_absolute():
            folder = Path(root) / folder
        return load_imagefolder(folder)
    if name == "synthetic":
        return synthetic()
    raise DataError(f"unknown data set {name!r}; use cifar100, cifar10, imagefolder:<folder> or synthetic.")


# --------------------------------------------------------------------------- on the device

class DeviceData:
    """The whole data set on one device, augmented there in batch.

    Augmentation order follows the paper's code: random crop (zero padding 4),
    horizontal flip, random rotation (nearest, zero fill), then normalisation with
    the training set's per-channel mean and std.
    """

    def __init__(self, dataset: Dataset, device: torch.device | str, rotation: float = 15.0, pad: int = 4):
        self.device = torch.device(device)
        to = lambda a: torch.from_numpy(a).to(self.device)  # noqa: E731
        self.train_images = to(dataset.train_images).permute(0, 3, 1, 2).contiguous()
        self.test_images = to(dataset.test_images).permute(0, 3, 1, 2).contiguous()
        self.train_labels = to(dataset.train_labels)
        self.test_labels = to(dataset.test_labels)
        held_out = dataset.validation_images is not None
        self.validation_images = to(dataset.validation_images).permute(0, 3, 1, 2).contiguous() if held_out else None
        self.validation_labels = to(dataset.validation_labels) if held_out else None
        self.num_classes = dataset.num_classes
        self.rotation = rotation
        self.pad = pad
        pixels = dataset.train_images.reshape(-1, 3).astype(np.float64) / 255
        self.mean = torch.tensor(pixels.mean(0), dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(pixels.std(0), dtype=torch.float32, device=self.device).view(1, 3, 1, 1)

    @property
    def num_train(self) -> int:
        return len(self.train_labels)

    @property
    def num_validation(self) -> int:
        return 0 if self.validation_labels is None else len(self.validation_labels)

    def normalise(self, images_uint8: torch.Tensor) -> torch.Tensor:
        return (images_uint8.float() / 255 - self.mean) / self.std

    def augment(self, indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augmented, normalised float32 images of the given training indices.

        Autocast is switched off here: in bf16, ``affine_grid`` moves rotated pixels by
        up to ~0.2 px, so the images would depend on whether the caller was in autocast.
        """
        with torch.autocast(self.device.type, enabled=False):
            return self._augment(indices, generator)

    def _augment(self, indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = self.train_images[indices].float() / 255
        B, _, H, W = x.shape
        p = self.pad
        # Random crop: pad once, then gather each image's window at its own offset.
        padded = F.pad(x, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (B,), device=self.device, generator=generator)
        dx = torch.randint(0, 2 * p + 1, (B,), device=self.device, generator=generator)
        rows = (dy[:, None] + torch.arange(H, device=self.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(W, device=self.device))[:, None, None, :]
        x = padded[torch.arange(B, device=self.device)[:, None, None, None],
                   torch.arange(3, device=self.device)[None, :, None, None], rows, cols]
        flip = torch.rand(B, device=self.device, generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        if self.rotation:
            angle = (torch.rand(B, device=self.device, generator=generator) * 2 - 1) * math.radians(self.rotation)
            cos, sin = torch.cos(angle), torch.sin(angle)
            theta = torch.stack([torch.stack([cos, -sin, torch.zeros_like(cos)], 1),
                                 torch.stack([sin, cos, torch.zeros_like(cos)], 1)], 1)
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)
        return (x - self.mean) / self.std

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        """One epoch of shuffled, augmented batches (the last one may be smaller, as in the paper's code)."""
        order = torch.randperm(self.num_train, device=self.device, generator=generator)
        for start in range(0, self.num_train, batch_size):
            idx = order[start:start + batch_size]
            yield Batch(self.augment(idx, generator), self.train_labels[idx], idx)

    def labels(self, split: str) -> torch.Tensor:
        """Labels of ``test``, ``validation`` or ``train`` (the training images, un-augmented)."""
        return {"test": self.test_labels, "validation": self.validation_labels, "train": self.train_labels}[split]

    def eval_batches(self, split: str = "test", batch_size: int = 1000) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Normalised, un-augmented batches of ``split`` (see ``labels``), in order."""
        images = {"test": self.test_images, "validation": self.validation_images, "train": self.train_images}[split]
        labels = self.labels(split)
        if labels is None:
            raise ValueError("this data set has no validation split (TrainConfig.validation = 0)")
        for start in range(0, len(labels), batch_size):
            yield self.normalise(images[start:start + batch_size]), labels[start:start + batch_size]
