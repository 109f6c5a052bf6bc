"""Curation at scale: a balancing plan, batch generation (resumable, no duplicates), automatic
pre-screening of candidates, a review queue, and per-class quality of the synthetic set.

Plans and pre-screen scores live in the workspace database next to the samples:
  plans(id, product, params, summary, created_at)
  plan_items(plan_id, idx, label, source_image_id, style, seed, backend, status, sample_id)
  prescreen(sample_id, scores, auto_rejected, reason)
A plan item's sample carries ``batch_id = "plan<id>:<idx>"``, so a resumed batch skips items whose
sample already exists even when a crash hit between writing the sample and marking the item.
"""
from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import sqlite_utils

from pipelines.quality import crop_features, defect_crop, diversity, kid

from studio.catalog import GOOD


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class CurationError(ValueError):
    """A user-facing problem with a plan or a batch (message shown as-is)."""


@dataclass
class Thresholds:
    max_outside_change: int = 0         # any change outside the feathered mask → reject
    min_visibility: float = 1.15        # PatchCore score inside / outside the mask
    min_duplicate_distance: int = 5     # perceptual-hash bits between defect crops


class CurationDB:
    def __init__(self, workspace: str | Path):
        path = Path(workspace) / "studio.db"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.db = sqlite_utils.Database(sqlite3.connect(str(path), check_same_thread=False, timeout=30))
        self.db.conn.execute("PRAGMA journal_mode = WAL")
        with self._lock:
            self.db["plans"].create({"id": int, "product": str, "params": str, "summary": str,
                                     "created_at": str}, pk="id", if_not_exists=True)
            self.db["plan_items"].create({"plan_id": int, "idx": int, "label": str, "source_image_id": int,
                                          "style": str, "seed": int, "backend": str, "status": str,
                                          "sample_id": int}, pk=("plan_id", "idx"), if_not_exists=True)
            self.db["prescreen"].create({"sample_id": int, "scores": str, "auto_rejected": int,
                                         "reason": str}, pk="sample_id", if_not_exists=True)

    def q(self, sql: str, args=()) -> list[dict]:
        with self._lock:
            cur = self.db.conn.execute(sql, args)
            cols = [c[0] for c in cur.description] if cur.description else []
            return [dict(zip(cols, r)) for r in cur.fetchall()]

    def execute(self, sql: str, args=()) -> None:
        with self._lock, self.db.conn:
            self.db.conn.execute(sql, args)


# ---------------------------------------------------------------------------------------------
# Balancing and planning
# ---------------------------------------------------------------------------------------------
def balance(store, product: str, labels: list[str] | None = None) -> list[dict]:
    """Per defect class: real (train + test) and accepted synthetic counts."""
    rows = [r for r in store.class_balance(product) if r["label"] != GOOD]
    from studio.catalog import Catalog
    known = {r["label"] for r in rows}
    for lab in Catalog().damage_types(product):
        if lab != GOOD and lab not in known:
            rows.append({"product": product, "label": lab, "real_train": 0, "real_test": 0,
                         "synthetic_accepted": 0, "candidates": 0, "rejected": 0})
    reference: dict[str, int] = {}       # cut-paste may copy these only (data role 'reference')
    for r in store.reference_defects(product):
        reference[r["label"]] = reference.get(r["label"], 0) + 1
    out = []
    for r in sorted(rows, key=lambda r: r["label"]):
        if labels and r["label"] not in labels:
            continue
        real = int(r.get("real_train", 0)) + int(r.get("real_test", 0))
        out.append({"label": r["label"], "real": real, "reference": reference.get(r["label"], 0),
                    "synthetic_accepted": int(r["synthetic_accepted"]),
                    "candidates": int(r.get("candidates", 0)), "current": real + int(r["synthetic_accepted"])})
    return out


def make_plan(store, cdb: CurationDB, product: str, target: int | None = None,
              labels: list[str] | None = None, backends: tuple[str, ...] = ("perlin", "cutpaste"),
              oversample: float = 1.0, seed: int = 0) -> dict:
    """A generation plan prioritised by deficit, spread over sources, seeds and backends."""
    from pipelines.classical import style_for

    full = balance(store, product)
    if labels:
        unknown = sorted(set(labels) - {b["label"] for b in full})
        if unknown:
            raise CurationError(f"unknown classes for {product!r}: {', '.join(unknown)}; known: "
                                f"{', '.join(b['label'] for b in full)}")
    bal = [b for b in full if not labels or b["label"] in labels]
    if not bal:
        raise CurationError(f"product {product!r} has no defect classes to balance")
    largest = max(b["current"] for b in bal)
    goal = largest if not target else int(target)
    below = [b for b in bal if b["current"] > goal]
    if target and below:
        worst = max(below, key=lambda b: b["current"])
        raise CurationError(f"target {goal} is below the current count of {worst['label']!r} "
                            f"({worst['current']}); choose at least {worst['current']}")
    sources = [r for r in store.list_images(product=product, label=GOOD) if r["split"] in ("train", "upload")]
    if not sources:
        raise CurationError(f"no source images: product {product!r} has no good images to paint "
                            f"defects on (classes {', '.join(b['label'] for b in bal)}) — import some first")
    if not backends:
        raise CurationError("choose at least one backend")
    from pipelines.registry import get_info
    for bk in backends:
        try:
            if get_info(bk).mode != "damage":
                raise CurationError(f"backend {bk!r} makes wall colours, not defects")
        except KeyError as exc:
            raise CurationError(str(exc.args[0])) from exc
    items, summary = [], []
    queues = {}
    for b in sorted(bal, key=lambda b: goal - b["current"], reverse=True):
        deficit = max(0, goal - b["current"])
        n = int(np.ceil(deficit * max(oversample, 1.0)))
        allowed = [bk for bk in backends if not get_info(bk).needs_donors or b["reference"] > 0]
        if n and not allowed:
            raise CurationError(f"class {b['label']!r} has no reference real defects to copy "
                                f"({', '.join(backends)} need donors; evaluation images are never "
                                "copied); add a generator that needs none, e.g. 'perlin'")
        queues[b["label"]] = (n, allowed)
        summary.append({**b, "target": goal, "deficit": deficit, "planned": n,
                        "backends": ", ".join(allowed)})
    # interleave classes so a cancelled batch still improves the worst ones first
    counters = {lab: 0 for lab in queues}
    while any(counters[lab] < queues[lab][0] for lab in queues):
        for lab, (n, allowed) in queues.items():
            if counters[lab] >= n:
                continue
            i = counters[lab]
            src = sources[(i * 7 + len(items)) % len(sources)]
            items.append({"label": lab, "source_image_id": int(src["id"]), "style": style_for(lab),
                          "seed": seed * 100_003 + len(items), "backend": allowed[i % len(allowed)]})
            counters[lab] += 1
    with cdb._lock, cdb.db.conn:
        plan_id = cdb.db["plans"].insert({"product": product, "params": json.dumps(
            {"target": goal, "labels": labels, "backends": list(backends), "oversample": oversample,
             "seed": seed}), "summary": json.dumps(summary), "created_at": _now()}).last_pk
        cdb.db["plan_items"].insert_all(
            [{"plan_id": plan_id, "idx": i, **it, "status": "pending", "sample_id": None}
             for i, it in enumerate(items)])
    return {"plan_id": plan_id, "product": product, "target": goal, "summary": summary, "items": len(items)}


def plan_status(cdb: CurationDB, plan_id: int) -> dict:
    rows = cdb.q("SELECT status, count(*) n FROM plan_items WHERE plan_id=? GROUP BY status", (plan_id,))
    counts = {r["status"]: r["n"] for r in rows}
    plan = cdb.q("SELECT * FROM plans WHERE id=?", (plan_id,))
    if not plan:
        raise CurationError(f"no plan #{plan_id}")
    return {"plan_id": plan_id, "product": plan[0]["product"], "done": counts.get("done", 0),
            "pending": counts.get("pending", 0), "total": sum(counts.values()),
            "summary": json.loads(plan[0]["summary"])}


# ---------------------------------------------------------------------------------------------
# Pre-screening
# ---------------------------------------------------------------------------------------------
def phash(image: np.ndarray) -> int:
    """64-bit DCT perceptual hash of an RGB image."""
    g = cv2.resize(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), (32, 32), interpolation=cv2.INTER_AREA)
    d = cv2.dct(g.astype(np.float32))[:8, :8]
    bits = (d > np.median(d[1:].ravel() if d.size > 1 else d)).ravel()
    return int("".join("1" if b else "0" for b in bits), 2)


def prescreen_scores(source: np.ndarray, cand: np.ndarray, mask: np.ndarray, feather: int,
                     detector=None, others: list[int] | None = None, color: str | None = None) -> dict:
    """Automatic checks stored with each candidate (higher visibility = more visible defect)."""
    from pipelines.masks import dilate
    outside = dilate(mask, feather) == 0
    diff = np.abs(cand.astype(int) - source.astype(int)).max(axis=-1)
    h = phash(defect_crop(cand, mask))
    scores = {"outside_change": int(diff[outside].max()) if outside.any() else 0,
              "inside_change": float(diff[mask > 0].mean()), "phash": f"{h:016x}",
              "duplicate_distance": min((bin(h ^ o).count("1") for o in (others or [])), default=64)}
    if detector is not None:
        _, maps = detector.predict([cand])
        amap = maps[0]
        inside = float(amap[mask > 0].mean())
        ring = (dilate(mask, 24) > 0) & outside
        out_mean = float(amap[ring].mean()) if ring.any() else float(amap[outside].mean())
        scores["visibility"] = inside / max(out_mean, 1e-6)
    if color:
        from pipelines.color import color_metrics
        try:
            scores.update({k: v for k, v in color_metrics(cand, mask, color).items() if isinstance(v, float)})
        except ValueError as exc:
            scores["color_metrics"] = str(exc)
    return scores


def verdict(scores: dict, th: Thresholds) -> str | None:
    """The reason to auto-reject, or None."""
    if scores["outside_change"] > th.max_outside_change:
        return f"changed {scores['outside_change']} levels outside the mask"
    if scores.get("visibility") is not None and scores["visibility"] < th.min_visibility:
        return f"defect barely visible to PatchCore (inside/outside {scores['visibility']:.2f})"
    if scores["duplicate_distance"] < th.min_duplicate_distance:
        return f"near-duplicate of another candidate ({scores['duplicate_distance']} bits)"
    return None


# ---------------------------------------------------------------------------------------------
# Batch generation (a background job)
# ---------------------------------------------------------------------------------------------
def run_plan(store, cdb: CurationDB, plan_id: int, progress: Callable[[float, str], None] | None = None,
             cancelled: Callable[[], bool] | None = None, thresholds: Thresholds | None = None,
             use_detector: bool = True, feather: int = 4) -> dict:
    """Create the plan's pending candidates (never accepts anything). Resumable."""
    from studio.services import GenerateRequest, UserError, generate, sample_mask

    th = thresholds or Thresholds()
    st = plan_status(cdb, plan_id)
    product = st["product"]
    pending = cdb.q("SELECT * FROM plan_items WHERE plan_id=? AND status='pending' ORDER BY idx", (plan_id,))
    say = progress or (lambda f, m="": None)
    detector = None
    if use_detector and pending:
        say(0.0, "fitting PatchCore on good images for the visibility check")
        detector = _detector(store, product)
    hashes: dict[str, list[int]] = {}
    for row in cdb.q("SELECT p.scores, s.damage_type FROM prescreen p JOIN samples s ON s.id = p.sample_id "
                     "WHERE s.product = ?", (product,)):
        hashes.setdefault(row["damage_type"], []).append(int(json.loads(row["scores"])["phash"], 16))
    made = skipped = rejected = 0
    for k, item in enumerate(pending):
        if cancelled and cancelled():
            break
        batch_id = f"plan{plan_id}:{item['idx']}"
        existing = store.samples_in_batch(batch_id + "")
        existing = [s for s in existing if s["batch_id"] == batch_id]
        if existing:  # written before a crash/cancel, item not yet marked: do not duplicate
            cdb.execute("UPDATE plan_items SET status='done', sample_id=? WHERE plan_id=? AND idx=?",
                        (existing[0]["id"], plan_id, item["idx"]))
            skipped += 1
            continue
        src = store.load_image(item["source_image_id"])
        rng = np.random.default_rng(item["seed"])
        mask = sample_mask(store, product, item["label"], src.shape[:2], rng)  # shaped like the type
        req = GenerateRequest(image=src, mask=mask, damage_type=item["label"], product=product,
                              backend=item["backend"], n=1, seed=item["seed"], feather=feather,
                              source_image_id=item["source_image_id"], batch_id=batch_id)
        try:
            cand = generate(req, store=store)[0]
        except UserError as exc:
            raise CurationError(f"plan item {item['idx']} ({item['label']}, {item['backend']}): {exc}") from exc
        scores = prescreen_scores(src, cand.image, mask, feather, detector, hashes.get(item["label"]))
        hashes.setdefault(item["label"], []).append(int(scores["phash"], 16))
        reason = verdict(scores, th)
        with cdb._lock, cdb.db.conn:
            cdb.db.conn.execute("INSERT OR REPLACE INTO prescreen (sample_id, scores, auto_rejected, reason) "
                                "VALUES (?, ?, ?, ?)", (cand.sample_id, json.dumps(scores), int(bool(reason)), reason))
            cdb.db.conn.execute("UPDATE plan_items SET status='done', sample_id=? WHERE plan_id=? AND idx=?",
                                (cand.sample_id, plan_id, item["idx"]))
        if reason:
            store.reject(cand.sample_id, note=f"auto: {reason}")
            rejected += 1
        made += 1
        say((k + 1) / len(pending), f"{k + 1}/{len(pending)} {item['label']}")
    return {"plan_id": plan_id, "created": made, "auto_rejected": rejected, "resumed_existing": skipped,
            **{k: v for k, v in plan_status(cdb, plan_id).items() if k in ("done", "pending", "total")}}


def _product_region(image: np.ndarray) -> np.ndarray | None:
    """Where the part is: pixels clearly above the dark background (None for full-frame textures)."""
    g = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    region = (g > 40).astype(np.uint8)
    frac = region.mean()
    if frac > 0.97 or frac < 0.05:
        return None
    region = cv2.morphologyEx(region, cv2.MORPH_OPEN, np.ones((5, 5), np.uint8))
    return region * 255


def _detector(store, product: str):
    from pipelines.patchcore import PatchCore
    goods = [r for r in store.list_images(product=product, label=GOOD, split="train")][:40]
    if len(goods) < 2:
        return None
    model = PatchCore(backbone="efficientnet_lite0", coreset=0.05)
    model.fit([store.load_image(r["id"]) for r in goods])
    return model


# ---------------------------------------------------------------------------------------------
# Review queue
# ---------------------------------------------------------------------------------------------
def next_candidate(store, cdb: CurationDB, product: str | None = None, after: int = 0) -> dict | None:
    """The oldest unreviewed candidate with id > ``after`` (skip moves ``after`` forward)."""
    args: list = [after]
    where = "s.status = 'candidate' AND s.id > ?"
    if product:
        where += " AND s.product = ?"
        args.append(product)
    rows = cdb.q(f"SELECT s.id, p.scores, p.reason FROM samples s LEFT JOIN prescreen p ON p.sample_id = s.id "
                 f"WHERE {where} ORDER BY s.id LIMIT 1", args)
    if not rows:
        return None
    left = cdb.q("SELECT count(*) n FROM samples s WHERE s.status = 'candidate'"
                 + (" AND s.product = ?" if product else ""), args[1:])[0]["n"]
    row = store.get_sample(rows[0]["id"])
    return {"sample": row, "prescreen": json.loads(rows[0]["scores"]) if rows[0]["scores"] else {},
            "remaining": left}


# ---------------------------------------------------------------------------------------------
# Quality of the synthetic set, per class (on the offline backbone's features)
# ---------------------------------------------------------------------------------------------
def quality(store, product: str) -> list[dict]:
    """Per class: KID-style distance of accepted synthetic defect crops to the real *reference*
    defects (origin real, role reference: synthetic images stored in the product and evaluation
    images are never the "real" side), and the intra-class diversity of both (named honestly:
    backbone features, not Inception/LPIPS; see :mod:`pipelines.quality`)."""
    from pipelines.backbones import build_backbone
    extractor = build_backbone("efficientnet_lite0").eval()
    out = []
    for lab in sorted({r["label"] for r in store.list_images(product=product) if r["label"] != GOOD}
                      | {s["damage_type"] for s in store.list_samples(product=product, status="accepted")
                         if s["damage_type"] and s["damage_type"] != GOOD}):
        real = [(store.load_image(r["id"]), store.load_mask(r["id"]))
                for r in store.reference_defects(product, lab)]
        syn = [(store.load_sample_image(s["id"]), store.load_sample_mask(s["id"]))
               for s in store.list_samples(product=product, status="accepted", damage_type=lab)]
        row = {"label": lab, "real": len(real), "synthetic": len(syn), "kid": None,
               "diversity_real": None, "diversity_synthetic": None}
        fr = crop_features(extractor, [defect_crop(i, m) for i, m in real if m is not None and m.any()]) if real else None
        fs = crop_features(extractor, [defect_crop(i, m) for i, m in syn if m.any()]) if syn else None
        if fr is not None and len(fr) >= 2:
            row["diversity_real"] = diversity(fr)
        if fs is not None and len(fs) >= 2:
            row["diversity_synthetic"] = diversity(fs)
        if fr is not None and fs is not None and len(fr) >= 2 and len(fs) >= 2:
            row["kid"] = kid(fr, fs)
        out.append(row)
    return out
