"""Noise for diffusion training and partial-noising reconstruction.

``gaussian``  white noise, N(0, 1) per element (the usual DDPM noise).
``simplex``   multi-octave 2-D simplex noise as in AnoDDPM (Wyatt et al., CVPR-W 2022): a sum of
              ``octaves`` simplex fields, octave ``o`` sampled at ``2**o / frequency`` cycles per
              pixel with amplitude ``persistence**o``; every (sample, channel) gets its own random
              offset into the noise plane and the gradient table is shuffled by the generator. The
              result is normalised to zero mean / unit variance per sample, so it can replace
              Gaussian noise in ``scheduler.add_noise`` and ``scheduler.get_velocity``.

Everything is vectorised torch (no per-pixel Python loops) and deterministic for a given
``torch.Generator``. Shapes follow torch: ``shape = (B, C, H, W)``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

NOISE_KINDS = ("gaussian", "simplex")
SIMPLEX_DEFAULTS = {"octaves": 6, "persistence": 0.8, "frequency": 32.0}

_F2 = 0.5 * (math.sqrt(3.0) - 1.0)
_G2 = (3.0 - math.sqrt(3.0)) / 6.0
# 12 gradient directions (Gustavson's grad3 restricted to the plane, then normalised)
_GRADS = torch.tensor([[1, 1], [-1, 1], [1, -1], [-1, -1], [1, 0], [-1, 0],
                       [1, 0], [-1, 0], [0, 1], [0, -1], [0, 1], [0, -1]], dtype=torch.float32)
_GRADS = _GRADS / _GRADS.norm(dim=1, keepdim=True)


class NoiseError(ValueError):
    """Unknown noise kind or bad noise parameters."""


def _perm_table(generator: torch.Generator | None) -> torch.Tensor:
    p = torch.randperm(256, generator=generator)
    return torch.cat([p, p])  # [512], so perm[i + perm[j]] never overflows


def simplex2d(x: torch.Tensor, y: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """2-D simplex noise at coordinates ``x``, ``y`` (same shape, float) -> values in ~[-1, 1]."""
    s = (x + y) * _F2
    i = torch.floor(x + s)
    j = torch.floor(y + s)
    t = (i + j) * _G2
    x0 = x - (i - t)
    y0 = y - (j - t)
    i1 = (x0 > y0).to(x.dtype)          # lower triangle: step x first, else y
    j1 = 1.0 - i1
    x1, y1 = x0 - i1 + _G2, y0 - j1 + _G2
    x2, y2 = x0 - 1.0 + 2.0 * _G2, y0 - 1.0 + 2.0 * _G2
    ii = i.long() & 255
    jj = j.long() & 255
    grads = _GRADS.to(x.device, x.dtype)

    def corner(dx, dy, xc, yc):
        h = perm[ii + dx + perm[jj + dy]] % 12
        g = grads[h]
        r = (0.5 - xc * xc - yc * yc).clamp_min(0.0)
        return r ** 4 * (g[..., 0] * xc + g[..., 1] * yc)

    n0 = corner(0, 0, x0, y0)
    n1 = corner(i1.long(), j1.long(), x1, y1)
    n2 = corner(1, 1, x2, y2)
    return 70.0 * (n0 + n1 + n2)


def simplex_noise(shape: Sequence[int], generator: torch.Generator | None = None,
                  octaves: int = 6, persistence: float = 0.8, frequency: float = 32.0,
                  device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Multi-octave simplex noise ``[B x C x H x W]``, zero mean / unit variance per sample.

    ``frequency`` is the period in pixels of the coarsest octave (AnoDDPM uses 64 at 256 px);
    each further octave halves the period and multiplies the amplitude by ``persistence``.
    """
    if len(shape) != 4:
        raise NoiseError(f"simplex noise needs shape (B, C, H, W), got {tuple(shape)}")
    if octaves < 1 or frequency <= 0 or persistence <= 0:
        raise NoiseError(f"simplex noise needs octaves >= 1, frequency > 0, persistence > 0 "
                         f"(got octaves={octaves}, frequency={frequency}, persistence={persistence})")
    b, c, h, w = (int(v) for v in shape)
    perm = _perm_table(generator)
    # one random offset per (sample, channel, octave): independent fields from one table
    offsets = torch.rand(b, c, octaves, 2, generator=generator, dtype=torch.float64) * 1000.0
    ys = torch.arange(h, dtype=torch.float64).view(1, 1, h, 1)
    xs = torch.arange(w, dtype=torch.float64).view(1, 1, 1, w)
    out = torch.zeros(b, c, h, w, dtype=torch.float64)
    amp = 1.0
    for o in range(int(octaves)):
        scale = (2.0 ** o) / float(frequency)
        ox = offsets[:, :, o, 0].view(b, c, 1, 1)
        oy = offsets[:, :, o, 1].view(b, c, 1, 1)
        X = (xs * scale + ox).expand(b, c, h, w)
        Y = (ys * scale + oy).expand(b, c, h, w)
        # float64 coordinates keep the large offsets exact; the field itself is float32-safe
        out += amp * simplex2d(X, Y, perm)
        amp *= persistence
    flat = out.view(b, -1)
    flat = (flat - flat.mean(dim=1, keepdim=True)) / flat.std(dim=1, keepdim=True).clamp_min(1e-8)
    return flat.view(b, c, h, w).to(device=device, dtype=dtype)


def make_noise(kind: str, shape: Sequence[int], generator: torch.Generator | None = None,
               device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               **params) -> torch.Tensor:
    """Noise of ``kind`` ('gaussian' | 'simplex') with ``shape`` ``(B, C, H, W)``.

    ``params`` go to :func:`simplex_noise` (octaves, persistence, frequency); Gaussian noise
    ignores them. Deterministic for a seeded ``generator`` (a CPU generator).
    """
    if kind == "gaussian":
        return torch.randn(tuple(shape), generator=generator, dtype=torch.float32).to(device, dtype)
    if kind == "simplex":
        opts = {**SIMPLEX_DEFAULTS, **{k: v for k, v in params.items() if v is not None}}
        unknown = set(opts) - set(SIMPLEX_DEFAULTS)
        if unknown:
            raise NoiseError(f"unknown simplex parameters {sorted(unknown)}; known: {sorted(SIMPLEX_DEFAULTS)}")
        return simplex_noise(shape, generator, device=device, dtype=dtype, **opts)
    raise NoiseError(f"unknown noise kind {kind!r}; known: {', '.join(NOISE_KINDS)}")
