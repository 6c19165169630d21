"""The authors' released artifacts (Hugging Face dataset ``KangWooya/WDSL-tensors``), read and checked.

A local copy of the dataset is a folder holding:

    interaction_tensor_KD_models_20teacher.pt   Omega [60, 10000, T]: 0-19 KD students, 20-39 baselines, 40-59 teachers
    interaction_tensor_B_SCD_model.pt           Omega [40, 10000, T]: 0-19 baselines, 20-39 CD models
    checkpoints/table2/<method>/<arch>/run{1,2,3}.pth   method: baseline, cs-kd, ps-kd, cd-200, cd-300
    checkpoints/section_4_1/teacher_resnet152.pth       Section 4.1's teacher (its baseline: table2 baseline run1)

Get it on a connected machine with ``huggingface_hub.snapshot_download(repo_id="KangWooya/WDSL-tensors",
repo_type="dataset", local_dir=FOLDER)``.

Every file is checked before use: a checkpoint must hold exactly the keys, shapes and dtypes of the
network its method and architecture need (``network_for``), under the key names of the code that
trained it (``released_keys``); the first key that differs is named in the error, and nothing is
loaded non-strictly. An Omega file must be one integer tensor of 0/1 with the stated model count; it
is memory-mapped and read one model at a time, so its 1.8 GB are never held twice.

Baseline and CD were trained with the ``pytorch-cifar100`` networks, which are cdlib's ``resnet*`` and
``densenet121``; CS-KD and PS-KD with the CS-KD / PS-KD code's CIFAR networks, cdlib's
``preact_resnet*`` and ``cskd_densenet121`` (PS-KD's ResNet-50 is post-activation: ``resnet50``).
Equal keys and shapes do not make equal networks, so ``tests/test_released.py`` states each of these
upstream networks on its own and requires the reader's network to give its logits.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from cdlib.core.models import BasicBlock, Bottleneck, DenseLayer, build_model
from cdlib.errors import UserError

CIFAR100_CLASSES = 100
TEST_IMAGES = 10_000
WIDTH = 1.0  # the released networks' width (tests write narrower ones with the same key names)
TABLE2_METHODS = ("baseline", "cs-kd", "ps-kd", "cd-200", "cd-300")
TABLE2_ARCHS = ("resnet18", "resnet34", "resnet50", "densenet121")
RUNS = (1, 2, 3)
# The code each method was trained with, which fixes its networks, key names and input normalisation.
FAMILY = {"baseline": "pytorch-cifar100", "cd-200": "pytorch-cifar100", "cd-300": "pytorch-cifar100",
          "cs-kd": "cs-kd", "ps-kd": "ps-kd"}
# Input mean / std each code trains (and tests) its CIFAR-100 networks with: pytorch-cifar100's
# CIFAR100_TRAIN_MEAN/STD (conf/global_settings.py, used by the authors' train.py, train_kd.py, train_cd.py);
# the CS-KD code's datasets.py and the PS-KD code's loader/custom_dataloader.py both use the CIFAR-10
# statistics below for CIFAR-100 as well.
NORMALISATION = {
    "pytorch-cifar100": ((0.5070751592371323, 0.48654887331495095, 0.4409178433670343),
                         (0.2673342858792401, 0.2564384629170883, 0.27615047132568404)),
    "cs-kd": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "ps-kd": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
}
# The authors' Table 2 script (analysis/evaluate_models.py) normalises every method's test images with
# pytorch-cifar100's statistics, so for CS-KD and PS-KD it measures other inputs than those they trained on.
EVALUATION_SCRIPT_NORMALISATION = "pytorch-cifar100"


def normalisations(method: str) -> dict[str, str]:
    """The two normalisations a released Table 2 checkpoint is evaluated under, as ``NORMALISATION`` keys:
    "trained" (its own code's statistics) and "evaluate_models.py" (the authors' Table 2 script's)."""
    return {"trained": FAMILY[method], "evaluate_models.py": EVALUATION_SCRIPT_NORMALISATION}


# file, model groups, and how the authors built it (their analysis/build_tensors.py): the layer read,
# components per model, centred PCA or not, and the percentile of |correlation| that set gamma.
OMEGA_FILES = {
    "kd": ("interaction_tensor_KD_models_20teacher.pt",
           {"student": range(0, 20), "baseline": range(20, 40), "teacher": range(40, 60)},
           dict(layer="last stage, flattened", n_components=50, centered=True, corr_percentile=99.0)),
    "cd": ("interaction_tensor_B_SCD_model.pt", {"baseline": range(0, 20), "cd": range(20, 40)},
           dict(layer="pooled penultimate", n_components=50, centered=False, corr_percentile=99.0)),
}
SECTION_4_1_TEACHER = Path("checkpoints/section_4_1/teacher_resnet152.pth")
DOWNLOAD_HINT = ('on a connected machine: huggingface_hub.snapshot_download(repo_id="KangWooya/WDSL-tensors", '
                 'repo_type="dataset", local_dir=FOLDER)')


class ReleasedArtifactError(UserError, ValueError):
    """A released file is missing, of another format, or does not fit the network it needs."""


def table2_checkpoint(folder: Path, method: str, arch: str, run: int) -> Path:
    return Path(folder) / "checkpoints" / "table2" / method / arch / f"run{run}.pth"


def network_for(method: str, arch: str) -> str:
    """The cdlib network a released checkpoint of ``method`` and ``arch`` loads into."""
    family = FAMILY[method]
    if family == "pytorch-cifar100":
        return arch
    if arch == "densenet121":
        return "cskd_densenet121"
    if family == "ps-kd" and arch == "resnet50":  # PS-KD's ResNet-50 is a post-activation bottleneck ResNet
        return "resnet50"
    return f"preact_{arch}"


# ----------------------------------------------------------------------------- key names

def _module_names(model: nn.Module, family: str) -> dict[str, str]:
    """cdlib module name -> the released code's name for it, for every module that holds state."""
    names: dict[str, str] = {}
    resnet = hasattr(model, "stages")
    if resnet:
        torch_style = family == "pytorch-cifar100"
        names["stem.0"], names["stem.1"] = ("conv1.0", "conv1.1") if torch_style else ("conv1", "bn1")
        names["classifier"] = "fc" if torch_style else "linear"
        for s, stage in enumerate(model.stages):
            for b, block in enumerate(stage):
                ours = f"stages.{s}.{b}"
                theirs = f"conv{s + 2}_x.{b}" if torch_style else f"layer{s + 1}.{b}"
                if isinstance(block, (BasicBlock, Bottleneck)):
                    post = {i: f"residual_function.{i}" for i in range(8)} if torch_style else dict(
                        zip((0, 1, 3, 4, 6, 7), ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")))
                    names.update({f"{ours}.residual.{i}": f"{theirs}.{name}" for i, name in post.items()})
                    names.update({f"{ours}.shortcut.{i}": f"{theirs}.shortcut.{i}" for i in range(2)})
                else:  # pre-activation blocks carry the released names already
                    names.update({f"{ours}.{name}": f"{theirs}.{name}" for name, _ in block.named_modules() if name})
        return names
    # DenseNet: one flat body of stem conv, dense layers, transitions (BN, [ReLU,] conv, pool) and a final BN.
    blocks = sum(isinstance(m, nn.AvgPool2d) for m in model.body) + 1
    block = layer = 0
    children = list(model.body)
    last_bn = max(i for i, m in enumerate(children) if isinstance(m, nn.BatchNorm2d))
    torch_style = family == "pytorch-cifar100"
    for i, module in enumerate(children):
        ours = f"body.{i}"
        if i == 0:
            names[ours] = "conv1"
        elif isinstance(module, DenseLayer):
            if torch_style:
                block_name = f"dense_block_layer_{block}" if block < blocks - 1 else f"dense_block{block}"
                names.update({f"{ours}.body.{j}": f"features.{block_name}.bottle_neck_layer_{layer}.bottle_neck.{j}"
                              for j in (0, 2, 3, 5)})
            else:
                names.update({f"{ours}.body.{j}": f"dense{block + 1}.{layer}.{name}"
                              for j, name in zip((0, 2, 3, 5), ("bn1", "conv1", "bn2", "conv2"))})
            layer += 1
        elif isinstance(module, nn.BatchNorm2d):
            names[ours] = ("features.bn" if torch_style else "bn") if i == last_bn else (
                f"features.transition_layer_{block}.down_sample.0" if torch_style else f"trans{block + 1}.bn")
        elif isinstance(module, nn.Conv2d):
            names[ours] = f"features.transition_layer_{block}.down_sample.1" if torch_style else f"trans{block + 1}.conv"
        elif isinstance(module, nn.AvgPool2d):
            block, layer = block + 1, 0
    names["classifier"] = "linear"
    return names


def released_keys(model: nn.Module, family: str) -> dict[str, str]:
    """cdlib state-dict key -> the key the released code writes, in the model's order."""
    names = _module_names(model, family)
    out = {}
    for key in model.state_dict():
        module, _, leaf = key.rpartition(".")
        if module not in names:
            raise KeyError(f"no released name for module {module!r} of this network ({family})")
        out[key] = f"{names[module]}.{leaf}"
    return out


# ----------------------------------------------------------------------------- checkpoints

def _torch_load(path: Path, mmap: bool = False):
    """``torch.load`` of tensors and plain values only (``mmap``: memory-mapped); a named error otherwise."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise ReleasedArtifactError(f"{path} holds Python objects other than tensors and plain values; loading it "
                                    f"could run arbitrary code, so it was refused. The released files hold none: "
                                    f"download it again ({DOWNLOAD_HINT}).") from err
    except Exception as err:  # a truncated file or not a torch archive
        raise ReleasedArtifactError(f"cannot read {path} ({type(err).__name__}: {str(err)[:200]}); it is damaged "
                                    f"or not a PyTorch file. Download it again ({DOWNLOAD_HINT}).") from err


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's state dict: a plain one, or nested under state_dict/net/model, ``module.`` stripped."""
    if not path.is_file():
        raise ReleasedArtifactError(f"{path} is missing; the released folder is incomplete ({DOWNLOAD_HINT}).")
    state = _torch_load(path)
    for key in ("state_dict", "net", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ReleasedArtifactError(f"{path} is not a state dict of tensors (nor one nested under 'state_dict', "
                                    f"'net' or 'model'); it is not a released checkpoint.")
    if all(k.startswith("module.") for k in state):  # saved from a DataParallel wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_released_model(path: Path, method: str, arch: str) -> nn.Module:
    """The released checkpoint ``path`` of ``method`` on ``arch`` in its cdlib network, in eval mode.

    Keys, shapes and dtypes must equal the network's exactly; otherwise a ``ReleasedArtifactError``
    names the file and the first key that differs."""
    path = Path(path)
    network = network_for(method, arch)
    model = build_model(network, CIFAR100_CLASSES, WIDTH)
    ours = model.state_dict()
    mapping = released_keys(model, FAMILY[method])
    state = _read_state(path)
    what = f"{path} ({method} {arch}, cdlib network {network}, {FAMILY[method]} key names)"
    theirs_order = list(mapping.values())
    missing = [k for k in theirs_order if k not in state]
    unexpected = [k for k in state if k not in set(theirs_order)]
    if missing or unexpected:
        first = (f"key {missing[0]!r} is missing" if missing else "") + (" and " if missing and unexpected else "") + (
            f"key {unexpected[0]!r} is not one this network has" if unexpected else "")
        raise ReleasedArtifactError(f"{what}: {first} ({len(missing)} missing, {len(unexpected)} unexpected); "
                                    f"the file is of another network or method.")
    for key, released in mapping.items():
        theirs, expected = state[released], ours[key]
        if theirs.shape != expected.shape or theirs.dtype.is_floating_point != expected.dtype.is_floating_point:
            raise ReleasedArtifactError(f"{what}: key {released!r} is {tuple(theirs.shape)} {theirs.dtype}, the "
                                        f"network needs {tuple(expected.shape)} {expected.dtype}.")
    model.load_state_dict({key: state[released].to(ours[key].dtype) for key, released in mapping.items()}, strict=True)
    return model.eval()


# ----------------------------------------------------------------------------- Omega

@dataclass
class ReleasedOmega:
    """A released Omega tensor (M, N, T) of 0/1, memory-mapped; ``model_features(m)`` reads one model,
    as ``cdlib.core.interaction.InteractionTensor`` does, so ``feature_statistics.group_statistics`` works on it."""

    path: Path
    tensor: torch.Tensor
    groups: dict[str, range]
    layer: str
    n_components: int
    centered: bool
    corr_percentile: float

    @property
    def n_models(self) -> int:
        return self.tensor.shape[0]

    @property
    def n_images(self) -> int:
        return self.tensor.shape[1]

    @property
    def n_clusters(self) -> int:
        return self.tensor.shape[2]

    def model_features(self, m: int) -> tuple[np.ndarray, np.ndarray]:
        """Model m's features: the ids it uses on some image (U,) and their (N, U) bool columns."""
        values = self.tensor[m].numpy()
        on = values != 0
        if (values[on] != 1).any():
            raise ReleasedArtifactError(f"{self.path}: model {m} holds values other than 0 and 1; Omega is a 0/1 "
                                        f"tensor. The file is damaged or not a released Interaction Tensor.")
        ids = np.flatnonzero(on.any(axis=0))
        return ids, on[:, ids]


def load_omega(folder: Path, which: str, n_images: int | None = None) -> ReleasedOmega:
    """The released Omega ``which`` ("kd" or "cd", ``OMEGA_FILES``) of the folder, checked and memory-mapped;
    ``n_images``: default the CIFAR-100 test set's."""
    name, groups, built = OMEGA_FILES[which]
    n_images = n_images or TEST_IMAGES
    path = Path(folder) / name
    if not path.is_file():
        raise ReleasedArtifactError(f"{path} is missing; the released folder is incomplete ({DOWNLOAD_HINT}).")
    tensor = _torch_load(path, mmap=True)  # needs torch.save's zip format, which the released files have
    models = max(r.stop for r in groups.values())
    if not isinstance(tensor, torch.Tensor):
        raise ReleasedArtifactError(f"{path} holds a {type(tensor).__name__}, not the one tensor of a released Omega.")
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.ndim != 3 or tuple(
            tensor.shape[:2]) != (models, n_images):
        raise ReleasedArtifactError(f"{path} is a {tensor.dtype} tensor of shape {tuple(tensor.shape)}; a released "
                                    f"Omega is an integer tensor of shape ({models}, {n_images}, T).")
    return ReleasedOmega(path, tensor, dict(groups), **built)


def section_4_1_paths(folder: Path) -> tuple[Path, Path]:
    """(teacher, baseline) checkpoints of Section 4.1."""
    return Path(folder) / SECTION_4_1_TEACHER, table2_checkpoint(folder, "baseline", "resnet18", 1)


def found_table2(folder: Path) -> dict[tuple[str, str], list[Path]]:
    """(method, arch) -> the run files present in the folder's ``checkpoints/table2``."""
    cells = {}
    for method in TABLE2_METHODS:
        for arch in TABLE2_ARCHS:
            files = [table2_checkpoint(folder, method, arch, r) for r in RUNS]
            if any(f.is_file() for f in files):
                cells[(method, arch)] = [f for f in files if f.is_file()]
    return cells


