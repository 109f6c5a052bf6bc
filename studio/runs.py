"""Evaluation / training runs recorded in the workspace database, so runs can be compared.

One row per run: kind (patchcore, ddpm-train, ddpm-eval, experiment), product, data folder,
all parameters (JSON), all metrics (JSON), the output folder, status and timestamps; ``scored``:
the pixel hashes of the images the run scored (JSON list; :meth:`RunLog.finish` ``scored=``), and
``stale``: why the run's numbers no longer hold (set by :meth:`RunLog.mark_stale` when an image it
scored becomes ``reference`` — ``Store.set_role`` does it — and shown wherever runs are listed);
``owner``: the process that runs it (:func:`studio.jobs.process_owner`) — a run left ``running``
by a process that is gone is marked ``interrupted`` at start-up (:meth:`RunLog.mark_interrupted`).
"""
from __future__ import annotations

import json
import threading
from datetime import datetime, timezone
from pathlib import Path

from studio.db import database


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class RunLog:
    def __init__(self, workspace: str | Path):
        self.path = Path(workspace) / "studio.db"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.db = database(self.path)  # shared by gradio worker and job threads (locked)
        if "runs" not in self.db.table_names():
            self.db["runs"].create({
                "id": int, "kind": str, "product": str, "data": str, "params": str, "metrics": str,
                "out_dir": str, "status": str, "error": str, "job_id": str,
                "created_at": str, "finished_at": str}, pk="id", if_not_exists=True)
            self.db["runs"].create_index(["kind", "product"], if_not_exists=True)
        cols = self.db["runs"].columns_dict
        for col in ("scored", "stale", "owner"):  # added later: older workspaces get them here
            if col not in cols:
                self.db["runs"].add_column(col, str)

    def start(self, kind: str, product: str, data: str, params: dict, out_dir: str,
              job_id: str | None = None) -> int:
        from studio.jobs import process_owner
        with self._lock:
            return self.db["runs"].insert({
                "kind": kind, "product": product, "data": str(data),
                "params": json.dumps(params, default=str), "metrics": None, "out_dir": str(out_dir),
                "status": "running", "error": None, "job_id": job_id, "created_at": _now(),
                "finished_at": None, "owner": process_owner()}).last_pk

    def mark_interrupted(self) -> list[int]:
        """Every ``running`` run whose process is gone (a crash, ``kill -9``, a restart) becomes
        ``interrupted``, its error saying so; returns their ids (the studio's start-up)."""
        from studio.jobs import owner_alive
        marked = []
        with self._lock:
            for r in list(self.db["runs"].rows_where("status = ?", ["running"])):
                if owner_alive(r.get("owner")):
                    continue
                self.db["runs"].update(r["id"], {
                    "status": "interrupted", "finished_at": _now(),
                    "error": "interrupted: the process running it stopped (a crash, a kill or a restart)"})
                marked.append(r["id"])
        return marked

    def finish(self, run_id: int, metrics: dict | None = None, status: str = "done",
               error: str | None = None, scored: list[str] | None = None) -> None:
        """Close a run; ``scored``: pixel hashes of the images it scored (for :meth:`mark_stale`)."""
        row = {"metrics": json.dumps(metrics, default=float) if metrics is not None else None,
               "status": status, "error": error, "finished_at": _now()}
        if scored is not None:
            row["scored"] = json.dumps(sorted(set(scored)))
        with self._lock:
            self.db["runs"].update(run_id, row)

    def mark_stale(self, became_reference: dict[str, str]) -> list[int]:
        """``became_reference``: ``{pixel hash: how to name the image}`` of images whose role just
        became ``reference``. Every run that scored one of them is marked stale ("stale: image …
        is now reference"); returns their ids."""
        if not became_reference:
            return []
        marked = []
        with self._lock:
            rows = list(self.db["runs"].rows_where("scored IS NOT NULL"))
            for r in rows:
                hit = sorted(set(json.loads(r["scored"] or "[]")) & set(became_reference))
                if not hit:
                    continue
                note = "; ".join(f"stale: {became_reference[h]} is now reference" for h in hit[:3])
                note += f" (+{len(hit) - 3} more)" if len(hit) > 3 else ""
                old = r.get("stale")
                self.db["runs"].update(r["id"], {"stale": f"{old}; {note}" if old else note})
                marked.append(r["id"])
        return marked

    def get(self, run_id: int) -> dict:
        with self._lock:
            row = dict(self.db["runs"].get(run_id))
        for k in ("params", "metrics"):
            row[k] = json.loads(row[k]) if row[k] else {}
        row["scored"] = json.loads(row["scored"]) if row.get("scored") else []
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
            row["scored"] = json.loads(row["scored"]) if row.get("scored") else []
        return rows


def mark_stale(workspace: str | Path, became_reference: dict[str, str]) -> list[int]:
    """:meth:`RunLog.mark_stale` on the workspace's runs table (nothing when it has none yet)."""
    if not became_reference or not (Path(workspace) / "studio.db").is_file():
        return []
    log = RunLog(workspace)
    try:
        return log.mark_stale(became_reference)
    finally:
        log.db.conn.close()
