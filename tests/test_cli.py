"""Every command line answers a user's mistake with one line on stderr and exit code 2.

A traceback is for bugs: a wrong name, a missing or damaged file, a typo in a config or a
plan gets one line that names the cause and what to do (``cdlib.errors``)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from cdlib.__main__ import main
from cdlib.core.config import TrainConfig

TINY = TrainConfig(name="tiny", dataset="synthetic", arch="resnet18", width=0.0625, epochs=1)


def _config_file(path, **changes):
    path.write_text(json.dumps({**TINY.to_dict(), **changes}))
    return path


def _text_file(path, text):
    path.write_text(text)
    return path


def _damaged_checkpoint(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "checkpoint.pt").write_bytes(b"PK\x03\x04 cut short")
    return [str(_config_file(tmp_path / "c.json")), str(folder)]


MISTAKES = [
    ("unknown command", lambda t: ["trian"], ["unknown command 'trian'", "train"]),
    ("pipeline: unknown profile", lambda t: ["pipeline", "--profile", "fast"], ["unknown profile 'fast'", "smoke"]),
    ("pipeline: unknown notebook", lambda t: ["pipeline", "--only", "09"], ["no notebook numbered ['09']", "01"]),
    ("plan: unknown profile", lambda t: ["plan", "--profile", "fast", "--all"], ["unknown profile 'fast'"]),
    ("plan: unknown notebook", lambda t: ["plan", "--notebook", "42"], ["no plan for notebook(s) ['42']"]),
    ("report: unknown profile", lambda t: ["report", "--profile", "fast"], ["unknown profile 'fast'"]),
    ("pipeline: misspelt profile key", lambda t: ["pipeline", "--profile", "smoke", "--set", "widht=0.5"],
     ["unknown profile key 'widht'", "width"]),
    ("results: profile file with a bad value", lambda t: ["results", "--profile", str(_text_file(
        t / "mine.toml", 'base = "cpu"\nepochs = "many"\n'))], ["profile key 'epochs' must be a whole number"]),
    ("executors: missing plan file", lambda t: ["executors", "run", str(t / "plan.json")],
     ["cannot read the plan file", "plan.json", "Check the path"]),
    ("executors: plan with a misspelt field", lambda t: ["executors", "run", str(_text_file(
        t / "plan.json", json.dumps([{"config": {**TINY.to_dict(), "learning_rate": 0.1}}])))],
     ["unknown config fields ['learning_rate']", "'lr'"]),
    ("executors: plan that is not JSON", lambda t: ["executors", "run", str(_text_file(t / "plan.json", "[{"))],
     ["is not valid JSON"]),
    ("train: missing config file", lambda t: ["train", str(t / "nope.json"), str(t / "run")],
     ["cannot read the config file", "nope.json"]),
    ("train: misspelt objective argument", lambda t: ["train", str(_config_file(
        t / "c.json", objective="ls", objective_args={"epsilon": 0.1})), str(t / "run")],
     ["'epsilon'", "it accepts (eps=0.1)"]),
    ("train: out-of-range value", lambda t: ["train", str(_config_file(t / "c.json", lr=-0.1)), str(t / "run")],
     ["TrainConfig.lr must be a positive number"]),
    ("train: damaged checkpoint", lambda t: ["train", *_damaged_checkpoint(t)],
     ["cannot load checkpoint", "checkpoint.pt", "delete it"]),
]


@pytest.mark.parametrize("mistake, argv, fragments", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_a_mistake_is_one_line_on_stderr_and_exit_code_2(mistake, argv, fragments, tmp_path, capsys,
                                                        record_fault):
    before = torch.get_num_threads()
    try:
        code = main(argv(tmp_path))
    except SystemExit as exit_:  # argparse's own checks exit directly
        code = exit_.code
    finally:
        torch.set_num_threads(before)
    lines = capsys.readouterr().err.strip().splitlines()
    record_fault(f"cli: {mistake}", lines[-1] if lines else "(nothing on stderr)", None)
    assert code == 2 and len(lines) == 1, (code, lines)
    assert all(f in lines[0] for f in fragments), lines[0]


def test_the_command_line_itself_prints_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "cdlib", "plan", "--profile", "fast", "--all"],
                            capture_output=True, text=True, env={**os.environ, "CDLIB_OUTPUTS": str(tmp_path)})
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("python -m cdlib plan: error: unknown profile 'fast'")
