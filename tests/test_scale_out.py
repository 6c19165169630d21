"""Scale-out: plans without notebooks, run locks, and the executors under crashes and preemption.

Workers here are real processes: forked from this one (fast: torch is already imported) for
the lock races and SIGKILL trials, ``python -m cdlib train`` subprocesses for the
local executor, and submitit's LocalExecutor jobs for the Slurm path. Runs are tiny
(synthetic data, width 1/16, 1-2 epochs) and single-threaded, so that an interrupted run can
be compared bit for bit with an uninterrupted one.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from cdlib.scaleout import executors, plan
from cdlib.core import runs
from cdlib.scaleout import locks
from cdlib.experiments import pipeline
from cdlib.core.config import TrainConfig
from cdlib.scaleout.executors import InProcess, LocalGPUs, execute
from cdlib.experiments.plans import notebook_plan
from cdlib.experiments.profiles import get_profile
from cdlib.core.runs import CHECKPOINT
from cdlib.core.train import fit

TINY = TrainConfig(name="tiny", dataset="synthetic", arch="resnet18", width=0.0625, epochs=1)
KILL = TINY.replace(name="kill", epochs=2)  # two epochs: a kill can land before, between or after checkpoints
FORK = multiprocessing.get_context("fork")


@contextmanager
def one_thread():
    """Single-threaded torch: every process computes the same bits, and runs sharing 2 cores stay fast."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _single_threaded(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for worker subprocesses
    with one_thread():
        yield


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """KILL trained without interruption."""
    folder = tmp_path_factory.mktemp("reference") / "run"
    with one_thread():
        fit(KILL, folder, progress=False)
    return folder


@pytest.fixture(scope="module")
def reference(reference_run) -> dict:
    """The weights every interrupted run of KILL must end with."""
    return weights(reference_run)


@pytest.fixture(scope="module")
def epoch_seconds(reference_run) -> float:
    """How long one of KILL's epochs takes here, to place random kill points inside epochs."""
    return min(json.loads(line)["seconds"] for line in (reference_run / "metrics.jsonl").read_text().splitlines())


@pytest.fixture(scope="module")
def finished_tiny(tmp_path_factory) -> Path:
    """A finished run of TINY, to copy into a test's run store."""
    folder = tmp_path_factory.mktemp("finished") / TINY.run_id()
    with one_thread():
        fit(TINY, folder, progress=False)
    (folder / "config.json").write_text(json.dumps(TINY.to_dict()))
    return folder


def weights(folder: Path) -> dict:
    return torch.load(Path(folder) / "model.pt", map_location="cpu", weights_only=True)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ from the uninterrupted run in {different[:5]}"


def attempts(config: TrainConfig) -> list[dict]:
    path = runs.run_dir(config) / runs.ATTEMPTS
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def epochs_done(config: TrainConfig) -> int:
    path = runs.run_dir(config) / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def checkpointed(config: TrainConfig) -> bool:
    return (runs.run_dir(config) / CHECKPOINT).is_file()


def wait_for(condition, timeout: float = 180, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def lock_pid(config: TrainConfig) -> int | None:
    owner = locks.read_lock(runs.run_dir(config))
    return owner.pid if owner and owner.pid > 0 else None


def kd_student(teacher: TrainConfig) -> TrainConfig:
    return TINY.replace(name="student", objective="kd", objective_args={"teacher": teacher.run_id()})


# ----------------------------------------------------------------------------- plans

def test_plan_cli_lists_every_notebook_without_running_it(capsys):
    assert plan.main(["--profile", "paper", "--notebook", "02"]) == 0
    out = capsys.readouterr().out
    # 20 teachers, 20 KD students and the 20 baselines the KD table compares them with
    assert "60 runs" in out and "kd" in out and out.count("ce-resnet152-") >= 20
    assert plan.main(["--profile", "paper", "--all", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    paper = get_profile("paper", announce=False)
    every = {c.run_id() for nb in plan.available_notebooks(paper) for c in notebook_plan(paper, nb)}
    assert [r["run_id"] for r in rows] == list(dict.fromkeys(r["run_id"] for r in rows))  # each run once
    assert {r["run_id"] for r in rows} == every and plan.available_notebooks(paper) == ["01", "02", "03", "04", "05"]
    position = {r["run_id"]: i for i, r in enumerate(rows)}
    students = [r for r in rows if r["teacher"]]
    assert students and all(position[r["teacher"]] < position[r["run_id"]] for r in students)
    assert all(TrainConfig.from_dict(r["config"]).run_id() == r["run_id"] for r in rows)
    with pytest.raises(SystemExit):
        plan.main(["--profile", "paper", "--notebook", "42"])


def test_plan_json_feeds_the_executor_and_status_shows_the_store(tmp_path, capsys, isolated_outputs, finished_tiny):
    shutil.copytree(finished_tiny, runs.run_dir(TINY))
    rows = [{"run_id": c.run_id(), "config": c.to_dict()} for c in (TINY, KILL)]
    (tmp_path / "plan.json").write_text(json.dumps(rows))
    assert [c.run_id() for c in executors.load_plan(tmp_path / "plan.json")] == [TINY.run_id(), KILL.run_id()]
    assert plan.run_status(TINY) == "finished" and plan.run_status(KILL) == "new"
    folder = runs.run_dir(KILL)
    folder.mkdir(parents=True)
    with locks.claim(folder):  # the status of a run being trained names its worker
        assert plan.run_status(KILL) == f"training on {socket.gethostname()} pid {os.getpid()}"
    (folder / "metrics.jsonl").write_text('{"epoch": 1}\n')
    assert plan.run_status(KILL) == "partial (1/2 epochs)"


# ----------------------------------------------------------------------------- locks

def test_a_claim_is_exclusive_until_released(tmp_path):
    with locks.claim(tmp_path) as held:
        owner = locks.read_lock(tmp_path)
        assert owner.token == held.info.token and owner.pid == os.getpid()
        assert locks.stale_reason(owner) is None
        with pytest.raises(locks.RunLockedError, match=f"{socket.gethostname()} pid {os.getpid()}"):
            locks.claim(tmp_path, on_locked="skip")
    assert locks.read_lock(tmp_path) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temporary files left


def _foreign_lock(folder: Path, heartbeat_age: float, **fields) -> None:
    info = {"host": "node-17", "pid": 4242, "pidns": "", "job": "", "started": time.time() - heartbeat_age,
            "token": "t" * 32, **fields}
    (folder / locks.LOCK).write_text(json.dumps(info))
    os.utime(folder / locks.LOCK, (time.time() - heartbeat_age,) * 2)


def test_owners_that_are_gone_are_detected_and_taken_over(tmp_path, monkeypatch, capsys):
    # Same host, dead pid: stale at once.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _foreign_lock(tmp_path, 0, host=socket.gethostname(), pidns=locks._pid_namespace(), pid=dead.pid)
    assert "is gone" in locks.stale_reason(locks.read_lock(tmp_path))
    with locks.claim(tmp_path, on_locked="skip") as held:
        assert locks.read_lock(tmp_path).token == held.info.token
    assert "taking over run" in capsys.readouterr().err
    # Another host with a fresh heartbeat: alive, whatever its pid.
    _foreign_lock(tmp_path, 5)
    with pytest.raises(locks.RunLockedError, match="node-17 pid 4242"):
        locks.claim(tmp_path, on_locked="skip")
    # ... with a heartbeat older than the timeout: gone.
    _foreign_lock(tmp_path, locks.STALE_AFTER_S + 60)
    assert "heartbeat" in locks.stale_reason(locks.read_lock(tmp_path))
    with locks.claim(tmp_path, on_locked="skip"):
        pass
    # A requeued Slurm job recognises its killed earlier incarnation by the job id.
    _foreign_lock(tmp_path, 5, job="submitit:77_3")
    monkeypatch.setattr(locks, "JOB_KEY", "submitit:77_3")
    assert "earlier incarnation" in locks.stale_reason(locks.read_lock(tmp_path))
    with locks.claim(tmp_path, on_locked="skip"):
        pass
    # An empty lock (a writer died between create and write) is judged by its age only.
    (tmp_path / locks.LOCK).write_text("")
    with pytest.raises(locks.RunLockedError):
        locks.claim(tmp_path, on_locked="skip")
    os.utime(tmp_path / locks.LOCK, (time.time() - locks.STALE_AFTER_S - 1,) * 2)
    with locks.claim(tmp_path, on_locked="skip"):
        pass


def test_heartbeat_refreshes_and_a_lost_lock_stops_training(tmp_path, monkeypatch):
    monkeypatch.setattr(locks, "HEARTBEAT_S", 0.05)
    # The heartbeat stops training with _thread.interrupt_main, which acts only under Python's own SIGINT
    # handler (a worker's); a library loaded by an earlier test in this process may have replaced it.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(locks.LockLostError, match="taken over"):
            with locks.claim(tmp_path) as held:
                first = locks.read_lock(tmp_path).heartbeat
                os.utime(held.path, (first - 100,) * 2)
                wait_for(lambda: locks.read_lock(tmp_path).heartbeat > first - 50, 10, "a heartbeat")
                _foreign_lock(tmp_path, 0)  # another worker judged us dead and took over
                for _ in range(500):  # training steps, until the heartbeat thread interrupts them
                    time.sleep(0.02)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert locks.read_lock(tmp_path).host == "node-17"  # the new owner's lock is left alone


def test_get_or_train_waits_for_a_live_owner_and_skips_on_request(isolated_outputs, finished_tiny, monkeypatch, capsys):
    folder = runs.run_dir(TINY)
    folder.mkdir(parents=True)
    monkeypatch.setattr(locks, "POLL_S", 0.05)
    owner = locks.claim(folder)  # a live worker (this process) holds the run
    with pytest.raises(locks.RunLockedError, match="being trained by"):
        executors.train_run(TINY, progress=False, on_locked="skip")

    def finish_and_release():
        time.sleep(0.5)
        for f in finished_tiny.iterdir():
            shutil.copy(f, folder / f.name)
        owner.release()
    threading.Thread(target=finish_and_release).start()
    monkeypatch.setattr(executors, "fit", lambda *a, **k: pytest.fail("trained a run that another worker finished"))
    run = executors.train_run(TINY, progress=False)  # default: wait
    assert run.summary["run_id"] == TINY.run_id()
    assert "is being trained by" in capsys.readouterr().err


# ----------------------------------------------------------------------------- workers racing and dying

def _worker(plan_configs, report_path, start):
    """A forked worker process: train the plan in-process, write its report."""
    torch.set_num_threads(1)
    start.wait()
    report = execute(plan_configs, InProcess(), progress=False)
    Path(report_path).write_text(json.dumps({k: o.__dict__ for k, o in report.outcomes.items()}))


def test_two_workers_on_one_plan_train_every_run_exactly_once(tmp_path, isolated_outputs, monkeypatch):
    monkeypatch.setattr(locks, "POLL_S", 0.1)
    plan_configs = [TINY.replace(seed=s) for s in range(3)]
    start = FORK.Event()
    workers = [FORK.Process(target=_worker, args=(plan_configs, tmp_path / f"report{i}.json", start)) for i in range(2)]
    for w in workers:
        w.start()
    start.set()
    for w in workers:
        w.join(180)
        assert w.exitcode == 0
    reports = [json.loads((tmp_path / f"report{i}.json").read_text()) for i in range(2)]
    for config in plan_configs:
        assert len(attempts(config)) == 1, f"{config.run_id()} was trained {len(attempts(config))} times"
        assert all(r[config.run_id()]["status"] == "finished" for r in reports)
        assert sum(r[config.run_id()]["trained"] for r in reports) == 1
    pids = {a["pid"] for c in plan_configs for a in attempts(c)}
    assert pids <= {w.pid for w in workers}


KILL_TRIALS = [0, 1, 2]


@pytest.mark.parametrize("trial", KILL_TRIALS, ids=[f"kill-trial-{t}" for t in KILL_TRIALS])
def test_worker_killed_at_a_random_point_is_finished_by_a_restart(trial, tmp_path, isolated_outputs, reference,
                                                                  epoch_seconds):
    """SIGKILL a worker at a seeded random point of KILL's training; a restart ends with the same weights."""
    rng = random.Random(1000 + trial)
    # After 0 or 1 checkpointed epochs, somewhere in the first half of the next epoch (or its setup).
    after_epochs, delay = rng.choice([0, 1]), rng.uniform(0.0, 0.5) * epoch_seconds
    start = FORK.Event()
    worker = FORK.Process(target=_worker, args=([KILL], tmp_path / "report.json", start))
    worker.start()
    start.set()
    # Wait until the worker holds the run and has checkpointed `after_epochs` epochs, then a bit more.
    wait_for(lambda: lock_pid(KILL) == worker.pid and epochs_done(KILL) >= after_epochs or not worker.is_alive(),
             what="the worker to start training")
    time.sleep(delay)
    os.kill(worker.pid, signal.SIGKILL)
    worker.join()
    folder = runs.run_dir(KILL)
    state = {"killed_after_epochs": epochs_done(KILL), "lock_left": (folder / locks.LOCK).exists(),
             "checkpoint_left": (folder / CHECKPOINT).exists(), "finished": runs.is_finished(folder)}
    assert not state["finished"], f"the worker finished before it was killed; trial did not test a resume: {state}"

    report = execute([KILL], InProcess(), progress=False)  # the restart
    assert report.ok, report.summary()
    assert_same_weights(reference, weights(folder))
    tries = attempts(KILL)
    assert [t["pid"] for t in tries] == [worker.pid, os.getpid()]
    assert tries[1]["resumed"] == state["checkpoint_left"]  # it lost at most the epoch in progress
    assert [json.loads(line)["epoch"] for line in (folder / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert not (folder / locks.LOCK).exists()


def test_local_executor_retries_a_worker_killed_mid_run(tmp_path, isolated_outputs, reference):
    """The local executor trains in worker subprocesses; one is SIGKILLed after its first checkpoint;
    the executor starts another worker, which takes the dead worker's lock over and resumes."""
    executor = LocalGPUs(gpus=[], cpu_workers=2, folder=tmp_path / "local")
    assert [slot["device"] for slot in executor.slots] == ["cpu", "cpu"]
    killed = {}

    def kill_after_first_checkpoint():
        pid = wait_for(lambda: checkpointed(KILL) and lock_pid(KILL), what="KILL's first checkpoint")
        os.kill(pid, signal.SIGKILL)
        killed["pid"] = pid
    threading.Thread(target=kill_after_first_checkpoint, daemon=True).start()
    report = execute([KILL], executor, progress=False)
    assert report.ok, report.summary()
    tries = attempts(KILL)
    assert len(tries) == 2 and tries[0]["pid"] == killed["pid"] and tries[1]["resumed"]
    assert_same_weights(reference, weights(runs.run_dir(KILL)))
    assert report.outcomes[KILL.run_id()].trained
    assert f"{KILL.run_id()}: finished" in (tmp_path / "local" / f"{KILL.run_id()}.log").read_text()


def test_submitit_jobs_train_a_plan_in_dependency_order_and_survive_preemption(tmp_path, isolated_outputs,
                                                                               reference):
    """The Slurm executor's jobs, run by submitit's LocalExecutor: a teacher and its KD student (listed
    first) as job arrays; the teacher's job is preempted (USR2) after its first checkpoint, submitit
    requeues it through TrainTask.checkpoint, and the requeued job resumes to the same weights."""
    pytest.importorskip("submitit")
    teacher, student = KILL, kd_student(KILL)
    executor = executors.Slurm(cluster="local", gpus_per_node=0, cpus_per_task=None, time="60",
                               folder=tmp_path / "jobs", poll_s=0.2)
    preempted = {}

    def preempt_after_first_checkpoint():
        pid = wait_for(lambda: checkpointed(teacher) and lock_pid(teacher), what="the teacher's checkpoint")
        os.kill(pid, signal.SIGUSR2)  # what Slurm sends before preemption or the time limit
        preempted["pid"] = pid
    threading.Thread(target=preempt_after_first_checkpoint, daemon=True).start()
    report = execute([student, teacher], executor, progress=False)
    assert report.ok, report.summary()
    tries = attempts(teacher)
    assert len(tries) == 2 and tries[0]["pid"] == preempted["pid"] and tries[1]["resumed"]
    assert tries[0]["job"] == tries[1]["job"] and tries[0]["job"].startswith("submitit:")  # one job, requeued
    assert_same_weights(reference, weights(runs.run_dir(teacher)))
    teacher_done = (runs.run_dir(teacher) / "summary.json").stat().st_mtime
    assert [a["time"] > teacher_done for a in attempts(student)] == [True]
    logs = "".join(p.read_text() for p in (tmp_path / "jobs").rglob("*.err"))
    assert "Caught signal SIGUSR2" in logs and "preempted" in logs


# ----------------------------------------------------------------------------- command lines

def test_slurm_options_reach_the_sbatch_script(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 0\n")  # submitit checks that it runs on a Slurm host
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    import argparse
    parser = argparse.ArgumentParser()
    executors.add_executor_arguments(parser)
    args = parser.parse_args(["--executor", "slurm", "--slurm-partition", "gpu", "--slurm-time", "1-02:00:00",
                              "--slurm-account", "proj42", "--slurm-gpus-per-node", "1"])
    executor = executors.executor_from_args(args)
    script = executor.executor._executor._make_submission_file_text("python -m x", "uid")
    for line in ("--partition=gpu", "--time=1560", "--account=proj42", "--gpus-per-node=1", "--signal=USR2@120",
                 "--requeue"):
        assert f"#SBATCH {line}" in script
    assert executors.parse_minutes("90") == 90 and executors.parse_minutes("2:00:00") == 120
    assert executors.parse_minutes("1-0") == 1440 and executors.parse_minutes("0:30") == 1


def test_pipeline_trains_the_plans_first_and_stops_on_failures(monkeypatch, capsys):
    seen = {}

    def fake_execute(configs, executor, retries):
        seen["configs"], seen["executor"] = configs, executor
        return executors.Report({c.run_id(): executors.Outcome(c.run_id(), "finished") for c in configs})
    monkeypatch.setattr(executors, "execute", fake_execute)
    monkeypatch.setattr(pipeline, "run_notebook", lambda *a: pytest.fail("--train-only ran a notebook"))
    assert pipeline.main(["--profile", "smoke", "--only", "01", "--executor", "local", "--cpu-workers", "2",
                          "--train-only"]) == 0
    smoke = get_profile("smoke", announce=False)
    assert [c.run_id() for c in seen["configs"]] == [c.run_id() for c in notebook_plan(smoke, "01")]
    assert isinstance(seen["executor"], LocalGPUs) and len(seen["executor"].slots) == 2

    def failing_execute(configs, executor, retries):
        first = configs[0].run_id()
        return executors.Report({first: executors.Outcome(first, "failed", "DataError", "cifar100 not found")})
    monkeypatch.setattr(executors, "execute", failing_execute)
    assert pipeline.main(["--profile", "smoke", "--only", "01", "--executor", "local"]) == 1
    captured = capsys.readouterr()
    assert "DataError: cifar100 not found" in captured.out and "no notebook was executed" in captured.err


def test_two_trainings_of_one_folder_the_second_refused_or_waiting(tmp_path):
    """``python -m cdlib train`` on a folder another live process trains: by default it refuses with
    one line naming that process (host, pid), exit 2; with ``--on-locked wait`` it waits, then finds
    the run finished. The first process is stopped (SIGSTOP) after its first checkpoint, so the
    outcome does not depend on timing."""
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(TINY.replace(epochs=3).to_dict()))
    folder = tmp_path / "run"
    command = [sys.executable, "-m", "cdlib", "train", str(config_file), str(folder), "--quiet"]
    env = {**os.environ, "CDLIB_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(command, env=env)
    try:
        deadline = time.time() + 300
        while not (folder / CHECKPOINT).exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        first.send_signal(signal.SIGSTOP)
        assert first.poll() is None and not (folder / "summary.json").exists(), "the first finished too soon"
        refused = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert refused.returncode == 2, refused.stderr
        assert f"{socket.gethostname()} pid {first.pid}" in refused.stderr and "Traceback" not in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
        waiting = subprocess.Popen(command + ["--on-locked", "wait"], env=env, stderr=subprocess.PIPE, text=True)
        assert select.select([waiting.stderr], [], [], 300)[0], "the waiting process said nothing"
        said = waiting.stderr.readline()
        assert f"pid {first.pid}" in said and "waiting" in said and waiting.poll() is None
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(300) == 0
    _, stderr = waiting.communicate(timeout=300)
    assert waiting.returncode == 0 and "Traceback" not in stderr
    assert (folder / "summary.json").is_file()
    assert len((folder / runs.ATTEMPTS).read_text().splitlines()) == 1  # only the first ever trained
