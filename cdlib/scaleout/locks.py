"""Claiming a run folder so that many workers (processes, GPUs, Slurm nodes) never train it twice.

A worker that trains a run holds ``<run folder>/lock.json``: who owns it (host, pid, pid
namespace, Slurm job, start time, a random token). The file's modification time is the
heartbeat, refreshed every ``HEARTBEAT_S`` by a background thread while the run trains.

- Claim: the lock is written to a private temporary file and hard-linked to ``lock.json``;
  ``link`` fails if the name exists, atomically, also on NFS (where it is the classic
  lock idiom), so exactly one worker wins. File systems without hard links fall back to
  ``os.open(O_CREAT | O_EXCL)``.
- Owner gone: on the owner's host (same host name and pid namespace) a dead pid means the
  lock is stale at once; from another host we cannot see the pid, so a heartbeat older than
  ``STALE_AFTER_S`` does (this also catches a reused pid). A Slurm task requeued after a
  preemption recognises its own earlier incarnation by the job id and takes over at once.
- Take-over: stale locks are removed only under a short-lived ``lock.json.break`` mutex and
  after re-reading the lock, so two workers that both saw the same stale lock cannot remove a
  fresh one that a third worker has just written.
- Losing the lock: if the heartbeat thread finds another worker's token in ``lock.json`` (we
  were judged dead, e.g. the process was suspended for minutes), it interrupts training:
  two writers of one checkpoint would corrupt it.
"""
from __future__ import annotations

import _thread
import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from cdlib.errors import StoreError, UserError

LOCK = "lock.json"
HEARTBEAT_S = 30.0      # how often a training worker touches its lock
STALE_AFTER_S = 300.0   # a lock not touched for this long belongs to a dead worker (allows clock skew)
BREAK_STALE_S = 60.0    # a take-over mutex older than this was left by a worker that died while breaking
POLL_S = 5.0            # how often a worker waiting for another one's run looks again
UNREADABLE_STALE_S = 10.0  # an unreadable lock this old is damaged, not being written (that takes microseconds)
UNKNOWN = "?"           # the host of a lock file that cannot be read


class RunLockedError(UserError, RuntimeError):
    """The run is being trained by another live worker (raised when ``on_locked="skip"``)."""

    def __init__(self, folder: Path, owner: "LockInfo"):
        self.folder, self.owner = Path(folder), owner
        super().__init__(f"run {Path(folder).name} is being trained by {owner.describe()}; skipped. "
                         f"It will be finished there; rerun later to load it.")


class RunStoreError(StoreError):
    """The run store cannot be written (permissions, read-only or full file system)."""


class LockLostError(UserError, RuntimeError):
    """Another worker took this worker's lock over while it was training."""


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


# Set by a cluster task that trains exactly one run (cdlib.scaleout.executors.TrainTask) to its job id, which a
# requeued job keeps. Not read from SLURM_JOB_ID directly: several local workers inside one
# allocation share that id and must not mistake each other for an earlier incarnation.
JOB_KEY = ""


@dataclass
class LockInfo:
    host: str
    pid: int
    pidns: str
    job: str
    started: float
    token: str
    heartbeat: float = 0.0  # the lock file's modification time, filled in when read

    @classmethod
    def mine(cls) -> "LockInfo":
        return cls(socket.gethostname(), os.getpid(), _pid_namespace(), JOB_KEY, time.time(), uuid.uuid4().hex)

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in self.__dict__.items() if k != "heartbeat"})

    def same_host(self) -> bool:
        return self.host == socket.gethostname() and self.pidns == _pid_namespace()

    def describe(self, now: float | None = None) -> str:
        age = (now or time.time()) - self.heartbeat
        if self.host == UNKNOWN:
            return f"an unreadable lock file (being written, or damaged; modified {age:.0f} s ago)"
        job = f", job {self.job}" if self.job else ""
        return (f"{self.host} pid {self.pid}{job} (since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.started))}, "
                f"heartbeat {age:.0f} s ago)")


def read_lock(folder: Path) -> LockInfo | None:
    """The current owner of ``folder``, or None when it is not locked."""
    path = Path(folder) / LOCK
    try:
        text, mtime = path.read_text(), path.stat().st_mtime
        return LockInfo(**json.loads(text), heartbeat=mtime)
    except FileNotFoundError:
        return None
    except (ValueError, TypeError):
        # Written by the O_EXCL fallback and not yet filled, or garbage: judged by its age only.
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            return None
        return LockInfo(UNKNOWN, -1, "", "", mtime, "", heartbeat=mtime)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def stale_reason(owner: LockInfo, now: float | None = None) -> str | None:
    """Why ``owner``'s lock may be taken over, or None if the owner may still be training."""
    now = now or time.time()
    if owner.host == UNKNOWN and now - owner.heartbeat > UNREADABLE_STALE_S:
        return f"the lock file cannot be read and is {now - owner.heartbeat:.0f} s old: it is damaged"
    if owner.same_host() and owner.pid > 0 and not _pid_alive(owner.pid):
        return f"its process {owner.pid} on this host is gone"
    if owner.job and owner.job == JOB_KEY and (owner.host, owner.pid) != (socket.gethostname(), os.getpid()):
        return f"it is an earlier incarnation of this job ({owner.job}), requeued"
    if now - owner.heartbeat > STALE_AFTER_S:
        return f"its heartbeat is {now - owner.heartbeat:.0f} s old (> {STALE_AFTER_S:.0f} s)"
    return None


class RunLock:
    """The claim of one run folder; use ``claim()`` rather than this class directly."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK
        self.info = LockInfo.mine()
        self.lost_to: LockInfo | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def try_acquire(self) -> LockInfo | None:
        """Claim the folder; return None on success, else the live owner."""
        for _ in range(10):  # a stale lock removed, or a lock released between our reads: try again
            if self._create():
                self._thread = threading.Thread(target=self._beat, name=f"heartbeat {self.folder.name}", daemon=True)
                self._thread.start()
                return None
            owner = read_lock(self.folder)
            if owner is None:
                continue
            reason = stale_reason(owner)
            if reason is None:
                return owner
            if self._break(owner):
                print(f"taking over run {self.folder.name}: the lock of {owner.describe()} is stale ({reason})",
                      file=sys.stderr, flush=True)
        return read_lock(self.folder) or LockInfo(UNKNOWN, -1, "", "", time.time(), "", time.time())

    def _create(self) -> bool:
        tmp = self.folder / f".{LOCK}.{self.info.token}"
        try:
            tmp.write_text(self.info.to_json())
            try:
                os.link(tmp, self.path)
                return True
            except FileExistsError:
                return False
            except OSError:  # no hard links on this file system: exclusive create instead
                try:
                    fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "w") as f:
                    f.write(self.info.to_json())
                return True
        except FileExistsError:
            return False
        except OSError as err:
            raise RunStoreError(
                f"cannot write the lock of run folder {self.folder}: {err.strerror or err}. The run store must be "
                f"writable by every worker: fix the folder's permissions (or free space), or point CDLIB_OUTPUTS at "
                f"a writable folder. No run was changed.") from err
        finally:
            tmp.unlink(missing_ok=True)

    def _break(self, seen: LockInfo) -> bool:
        """Remove the stale lock ``seen`` unless it changed meanwhile; True if removed."""
        mutex = self.folder / f"{LOCK}.break"
        try:
            fd = os.open(mutex, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:  # left behind by a worker that died while breaking?
                if time.time() - mutex.stat().st_mtime > BREAK_STALE_S:
                    mutex.unlink()
            except FileNotFoundError:
                pass
            time.sleep(0.1)
            return False
        os.close(fd)
        try:
            now = read_lock(self.folder)
            if now is None or (now.token, now.started) != (seen.token, seen.started):
                return False  # released or replaced since we looked: not ours to remove
            self.path.unlink(missing_ok=True)
            return True
        finally:
            mutex.unlink(missing_ok=True)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            owner = read_lock(self.folder)
            if (owner is None or owner.token != self.info.token) and not self._stop.is_set():
                self.lost_to = owner
                print(f"lock of run {self.folder.name} was taken over by "
                      f"{owner.describe() if owner else 'nobody (removed)'}; stopping this worker's training",
                      file=sys.stderr, flush=True)
                _thread.interrupt_main()
                return
            try:
                os.utime(self.path)
            except OSError:
                pass  # a transient NFS error; the next beat retries, and STALE_AFTER_S allows many misses

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        owner = read_lock(self.folder)
        if owner is not None and owner.token == self.info.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release()
        if self.lost_to is not None and exc_type is KeyboardInterrupt:
            raise LockLostError(f"run {self.folder.name} was taken over by another worker while this one trained "
                                f"(this worker's heartbeat had stopped); that worker finishes it.") from exc


def clear_stale(folder: Path) -> None:
    """Remove ``folder``'s lock if its owner is gone (left by a worker killed after finishing the run)."""
    owner = read_lock(folder)
    if owner is not None and stale_reason(owner):
        RunLock(folder)._break(owner)


def claim(folder: Path, on_locked: str = "wait", poll_s: float | None = None) -> RunLock:
    """Claim ``folder`` for training; the result is a context manager that releases the claim.

    If a live worker holds it: ``on_locked="wait"`` waits (saying once for whom) until that
    worker releases it or is found dead; ``"skip"`` raises :class:`RunLockedError`.
    """
    if on_locked not in ("wait", "skip"):
        raise ValueError(f"on_locked must be 'wait' or 'skip', got {on_locked!r}")
    lock, announced = RunLock(folder), False
    while True:
        owner = lock.try_acquire()
        if owner is None:
            return lock
        if on_locked == "skip":
            raise RunLockedError(folder, owner)
        if not announced:
            print(f"run {Path(folder).name} is being trained by {owner.describe()}; waiting for it to finish "
                  f"(a worker that dies is detected and its run taken over; pass on_locked='skip' not to wait)",
                  file=sys.stderr, flush=True)
            announced = True
        time.sleep(poll_s or POLL_S)
