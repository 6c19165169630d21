"""A training process that SIGKILLs itself at a chosen moment (tests/test_kills.py runs it).

    python tests/kill_harness.py record STORE EVENTS.json   train, logging every event
    python tests/kill_harness.py kill STORE EVENT FRACTION   train, die at event number EVENT
    python tests/kill_harness.py resume STORE [STORE ...]    train each store to the end, no kill

It trains ``RUNS`` (two runs of one recipe, trained together) into the run store STORE
one after the other through ``executors.train_run``, the path every worker takes, so the
kill can land in the lock, the config, the attempts log, a training step, an
evaluation, a metrics write, a checkpoint, a rename or a final artefact. An event is
a write call into a file of the store (a kill there leaves the first FRACTION of its
bytes on disk, flushed, as a real kill between two writes would), a rename, a hard
link or a removal of a store file (killed just before it), an optimiser step or an
evaluation batch (killed just after it). The event stream of a run is deterministic,
so an event number means the same moment in every process.
"""
from __future__ import annotations

import builtins
import io
import json
import os
import re
import signal
import sys
from pathlib import Path

os.environ["OMP_NUM_THREADS"] = "1"
import torch  # noqa: E402
from torch.optim.optimizer import register_optimizer_step_post_hook  # noqa: E402

from cdlib.scaleout import executors  # noqa: E402
from cdlib.core.config import TrainConfig  # noqa: E402
from cdlib.core.data import DeviceData  # noqa: E402

# 1,500 of the 2,000 synthetic training images held out for validation: 4 steps an epoch keep the ~30
# killed and resumed processes quick, and the kills cover the validation pass too.
TINY = TrainConfig(name="a", dataset="synthetic", arch="resnet18", width=0.0625, epochs=2, validation=1500)
RUNS = [TINY, TINY.replace(name="b", seed=1)]


class Events:
    """Counts events; logs them (record) or kills the process at number ``target`` (kill)."""

    def __init__(self, store: Path, target: int | None = None, fraction: float = 0.0):
        self.store, self.target, self.fraction = str(store), target, fraction
        self.count, self.log = 0, []

    def name(self, path) -> str | None:
        """``run/file`` for a file of the store (lock temporaries without their random token), else None."""
        path = os.path.abspath(os.fspath(path))
        if not path.startswith(self.store):
            return None
        folder, file = os.path.split(path)
        file = re.sub(r"^\.lock\.json\.[0-9a-f]{32}$", ".lock.json.*", file)
        return f"{os.path.basename(folder).split('-')[0]}/{file}"

    def __call__(self, kind: str, name: str, size: int = 0) -> int | None:
        """Called before each event; for a write that must be cut, the number of bytes to write."""
        self.count += 1
        self.log.append([kind, name, size])
        if self.count != self.target:
            return None
        if kind == "write":
            return int(self.fraction * size)
        die()


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class CountedFile:
    """A file opened for writing whose writes are events."""

    def __init__(self, file, name: str, events: Events):
        self._file, self._name, self._events = file, name, events

    def write(self, data):
        cut = self._events("write", self._name, len(data))
        if cut is not None:
            self._file.write(data[:cut])
            self._file.flush()
            die()
        return self._file.write(data)

    def __getattr__(self, attribute):
        return getattr(self._file, attribute)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._file.__exit__(*exc)


def install(events: Events) -> None:
    real_open, real_replace, real_link, real_unlink = io.open, os.replace, os.link, os.unlink

    def counted_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        name = events.name(file) if isinstance(file, (str, os.PathLike)) else None
        return CountedFile(handle, name, events) if name and set(mode) & set("wax+") else handle

    def file_event(kind, real):
        def operation(*args, **kwargs):
            name = events.name(args[-1])
            if name:
                events(kind, name)
            return real(*args, **kwargs)
        return operation

    builtins.open = io.open = counted_open
    os.replace, os.link, os.unlink = (file_event("replace", real_replace), file_event("link", real_link),
                                      file_event("unlink", real_unlink))
    register_optimizer_step_post_hook(lambda *_: events("step", "-"))
    real_batches = DeviceData.eval_batches

    def counted_batches(self, *args, **kwargs):
        for batch in real_batches(self, *args, **kwargs):
            yield batch
            events("evaluate", "-")
    DeviceData.eval_batches = counted_batches


def train(store: Path) -> None:
    for config in RUNS:
        executors.train_run(config, device="cpu", root=store, progress=False)


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    mode, store = argv[0], Path(argv[1]).resolve()
    if mode == "resume":
        for other in argv[1:]:
            train(Path(other).resolve())
        return
    events = Events(store, int(argv[2]) if mode == "kill" else None, float(argv[3]) if mode == "kill" else 0.0)
    install(events)
    train(store)
    if mode == "record":
        Path(argv[2]).write_text(json.dumps(events.log))


if __name__ == "__main__":
    main(sys.argv[1:])
