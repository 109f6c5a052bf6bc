"""DDPM speed at the default size: training steps per second, reconstruction ms per image.

  python benchmarks/ddpm.py [--preset small] [--size 128] [--crop 64] [--threads 1] [--steps 20]

Random-init model (speed does not depend on the weights), demo bottle images. Prints figures.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pipelines.ddpm import DEFAULT_DEPTHS, DDPMInspector, ModelConfig, TrainConfig  # noqa: E402
from pipelines.mvtec import load_category, load_image  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", default=str(ROOT / "assets" / "demo" / "bottle"))
    ap.add_argument("--preset", default=ModelConfig.preset)
    ap.add_argument("--size", type=int, default=ModelConfig.size)
    ap.add_argument("--crop", type=int, default=ModelConfig.crop)
    ap.add_argument("--noise", default="gaussian")
    ap.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--depths", default=",".join(map(str, DEFAULT_DEPTHS)))
    ap.add_argument("--stride", type=int, default=25)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, args.threads))

    cat = load_category(args.data)
    cfg = ModelConfig(size=args.size, crop=args.crop, preset=args.preset, noise=args.noise)
    insp = DDPMInspector(cfg)
    print(f"model: preset {cfg.preset}, {insp.num_parameters / 1e6:.2f} M parameters, images {cfg.size} px, "
          f"crops {cfg.crop} px, batch {args.batch_size}, noise {cfg.noise}, torch threads {torch.get_num_threads()}")
    warm = 3
    insp.train(cat.train, TrainConfig(steps=warm, minutes=None, batch_size=args.batch_size))
    t0 = time.perf_counter()
    insp.train(cat.train, TrainConfig(steps=warm + args.steps, minutes=None, batch_size=args.batch_size))
    dt = time.perf_counter() - t0
    print(f"training: {args.steps / dt:.2f} steps/s ({dt / args.steps * 1000:.0f} ms/step, "
          f"{args.steps * args.batch_size / dt:.1f} crops/s)")

    depths = [int(d) for d in args.depths.split(",")]
    imgs = [load_image(s.path, 256) for s in cat.test[: args.images]]
    insp.residual_maps(imgs[:1], depths=depths[:1], stride=args.stride)         # warm-up
    for kind in ("color", "color+ssim"):
        t0 = time.perf_counter()
        maps, _ = insp.residual_maps(imgs, depths=depths, stride=args.stride, kind=kind)
        dt = time.perf_counter() - t0
        n_ddim = sum(len(range(0, d + 1, args.stride)) for d in depths)
        print(f"reconstruction ({kind}, depths {depths}, DDIM every {args.stride} -> {n_ddim} model calls "
              f"per window): {dt * 1000 / len(imgs):.0f} ms/image (256 px input, map {maps.shape[1:]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
