"""Wall-colour validation metrics on real photo crops: the untrained baseline vs the LAB recolour.

    python benchmarks/wall_colour.py [--out /tmp/wall-colour] [--size 256] [--steps 20]

Data: scikit-image's bundled photos (coffee, chelsea, astronaut, rocket; no download), a centre
crop resized to ``--size``, one procedural mask each (``pipelines.masks.random_mask('color')``,
seeded), and one target colour each (#3366cc, #c0392b, #2e7d32, #e8d8b0). They are written as a
wall training folder (``OUT/photos/images`` + ``masks``) and read back with the trainer's loader.

Rows, each written as the wall validation's metrics file (``OUT/<row>/validation/
color_metrics.jsonl``, :func:`pipelines.wall_train.metrics_row`) and printed:

* ``input`` — the crop as is (how far each wall is from its target before anything);
* ``untrained`` — the wall trainer's step-0 validation (the untrained baseline) with a tiny
  random-init SD inpainting model (``tests/diffusion_fixtures``; no SD weights exist offline),
  zero prompt, ``--steps`` DDIM steps, the raw diffusion output;
* ``wall-lab`` — the LAB recolour generator (``pipelines.classical.LabRecolorGenerator``, seed 0)
  on the same crops, masks and targets.

Metrics inside each mask vs its target: mean per-pixel LAB distance, hue error (°), ΔE2000 of the
mean colour; grades: excellent < 5 / 3° / 3, good < 15 / 10° / 10 (all three). Prints, never asserts.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PHOTOS = (("coffee", "#3366cc"), ("chelsea", "#c0392b"), ("astronaut", "#2e7d32"), ("rocket", "#e8d8b0"))


def photo_folder(out: Path, size: int) -> Path:
    """The photos' centre crops and procedural masks as a wall training folder."""
    import skimage.data
    from pipelines import masks as mk
    from pipelines.imageio import write_png_atomic
    for k, (name, _) in enumerate(PHOTOS):
        img = getattr(skimage.data, name)()[..., :3]
        s = min(img.shape[:2])
        y0, x0 = (img.shape[0] - s) // 2, (img.shape[1] - s) // 2
        crop = cv2.resize(img[y0:y0 + s, x0:x0 + s], (size, size), interpolation=cv2.INTER_AREA)
        m = mk.random_mask("color", (size, size), np.random.default_rng(k))
        write_png_atomic(out / "images" / f"{k}-{name}.png", crop)
        write_png_atomic(out / "masks" / f"{k}-{name}.png", m)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="/tmp/wall-colour", help="output folder")
    ap.add_argument("--size", type=int, default=256, help="crop size (px)")
    ap.add_argument("--steps", type=int, default=20, help="DDIM steps of the untrained baseline")
    args = ap.parse_args(argv)

    import torch
    from pipelines import wall_train as W
    from pipelines.classical import LabRecolorGenerator
    from pipelines.color import as_rgb
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.out)
    data = photo_folder(out / "photos", args.size)
    samples = W.wall_samples_from_folder(data)
    targets = [c for _, c in PHOTOS]

    # the untrained baseline: the wall trainer's step-0 validation on a tiny random-init model
    from tests.test_wall_protocol import _write_sd
    sd = out / "sd" / "sd-inpaint"
    if not sd.is_dir():
        _write_sd(out / "sd")
    cfg = W.WallTrainConfig(output_dir=str(out / "untrained"), model=str(sd), resolution=args.size,
                            padding=16, max_steps=1, validate_every=10**6, validation_count=len(PHOTOS),
                            validation_seeds=[0], validation_steps=args.steps, validation_colors=targets,
                            checkpoint_every=10**6, resume=False, wall_min_quality=0.0)
    t0 = time.perf_counter()
    trainer = W.WallTrainer(cfg, samples)
    trainer.run()
    secs = {"untrained": time.perf_counter() - t0}
    # the same crops (the trainer's validation crops), masks and targets for the other rows
    crops = []
    for i, target in trainer.validation_targets():
        x, m = trainer.example(i, None)
        crops.append((((x.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8),
                      (m[0].numpy() * 255).astype(np.uint8), target))
    rows = {"input": W.metrics_row(0, crops, method="input")}
    t0 = time.perf_counter()
    lab = LabRecolorGenerator()
    rows["wall-lab"] = W.metrics_row(0, [(lab(c, m, seed=0, color=t), m, t) for c, m, t in crops],
                                     method="wall-lab")
    secs["wall-lab"] = time.perf_counter() - t0
    for name, row in rows.items():
        W.append_metrics(out / name, row)
    rows["untrained"] = {**W.read_metrics(out / "untrained")[0], "method": "untrained"}

    print(f"wall colour on {len(crops)} scikit-image photo crops ({args.size} px, procedural masks), "
          f"metrics inside the mask vs the target\n")
    print(W.metrics_table([rows[k] for k in ("input", "untrained", "wall-lab")], label="method"))
    print("\nper photo (LAB distance / hue error ° / ΔE2000 → grade):")
    names = [p.stem for p in sorted((data / "images").iterdir())]
    for k, name in enumerate(names):
        cells = []
        for method in ("input", "untrained", "wall-lab"):
            it = rows[method]["items"][k]
            cells.append(f"{method} {it['lab_distance']:.1f} / {it['hue_error_deg']:.1f} / "
                         f"{it['delta_e2000']:.1f} → {it['grade']}")
        print(f"  {name:12s} target {as_rgb(targets[k])}: " + "; ".join(cells))
    print(f"\nmetrics files: {', '.join(str(out / k / 'validation' / W.METRICS_FILE) for k in rows)}")
    print(f"time: untrained validation {secs['untrained']:.1f} s (incl. loading), wall-lab {secs['wall-lab']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
