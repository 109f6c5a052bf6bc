"""Mask shapes per damage type: real vs sampled shape statistics of an MVTec category folder.

    python benchmarks/shapes.py FOLDER [--n 40] [--seed 0] [--png montage.png]

Fits :func:`pipelines.shapes.fit_shape_model` per damage type on the folder's *reference* defect
masks (:func:`pipelines.roles.folder_roles`) against the foreground estimated from
``train/good`` (:func:`pipelines.shapes.estimate_foreground`), samples ``--n`` masks per type,
and prints, per statistic, the median [q25, q75] of

- ``reference``  the masks the model was fitted on,
- ``held-out``   the type's evaluation masks (only measured here, never learned from),
- ``fitted``     samples of the fitted model,
- ``family``     samples of the classic family the type's name picks (what a type without
                 reference masks would get).

A type whose reference masks lie off the estimated foreground (``on_product`` False, e.g. a
transistor's leads when only its body is found) is sampled without a foreground; every row is
measured against the same foreground. ``--png`` writes a montage (per type: references, then
samples) for a visual check.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines import shapes  # noqa: E402
from pipelines.imageio import read_mask, read_rgb  # noqa: E402
from pipelines.roles import folder_roles  # noqa: E402

SHOWN = shapes.STAT_NAMES


def _cell(stats: dict | None, name: str) -> str:
    if not stats:
        return "—"
    med, q1, q3 = shapes.summarize({name: stats[name]})[name]
    if not np.isfinite(med):
        return "n/a"
    return f"{med:.3g} [{q1:.3g}, {q3:.3g}]"


def _table(columns: dict[str, dict | None]) -> str:
    head = ["statistic"] + list(columns)
    rows = [[n] + [_cell(c, n) for c in columns.values()] for n in SHOWN]
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*r) for r in [head] + rows)


def _foreground(root: Path, limit: int = 60) -> np.ndarray:
    goods = sorted(p for p in (root / "train" / "good").iterdir() if p.is_file())[:limit]
    t0 = time.perf_counter()
    fg = shapes.estimate_foreground([read_rgb(p) for p in goods])
    kind = "full frame (no clear object)" if fg.all() else f"{100 * fg.mean():.1f} % of the image"
    print(f"foreground from {len(goods)} train/good images: {kind} "
          f"({time.perf_counter() - t0:.2f} s)")
    return fg


def _montage(rows: list[list[np.ndarray]], path: Path) -> None:
    from pipelines.imageio import write_png_atomic
    h, w = rows[0][0].shape
    n = max(len(r) for r in rows)
    out = np.zeros((len(rows) * (h + 4), n * (w + 4)), np.uint8)
    for i, row in enumerate(rows):
        for j, m in enumerate(row):
            out[i * (h + 4):i * (h + 4) + h, j * (w + 4):j * (w + 4) + w] = m
    write_png_atomic(path, np.repeat(out[..., None], 3, axis=2))


def run(folder: Path, n: int, seed: int, png: Path | None) -> None:
    roles = folder_roles(folder)
    print(f"# {folder}  (roles: {roles.source})")
    fg = _foreground(Path(roles.root))
    montage = []
    for label in sorted({s.label for s in roles.reference}):
        refs = [read_mask(s.mask_path) for s in roles.reference if s.label == label]
        held = [read_mask(s.mask_path) for s in roles.evaluation if s.label == label]
        model = shapes.fit_shape_model(refs, fg)
        family = shapes.family_for(label)
        where = fg if model.on_product else None
        t0 = time.perf_counter()
        fitted = [model.sample(refs[0].shape, seed + i, where) for i in range(n)]
        dt = (time.perf_counter() - t0) / n
        fam = [shapes.sample_family(family, refs[0].shape, seed + i, where) for i in range(n)]
        print(f"\n## {label}: {len(refs)} reference, {len(held)} held-out; model thin={model.thin} "
              f"edge={model.edge:.2f} on_product={model.on_product}; family {family}; "
              f"{1000 * dt:.0f} ms/sample")
        print(_table({"reference": model.stats,
                      "held-out": shapes.shape_statistics(held, fg) if held else None,
                      "fitted": shapes.shape_statistics(fitted, fg),
                      "family": shapes.shape_statistics(fam, fg)}))
        montage.append(refs + fitted[:8] + fam[:3])
    if png is not None:
        _montage(montage, png)
        print(f"\nmontage: {png} (per type: references, 8 fitted samples, 3 family samples)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", type=Path, help="an MVTec-layout category folder")
    ap.add_argument("--n", type=int, default=40, help="samples per type")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--png", type=Path, default=None, help="write a montage here")
    args = ap.parse_args()
    run(args.folder, args.n, args.seed, args.png)


if __name__ == "__main__":
    main()
