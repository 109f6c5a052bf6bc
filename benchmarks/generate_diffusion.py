"""Seconds per candidate for each diffusion backend with the tiny local test model at 256 px.

    python benchmarks/generate_diffusion.py [--size 256] [--steps 20] [--runs 3] [--threads 2]

Builds the tiny random-init SD 1.5-architecture models of tests/diffusion_fixtures.py (9-channel
inpainting U-Net, 4-channel base U-Net, 8× VAE, ControlNets) in a temp folder, loads them offline
like real checkpoints and times one candidate per backend (median of ``--runs``, after a warm-up
call). The numbers measure the pipeline plumbing, not SD 1.5 itself (a real SD 1.5 is ~1000× the
parameters). On a CUDA machine the same script runs on the GPU and says which card.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from skimage import data  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import cv2
    import torch

    from pipelines import registry
    from tests.diffusion_fixtures import build_model_dir
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    card = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU, {args.threads} threads"

    with tempfile.TemporaryDirectory() as tmp:
        paths = build_model_dir(tmp)
        os.environ.update(DEFECT_STUDIO_SD_INPAINT=str(paths["sd-inpaint"]),
                          DEFECT_STUDIO_SD_BASE=str(paths["sd-base"]),
                          DEFECT_STUDIO_CONTROLNET=str(paths["controlnet-seg"]),
                          DEFECT_STUDIO_CONTROLNET_CANNY=str(paths["controlnet-canny"]))
        s = args.size
        image = cv2.resize(data.coffee(), (s, s), interpolation=cv2.INTER_AREA)
        mask = np.zeros((s, s), np.uint8)
        cv2.circle(mask, (s // 2, s // 2), s // 5, 255, -1)
        common = dict(steps=args.steps, resolution=s, only_masked=False)
        cases = [
            ("sd-inpaint", dict(damage_type="scratch", **common)),
            ("sd-inpaint (only masked)", dict(damage_type="scratch", steps=args.steps,
                                              only_masked=True, resolution=s)),
            ("controlnet", dict(damage_type="scratch", **common)),
            ("controlnet + canny", dict(damage_type="scratch", structure="canny", **common)),
            ("controlnet-full", dict(damage_type="scratch", **common)),
            ("wall", dict(color="#3366cc", **common)),
        ]
        print(f"diffusion backends, tiny local model, {s}×{s} px, {args.steps} steps "
              f"(strength 0.8 → {int(args.steps * 0.8)} denoising steps for inpainting), "
              f"{card}, median of {args.runs}")
        print(f"{'backend':28s} {'s/candidate':>12s}")
        for label, params in cases:
            gen = registry.generator_class(label.split(" ")[0])()
            gen.device = device
            gen(image, mask, seed=0, **params)                       # warm-up: load + first call
            times = []
            for r in range(args.runs):
                t0 = time.perf_counter()
                gen(image, mask, seed=r + 1, **params)
                times.append(time.perf_counter() - t0)
            print(f"{label:28s} {statistics.median(times):12.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
