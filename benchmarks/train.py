"""Training benchmarks: steps per second of both trainers, and the pixel-inpaint quality check.

    python benchmarks/train.py speed [--steps 6] [--threads 2]
        LoRA trainer (tiny local SD inpainting components, built here; default config: 512 px,
        batch 1, rank 4) and pixel-inpaint trainer (default config: 'small' preset, 64 px,
        batch 8) — seconds per step after one warm-up step.

    python benchmarks/train.py quality --model /tmp/pixel_inpaint_bottle --data assets/demo/bottle
        For each damage type: candidates on the good test images with random masks of that type's
        style; PatchCore (fit on train/good) mean anomaly score inside the mask, candidate vs the
        untouched image, and the largest pixel change outside dilate(mask, feather) (must be 0).
        Perlin (classical) candidates on the same masks and the real defects are the references.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def speed(args) -> None:
    import torch
    torch.set_num_threads(args.threads)
    from pipelines import lora as L
    from pipelines import pixel_inpaint as P
    from pipelines.training import samples_from_category
    from tests.test_lora import write_sd_inpaint
    samples = samples_from_category(ROOT / "assets" / "demo" / "bottle")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sd = write_sd_inpaint(tmp)
        rows = []
        for res in (512, 256):
            cfg = L.LoraTrainConfig(output_dir=str(tmp / f"lora{res}"), model=str(sd),
                                    resolution=res, max_steps=1, validate_every=0, checkpoint_every=1000)
            L.train_lora(cfg, samples)                                   # warm-up (+ first checkpoint)
            cfg = L.LoraTrainConfig.from_dict({**cfg.to_dict(), "max_steps": 1 + args.steps})
            r = L.train_lora(cfg, samples)
            rows.append((f"LoRA, tiny SD inpainting, {res} px, batch 1, rank 4", r.seconds / r.steps_this_run))
        cfg = P.PixelInpaintConfig(output_dir=str(tmp / "pix"), data=str(ROOT / "assets/demo/bottle"),
                                   max_steps=1, minutes=None, checkpoint_every=1000)
        P.run_from_config(cfg)
        cfg = P.PixelInpaintConfig.from_dict({**cfg.to_dict(), "max_steps": 1 + args.steps})
        r = P.run_from_config(cfg)
        rows.append(("pixel-inpaint, 'small', 64 px, batch 8", r.seconds / r.steps_this_run))
    print(f"torch threads: {args.threads}; {args.steps} timed steps each (one checkpoint write included)")
    for name, s in rows:
        print(f"  {name:<48} {s:6.2f} s/step  {1 / s:6.2f} steps/s  {3600 / s:7.0f} steps/h")


def _region(img: np.ndarray) -> np.ndarray:
    import cv2
    g = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    reg = np.where(g > 30, 255, 0).astype(np.uint8)
    return cv2.morphologyEx(reg, cv2.MORPH_CLOSE, np.ones((9, 9), np.uint8))


def quality(args) -> None:
    import torch
    torch.set_num_threads(args.threads)
    from pipelines import masks as mk
    from pipelines.classical import PerlinDefectGenerator, style_for
    from pipelines.mvtec import load_category, load_image, load_mask
    from pipelines.patchcore import PatchCore
    from pipelines.pixel_inpaint import PixelInpaintGenerator, load_model

    cat = load_category(args.data)
    model = load_model(args.model)
    goods = [load_image(s.path, 256) for s in cat.test if s.label == "good"]
    t0 = time.time()
    pc = PatchCore().fit([load_image(p, 256) for p in cat.train])
    print(f"PatchCore fit on {len(cat.train)} train/good images: {time.time() - t0:.1f} s; "
          f"model {model.folder} ({model.meta.get('damage_types')})")
    gen, perlin = PixelInpaintGenerator(args.model), PerlinDefectGenerator()
    rng = np.random.default_rng(args.seed)
    print(f"{'type':<15}{'n':>3} {'orig in-mask':>13} {'pixel-inpaint':>14} {'ratio':>6} {'perlin':>8} "
          f"{'real defects':>13} {'max |Δ| outside':>16} {'gen s/img':>10}")
    for t in model.types:
        imgs, masks, cands, perl = [], [], [], []
        t_gen = 0.0
        for i, img in enumerate(goods):
            for k in range(args.per_image):
                m = mk.random_mask(style_for(t), img.shape[:2], rng, region=_region(img))
                s = args.seed + 100 * i + k
                t1 = time.time()
                cands.append(gen(img, m, seed=s, feather=args.feather, damage_type=t, steps=args.steps,
                                 guidance=args.guidance))
                t_gen += time.time() - t1
                perl.append(perlin(img, m, seed=s, feather=args.feather, damage_type=t))
                imgs.append(img)
                masks.append(m)
        _, m_orig = pc.predict(imgs)
        _, m_gen = pc.predict(cands)
        _, m_perl = pc.predict(perl)
        inside = lambda maps: np.array([mp[m > 0].mean() for mp, m in zip(maps, masks)])  # noqa: E731
        o, g, p = inside(m_orig), inside(m_gen), inside(m_perl)
        outside_max = max(int(np.abs(c.astype(int) - im.astype(int))[mk.dilate(m, args.feather) == 0].max(initial=0))
                          for c, im, m in zip(cands, imgs, masks))
        reals = [s for s in cat.test if s.label == t]
        _, m_real = pc.predict([load_image(s.path, 256) for s in reals])
        real = np.mean([mp[load_mask(s, 256)].mean() for mp, s in zip(m_real, reals)])
        print(f"{t:<15}{len(cands):>3} {o.mean():>13.3f} {g.mean():>14.3f} {g.mean() / o.mean():>6.2f} "
              f"{p.mean():>8.3f} {real:>13.3f} {outside_max:>16d} {t_gen / len(cands):>10.2f}")
        print(f"{'':<18}candidate > original on {int((g > o).sum())}/{len(g)} masks")
        if args.save:
            import cv2
            out = Path(args.save)
            out.mkdir(parents=True, exist_ok=True)
            for j in range(min(4, len(cands))):
                x0, y0, x1, y1 = mk.bbox(mk.dilate(masks[j], 24))
                row = np.concatenate([imgs[j], cands[j], perl[j]], 1)
                cv2.imwrite(str(out / f"{t}_{j}.png"), cv2.cvtColor(row, cv2.COLOR_RGB2BGR))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("speed")
    sp.add_argument("--steps", type=int, default=6)
    sp.add_argument("--threads", type=int, default=2)
    q = sub.add_parser("quality")
    q.add_argument("--model", required=True)
    q.add_argument("--data", default=str(ROOT / "assets" / "demo" / "bottle"))
    q.add_argument("--per-image", type=int, default=2)
    q.add_argument("--steps", type=int, default=25)
    q.add_argument("--guidance", type=float, default=1.0)
    q.add_argument("--feather", type=int, default=4)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--threads", type=int, default=2)
    q.add_argument("--save", default=None, help="folder for a few side-by-side PNGs")
    args = ap.parse_args(argv)
    {"speed": speed, "quality": quality}[args.cmd](args)


if __name__ == "__main__":
    main()
