"""The one scheduler: train a plan (a list of run configs) in this process, on the local GPUs, or on Slurm.

The unit of work is one run, trained on one device by ``train_folder`` (``fit`` under the run
folder's lock, ``cdlib.scaleout.locks``), the way every entry point trains: the notebooks
(``train_plan``), the pipeline, ``python -m cdlib train`` (what a local GPU slot runs) and Slurm
jobs. The lock makes this safe from any number of workers, and the checkpoints make a killed or
preempted run cost at most the epochs since its last checkpoint. So every executor only has to
start runs and watch them:

- ``InProcess``: one after another in this process (what the notebooks do);
- ``LocalGPUs``: one worker process per run on a free slot (a visible GPU, or one of
  several slots on a GPU when small runs share it; CPU slots without GPUs);
- ``Slurm``: one submitit job per run, submitted as job arrays; on preemption or timeout
  submitit requeues the job (``TrainTask.checkpoint``) and it resumes from the checkpoint.

``execute`` drives any of them (KD students after their teachers, retries, a report). Command line::

    python -m cdlib executors run PLAN.json --executor local --gpus 0,1   # PLAN.json: cdlib.scaleout.plan --json
    python -m cdlib train CONFIG.json [RUN_DIR]                             # one run, in the store or RUN_DIR
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from cdlib import paths
from cdlib.core import runs
from cdlib.scaleout import locks
from cdlib.core.config import TrainConfig
from cdlib.core.data import DeviceData
from cdlib.core.train import fit, run_data
from cdlib.core.util import atomic_write_text, resolve_device
from cdlib.errors import ArgumentParser, ConfigError, StoreError, UserError, read_json_file
from cdlib.experiments.plans import unique

# What to do, for errors whose message names the problem but not always the fix.
HINTS = {
    "DataError": "the data set is missing or damaged: restore the file named above from the original archive, "
                 "or point --data-root / CDLIB_DATA at a good copy",
    "UncompletedJobError": "the job hit its time limit more often than --slurm-max-requeues allows: raise "
                           "--slurm-time or the requeue limit; the run resumes from its checkpoint",
    "TeacherFailed": "fix the teacher's problem (reported above); the student is trained once the teacher is",
}


@dataclass
class Outcome:
    run_id: str
    status: str          # finished | failed | crashed (worker died: retried) | locked (held by a live worker)
    error: str = ""      # exception class name
    message: str = ""
    trained: bool = False  # this worker trained (part of) it, rather than finding it finished
    log: str = ""        # where the worker's output went, if not here

    def describe(self) -> str:
        hint = HINTS.get(self.error)
        log = f"\n    log: {self.log}" if self.log else ""
        return f"  {self.run_id}: {self.error}: {self.message}" + (f"\n    fix: {hint}" if hint else "") + log


def teacher_of(config: TrainConfig) -> str | None:
    return config.objective_args.get("teacher")


def train_folder(config: TrainConfig, folder: Path, *, on_locked: str = "wait", root: Path | None = None,
                 **fit_options) -> dict:
    """Train ``config`` in ``folder`` under the folder's lock: every entry point that trains goes through here.

    If another live worker holds the lock, ``on_locked="wait"`` waits for it and ``"skip"`` raises
    ``locks.RunLockedError`` naming it (host, pid). A store folder (named by the run id) gets its
    ``config.json``; every attempt is logged and a failure recorded (``failed.json``).
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise locks.RunStoreError(
            f"cannot create run folder {folder}: {err.strerror or err}. Make {folder.parent} writable, or point "
            f"CDLIB_OUTPUTS at a writable folder. No run was changed.") from err
    in_store = folder.name == config.run_id()
    with locks.claim(folder, on_locked):
        if in_store:
            runs.stored_config(folder, config)  # another worker may have created the folder meanwhile
            runs.write_config(folder, config)
        if runs.is_finished(folder):  # ... or finished the run while we waited
            return runs.read_summary(folder)
        runs.log_attempt(folder, locks.JOB_KEY)
        try:
            return fit(config, folder, teachers=runs.load_teachers([config], fit_options.get("device"), root),
                       **fit_options)
        except Exception as err:
            runs.mark_failed(folder, err)
            raise


def train_run(config: TrainConfig, *, root: Path | None = None, on_locked: str = "wait", **fit_options) -> runs.Run:
    """The finished run of ``config`` in the store, trained (or resumed) first if needed (``train_folder``)."""
    folder = runs.run_dir(config, root)
    runs.stored_config(folder, config)
    if not runs.is_finished(folder):
        train_folder(config, folder, on_locked=on_locked, root=root, **fit_options)
    runs.remove_leftover_checkpoint(folder)
    with contextlib.suppress(OSError):  # a worker killed after finishing leaves its lock; a read-only store serves
        locks.clear_stale(folder)
    return runs.Run(folder, config)


def train_one(config: TrainConfig, device=None, data_root=None, on_locked: str = "skip", data=None,
              progress: bool = False) -> Outcome:
    """What every worker does with one run: ``train_run``, with any error turned into an Outcome."""
    was_finished = runs.is_finished(runs.run_dir(config))
    try:
        train_run(config, device=device, data_root=data_root, data=data, progress=progress, on_locked=on_locked)
    except locks.RunLockedError as err:
        return Outcome(config.run_id(), "locked", type(err).__name__, str(err))
    except Exception as err:  # every failure is reported by the coordinator; the other runs go on
        return Outcome(config.run_id(), "failed", type(err).__name__, str(err))
    return Outcome(config.run_id(), "finished", trained=not was_finished)


# ----------------------------------------------------------------------------- executors

class InProcess:
    """Train runs one after another in this process, reading each data set once."""
    poll_s = 1.0

    def __init__(self, device=None, data_root=None, progress: bool = False):
        self.device, self.data_root, self.progress = resolve_device(device), data_root, progress
        self.data: dict = {}

    def free_slots(self) -> int:
        return 1

    def start(self, configs: list[TrainConfig]) -> list[Outcome]:
        return [train_one(c, self.device, self.data_root, data=self._data(c), progress=self.progress)
                for c in configs]

    def _data(self, config: TrainConfig) -> DeviceData | None:
        key = (config.dataset, config.rotation, config.validation, config.train_images)
        if key not in self.data:
            try:
                self.data[key] = run_data(config, self.device, self.data_root)
            except UserError:
                return None  # the run's own attempt reports it, as a failed run
        return self.data[key]

    def poll(self, handle: Outcome) -> Outcome:
        return handle

    def close(self) -> None:
        pass


def session_folder(kind: str) -> Path:
    """A fresh folder for one executor session's logs and job files (under outputs/executor)."""
    folder = paths.outputs() / "executor" / f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}-{os.getpid()}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@dataclass
class _Process:
    config: TrainConfig
    slot: int
    proc: subprocess.Popen
    result: Path
    log: Path


class LocalGPUs:
    """One worker process per run, on a free slot: ``slots_per_gpu`` slots on each GPU in ``gpus``
    (default: every visible GPU), or ``cpu_workers`` CPU slots when there is no GPU."""
    poll_s = 1.0

    def __init__(self, gpus: list[int] | None = None, slots_per_gpu: int = 1, cpu_workers: int = 1,
                 data_root=None, folder: Path | None = None):
        if gpus is None:
            import torch
            gpus = list(range(torch.cuda.device_count()))
        # Indices are into this process's visible GPUs; pass the physical ids the children will see.
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        physical = visible.split(",") if visible else None
        if gpus:
            self.slots = [{"CUDA_VISIBLE_DEVICES": physical[g] if physical else str(g), "device": "cuda"}
                          for g in gpus for _ in range(slots_per_gpu)]
        else:
            # CPU slots share the cores: without this each would start one thread per core.
            threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // cpu_workers))
            self.slots = [{"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": threads, "device": "cpu"}] * cpu_workers
        self.free = list(range(len(self.slots)))
        self.data_root = data_root
        self.folder = folder or session_folder("local")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.running: list[_Process] = []

    def free_slots(self) -> int:
        return len(self.free)

    def start(self, configs: list[TrainConfig]) -> list[_Process]:
        handles = []
        for config in configs:
            slot = self.free.pop(0)
            env = {**os.environ, **{k: v for k, v in self.slots[slot].items() if k != "device"},
                   "CDLIB_OUTPUTS": str(paths.outputs())}
            name = config.run_id()
            config_path, result, log = (self.folder / f"{name}{ext}" for ext in (".json", ".result.json", ".log"))
            config_path.write_text(json.dumps(config.to_dict()))
            result.unlink(missing_ok=True)
            cmd = [sys.executable, "-m", "cdlib", "train", str(config_path), "--result", str(result),
                   "--device", self.slots[slot]["device"]]
            if self.data_root:
                cmd += ["--data-root", str(self.data_root)]
            with open(log, "a") as out:
                proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
            handles.append(_Process(config, slot, proc, result, log))
        self.running += handles
        return handles

    def poll(self, handle: _Process) -> Outcome | None:
        code = handle.proc.poll()
        if code is None:
            return None
        self.running.remove(handle)
        self.free.append(handle.slot)
        if handle.result.is_file():
            return Outcome(**json.loads(handle.result.read_text()))
        how = f"killed by signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        return Outcome(handle.config.run_id(), "crashed", "WorkerDied",
                       f"the worker process died ({how}: out of memory, or killed); the run resumes from its last "
                       f"checkpoint when tried again", log=str(handle.log))

    def close(self) -> None:
        # SIGINT lets a worker release its lock on the way out (SIGKILL would leave it for the next taker).
        for p in self.running:
            p.proc.send_signal(signal.SIGINT)
        for p in self.running:
            try:
                p.proc.wait(10)
            except subprocess.TimeoutExpired:
                p.proc.kill()


class TrainTask:
    """A submitit job that trains one run; checkpointable, so submitit requeues it on
    preemption or timeout and the requeued job resumes from the run's checkpoint."""

    def __init__(self, config: dict, outputs: str, data_root=None, device=None):
        self.config, self.outputs, self.data_root, self.device = config, outputs, data_root, device

    def __call__(self) -> dict:
        import submitit
        os.environ["CDLIB_OUTPUTS"] = self.outputs  # KD teachers are looked up in the store by id
        # A requeued job keeps its id: it may take over the lock its killed incarnation left.
        locks.JOB_KEY = f"submitit:{submitit.JobEnvironment().job_id}"
        return asdict(train_one(TrainConfig.from_dict(self.config), self.device, self.data_root))

    def checkpoint(self, *args, **kwargs):
        # The state worth keeping is already on disk (the run's checkpoint.pt): resubmit as is.
        # The lock is released on the way out (submitit exits with SystemExit after requeueing).
        from submitit.helpers import DelayedSubmission
        return DelayedSubmission(self, *args, **kwargs)


def parse_minutes(text: str | int) -> int:
    """A Slurm time limit (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH[:MM[:SS]]``) in whole minutes, rounded up."""
    days, _, clock = str(text).rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if days:
        h, m, s = (parts + [0, 0])[:3]
    else:
        h, m, s = ([0, 0] + parts)[-3:] if len(parts) == 3 else (0, parts[0], parts[1] if len(parts) > 1 else 0)
    return int(days or 0) * 24 * 60 + h * 60 + m + (s > 0)


class Slurm:
    """One submitit job per run, submitted as job arrays (``cluster="local"`` runs the same jobs as local
    processes through submitit's LocalExecutor, for tests and debugging)."""

    def __init__(self, partition: str | None = None, time: str | int = "24:00:00", account: str | None = None,
                 gpus_per_node: int = 1, cpus_per_task: int | None = 8, mem_gb: float | None = None,
                 array_parallelism: int | None = None, max_requeues: int = 20, data_root=None, device=None,
                 folder: Path | None = None, cluster: str | None = "slurm", poll_s: float = 30.0, **extra):
        import submitit
        self.folder = folder or session_folder(cluster or "auto")
        self.executor = submitit.AutoExecutor(folder=self.folder / "%j", cluster=cluster,
                                              slurm_max_num_timeout=max_requeues)
        params = dict(name="cdlib", timeout_min=parse_minutes(time), gpus_per_node=gpus_per_node,
                      cpus_per_task=cpus_per_task, mem_gb=mem_gb, slurm_partition=partition,
                      slurm_account=account, slurm_array_parallelism=array_parallelism,
                      # USR2 two minutes before the limit (time to exit); --requeue lets scontrol requeue
                      # the job even where the cluster's default is not to (JobRequeue=0).
                      slurm_signal_delay_s=120, slurm_additional_parameters={"requeue": True}, **extra)
        self.executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
        self.data_root, self.device, self.poll_s = data_root, device, poll_s

    def free_slots(self) -> int:
        return 10**6  # Slurm queues; array_parallelism bounds what runs at once

    def start(self, configs: list[TrainConfig]) -> list:
        outputs = str(paths.outputs().resolve())
        with self.executor.batch():  # one job array per call
            jobs = [self.executor.submit(TrainTask(c.to_dict(), outputs, self.data_root, self.device))
                    for c in configs]
        return [(c.run_id(), job) for c, job in zip(configs, jobs)]

    def poll(self, handle) -> Outcome | None:
        run_id, job = handle
        if not job.done():
            return None
        try:
            return Outcome(**job.result())
        except Exception as err:  # the job died (node failure, out of memory, cancelled)
            return Outcome(run_id, "crashed", type(err).__name__, str(err)[-2000:],
                           log=str(job.paths.stderr))

    def close(self) -> None:
        pass  # queued jobs keep running: a later call finds their runs locked or finished


# ----------------------------------------------------------------------------- the coordinator

@dataclass
class Report:
    outcomes: dict  # run id -> Outcome, in the order they ended

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes.values() if o.status != "finished"]

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        counts = Counter(o.status for o in self.outcomes.values())
        trained = sum(o.trained for o in self.outcomes.values())
        text = (f"{counts['finished']} of {len(self.outcomes)} runs finished ({trained} trained now), "
                f"{len(self.failed)} not")
        if self.failed:
            text += ":\n" + "\n".join(o.describe() for o in self.failed)
            text += "\nFinished runs are kept: rerun the same command after fixing these, and only they are trained."
        return text


def execute(configs: list[TrainConfig], executor=None, on_locked: str = "wait", retries: int = 2,
            progress: bool = True) -> Report:
    """Train every run of ``configs`` with ``executor`` (default: in this process) and report.

    Runs start as slots free up, a KD student only once its teacher is finished; a run held by
    another live worker is waited for (``on_locked="wait"``) or reported as ``locked``
    (``"skip"``); a run whose worker died is retried up to ``retries`` times (it resumes); a
    failed run is reported and its students are not started, while the other runs go on.
    """
    from tqdm.auto import tqdm

    executor = executor or InProcess()
    configs = unique(list(configs))
    in_plan = {c.run_id() for c in configs}
    report = Report({})
    session_start = time.time()
    pending = []
    for c in configs:
        try:  # a hand-edited config.json fails its run (and its students) before anything is written
            runs.stored_config(runs.run_dir(c), c)
        except StoreError as err:
            report.outcomes[c.run_id()] = Outcome(c.run_id(), "failed", type(err).__name__, str(err))
            continue
        if runs.is_finished(runs.run_dir(c)):
            report.outcomes[c.run_id()] = Outcome(c.run_id(), "finished")
        else:
            pending.append(c)
    bar = tqdm(total=len(configs), initial=len(report.outcomes), desc="runs finished", disable=not progress)
    running, attempts, announced = {}, Counter(), set()

    def end(outcome: Outcome) -> None:
        report.outcomes[outcome.run_id] = outcome
        if outcome.status == "finished":
            bar.update(1)
        else:
            tqdm.write(f"run {outcome.run_id} {outcome.status}: {outcome.error}: {outcome.message[:300]}")
        bar.set_postfix(running=len(running), failed=len(report.failed))

    try:
        while pending or running:
            changed = False
            for rid, (config, handle) in list(running.items()):
                outcome = executor.poll(handle)
                if outcome is None:
                    continue
                del running[rid]
                changed = True
                if outcome.status == "crashed" and attempts[rid] <= retries:
                    tqdm.write(f"run {rid}: {outcome.message} (attempt {attempts[rid]} of {retries + 1}); retrying")
                    pending.append(config)
                elif outcome.status == "locked" and on_locked == "wait":
                    pending.append(config)  # another worker got it first: watched below like any locked run
                else:
                    end(outcome)
            ready = []
            for config in list(pending):
                step = _triage(config, report, in_plan, session_start, tried=attempts[config.run_id()] > 0)
                if step == "start":
                    ready.append(config)
                elif step == "wait":
                    continue
                elif step.status == "locked" and on_locked == "wait":
                    if step.run_id not in announced:
                        announced.add(step.run_id)
                        tqdm.write(f"run {step.run_id} is {step.message}; waiting for it")
                else:
                    pending.remove(config)
                    end(step)
            batch = ready[:executor.free_slots()]
            if batch:
                changed = True
                for config in batch:
                    pending.remove(config)
                    attempts[config.run_id()] += 1
                for config, handle in zip(batch, executor.start(batch)):
                    running[config.run_id()] = (config, handle)
                bar.set_postfix(running=len(running), failed=len(report.failed))
            if not changed:
                time.sleep(executor.poll_s)
    finally:
        executor.close()
        bar.close()
    return report


def train_plan(configs: list[TrainConfig], executor=None, progress: bool = True) -> list[runs.Run]:
    """The finished runs of ``configs`` (in their order), training the others first with ``executor``
    (default: in this process); a run that could not be trained is an error listing every such run."""
    configs = list(configs)
    report = execute(configs, executor or InProcess(progress=progress), progress=progress)
    if not report.ok:
        raise TrainingFailed(report.summary())
    return runs.finished_runs(configs)


class TrainingFailed(UserError, RuntimeError):
    """Some runs of a plan could not be trained; the message lists them, each with its cause."""


def _triage(config: TrainConfig, report: Report, in_plan: set, session_start: float, tried: bool):
    """What to do now with a pending run: ``"start"`` it, ``"wait"`` for its teacher, or end it with an Outcome
    (a ``locked`` one is only waited for when the coordinator waits for other workers)."""
    rid, folder = config.run_id(), runs.run_dir(config)
    teacher = teacher_of(config)
    blocked = _blocked_by(teacher, report, in_plan)
    if blocked:
        return Outcome(rid, "failed", "TeacherFailed", blocked)
    if teacher and not runs.is_finished(folder.parent / teacher):
        return "wait"
    if runs.is_finished(folder):  # finished by another worker meanwhile
        return Outcome(rid, "finished")
    failure = runs.failure(folder)
    if failure and failure["time"] > session_start and not tried:
        # Another coordinator's worker failed it during this session: the same fault would recur.
        return Outcome(rid, "failed", failure["error"], failure["message"])
    owner = locks.read_lock(folder)
    if owner is not None and locks.stale_reason(owner) is None:
        return Outcome(rid, "locked", "RunLockedError", f"being trained by {owner.describe()}")
    return "start"


def _blocked_by(teacher: str | None, report: Report, in_plan: set) -> str | None:
    """Why a student cannot be trained in this session, if it cannot."""
    if teacher is None:
        return None
    ended = report.outcomes.get(teacher)
    if ended is not None and ended.status != "finished":
        return f"its teacher {teacher} was not trained ({ended.status}: {ended.error})"
    if teacher not in in_plan and not runs.is_finished(paths.runs() / teacher):
        return (f"its teacher {teacher} is neither finished in the run store {paths.runs()} nor in this plan; "
                f"add the teacher's notebook to the plan")
    return None


# ----------------------------------------------------------------------------- command line

def add_executor_arguments(parser: argparse.ArgumentParser) -> None:
    """The options shared by ``cdlib.experiments.pipeline`` and ``python -m cdlib executors run``."""
    g = parser.add_argument_group("executors (how runs are trained)")
    g.add_argument("--executor", choices=["inprocess", "local", "slurm"], default="inprocess",
                   help="inprocess: one after another here; local: one process per GPU slot; slurm: submitit jobs")
    g.add_argument("--gpus", default=None, help="local: GPU indices, e.g. 0,1,2,3 (default: every visible GPU)")
    g.add_argument("--slots-per-gpu", type=int, default=1, help="local: runs sharing one GPU (small networks)")
    g.add_argument("--cpu-workers", type=int, default=1, help="local without GPUs: runs at once on the CPU")
    g.add_argument("--retries", type=int, default=2, help="retries of a run whose worker died (it resumes)")
    g.add_argument("--slurm-partition", default=None)
    g.add_argument("--slurm-time", default="24:00:00", help="time limit per run's job; requeued when hit")
    g.add_argument("--slurm-account", default=None)
    g.add_argument("--slurm-gpus-per-node", type=int, default=1)
    g.add_argument("--slurm-cpus-per-task", type=int, default=8)
    g.add_argument("--slurm-mem-gb", type=float, default=None)
    g.add_argument("--slurm-array-parallelism", type=int, default=None, help="jobs of one array running at once")
    g.add_argument("--slurm-max-requeues", type=int, default=20, help="timeouts/preemptions a run's job survives")


def executor_from_args(args, data_root=None, device=None):
    if args.executor == "inprocess":
        return InProcess(device, data_root)
    if args.executor == "local":
        gpus = [int(g) for g in args.gpus.split(",")] if args.gpus else None
        return LocalGPUs(gpus, args.slots_per_gpu, args.cpu_workers, data_root)
    return Slurm(args.slurm_partition, args.slurm_time, args.slurm_account, args.slurm_gpus_per_node,
                 args.slurm_cpus_per_task, args.slurm_mem_gb, args.slurm_array_parallelism,
                 args.slurm_max_requeues, data_root, device)


def load_plan(path: Path) -> list[TrainConfig]:
    """Configs of a plan file: the output of ``python -m cdlib plan --json`` or a list of config dicts."""
    items = read_json_file(path, "the plan file")
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise ConfigError(f"the plan file {path} is not a list of runs; write it with python -m cdlib plan --json")
    return [TrainConfig.from_dict(item.get("config", item)) for item in items]


def main(argv=None) -> int:
    """``python -m cdlib executors run PLAN.json``: train every run of a plan file."""
    parser = ArgumentParser(prog="python -m cdlib executors", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train every run of a plan file")
    run.add_argument("plan", type=Path)
    run.add_argument("--data-root", default=None)
    run.add_argument("--device", default=None)
    run.add_argument("--on-locked", choices=["wait", "skip"], default="wait",
                     help="runs another live worker trains: wait for them, or leave them to it")
    add_executor_arguments(run)
    args = parser.parse_args(argv)
    report = execute(load_plan(args.plan), executor_from_args(args, args.data_root, args.device),
                     on_locked=args.on_locked, retries=args.retries)
    print(report.summary())
    return 0 if report.ok else 1


def train_main(argv=None) -> int:
    """``python -m cdlib train CONFIG.json [RUN_DIR]``: train one run under its folder's lock, in the run
    store (what a local GPU slot runs; ``--result`` writes its outcome) or in RUN_DIR."""
    parser = ArgumentParser(prog="python -m cdlib train", description=train_main.__doc__)
    parser.add_argument("config")
    parser.add_argument("run_dir", type=Path, nargs="?", help="default: the run's folder in the run store")
    parser.add_argument("--device", default=None)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--compile", action="store_true", help="torch.compile the training forwards")
    parser.add_argument("--on-locked", choices=["wait", "skip"], default="skip",
                        help="the folder is being trained by another live process: refuse (default) or wait for it")
    parser.add_argument("--result", type=Path, default=None, help="in the store: write the outcome here as JSON")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    config = TrainConfig.from_dict(read_json_file(args.config, "the config file"))
    if args.run_dir:
        train_folder(config, args.run_dir, on_locked=args.on_locked, device=args.device, data_root=args.data_root,
                     compile=args.compile, progress=not args.quiet)
        return 0
    outcome = train_one(config, args.device, args.data_root, args.on_locked)
    print(f"{outcome.run_id}: {outcome.status} {outcome.error} {outcome.message}".rstrip(), flush=True)
    if args.result:
        atomic_write_text(args.result, json.dumps(asdict(outcome)))
    return 0 if outcome.status == "finished" else 1
