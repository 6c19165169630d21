"""N networks of identical structure as one network: the ``fused`` strategy's layers.

Every convolution of the N members becomes one convolution with ``groups=N`` (member
``i`` owns channel block ``i`` of every layer), every BatchNorm one BatchNorm over N*C
channels (BN is per channel, so this *is* per-member BN, in train and eval mode), every
linear head one batched matmul (``GroupedLinear``), and DenseNet's concatenation
interleaves per member (``GroupedDenseLayer``). The input is each member's own batch,
stacked along channels; the output is (B, N, classes).

Every fused tensor is the concatenation of the members' tensors along dim 0, so
state-dict keys are those of ``build_model`` and member ``i``'s weights are chunk ``i``
of every tensor (``fuse`` / ``member_state``). SGD (momentum and weight decay are
elementwise) over the fused parameters equals N separate SGDs, and the gradient of the
sum of the members' losses with respect to member ``i``'s weights is that of member
``i``'s loss, so the members train as if apart, to float rounding.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn as nn

from cdlib.core.models import DenseLayer


class GroupedLinear(nn.Module):
    """N linear heads as one batched matmul: (B, N*D) -> (B, N, K); weight (N*K, D), bias (N*K)."""

    def __init__(self, groups: int, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.groups, self.in_features, self.out_features = groups, in_features, out_features
        self.weight = nn.Parameter(torch.empty(groups * out_features, in_features))
        if bias:
            self.bias = nn.Parameter(torch.empty(groups * out_features))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, D, K = self.groups, self.in_features, self.out_features
        x = x.reshape(x.shape[0], N, D).transpose(0, 1)          # (N, B, D)
        w = self.weight.view(N, K, D).transpose(1, 2)             # (N, D, K)
        out = torch.bmm(x, w) if self.bias is None else torch.baddbmm(self.bias.view(N, 1, K), x, w)
        return out.transpose(0, 1)                                # (B, N, K)


class GroupedDenseLayer(nn.Module):
    """DenseLayer of N members: concatenates input and new maps member by member."""

    def __init__(self, body: nn.Module, groups: int):
        super().__init__()
        self.body, self.groups = body, groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        B, _, H, W = x.shape
        N = self.groups
        if x.is_contiguous() and y.is_contiguous():
            return torch.cat([x.view(B, N, -1, H, W), y.view(B, N, -1, H, W)], 2).view(B, -1, H, W)
        # channels_last: concatenate in NHWC so the result stays channels_last.
        xl = x.permute(0, 2, 3, 1).reshape(B, H, W, N, -1)
        yl = y.permute(0, 2, 3, 1).reshape(B, H, W, N, -1)
        return torch.cat([xl, yl], 4).view(B, H, W, -1).permute(0, 3, 1, 2)


def _fuse_children(module: nn.Module, n: int) -> None:
    """Replace (in place) every layer below ``module`` by its n-member version, with meta tensors."""
    for name, child in list(module.named_children()):
        _fuse_children(child, n)
        if isinstance(child, nn.Conv2d):
            with torch.device("meta"):
                new = nn.Conv2d(child.in_channels * n, child.out_channels * n, child.kernel_size, child.stride,
                                child.padding, child.dilation, child.groups * n, child.bias is not None,
                                child.padding_mode)
        elif isinstance(child, nn.BatchNorm2d):
            with torch.device("meta"):
                new = nn.BatchNorm2d(child.num_features * n, child.eps, child.momentum, child.affine,
                                     child.track_running_stats)
        elif isinstance(child, nn.Linear):
            with torch.device("meta"):
                new = GroupedLinear(n, child.in_features, child.out_features, child.bias is not None)
        elif isinstance(child, DenseLayer):
            new = GroupedDenseLayer(child.body, n)
        elif any(True for _ in child.parameters(recurse=False)) or any(True for _ in child.buffers(recurse=False)):
            raise TypeError(f"cannot fuse layer {name!r} of type {type(child).__name__}: fusing knows "
                            f"Conv2d, BatchNorm2d, Linear and DenseLayer (add a fused version here)")
        else:
            continue
        setattr(module, name, new)


def fuse(models: Sequence[nn.Module]) -> nn.Module:
    """One network computing ``len(models)`` networks of identical structure side by side.

    Input (B, N*3, H, W): member i's images in channels 3i..3i+2; output (B, N, classes).
    Same state-dict keys as the members; every tensor is the members' concatenated along dim 0.
    """
    models = list(models)
    n = len(models)
    states = [m.state_dict() for m in models]
    keys = list(states[0])
    if any(list(s) != keys for s in states):
        raise ValueError("cannot fuse networks of different structure")
    fused = copy.deepcopy(models[0])
    _fuse_children(fused, n)
    state = {k: torch.cat([s[k] for s in states]) if states[0][k].dim() else states[0][k].clone() for k in keys}
    fused.load_state_dict(state, assign=True)
    fused.train(models[0].training)
    return fused


def stack_members(xs: Sequence[torch.Tensor], channels_last: bool = False) -> torch.Tensor:
    """N batches (B, c, H, W) -> the fused network's input (B, N*c, H, W), member i in channel block i."""
    shape = xs[0].shape
    if any(x.shape != shape for x in xs):
        raise ValueError(f"members passed batches of different shapes: {[tuple(x.shape) for x in xs]}")
    B, c, H, W = shape
    if channels_last:  # built in NHWC directly: one copy
        return torch.stack([x.permute(0, 2, 3, 1) for x in xs], 3).view(B, H, W, -1).permute(0, 3, 1, 2)
    return torch.stack(list(xs), 1).view(B, -1, H, W)


def member_slice(tensor: torch.Tensor, n: int, i: int) -> torch.Tensor:
    """Member i's part of a fused tensor (a copy, so saving it does not save the whole group)."""
    return tensor.chunk(n)[i].clone() if tensor.dim() else tensor.clone()


def member_state(fused: nn.Module, n: int, i: int) -> dict:
    """Member i's ``state_dict`` (the keys and shapes of ``build_model``'s) from a fused network."""
    return {k: member_slice(v, n, i) for k, v in fused.state_dict().items()}


def fuse_optimizer_states(member_states: list[dict]) -> dict:
    """One SGD state dict for the fused parameters from the members' (same param order)."""
    state = {}
    for pid in member_states[0]["state"]:
        entries = [s["state"][pid] for s in member_states]
        state[pid] = {k: torch.cat([e[k] for e in entries]) if torch.is_tensor(v) and v.dim() else v
                      for k, v in entries[0].items()}
    return {"state": state, "param_groups": copy.deepcopy(member_states[0]["param_groups"])}


def member_optimizer_state(fused_state: dict, n: int, i: int) -> dict:
    """Member i's SGD state dict, in the format of its own optimiser's, from the fused one's."""
    return {"state": {pid: {k: member_slice(v, n, i) if torch.is_tensor(v) and v.dim() else v
                            for k, v in s.items()} for pid, s in fused_state["state"].items()},
            "param_groups": copy.deepcopy(fused_state["param_groups"])}
