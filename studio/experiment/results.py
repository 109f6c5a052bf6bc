"""From the protocol's scores to metrics.json: bootstrap summaries per source, per-type rows, and
one Holm family over every verdict the run reports.

Family: for every source, the three differences (PatchCore + synthetic − reference only,
segmenter reference + synthetic − reference only, segmenter synthetic only − reference only) ×
the four metrics, plus the per-type rows' primary-metric differences of types with at least
:data:`MIN_TYPE_VERDICT` scored defects. Every one of them gets its Holm-adjusted p-value,
interval and verdict (:func:`pipelines.stats.holm`); per-type rows are exploratory: below that
count (and for the other metrics) they carry intervals, no verdict.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from pipelines.stats import compare, holm, strip_draws
from studio.experiment.request import METRIC_KEYS, PRIMARY_METRIC, ExperimentRequest
from studio.experiment.sources import Synthetic

MIN_TYPE_VERDICT = 3
ALPHA = 0.05
DELTAS_PC = {"delta": ("reference_plus_synthetic", "reference_only")}
DELTAS_SEG = {"delta": ("reference_plus_synthetic", "reference_only"),
              "delta_synthetic_only": ("synthetic_only", "reference_only")}


def _compare_source(req: ExperimentRequest, pc_arms: dict, seg_arms: dict, src: str) -> tuple[dict, dict]:
    pc = compare({"reference_only": pc_arms["reference_only"],
                  "reference_plus_synthetic": pc_arms[f"{src}:reference_plus_synthetic"]},
                 DELTAS_PC, n_boot=req.n_boot, seed=req.seed)
    seg = compare({"synthetic_only": seg_arms[f"{src}:synthetic_only"],
                   "reference_only": seg_arms["reference_only"],
                   "reference_plus_synthetic": seg_arms[f"{src}:reference_plus_synthetic"]},
                  DELTAS_SEG, n_boot=req.n_boot, seed=req.seed)
    return {**pc["arms"], **pc["deltas"]}, {**seg["arms"], **seg["deltas"]}


def _subset_arms(arms: dict, keep: list[tuple[int, list[int]]]) -> dict:
    """Each arm's ``[K][F]`` summaries restricted to the folds in ``keep`` (fold, image positions)."""
    return {name: [[reps[f].subset(idx) for f, idx in keep] for reps in per_k] for name, per_k in arms.items()}


def by_type(req: ExperimentRequest, run, src: str) -> dict:
    """Per damage type: the same comparisons on that type's scored defects (pooled over the folds
    where it has some) + every good image. Exploratory: few images per type."""
    d = run.d
    out = {}
    for t in sorted({s.label for s in d.defects}):
        keep = []
        for f, fold in enumerate(d.folds):
            pos = [j for j, i in enumerate(fold.evaluation) if d.defects[i].label == t]
            if pos:
                keep.append((f, pos + [len(fold.evaluation) + g for g in range(d.G)]))
        if not keep:
            continue
        n = sum(len(idx) - d.G for _, idx in keep)
        pc, seg = _compare_source(req, _subset_arms(run.pc_arms, keep), _subset_arms(run.seg_arms, keep), src)
        out[t] = {"n_evaluation": n, "exploratory": True, "patchcore": pc, "segmenter": seg}
    return out


def blocks(req: ExperimentRequest, run) -> dict:
    """Per source: arms, deltas (Holm-adjusted over the run's whole family), per-type rows."""
    out = {}
    family: list[dict] = []
    for src in run.d.sources:
        pc, seg = _compare_source(req, run.pc_arms, run.seg_arms, src)
        out[src] = {"patchcore": pc, "segmenter": seg, "n_synthetic": run.counts[src],
                    "by_type": by_type(req, run, src)}
        family += [pc["delta"][k] for k in METRIC_KEYS]
        family += [seg[dn][k] for dn in DELTAS_SEG for k in METRIC_KEYS]
        for t, row in out[src]["by_type"].items():
            deltas = [row["patchcore"]["delta"], row["segmenter"]["delta"], row["segmenter"]["delta_synthetic_only"]]
            for dblock in deltas:
                for k in METRIC_KEYS:
                    if k == PRIMARY_METRIC and row["n_evaluation"] >= MIN_TYPE_VERDICT:
                        family.append(dblock[k])
                    else:
                        dblock[k]["verdict"] = None          # exploratory: interval only
                        dblock[k].pop("p", None)
    if family:
        holm(family, alpha=ALPHA)
    strip_draws(out)
    for src, b in out.items():
        b["verdict"] = verdict_summary(src, b)
    return out


def _phrase(name: str, v: dict) -> str:
    lo, hi = v.get("ci_adjusted", v["ci95"])
    level = v.get("level", 0.95)
    return (f"{name}: {v['verdict']} ({PRIMARY_METRIC} {v['mean']:+.3f}, Holm-adjusted {100 * level:.2f} % CI "
            f"[{lo:+.3f}, {hi:+.3f}], p_holm {v.get('p_holm', float('nan')):.3g})")


def verdict_summary(src: str, block: dict) -> dict:
    pc, seg = block["patchcore"], block["segmenter"]
    per = {"patchcore": {k: pc["delta"][k]["verdict"] for k in METRIC_KEYS},
           "segmenter": {k: seg["delta"][k]["verdict"] for k in METRIC_KEYS},
           "segmenter_synthetic_only": {k: seg["delta_synthetic_only"][k]["verdict"] for k in METRIC_KEYS}}
    text = "; ".join([_phrase(f"PatchCore positive bank + {src}", pc["delta"][PRIMARY_METRIC]),
                      _phrase(f"segmenter reference + {src}", seg["delta"][PRIMARY_METRIC]),
                      _phrase(f"segmenter {src} only (vs reference only)", seg["delta_synthetic_only"][PRIMARY_METRIC])])
    return {"metric": PRIMARY_METRIC, "patchcore": per["patchcore"][PRIMARY_METRIC],
            "segmenter": per["segmenter"][PRIMARY_METRIC],
            "segmenter_synthetic_only": per["segmenter_synthetic_only"][PRIMARY_METRIC],
            "per_metric": per, "text": text}


def family_size(blocks_: dict) -> int:
    """How many verdicts the run's Holm family holds (read back from any adjusted block)."""
    for b in blocks_.values():
        return int(b["patchcore"]["delta"][PRIMARY_METRIC].get("family_size", 0))
    return 0


def per_type_counts(samples: Sequence[Synthetic]) -> dict[str, int]:
    c: dict[str, int] = {}
    for s in samples:
        c[s.label] = c.get(s.label, 0) + 1
    return dict(sorted(c.items()))


def folder_digest(folder: Path, pattern: str = "**/*.png") -> dict:
    files = sorted(p for p in folder.glob(pattern) if p.is_file())
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(folder)).encode())
        h.update(p.read_bytes())
    return {"files": len(files), "sha256": h.hexdigest()[:16]}


def versions() -> dict:
    import importlib.metadata as md
    out = {}
    for pkg in ("torch", "timm", "scikit-learn", "numpy", "opencv-python-headless"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def result(req: ExperimentRequest, run, blocks_: dict, t_start: float) -> dict:
    """metrics.json: the blocks of :func:`studio.experiment.run_experiment`'s docstring."""
    d = run.d
    top = d.sources[0]
    pc_top = blocks_[top]["patchcore"]
    scored_def = sorted(i for f in d.folds for i in f.evaluation)
    fits = run.fit_summary()
    res = {
        "real_only": {k: pc_top["reference_only"][k]["mean"] for k in METRIC_KEYS},
        "with_synthetic": {k: pc_top["reference_plus_synthetic"][k]["mean"] for k in METRIC_KEYS},
        "delta": {k: pc_top["delta"][k]["mean"] for k in METRIC_KEYS},
        "protocol": {
            "evaluation": d.rel(scored_def),
            "reference": d.rel(sorted({i for f in d.folds for i in f.reference})),
            "scored": d.rel(scored_def) + d.roles.rel(d.good),
            "product_roles": {"source": d.roles.source, "reference": d.roles.rel(d.roles.reference),
                              "evaluation": d.roles.rel(d.roles.evaluation)},
            "folds": {"k": len(d.folds), "source": d.folds_source,
                      "lists": [{"reference": d.rel(f.reference), "evaluation": d.rel(f.evaluation),
                                 "fit": fit, "fit_hashes": sorted(run.fold_hashes[f.index])}
                                for f, fit in zip(d.folds, fits)]},
            "train_good": len(d.train), "roles_source": d.folds_source,
            "repeats": int(req.repeats), "seed": int(req.seed), "n_boot": int(req.n_boot),
            "bootstrap": "two-level: images (stratified, good images shared across folds) and repeats "
                         "(paired across arms); folds pooled as the mean of the fold metrics",
            "multiple_comparisons": {"method": "holm", "alpha": ALPHA, "family_size": family_size(blocks_),
                                     "min_type_verdict": MIN_TYPE_VERDICT},
            "primary_metric": PRIMARY_METRIC, "backbone": req.backbone, "coreset": req.coreset,
            "positive_coreset": req.positive_coreset,
            "size": int(req.size), "segmenter_steps": int(req.segmenter_steps),
            "per_type": int(req.per_type) if d.plans else None,
            "product": req.product, "model_roots": [str(r) for r in req.model_roots()],
        },
        "source": top,
        "patchcore": blocks_[top]["patchcore"],
        "segmenter": blocks_[top]["segmenter"],
        "verdict": blocks_[top]["verdict"],
        "by_type": blocks_[top]["by_type"],
        "n_synthetic": run.counts[top],
    }
    if d.plans:
        res["backends"] = {p.name: blocks_[p.name] for p in d.plans}
        res["generators"] = {p.name: p.provenance(d.roles.evaluation_hashes | {d.defect_hash(i) for i in scored_def})
                             for p in d.plans}
    if req.synthetic:
        res["synthetic"] = {"folder": str(Path(req.synthetic).resolve()), "samples": len(d.export),
                            "per_type": per_type_counts(d.export)}
    res.update({
        "training_hashes": {k: sorted(v) for k, v in run.hashes.items()},
        "notes": d.notes,
        "data": {"category": str(Path(req.data).resolve()), **folder_digest(Path(req.data))},
        "request": asdict(req), "versions": versions(),
        "timing": {k: round(v, 2) for k, v in run.timing.items()},
        "seconds": round(time.perf_counter() - t_start, 1),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    return res


__all__ = ["MIN_TYPE_VERDICT", "ALPHA", "blocks", "by_type", "verdict_summary", "result", "per_type_counts",
           "folder_digest", "versions", "family_size"]
