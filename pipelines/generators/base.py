"""The one generator call: check inputs → crop window → ``_generate`` → feathered paste-back.

Every windowed generator (perlin, cutpaste, defect-transfer, warp, remove, stroke, …) subclasses
:class:`WindowedGenerator` and implements only::

    _generate(crop: [h x w x 3] uint8, crop_mask: [h x w] bool, rng, feather, *, strength, **params)
        -> [h x w x 3] float 0..255 or uint8

The base does the rest, once, the way IOPaint's ``InpaintModel.__call__`` does:

1. ``image`` → ``[H x W x 3]`` uint8 (:func:`check_image`: grey is stacked, RGBA loses alpha);
   ``mask`` → ``[H x W]`` bool (:func:`pipelines.masks.validate_mask`: empty or wrongly sized
   masks raise :class:`pipelines.masks.MaskError` with a message for the user);
2. unknown parameters are refused, naming the accepted ones (the options dataclass + request
   parameters);
3. the working window: the mask's bounding box grown by the feather radius, one pixel and
   ``_context`` pixels (a generator that needs more surroundings, e.g. to register the window
   to a good image, raises ``_context``), clipped to the image;
4. ``_generate`` on the crop, seeded by ``numpy.random.default_rng(seed)``;
5. paste-back: ``alpha·generated + (1 − alpha)·input`` with ``alpha = masks.feather(mask,
   feather)``, the input copied wherever ``alpha == 0``. So every pixel outside
   ``dilate(mask, feather)`` is byte-identical to the input, whatever ``_generate`` returns.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines import masks as mk
from pipelines.generator import GeneratorBase

DEFAULT_FEATHER = 4


def check_image(image: Any) -> np.ndarray:
    """A generator's input image → ``[H x W x 3]`` uint8 (a grey ``H×W`` image is stacked to RGB,
    an RGBA image loses its alpha). Other dtypes / shapes raise ``ValueError`` naming them."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"expected an H×W×3 RGB image, got an array of shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr[..., :3])


def window(mask: np.ndarray, margin: int) -> tuple[slice, slice]:
    """``(rows, cols)`` slices of the mask's bounding box grown by ``margin``, clipped."""
    x0, y0, x1, y1 = mk.bbox(mask)  # type: ignore[misc]
    h, w = mask.shape
    return (slice(max(0, y0 - margin), min(h, y1 + margin)),
            slice(max(0, x0 - margin), min(w, x1 + margin)))


def composite(image: np.ndarray, generated: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``alpha·generated + (1 − alpha)·image`` as uint8, with ``image`` copied where alpha == 0."""
    a = alpha.astype(np.float32)[..., None]
    out = a * generated.astype(np.float32) + (1.0 - a) * image.astype(np.float32)
    out = np.clip(np.round(out), 0, 255).astype(np.uint8)
    keep = alpha <= 0
    out[keep] = image[keep]
    return out


@dataclass(frozen=True)
class Frame:
    """The whole input around a window: ``image [H x W x 3]`` uint8, ``mask [H x W]`` bool and
    the window's ``rows`` / ``cols`` slices (``image[rows, cols]`` is the crop)."""
    image: np.ndarray
    mask: np.ndarray
    rows: slice
    cols: slice


class WindowedGenerator(GeneratorBase, ABC):
    """Base class of every windowed generator: the module docstring's steps 1–5. Subclasses
    declare ``info`` (:class:`pipelines.generator.GeneratorInfo`) and implement ``_generate``."""

    _context = 2               # extra pixels of context around dilate(mask, feather)
    _request_params = ("damage_type", "strength")   # besides the options: from the request
    _needs_frame = False       # True: _generate also gets ``frame=Frame(image, rows, cols)``

    @property
    def params(self) -> tuple[str, ...]:
        """Accepted parameter names besides ``damage_type`` and ``strength``."""
        extra = (("donors",) if self.info.takes_donors else ()) + (("goods",) if self.info.needs_goods else ())
        return (*extra, *self.info.defaults)

    def __call__(self, image: np.ndarray, mask: np.ndarray, *, seed: int,
                 feather: int = DEFAULT_FEATHER, **params: Any) -> np.ndarray:
        # 1. check the inputs
        image = check_image(image)
        m = mk.validate_mask(mask, image.shape)
        # 2. only declared parameters (None = the option's default)
        unknown = sorted(set(params) - set(self.params) - set(self._request_params))
        if unknown:
            raise TypeError(f"{self.name} got unknown parameter(s) {', '.join(unknown)}; "
                            f"accepted: {', '.join((*self._request_params, *self.params))}")
        params = {k: v for k, v in params.items() if v is not None or k not in self.info.defaults}
        self.check_params(params)
        fe = max(0.0, float(feather))
        rng = np.random.default_rng(int(seed))
        # 3. the working window around the mask
        ys, xs = window(m, int(math.ceil(fe)) + 1 + self._context)
        crop, cmask = image[ys, xs], m[ys, xs]
        strength = float(np.clip(params.pop("strength", self.info.default_strength), 0.0, 1.0))
        # 4. the backend's own work (a backend that registers the whole image, e.g. to a good
        #    image, reads it from ``frame``; it still returns only the window)
        if self._needs_frame:
            params["frame"] = Frame(image, m, ys, xs)
        generated = self._generate(crop, cmask, rng, fe, strength=strength, **params)
        # 5. feathered paste-back; outside dilate(mask, feather) the input's bytes
        out = image.copy()
        out[ys, xs] = composite(crop, generated, mk.feather(cmask, fe))
        return out

    def check_params(self, params: dict) -> None:
        """Fail fast on a bad parameter before any work (default: nothing to check)."""

    @abstractmethod
    def _generate(self, crop, cmask, rng, feather, *, strength, **params):
        """The generated crop for ``crop`` / ``cmask`` (each subclass's own method)."""


__all__ = ["DEFAULT_FEATHER", "check_image", "window", "composite", "Frame", "WindowedGenerator"]
