"""What "auto" runs for a product's damage type in the studio: the generator chosen on the
product's *reference* defects of the type (:func:`pipelines.generators.choose.choose`,
leave-out among them; evaluation images are never read), cached per product in
``<workspace>/auto/<product>.json``.

The cache entry of a type is keyed by what the choice depends on — the pixel hashes of the
reference defects and of the good images, the candidates, the procedure's version and its
settings — so accepting another reference defect, changing roles or registering a generator
recomputes it; anything else reads it back (a choice costs ~25–40 s per type on 2 cores the
first time). Every array the measurement trains on is guarded against the product's scored
images (:func:`studio.services.guard_rows`), as the generators' donors are.

Settings: ``$DEFECT_STUDIO_AUTO_BACKBONE`` (default ``efficientnet_lite0``, the experiment's)
and ``$DEFECT_STUDIO_AUTO_SIZE`` (default 256 px).
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from pipelines.generators.choose import Choice, ChooseConfig, candidates, choose
from pipelines.training import CancelFn, ProgressFn

AUTO_DIR = "auto"
BACKBONE_ENV, SIZE_ENV = "DEFECT_STUDIO_AUTO_BACKBONE", "DEFECT_STUDIO_AUTO_SIZE"

_locks: dict[tuple, threading.Lock] = {}
_locks_guard = threading.Lock()
_features: dict[str, object] = {}


def cache_path(workspace: str | Path, product: str) -> Path:
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in product) or "unsorted"
    return Path(workspace) / AUTO_DIR / f"{safe}.json"


def _config() -> tuple[str, ChooseConfig]:
    return os.environ.get(BACKBONE_ENV, "efficientnet_lite0"), ChooseConfig(size=int(os.environ.get(SIZE_ENV, "256")))


def _feature_cache(backbone: str):
    from pipelines.backbones import build_backbone
    from pipelines.segmenter import FeatureCache
    with _locks_guard:
        if backbone not in _features:
            _features[backbone] = FeatureCache(build_backbone(backbone))
        return _features[backbone]


def _key(refs: list[dict], goods: list[dict], names: list[str], backbone: str, cfg: ChooseConfig) -> str:
    blob = json.dumps({"refs": sorted(r["sha256"] for r in refs), "goods": sorted(g["sha256"] for g in goods),
                       "candidates": names, "backbone": backbone, "cfg": asdict(cfg),
                       "version": Choice.__dataclass_fields__["version"].default}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def cached_choice(store, product: str, damage_type: str, workspace: str | Path) -> Choice | None:
    """The cached choice for the type when it is still valid (same references, goods, candidates,
    settings), else None. Reads nothing but the cache and the store's rows."""
    from studio.catalog import GOOD
    refs = store.reference_defects(product)             # every type's: the others train too
    goods = store.list_images(product=product, label=GOOD, split="train")[:16]
    backbone, cfg = _config()
    entry = _read(cache_path(workspace, product)).get(damage_type) or {}
    if entry.get("key") != _key(refs, goods, candidates(), backbone, cfg):
        return None
    return Choice.from_json(entry["choice"])


def auto_choice(store, product: str, damage_type: str, workspace: str | Path,
                guard: Callable[[str, list], object], progress: ProgressFn | None = None,
                cancelled: CancelFn | None = None) -> Choice:
    """The :class:`~pipelines.generators.choose.Choice` for ``(product, damage_type)``: cached, or
    measured now on the product's reference defects of the type and cached. ``guard(what,
    [(name, image)])`` refuses an array that copies one of the product's scored images (the
    service passes :func:`pipelines.guard.guard` against them); it sees the reference defects,
    the good images and every synthetic set a segmenter is trained on."""
    from pipelines.fileio import atomic_write_json
    from pipelines.generators.choose import resize_to
    from pipelines.shapes import estimate_foreground
    from studio.catalog import GOOD
    from studio.experiment.sources import MaskSampler
    with _locks_guard:
        lock = _locks.setdefault((str(workspace), product, damage_type), threading.Lock())
    with lock:
        hit = cached_choice(store, product, damage_type, workspace)
        if hit is not None:
            return hit
        every = store.reference_defects(product)
        refs = [r for r in every if r["label"] == damage_type]
        goods_rows = store.list_images(product=product, label=GOOD, split="train")[:16]
        backbone, cfg = _config()
        names = candidates()
        key = _key(every, goods_rows, names, backbone, cfg)
        ref_pairs = [(store.load_image(r["id"]), store.load_mask(r["id"])) for r in refs]
        other_rows = [r for r in every if r["label"] != damage_type]
        others = [(store.load_image(r["id"]), store.load_mask(r["id"])) for r in other_rows]
        goods = [store.load_image(r["id"]) for r in goods_rows]
        guard(f"auto choice ({damage_type} reference defects)", [(f"image {r['id']}", p[0]) for r, p in zip(refs, ref_pairs)])
        guard("auto choice (good images)", [(f"image {r['id']}", g) for r, g in zip(goods_rows, goods)])
        fg = estimate_foreground([resize_to(g, cfg.size) for g in goods]) if len(goods) >= 2 else None

        def sampler_for(learn):
            return MaskSampler.fit(damage_type, [m for _, m in learn], fg, [i for i, _ in learn])
        choice = choose(damage_type, ref_pairs, goods, sampler_for,
                        _feature_cache(backbone) if len(ref_pairs) >= 2 and goods else None, names, cfg,
                        guard=guard, progress=progress, cancelled=cancelled, others=others)
        path = cache_path(workspace, product)
        data = _read(path)
        data[damage_type] = {"key": key, "choice": choice.to_json(), "backbone": backbone}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, data, indent=1)
        return choice


__all__ = ["auto_choice", "cached_choice", "cache_path", "AUTO_DIR", "BACKBONE_ENV", "SIZE_ENV"]
