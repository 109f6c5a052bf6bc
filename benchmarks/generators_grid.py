"""Picture grid: real defects beside synthetic ones from every offline damage generator.

    python benchmarks/generators_grid.py CATEGORY_DIR --out docs/grid.png [--types T ...]
                                         [--n 3] [--seed 0] [--cell 128]

One row per damage type: ``--n`` zoomed crops of the type's real *evaluation* defects (shown
only — never learned from), then, per offline damage generator
(:func:`pipelines.registry.offline_names` for the category's product, in-mask, no hub weights),
``--n`` synthetic defects made on ``train/good`` images, called as the service calls them
(:meth:`pipelines.generator.GeneratorInfo.call_params`: reference donors, good images). The masks are sampled from :func:`pipelines.shapes.shape_model_for` fitted on the type's
*reference* masks against the foreground estimated from ``train/good``; generators that copy or
learn from real defects get the *reference* defects as donors (:func:`pipelines.roles.folder_roles`).
Column j of every generator uses the same good image, mask and seed, so the generators are
compared on identical targets. Each crop is the mask's bounding box, squared, with 60 % margin
(at least 40 px), resized to ``--cell`` px. The PNG is palette-quantised when it would exceed
1.4 MB. Prints the time per generator call.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines import shapes  # noqa: E402
from pipelines.imageio import read_mask, read_rgb  # noqa: E402
from pipelines.registry import default_model, get_generator, get_info, offline_names, picks_model  # noqa: E402
from pipelines.roles import folder_roles  # noqa: E402

MAX_BYTES = 1_400_000
LABEL_H = 18
GAP = 4


def crop_box(mask: np.ndarray, margin: float = 0.6, min_side: int = 40) -> tuple[int, int, int, int]:
    """Square ``(x0, y0, x1, y1)`` around the mask's bounding box, kept inside the image."""
    ys, xs = np.nonzero(mask > 0)
    h, w = mask.shape
    cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
    side = int(min(min(h, w), max(min_side, (1 + margin) * max(np.ptp(xs) + 1, np.ptp(ys) + 1))))
    x0 = int(np.clip(round(cx - side / 2), 0, w - side))
    y0 = int(np.clip(round(cy - side / 2), 0, h - side))
    return x0, y0, x0 + side, y0 + side


def zoom(image: np.ndarray, box: tuple[int, int, int, int], cell: int) -> np.ndarray:
    x0, y0, x1, y1 = box
    return cv2.resize(image[y0:y1, x0:x1], (cell, cell),
                      interpolation=cv2.INTER_CUBIC if x1 - x0 < cell else cv2.INTER_AREA)


def _text(canvas: np.ndarray, text: str, x: int, y: int, scale: float = 0.42) -> None:
    cv2.putText(canvas, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (235, 235, 235), 1, cv2.LINE_AA)


def build(folder: Path, types: list[str] | None, n: int, seed: int, cell: int) -> np.ndarray:
    roles = folder_roles(folder)
    root = Path(roles.root)
    goods = [read_rgb(p) for p in sorted((root / "train" / "good").iterdir()) if p.is_file()][:60]
    fg = shapes.estimate_foreground(goods)
    gens = [g for g in offline_names("damage", root.name) if not get_info(g).full_image and not get_info(g).needs_model]
    labels = sorted({s.label for s in roles.reference})
    if types:
        unknown = sorted(set(types) - set(labels))
        if unknown:
            raise SystemExit(f"no reference defects of type(s) {', '.join(unknown)}; "
                             f"known: {', '.join(labels)}")
        labels = [t for t in labels if t in types]
    groups = ["real (evaluation)", *gens]
    label_w = 118
    width = label_w + len(groups) * (n * (cell + GAP) + 2 * GAP)
    rows = [np.zeros((LABEL_H + 4, width, 3), np.uint8)]
    for gi, name in enumerate(groups):
        _text(rows[0], name, label_w + gi * (n * (cell + GAP) + 2 * GAP), LABEL_H - 3)
    timing: dict[str, list[float]] = {g: [] for g in gens}
    for label in labels:
        refs = [(read_rgb(s.path), read_mask(s.mask_path)) for s in roles.reference if s.label == label]
        evals = [(read_rgb(s.path), read_mask(s.mask_path))          # shown, never learned from
                 for s in roles.evaluation if s.label == label]
        model = shapes.shape_model_for(label, [m for _, m in refs], foregrounds=fg)
        where = fg if getattr(model, "on_product", True) else None
        row = np.zeros((cell + 2 * GAP, width, 3), np.uint8)
        _text(row, label[:16], 4, cell // 2 + 4)
        _text(row, f"{len(refs)} ref", 4, cell // 2 + 22, 0.38)
        x = label_w
        for j in range(n):                                   # real evaluation defects: shown only
            if j < len(evals):
                img, m = evals[j]
                row[GAP:GAP + cell, x:x + cell] = zoom(img, crop_box(m), cell)
            x += cell + GAP
        x += 2 * GAP
        targets = []
        for j in range(n):
            img = goods[j % len(goods)]
            targets.append((img, model.sample(img.shape[:2], seed + j, where)))
        for name in gens:
            gen, info = get_generator(name), get_info(name)
            for j, (img, m) in enumerate(targets):
                params = info.call_params(label, refs, goods[:16])
                if picks_model(name):                         # the model picked for the product and type
                    found = default_model(name, root.name, (), label)
                    if not found:
                        continue
                    params["model"] = found
                t0 = time.perf_counter()
                out = gen(img, m, seed=seed + j, **params)
                timing[name].append(time.perf_counter() - t0)
                row[GAP:GAP + cell, x:x + cell] = zoom(out, crop_box(m), cell)
                x += cell + GAP
            x += 2 * GAP
        rows.append(row)
    for name, ts in timing.items():
        print(f"{name:>16}: {1000 * np.mean(ts):7.1f} ms / call ({len(ts)} calls)")
    return np.concatenate(rows, axis=0)


def save(grid: np.ndarray, out: Path) -> int:
    from PIL import Image
    out.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(grid)
    tmp = out.with_suffix(".tmp.png")
    im.save(tmp, optimize=True)
    if tmp.stat().st_size > MAX_BYTES:
        im = im.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        im.save(tmp, optimize=True)
    tmp.replace(out)
    return out.stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", type=Path, help="an MVTec-layout category folder")
    ap.add_argument("--out", type=Path, required=True, help="the PNG to write")
    ap.add_argument("--types", nargs="*", default=None,
                    help="damage types (default: every type with reference defects)")
    ap.add_argument("--n", type=int, default=3, help="crops per group")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cell", type=int, default=128, help="crop size in px")
    args = ap.parse_args()
    grid = build(args.folder, args.types, args.n, args.seed, args.cell)
    size = save(grid, args.out)
    print(f"{args.out}: {grid.shape[1]}×{grid.shape[0]} px, {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
