"""The CUDA dry run (tests/cuda_dry_run.py): ``fit`` on fake CUDA tensors for every objective, CD source and
target, eager and compiled, must report nothing; and injected bugs of each kind must be reported at their line.

All selected scenarios run once, in one harness process that forks one process per scenario.
"""
from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cuda_dry_run as dry
from cdlib.core import objectives, train

pytestmark = pytest.mark.skipif(torch.version.cuda is None, reason="this torch has no CUDA build: FakeTensorMode "
                                "cannot make CUDA tensors, so the CUDA dry run cannot run")

CLEAN = [name for name in dry.SCENARIOS if name not in dry.BUGS]
# Scenarios the current loop fails for a known defect: name -> reason (none at present).
KNOWN_DEFECTS: dict[str, str] = {}


def where(function, snippet: str) -> str:
    """``file:line`` of the line of ``function`` that holds ``snippet``."""
    lines, start = inspect.getsourcelines(function)
    line = start + next(i for i, text in enumerate(lines) if snippet in text)
    return f"{Path(inspect.getsourcefile(function)).resolve().relative_to(dry.REPO)}:{line}"


@pytest.fixture(scope="module")
def reports(request) -> dict:
    """Reports of the scenarios this session selected, from one run of the harness."""
    names = sorted({item.callspec.params["scenario"] for item in request.session.items
                    if getattr(item, "module", None) is request.module and hasattr(item, "callspec")})
    done = subprocess.run([sys.executable, str(Path(dry.__file__)), *names], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, f"the dry-run harness failed:\n{done.stderr[-3000:]}"
    return json.loads(done.stdout.splitlines()[-1])


def show(findings) -> str:
    return "\n".join(f"  {f['kind']} at {f['where']} (x{f.get('count', 1)}): {f['message']}" for f in findings)


@pytest.mark.parametrize("scenario", [
    pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=KNOWN_DEFECTS[name])) if name in KNOWN_DEFECTS
    else name for name in CLEAN])
def test_cuda_dry_run_is_clean(scenario, reports):
    report = reports[scenario]
    assert not report["findings"], f"{scenario} on fake CUDA:\n{show(report['findings'])}"
    assert report["steps"] == dry.STEPS, f"{scenario} did not train its {dry.STEPS} steps: {report}"
    if scenario.endswith("+compile"):  # the CUDA-graph protocol was exercised: one mark per optimisation step
        assert report["compiled_calls"] >= report["steps"] and report["marks"] == report["steps"], report


# scenario -> the findings it must report (among others): kind, and the function and text of the offending line
TEETH = {
    "bug-full-without-device": [("device-mix", dry.bug_loss_full_without_device, "torch.full(")],
    "bug-cpu-generator": [("generator", dry.bug_augment_cpu_generator, "generator=torch.Generator()")],
    "bug-syncs": [("sync", dry.bug_loss_syncs, ".item()"), ("sync", dry.bug_loss_syncs, "bool("),
                  ("sync", dry.bug_loss_syncs, "bincount(")],
    "bug-cpu-index": [("cpu-index", dry.bug_loss_cpu_index, "class_weights[batch.labels]")],
    # bf16 logits (the head left in autocast): the loss without .float(), and the loop's argmax for the counts
    "bug-bf16": [("bf16", dry.bug_loss_bf16, "cross_entropy("), ("bf16", train.fit, ".argmax(1)")],
    # a second cudagraph_mark_step_begin between CS-KD's two compiled forwards: the partners' replay
    # overwrites the anchors' logits, which the loss then reads
    "bug-double-mark": [("cudagraph", objectives.cross_entropy, "F.cross_entropy(")],
}


def test_every_injected_bug_has_a_teeth_test():
    assert set(TEETH) == set(dry.BUGS)


@pytest.mark.parametrize("scenario", sorted(TEETH))
def test_cuda_dry_run_reports_injected_bugs(scenario, reports):
    findings = reports[scenario]["findings"]
    found = {(f["kind"], f["where"]) for f in findings}
    missing = [(kind, where(function, text)) for kind, function, text in TEETH[scenario]
               if (kind, where(function, text)) not in found]
    assert not missing, f"{scenario}: not reported {missing}; reported:\n{show(findings)}"
    if scenario == "bug-double-mark":  # the message names the second mark, the injected line
        message = next(f["message"] for f in findings if f["kind"] == "cudagraph")
        assert where(dry.bug_partners_mark_step, "cudagraph_mark_step_begin()") in message
