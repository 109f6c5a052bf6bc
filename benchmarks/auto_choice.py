"""What ``auto`` chooses per damage type on a real category, from its *reference* defects only.

    python benchmarks/auto_choice.py --data ../shared/realdata/transistor [--splits 3] [--per-type 6]

Runs :func:`pipelines.generators.choose.choose` for every damage type with the product's roles
(:func:`pipelines.roles.category_roles`: only reference defects are read; evaluation defects are
never loaded) and prints, per type, every candidate's mean pixel AP on the left-out reference
defects, the choice, and the time it took (2 cores: about a minute per type).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="an MVTec-AD-layout category folder")
    ap.add_argument("--splits", type=int, default=3)
    ap.add_argument("--per-type", type=int, default=6)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--generators", default=None, help="comma-separated candidates (default: every admitted one)")
    args = ap.parse_args(argv)

    import torch

    from pipelines import roles as R
    from pipelines.backbones import build_backbone
    from pipelines.generators.choose import ChooseConfig, candidates, choose
    from pipelines.mvtec import load_category, load_image, load_mask
    from pipelines.segmenter import FeatureCache
    from pipelines.shapes import estimate_foreground
    from studio.experiment.sources import MaskSampler

    torch.set_num_threads(1)
    cat = load_category(args.data)
    roles = R.category_roles(cat)
    S = int(args.size)
    goods = [load_image(p, S) for p in cat.train]
    fg = estimate_foreground(goods)
    fc = FeatureCache(build_backbone(args.backbone))
    f_goods = fc.features(goods)
    names = candidates(args.generators.split(",") if args.generators else None)
    cfg = ChooseConfig(per_type=args.per_type, splits=args.splits, steps=args.steps, size=S)
    by_type: dict[str, list] = {}
    for s in roles.reference:
        by_type.setdefault(s.label, []).append((load_image(s.path, S), load_mask(s, S)))
    print(f"{Path(args.data).name}: {len(roles.reference)} reference defects ({roles.source}), "
          f"{len(goods)} train/good; candidates: {', '.join(names)}")
    print(f"{'type':16s} {'n':>2s} " + " ".join(f"{n[:9]:>9s}" for n in names) + "  choice      s")
    total = 0.0
    for t, refs in sorted(by_type.items()):
        t0 = time.perf_counter()
        def sampler_for(learn, t=t):
            return MaskSampler.fit(t, [m for _, m in learn], fg, [i for i, _ in learn])
        c = choose(t, refs, goods, sampler_for, fc, names, cfg, goods_features=f_goods)
        dt = time.perf_counter() - t0
        total += dt
        row = " ".join(f"{c.scores.get(n, float('nan')):9.3f}" for n in names)
        print(f"{t:16s} {len(refs):2d} {row}  {c.generator:10s} {dt:5.1f}")
        print(f"    caption: {c.caption(Path(args.data).name)}")
    print(f"total {total:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
