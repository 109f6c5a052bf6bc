"""Background jobs: progress, cancel, logs, persisted state, at most N heavy jobs at a time.

A job is a plain function ``fn(ctx, *args)`` that reports through ``ctx.progress(fraction, msg)``,
writes ``ctx.log(msg)`` lines and calls ``ctx.check_cancelled()`` (or reads ``ctx.cancelled``)
between steps. The UI adapts ``gr.Progress``; the CLI adapts tqdm; a diffusers step callback can
forward both. State lives in ``jobs.db`` beside the dataset so a page reload (or a restart) shows
what ran; jobs found ``running`` at start-up are marked ``interrupted``.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pipelines.training import Cancelled

QUEUED, RUNNING, DONE, FAILED, CANCELLED, INTERRUPTED = (
    "queued", "running", "done", "failed", "cancelled", "interrupted")
FINISHED = (DONE, FAILED, CANCELLED, INTERRUPTED)


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
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._slots = threading.Semaphore(slots)
        self._contexts: dict[str, JobContext] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._conn = sqlite3.connect(self.db_path, check_same_thread=False, timeout=30)
        self._conn.row_factory = sqlite3.Row
        with self._lock, self._conn:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, kind TEXT, status TEXT, "
                "progress REAL, message TEXT, request TEXT, result TEXT, error TEXT, log TEXT, "
                "created_at REAL, started_at REAL, finished_at REAL)")
            self._conn.execute(
                "UPDATE jobs SET status=?, message='server restarted while running' "
                "WHERE status IN (?, ?)", (INTERRUPTED, RUNNING, QUEUED))

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
                "INSERT INTO jobs (id, kind, status, progress, message, request, created_at) "
                "VALUES (?, ?, ?, 0, 'queued', ?, ?)",
                (job_id, kind, QUEUED, json.dumps(request or {}, default=str), time.time()))
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
