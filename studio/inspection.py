"""DDPM residual-map inspection as use cases: train on good images, evaluate, inspect one image,
and the depth × image reconstruction grid (failure analysis).

Shared by the DDPM tab (background jobs), the CLI (`python -m studio ddpm train|evaluate|grid`) and
tests. Model code lives in ``pipelines.ddpm``; this module handles data, files and records.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np

from pipelines.fileio import atomic_write_json
from pipelines.imageio import write_png_atomic
from pipelines.training import CancelFn, ProgressFn


@dataclass
class DDPMTrainRequest:
    data: str                         # MVTec-AD-layout category (trains on train/good only)
    out: str                          # checkpoint folder (config.json + safetensors)
    minutes: float | None = 20.0      # time budget of this run
    steps: int | None = None          # total step target (with resume: including earlier steps)
    noise: str = "gaussian"           # gaussian | simplex
    prediction: str = "v"             # v | epsilon: what the U-Net predicts
    size: int = 128                   # working resolution
    crop: int = 64                    # training window (U-Net sample size)
    preset: str = "small"
    t_max: int = 350                  # training timesteps in [0, t_max): match the depths used
    batch_size: int = 8
    rot90: bool = True                # only for rotation-invariant products
    resume: bool = False
    seed: int = 0

    def validate(self) -> None:
        if self.minutes is None and self.steps is None:
            raise ValueError("give a time budget (minutes) or a number of steps")
        if self.minutes is not None and self.minutes <= 0:
            raise ValueError("minutes must be > 0")
        if self.noise not in ("gaussian", "simplex"):
            raise ValueError(f"noise must be gaussian or simplex, not {self.noise!r}")
        if self.prediction not in ("v", "epsilon"):
            raise ValueError(f"prediction must be v or epsilon, not {self.prediction!r}")


@dataclass
class DDPMEvalRequest:
    data: str
    checkpoint: str
    out: str
    depths: list[int] = field(default_factory=lambda: [50])  # measured best on the demo (see note)
    noise: str | None = None          # default: the noise the model was trained with
    seeds: list[int] = field(default_factory=lambda: [0])
    kind: str = "color"               # color | ssim | feature | color+ssim | color+feature
    eval_size: int = 256
    max_overlays: int = 48


def _configs(req: DDPMTrainRequest):
    from pipelines.ddpm import ModelConfig, TrainConfig
    cfg = ModelConfig(size=req.size, crop=req.crop, preset=req.preset, noise=req.noise,
                      prediction=req.prediction)
    cfg.validate()
    tcfg = TrainConfig(steps=req.steps, minutes=req.minutes, batch_size=req.batch_size,
                       t_max=req.t_max, rot90=req.rot90, seed=req.seed)
    return cfg, tcfg


def train_ddpm(req: DDPMTrainRequest, progress: ProgressFn | None = None, cancelled: CancelFn | None = None,
               on_model: Callable[[object], None] | None = None) -> dict:
    """Train (or resume) and save the checkpoint; a cancelled run keeps what it learned."""
    from pipelines.ddpm import DDPMInspector
    from pipelines.mvtec import load_category

    req.validate()
    cat = load_category(req.data, require_masks=False, require_test=False)
    cfg, tcfg = _configs(req)
    out = Path(req.out)
    if req.resume and (out / "config.json").is_file():
        insp = DDPMInspector.load(out, expect=cfg)
    else:
        if req.resume:
            raise ValueError(f"nothing to resume: {out} holds no checkpoint (config.json)")
        insp = DDPMInspector(cfg)
    if on_model:
        on_model(insp)
    result = insp.train(cat.train, tcfg, progress, cancelled)
    insp.save(out)
    summary = {"checkpoint": str(out), "step": result.step, "steps_this_run": result.steps_this_run,
               "seconds": result.seconds, "loss": result.loss, "stopped": result.stopped,
               "losses": result.losses, "parameters": insp.num_parameters, "prediction": insp.cfg.prediction,
               "request": asdict(req)}
    atomic_write_json(out / "training.json", summary, indent=1)
    return summary


def evaluate_ddpm(req: DDPMEvalRequest, progress: ProgressFn | None = None,
                  cancelled: CancelFn | None = None) -> dict:
    """Residual maps and metrics of every test image; a cancel raises
    :class:`pipelines.training.Cancelled` (nothing is written)."""
    from pipelines import metrics as MET
    from pipelines.ddpm import DDPMInspector
    from pipelines.visual import panel

    if not req.depths:
        raise ValueError("give at least one depth")
    insp = DDPMInspector.load(req.checkpoint)
    res = insp.evaluate(req.data, depths=req.depths, noise=req.noise, seeds=req.seeds, kind=req.kind,
                        eval_size=req.eval_size, progress=progress, cancelled=cancelled)
    out = Path(req.out)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    labels = np.array([int(s.is_anomaly) for s in res.samples])
    fpr, tpr, _ = MET.image_roc(labels, res.scores)
    vmin, vmax = float(np.percentile(res.maps, 1)), float(np.percentile(res.maps, 99.9))
    overlays = []
    root = Path(req.data)
    for rank, i in enumerate(np.argsort(-res.scores)[: req.max_overlays]):
        s = res.samples[i]
        name = f"{rank:03d}_{s.label}_{s.path.stem}.png"
        write_png_atomic(out / "overlays" / name, panel(res.images[i], res.masks[i], res.maps[i],
                                                        res.metrics.get("pixel_threshold"), vmin, vmax))
        overlays.append({"file": f"overlays/{name}", "label": s.label, "score": float(res.scores[i]),
                         "image": str(s.path.relative_to(root)) if s.path.is_relative_to(root) else s.path.name})
    metrics = {k: (float(v) if isinstance(v, (int, float, np.floating)) else v) for k, v in res.metrics.items()}
    summary = {"metrics": metrics, "request": asdict(req), "overlays": overlays,
               "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()}}
    atomic_write_json(out / "metrics.json", metrics, indent=1)
    atomic_write_json(out / "result.json", summary, indent=1)
    return summary


@dataclass
class DDPMGridRequest:
    checkpoint: str
    out: str                          # the grid picture (PNG); the cell figures go beside it (.json)
    depths: list[int] = field(default_factory=lambda: [100, 250, 400, 600])
    noise: str | None = None          # default: as trained
    seed: int = 0                     # one noise draw for every depth
    kind: str = "color"
    stride: int = 25                  # DDIM step (timesteps)


@dataclass
class GridItem:
    name: str
    image: np.ndarray                 # uint8 RGB
    mask: np.ndarray | None = None    # defect mask (None: good)
    label: str = ""


def pick_grid_items(items: list[GridItem], n: int) -> list[GridItem]:
    """``n`` items spread over the labels: one of each defect type in turn, a good one last."""
    by: dict[str, list[GridItem]] = {}
    for it in items:
        by.setdefault(it.label or "good", []).append(it)
    order = sorted(k for k in by if k != "good") + (["good"] if "good" in by else [])
    out: list[GridItem] = []
    while len(out) < n and any(by[k] for k in order):
        for k in order:
            if by[k] and len(out) < n:
                out.append(by[k].pop(0))
    return out


def grid_items_from_folder(data: str, n: int = 4) -> list[GridItem]:
    """A few test images of an MVTec-layout category (defects of each type, then a good one)."""
    from pipelines.mvtec import load_category, load_image, load_mask
    cat = load_category(data, require_masks=False)
    # read only the chosen files
    chosen = pick_grid_items([GridItem(s.path.name, None, None, s.label) for s in cat.test], n)
    lookup = {(s.label, s.path.name): s for s in cat.test}
    out = []
    for it in chosen:
        s = lookup[(it.label, it.name)]
        m = load_mask(s, None) if s.is_anomaly else None
        out.append(GridItem(f"{s.label}/{s.path.stem}", load_image(s.path, None), m, s.label))
    return out


def depth_grid(req: DDPMGridRequest, items: list[GridItem], progress: ProgressFn | None = None,
               cancelled: CancelFn | None = None) -> dict:
    """Reconstruct ``items`` at every depth of ``req``, write the labelled grid (PNG) and the cell
    figures (JSON, same name); a cancel raises :class:`pipelines.training.Cancelled` (nothing written)."""
    from pipelines.ddpm import depth_grid_image

    if not req.depths:
        raise ValueError("give at least one depth")
    if not items:
        raise ValueError("no images for the grid")
    insp = load_inspector(req.checkpoint)
    grid = insp.depth_grid([it.image for it in items], req.depths, req.noise, req.seed, req.stride, req.kind,
                           progress=progress, cancelled=cancelled)
    masks = [it.mask for it in items]
    picture = depth_grid_image(grid, [it.name for it in items], masks)
    out = Path(req.out)
    if out.suffix.lower() != ".png":
        out = out.with_suffix(".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_png_atomic(out, picture)
    summary = {"grid": str(out), "depths": grid.depths, "images": [it.name for it in items],
               "prediction": grid.prediction, "noise": grid.noise, "kind": grid.kind,
               "shape": list(picture.shape), "cells": grid.stats(masks), "request": asdict(req)}
    atomic_write_json(out.with_suffix(".json"), summary, indent=1)
    return summary


@lru_cache(maxsize=2)
def _load_cached(checkpoint: str, mtime: float):
    from pipelines.ddpm import DDPMInspector
    return DDPMInspector.load(checkpoint)


def load_inspector(checkpoint: str):
    """Lazily loaded, cached per checkpoint folder (reloaded when its config changes)."""
    cfg = Path(checkpoint) / "config.json"
    if not cfg.is_file():
        raise ValueError(f"{checkpoint} is not a DDPM checkpoint folder (no config.json); "
                         "train one in the DDPM tab or with `python -m studio ddpm train`")
    return _load_cached(str(Path(checkpoint).resolve()), cfg.stat().st_mtime)


def inspect_image(checkpoint: str, image: np.ndarray, depth: int, noise: str | None = None,
                  seed: int = 0, kind: str = "color") -> dict:
    """One image at one depth: reconstruction, residual map and overlay (for the tab's slider)."""
    from pipelines.visual import heatmap, overlay
    insp = load_inspector(checkpoint)
    amap, recon = insp.residual_map(image, depths=[int(depth)], noise=noise, seeds=[int(seed)],
                                    kind=kind, return_reconstruction=True)
    return {"reconstruction": recon, "residual": heatmap(amap), "overlay": overlay(image, amap),
            "score": insp.score(amap), "map": amap}
