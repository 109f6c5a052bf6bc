"""PatchCore evaluation as a use case: request → fit → predict → metrics, overlays, runs table.

Shared by the PatchCore tab (as a background job), the CLI (`python -m studio patchcore`) and
tests. The model code lives in ``pipelines.patchcore``; this module only orchestrates data,
timing, files and records.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np

from pipelines.fileio import atomic_write_json
from pipelines.imageio import write_png_atomic
from pipelines.mvtec import LayoutError, check_sizes, load_category, load_image, load_mask, load_named_positives

BANK_MODES = ("single", "dual-real", "dual-real-synthetic")
from pipelines.training import ProgressFn  # noqa: E402  (the one progress type)


@dataclass
class PatchCoreRequest:
    data: str                         # MVTec-AD-layout or KolektorSDD2-layout category folder
    out: str                          # output folder (metrics.json, overlays/)
    bank: str = "single"              # single | dual-real | dual-real-synthetic
    positives: str | None = None      # an export of accepted synthetic defects (its synthetic/ only)
    backbone: str = "efficientnet_lite0"
    coreset: float = 0.05             # normal bank: PatchCore's measured default (not the spec's 1 %)
    positive_coreset: float = 0.1     # positive (defect) bank: the specification's 10 %
    size: int = 256
    seed: int = 0
    max_overlays: int = 48
    orient: str = "auto"              # auto | none | canonical | augment (pipelines.orientation)
    tiles: int = 1                    # small defects: tiles × tiles tiles of size px (tiles² × backbone)

    def validate(self) -> None:
        if self.bank not in BANK_MODES:
            raise ValueError(f"bank must be one of {', '.join(BANK_MODES)}, not {self.bank!r}")
        if not 0 < self.coreset <= 1:
            raise ValueError(f"coreset must be a fraction in (0, 1], got {self.coreset}")
        if not 0 < self.positive_coreset <= 1:
            raise ValueError(f"positive coreset must be a fraction in (0, 1], got {self.positive_coreset}")
        if not 32 <= self.size <= 1024:
            raise ValueError(f"size must be 32..1024 px, got {self.size}")
        from pipelines.orientation import ORIENT_MODES
        if self.orient not in ORIENT_MODES:
            raise ValueError(f"orient must be one of {', '.join(ORIENT_MODES)}, not {self.orient!r}")
        if not 1 <= int(self.tiles) <= 4:
            raise ValueError(f"tiles must be 1..4, got {self.tiles}")
        if self.bank == "dual-real-synthetic" and not self.positives:
            raise ValueError("bank 'dual-real-synthetic' needs a folder of accepted synthetic defects")


def _scaled(progress: ProgressFn | None, lo: float, hi: float) -> ProgressFn | None:
    if progress is None:
        return None
    return lambda f, msg="": progress(lo + (hi - lo) * f, msg)


class PositiveBank(NamedTuple):
    """What a run scores and what its positive bank is fit on (:func:`positive_bank`)."""
    eval_samples: list        # the scored samples (evaluation defects + test/good; all of test/ for 'single')
    positives: list           # [(image, mask)] the positive bank is fit on
    held_out: list            # relative paths of the reference defects in the bank
    hashes: list              # their pixel hashes as the guard returned them (synthetic ones included)
    roles: Any                # pipelines.roles.CategoryRoles (None for bank 'single')


def positive_bank(req: PatchCoreRequest, cat) -> PositiveBank:
    """The data roles split (pipelines.roles: the positive bank copies reference defects only;
    evaluation defects and test/good are scored — the folder's evaluation.txt or the rule's), the
    synthetic positives of ``req.positives`` (synthetic/ only, never test/), the one guard on exactly
    the arrays the bank is fit on (after resizing) and the provenance check of the synthetic ones."""
    from pipelines.roles import category_roles
    eval_samples = list(cat.test)
    named: list[tuple[str, np.ndarray, np.ndarray]] = []    # (file, image, mask) of the positive bank
    held_out: list[str] = []
    roles = None
    if req.bank != "single":
        roles = category_roles(cat)
        bank_samples, eval_samples = roles.reference, roles.scored
        held_out = roles.rel(bank_samples)
        named += [(rel, load_image(s.path, req.size), load_mask(s, req.size))
                  for rel, s in zip(held_out, bank_samples)]
    if req.positives and req.bank == "dual-real-synthetic":
        from pipelines.roles import check_descent
        from pipelines.training_data import extra_ancestors
        named += load_named_positives(req.positives, req.size)      # synthetic/ only, never test/
    elif req.positives and req.bank == "single":
        raise ValueError("--positives needs a dual bank (bank dual-real-synthetic)")
    positive_hashes: list[str] = []
    if named:
        from pipelines.guard import ScoredSet, guard
        positive_hashes = guard(((n, img) for n, img, _ in named), ScoredSet.from_roles(roles),
                                "PatchCore positive bank")
    if req.positives and req.bank == "dual-real-synthetic":
        # provenance: a sample generated on an evaluation image (any size of change) is refused too
        anc, own = extra_ancestors(req.positives)
        check_descent([(str(req.positives), anc + own)], roles.evaluation_hashes)
    return PositiveBank(eval_samples, [(img, m) for _, img, m in named], held_out, positive_hashes, roles)


def write_overlays(out: Path, cat, samples, images, masks, maps, scores, threshold, limit: int) -> list[dict]:
    """``out/overlays/<rank>_<label>_<stem>.png`` of the ``limit`` most anomalous scored images
    (shared colour scale: percentiles 1 / 99.9 of every map) → their rows for result.json."""
    from pipelines.visual import panel
    vmin, vmax = float(np.percentile(maps, 1)), float(np.percentile(maps, 99.9))
    overlays = []
    order = np.argsort(-scores)  # most anomalous first
    (out / "overlays").mkdir(exist_ok=True)
    for rank, i in enumerate(order[:limit]):
        s = samples[i]
        name = f"{rank:03d}_{s.label}_{s.path.stem}.png"
        write_png_atomic(out / "overlays" / name, panel(images[i], masks[i], maps[i], threshold, vmin, vmax))
        overlays.append({"file": f"overlays/{name}", "label": s.label, "score": float(scores[i]),
                         "image": str(s.path.relative_to(cat.root))})
    return overlays


def run_patchcore(req: PatchCoreRequest, progress: ProgressFn | None = None,
                  cancelled: Callable[[], bool] | None = None) -> dict:
    """Fit on train/good, evaluate on the (held-out part of the) test split, write results."""
    from pipelines import metrics as MET
    from pipelines.patchcore import PatchCore

    req.validate()
    cat = load_category(req.data)
    notes = check_sizes(cat)        # mask ≠ image size → LayoutError; mixed sizes → notes
    out = Path(req.out)
    out.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda f, m="": None)
    bank = positive_bank(req, cat)
    eval_samples, positives = bank.eval_samples, bank.positives
    scored_hashes = _scored_hashes(bank.roles, eval_samples)

    for note in notes:
        say(0.0, f"note: {note}")
    say(0.0, f"loading {len(cat.train)} training images")
    train = [load_image(p, req.size) for p in cat.train]
    model = PatchCore(backbone=req.backbone, coreset=req.coreset, size=req.size, seed=req.seed,
                      positive_coreset=req.positive_coreset, orient=req.orient, tiles=int(req.tiles))
    t0 = time.perf_counter()
    model.fit(train, progress=_scaled(progress, 0.02, 0.55), cancelled=cancelled)
    if positives:
        model.fit_positive([p[0] for p in positives], [p[1] for p in positives])
    fit_seconds = time.perf_counter() - t0

    images = [load_image(s.path, req.size) for s in eval_samples]
    masks = np.stack([load_mask(s, req.size) for s in eval_samples])
    labels = np.array([s.is_anomaly for s in eval_samples], int)
    say(0.6, f"scoring {len(images)} test images")
    t1 = time.perf_counter()
    scores, maps = model.predict(images, progress=_scaled(progress, 0.6, 0.9), cancelled=cancelled)
    infer_seconds = time.perf_counter() - t1
    backbone_ms = model.backbone_ms_per_image(images[: min(len(images), 16)])

    res = MET.evaluate(labels, scores, masks, maps)
    fpr, tpr, _ = MET.image_roc(labels, scores)
    metrics = {
        **{k: float(v) for k, v in res.items()},
        "fit_seconds": fit_seconds,
        "ms_per_image": 1000 * infer_seconds / max(len(images), 1),
        "backbone_ms_per_image": backbone_ms,
        "n_train": len(train), "n_test": len(images), "n_positive_images": len(positives),
        # orientation as fit: the mode used ('auto' resolved) and what 'auto' measured
        "orient": model.config["orient"], "orient_requested": req.orient,
        "rotation_gain": model.orientation.get("rotation_gain"), "tiles": int(req.tiles),
        "bank_patches": int(getattr(model, "bank_size", 0) or 0),
        "positive_patches": int(getattr(model, "positive_bank_size", 0) or 0),
        # the positive bank as fit: how many arrays passed the guard, and how many of them are
        # evaluation images (0: the guard refuses otherwise)
        "positive_fit_hashes": len(bank.hashes), "positive_evaluation": 0,
    }
    say(0.92, "writing overlays")
    overlays = write_overlays(out, cat, eval_samples, images, masks, maps, scores, res.get("pixel_threshold"),
                              req.max_overlays)
    summary = {
        "metrics": metrics, "notes": notes, "request": asdict(req), "orientation": model.orientation, "held_out_for_positive_bank": bank.held_out,
        "positive_fit_hashes": bank.hashes,
        "scored_hashes": scored_hashes,     # pixel hashes of the scored images (runs go stale by them)
        "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()}, "overlays": overlays,
        "scores": [{"image": str(s.path.relative_to(cat.root)), "label": s.label, "score": float(sc)}
                   for s, sc in zip(eval_samples, scores)],
    }
    atomic_write_json(out / "metrics.json", metrics, indent=1)
    atomic_write_json(out / "result.json", summary, indent=1)
    model.save(out / "model")
    say(1.0, "done")
    return summary


def _scored_hashes(roles, eval_samples) -> list[str]:
    """Pixel hashes of the images a run scores (the store's ``images.sha256`` of the same pixels):
    a later role change that makes one of them ``reference`` marks the run stale (studio.runs)."""
    from pipelines.roles import file_pixel_hash
    known = dict(roles.hashes) if roles is not None else {}
    return [known.get(s.path) or file_pixel_hash(s.path) for s in eval_samples]


__all__ = ["PatchCoreRequest", "run_patchcore", "BANK_MODES", "LayoutError"]
