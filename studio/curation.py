"""Curation at scale: a balancing plan, batch generation (resumable, no duplicates), automatic
pre-screening and verification of candidates, a review queue, and per-class quality of the
synthetic set.

Plan rules (the specification's):
* **Target modes** — ``balance``: top every class up to the largest class (or to ``target``
  images, real + accepted synthetic); ``fixed``: ``target`` new synthetic samples per class.
* **Verification and retries** — each candidate gets a verification score in [0, 1]
  (:func:`verification_score`: every pre-screen check scaled so that its threshold lands on
  :data:`VERIFY_THRESHOLD` = 0.6, the weakest check wins); a candidate below 0.6 is auto-rejected
  and regenerated with a new seed (and a new mask), up to :data:`MAX_RETRIES` = 3 retries per item.
* **Success-rate monitor** — per class, accepted (verified) / attempted candidates; a class is
  complete when its verified samples reach :data:`COMPLETE_FRACTION` = 80 % of its target
  (:func:`plan_monitor`, stored with the plan after every item).
* **Attribute mix** — e.g. ``severity=low:0.5,high:0.5``: each item is assigned one value per
  attribute, exactly matching the shares within each class (largest remainder, then shuffled with
  the plan's seed); recorded in the sample's provenance (``params["attributes"]``). ``severity``
  also sets the generator strength (:data:`SEVERITY_STRENGTH`); other attributes are labels.

Plans and pre-screen scores live in the workspace database next to the samples:
  plans(id, product, params, summary, created_at, monitor)
  plan_items(plan_id, idx, label, source_image_id, style, seed, backend, status, sample_id,
             attributes, attempts, verified, score)
  prescreen(sample_id, scores, auto_rejected, reason)
A plan item's first sample carries ``batch_id = "plan<id>:<idx>"``, its retries
``"plan<id>:<idx>~r<k>"``, so a resumed batch skips attempts whose sample already exists even when a
crash hit between writing the sample and marking the item.
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from pipelines.quality import crop_features, defect_crop, diversity, kid

from studio.catalog import GOOD
from studio.db import database


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class CurationError(ValueError):
    """A user-facing problem with a plan or a batch (message shown as-is)."""


TARGET_MODES = ("balance", "fixed")
VERIFY_THRESHOLD = 0.6          # the specification's pass mark for a candidate's verification score
MAX_RETRIES = 3                 # regenerations of a failed candidate (new seed), per plan item
COMPLETE_FRACTION = 0.8         # a class is complete at ≥ 80 % of its target
SEVERITY_STRENGTH = {"low": 0.45, "medium": 0.7, "high": 0.95}   # attribute 'severity' → strength
RETRY_SEED_STEP = 1_000_003     # retry k of an item uses seed + k · step


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
        self.db = database(path)
        with self._lock:
            self.db["plans"].create({"id": int, "product": str, "params": str, "summary": str,
                                     "created_at": str, "monitor": str}, pk="id", if_not_exists=True)
            self.db["plan_items"].create({"plan_id": int, "idx": int, "label": str, "source_image_id": int,
                                          "style": str, "seed": int, "backend": str, "status": str,
                                          "sample_id": int, "attributes": str, "attempts": int,
                                          "verified": int, "score": float},
                                         pk=("plan_id", "idx"), if_not_exists=True)
            # workspaces made before the plan rules: add the new columns
            for table, cols in (("plans", {"monitor": str}),
                                ("plan_items", {"attributes": str, "attempts": int, "verified": int,
                                                "score": float})):
                have = self.db[table].columns_dict
                for name, typ in cols.items():
                    if name not in have:
                        self.db[table].add_column(name, typ)
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

    def add_plan(self, product: str, params: dict, summary: list[dict], items: list[dict]) -> int:
        """Insert a plan and its items (all ``pending``) in one transaction; returns the plan id."""
        with self._lock, self.db.conn:
            plan_id = self.db["plans"].insert({"product": product, "params": json.dumps(params),
                                               "summary": json.dumps(summary), "created_at": _now()}).last_pk
            self.db["plan_items"].insert_all(
                [{"plan_id": plan_id, "idx": i, **it, "status": "pending", "sample_id": None, "attempts": 0,
                  "verified": 0, "score": None} for i, it in enumerate(items)])
        return plan_id

    def record_attempt(self, plan_id: int, idx: int, sample_id: int, scores: dict, reason: str | None,
                       status: str, attempts: int, verified: bool, score: float) -> None:
        """One verified attempt of a plan item, in one transaction: the candidate's pre-screen
        scores (``reason``: why it was auto-rejected, None when it passed) and the item's state."""
        with self._lock, self.db.conn:
            self.db.conn.execute("INSERT OR REPLACE INTO prescreen (sample_id, scores, auto_rejected, reason) "
                                 "VALUES (?, ?, ?, ?)", (sample_id, json.dumps(scores), int(bool(reason)), reason))
            self.db.conn.execute("UPDATE plan_items SET status=?, sample_id=?, attempts=?, verified=?, score=? "
                                 "WHERE plan_id=? AND idx=?",
                                 (status, sample_id, attempts, int(verified), score, plan_id, idx))


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


def parse_mix(text: str | dict | None) -> dict[str, dict[str, float]]:
    """``"severity=low:0.5,high:0.5;lighting=dim:0.3,bright:0.7"`` (attributes separated by ``;``
    or given as a list) → ``{attribute: {value: share}}``; each attribute's shares must be positive
    and sum to 1 (± 0.01; they are normalised)."""
    if not text:
        return {}
    parts = text if isinstance(text, (list, tuple)) else None
    if isinstance(text, dict):
        raw = {k: dict(v) for k, v in text.items()}
    else:
        raw = {}
        for part in (parts if parts is not None else str(text).split(";")):
            part = part.strip()
            if not part:
                continue
            name, sep, values = part.partition("=")
            if not sep or not name.strip() or not values.strip():
                raise CurationError(f"attribute mix {part!r}: expected NAME=VALUE:SHARE,VALUE:SHARE "
                                    "(e.g. severity=low:0.5,high:0.5)")
            shares: dict[str, float] = {}
            for pair in values.split(","):
                v, sep, share = pair.strip().partition(":")
                try:
                    shares[v.strip()] = float(share)
                except ValueError:
                    raise CurationError(f"attribute mix {part!r}: {pair.strip()!r} is not VALUE:SHARE") from None
                if not sep or not v.strip():
                    raise CurationError(f"attribute mix {part!r}: {pair.strip()!r} is not VALUE:SHARE")
            raw[name.strip()] = shares
    out = {}
    for name, shares in raw.items():
        total = sum(shares.values())
        if not shares or any(v <= 0 for v in shares.values()) or abs(total - 1) > 0.01:
            raise CurationError(f"attribute {name!r}: shares must be positive and sum to 1, got "
                                + ", ".join(f"{k}:{v:g}" for k, v in shares.items()))
        out[name] = {k: v / total for k, v in shares.items()}
    return out


def assign_attributes(mix: dict[str, dict[str, float]], n: int, rng: np.random.Generator) -> list[dict]:
    """``n`` attribute dicts whose value counts match the shares of ``mix`` exactly up to rounding
    (largest remainder), in a seeded random order."""
    out = [{} for _ in range(n)]
    for name, shares in mix.items():
        exact = {v: share * n for v, share in shares.items()}
        counts = {v: int(np.floor(x)) for v, x in exact.items()}
        for v in sorted(exact, key=lambda v: exact[v] - counts[v], reverse=True)[: n - sum(counts.values())]:
            counts[v] += 1
        values = [v for v, c in counts.items() for _ in range(c)]
        rng.shuffle(values)
        for d, v in zip(out, values):
            d[name] = v
    return out


def _check_plan_args(mode: str, target: int | None, retries: int) -> None:
    if mode not in TARGET_MODES:
        raise CurationError(f"target mode must be one of {', '.join(TARGET_MODES)}, not {mode!r}")
    if mode == "fixed" and not (target and int(target) > 0):
        raise CurationError("target mode 'fixed' needs a target: the number of new samples per class")
    if not 0 <= int(retries) <= 10:
        raise CurationError(f"retries must be 0..10, got {retries}")


def _plan_classes(store, product: str, labels: list[str] | None, target: int | None,
                  mode: str) -> tuple[list[dict], int]:
    """The balance rows of the chosen classes and the goal (the largest class, or ``target``)."""
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
    if target and below and mode == "balance":
        worst = max(below, key=lambda b: b["current"])
        raise CurationError(f"target {goal} is below the current count of {worst['label']!r} "
                            f"({worst['current']}); choose at least {worst['current']}")
    return bal, goal


def _plan_sources(store, product: str, bal: list[dict], backends: tuple[str, ...]) -> list[dict]:
    """The good images to paint on (train / upload); every backend must make defects."""
    from pipelines.registry import get_info
    sources = [r for r in store.list_images(product=product, label=GOOD) if r["split"] in ("train", "upload")]
    if not sources:
        raise CurationError(f"no source images: product {product!r} has no good images to paint "
                            f"defects on (classes {', '.join(b['label'] for b in bal)}) — import some first")
    if not backends:
        raise CurationError("choose at least one backend")
    for bk in backends:
        try:
            if get_info(bk).mode != "damage":
                raise CurationError(f"backend {bk!r} makes wall colours, not defects")
        except KeyError as exc:
            raise CurationError(str(exc.args[0])) from exc
    return sources


def _plan_queues(bal: list[dict], goal: int, mode: str, oversample: float,
                 backends: tuple[str, ...]) -> tuple[dict, list[dict]]:
    """Per class, worst deficit first: ``{label: (items to make, allowed backends)}`` and the
    summary rows (a class without reference defects gets only backends that need no donors)."""
    from pipelines.registry import get_info
    queues, summary = {}, []
    for b in sorted(bal, key=lambda b: goal - b["current"], reverse=True):
        deficit = goal if mode == "fixed" else max(0, goal - b["current"])
        n = int(np.ceil(deficit * max(oversample, 1.0)))
        allowed = [bk for bk in backends if not get_info(bk).needs_donors or b["reference"] > 0]
        if n and not allowed:
            raise CurationError(f"class {b['label']!r} has no reference real defects to copy "
                                f"({', '.join(backends)} need donors; evaluation images are never "
                                "copied); add a generator that needs none, e.g. 'perlin'")
        queues[b["label"]] = (n, allowed)
        summary.append({**b, "target": goal, "deficit": deficit, "planned": n,
                        "complete_at": int(np.ceil(COMPLETE_FRACTION * deficit)),
                        "backends": ", ".join(allowed)})
    return queues, summary


def _plan_items(queues: dict, sources: list[dict], seed: int, mix: dict) -> list[dict]:
    """The items, classes interleaved (a cancelled batch still improves the worst ones first),
    sources / seeds / backends spread; then the attribute mix, exact shares within each class in
    a seeded order."""
    from pipelines.classical import style_for
    items: list[dict] = []
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
    for k, lab in enumerate(sorted(queues)):
        mine = [it for it in items if it["label"] == lab]
        for it, attrs in zip(mine, assign_attributes(mix, len(mine), np.random.default_rng([seed, k]))):
            it["attributes"] = json.dumps(attrs, sort_keys=True)
    return items


def make_plan(store, cdb: CurationDB, product: str, target: int | None = None,
              labels: list[str] | None = None, backends: tuple[str, ...] = ("perlin", "cutpaste"),
              oversample: float = 1.0, seed: int = 0, mode: str = "balance",
              mix: str | dict | None = None, retries: int = MAX_RETRIES) -> dict:
    """A generation plan prioritised by deficit, spread over sources, seeds and backends.

    ``mode="balance"``: each class's target is the largest class (or ``target``, real + accepted
    synthetic); ``mode="fixed"``: ``target`` new synthetic samples per class. ``mix``: an attribute
    mix (:func:`parse_mix`); ``retries``: regenerations of a candidate that fails verification."""
    _check_plan_args(mode, target, retries)
    mix = parse_mix(mix)
    bal, goal = _plan_classes(store, product, labels, target, mode)
    sources = _plan_sources(store, product, bal, backends)
    queues, summary = _plan_queues(bal, goal, mode, oversample, backends)
    items = _plan_items(queues, sources, seed, mix)
    for row in summary:
        row["mix"] = "; ".join(f"{a}: " + ", ".join(
            f"{v} {sum(json.loads(it['attributes']).get(a) == v for it in items if it['label'] == row['label'])}"
            for v in shares) for a, shares in mix.items())
    params = {"target": goal, "mode": mode, "labels": labels, "backends": list(backends),
              "oversample": oversample, "seed": seed, "mix": mix, "retries": int(retries),
              "verify_threshold": VERIFY_THRESHOLD, "complete_fraction": COMPLETE_FRACTION}
    plan_id = cdb.add_plan(product, params, summary, items)
    return {"plan_id": plan_id, "product": product, "target": goal, "mode": mode, "summary": summary,
            "items": len(items), "mix": mix, "retries": int(retries)}


def _plan_row(cdb: CurationDB, plan_id: int) -> dict:
    plan = cdb.q("SELECT * FROM plans WHERE id=?", (plan_id,))
    if not plan:
        raise CurationError(f"no plan #{plan_id}")
    return plan[0]


def plan_monitor(cdb: CurationDB, plan_id: int) -> dict:
    """The success-rate monitor: per class, ``accepted`` (candidates that passed verification) /
    ``attempted`` (candidates generated, retries included), the target (the class's deficit) and
    whether it is ``complete`` (accepted ≥ 80 % of the target); ``overall`` sums the classes and is
    complete when every class is."""
    plan = _plan_row(cdb, plan_id)
    summary = {r["label"]: r for r in json.loads(plan["summary"])}
    rows = cdb.q("SELECT label, count(*) items, SUM(status != 'pending') done, "
                 "COALESCE(SUM(attempts), 0) attempted, COALESCE(SUM(verified), 0) accepted "
                 "FROM plan_items WHERE plan_id=? GROUP BY label", (plan_id,))
    by = {r["label"]: r for r in rows}
    classes = []
    for lab, s in summary.items():
        r = by.get(lab, {"items": 0, "done": 0, "attempted": 0, "accepted": 0})
        target = int(s.get("deficit", 0))
        need = int(np.ceil(COMPLETE_FRACTION * target))
        classes.append({"label": lab, "target": target, "complete_at": need, "items": int(r["items"]),
                        "done": int(r["done"] or 0), "attempted": int(r["attempted"]),
                        "accepted": int(r["accepted"]),
                        "success_rate": r["accepted"] / r["attempted"] if r["attempted"] else None,
                        "complete": int(r["accepted"]) >= need})
    att, acc = sum(c["attempted"] for c in classes), sum(c["accepted"] for c in classes)
    return {"classes": classes, "overall": {"attempted": att, "accepted": acc,
                                            "success_rate": acc / att if att else None,
                                            "complete": all(c["complete"] for c in classes)}}


def plan_status(cdb: CurationDB, plan_id: int) -> dict:
    rows = cdb.q("SELECT status, count(*) n FROM plan_items WHERE plan_id=? GROUP BY status", (plan_id,))
    counts = {r["status"]: r["n"] for r in rows}
    plan = _plan_row(cdb, plan_id)
    return {"plan_id": plan_id, "product": plan["product"], "done": counts.get("done", 0),
            "pending": counts.get("pending", 0), "total": sum(counts.values()),
            "params": json.loads(plan["params"]), "summary": json.loads(plan["summary"]),
            "monitor": plan_monitor(cdb, plan_id)}


def monitor_lines(monitor: dict) -> list[str]:
    """The monitor as text lines (the CLI prints them)."""
    def rate(x):
        return "–" if x is None else f"{100 * x:.0f} %"
    lines = [f"{c['label']}: accepted {c['accepted']} / attempted {c['attempted']} ({rate(c['success_rate'])})"
             f" · target {c['target']} · {'complete' if c['complete'] else 'incomplete'} "
             f"(needs {c['complete_at']}, {int(COMPLETE_FRACTION * 100)} % of target)" for c in monitor["classes"]]
    o = monitor["overall"]
    lines.append(f"overall: accepted {o['accepted']} / attempted {o['attempted']} ({rate(o['success_rate'])}) · "
                 f"{'complete' if o['complete'] else 'incomplete'}")
    return lines


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


def check_scores(scores: dict, th: Thresholds) -> dict[str, float]:
    """Each pre-screen check as a score in [0, 1], scaled so that its threshold lands on
    :data:`VERIFY_THRESHOLD` (0.6): ``outside`` (1 or 0: any change beyond the feathered mask),
    ``visibility`` (PatchCore inside / around the mask, when a detector ran), ``novelty``
    (perceptual-hash distance to the class's other candidates)."""
    out = {"outside": 1.0 if scores["outside_change"] <= th.max_outside_change else 0.0}
    if scores.get("visibility") is not None:
        out["visibility"] = min(1.0, VERIFY_THRESHOLD * scores["visibility"] / max(th.min_visibility, 1e-9))
    if th.min_duplicate_distance > 0:
        out["novelty"] = min(1.0, VERIFY_THRESHOLD * scores["duplicate_distance"] / th.min_duplicate_distance)
    return out


def verification_score(scores: dict, th: Thresholds) -> float:
    """A candidate's verification score in [0, 1]: its weakest check (:func:`check_scores`);
    it passes at ≥ :data:`VERIFY_THRESHOLD`, exactly when every check meets its threshold."""
    return min(check_scores(scores, th).values())


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
Verifier = Callable[[np.ndarray, np.ndarray, dict], float]


def run_plan(store, cdb: CurationDB, plan_id: int, progress: Callable[[float, str], None] | None = None,
             cancelled: Callable[[], bool] | None = None, thresholds: Thresholds | None = None,
             use_detector: bool = True, feather: int = 4, verifier: Verifier | None = None,
             retries: int | None = None) -> dict:
    """Create the plan's pending candidates (never accepts anything). Resumable.

    Each candidate is verified: ``verifier(image [H x W x 3], mask [H x W], prescreen scores) →
    score in [0, 1]`` (default :func:`verification_score` with ``thresholds``). Below
    :data:`VERIFY_THRESHOLD` it is auto-rejected and the item regenerated with a new seed (and
    mask), up to ``retries`` times (default: the plan's, 3). The success-rate monitor is stored with
    the plan after every item."""
    th = thresholds or Thresholds()
    st = plan_status(cdb, plan_id)
    product = st["product"]
    retries = int(st["params"].get("retries", MAX_RETRIES) if retries is None else retries)
    verify = verifier or (lambda image, mask, scores: verification_score(scores, th))
    pending = cdb.q("SELECT * FROM plan_items WHERE plan_id=? AND status='pending' ORDER BY idx", (plan_id,))
    say = progress or (lambda f, m="": None)
    detector = None
    if use_detector and pending:
        say(0.0, "fitting PatchCore on good images for the visibility check")
        detector = _detector(store, product)
    hashes = _screened_hashes(cdb, product)
    made = skipped = rejected = attempted = 0
    for k, item in enumerate(pending):
        if cancelled and cancelled():
            break
        label = item["label"]
        src = store.load_image(item["source_image_id"])
        attempt, verified = int(item.get("attempts") or 0), False
        while attempt <= retries and not verified:
            if attempt and cancelled and cancelled():
                break                                  # the item stays pending, its attempts recorded
            sid, image, mask, resumed = _plan_candidate(store, cdb, plan_id, product, item, attempt, src, feather)
            skipped += resumed
            made += not resumed
            attempted += 1
            scores = prescreen_scores(src, image, mask, feather, detector, hashes.get(label))
            hashes.setdefault(label, []).append(int(scores["phash"], 16))
            score = float(verify(image, mask, scores))
            scores["verification"] = score
            verified = score >= VERIFY_THRESHOLD
            reason = None if verified else (verdict(scores, th) or f"verification score {score:.2f} < "
                                                                    f"{VERIFY_THRESHOLD}")
            attempt += 1
            if reason:
                store.reject(sid, note=f"auto: {reason} (attempt {attempt} of {retries + 1})")
                rejected += 1
            status = "done" if verified or attempt > retries else "pending"
            cdb.record_attempt(plan_id, item["idx"], sid, scores, reason, status, attempt, verified, score)
        monitor = plan_monitor(cdb, plan_id)
        cdb.execute("UPDATE plans SET monitor=? WHERE id=?", (json.dumps(monitor), plan_id))
        rate = monitor["overall"]["success_rate"]
        say((k + 1) / len(pending), f"{k + 1}/{len(pending)} {label} · success "
                                    f"{'–' if rate is None else f'{100 * rate:.0f} %'}")
    return {"plan_id": plan_id, "created": made, "attempted": attempted, "auto_rejected": rejected,
            "resumed_existing": skipped, "retries": retries,
            **{k: v for k, v in plan_status(cdb, plan_id).items() if k in ("done", "pending", "total", "monitor")}}


def _screened_hashes(cdb: CurationDB, product: str) -> dict[str, list[int]]:
    """The perceptual hashes of the product's pre-screened samples per damage type (a new
    candidate too close to one is a duplicate)."""
    hashes: dict[str, list[int]] = {}
    for row in cdb.q("SELECT p.scores, s.damage_type FROM prescreen p JOIN samples s ON s.id = p.sample_id "
                     "WHERE s.product = ?", (product,)):
        hashes.setdefault(row["damage_type"], []).append(int(json.loads(row["scores"])["phash"], 16))
    return hashes


def _plan_candidate(store, cdb: CurationDB, plan_id: int, product: str, item: dict, attempt: int,
                    src: np.ndarray, feather: int) -> tuple[int, np.ndarray, np.ndarray, bool]:
    """Attempt ``attempt`` of a plan item → ``(sample id, image, mask, resumed)``: the sample its
    batch already holds (written before a crash / cancel, the item not yet marked: never
    duplicated; ``resumed``), else a new one on a mask shaped like the type, its seed moved on by
    :data:`RETRY_SEED_STEP` per attempt."""
    from studio.services import GenerateRequest, UserError, generate, sample_mask
    label, attrs = item["label"], json.loads(item.get("attributes") or "{}")
    batch_id = f"plan{plan_id}:{item['idx']}" + (f"~r{attempt}" if attempt else "")
    seed = int(item["seed"]) + attempt * RETRY_SEED_STEP
    existing = [s for s in store.samples_in_batch(batch_id) if s["batch_id"] == batch_id]
    if existing:
        sid = existing[0]["id"]
        return sid, store.load_sample_image(sid), store.load_sample_mask(sid), True
    rng = np.random.default_rng(seed)
    mask = sample_mask(store, product, label, src.shape[:2], rng)  # shaped like the type
    req = GenerateRequest(image=src, mask=mask, damage_type=label, product=product,
                          backend=item["backend"], n=1, seed=seed, feather=feather,
                          strength=SEVERITY_STRENGTH.get(attrs.get("severity"), 0.8),
                          source_image_id=item["source_image_id"], batch_id=batch_id)
    try:
        cand = generate(req, store=store)[0]
    except UserError as exc:
        raise CurationError(f"plan item {item['idx']} ({label}, {item['backend']}): {exc}") from exc
    _record_provenance(cdb, cand.sample_id, plan_id, item["idx"], attempt, attrs)
    return cand.sample_id, cand.image, mask, False


def _record_provenance(cdb: CurationDB, sample_id: int, plan_id: int, idx: int, attempt: int,
                       attrs: dict) -> None:
    """Add the plan item, the attempt and the attribute mix's values to the sample's params (its
    provenance: exported with it in ``provenance.jsonl``)."""
    row = cdb.q("SELECT params FROM samples WHERE id=?", (sample_id,))
    params = json.loads(row[0]["params"] or "{}") if row else {}
    params["plan"] = {"plan_id": int(plan_id), "item": int(idx), "attempt": int(attempt)}
    if attrs:
        params["attributes"] = attrs
    cdb.execute("UPDATE samples SET params=? WHERE id=?", (json.dumps(params, sort_keys=True), sample_id))


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
