"""The reader of the authors' released artifacts, on artifacts generated here in the released formats
(the real files cannot be downloaded in tests): every network a released checkpoint loads into gives the
logits of an independent statement of the upstream network that trained it, planted Omega features are
counted directly, every Table 2 cell is evaluated under both input normalisations, and every damaged or
foreign file is a named error."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cdlib.core import readers
from cdlib.core.models import build_model
from cdlib.released import analysis, artifacts as art
from test_data import make_cifar100

SMALL = 0.125  # narrow networks with the released key names, for files written in tests


def released_state(method: str, arch: str, seed: int = 0, width: float = SMALL) -> tuple[torch.nn.Module, dict]:
    """A cdlib network with random weights and BN statistics, and its state dict under the released key names."""
    torch.manual_seed(seed)
    model = build_model(art.network_for(method, arch), art.CIFAR100_CLASSES, width)
    for module in model.modules():  # non-trivial BN statistics, so a swapped buffer changes the logits
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    names = art.released_keys(model, art.FAMILY[method])
    return model.eval(), {names[k]: v.clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------ the authors' networks, stated independently
# Each class below states one network of the code that trained a released checkpoint, written here from reading
# that code (its module names and its forward pass), not from cdlib: pytorch-cifar100's models/resnet.py and
# models/densenet.py (the authors' training/models), the CS-KD code's models/resnet.py and models/densenet3.py
# (alinlab/cs-kd, plus the authors' pre-activation bottleneck in their vendored baselines/cs-kd), and the PS-KD
# code's models/preact_resnet.py and models/densenet_cifar.py (lgcnsai/PS-KD-Pytorch). CS-KD and PS-KD define
# CIFAR_ResNet, the pre-activation basic block and CIFAR_DenseNet identically, so one statement serves both.

def conv(cin: int, cout: int, k: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)


def identity_or(cin: int, cout: int, stride: int, *projection: nn.Module) -> nn.Sequential:
    """An empty Sequential (identity) when shapes match, else the projection: how all three codes write shortcuts."""
    return nn.Sequential() if stride == 1 and cin == cout else nn.Sequential(*projection)


def stages(block, blocks: list[int]) -> tuple[list[nn.Sequential], int]:
    """The four stages (64/128/256/512, first block of stages 2-4 strided) every code's CIFAR ResNet builds."""
    out, cin = [], 64
    for width, depth, stride in zip((64, 128, 256, 512), blocks, (1, 2, 2, 2)):
        layers = []
        for s in [stride] + [1] * (depth - 1):
            layers.append(block(cin, width, s))
            cin = width * block.expansion
        out.append(nn.Sequential(*layers))
    return out, cin


class PC100Block(nn.Module):  # pytorch-cifar100 BasicBlock and BottleNeck: relu(residual(x) + shortcut(x))
    def forward(self, x):
        return F.relu(self.residual_function(x) + self.shortcut(x))


class PC100Basic(PC100Block):  # 3x3 (strided), 3x3
    expansion = 1

    def __init__(self, cin, width, stride):
        super().__init__()
        self.residual_function = nn.Sequential(conv(cin, width, 3, stride), nn.BatchNorm2d(width), nn.ReLU(),
                                               conv(width, width, 3), nn.BatchNorm2d(width))
        self.shortcut = identity_or(cin, width, stride, conv(cin, width, 1, stride), nn.BatchNorm2d(width))


class PC100Bottleneck(PC100Block):  # 1x1, 3x3 (strided), 1x1 to 4x
    expansion = 4

    def __init__(self, cin, width, stride):
        super().__init__()
        out = 4 * width
        self.residual_function = nn.Sequential(conv(cin, width, 1), nn.BatchNorm2d(width), nn.ReLU(),
                                               conv(width, width, 3, stride), nn.BatchNorm2d(width), nn.ReLU(),
                                               conv(width, out, 1), nn.BatchNorm2d(out))
        self.shortcut = identity_or(cin, out, stride, conv(cin, out, 1, stride), nn.BatchNorm2d(out))


class PC100ResNet(nn.Module):  # stem conv1 = (conv3x3, BN, ReLU); conv2_x..conv5_x; adaptive avg pool; fc
    def __init__(self, block, blocks):
        super().__init__()
        self.conv1 = nn.Sequential(conv(3, 64, 3), nn.BatchNorm2d(64), nn.ReLU())
        layers, cin = stages(block, blocks)
        for i, layer in enumerate(layers):
            setattr(self, f"conv{i + 2}_x", layer)
        self.fc = nn.Linear(cin, art.CIFAR100_CLASSES)

    def forward(self, x):
        out = self.conv5_x(self.conv4_x(self.conv3_x(self.conv2_x(self.conv1(x)))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


class PC100DenseLayer(nn.Module):  # BN-ReLU-1x1(4k)-BN-ReLU-3x3(k); old maps first, then the new ones
    def __init__(self, cin, k):
        super().__init__()
        self.bottle_neck = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), conv(cin, 4 * k, 1),
                                         nn.BatchNorm2d(4 * k), nn.ReLU(), conv(4 * k, k, 3))

    def forward(self, x):
        return torch.cat([x, self.bottle_neck(x)], 1)


class PC100Transition(nn.Module):  # BN, 1x1 conv, 2x2 avg pool: no ReLU
    def __init__(self, cin, cout):
        super().__init__()
        self.down_sample = nn.Sequential(nn.BatchNorm2d(cin), conv(cin, cout, 1), nn.AvgPool2d(2))

    def forward(self, x):
        return self.down_sample(x)


class PC100DenseNet(nn.Module):  # conv1 (3x3 to 2k); features: blocks, transitions (floor of half), bn, relu; linear
    def __init__(self, blocks, k=32):
        super().__init__()
        ch = 2 * k
        self.conv1 = conv(3, ch, 3)
        self.features = nn.Sequential()
        for i, depth in enumerate(blocks):
            last = i == len(blocks) - 1
            block = nn.Sequential()
            for j in range(depth):
                block.add_module(f"bottle_neck_layer_{j}", PC100DenseLayer(ch, k))
                ch += k
            self.features.add_module(f"dense_block{i}" if last else f"dense_block_layer_{i}", block)
            if not last:
                self.features.add_module(f"transition_layer_{i}", PC100Transition(ch, ch // 2))
                ch //= 2
        self.features.add_module("bn", nn.BatchNorm2d(ch))
        self.features.add_module("relu", nn.ReLU())
        self.linear = nn.Linear(ch, art.CIFAR100_CLASSES)

    def forward(self, x):
        return self.linear(F.adaptive_avg_pool2d(self.features(self.conv1(x)), 1).flatten(1))


class PreActBasic(nn.Module):  # CS-KD / PS-KD PreActBlock
    expansion = 1

    def __init__(self, cin, width, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), conv(cin, width, 3, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(width), conv(width, width, 3)
        self.shortcut = identity_or(cin, width, stride, conv(cin, width, 1, stride))

    def forward(self, x):
        a = F.relu(self.bn1(x))  # the shortcut, identity or projection, takes this pre-activated input, never x
        return self.conv2(F.relu(self.bn2(self.conv1(a)))) + self.shortcut(a)


class PreActBottleneck(nn.Module):  # the authors' CS-KD PreActBottleneck (their CIFAR_ResNet50)
    expansion = 4

    def __init__(self, cin, width, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), conv(cin, width, 1)
        self.bn2, self.conv2 = nn.BatchNorm2d(width), conv(width, width, 3, stride)
        self.bn3, self.conv3 = nn.BatchNorm2d(width), conv(width, 4 * width, 1)
        self.shortcut = identity_or(cin, 4 * width, stride, conv(cin, 4 * width, 1, stride))

    def forward(self, x):
        a = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(a))))
        return self.conv3(F.relu(self.bn3(out))) + self.shortcut(a)


class PSKDBottleneck(nn.Module):  # PS-KD Bottleneck_CIFAR: post-activation, conv+BN projection on x
    expansion = 4

    def __init__(self, cin, width, stride):
        super().__init__()
        out = 4 * width
        self.conv1, self.bn1 = conv(cin, width, 1), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = conv(width, width, 3, stride), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = conv(width, out, 1), nn.BatchNorm2d(out)
        self.shortcut = identity_or(cin, out, stride, conv(cin, out, 1, stride), nn.BatchNorm2d(out))

    def forward(self, x):
        out = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return F.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


class CifarResNet(nn.Module):  # CS-KD / PS-KD CIFAR_ResNet: relu(bn1(conv1)), layer1..4, 4x4 avg pool, linear
    def __init__(self, block, blocks):
        super().__init__()
        self.conv1, self.bn1 = conv(3, 64, 3), nn.BatchNorm2d(64)
        (self.layer1, self.layer2, self.layer3, self.layer4), cin = stages(block, blocks)
        self.linear = nn.Linear(cin, art.CIFAR100_CLASSES)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(F.avg_pool2d(out, 4).flatten(1))


class CifarDenseLayer(nn.Module):  # CS-KD / PS-KD DenseNet Bottleneck: the new maps first, then the old ones
    def __init__(self, cin, k):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), conv(cin, 4 * k, 1)
        self.bn2, self.conv2 = nn.BatchNorm2d(4 * k), conv(4 * k, k, 3)

    def forward(self, x):
        return torch.cat([self.conv2(F.relu(self.bn2(self.conv1(F.relu(self.bn1(x)))))), x], 1)


class CifarTransition(nn.Module):  # BN, ReLU, 1x1 conv, 2x2 avg pool
    def __init__(self, cin, cout):
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(cin), conv(cin, cout, 1)

    def forward(self, x):
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class CifarDenseNet(nn.Module):  # conv1; dense1, trans1, ..., dense4; relu(bn); 4x4 avg pool; linear
    def __init__(self, blocks, k=32):
        super().__init__()
        ch = 2 * k
        self.conv1 = conv(3, ch, 3)
        for i, depth in enumerate(blocks):
            setattr(self, f"dense{i + 1}", nn.Sequential(*[CifarDenseLayer(ch + j * k, k) for j in range(depth)]))
            ch += depth * k
            if i < len(blocks) - 1:
                setattr(self, f"trans{i + 1}", CifarTransition(ch, ch // 2))
                ch //= 2
        self.bn = nn.BatchNorm2d(ch)
        self.linear = nn.Linear(ch, art.CIFAR100_CLASSES)

    def forward(self, x):
        out = self.trans3(self.dense3(self.trans2(self.dense2(self.trans1(self.dense1(self.conv1(x)))))))
        return self.linear(F.avg_pool2d(F.relu(self.bn(self.dense4(out))), 4).flatten(1))


# The code that trained each released method (the authors' analysis/evaluate_models.py and scripts/run_command.sh),
# and what that code builds for each network name (their evaluate_models.py builders).
TRAINED_BY = {"baseline": "pytorch-cifar100", "cd-200": "pytorch-cifar100", "cd-300": "pytorch-cifar100",
              "cs-kd": "cs-kd", "ps-kd": "ps-kd"}
UPSTREAM = {
    ("pytorch-cifar100", "resnet18"): lambda: PC100ResNet(PC100Basic, [2, 2, 2, 2]),
    ("pytorch-cifar100", "resnet34"): lambda: PC100ResNet(PC100Basic, [3, 4, 6, 3]),
    ("pytorch-cifar100", "resnet50"): lambda: PC100ResNet(PC100Bottleneck, [3, 4, 6, 3]),
    ("pytorch-cifar100", "resnet152"): lambda: PC100ResNet(PC100Bottleneck, [3, 8, 36, 3]),  # Section 4.1 teacher
    ("pytorch-cifar100", "densenet121"): lambda: PC100DenseNet([6, 12, 24, 16]),
    ("cs-kd", "resnet18"): lambda: CifarResNet(PreActBasic, [2, 2, 2, 2]),
    ("cs-kd", "resnet34"): lambda: CifarResNet(PreActBasic, [3, 4, 6, 3]),
    ("cs-kd", "resnet50"): lambda: CifarResNet(PreActBottleneck, [3, 4, 6, 3]),
    ("cs-kd", "densenet121"): lambda: CifarDenseNet([6, 12, 24, 16]),
    ("ps-kd", "resnet18"): lambda: CifarResNet(PreActBasic, [2, 2, 2, 2]),
    ("ps-kd", "resnet34"): lambda: CifarResNet(PreActBasic, [3, 4, 6, 3]),
    ("ps-kd", "resnet50"): lambda: CifarResNet(PSKDBottleneck, [3, 4, 6, 3]),
    ("ps-kd", "densenet121"): lambda: CifarDenseNet([6, 12, 24, 16]),
}
RELEASED_CELLS = [(m, a) for m in art.TABLE2_METHODS for a in art.TABLE2_ARCHS] + [("baseline", "resnet152")]


def randomised(model: nn.Module, seed: int) -> nn.Module:
    """Random weights and BN statistics far from the defaults, so a swapped or skipped buffer changes the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5, generator=g)
                module.bias.uniform_(-0.3, 0.3, generator=g)
                module.running_mean.uniform_(-0.3, 0.3, generator=g)
                module.running_var.uniform_(0.5, 2.0, generator=g)
            elif isinstance(module, (nn.Conv2d, nn.Linear)):
                fan_in = module.weight[0].numel()
                module.weight.normal_(0, (1 / fan_in) ** 0.5, generator=g)
                if module.bias is not None:
                    module.bias.uniform_(-0.3, 0.3, generator=g)
    return model


def checked_method(code: str) -> str:
    """The one method per code whose checkpoints the forward test writes."""
    return next(m for m, c in TRAINED_BY.items() if c == code)


def test_every_released_cell_loads_into_a_network_checked_against_its_upstream_statement():
    assert art.FAMILY == TRAINED_BY
    assert {(TRAINED_BY[m], a) for m, a in RELEASED_CELLS} == set(UPSTREAM)
    for method, arch in RELEASED_CELLS:  # e.g. CD-300 loads as the baseline does, which the forward test checks
        assert art.network_for(method, arch) == art.network_for(checked_method(TRAINED_BY[method]), arch)


@pytest.mark.parametrize("code, arch", UPSTREAM)
def test_the_reader_runs_the_authors_network(tmp_path, code, arch):
    """A state dict of the upstream network loads strictly through the reader (every key and shape checked) and
    gives the upstream network's logits, in float64 and eval mode."""
    method = checked_method(code)
    upstream = randomised(UPSTREAM[(code, arch)](), seed=0).eval()
    torch.save(upstream.state_dict(), tmp_path / "run1.pth")
    ours = art.load_released_model(tmp_path / "run1.pth", method, arch).double()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        expected, got = upstream.double()(x), ours(x)
    assert expected.std() > 0.1  # logits that differ between images and classes, not a constant
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9 * expected.abs().max().item())


@pytest.mark.parametrize("wrap", [lambda s: {"net": s, "optimizer": {}, "epoch": 3},
                                  lambda s: {"state_dict": {f"module.{k}": v for k, v in s.items()}},
                                  lambda s: {"model": s}])
def test_nested_and_data_parallel_checkpoints_load(tmp_path, monkeypatch, wrap):
    monkeypatch.setattr(art, "WIDTH", SMALL)
    model, state = released_state("ps-kd", "resnet18")
    torch.save(wrap(state), tmp_path / "c.pth")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(art.load_released_model(tmp_path / "c.pth", "ps-kd", "resnet18")(x), model(x))


class NotAWeight:
    pass


def _write(path, payload):
    torch.save(payload, path)
    return path


BAD_CHECKPOINTS = {
    "a key missing": (lambda s, p: _write(p, {k: v for k, v in s.items() if k != "layer2.0.conv1.weight"}),
                      "key 'layer2.0.conv1.weight' is missing"),
    "another code's network": (lambda s, p: _write(p, released_state("baseline", "resnet18")[1]),
                               "key 'conv1.weight' is missing and key 'conv1.0.weight' is not one this network has"),
    "another class count": (lambda s, p: _write(p, {**s, "linear.weight": torch.zeros(10, s["linear.weight"].shape[1]),
                                                    "linear.bias": torch.zeros(10)}),
                            "key 'linear.weight' is (10, 64)"),
    "truncated": (lambda s, p: (_write(p, s), p.write_bytes(p.read_bytes()[:1000]))[0], "cannot read"),
    "Python objects": (lambda s, p: _write(p, {"net": NotAWeight()}), "holds Python objects"),
    "not a state dict": (lambda s, p: _write(p, {"acc": torch.tensor(1.0), "epoch": 3}), "is not a state dict"),
    "missing file": (lambda s, p: p, "is missing; the released folder is incomplete"),
}


@pytest.mark.parametrize("case", BAD_CHECKPOINTS)
def test_a_damaged_or_foreign_checkpoint_is_a_named_error(tmp_path, monkeypatch, record_fault, case):
    monkeypatch.setattr(art, "WIDTH", SMALL)
    _, state = released_state("cs-kd", "resnet18")
    make, message = BAD_CHECKPOINTS[case]
    path = make(state, tmp_path / "run1.pth")
    with pytest.raises(art.ReleasedArtifactError) as err:
        art.load_released_model(path, "cs-kd", "resnet18")
    assert message in str(err.value) and "run1.pth" in str(err.value)
    record_fault(f"released: checkpoint {case}", str(err.value), None)


# ------------------------------------------------------------------ Omega

def planted_omega(models: int, images: int, features: int, seed: int = 0) -> np.ndarray:
    """0/1 (M, N, T): each model uses a random subset of features, each on a random subset of images."""
    rng = np.random.default_rng(seed)
    uses = rng.random((models, 1, features)) < 0.4
    return ((rng.random((models, images, features)) < 0.3) & uses).astype(np.int32)


def direct_statistics(omega: np.ndarray, models: range) -> dict:
    """|F|, E[F], features per image by plain loops over features and images."""
    T, N = omega.shape[2], omega.shape[1]
    frequency = [sum(any(omega[m, n, t] for m in models) for n in range(N)) for t in range(T)]
    used = [f for f in frequency if f > 0]
    per_image = [sum(any(omega[m, n, t] for m in models) for t in range(T)) for n in range(N)]
    return {"n_features": len(used), "mean_frequency": sum(used) / len(used), "per_image": sum(per_image) / N}


def test_omega_statistics_match_a_direct_count(tmp_path):
    kd, cd = planted_omega(60, 40, 12), planted_omega(40, 40, 9, seed=1)
    torch.save(torch.from_numpy(kd), tmp_path / art.OMEGA_FILES["kd"][0])
    torch.save(torch.from_numpy(cd), tmp_path / art.OMEGA_FILES["cd"][0])
    for which, omega in (("kd", kd), ("cd", cd)):
        result = analysis.feature_analysis(tmp_path, which, n_images=40)
        for name, models in art.OMEGA_FILES[which][1].items():
            group, expected = result.groups[name], direct_statistics(omega, models)
            assert group.n_features == expected["n_features"], (which, name)
            assert group.mean_frequency == pytest.approx(expected["mean_frequency"])
            assert group.mean_features_per_image == pytest.approx(expected["per_image"])
    table = analysis.feature_analysis(tmp_path, "kd", n_images=40).summary_table()
    assert "features shared by all groups" in set(table["statistic"])


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux's /proc to see memory maps")
def test_omega_is_memory_mapped_not_copied(tmp_path):
    """The tensor's memory is a mapping of the file itself (Linux: /proc/self/maps), not a copy in RAM."""
    path = tmp_path / art.OMEGA_FILES["kd"][0]
    torch.save(torch.from_numpy(planted_omega(60, 40, 12)), path)
    omega = art.load_omega(tmp_path, "kd", n_images=40)  # kept alive: freeing it unmaps the file
    address = omega.tensor.data_ptr()
    mapped = [line.split(maxsplit=5)[-1].strip() for line in Path("/proc/self/maps").read_text().splitlines()
              if int(line.split("-")[0], 16) <= address < int(line.split()[0].split("-")[1], 16)]
    assert mapped == [str(path)]


BAD_OMEGAS = {
    "float values": (lambda: torch.rand(60, 40, 5), "is a torch.float32 tensor"),
    "another model count": (lambda: torch.zeros(50, 40, 5, dtype=torch.int32), "shape (60, 40, T)"),
    "a dict": (lambda: {"omega": torch.zeros(60, 40, 5, dtype=torch.int32)}, "holds a dict"),
    "counts, not 0/1": (lambda: torch.full((60, 40, 5), 2, dtype=torch.int32), "values other than 0 and 1"),
}


@pytest.mark.parametrize("case", BAD_OMEGAS)
def test_a_foreign_omega_is_a_named_error(tmp_path, record_fault, case):
    make, message = BAD_OMEGAS[case]
    path = tmp_path / art.OMEGA_FILES["kd"][0]
    torch.save(make(), path)
    with pytest.raises(art.ReleasedArtifactError) as err:
        analysis.feature_analysis(tmp_path, "kd", n_images=40)
    assert message in str(err.value) and path.name in str(err.value)
    record_fault(f"released: Omega {case}", str(err.value), None)


# ------------------------------------------------------------------ the command

@pytest.fixture
def released_folder(tmp_path, monkeypatch):
    """A released folder in the layout (narrow networks, 3 runs of four methods on ResNet-18, the Section 4.1
    teacher, both Omega files) and a CIFAR-100 test split of 100 images."""
    monkeypatch.setattr(art, "WIDTH", SMALL)
    monkeypatch.setattr(art, "TEST_IMAGES", 40)
    monkeypatch.setattr(readers, "CIFAR_COUNTS", {"train": 500, "test": 100})
    split = make_cifar100(tmp_path / "data", np.random.default_rng(0)) / "test"
    test = pickle.loads(split.read_bytes())
    test["fine_labels"] = list(range(100))  # every class once: M has a row for each
    split.write_bytes(pickle.dumps(test))
    folder = tmp_path / "released"
    for method in ("baseline", "cs-kd", "ps-kd", "cd-200", "cd-300"):  # claim 5 needs CD-200 against CS-KD
        for run in art.RUNS:
            path = art.table2_checkpoint(folder, method, "resnet18", run)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(released_state(method, "resnet18", seed=run)[1], path)
    teacher = folder / art.SECTION_4_1_TEACHER
    teacher.parent.mkdir(parents=True)
    torch.save(released_state("baseline", "resnet152")[1], teacher)
    torch.save(torch.from_numpy(planted_omega(60, 40, 12)), folder / art.OMEGA_FILES["kd"][0])
    torch.save(torch.from_numpy(planted_omega(40, 40, 9, seed=1)), folder / art.OMEGA_FILES["cd"][0])
    return folder, tmp_path / "data"


def test_the_command_writes_table2_section_4_1_features_and_claims(released_folder, isolated_outputs):
    from cdlib.__main__ import main
    folder, data_root = released_folder
    assert main(["released", "--folder", str(folder), "--data-root", str(data_root), "--device", "cpu",
                 "--num-shuffles", "5"]) == 0
    out = isolated_outputs / "released"
    runs = __import__("pandas").read_csv(out / "table2_runs.csv")
    assert len(runs) == 30 and set(runs["network"]) == {"resnet18", "preact_resnet18"}
    # Every checkpoint under both normalisations, each equal to a direct evaluation of the network the file was
    # written from: CS-KD's own statistics, and pytorch-cifar100's as the authors' evaluate_models.py uses.
    model, _ = released_state("cs-kd", "resnet18", seed=2)
    images, labels = analysis.test_set(data_root)
    nll = {}
    for normalisation, statistics in (("trained", "cs-kd"), ("evaluate_models.py", "pytorch-cifar100")):
        direct = analysis.evaluation(analysis.logits_of(model, images, statistics, "cpu"), labels)
        row = runs[(runs["method"] == "cs-kd") & (runs["run"] == "run2") & (runs["normalisation"] == normalisation)]
        assert len(row) == 1 and row.iloc[0]["statistics"] == statistics
        row = row.iloc[0]
        assert row["top1"] == pytest.approx(direct["top1"]) and row["nll"] == pytest.approx(direct["nll"])
        nll[normalisation] = direct["nll"]
    assert nll["trained"] != pytest.approx(nll["evaluate_models.py"])  # the two inputs really differ
    baseline = runs[runs["method"] == "baseline"].groupby("normalisation")["nll"].apply(list)
    assert baseline["trained"] == baseline["evaluate_models.py"]  # pytorch-cifar100's own statistics either way
    section = (out / "REPORT_SECTION.md").read_text()
    assert "From the authors' released artifacts" in section and "test set (the released code's leak)" in section
    claims = {c["number"]: c for c in json.loads((out / "claims.json").read_text())}
    assert set(claims) == {1, 2, 5} and "features: |F| baseline" in claims[5]["ours"]
    assert (out / "section_4_1.md").is_file() and (out / "features_kd.md").is_file()
    assert {p.stem for p in out.glob("fig*.png")} == {"fig1a_feature_frequency", "fig1b_common_features",
                                                      "fig3a_feature_frequency", "fig3b_features_per_image"}
    from cdlib.experiments import report
    from cdlib.experiments.profiles import get_profile
    text = report.render(get_profile("smoke"), [], isolated_outputs)
    assert "## From the authors' released artifacts" in text and "### Table 2, re-evaluated" in text


def test_table2_reports_both_normalisations_with_the_population_std_the_paper_prints():
    import pandas as pd
    normalisations = (("trained", "cs-kd", 0.0), ("evaluate_models.py", "pytorch-cifar100", -10.0))
    long = pd.DataFrame([{"method": "cs-kd", "arch": "resnet18", "run": f"run{r}", "normalisation": n, "statistics": s,
                          "top1": top1 + shift, "top5": 90.0, "nll": 1.0, "ece": 5.0}
                         for r, top1 in zip(art.RUNS, (75.0, 76.0, 77.0)) for n, s, shift in normalisations])
    row = analysis.table2_frame(long).iloc[0]
    assert row["runs"] == 3 and row["trained stats"] == "cs-kd"
    assert row["top-1, trained stats (mean ± pop. std)"] == "76.00 ± 0.82"  # sqrt(2/3); the sample std is 1.00
    assert row["top-1, evaluate_models.py stats (mean ± pop. std)"] == "66.00 ± 0.82"
    assert row["paper top-1"] == 76.38
    assert row["trained - paper"] == pytest.approx(-0.38) and row["evaluate_models.py - paper"] == pytest.approx(-10.38)


def test_without_released_artifacts_the_report_says_how_to_get_them(isolated_outputs):
    from cdlib.experiments import report
    from cdlib.experiments.profiles import get_profile
    text = report.render(get_profile("smoke"), [], isolated_outputs)
    assert "Not computed yet" in text and "python -m cdlib released --folder PATH" in text


def test_a_missing_folder_says_how_to_get_it(tmp_path, capsys):
    from cdlib.__main__ import main
    assert main(["released", "--folder", str(tmp_path / "nope")]) == 2
    assert "snapshot_download" in capsys.readouterr().err


def test_notebooks_03_to_05_show_the_released_numbers_or_say_how_to_get_them(released_folder, capsys):
    from cdlib.experiments import pipeline
    for notebook in pipeline.notebooks(["03", "04", "05"]):
        cells = json.loads(notebook.read_text())["cells"]
        parameters = "".join(next(c for c in cells if "parameters" in c["metadata"].get("tags", []))["source"])
        assert "released = None" in parameters, notebook.name
        assert any("released_analysis.notebook_part(" in "".join(c["source"]) for c in cells), notebook.name
    assert analysis.notebook_part("table2", None) is None
    assert "snapshot_download" in capsys.readouterr().out
    folder, data_root = released_folder
    table = analysis.notebook_part("table2", folder, data_root, "cpu")
    assert list(table["method"]) == ["baseline", "cs-kd", "ps-kd", "cd-200", "cd-300"] and set(table["runs"]) == {3}
    assert "features |F|" in set(analysis.notebook_part("cd-tensor", folder)["statistic"])
