"""A toy generator in one file: the whole of what a newcomer writes to add a generator
(plus one registry line, here ``DEFECT_STUDIO_GENERATORS=toy=tests.plugins.toy_generator:ToyGenerator``)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipelines import masks as mk
from pipelines.generator import GeneratorBase, GeneratorInfo, option


@dataclass(frozen=True)
class ToyOptions:
    level: int = option(200, "grey level painted into the mask", min=0, max=255, step=1)


class ToyGenerator(GeneratorBase):
    info = GeneratorInfo("toy", "1", "damage", "Paints a flat grey level into the mask (test toy)",
                         options=ToyOptions)

    def __call__(self, image, mask, *, seed, feather=4, level=200, damage_type=None, strength=1.0):
        out = np.asarray(image).copy()
        out[mk.validate_mask(mask, out.shape) > 0] = int(level)
        return out
