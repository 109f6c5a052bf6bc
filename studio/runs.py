"""Evaluation / training runs recorded in the workspace database, so runs can be compared.

One row per run: kind (patchcore, ddpm-train, ddpm-eval, experiment), product, data folder,
all parameters (JSON), all metrics (JSON), the output folder, status and timestamps.
"""
from __future__ import annotations

import json
import sqlite3
import threading
from datetime import datetime, timezone
from pathlib import Path

import sqlite_utils


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class RunLog:
    def __init__(self, workspace: str | Path):
        self.path = Path(workspace) / "studio.db"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        conn = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30)
        self.db = sqlite_utils.Database(conn)  # shared by gradio worker and job threads (locked)
        self.db.conn.execute("PRAGMA busy_timeout = 30000")
        self.db.conn.execute("PRAGMA journal_mode = WAL")
        if "runs" not in self.db.table_names():
            self.db["runs"].create({
                "id": int, "kind": str, "product": str, "data": str, "params": str, "metrics": str,
                "out_dir": str, "status": str, "error": str, "job_id": str,
                "created_at": str, "finished_at": str}, pk="id", if_not_exists=True)
            self.db["runs"].create_index(["kind", "product"], if_not_exists=True)

    def start(self, kind: str, product: str, data: str, params: dict, out_dir: str,
              job_id: str | None = None) -> int:
        with self._lock:
            return self.db["runs"].insert({
                "kind": kind, "product": product, "data": str(data),
                "params": json.dumps(params, default=str), "metrics": None, "out_dir": str(out_dir),
                "status": "running", "error": None, "job_id": job_id, "created_at": _now(),
                "finished_at": None}).last_pk

    def finish(self, run_id: int, metrics: dict | None = None, status: str = "done",
               error: str | None = None) -> None:
        with self._lock:
            self.db["runs"].update(run_id, {
                "metrics": json.dumps(metrics, default=float) if metrics is not None else None,
                "status": status, "error": error, "finished_at": _now()})

    def get(self, run_id: int) -> dict:
        with self._lock:
            row = dict(self.db["runs"].get(run_id))
        for k in ("params", "metrics"):
            row[k] = json.loads(row[k]) if row[k] else {}
        return row

    def list(self, kind: str | None = None, product: str | None = None, limit: int = 100) -> list[dict]:
        where, args = [], []
        if kind:
            where.append("kind = ?")
            args.append(kind)
        if product:
            where.append("product = ?")
            args.append(product)
        with self._lock:
            rows = list(self.db["runs"].rows_where(" AND ".join(where) or None, args,
                                                   order_by="id desc", limit=limit))
        for row in rows:
            for k in ("params", "metrics"):
                row[k] = json.loads(row[k]) if row[k] else {}
        return rows
