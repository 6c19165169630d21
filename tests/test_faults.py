"""The fault matrix: every bad input, hit by a worker through the executor path.

Each case runs one plan through ``execute`` (the coordinator every executor uses) with three
runs: G, already finished; F, the faulty run; H, an unfinished run listed after F. The worker
must report F's fault with its cause and its fix, mark F failed (``failed.json``) where the
folder is F's own, leave G byte for byte as it was, and still finish H. The unit tests of
the same faults (tests/test_data.py, test_train.py, test_runs.py) check the messages at
their source; these check that a worker survives them. Each adds a row to the fault matrix
that prints at the end of the test run (tests/conftest.py).
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cdlib.core import runs
from cdlib.core import train
from cdlib.scaleout import locks
from cdlib.core.config import TrainConfig
from cdlib.scaleout.executors import InProcess, execute
from test_data import _write_pickle, make_cifar100  # noqa: E402  (tests/ is on sys.path under pytest)

TINY = TrainConfig(name="tiny", dataset="synthetic", arch="resnet18", width=0.0625, epochs=1)
G = TINY                            # finished before the worker starts
H = TINY.replace(name="other")      # unfinished: must still be finished after F fails
F = TINY.replace(name="faulty")     # the run that meets the fault


@pytest.fixture(autouse=True)
def _single_threaded(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def store_template(tmp_path_factory) -> Path:
    """G finished, and H interrupted after its last checkpoint (before its final files):
    finishing H goes through claim, resume and final writes, without a whole epoch."""
    root = tmp_path_factory.mktemp("template")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    train.fit(G, root / G.run_id(), progress=False)
    real_write = runs.atomic_write_text

    def killed_before_summary(path, text):
        if Path(path).name == runs.SUMMARY:
            raise KeyboardInterrupt("killed")
        real_write(path, text)
    runs.atomic_write_text = killed_before_summary
    try:
        with pytest.raises(KeyboardInterrupt):
            train.fit(H, root / H.run_id(), progress=False)
    finally:
        runs.atomic_write_text = real_write
        torch.set_num_threads(before)
    for name in ("model.pt", "test_logits.npy", "confusions.npz"):
        (root / H.run_id() / name).unlink()
    for config in (G, H):
        (root / config.run_id() / "config.json").write_text(json.dumps(config.to_dict()))
    assert (root / H.run_id() / runs.CHECKPOINT).is_file()
    return root


def _digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


# ----------------------------------------------------------------------------- the faults
# Each gets F's run folder and the template store, and returns the faulty run's config and the
# data root to use.

def missing_data(tmp_path, folder, template):
    return F.replace(dataset="cifar100"), tmp_path / "no-such-folder"


def _cifar(tmp_path, damage):
    folder = make_cifar100(tmp_path / "data", np.random.default_rng(0))
    train_file = folder / "train"
    damage(train_file)
    return F.replace(dataset="cifar100"), tmp_path / "data"


def truncated_data(tmp_path, folder, template):
    return _cifar(tmp_path, lambda f: f.write_bytes(f.read_bytes()[:5000]))


def _rewrite(f, change):
    import pickle
    d = pickle.load(open(f, "rb"))
    change(d)
    _write_pickle(f, d)


def wrong_shape(tmp_path, folder, template):
    return _cifar(tmp_path, lambda f: _rewrite(f, lambda d: d.update(data=d["data"][:, :3000])))


def labels_out_of_range(tmp_path, folder, template):
    return _cifar(tmp_path, lambda f: _rewrite(f, lambda d: d["fine_labels"].__setitem__(7, 100)))


def _prepare(folder, config):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config.to_dict()))


def truncated_checkpoint(tmp_path, folder, template):
    _prepare(folder, F)
    blob = (template / H.run_id() / runs.CHECKPOINT).read_bytes()
    (folder / runs.CHECKPOINT).write_bytes(blob[: len(blob) // 3])
    return F, None


def foreign_checkpoint(tmp_path, folder, template):
    _prepare(folder, F)
    shutil.copy(template / H.run_id() / runs.CHECKPOINT, folder / runs.CHECKPOINT)  # H's, not F's
    return F, None


class Exploit:
    """Unpickling this runs code: it would create the file `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def checkpoint_with_python_objects(tmp_path, folder, template):
    _prepare(folder, F)
    torch.save({"config": F.to_dict(), "epoch": 0, "payload": Exploit(tmp_path / "pwned")}, folder / runs.CHECKPOINT)
    return F, None


def config_differs(tmp_path, folder, template):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({**F.to_dict(), "lr": 0.05}))
    (folder / "metrics.jsonl").write_text('{"epoch": 1}\n')
    return F, None


def nan_loss(tmp_path, folder, template):
    # A learning rate of 1e4 makes the loss overflow in the first epoch, in any process: no patching.
    nan = F.replace(lr=1e4)
    return nan, None


def unwritable_folder(tmp_path, folder, template):
    folder.mkdir(parents=True)
    folder.chmod(0o555)
    try:
        (folder / ".probe").touch()
    except PermissionError:
        return F, None  # permissions are enforced (not root)
    (folder / ".probe").unlink()
    folder.chmod(0o755)
    folder.rmdir()
    # root ignores permissions: stand in a directory of a file system that refuses root's writes too.
    for target in ("/sys/kernel", "/sys"):
        try:
            open(Path(target) / ".cdlib-probe", "w").close()
        except PermissionError:
            folder.symlink_to(target, target_is_directory=True)
            return F, None
        except OSError:
            continue
    pytest.skip("running as root with no read-only directory to stand in for an unwritable folder")


def _teacher(folder, template, teacher_config):
    """A finished KD teacher at ``folder``: G's files under ``teacher_config``; the student that names it."""
    shutil.copytree(template / G.run_id(), folder)
    (folder / "config.json").write_text(json.dumps(teacher_config.to_dict()))
    return TINY.replace(name="student", objective="kd", objective_args={"teacher": folder.name})


def teacher_damaged(tmp_path, folder, template):
    student = _teacher(folder, template, F)
    blob = (folder / "model.pt").read_bytes()
    (folder / "model.pt").write_bytes(blob[: len(blob) // 2])
    return student, None


def teacher_of_another_dataset(tmp_path, folder, template):
    student = _teacher(folder, template, F)
    make_cifar100(tmp_path / "data", np.random.default_rng(0))
    return student.replace(dataset="cifar100"), tmp_path / "data"


def teacher_of_another_split(tmp_path, folder, template):
    student = _teacher(folder, template, F)
    return student.replace(validation=100), None


def unreadable_image(tmp_path, folder, template):
    from PIL import Image
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (tmp_path / "images" / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / "images" / split / cls / f"{i}.png")
    (tmp_path / "images" / "train" / "dog" / "1.png").write_bytes(b"\x89PNG not really")
    return F.replace(dataset=f"imagefolder:{tmp_path / 'images'}"), None


def crafted_cifar_pickle(tmp_path, folder, template):
    return _cifar(tmp_path, lambda f: _write_pickle(f, Exploit(tmp_path / "pwned")))


def teacher_failed(tmp_path, folder, template):
    """A KD student whose teacher (in the same plan) fails: the student is not started, and says why."""
    return F.replace(lr=1e4), None


# id, setup, expected error class, fragments the report must contain (the problem, then the fix),
# whether the worker marks the run failed in its own folder.
FAULTS = [
    ("fault-01-missing-data", missing_data, "DataError", ["cifar100 not found", "CDLIB_DATA"], True),
    ("fault-02-truncated-data-file", truncated_data, "DataError", ["truncated", "fresh copy"], True),
    ("fault-03-wrong-image-shape", wrong_shape, "DataError", ["(N, 3072)", "restore the file"], True),
    ("fault-04-labels-out-of-range", labels_out_of_range, "DataError", ["labels outside 0..99", "restore the file"],
     True),
    ("fault-05-truncated-checkpoint", truncated_checkpoint, "CheckpointError", ["cannot load checkpoint", "delete it"],
     True),
    ("fault-06-checkpoint-of-another-config", foreign_checkpoint, "CheckpointError", ["another config", "delete it"],
     True),
    ("fault-07-checkpoint-with-python-objects", checkpoint_with_python_objects, "CheckpointError",
     ["cannot load checkpoint", "holds Python objects", "arbitrary code", "delete it"], True),
    ("fault-08-run-folder-config-differs", config_differs, "ConfigMismatchError",
     ["edited after the run was made", "'lr': (0.05, 0.1)", "move the folder away"], False),
    ("fault-09-nan-loss", nan_loss, "NonFiniteLossError", ["NaN or infinite", "Lower the learning rate"], True),
    ("fault-10-unwritable-output-folder", unwritable_folder, "RunStoreError",
     ["Permission denied", "writable", "CDLIB_OUTPUTS"], False),
    ("fault-11-teacher-failed", teacher_failed, "TeacherFailed", ["its teacher", "fix the teacher"], False),
    ("fault-12-teacher-model-damaged", teacher_damaged, "StoreError",
     ["KD teacher faulty-", "model.pt", "cannot be loaded", "Restore the file"], True),
    ("fault-13-teacher-of-another-dataset", teacher_of_another_dataset, "ConfigError",
     ["was trained on 'synthetic'", "trains on 'cifar100'", "name a teacher"], True),
    ("fault-16-teacher-without-the-students-validation-split", teacher_of_another_split, "ConfigError",
     ["held 0 training images out", "never saw the student's validation images"], True),
    ("fault-14-unreadable-image", unreadable_image, "DataError", ["cannot decode image", "1.png", "Delete it"], True),
    ("fault-15-crafted-cifar-pickle", crafted_cifar_pickle, "DataError",
     ["io.open", "arbitrary code", "fresh copy"], True),
]


@pytest.mark.parametrize("fault_id, setup, error, fragments, marks_folder", FAULTS, ids=[f[0] for f in FAULTS])
def test_fault(fault_id, setup, error, fragments, marks_folder, tmp_path, isolated_outputs, store_template,
               record_fault):
    store = isolated_outputs / "runs"
    for config in (G, H):
        shutil.copytree(store_template / config.run_id(), store / config.run_id())
    g_before = _digest(store / G.run_id())
    faulty, data_root = setup(tmp_path, store / F.run_id(), store_template)
    folder = store / faulty.run_id()
    plan = [G, faulty, H]
    if fault_id == "fault-11-teacher-failed":
        student = TINY.replace(name="student", objective="kd", objective_args={"teacher": faulty.run_id()})
        plan = [G, student, faulty, H]
    untouched = _digest(folder) if folder.is_dir() and fault_id == "fault-08-run-folder-config-differs" else None

    try:
        report = execute(plan, InProcess(data_root=data_root), progress=False)
    finally:
        if folder.is_dir() and not folder.is_symlink():
            folder.chmod(0o755)
    text = report.summary()

    failed_id = student.run_id() if fault_id == "fault-11-teacher-failed" else faulty.run_id()
    outcome = report.outcomes[failed_id]
    assert (outcome.status, outcome.error) == ("failed", error), text
    for fragment in fragments:
        assert fragment in text, f"the report lacks {fragment!r}:\n{text}"
    # The other runs: G untouched, H finished by the same worker after the failure.
    assert report.outcomes[G.run_id()].status == "finished" and _digest(store / G.run_id()) == g_before
    assert report.outcomes[H.run_id()].status == "finished" and runs.is_finished(store / H.run_id())
    assert [a["resumed"] for a in map(json.loads, (store / H.run_id() / runs.ATTEMPTS).read_text().splitlines())] \
        == [True]
    assert sum(o.status != "finished" for o in report.outcomes.values()) == 1 + (fault_id == "fault-11-teacher-failed")
    # The faulty run: marked failed in its own folder, or, if the folder is not its own, left alone.
    if marks_folder:
        assert runs.failure(folder)["error"] == error
    if untouched is not None:
        assert _digest(folder) == untouched
    if fault_id in ("fault-07-checkpoint-with-python-objects", "fault-15-crafted-cifar-pickle"):
        assert not (tmp_path / "pwned").exists(), "the file's code ran"
    if fault_id == "fault-11-teacher-failed":
        assert not (store / failed_id).exists()  # the student was never started
    assert not list(store.glob(f"*/{locks.LOCK}")), "a lock was left behind"
    record_fault(f"worker: {fault_id[9:]}", f"{outcome.error}: {outcome.message}", True)
