"""Features → patch embeddings: :class:`PatchEmbedder` (local aggregation, channel pooling,
upsampling to the finest grid)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class PatchEmbedder(nn.Module):
    """Feature maps of a few layers → locally aware patch embeddings on the finest grid.

    ``forward(features)``: list of ``[B x C_l x h_l x w_l]`` (finest first) →
    ``embeddings: [B x h x w x D]`` with ``(h, w) = (h_0, w_0)``.

    * Local aggregation: the mean over the ``k × k`` neighbourhood of each cell, with the zeros
      beyond the border counted (``count_include_pad=True``, the default) — as the paper's
      zero-padded ``unfold`` and anomalib's ``AvgPool2d(3, 1, 1)`` do. Border cells are thereby
      shrunk towards 0 (by 6/9 on an edge, 4/9 in a corner), and so are their distances: the
      border cells of a zero-padded CNN are its least reliable features, and averaging over the
      in-image cells only (``count_include_pad=False``) let them dominate the good images' scores
      on real data (transistor: image AUROC 0.91 instead of 1.00).
    * Channels: ``dim=None`` (default) concatenates every channel as it is (``D = Σ C_l``: 152
      for EfficientNet-Lite0) — unless that exceeds 1024 (WideResNet-50), where each layer is
      adaptive-average-pooled to ``1024 / n_layers`` as in the paper. An int ``dim`` pools each
      layer's channels to ``dim / n_layers`` (every layer weighs the same in the distance).
    """

    def __init__(self, channels: Sequence[int], dim: int | None = None, neighbourhood: int = 3,
                 count_include_pad: bool = True):
        super().__init__()
        self.channels = tuple(int(c) for c in channels)
        n = len(self.channels)
        dim = default_embed_dim(self.channels) if dim is None else int(dim)
        if dim < n:
            raise ValueError(f"dim {dim} is smaller than the number of layers {n}")
        self.concat = dim == sum(self.channels)          # no pooling: channels as they are
        if self.concat:
            self.dims = self.channels
        else:
            self.dims = tuple(dim // n + (1 if i < dim % n else 0) for i in range(n))
        self.neighbourhood = int(neighbourhood)
        self.count_include_pad = bool(count_include_pad)
        # adaptive average pooling over channels is linear: one [C_l x d_l] matrix per layer,
        # equal to F.adaptive_avg_pool1d (same bins), applied as a matmul
        for i, (c, d) in enumerate(zip(self.channels, self.dims)):
            if not self.concat:
                self.register_buffer(f"pool{i}", adaptive_pool_matrix(c, d), persistent=False)

    @property
    def out_dim(self) -> int:
        return int(sum(self.dims))

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        h, w = features[0].shape[-2:]
        k = self.neighbourhood
        parts = []
        for i, fmap in enumerate(features):
            # 1. local neighbourhood aggregation: mean over the k×k patch around each cell
            if k > 1:
                fmap = F.avg_pool2d(fmap, k, stride=1, padding=k // 2,
                                    count_include_pad=self.count_include_pad)
            # 2. channels as they are, or adaptive-average-pooled to this layer's share of D
            #    (linear, so it is done before upsampling, on the smaller map): [B x h_l x w_l x d_l]
            fmap = fmap.permute(0, 2, 3, 1)
            if not self.concat:
                fmap = fmap @ getattr(self, f"pool{i}")
            # 3. coarser maps upsampled (bilinear) to the finest grid
            if fmap.shape[1:3] != (h, w):
                fmap = F.interpolate(fmap.permute(0, 3, 1, 2), size=(h, w), mode="bilinear",
                                     align_corners=False).permute(0, 2, 3, 1)
            parts.append(fmap)
        return torch.cat(parts, dim=-1).contiguous()


def default_embed_dim(channels: Sequence[int]) -> int:
    """Default embedding dimension for layers of ``channels``: all of them, ``Σ C_l``, at most
    1024 (the paper's WideResNet-50 setting: 512 + 1024 channels → 1024).

    152 for EfficientNet-Lite0 (40 + 112), 384 for ResNet-18. On real data (MVTec AD
    transistor, zero-padded aggregation) all 152 channels beat 80 pooled ones (``n · min C_l``,
    the earlier default, which averages groups of ~3 unrelated stride-16 channels) by +0.03
    pixel AUROC / +0.08 AUPRO (0.971 / 0.922 vs 0.939 / 0.843). The stride-16 layer then weighs
    more than the stride-8 one; the demo's small procedural defects prefer the finer layer
    (AUPRO bottle 0.988 vs 0.994, brushed_metal 0.946 vs 0.961; see
    benchmarks/patchcore_ablation.py) — ``dim=80`` restores that weighting."""
    channels = [int(c) for c in channels]
    return min(1024, sum(channels))


def adaptive_pool_matrix(c: int, d: int) -> torch.Tensor:
    """``[c x d]`` matrix ``P`` with ``x @ P == F.adaptive_avg_pool1d(x[:, None], d)[:, 0]``:
    output bin ``j`` averages inputs ``floor(j·c/d) .. ceil((j+1)·c/d) − 1``."""
    P = torch.zeros(c, d)
    for j in range(d):
        lo, hi = (j * c) // d, -((-(j + 1) * c) // d)
        P[lo:hi, j] = 1.0 / (hi - lo)
    return P
