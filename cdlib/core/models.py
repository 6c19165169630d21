"""CIFAR networks: post-activation ResNet-18/34/50/101/152 and DenseNet-121, and the
pre-activation variants the released CS-KD and PS-KD checkpoints need.

The post-activation ones follow the widely used ``pytorch-cifar100`` definitions (the paper's
Section 2), written from the description, not copied. CIFAR images are 32x32, so the stem is a
single 3x3 stride-1 conv with no max-pool; the last stage is then 4x4.

``preact_resnet18/34/50`` and ``cskd_densenet121`` are the networks of the CS-KD and PS-KD
code (the released Table 2 checkpoints of those rows; PS-KD's ResNet-50 is post-activation and
is ``resnet50``). They differ from the others in their forward pass, not only in their weights:
each block computes a = ReLU(BN(x)) first and feeds a to its convs and to its shortcut (the
identity then carries a, not x; a projection is a conv alone), nothing follows the sum, and no
BN follows the last stage; their DenseNet puts the new maps before the old ones and has a ReLU
in its transitions. ``tests/test_released.py`` checks every network a released checkpoint
loads into against its own statement of the upstream code's forward pass.

Every network exposes the same three views, because the analysis (Interaction
Tensor, PCA of features) reads activations as well as logits:

    feature_map(x) -> (B, D, h, w)  last-stage map before pooling
    features(x)    -> (B, D)        global-average-pooled penultimate vector
    forward(x)     -> (B, classes)  == classifier(features(x)), in float32 under autocast too

plus ``feature_dim`` (D) and the linear head ``classifier``.

``width`` multiplies every channel count (rounded, at least 1), so tests and CPU
smoke runs can use tiny versions; width 1 gives the paper's parameter counts.
Weights use PyTorch's default initialisation (kaiming-uniform for conv/linear,
BN weight 1 / bias 0), as the reference code does.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def float32_head(classifier: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """The linear head in float32 even under autocast: logits feed argmax confusions (CD),
    stored predictions (PS-KD) and near-tie decisions, which bf16 rounding would change.
    It costs one small matmul per batch."""
    device_type = features.device.type
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            return classifier(features.float())
    return classifier(features)


def _scale(channels: int, width: float) -> int:
    return max(1, round(channels * width))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus shortcut, then ReLU (post-activation)."""

    expansion = 1

    def __init__(self, in_ch: int, ch: int, stride: int):
        super().__init__()
        out_ch = ch * self.expansion
        self.residual = nn.Sequential(
            nn.Conv2d(in_ch, ch, 3, stride, 1, bias=False),
            nn.BatchNorm2d(ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(ch, out_ch, 3, 1, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        )
        self.shortcut = _shortcut(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.residual(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1-BN-ReLU-3x3(stride)-BN-ReLU-1x1(x4)-BN, plus shortcut, then ReLU."""

    expansion = 4

    def __init__(self, in_ch: int, ch: int, stride: int):
        super().__init__()
        out_ch = ch * self.expansion
        self.residual = nn.Sequential(
            nn.Conv2d(in_ch, ch, 1, bias=False),
            nn.BatchNorm2d(ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(ch, ch, 3, stride, 1, bias=False),
            nn.BatchNorm2d(ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(ch, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        )
        self.shortcut = _shortcut(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.residual(x) + self.shortcut(x))


def _shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Module:
    # Identity when shapes match; otherwise a 1x1 projection (the "option B" shortcut).
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))


class ResNet(nn.Module):
    def __init__(self, block: type[nn.Module], depths: list[int], num_classes: int, width: float = 1.0):
        super().__init__()
        stem_ch = _scale(64, width)
        self.stem = nn.Sequential(
            nn.Conv2d(3, stem_ch, 3, 1, 1, bias=False),
            nn.BatchNorm2d(stem_ch),
            nn.ReLU(inplace=True),
        )
        stages, in_ch = [], stem_ch
        for base, depth, stride in zip((64, 128, 256, 512), depths, (1, 2, 2, 2)):
            ch = _scale(base, width)
            blocks = []
            for s in [stride] + [1] * (depth - 1):  # only the first block of a stage downsamples
                blocks.append(block(in_ch, ch, s))
                in_ch = ch * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.feature_dim = in_ch
        self.classifier = nn.Linear(in_ch, num_classes)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_map(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return float32_head(self.classifier, self.features(x))


class PreActBlock(nn.Module):
    """a = ReLU(BN(x)); conv3x3-BN-ReLU-conv3x3 of a, plus shortcut(a); no ReLU after the sum (pre-activation)."""

    expansion = 1

    def __init__(self, in_ch: int, ch: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, ch, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, 1, 1, bias=False)
        self.shortcut = _preact_shortcut(in_ch, ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn1(x))
        return self.conv2(F.relu(self.bn2(self.conv1(a)))) + self.shortcut(a)


class PreActBottleneck(nn.Module):
    """a = ReLU(BN(x)); conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1(x4) of a, plus shortcut(a)."""

    expansion = 4

    def __init__(self, in_ch: int, ch: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, ch, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(ch)
        self.conv3 = nn.Conv2d(ch, ch * 4, 1, bias=False)
        self.shortcut = _preact_shortcut(in_ch, ch * 4, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(a))))
        return self.conv3(F.relu(self.bn3(out))) + self.shortcut(a)


def _preact_shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Module:
    # Applied to the block's pre-activated input a = relu(bn1(x)), never to x itself, whether it is the identity or
    # the projection: that is the CS-KD / PS-KD blocks' forward, and their checkpoints only work with it.
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False))


class DenseLayer(nn.Module):
    """BN-ReLU-conv1x1(4k)-BN-ReLU-conv3x3(k); its k new maps are concatenated to the input
    (after it, or with ``new_first`` before it)."""

    def __init__(self, in_ch: int, growth: int, new_first: bool = False):
        super().__init__()
        self.new_first = new_first
        self.body = nn.Sequential(
            nn.BatchNorm2d(in_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_ch, 4 * growth, 1, bias=False),
            nn.BatchNorm2d(4 * growth),
            nn.ReLU(inplace=True),
            nn.Conv2d(4 * growth, growth, 3, 1, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.body(x), x] if self.new_first else [x, self.body(x)], dim=1)


class DenseNet(nn.Module):
    """DenseNet-BC for CIFAR as in ``pytorch-cifar100``.

    Stem: one 3x3 conv to 2k channels, no pooling. Between dense blocks a
    transition BN-conv1x1 (compression 0.5, channels floored) then 2x2 avg-pool;
    like pytorch-cifar100 (and unlike torchvision's DenseNet) the transition has
    no ReLU. After the last block: BN + ReLU, global average pool, linear. ``cskd=True`` is the
    CS-KD/PS-KD code's DenseNet: new maps before the old ones, and BN-ReLU-conv transitions.
    """

    def __init__(self, depths: list[int], num_classes: int, width: float = 1.0, growth: int = 32,
                 cskd: bool = False):
        super().__init__()
        growth = _scale(growth, width)
        ch = 2 * growth
        layers: list[nn.Module] = [nn.Conv2d(3, ch, 3, 1, 1, bias=False)]
        for i, depth in enumerate(depths):
            for _ in range(depth):
                layers.append(DenseLayer(ch, growth, new_first=cskd))
                ch += growth
            if i < len(depths) - 1:
                out_ch = int(0.5 * ch)
                layers += [nn.BatchNorm2d(ch), *[nn.ReLU(inplace=True)] * cskd, nn.Conv2d(ch, out_ch, 1, bias=False),
                           nn.AvgPool2d(2)]
                ch = out_ch
        layers += [nn.BatchNorm2d(ch), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)
        self.feature_dim = ch
        self.classifier = nn.Linear(ch, num_classes)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_map(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return float32_head(self.classifier, self.features(x))


_BUILDERS = {
    "resnet18": lambda n, w: ResNet(BasicBlock, [2, 2, 2, 2], n, w),
    "resnet34": lambda n, w: ResNet(BasicBlock, [3, 4, 6, 3], n, w),
    "resnet50": lambda n, w: ResNet(Bottleneck, [3, 4, 6, 3], n, w),
    "resnet101": lambda n, w: ResNet(Bottleneck, [3, 4, 23, 3], n, w),
    "resnet152": lambda n, w: ResNet(Bottleneck, [3, 8, 36, 3], n, w),
    "densenet121": lambda n, w: DenseNet([6, 12, 24, 16], n, w),
    # The CS-KD/PS-KD CIFAR ResNet is ResNet's conv-BN-ReLU stem and stages with pre-activation blocks
    # (so no BN follows the last stage).
    "preact_resnet18": lambda n, w: ResNet(PreActBlock, [2, 2, 2, 2], n, w),
    "preact_resnet34": lambda n, w: ResNet(PreActBlock, [3, 4, 6, 3], n, w),
    "preact_resnet50": lambda n, w: ResNet(PreActBottleneck, [3, 4, 6, 3], n, w),
    "cskd_densenet121": lambda n, w: DenseNet([6, 12, 24, 16], n, w, cskd=True),
}
ARCHITECTURES = tuple(_BUILDERS)


def build_model(arch: str, num_classes: int, width: float = 1.0) -> nn.Module:
    """A freshly initialised network; ``arch`` is one of ``ARCHITECTURES``."""
    if arch not in _BUILDERS:
        raise ValueError(f"unknown arch {arch!r}; known: {', '.join(ARCHITECTURES)}")
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    return _BUILDERS[arch](num_classes, width)
