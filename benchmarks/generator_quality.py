"""Per generator and damage type: how far synthetic defects are from real ones, beside how far
real defects are from each other — and how much a generator varies across seeds.

    python benchmarks/generator_quality.py CATEGORY_DIR [CATEGORY_DIR ...] [--generate all]
                                           [--per-type 12] [--seeds 3] [--size 256]

For each MVTec-AD-layout folder the experiment's own protocol is used
(:func:`studio.experiment.load_protocol`, one fold): data roles split every damage type's real defects into
``reference`` (what generators may learn from or copy) and ``evaluation`` (only scored); the
synthetic defects are made exactly as ``python -m studio experiment --generate`` makes them (on
``train/good`` images, masks sampled from the type's shape model fitted on the reference masks,
donors from the reference defects only).

Columns (KID-style MMD² of :func:`pipelines.quality.kid` on patch-level EfficientNet-Lite0 features
of the defects — :func:`_patches`: the cells of the defect's bounding-box crop, 96 px, that lie
in the mask; image-level features give only 2–5 samples per type, far too few for an MMD; lower =
closer; ≈ 0 = indistinguishable at this sample size):

* ``real↔real`` — the baseline: the type's **reference** defects against its **evaluation**
  defects (the real defects split in two by the data roles). A generator cannot be expected to
  get closer to the evaluation defects than other real defects of the type are.
* ``<generator>`` — that generator's synthetic defects against the same **evaluation** defects
  (never against the reference defects they may copy, which would reward copying).
  Shown as mean ± std over ``--seeds`` repeats of ``--per-type`` samples.
* ``div`` — diversity: mean pairwise cosine distance of the features of one (image, mask, type)
  generated with 6 seeds (:func:`pipelines.quality.diversity`), averaged over 4 such groups;
  the real defects' own diversity (reference + evaluation) is in the ``real↔real`` column.

The evaluation defects are *scored* here, nothing learns from them; no default is tuned on this.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEMO = [ROOT / "assets" / "demo" / "bottle", ROOT / "assets" / "demo" / "brushed_metal"]


def _crops(images, masks):
    from pipelines.quality import defect_crop
    return [defect_crop(i, m > 0) for i, m in zip(images, masks) if (m > 0).any()]


def _patches(ext, images, masks, per_defect: int = 32, size: int = 96) -> np.ndarray:
    """Patch-level features of the defects: each defect's bounding-box crop (8 px margin) resized
    to ``size``², its stride-8 and (upsampled) stride-16 Lite0 features concatenated (152-d per
    cell), the cells at least half inside the mask (else the most-defect cell), at most
    ``per_defect`` of them per defect (evenly spaced). With 2–5 real defects per type, image-level
    KID has 2–5 samples and swings by ±1; patch-level features give it hundreds."""
    import cv2
    import torch
    import torch.nn.functional as F
    from pipelines.quality import defect_crop
    rows = []
    for img, m in zip(images, masks):
        m = m > 0
        if not m.any():
            continue
        crop = cv2.resize(np.ascontiguousarray(defect_crop(img, m)), (size, size), interpolation=cv2.INTER_AREA)
        mcrop = cv2.resize(defect_crop(m.astype(np.float32), m), (size // 8, size // 8), interpolation=cv2.INTER_AREA)
        x = torch.from_numpy(crop.astype(np.float32).transpose(2, 0, 1)[None] / 255.0)
        with torch.inference_mode():
            f8, f16 = ext(x)[:2]
        f16 = F.interpolate(f16, size=f8.shape[-2:], mode="bilinear", align_corners=False)
        f = torch.cat([f8, f16], 1)[0].permute(1, 2, 0).reshape(-1, f8.shape[1] + f16.shape[1]).numpy()
        sel = np.flatnonzero(mcrop.reshape(-1) >= 0.5)
        if not len(sel):
            sel = np.array([int(mcrop.argmax())])
        sel = sel[np.linspace(0, len(sel) - 1, min(per_defect, len(sel))).astype(int)]
        rows.append(f[sel])
    return np.concatenate(rows) if rows else np.zeros((0, 152), np.float32)


def measure(folder: Path, generate: str, per_type: int, seeds: int, size: int) -> dict:
    import torch
    from pipelines.backbones import build_backbone
    from pipelines.mvtec import load_image, load_mask
    from pipelines.quality import crop_features, diversity, kid
    from studio.experiment import ExperimentRequest, load_protocol, synthesize

    torch.set_num_threads(1)
    req = ExperimentRequest(data=str(folder), generate=generate, per_type=per_type, size=size,
                            out="/tmp/unused", folds=1)        # the product's roles: one fixed split
    d = load_protocol(req, lambda f, m: None)
    reference, mask_models = d.reference(d.folds[0]), d.mask_models[0]
    ext = build_backbone("efficientnet_lite0")
    feats = lambda crops: crop_features(ext, crops)
    pfeats = lambda images, masks: _patches(ext, images, masks)
    evaluation: dict[str, list] = {}
    for s in d.roles.evaluation:
        evaluation.setdefault(s.label, []).append((load_image(s.path, size), load_mask(s, size)))
    types = [t for t in sorted(reference) if len(evaluation.get(t, [])) >= 2]
    out = {"folder": str(folder), "types": {}, "notes": list(d.notes)}
    for t in types:
        ev = feats(_crops(*zip(*evaluation[t])))
        ref = feats(_crops([i for i, _, _ in reference[t]], [m for _, m, _ in reference[t]]))
        pev = pfeats(*zip(*evaluation[t]))
        pref = pfeats([i for i, _, _ in reference[t]], [m for _, m, _ in reference[t]])
        row = {"n_reference": len(ref), "n_evaluation": len(ev),
               "real_real": kid(pref, pev) if len(pref) >= 2 else None,
               "real_diversity": diversity(np.concatenate([ref, ev])), "generators": {}}
        out["types"][t] = row
    for plan in d.plans:
        per_seed: dict[str, list[float]] = {t: [] for t in types}
        for r in range(seeds):
            syn = synthesize(plan, d.train, d.train_hashes, {t: reference[t] for t in types},
                             mask_models, per_type, seed=0, repeat=100 + r, strength=req.strength,
                             feather=req.feather)
            for t in types:
                s = [x for x in syn if x.label == t]
                per_seed[t].append(kid(pfeats([x.image for x in s], [x.mask for x in s]),
                                       pfeats(*zip(*evaluation[t]))))
        # diversity: one (image, mask, type), 6 generator seeds, 4 such groups per type
        for t in types:
            refs = reference[t]
            params = {"feather": req.feather, "damage_type": t, **plan.params}
            if plan.info.takes_strength:
                params["strength"] = req.strength
            if plan.info.needs_donors:
                params["donors"] = [(i, m.astype(np.uint8) * 255) for i, m, _ in refs]
            divs = []
            for g in range(4):
                rng = np.random.default_rng([7, g])
                base = d.train[int(rng.integers(len(d.train)))]
                mask = mask_models[t].sample(base.shape[:2], rng)
                outs = [plan.generator(base, mask.astype(np.uint8) * 255, seed=s, **params) for s in range(6)]
                divs.append(diversity(feats(_crops(outs, [mask] * len(outs)))))
            k = np.array(per_seed[t])
            out["types"][t]["generators"][plan.name] = {"kid": float(k.mean()), "kid_std": float(k.std()),
                                                        "diversity": float(np.mean(divs))}
    return out


def table(res: dict) -> str:
    gens = sorted({g for row in res["types"].values() for g in row["generators"]})
    lines = [f"### {Path(res['folder']).name}", "",
             "| type | n ref / eval | real↔real KID (div) | " + " | ".join(f"{g} KID (div)" for g in gens) + " |",
             "|---|---|---|" + "---|" * len(gens)]
    for t, row in res["types"].items():
        rr = "—" if row["real_real"] is None else f"{row['real_real']:.3f}"
        cells = [f"{row['generators'][g]['kid']:.3f} ± {row['generators'][g]['kid_std']:.3f} "
                 f"({row['generators'][g]['diversity']:.3f})" if g in row["generators"] else "—" for g in gens]
        lines.append(f"| {t} | {row['n_reference']} / {row['n_evaluation']} | {rr} ({row['real_diversity']:.3f}) | "
                     + " | ".join(cells) + " |")
    means = []
    for g in gens:
        v = [row["generators"][g]["kid"] for row in res["types"].values() if g in row["generators"]]
        means.append(f"{np.mean(v):.3f}" if v else "—")
    rr = [row["real_real"] for row in res["types"].values() if row["real_real"] is not None]
    lines.append(f"| **mean** | | {np.mean(rr):.3f} | " + " | ".join(means) + " |")
    if res["notes"]:
        lines += ["", *(f"- {n}" for n in res["notes"])]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="*", type=Path, help="MVTec-AD-layout category folders")
    ap.add_argument("--no-demo", action="store_true", help="leave out the demo products")
    ap.add_argument("--generate", default="all", help="generators, as `experiment --generate`")
    ap.add_argument("--per-type", type=int, default=12)
    ap.add_argument("--seeds", type=int, default=3, help="repeats of --per-type samples (KID mean ± std)")
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args(argv)
    folders = list(args.folders) + ([] if args.no_demo else DEMO)
    print(__doc__.split("\n\n")[0].strip(), "\n")
    for f in folders:
        print(table(measure(f, args.generate, args.per_type, args.seeds, args.size)), "\n", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
