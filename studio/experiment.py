""""Did synthetic data help?" — PatchCore with a dual bank of real defect crops only vs real +
accepted synthetic crops, both evaluated on the same held-out REAL test images.

The real defects that feed the positive bank are held out by ``split_positives`` (deterministic in
the seed), so no image is both in a bank and evaluated, and both arms see the same evaluation set.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from studio.evaluation import PatchCoreRequest, run_patchcore

METRIC_KEYS = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max")


@dataclass
class ExperimentRequest:
    data: str                         # MVTec-AD-layout category (real images only are evaluated)
    synthetic: str                    # export folder with synthetic/<type> + synthetic_ground_truth/
    out: str
    backbone: str = "efficientnet_lite0"
    coreset: float = 0.1
    size: int = 256
    real_fraction: float = 0.3
    seed: int = 0


def _folder_digest(folder: Path, pattern: str = "**/*.png") -> dict:
    files = sorted(p for p in folder.glob(pattern) if p.is_file())
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(folder)).encode())
        h.update(p.read_bytes())
    return {"files": len(files), "sha256": h.hexdigest()[:16]}


def _versions() -> dict:
    import importlib.metadata as md
    out = {}
    for pkg in ("torch", "timm", "faiss-cpu", "scikit-learn", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def run_experiment(req: ExperimentRequest, progress: Callable[[float, str], None] | None = None,
                   cancelled: Callable[[], bool] | None = None) -> dict:
    syn = Path(req.synthetic)
    if not (syn / "synthetic").is_dir() or not any((syn / "synthetic").glob("*/*.png")):
        raise ValueError(f"{syn} holds no accepted synthetic samples (synthetic/<type>/*.png) — accept "
                         "some candidates first, then export")
    out = Path(req.out)
    say = progress or (lambda f, m="": None)
    common = dict(data=req.data, backbone=req.backbone, coreset=req.coreset, size=req.size,
                  real_fraction=req.real_fraction, seed=req.seed)
    say(0.0, "real defect crops only")
    a = run_patchcore(PatchCoreRequest(out=str(out / "real_only"), bank="dual-real", **common),
                      progress=lambda f, m="": say(0.5 * f, f"real only: {m}"), cancelled=cancelled)
    say(0.5, "real + synthetic crops")
    b = run_patchcore(PatchCoreRequest(out=str(out / "with_synthetic"), bank="dual-real-synthetic",
                                       positives=str(syn), **common),
                      progress=lambda f, m="": say(0.5 + 0.5 * f, f"with synthetic: {m}"), cancelled=cancelled)
    assert a["held_out_for_positive_bank"] == b["held_out_for_positive_bank"]  # same evaluation set
    pick = lambda s: {k: s["metrics"][k] for k in (*METRIC_KEYS, "n_test", "n_positive_images",
                                                    "positive_patches", "fit_seconds")}
    result = {
        "real_only": pick(a), "with_synthetic": pick(b),
        "delta": {k: b["metrics"][k] - a["metrics"][k] for k in METRIC_KEYS},
        "evaluated_on": f"{a['metrics']['n_test']} real test images (held out for the bank: "
                        f"{len(a['held_out_for_positive_bank'])})",
        "data": {"category": str(Path(req.data).resolve()), **_folder_digest(Path(req.data))},
        "synthetic": {"folder": str(syn.resolve()), **_folder_digest(syn / "synthetic")},
        "request": asdict(req), "versions": _versions(),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=1))
    (out / "report.md").write_text(report_markdown(result))
    say(1.0, "done")
    return result


def report_markdown(r: dict) -> str:
    lines = ["# Did synthetic data help?", "",
             f"PatchCore, dual memory bank, backbone `{r['request']['backbone']}`, coreset "
             f"{r['request']['coreset']:.0%}, {r['request']['size']} px, seed {r['request']['seed']}.",
             f"Evaluated on {r['evaluated_on']}.", "",
             "| metric | real crops only | real + synthetic | Δ |", "|---|---|---|---|"]
    for k in METRIC_KEYS:
        lines.append(f"| {k} | {r['real_only'][k]:.4f} | {r['with_synthetic'][k]:.4f} | {r['delta'][k]:+.4f} |")
    lines += ["", f"Positive bank: {r['real_only']['n_positive_images']} real images "
                  f"({r['real_only']['positive_patches']} patches) vs {r['with_synthetic']['n_positive_images']} "
                  f"real + synthetic images ({r['with_synthetic']['positive_patches']} patches).",
              f"Data: {r['data']['files']} files, sha256 {r['data']['sha256']}; synthetic: "
              f"{r['synthetic']['files']} files, sha256 {r['synthetic']['sha256']}.",
              f"Versions: {', '.join(f'{k} {v}' for k, v in r['versions'].items())}. {r['created_at']}", ""]
    return "\n".join(lines)
