"""Background jobs: progress, cancel, logs, persisted state, at most N heavy jobs at a time.

A job is a plain function ``fn(ctx, *args)`` that reports through ``ctx.progress(fraction, msg)``,
writes ``ctx.log(msg)`` lines and calls ``ctx.check_cancelled()`` (or reads ``ctx.cancelled``)
between steps. The UI adapts ``gr.Progress``; the CLI adapts tqdm; a diffusers step callback can
forward both. State lives in ``jobs.db`` beside the dataset so a page reload (or a restart) shows
what ran. Each row names the process that runs it (:func:`process_owner`); a job found ``running``
or ``queued`` at start-up whose process is gone (a crash, ``kill -9``, a restart) is marked
``interrupted`` with a message saying so, and :meth:`JobManager.rerun` starts it again (a training
run resumes from its last checkpoint, an experiment reruns the same request) once.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sqlite3
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pipelines.training import Cancelled
from studio.db import connect

QUEUED, RUNNING, DONE, FAILED, CANCELLED, INTERRUPTED = (
    "queued", "running", "done", "failed", "cancelled", "interrupted")
FINISHED = (DONE, FAILED, CANCELLED, INTERRUPTED)
# what an interrupted job of a kind offers (the jobs panel's Resume / Rerun button)
RERUN_HINT = {k: "press Resume to continue from its last checkpoint"
              for k in ("train", "train-wall", "train-controlnet")}
RERUN_HINT["experiment"] = "press Rerun to run the same request again"


log = logging.getLogger("defect_studio")


# -- which process runs a job ----------------------------------------------------------------------
def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
    except OSError:
        return ""


def _start_ticks(pid: int) -> str:
    """The process's start time (clock ticks since boot, /proc/PID/stat field 22): with the pid it
    names one process even after the pid is reused. "" where /proc is missing (not Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def process_owner(pid: int | None = None) -> str:
    """``host/boot/pid/start``: the process (default: this one) that runs a job or a run."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}/{_boot_id()}/{pid}/{_start_ticks(pid)}"


def owner_alive(owner: str | None) -> bool:
    """Whether the process ``owner`` (:func:`process_owner`) still runs. Rows of another host are
    taken as alive (it cannot be checked from here); rows without an owner (written before owners
    were recorded) as dead."""
    try:
        host, boot, pid, start = (owner or "").split("/")
        pid_n = int(pid)
    except ValueError:
        return False
    if host != socket.gethostname():
        return True
    if boot and boot != _boot_id():
        return False                           # the machine restarted since
    now = _start_ticks(pid_n)
    if now or start:
        return now == start                    # gone ("") or another process with that pid
    try:                                       # no /proc: the pid alone
        os.kill(pid_n, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# The one cancel exception (pipelines.training.Cancelled): raised inside a job by
# ``check_cancelled`` once cancel was requested, and by any pipeline whose cancel flag fired.
JobCancelled = Cancelled


@dataclass
class JobContext:
    job_id: str
    _manager: "JobManager"
    _cancel: threading.Event = field(default_factory=threading.Event)
    _callbacks: list[Callable[[float, str], None]] = field(default_factory=list)

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def check_cancelled(self) -> None:
        if self._cancel.is_set():
            raise JobCancelled(f"job {self.job_id} cancelled")

    def progress(self, fraction: float, message: str = "") -> None:
        fraction = float(min(max(fraction, 0.0), 1.0))
        self._manager._update(self.job_id, progress=fraction, message=message)
        for cb in self._callbacks:
            cb(fraction, message)
        self.check_cancelled()

    def log(self, message: str) -> None:
        self._manager._append_log(self.job_id, message)


class JobManager:
    """Runs jobs in daemon threads; ``slots`` bounds concurrent heavy jobs (one per GPU).
    ``check_request(request)`` (the web studio's: :func:`studio.paths.confine_request`) sees every
    request before its job is queued and refuses it by raising."""

    def __init__(self, db_path: str | Path, slots: int = 1,
                 check_request: Callable[[dict], None] | None = None):
        self.db_path = Path(db_path)
        self.check_request = check_request
        self.owner = process_owner()
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._slots = threading.Semaphore(slots)
        self._rerun_lock = threading.Lock()
        self._contexts: dict[str, JobContext] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._conn = connect(self.db_path, row_factory=sqlite3.Row)
        with self._lock, self._conn:
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, kind TEXT, status TEXT, "
                "progress REAL, message TEXT, request TEXT, result TEXT, error TEXT, log TEXT, "
                "created_at REAL, started_at REAL, finished_at REAL)")
            if "owner" not in {r[1] for r in self._conn.execute("PRAGMA table_info(jobs)")}:
                self._conn.execute("ALTER TABLE jobs ADD COLUMN owner TEXT")   # older jobs.db
        self.recovered = self.mark_interrupted()

    def mark_interrupted(self) -> list[str]:
        """Every ``running`` / ``queued`` job whose process is gone becomes ``interrupted`` with a
        message saying what happened and what to do; returns their ids (run at start-up)."""
        with self._lock, self._conn:
            rows = self._conn.execute("SELECT id, kind, status, owner FROM jobs WHERE status IN (?, ?)",
                                      (RUNNING, QUEUED)).fetchall()
            dead = [r for r in rows if not owner_alive(r["owner"])]
            for r in dead:
                pid = (r["owner"] or "").split("/")[2:3]
                who = f" {pid[0]}" if pid else ""
                self._conn.execute(
                    "UPDATE jobs SET status=?, message=?, finished_at=? WHERE id=?",
                    (INTERRUPTED, f"the studio process{who} stopped while the job was "
                                  f"{r['status']} (a crash, a kill or a restart); "
                                  + RERUN_HINT.get(r["kind"], "start it again"), time.time(), r["id"]))
        for r in dead:
            log.warning("job %s (%s) was %s in a process that is gone: marked interrupted",
                        r["id"], r["kind"], r["status"])
        return [r["id"] for r in dead]

    # -- persistence -------------------------------------------------------------------------
    def _update(self, job_id: str, **cols: Any) -> None:
        sets = ", ".join(f"{k}=?" for k in cols)
        with self._lock, self._conn:
            self._conn.execute(f"UPDATE jobs SET {sets} WHERE id=?", (*cols.values(), job_id))

    def _append_log(self, job_id: str, line: str) -> None:
        with self._lock, self._conn:
            self._conn.execute("UPDATE jobs SET log = coalesce(log, '') || ? WHERE id=?",
                               (f"{time.strftime('%H:%M:%S')} {line}\n", job_id))

    def get(self, job_id: str) -> dict:
        with self._lock:
            row = self._conn.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            raise KeyError(f"no job {job_id!r}")
        out = dict(row)
        for key in ("request", "result"):
            out[key] = json.loads(out[key]) if out[key] else None
        return out

    def list(self, kind: str | None = None, limit: int = 50) -> list[dict]:
        q = "SELECT id, kind, status, progress, message, created_at, finished_at FROM jobs"
        args: tuple = ()
        if kind:
            q, args = q + " WHERE kind=?", (kind,)
        with self._lock:
            rows = self._conn.execute(q + " ORDER BY created_at DESC LIMIT ?", (*args, limit)).fetchall()
        return [dict(r) for r in rows]

    # -- running -----------------------------------------------------------------------------
    def submit(self, kind: str, fn: Callable[..., Any], *args: Any, request: dict | None = None,
               on_progress: Callable[[float, str], None] | None = None) -> str:
        if self.check_request is not None:
            self.check_request(request or {})
        job_id = uuid.uuid4().hex[:12]
        ctx = JobContext(job_id, self)
        if on_progress:
            ctx._callbacks.append(on_progress)
        with self._lock, self._conn:
            self._conn.execute(
                "INSERT INTO jobs (id, kind, status, progress, message, request, created_at, owner) "
                "VALUES (?, ?, ?, 0, 'queued', ?, ?, ?)",
                (job_id, kind, QUEUED, json.dumps(request or {}, default=str), time.time(), self.owner))
        self._contexts[job_id] = ctx
        thread = threading.Thread(target=self._run, args=(ctx, fn, args), daemon=True,
                                  name=f"job-{kind}-{job_id}")
        self._threads[job_id] = thread
        thread.start()
        return job_id

    def _run(self, ctx: JobContext, fn: Callable[..., Any], args: tuple) -> None:
        with self._slots:
            if ctx.cancelled:
                self._update(ctx.job_id, status=CANCELLED, message="cancelled before start",
                             finished_at=time.time())
                return
            self._update(ctx.job_id, status=RUNNING, started_at=time.time(), message="running")
            try:
                result = fn(ctx, *args)
            except JobCancelled:
                self._update(ctx.job_id, status=CANCELLED, message="cancelled", finished_at=time.time())
            except Exception as exc:  # recorded, never swallowed: status + traceback in the log
                ctx.log(traceback.format_exc())
                self._update(ctx.job_id, status=FAILED, error=f"{type(exc).__name__}: {exc}",
                             message=str(exc), finished_at=time.time())
            else:
                self._update(ctx.job_id, status=DONE, progress=1.0, message="done",
                             result=json.dumps(result, default=str), finished_at=time.time())

    def rerun(self, job_id: str, submit: Callable[[dict], str]) -> str:
        """Start an ``interrupted`` job again, once: ``submit(its request) -> new job id`` (a
        training run resumes from its last checkpoint, an experiment reruns the same request). The
        old job's message and result name the new job. ``ValueError`` when the job is not
        interrupted or was started again already."""
        with self._rerun_lock:
            job = self.get(job_id)
            if job["status"] != INTERRUPTED:
                raise ValueError(f"only an interrupted job can be resumed or rerun; this {job['kind']} job "
                                 f"is {job['status']}")
            again = (job["result"] or {}).get("rerun_as") if isinstance(job["result"], dict) else None
            if again:
                raise ValueError(f"this {job['kind']} job was started again already (job {again})")
            new_id = submit(job["request"] or {})
            self._update(job_id, result=json.dumps({"rerun_as": new_id}),
                         message=f"{job['message'] or 'interrupted'} — started again as job {new_id}")
        self._append_log(new_id, f"started again from interrupted job {job_id}")
        return new_id

    def cancel(self, job_id: str) -> None:
        ctx = self._contexts.get(job_id)
        if ctx is None:
            raise KeyError(f"no running job {job_id!r}")
        ctx._cancel.set()

    def wait(self, job_id: str, timeout: float | None = None) -> dict:
        thread = self._threads.get(job_id)
        if thread is not None:
            thread.join(timeout)
        return self.get(job_id)
