"""Outputs of every offline generator pinned before the generator-contract refactor (issue 14):
the same inputs and seed must give the same bytes after it. Hashes were made with the code at
commit 51e2a7f (pixel-inpaint: a 2-step tiny model on one thread, deterministic on this CPU build).

Re-pinned deliberately: cutpaste 1 → 2 (issue 22 item 4: the donor is warped onto the painted mask —
along its skeleton, or outline onto outline by a thin-plate spline or a moments alignment plus a
displacement field — instead of its bbox pasted onto the mask's bbox; the seed's draws changed with
it). Every other pin is the original.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from pipelines.imageio import read_mask, read_rgb
from pipelines.registry import get_generator

ROOT = Path(__file__).resolve().parent.parent
B = ROOT / "assets" / "demo" / "bottle"
PINS = {
    "perlin/broken_large/0": "b45f23ba895ec181e859",
    "perlin/broken_large/1": "5190f82768a73cc63bc5",
    "perlin/contamination/0": "27200e09439cc2aca8ad",
    "perlin/contamination/1": "3c798b8ee847ebf4f6bb",
    "perlin/scratch/0": "9a469d859bfb7a2d474e",
    "perlin/scratch/1": "397607410ea650b5c753",
    "perlin/crack/0": "7cf83a9a7df52c5e47d9",
    "perlin/crack/1": "4cd8a70f29c30b4854cc",
    "perlin/color/0": "423b321ac72d8e3b7f54",
    "perlin/color/1": "bcaf035c399ee3898502",
    "cutpaste/0": "7d9ae43ed072f85c59fb",   # cutpaste 2 (was 1efbc070733746ff28f2)
    "cutpaste-mixed/0": "827e8d7b494c00df55bd",   # cutpaste 2 (was 6897b7ed31b8fed08e41)
    "wall-lab/0": "6aa68aa9ec5478418f3f",
    "cutpaste/1": "003db2e98bf554b707d1",   # cutpaste 2 (was c04a65ba3d9732d5e329)
    "cutpaste-mixed/1": "7785c20a17d0b427d1b2",   # cutpaste 2 (was 84c9c1ea0543da0aea6a)
    "wall-lab/1": "39889d86a0226f452ebe",
    "pixel-inpaint/0": "5a4366055d6cfb23d40f",
    "pixel-inpaint/1": "b33aa55caaef3c25849b",
}


def H(a) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:20]


@pytest.fixture(scope="module")
def inputs():
    img = read_rgb(B / "train/good/000.png")
    h, w = img.shape[:2]
    mask = np.zeros((h, w), np.uint8)
    mask[h // 3:h // 3 + 40, w // 3:w // 3 + 50] = 255
    donors = [(read_rgb(B / f"test/contamination/00{i}.png"),
               read_mask(B / f"ground_truth/contamination/00{i}_mask.png")) for i in (0, 1)]
    return img, mask, donors


def test_classical_generators_give_pinned_bytes(inputs):
    img, mask, donors = inputs
    out = {}
    for dt in ("broken_large", "contamination", "scratch", "crack", "color"):
        for s in (0, 1):
            out[f"perlin/{dt}/{s}"] = H(get_generator("perlin")(img, mask, seed=s, feather=4, damage_type=dt,
                                                                strength=0.8))
    for s in (0, 1):
        out[f"cutpaste/{s}"] = H(get_generator("cutpaste")(img, mask, seed=s, feather=4, damage_type="contamination",
                                                           strength=0.8, donors=donors))
        out[f"cutpaste-mixed/{s}"] = H(get_generator("cutpaste")(img, mask, seed=s, feather=2,
                                                                 damage_type="contamination", donors=donors,
                                                                 clone="mixed"))
        out[f"wall-lab/{s}"] = H(get_generator("wall-lab")(img, mask, seed=s, feather=4, color="#3366cc"))
    assert out == {k: v for k, v in PINS.items() if not k.startswith("pixel-inpaint")}


def test_pixel_inpaint_gives_pinned_bytes(tmp_path):
    from pipelines import pixel_inpaint as P
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        P.run_from_config(P.PixelInpaintConfig(
            output_dir=str(tmp_path / "m"), data=str(B), image_size=128, preset="tiny", resolution=32,
            min_crop=32, batch_size=4, max_steps=2, minutes=None, checkpoint_every=2, validate_every=0, seed=0))
        img = cv2.resize(read_rgb(B / "test/good/000.png"), (128, 128), interpolation=cv2.INTER_AREA)
        mask = np.zeros((128, 128), np.uint8)
        mask[40:70, 50:80] = 255
        got = {f"pixel-inpaint/{s}": H(get_generator("pixel-inpaint")(
            img, mask, seed=s, feather=4, damage_type="contamination", model=str(tmp_path / "m"), steps=3))
            for s in (0, 1)}
    finally:
        torch.set_num_threads(threads)
    assert got == {k: v for k, v in PINS.items() if k.startswith("pixel-inpaint")}
