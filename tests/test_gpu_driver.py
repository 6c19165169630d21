"""A machine with an NVIDIA GPU that this PyTorch cannot use (driver too old for its CUDA build, or a
CPU-only build) is named loudly instead of quietly running on the CPU. There is no GPU here: the
driver and torch's view of CUDA are monkeypatched."""
from __future__ import annotations

import subprocess

import pytest
import torch

from cdlib.__main__ import main as cdlib_main
from cdlib.core import util
from cdlib.core.util import GPUUnusableError, GPUUnusableWarning, resolve_device
from cdlib.errors import UserError
from cdlib.experiments.profiles import get_profile


@pytest.fixture
def old_driver(monkeypatch):
    """An NVIDIA driver 535 (CUDA 12 era) under a torch built for CUDA 13.0, which therefore sees no GPU."""
    monkeypatch.setattr(util, "nvidia_driver", lambda: "535.104.05")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_profile_auto_stops_and_names_the_driver_the_cuda_build_and_the_fix(old_driver, capsys):
    with pytest.raises(GPUUnusableError) as err:
        get_profile("auto")
    message = str(err.value)
    assert isinstance(err.value, UserError)
    for part in ("driver 535.104.05", "CUDA 13.0", "needs driver 580 or newer", "--profile smoke or cpu"):
        assert part in message, part
    assert capsys.readouterr().out == ""  # nothing announced: no profile was chosen


def test_the_command_line_prints_it_as_one_line_and_exits_2(old_driver, capsys):
    assert cdlib_main(["plan", "--notebook", "01"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "driver 535.104.05" in err


@pytest.mark.parametrize("name", ["smoke", "cpu"])
def test_an_explicit_cpu_profile_or_device_is_not_stopped(old_driver, name):
    assert get_profile(name, announce=False).name == name
    assert get_profile("auto", announce=False, device="cpu").name == "smoke"
    assert resolve_device("cpu") == torch.device("cpu")


def test_device_auto_falls_back_to_the_cpu_with_a_warning_and_cuda_is_refused(old_driver):
    with pytest.warns(GPUUnusableWarning, match="driver 535.104.05"):
        assert resolve_device(None) == torch.device("cpu")
    with pytest.raises(GPUUnusableError, match="cannot use device 'cuda:1'.*CUDA 13.0"):
        resolve_device("cuda:1")


def test_a_cpu_only_torch_build_is_named(old_driver, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(GPUUnusableError, match="CPU-only build.*install a CUDA build"):
        get_profile("auto")


@pytest.mark.parametrize("visible", ["", "-1"])
def test_gpus_hidden_on_purpose_are_not_a_problem(old_driver, monkeypatch, visible):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert util.unusable_gpu() is None
    assert get_profile("auto", announce=False).name == "smoke"


def test_without_an_nvidia_driver_nothing_changes(monkeypatch, recwarn):
    monkeypatch.setattr(util, "nvidia_driver", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert util.unusable_gpu() is None
    assert get_profile("auto", announce=False).name == "smoke"
    assert resolve_device("auto") == torch.device("cpu")
    assert not [w for w in recwarn if issubclass(w.category, GPUUnusableWarning)]


def test_the_driver_version_is_read_from_the_kernel_module_else_from_nvidia_smi(monkeypatch, tmp_path):
    module = ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  550.54.14  Release Build  "
              "(dvs-builder@U16)  Thu Feb 22 01:25:25 UTC 2024\nGCC version:  gcc version 12.2.0\n")
    proc = tmp_path / "version"
    monkeypatch.setattr(util, "NVIDIA_KERNEL_MODULE", proc)
    monkeypatch.setattr(util.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    answers = {"stdout": "580.65.06\n580.65.06\n"}
    monkeypatch.setattr(util.subprocess, "run",
                        lambda *a, **k: subprocess.CompletedProcess(a, 0, stdout=answers["stdout"], stderr=""))

    def read():
        util.nvidia_driver.cache_clear()
        return util.nvidia_driver()

    try:
        proc.write_text(module)
        assert read() == "550.54.14"
        proc.unlink()
        assert read() == "580.65.06"
        answers["stdout"] = "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n"
        assert read() is None
        monkeypatch.setattr(util.shutil, "which", lambda name: None)
        assert read() is None
    finally:
        util.nvidia_driver.cache_clear()
