"""PatchCore evaluation as a use case: request → fit → predict → metrics, overlays, runs table.

Shared by the PatchCore tab (as a background job), the CLI (`python -m studio patchcore`) and
tests. The model code lives in ``pipelines.patchcore``; this module only orchestrates data,
timing, files and records.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from pipelines.imageio import write_png_atomic
from pipelines.mvtec import LayoutError, check_sizes, load_category, load_image, load_mask, load_positives

BANK_MODES = ("single", "dual-real", "dual-real-synthetic")
from pipelines.training import ProgressFn  # noqa: E402  (the one progress type)


@dataclass
class PatchCoreRequest:
    data: str                         # MVTec-AD-layout or KolektorSDD2-layout category folder
    out: str                          # output folder (metrics.json, overlays/)
    bank: str = "single"              # single | dual-real | dual-real-synthetic
    positives: str | None = None      # folder of extra (synthetic) defects with masks
    backbone: str = "efficientnet_lite0"
    coreset: float = 0.05             # normal bank: PatchCore's measured default (not the spec's 1 %)
    positive_coreset: float = 0.1     # positive (defect) bank: the specification's 10 %
    size: int = 256
    real_fraction: float = 0.4        # reference share of each defect type (pipelines.roles; a folder's
                                      # evaluation.txt decides instead when it has one)
    seed: int = 0
    max_overlays: int = 48

    def validate(self) -> None:
        if self.bank not in BANK_MODES:
            raise ValueError(f"bank must be one of {', '.join(BANK_MODES)}, not {self.bank!r}")
        if not 0 < self.coreset <= 1:
            raise ValueError(f"coreset must be a fraction in (0, 1], got {self.coreset}")
        if not 0 < self.positive_coreset <= 1:
            raise ValueError(f"positive coreset must be a fraction in (0, 1], got {self.positive_coreset}")
        if not 32 <= self.size <= 1024:
            raise ValueError(f"size must be 32..1024 px, got {self.size}")
        if self.bank == "dual-real-synthetic" and not self.positives:
            raise ValueError("bank 'dual-real-synthetic' needs a folder of accepted synthetic defects")
        if self.bank != "single" and not 0 < self.real_fraction < 1 and self.bank == "dual-real":
            raise ValueError("real_fraction must be in (0, 1) for a dual bank of real defects")


def _scaled(progress: ProgressFn | None, lo: float, hi: float) -> ProgressFn | None:
    if progress is None:
        return None
    return lambda f, msg="": progress(lo + (hi - lo) * f, msg)


def run_patchcore(req: PatchCoreRequest, progress: ProgressFn | None = None,
                  cancelled: Callable[[], bool] | None = None) -> dict:
    """Fit on train/good, evaluate on the (held-out part of the) test split, write results."""
    from pipelines import metrics as MET
    from pipelines.patchcore import PatchCore
    from pipelines.roles import category_roles
    from pipelines.visual import panel

    req.validate()
    cat = load_category(req.data)
    notes = check_sizes(cat)        # mask ≠ image size → LayoutError; mixed sizes → notes
    out = Path(req.out)
    out.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda f, m="": None)

    eval_samples = list(cat.test)
    positives: list[tuple[np.ndarray, np.ndarray]] = []
    held_out: list[str] = []
    if req.bank != "single":
        # data roles: the positive bank copies reference defects only; evaluation defects are scored
        roles = category_roles(cat, fraction=req.real_fraction)
        bank_samples, eval_samples = roles.reference, roles.scored
        held_out = roles.rel(bank_samples)
        positives += [(load_image(s.path, req.size), load_mask(s, req.size)) for s in bank_samples]
    if req.positives and req.bank == "dual-real-synthetic":
        from pipelines.training_data import extra_ancestors
        from pipelines.roles import check_descent
        anc, own = extra_ancestors(req.positives)
        check_descent([(str(req.positives), anc + own)], roles.evaluation_hashes)
        positives += load_positives(req.positives, req.size, layout="auto", exclude=req.data)
    elif req.positives and req.bank == "single":
        raise ValueError("--positives needs a dual bank (bank dual-real-synthetic)")

    for note in notes:
        say(0.0, f"note: {note}")
    say(0.0, f"loading {len(cat.train)} training images")
    train = [load_image(p, req.size) for p in cat.train]
    model = PatchCore(backbone=req.backbone, coreset=req.coreset, size=req.size, seed=req.seed,
                      positive_coreset=req.positive_coreset)
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
        "bank_patches": int(getattr(model, "bank_size", 0) or 0),
        "positive_patches": int(getattr(model, "positive_bank_size", 0) or 0),
    }
    say(0.92, "writing overlays")
    vmin, vmax = float(np.percentile(maps, 1)), float(np.percentile(maps, 99.9))
    overlays = []
    order = np.argsort(-scores)  # most anomalous first
    (out / "overlays").mkdir(exist_ok=True)
    for rank, i in enumerate(order[: req.max_overlays]):
        s = eval_samples[i]
        name = f"{rank:03d}_{s.label}_{s.path.stem}.png"
        write_png_atomic(out / "overlays" / name,
                         panel(images[i], masks[i], maps[i], res.get("pixel_threshold"), vmin, vmax))
        overlays.append({"file": f"overlays/{name}", "label": s.label, "score": float(scores[i]),
                         "image": str(s.path.relative_to(cat.root))})
    summary = {
        "metrics": metrics, "notes": notes, "request": asdict(req), "held_out_for_positive_bank": held_out,
        "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()}, "overlays": overlays,
        "scores": [{"image": str(s.path.relative_to(cat.root)), "label": s.label, "score": float(sc)}
                   for s, sc in zip(eval_samples, scores)],
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    (out / "result.json").write_text(json.dumps(summary, indent=1))
    model.save(out / "model")
    say(1.0, "done")
    return summary


__all__ = ["PatchCoreRequest", "run_patchcore", "BANK_MODES", "LayoutError"]
