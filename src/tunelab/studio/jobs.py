"""Jobs: ``tunelab train`` and ``tunelab eval`` as detached processes the studio can lose and find.

A job is started in its own session and process group (``start_new_session``), with stdin
closed and stdout/stderr going to a log file in its folder, never to a pipe: nothing the
studio does, a closed browser tab or the studio itself exiting, can block or kill it.

Its record, ``FOLDER/studio/job.json`` (written atomically), holds the pid, the process
group, the process's start time as the kernel counts it and the boot it belongs to. A
restarted studio reads the records and re-attaches to every job whose pid is alive *and*
still the same process (a pid reused by another program has another start time).

Stop sends SIGINT to the process group: the trainer's ``SaveOnInterrupt`` callback
finishes the current step, saves a checkpoint and exits. If the job is still alive after
``stop_timeout`` seconds, the whole group gets SIGTERM, then SIGKILL: no orphans. The
deadline is kept in the record, so a studio restarted meanwhile enforces it too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.io import write_json
from tunelab.studio.workspace import STUDIO_DIR

KILL_GRACE = 5.0
"""Seconds between SIGTERM and SIGKILL once the stop timeout has passed."""


@dataclass
class JobRecord:
    kind: str
    """``train`` or ``eval``."""
    folder: str
    """The run (or compare) folder, absolute."""
    command: list[str]
    cwd: str
    log: str
    pid: int
    pgid: int
    start_ticks: int | None
    """Process start time in clock ticks since boot (/proc/PID/stat field 22): identifies the process."""
    boot_id: str | None
    started_at: float
    studio_pid: int
    stop_requested_at: float | None = None
    terminated_at: float | None = None
    ended_at: float | None = None
    exit_code: int | None = None
    """Known when this studio started the job and reaped it; None when it ended while no studio watched."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """Earlier jobs in the same folder (a run stopped and resumed): their commands and outcomes."""

    @property
    def path(self) -> Path:
        return Path(self.folder) / STUDIO_DIR / "job.json"

    def save(self) -> None:
        write_json(self.path, asdict(self))

    @classmethod
    def load(cls, folder: Path) -> "JobRecord | None":
        import json

        path = Path(folder) / STUDIO_DIR / "job.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
        except (OSError, ValueError, TypeError):
            return None


# ---------------------------------------------------------------- is that process still ours?


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state is [0], start time [19])."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def start_ticks(pid: int) -> int | None:
    fields = _proc_stat(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None


def alive_and_ours(record: JobRecord) -> bool:
    """The record's process exists, is not a zombie, and is the very process the record names."""
    if Path("/proc").is_dir() and Path("/proc/self/stat").exists():
        fields = _proc_stat(record.pid)
        if fields is None or fields[0] in ("Z", "X"):
            return False
        if record.boot_id and _boot_id() and record.boot_id != _boot_id():
            return False
        if record.start_ticks is not None and int(fields[19]) != record.start_ticks:
            return False  # the pid was reused by another process
    else:  # no /proc (macOS): the pid and its process group are all there is to check
        try:
            os.kill(record.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return False  # someone else's process: not ours
    try:
        return os.getpgid(record.pid) == record.pgid
    except OSError:
        return False


# ---------------------------------------------------------------- the manager


class JobManager:
    """Starts, stops and watches jobs; one per studio process (thread-safe)."""

    def __init__(self, stop_timeout: float = 60.0, poll: float = 1.0):
        self.stop_timeout = stop_timeout
        self.poll = poll
        self._children: dict[str, subprocess.Popen] = {}
        self._active: set[str] = set()
        """Folders whose job has not been seen to end: the watcher checks these."""
        self._lock = threading.RLock()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # -------------------------------------------------------- start

    def launch(self, kind: str, folder: Path, args: list[str], cwd: Path, log_name: str) -> JobRecord:
        """Start ``python -m tunelab ARGS`` detached, logging to ``FOLDER/studio/LOG_NAME``."""
        folder = Path(folder)
        with self._lock:
            previous = self.check(folder)
            if previous is not None and previous.ended_at is None:
                raise TunelabError(f"{folder.name}: a job is already running there (pid {previous.pid})")
            studio_dir = folder / STUDIO_DIR
            studio_dir.mkdir(parents=True, exist_ok=True)
            log_path = studio_dir / log_name
            command = [sys.executable, "-m", "tunelab", *args]
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            with open(log_path, "ab") as log:
                log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} tunelab {' '.join(args)}\n".encode())
                log.flush()
                proc = subprocess.Popen(command, cwd=str(cwd), stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True, env=env,
                                        close_fds=True)
            history = []
            if previous is not None:
                history = [*previous.history, {k: getattr(previous, k) for k in (
                    "command", "started_at", "ended_at", "exit_code", "stop_requested_at")}]
            record = JobRecord(kind=kind, folder=str(folder), command=command, cwd=str(cwd), log=str(log_path),
                               pid=proc.pid, pgid=os.getpgid(proc.pid), start_ticks=start_ticks(proc.pid),
                               boot_id=_boot_id(), started_at=time.time(), studio_pid=os.getpid(),
                               history=history)
            record.save()
            self._children[str(folder)] = proc
            self._active.add(str(folder))
            return record

    # -------------------------------------------------------- stop

    def stop(self, folder: Path) -> JobRecord:
        """Ask the job to checkpoint and exit (SIGINT); the watcher ends it after the timeout."""
        with self._lock:
            record = JobRecord.load(Path(folder))
            if record is None or record.ended_at is not None or not self.running(record):
                raise TunelabError(f"{Path(folder).name}: no running job to stop")
            if record.stop_requested_at is None:  # once: a second SIGINT would abort the checkpoint
                record.stop_requested_at = time.time()
                record.save()
                self._signal(record, signal.SIGINT)
            return record

    def _signal(self, record: JobRecord, sig: int) -> None:
        try:
            os.killpg(record.pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    # -------------------------------------------------------- watching

    def running(self, record: JobRecord) -> bool:
        """Alive and ours; reaps our own children on the way so they never linger as zombies."""
        proc = self._children.get(record.folder)
        if proc is not None and proc.pid == record.pid:
            return proc.poll() is None
        return alive_and_ours(record)

    def check(self, folder: Path) -> JobRecord | None:
        """The folder's job record, updated: an ended job gets its end time (and exit code if known)."""
        with self._lock:
            record = JobRecord.load(Path(folder))
            if record is None or record.ended_at is not None:
                self._active.discard(str(folder))
                return record
            if self.running(record):
                self._active.add(record.folder)
                self._enforce_timeout(record)
                return record
            self._active.discard(record.folder)
            proc = self._children.pop(record.folder, None)
            if proc is not None and proc.pid == record.pid:
                record.exit_code = proc.returncode
            record.ended_at = time.time()
            record.save()
            return record

    def _enforce_timeout(self, record: JobRecord) -> None:
        if record.stop_requested_at is None:
            return
        waited = time.time() - record.stop_requested_at
        if record.terminated_at is None and waited > self.stop_timeout:
            record.terminated_at = time.time()
            record.save()
            self._signal(record, signal.SIGTERM)
        elif record.terminated_at is not None and time.time() - record.terminated_at > KILL_GRACE:
            self._signal(record, signal.SIGKILL)

    def attach(self, folders: list[Path]) -> list[JobRecord]:
        """Re-attach to every running job among ``folders`` (at start-up); close out the ended ones."""
        found = []
        for folder in folders:
            record = self.check(folder)
            if record is not None and record.ended_at is None:
                found.append(record)
        return found

    def watch(self) -> None:
        """Check the active jobs every ``poll`` seconds in a daemon thread (reaping, stop timeouts)."""
        def loop():
            while not self._stopping.wait(self.poll):
                with self._lock:
                    folders = sorted(self._active | set(self._children))
                for folder in folders:
                    try:
                        self.check(Path(folder))
                    except OSError:
                        continue

        if self._thread is None:
            self._thread = threading.Thread(target=loop, name="tunelab-studio-jobs", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop watching. Jobs keep running: they belong to their folders, not to this process."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
