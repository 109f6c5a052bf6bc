"""The SQLite-tracked dataset store: real images, masks and generated samples with provenance.

Layout of a workspace (paths in the database are relative to it, so the folder can be moved)::

    workspace/
      studio.db                                   SQLite (WAL), tables ``images`` and ``samples``
      files/<product>/images/<uuid>.png           real (or externally synthetic) RGB images
      files/<product>/masks/<uuid>.png            their masks, and the masks of samples (mode L)
      files/<product>/samples/<uuid>.png          generated candidates

Crash-safety contract: every file is written atomically (temp file in the same folder, flush +
fsync, ``os.replace``, fsync of the folder) *before* the transaction that inserts the row naming
it is committed. A crash (even ``SIGKILL``) therefore leaves at worst an orphan file, which
:meth:`Store.gc_orphans` removes, and never a row that points at a missing file.

Concurrency: each :class:`Store` owns one connection (``check_same_thread=False``) and a lock
taken around every database access, so one instance may be shared by UI worker threads; several
instances (threads or processes) may work on the same workspace - writes are serialised by
SQLite (``BEGIN IMMEDIATE`` + a 30 s busy timeout), reads never block in WAL mode.

Errors meant for the user are :class:`StoreError` (a ``ValueError``) with a readable message.
"""
from __future__ import annotations

import contextlib
import io
import json
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import sqlite_utils
from PIL import Image

from pipelines import roles as R
from studio.db import BUSY_TIMEOUT_S, database
from studio.store_types import (DEFAULT_DEFECT_LABEL, MAX_PIXELS, ORIGINS, SPLITS, STATUSES, StoreError,
                                as_mask, as_rgb, as_seed, atomic_write, check_choice, check_name, decode_file,
                                decode_sample, now_iso, params_json)

DB_NAME = "studio.db"
FILES_DIR = "files"

IMAGES_COLUMNS = {
    "id": int, "product": str, "split": str, "label": str, "origin": str, "path": str,
    "mask_path": str, "width": int, "height": int, "sha256": str, "source_path": str,
    "created_at": str,
    "role": str,      # real defect images: 'reference' (may be learned from / copied) | 'evaluation'
}
SAMPLES_COLUMNS = {
    "id": int, "product": str, "source_image_id": int, "damage_type": str, "color": str,
    "generator": str, "generator_version": str, "params": str, "seed": int, "status": str,
    "note": str, "image_path": str, "mask_path": str, "width": int, "height": int,
    "batch_id": str, "created_at": str, "updated_at": str, "reviewed_at": str,
    "sha256": str,  # pixel hash: lets a re-import of an export recognise samples it already has
    "ancestors": str,  # JSON list of the pixel hashes of the real images it descends from
}


def _pixel_sha256(arr: np.ndarray) -> str:
    """Hash of the decoded pixels (not the file bytes), so PNG/JPG re-encodes of the same pixels match.
    The same function gives the data roles of a folder (:func:`pipelines.roles.pixel_hash`)."""
    return R.pixel_hash(arr)


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()



# --------------------------------------------------------------------------------------------
# the store
# --------------------------------------------------------------------------------------------
class Store:
    """Dataset of one workspace folder. One instance per thread/process is fine, and one
    instance may also be shared by threads (an internal lock serialises its connection)."""

    def __init__(self, workspace: str | Path, *, max_pixels: int = MAX_PIXELS):
        self.root = Path(workspace).expanduser().resolve()
        self.files_dir = self.root / FILES_DIR
        self.db_path = self.root / DB_NAME
        self.max_pixels = int(max_pixels)
        self._lock = threading.RLock()
        self._closed = False
        try:
            self.files_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create the workspace folder {self.root}: {e}") from e
        try:
            self.db = database(self.db_path)
        except sqlite3.DatabaseError as e:
            raise StoreError(f"cannot open the dataset database {self.db_path}: {e}") from e
        try:
            self._create_schema()
        except sqlite3.DatabaseError as e:
            self.db.conn.close()
            raise StoreError(f"cannot open the dataset database {self.db_path}: {e}") from e
        except BaseException:
            self.db.conn.close()
            raise

    # ---- connection plumbing -----------------------------------------------------------------
    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self.db.conn.close()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("the dataset store is closed")

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite_utils.Database]:
        """One write transaction: ``BEGIN IMMEDIATE`` takes SQLite's write lock up front, so a
        read-then-write inside it can never fail with a stale snapshot."""
        with self._lock:
            self._check_open()
            conn = self.db.conn
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as e:
                raise StoreError(f"the dataset database is busy (waited {BUSY_TIMEOUT_S:.0f} s): {e}") from e
            try:
                yield self.db
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def query(self, sql: str, params: tuple | list | dict = ()) -> list[dict]:
        with self._lock:
            self._check_open()
            return list(self.db.query(sql, params))

    def _create_schema(self) -> None:
        with self._write() as db:
            db.create_table("images", IMAGES_COLUMNS, pk="id", if_not_exists=True,
                            not_null=["product", "split", "label", "origin", "path", "width",
                                      "height", "sha256", "created_at"])
            db.create_table("samples", SAMPLES_COLUMNS, pk="id", if_not_exists=True,
                            not_null=["product", "generator", "params", "seed", "status",
                                      "image_path", "mask_path", "width", "height", "created_at",
                                      "updated_at"],
                            defaults={"status": "candidate", "note": "", "generator_version": ""},
                            foreign_keys=[("source_image_id", "images", "id")])
            for name, columns in (("images", IMAGES_COLUMNS), ("samples", SAMPLES_COLUMNS)):
                existing = db[name].columns_dict  # older workspaces: add columns added since
                for col, typ in columns.items():
                    if col not in existing:
                        db[name].add_column(col, typ)
            indexes = [
                ("images", ["product", "split", "label", "sha256"], "ux_images_content", True),
                ("images", ["sha256"], "ix_images_sha256", False),
                ("samples", ["product", "status", "created_at"], "ix_samples_product_status_created", False),
                ("samples", ["status", "created_at"], "ix_samples_status_created", False),
                ("samples", ["product", "damage_type", "sha256"], "ix_samples_product_damage_sha", False),
                ("samples", ["source_image_id"], "ix_samples_source_image", False),
                ("samples", ["batch_id"], "ix_samples_batch", False),
            ]
            for table, cols, name, unique in indexes:
                db[table].create_index(cols, index_name=name, unique=unique, if_not_exists=True)

    # ---- files ---------------------------------------------------------------------------------
    def file_path(self, rel: str) -> Path:
        """Absolute path of a workspace-relative path stored in a row."""
        return self.root / rel

    def _write_png(self, product: str, kind: str, arr: np.ndarray) -> str:
        rel = f"{FILES_DIR}/{product}/{kind}/{uuid.uuid4().hex}.png"
        atomic_write(self.root / rel, _png_bytes(arr))
        return rel

    def _remove_files(self, rels: list[str]) -> None:
        for rel in rels:
            with contextlib.suppress(OSError):
                (self.root / rel).unlink()

    def _read_file(self, rel: str | None, kind: str, what: str) -> np.ndarray:
        path = self.root / rel
        if not path.is_file():
            raise StoreError(f"the file of {what} is missing: {path}")
        return decode_file(path, kind, max(self.max_pixels, MAX_PIXELS))

    # ---- images --------------------------------------------------------------------------------
    def add_image(self, product, image, *, split="train", label="good", origin="real", mask=None,
                  source_path=None) -> int:
        """Add a real (or externally synthetic) image; returns its id. The same pixels under the
        same product/split/label return the existing id instead of a new row.

        image: ``[H x W x 3]`` uint8 ndarray, PIL image or path; mask: ``[H x W]`` uint8 or None.
        """
        image_id, created = self.put_image(product, image, split=split, label=label, origin=origin,
                                            mask=mask, source_path=source_path)
        if created and label != "good" and origin == "real":
            self.assign_missing_roles(product)
        return image_id

    def put_image(self, product, image, *, split, label, origin, mask, source_path) -> tuple[int, bool]:
        """Returns ``(id, created)``."""
        check_name(product, "product")
        check_name(label, "label")
        check_choice(split, SPLITS, "split")
        check_choice(origin, ORIGINS, "origin")
        if source_path is None and isinstance(image, (str, Path)):
            source_path = str(image)
        rgb = as_rgb(image, self.max_pixels)
        m = as_mask(mask, rgb.shape[:2], self.max_pixels)
        sha = _pixel_sha256(rgb)
        key = (product, split, label, sha)
        find = "SELECT id FROM images WHERE product = ? AND split = ? AND label = ? AND sha256 = ?"
        existing = self.query(find, key)
        if existing:
            return existing[0]["id"], False
        written = [self._write_png(product, "images", rgb)]  # 1. files, atomically …
        try:
            if m is not None:
                written.append(self._write_png(product, "masks", m))
            with self._write() as db:                           # 2. … then the row
                existing = list(db.query(find, key))
                if existing:  # another writer added the same pixels meanwhile
                    image_id, created = existing[0]["id"], False
                else:
                    table = db["images"].insert({
                        "product": product, "split": split, "label": label, "origin": origin,
                        "path": written[0], "mask_path": written[1] if m is not None else None,
                        "width": int(rgb.shape[1]), "height": int(rgb.shape[0]), "sha256": sha,
                        "source_path": None if source_path is None else str(source_path),
                        "created_at": now_iso(),
                    })
                    image_id, created = int(table.last_pk), True
        except BaseException:
            self._remove_files(written)
            raise
        if not created:
            self._remove_files(written)
        return image_id, created

    def get_image(self, image_id) -> dict:
        rows = self.query("SELECT * FROM images WHERE id = ?", (_as_id(image_id, "image"),))
        if not rows:
            raise StoreError(f"unknown image id {image_id}")
        return rows[0]

    def load_image(self, image_id) -> np.ndarray:
        """``[H x W x 3]`` uint8 RGB."""
        row = self.get_image(image_id)
        return self._read_file(row["path"], "rgb", f"image {row['id']}")

    def load_mask(self, image_id) -> np.ndarray | None:
        """``[H x W]`` uint8, or None when the image has no mask."""
        row = self.get_image(image_id)
        if not row["mask_path"]:
            return None
        return self._read_file(row["mask_path"], "mask", f"the mask of image {row['id']}")

    def list_images(self, product=None, split=None, label=None, origin=None, role=None) -> list[dict]:
        where, params = _where(product=product, split=split, label=label, origin=origin, role=role)
        return self.query(f"SELECT * FROM images{where} ORDER BY id", params)

    # ---- data roles (see pipelines.roles) ------------------------------------------------------
    def assign_missing_roles(self, product) -> int:
        """Give every real defect image of ``product`` that has no role the deterministic rule's
        role (:func:`pipelines.roles.assign_roles` over all real defect images of its type).
        Roles already set (by an earlier import or by the user) are kept. Returns how many were set."""
        rows = self.query("SELECT id, label, sha256, role FROM images WHERE product = ? AND "
                           "origin = 'real' AND label != 'good'", (product,))
        todo = [r for r in rows if r["role"] not in R.ROLES]
        if not todo:
            return 0
        rule = R.assign_roles(((r["label"], r["sha256"]) for r in rows), R.DEFAULT_REFERENCE_FRACTION)
        with self._write() as db:
            for r in todo:
                db["images"].update(r["id"], {"role": rule[r["sha256"]]})
        return len(todo)

    def set_role(self, image_id, role: str) -> dict:
        """Change a real defect image's role ('reference' or 'evaluation')."""
        check_choice(role, R.ROLES, "role")
        row = self.get_image(image_id)
        if row["label"] == "good" or row["origin"] != "real":
            raise StoreError(f"image {row['id']} is a {row['origin']} '{row['label']}' image: only real "
                             "defect images have a role")
        with self._write() as db:
            db["images"].update(row["id"], {"role": role})
        out = self.get_image(row["id"])
        out["stale_runs"] = self._runs_gone_stale([row], role)
        return out

    def _runs_gone_stale(self, rows: list[dict], role: str) -> list[int]:
        """Runs that scored an image which just became ``reference`` are marked stale
        (:func:`studio.runs.mark_stale`); returns their ids."""
        if role != R.REFERENCE:
            return []
        changed = {r["sha256"]: f"image {r['id']} ({r['product']}/{r['label']}"
                   f"{'/' + Path(r['source_path']).name if r.get('source_path') else ''})"
                   for r in rows if r.get("role") != R.REFERENCE}
        from studio.runs import mark_stale
        return mark_stale(self.root, changed)

    def reference_defects(self, product, damage_type=None) -> list[dict]:
        """Real defect images with a mask that may be learned from or copied (role 'reference').
        The one query every store consumer uses: cut-paste donors, trainers, quality scores."""
        rows = self.list_images(product=product, label=damage_type, origin="real", role=R.REFERENCE)
        return [r for r in rows if r["label"] != "good" and r.get("mask_path")]

    def evaluation_hashes(self, product=None) -> set[str]:
        """Pixel hashes of the real images that are only ever scored."""
        where, params = _where(product=product, role=R.EVALUATION)
        return {r["sha256"] for r in self.query(f"SELECT sha256 FROM images{where}", params)}

    def sample_ancestors(self, sample_id) -> list[str]:
        """Pixel hashes of the real images a sample descends from (source image, donors, the
        training data of the model that made it)."""
        row = self.get_sample(sample_id)
        return list(row.get("ancestors") or [])

    def products(self) -> list[str]:
        rows = self.query("SELECT product FROM images UNION SELECT product FROM samples ORDER BY 1")
        return [r["product"] for r in rows]

    def labels(self, product) -> list[str]:
        """Labels of a product's images and sample damage types; 'good' first."""
        rows = self.query(
            "SELECT label FROM images WHERE product = ? UNION "
            "SELECT COALESCE(damage_type, ?) FROM samples WHERE product = ?",
            (product, DEFAULT_DEFECT_LABEL, product))
        return sorted((r["label"] for r in rows), key=lambda s: (s != "good", s))

    # ---- samples -------------------------------------------------------------------------------
    def add_sample(self, *, product, image, mask, source_image_id=None, damage_type=None, color=None,
                   generator, generator_version, params: dict, seed: int, status="candidate",
                   note="", batch_id=None, ancestors=()) -> int:
        """Store a generated candidate with its full provenance; returns the sample id.

        image: ``[H x W x 3]`` uint8 (ndarray/PIL/path); mask: ``[H x W]`` uint8 (required).
        ancestors: pixel hashes of the real images it descends from (donors, a trained model's
        training images); the source image's hash is added here.
        """
        check_name(product, "product")
        if damage_type is not None:
            check_name(damage_type, "damage type")
        check_choice(status, STATUSES, "status")
        if not isinstance(generator, str) or not generator.strip():
            raise StoreError("generator must be a non-empty name")
        rgb = as_rgb(image, self.max_pixels)
        if mask is None:
            raise StoreError("a sample needs a mask (H x W uint8)")
        m = as_mask(mask, rgb.shape[:2], self.max_pixels)
        now = now_iso()
        record = {
            "product": product, "damage_type": damage_type,
            "source_image_id": None if source_image_id is None else _as_id(source_image_id, "image"),
            "color": None if color is None else str(color), "generator": generator,
            "generator_version": "" if generator_version is None else str(generator_version),
            "params": params_json(params), "seed": as_seed(seed), "status": status,
            "note": "" if note is None else str(note),
            "batch_id": None if batch_id is None else str(batch_id),
            "created_at": now, "updated_at": now, "reviewed_at": None if status == "candidate" else now,
        }
        anc = set(ancestors or ())
        if record["source_image_id"] is not None:
            hit = self.query("SELECT sha256 FROM images WHERE id = ?", (record["source_image_id"],))
            anc.update(r["sha256"] for r in hit)   # an unknown id is refused by the insert below
        record["ancestors"] = json.dumps(sorted(anc))
        return self.put_sample(record, rgb, m)[0]

    def put_sample(self, record: dict, rgb: np.ndarray, mask: np.ndarray,
                       dedupe: bool = False) -> tuple[int, bool]:
        """Files first, then the row. ``dedupe``: an existing sample with the same product, damage
        type and pixels is returned instead (used by re-imports). Returns ``(id, created)``."""
        product, sha = record["product"], _pixel_sha256(rgb)
        find = "SELECT id FROM samples WHERE product = ? AND damage_type IS ? AND sha256 = ?"
        key = (product, record.get("damage_type"), sha)
        if dedupe and (hit := self.query(find, key)):
            return hit[0]["id"], False
        written = [self._write_png(product, "samples", rgb)]  # 1. files, atomically …
        try:
            written.append(self._write_png(product, "masks", mask))
            with self._write() as db:                            # 2. … then the row
                hit = list(db.query(find, key)) if dedupe else []
                src = record.get("source_image_id")
                if hit:
                    sample_id, created = hit[0]["id"], False
                elif src is not None and not list(db.query("SELECT 1 FROM images WHERE id = ?", (src,))):
                    raise StoreError(f"unknown source image id {src}")
                else:
                    table = db["samples"].insert({
                        **record, "image_path": written[0], "mask_path": written[1],
                        "width": int(rgb.shape[1]), "height": int(rgb.shape[0]), "sha256": sha,
                    })
                    sample_id, created = int(table.last_pk), True
        except BaseException:
            self._remove_files(written)
            raise
        if not created:
            self._remove_files(written)
        return sample_id, created

    def set_status(self, sample_id, status, note=None) -> dict:
        """'candidate' | 'accepted' | 'rejected'. Accept/reject stamp ``reviewed_at``; going back to
        'candidate' clears it. ``note`` replaces the note unless None. Returns the updated sample."""
        sid = _as_id(sample_id, "sample")
        check_choice(status, STATUSES, "status")
        now = now_iso()
        updates = {"status": status, "updated_at": now,
                   "reviewed_at": None if status == "candidate" else now}
        if note is not None:
            updates["note"] = str(note)
        with self._write() as db:
            if not list(db.query("SELECT 1 FROM samples WHERE id = ?", (sid,))):
                raise StoreError(f"unknown sample id {sample_id}")
            db["samples"].update(sid, updates)
        return self.get_sample(sid)

    def accept(self, sample_id, note=None) -> dict:
        return self.set_status(sample_id, "accepted", note)

    def reject(self, sample_id, note=None) -> dict:
        return self.set_status(sample_id, "rejected", note)

    def get_sample(self, sample_id) -> dict:
        """The sample row, ``params`` decoded from JSON."""
        rows = self.query("SELECT * FROM samples WHERE id = ?", (_as_id(sample_id, "sample"),))
        if not rows:
            raise StoreError(f"unknown sample id {sample_id}")
        return decode_sample(rows[0])

    def list_samples(self, product=None, status=None, damage_type=None, limit=None, offset=0) -> list[dict]:
        """Newest first."""
        if status is not None:
            check_choice(status, STATUSES, "status")
        where, params = _where(product=product, status=status, damage_type=damage_type)
        page = " LIMIT ? OFFSET ?"
        params += [-1 if limit is None else max(0, int(limit)), max(0, int(offset or 0))]
        rows = self.query(f"SELECT * FROM samples{where} ORDER BY created_at DESC, id DESC{page}", params)
        return [decode_sample(r) for r in rows]

    def samples_in_batch(self, batch_prefix: str) -> list[dict]:
        """Samples whose batch_id starts with ``batch_prefix`` (batch generation, resume)."""
        rows = self.query("SELECT * FROM samples WHERE batch_id LIKE ? ORDER BY id",
                           [batch_prefix.replace("%", "") + "%"])
        return [decode_sample(r) for r in rows]

    def load_sample_image(self, sample_id) -> np.ndarray:
        """``[H x W x 3]`` uint8 RGB."""
        row = self.get_sample(sample_id)
        return self._read_file(row["image_path"], "rgb", f"sample {row['id']}")

    def load_sample_mask(self, sample_id) -> np.ndarray:
        """``[H x W]`` uint8."""
        row = self.get_sample(sample_id)
        return self._read_file(row["mask_path"], "mask", f"the mask of sample {row['id']}")

    # ---- statistics ------------------------------------------------------------------------------
    def class_balance(self, product=None) -> list[dict]:
        """One row per (product, label): real_train, real_test, synthetic_accepted, candidates,
        rejected. A sample's label is its damage type ('defect' when it has none); images added with
        origin='synthetic' count as synthetic_accepted."""
        where, params = _where(product=product)
        image_rows = self.query(
            "SELECT product, label, SUM(origin = 'real' AND split = 'train') AS real_train, "
            "SUM(origin = 'real' AND split = 'test') AS real_test, "
            f"SUM(origin = 'synthetic') AS synthetic FROM images{where} GROUP BY product, label", params)
        sample_rows = self.query(
            "SELECT product, COALESCE(damage_type, ?) AS label, "
            "SUM(status = 'accepted') AS accepted, SUM(status = 'candidate') AS candidates, "
            f"SUM(status = 'rejected') AS rejected FROM samples{where} GROUP BY 1, 2",
            [DEFAULT_DEFECT_LABEL, *params])
        table: dict[tuple[str, str], dict] = {}

        def row(p, lab):
            return table.setdefault((p, lab), {"product": p, "label": lab, "real_train": 0, "real_test": 0,
                                               "synthetic_accepted": 0, "candidates": 0, "rejected": 0})
        for r in image_rows:
            b = row(r["product"], r["label"])
            b["real_train"] += r["real_train"] or 0
            b["real_test"] += r["real_test"] or 0
            b["synthetic_accepted"] += r["synthetic"] or 0
        for r in sample_rows:
            b = row(r["product"], r["label"])
            b["synthetic_accepted"] += r["accepted"] or 0
            b["candidates"] += r["candidates"] or 0
            b["rejected"] += r["rejected"] or 0
        return [table[k] for k in sorted(table, key=lambda k: (k[0], k[1] != "good", k[1]))]

    # ---- import / export: the formats live in studio.formats (import: studio.formats.import_any) ----
    def import_mvtec(self, category_dir, product=None) -> dict:
        """Import an MVTec AD category folder (:func:`studio.formats.import_any` with kind 'mvtec',
        minus its ``kind`` key)."""
        from studio.formats import import_any
        report = import_any(self, category_dir, "mvtec", product)
        report.pop("kind")
        return report

    def export_mvtec(self, out_dir, product) -> dict:
        """Write ``OUT/<product>/`` in MVTec AD layout (see :func:`studio.formats.mvtec.export_product`)."""
        from studio.formats import mvtec
        return mvtec.export_product(self, out_dir, product)

    def set_roles(self, roles: dict[int, str]) -> None:
        """Set the data role of several real defect images at once (one transaction)."""
        for role in roles.values():
            check_choice(role, R.ROLES, "role")
        before = {int(i): self.get_image(int(i)) for i in roles}
        with self._write() as db:
            for image_id, role in roles.items():
                db["images"].update(int(image_id), {"role": role})
        self._runs_gone_stale([before[int(i)] for i, r in roles.items() if r == R.REFERENCE], R.REFERENCE)

    # ---- maintenance -----------------------------------------------------------------------------
    def integrity_check(self) -> str:
        """Result of ``PRAGMA integrity_check``: 'ok' when the database is sound."""
        rows = self.query("PRAGMA integrity_check")
        return "\n".join(str(next(iter(r.values()))) for r in rows)

    def _referenced_files(self) -> list[tuple[str, int, str]]:
        rows = self.query(
            "SELECT 'images' AS tbl, id, path AS rel FROM images UNION ALL "
            "SELECT 'images', id, mask_path FROM images WHERE mask_path IS NOT NULL UNION ALL "
            "SELECT 'samples', id, image_path FROM samples UNION ALL "
            "SELECT 'samples', id, mask_path FROM samples WHERE mask_path IS NOT NULL")
        return [(r["tbl"], r["id"], r["rel"]) for r in rows]

    def dangling_rows(self) -> list[str]:
        """Rows naming a file that does not exist, as ``'<table> <id>: missing <path>'``."""
        return [f"{tbl} {rid}: missing {rel}" for tbl, rid, rel in self._referenced_files()
                if not rel or not (self.root / rel).is_file()]

    def orphan_files(self, min_age_s: float = 60.0) -> list[Path]:
        """Files under ``files/`` that no row names (crash leftovers, temp files), older than
        ``min_age_s`` (a younger one may belong to a row another process is about to commit)."""
        present = [p for p in self.files_dir.rglob("*") if p.is_file()]  # list files first …
        referenced = {rel for _, _, rel in self._referenced_files()}       # … then read the rows
        now, out = time.time(), []
        for p in present:
            if p.relative_to(self.root).as_posix() in referenced:
                continue
            try:
                if now - p.stat().st_mtime >= min_age_s:
                    out.append(p)
            except FileNotFoundError:
                continue
        return out

    def gc_orphans(self, min_age_s: float = 60.0, removed: list[str] | None = None) -> int:
        """Delete :meth:`orphan_files` (``min_age_s``); returns the count. ``removed``: a list the
        deleted files' paths (relative to the workspace) are appended to, for a log."""
        count = 0
        for p in self.orphan_files(min_age_s):
            try:
                p.unlink()
            except FileNotFoundError:
                continue
            count += 1
            if removed is not None:
                removed.append(p.relative_to(self.root).as_posix())
        return count


# --------------------------------------------------------------------------------------------
# small row helpers
# --------------------------------------------------------------------------------------------
def _as_id(value: Any, what: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise StoreError(f"invalid {what} id {value!r}") from None



def _where(**filters) -> tuple[str, list]:
    clauses, params = [], []
    for col, value in filters.items():
        if value is not None:
            clauses.append(f"{col} = ?")
            params.append(value)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params
