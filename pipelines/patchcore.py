"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022).

A memory bank of locally aware patch features from normal images, greedy-coreset subsampled;
a test patch's anomaly score is its distance to the nearest bank patch. Pieces, kept apart:

* :class:`PatchEmbedder` (``nn.Module``): backbone feature maps → patch embeddings.
  Two middle stages (strides 8 and 16 at 256 px) → 3×3 average pooling with zero padding
  (local neighbourhood aggregation; border cells shrink towards 0, as in the paper) → the coarser
  map bilinearly upsampled to the finer grid → all channels concatenated (152 for
  EfficientNet-Lite0; layers with more channels are adaptive-average-pooled to 1024 in all, as
  in the paper for WideResNet-50): ``embeddings: [B x h x w x D]``.
* :func:`greedy_coreset`: exact greedy k-center selection on a random projection, batched torch
  ops, with triangle-inequality pruning (only rows that can move closer are recomputed).
* :class:`NearestNeighbours`: exact search (one matmul + max per query chunk, the arithmetic of
  faiss' ``IndexFlatL2``), faiss ``IndexFlatL2``, or faiss ``IndexIVFFlat`` once the bank is large;
  :func:`cdist_knn` (``torch.cdist``) for comparisons.
* :class:`PatchCore`: fit / fit_positive / predict / save / load, progress + cancel.

Scores: patch scores ``[N x h x w]`` are upsampled (bilinear) to the image and smoothed with a
Gaussian (σ = 4 px) → anomaly maps ``[N x size x size]``. The image score
(``image_score="reweight"``, default) is the largest patch score reweighted as in the paper
(eq. 7) and anomalib's implementation:
``s = (1 − softmax_j(||m_test − n_j||)_0) · s*``, where ``m_test`` is the test patch with the
largest score ``s*``, ``n_0 = m*`` its nearest bank patch and ``n_1..n_{k-1}`` the nearest bank
neighbours of ``m*`` (``k = num_neighbors`` = 9). When ``m*`` lies in a dense part of the bank
the weight tends to ``1 − 1/k``; when ``m*`` is itself a rare normal patch (its neighbours are far
from ``m_test``) the weight tends to 1, i.e. the score is raised relative to the dense case.
``image_score="max"`` takes the largest value of the smoothed anomaly map instead.

Input normalisation follows the backbone's weights (:func:`default_normalization`): the TF
EfficientNet-Lite checkpoints expect ``(x − 0.5) / 0.5``, the ResNets ImageNet mean/std.

Dual bank (``fit_positive``): a second, *positive* bank holds patches from inside the masks of
known defects (real ones held out of the evaluation with :func:`split_positives`, or accepted
synthetic ones). With ``d_n`` the distance to the normal bank and ``d_p`` the distance to the
positive bank, the patch score is (``dual_rule``, weight ``λ = dual_weight``):

* ``"margin"`` (default): ``s = d_n + λ · max(0, d_n − d_p)`` — a patch that is closer to a known
  defect than to anything normal gets its score raised by the margin; every other patch keeps
  ``d_n``. Scale-free (no threshold to tune).
* ``"ratio"``: ``s = d_n · (1 + λ · max(0, d_n − d_p) / (d_n + d_p))`` — the same gate, with a
  relative (bounded, ≤ 1 + λ) boost.

Both satisfy ``s ≥ d_n``, are non-increasing in ``d_p``, and with an empty positive bank
(``d_p = +∞``, so ``max(0, d_n − d_p) = 0``) give exactly ``s = d_n``: the dual bank then equals
the single bank, score for score. The image-score reweighting is computed against the normal
bank in both modes. The positive bank must never contain patches of images that are evaluated
— :func:`split_positives` makes a deterministic split.

Images: ``uint8`` (or float in [0, 1]) RGB arrays ``[H x W x 3]`` (greyscale and RGBA are
converted), a stacked array ``[N x H x W x 3]``, or image paths. Every image is resized to
``size × size`` (area interpolation) before feature extraction, so mixed input sizes are fine;
maps come back at ``size × size`` (``predict(..., original_size=True)`` resizes each map back to
its input's ``H × W``).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Iterable, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.backbones import FeatureExtractor, build_backbone
from pipelines.fileio import atomic_write_bytes, atomic_write_json
from pipelines.mvtec import Category, LayoutError, TestSample, load_category, load_image
from pipelines.orientation import (GAIN_MIN, ORIENT_MODES, Canonicalizer, Pose, augment_views, rotation_gain,
                                   rotation_matrix)
from pipelines.training import Cancelled, CancelFn, ProgressFn, check_cancelled, report  # noqa: F401 (Cancelled: re-exported)

FORMAT_VERSION = 1
DUAL_RULES = ("margin", "ratio")
KNN_METHODS = ("auto", "faiss", "torch")
IMAGE_SCORES = ("max", "reweight")
# what a saved config.json without these keys (written before they existed) was computed with
LEGACY_CONFIG = {"normalization": "imagenet", "image_score": "reweight", "count_include_pad": False,
                 "positive_coreset": 1.0,   # models saved before the positive bank had a coreset
                 "orient": "none", "tiles": 1}   # … and before orientation / tiles (issue 27)


class NotFittedError(RuntimeError):
    """predict/save before fit."""


def _check(cancelled: CancelFn | None) -> None:
    """Raise the one :class:`pipelines.training.Cancelled` once ``cancelled()`` is True."""
    check_cancelled(cancelled, "PatchCore")


def _say(progress: ProgressFn | None, fraction: float, message: str) -> None:
    report(progress, fraction, message)


# ------------------------------------------------------------------------------------------------
# Features → patch embeddings


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


def default_normalization(backbone: str) -> str:
    """The input normalisation a backbone's weights were trained with: ``"tf"`` ((x − 0.5)/0.5)
    for the TF EfficientNet-Lite checkpoints, ``"imagenet"`` for everything else."""
    return "tf" if backbone.startswith("efficientnet_lite") else "imagenet"


def adaptive_pool_matrix(c: int, d: int) -> torch.Tensor:
    """``[c x d]`` matrix ``P`` with ``x @ P == F.adaptive_avg_pool1d(x[:, None], d)[:, 0]``:
    output bin ``j`` averages inputs ``floor(j·c/d) .. ceil((j+1)·c/d) − 1``."""
    P = torch.zeros(c, d)
    for j in range(d):
        lo, hi = (j * c) // d, -((-(j + 1) * c) // d)
        P[lo:hi, j] = 1.0 / (hi - lo)
    return P


# ------------------------------------------------------------------------------------------------
# Greedy coreset


def greedy_coreset(features: torch.Tensor, n: int, projection_dim: int = 128, seed: int = 0,
                   progress: ProgressFn | None = None, cancelled: CancelFn | None = None) -> torch.Tensor:
    """Greedy k-center coreset (Sener & Savarese; PatchCore's "greedy coreset") on a Gaussian
    random projection to ``projection_dim`` dimensions.

    ``features: [N x D]`` → indices ``[n]`` (int64) of the selected rows, in selection order.
    Starts from one seeded random row; each step selects the row farthest from everything
    selected so far. Exact greedy, accelerated with the triangle inequality: a row ``x`` whose
    nearest centre is ``a`` can only move closer to the new centre ``c`` if
    ``|a − c| < 2·|x − a|``, so each step computes distances (one ``addmv``) only for those
    candidate rows — a few % of ``N`` after the first steps — plus ``[i]`` centre-centre
    distances. All steps are batched torch ops (``index_select``, ``addmv``), O(N) cheap passes
    instead of an O(N·k) product per step.
    """
    N, D = features.shape
    if n >= N:
        return torch.arange(N)
    if n <= 0:
        raise ValueError(f"coreset size must be positive, got {n}")
    gen = torch.Generator().manual_seed(int(seed))
    z = features.float()
    if projection_dim and D > projection_dim:
        proj = torch.randn(D, projection_dim, generator=gen) / math.sqrt(projection_dim)
        z = z @ proj                                                 # [N x k]
    z = z.contiguous()
    k = z.shape[1]
    sq = (z * z).sum(1)                                              # [N]  |x|²
    centres = torch.empty(n, k)                                      # [n x k] selected rows
    centres_sq = torch.empty(n)
    selected = torch.empty(n, dtype=torch.long)
    assign = torch.zeros(N, dtype=torch.long)                        # nearest centre (its rank)
    idx = int(torch.randint(N, (1,), generator=gen))
    c = z[idx]
    min_d2 = torch.addmv(sq, z, c, alpha=-2.0).add_(sq[idx]).clamp_min_(0)   # [N] squared
    bound = 4 * min_d2                                               # (2·|x − a|)²
    step = max(1, n // 50)
    for i in range(n):
        if i:
            c = z[idx]
            # squared distances from the new centre to the earlier centres: [i]
            dc2 = torch.addmv(centres_sq[:i], centres[:i], c, alpha=-2.0).add_(sq[idx])
            cand = (dc2.index_select(0, assign) < bound).nonzero().squeeze(1)
            d2 = torch.addmv(sq.index_select(0, cand), z.index_select(0, cand), c, alpha=-2.0)
            d2.add_(sq[idx]).clamp_min_(0)
            closer = d2 < min_d2.index_select(0, cand)
            upd, d2 = cand[closer], d2[closer]
            min_d2[upd] = d2
            bound[upd] = 4 * d2
            assign[upd] = i
        selected[i] = idx
        centres[i] = c
        centres_sq[i] = sq[idx]
        idx = int(torch.argmax(min_d2))
        if i % step == 0:
            _check(cancelled)
            _say(progress, i / n, f"coreset {i}/{n}")
    return selected


def greedy_coreset_reference(features: torch.Tensor, n: int, projection_dim: int = 128,
                             seed: int = 0) -> torch.Tensor:
    """The plain O(n·N·k) greedy loop (one full ``addmv`` per step); same selection as
    :func:`greedy_coreset`, kept for tests and benchmarks."""
    N, D = features.shape
    if n >= N:
        return torch.arange(N)
    gen = torch.Generator().manual_seed(int(seed))
    z = features.float()
    if projection_dim and D > projection_dim:
        z = z @ (torch.randn(D, projection_dim, generator=gen) / math.sqrt(projection_dim))
    z = z.contiguous()
    sq = (z * z).sum(1)
    selected = torch.empty(n, dtype=torch.long)
    idx = int(torch.randint(N, (1,), generator=gen))
    min_d2 = torch.full((N,), float("inf"))
    for i in range(n):
        selected[i] = idx
        torch.minimum(min_d2, torch.addmv(sq, z, z[idx], alpha=-2.0).add_(sq[idx]), out=min_d2)
        idx = int(torch.argmax(min_d2))
    return selected


# ------------------------------------------------------------------------------------------------
# Nearest neighbours


class NearestNeighbours:
    """k-NN search in a bank ``[M x D]``; ``search(queries [Q x D], k) → (dist [Q x k], idx [Q x k])``
    with Euclidean (not squared) distances, nearest first. An empty bank gives ``+inf`` / ``-1``.

    ``method``:
      * ``"torch"``: exact, ``|q|² − 2 q·b + |b|²`` (the arithmetic of faiss' ``IndexFlatL2``) as
        one matmul per query chunk (a ~4 MB score block) against the augmented bank ``[b, −|b|²/2]`` + ``max``/``topk``;
        2–4× faster than the faiss-cpu wheel on 2 cores here (its OpenBLAS/libgomp threads
        compete with torch's; see benchmarks/patchcore.py).
      * ``"faiss"``: ``IndexFlatL2`` (exact), or ``IndexIVFFlat`` (``nlist ≈ 4·√M``, ``nprobe``
        16; approximate) once ``M > ivf_threshold``.
      * ``"auto"`` (default): ``"torch"`` up to ``ivf_threshold`` bank rows, faiss IVF above.
    Bank and queries are centred on the bank mean first (distances are unchanged; it reduces
    float32 cancellation in the ``|q|² + |b|² − 2 q·b`` form for near-identical patches).
    """

    def __init__(self, bank: torch.Tensor, method: str = "auto", ivf_threshold: int = 200_000,
                 chunk: int | None = None):
        if method not in KNN_METHODS:
            raise ValueError(f"knn method must be one of {', '.join(KNN_METHODS)}, not {method!r}")
        bank = bank.float()
        if method == "auto":
            method = "faiss" if len(bank) > ivf_threshold else "torch"
        self.method = method
        # queries per matmul: a [chunk x M] score block of ~2**20 floats (4 MB, stays in cache);
        # 512 for PatchCore's usual ~2k-row bank (~10 % faster here than 128), at least 64
        self.chunk = int(chunk) if chunk else max(64, min(1024, 2 ** 20 // max(1, len(bank))))
        self.mean = bank.mean(0) if len(bank) else torch.zeros(bank.shape[1])
        self.bank = (bank - self.mean).contiguous()                  # [M x D], centred
        self.index = None
        if method == "faiss" and len(self.bank):
            import faiss
            x = self.bank.numpy()
            dim = x.shape[1]
            if len(x) > ivf_threshold:
                nlist = int(4 * math.sqrt(len(x)))
                index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, nlist)
                index.train(x)
                index.nprobe = 16
            else:
                index = faiss.IndexFlatL2(dim)
            index.add(x)
            self.index = index
        elif method == "torch" and len(self.bank):
            # augmented bank [(D+1) x M]: [q, 1] · [b, −|b|²/2] = q·b − |b|²/2, so the nearest
            # bank row is one matmul + max (no separate bias pass over the [Q x M] scores)
            half_sq = -0.5 * (self.bank * self.bank).sum(1, keepdim=True)
            # stored [M x (D+1)] row-major and used as its transposed view (MKL's "NT" gemm:
            # ~5 % faster here than a contiguous [(D+1) x M] copy)
            self._bank_aug = torch.cat([self.bank, half_sq], 1).contiguous().T

    def __len__(self) -> int:
        return len(self.bank)

    def search(self, queries: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        q = queries.float()
        if len(self.bank) == 0:
            return torch.full((len(q), k), float("inf")), torch.full((len(q), k), -1, dtype=torch.long)
        k = min(k, len(self.bank))
        q = (q - self.mean).contiguous()
        if self.method == "faiss":
            d2, idx = self.index.search(q.numpy(), k)
            return torch.from_numpy(d2).clamp_min_(0).sqrt_(), torch.from_numpy(idx).long()
        out_d, out_i = [], []
        ones = torch.ones(len(q), 1)
        for c, o in zip(q.split(self.chunk), ones.split(self.chunk)):
            sim = torch.cat([c, o], 1) @ self._bank_aug                # [q x M] = q·b − |b|²/2
            if k == 1:
                sk, ik = sim.max(1, keepdim=True)
            else:
                sk, ik = sim.topk(k, dim=1)
            d2 = (c * c).sum(1, keepdim=True) - 2 * sk               # |q|² − 2 q·b + |b|²
            out_d.append(d2.clamp_min_(0).sqrt_())
            out_i.append(ik)
        return torch.cat(out_d), torch.cat(out_i)


    def nearest_distance(self, queries: torch.Tensor) -> torch.Tensor:
        """Distance of each query to its nearest bank row: ``[Q]`` (no indices).

        For ``"torch"`` this is the same matmul as :meth:`search` reduced with ``amax`` (a
        vectorised values-only reduction, ~1.5× cheaper than the values+indices ``max`` on
        the ``[Q x M]`` scores, which dominates the search for PatchCore's small ``D``)."""
        q = queries.float()
        if len(self.bank) == 0:
            return torch.full((len(q),), float("inf"))
        if self.method != "torch":
            return self.search(q, 1)[0][:, 0]
        q = (q - self.mean).contiguous()
        out = torch.empty(len(q))
        ones = torch.ones(min(len(q), self.chunk), 1)
        for c, o in zip(q.split(self.chunk), out.split(self.chunk)):
            sk = torch.cat([c, ones[:len(c)]], 1).matmul(self._bank_aug).amax(1)   # [q]
            torch.sub((c * c).sum(1), sk, alpha=2, out=o)
        return out.clamp_min_(0).sqrt_()


def cdist_knn(queries: torch.Tensor, bank: torch.Tensor, k: int = 1, chunk: int = 4096
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference k-NN with ``torch.cdist`` + ``topk`` in query chunks (for comparisons)."""
    out_d, out_i = [], []
    for c in queries.float().split(chunk):
        dk, ik = torch.cdist(c, bank.float()).topk(k, dim=1, largest=False)
        out_d.append(dk)
        out_i.append(ik)
    return torch.cat(out_d), torch.cat(out_i)


# ------------------------------------------------------------------------------------------------
# Helpers: images, smoothing, positives split


def _as_rgb(img) -> np.ndarray:
    a = np.asarray(img)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an RGB image [H x W x 3], got an array of shape {a.shape}")
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    if a.shape[2] == 4:
        a = a[..., :3]
    if a.dtype != np.uint8:
        a = a.astype(np.float32)
        if a.max(initial=0) <= 1.0:
            a = a * 255.0
        a = np.clip(a + 0.5, 0, 255).astype(np.uint8)
    return a


def _image_list(images, size: int) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
    """Inputs → list of uint8 RGB ``[size x size x 3]`` and the original (H, W) of each."""
    if isinstance(images, (str, Path)):
        raise TypeError("pass a list of images (or paths); for a category folder use fit_folder()")
    if isinstance(images, np.ndarray) and images.ndim != 4:
        raise ValueError(f"expected a list of images or an array [N x H x W x 3], got an array of "
                         f"shape {images.shape} (wrap a single image in a list)")
    out, shapes = [], []
    for img in images:
        a = load_image(Path(img), None) if isinstance(img, (str, Path)) else _as_rgb(img)
        shapes.append(a.shape[:2])
        if a.shape[:2] != (size, size):
            a = cv2.resize(a, (size, size), interpolation=cv2.INTER_AREA)
        out.append(np.ascontiguousarray(a))
    if not out:
        raise ValueError("no images given")
    return out, shapes


def gaussian_blur(maps: np.ndarray, sigma: float = 4.0) -> np.ndarray:
    """Gaussian smoothing of ``maps: [N x H x W]`` float32 (kernel truncated at 4σ, reflected
    border, like ``scipy.ndimage.gaussian_filter``); OpenCV's separable filter, in place."""
    if sigma <= 0:
        return maps
    k = 2 * int(4 * sigma + 0.5) + 1
    for i in range(len(maps)):
        maps[i] = cv2.GaussianBlur(maps[i], (k, k), sigma, borderType=cv2.BORDER_REFLECT_101)
    return maps


def patch_to_maps(patch: np.ndarray, size: int, sigma: float = 4.0) -> np.ndarray:
    """Patch scores ``[N x h x w]`` → anomaly maps ``[N x size x size]``: bilinear upsampling
    (half-pixel centres, as ``F.interpolate(align_corners=False)``), then Gaussian σ."""
    out = np.empty((len(patch), size, size), np.float32)
    for i, p in enumerate(patch):
        out[i] = cv2.resize(np.ascontiguousarray(p, np.float32), (size, size), interpolation=cv2.INTER_LINEAR)
    return gaussian_blur(out, sigma)


def split_positives(category: Category, fraction: float = 0.3, seed: int = 0
                    ) -> tuple[list[TestSample], list[TestSample]]:
    """Hold out ``fraction`` of each defect type's test images for a positive bank.

    Returns ``(bank_samples, eval_samples)``: disjoint; ``eval_samples`` keeps every good test
    image and the remaining defects, in the category's order. Deterministic in ``seed``: each
    type's images are sorted by path and permuted by ``numpy.random.default_rng((seed, i))``
    (``i`` = the type's index in sorted order). Per type, ``round(fraction · n)`` images are held
    out, at least 1 and at most ``n − 1`` (a type with a single image stays in the evaluation).
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    bank: set[Path] = set()
    for i, label in enumerate(sorted({s.label for s in category.test if s.is_anomaly})):
        paths = sorted(s.path for s in category.test if s.label == label)
        if len(paths) < 2:
            continue
        k = min(max(1, round(fraction * len(paths))), len(paths) - 1)
        order = np.random.default_rng((seed, i)).permutation(len(paths))
        bank.update(paths[j] for j in order[:k])
    bank_samples = [s for s in category.test if s.path in bank]
    eval_samples = [s for s in category.test if s.path not in bank]
    return bank_samples, eval_samples


# ------------------------------------------------------------------------------------------------
# PatchCore


@dataclass
class PatchCoreConfig:
    """Every PatchCore option, written once: :class:`PatchCore`'s keywords, ``model.config`` (a
    dict of these fields), ``config.json`` and :meth:`PatchCore.load` all come from these fields.

    Args:
        backbone: name in :data:`pipelines.backbones.BACKBONES` (default: offline EfficientNet-Lite0).
        layers: backbone stages (timm ``out_indices``); default: strides 8 and 16.
        coreset: fraction of the normal patches kept in the bank, (0, 1]; 1.0 keeps all.
            5 % by default: with all 152 Lite0 channels it scores like 10 % and 25 % (MVTec AD
            transistor and the demo within ±0.001; the paper finds 1 % close to 10 %), and the
            k-NN — the one cost PatchCore adds to the backbone forward — halves.
        dim: embedding dimension D; None: :func:`default_embed_dim` — all channels
            concatenated (152 for EfficientNet-Lite0), at most 1024. Any other value pools each
            layer's channels to ``D / n_layers`` (adaptive average pooling).
        size: images are resized to ``size × size`` (with ``tiles`` > 1: to ``tiles·size``).
        seed: seeds the coreset's start point and random projection.
        projection_dim: random-projection dimension for the coreset selection.
        num_neighbors: bank neighbours used by the image-score reweighting.
        knn: ``"auto"`` (exact torch search; faiss IVF for banks over 200k patches), ``"faiss"``
            (IndexFlatL2 / IVF) or ``"torch"`` (always exact); see :class:`NearestNeighbours`.
        dual_rule / dual_weight: the positive-bank scoring rule and λ (see the module docstring).
        positive_min_fraction: a feature cell joins the positive bank when at least this share
            of its pixels is defect (if none of an image's cells reaches it, its most-defect cell).
        batch_size: images per backbone forward.
        sigma: Gaussian smoothing of the anomaly maps, in pixels of the ``size`` image.
        normalization: input normalisation, a key of
            :data:`pipelines.backbones.NORMALIZATIONS`; None: :func:`default_normalization`
            (``"tf"`` for EfficientNet-Lite, ``"imagenet"`` otherwise).
        image_score: ``"reweight"`` (the paper's eq. 7) or ``"max"`` (largest value of the
            smoothed anomaly map).
        count_include_pad: the 3×3 neighbourhood mean counts the zeros beyond the border (the
            paper's zero-padded patches; default) or averages in-image cells only.
        positive_coreset: fraction of those eligible defect cells kept in the positive bank, (0, 1]
            (greedy coreset, like the normal bank's ``coreset``); 10 % by default, the
            specification's rate. The normal bank keeps its own measured 5 % default: the
            specification's 1 % lost pixel AUROC on MVTec AD transistor (0.960 vs 0.971 at 5 %).
        orient: parts presented in any orientation (:mod:`pipelines.orientation`):
            ``"none"`` — images as they are; ``"canonical"`` — every image (train and test) is
            registered (rotation + translation) to a reference made from train/good and turned
            to its pose before the backbone, the anomaly map turned back (pixel metrics stay in
            the image's own frame); ``"augment"`` — the bank also holds the train images rotated
            by ``k·360/orient_angles`` degrees (and mirrored with ``orient_flip``);
            ``"auto"`` (default) — ``"canonical"`` when turning the train images to the reference
            improves their match to it (:func:`pipelines.orientation.rotation_gain` >
            :data:`pipelines.orientation.GAIN_MIN`), else ``"none"``: aligned products keep
            the plain model, score for score. After ``fit`` the config holds the mode used and
            :attr:`PatchCore.orientation` what was measured.
        orient_angles: rotations of each train image for ``"augment"`` (8: every 45°).
        orient_flip: ``"augment"`` also adds mirror images (off by default: a mirrored part is
            itself a defect for some products, e.g. a flipped nut).
        orient_jitter: ``"canonical"``'s bank also holds each turned train image rotated by
            ± this many degrees (0: none), with the coreset fraction divided by the 3 views so
            the bank — and the k-NN's cost — keeps its size. The registration is off by a few
            degrees (rotated transistor: ≤ 5°); with ±4° the rotated transistor's image AUROC
            went from 0.974 / 0.987 to 0.996 / 0.996 (seeds 0 / 1).
        tiles: small defects: each image is resized to ``tiles·size`` and cut into ``tiles ×
            tiles`` tiles of ``size`` px, each through the backbone (``tiles²`` × its cost; the
            bank and the k-NN grow likewise); maps come back at ``size``.
    """
    backbone: str = "efficientnet_lite0"
    layers: list[int] | None = None
    coreset: float = 0.05
    dim: int | None = None
    size: int = 256
    seed: int = 0
    projection_dim: int = 128
    num_neighbors: int = 9
    knn: str = "auto"
    dual_rule: str = "margin"
    dual_weight: float = 1.0
    positive_min_fraction: float = 0.5
    batch_size: int = 8
    sigma: float = 4.0
    normalization: str | None = None
    image_score: str = "reweight"
    count_include_pad: bool = True
    positive_coreset: float = 0.1
    orient: str = "auto"
    orient_angles: int = 8
    orient_flip: bool = False
    orient_jitter: float = 4.0
    tiles: int = 1

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def checked(self) -> "PatchCoreConfig":
        """A copy with types normalised and every value checked (ValueError says which)."""
        c = replace(self, layers=None if self.layers is None else [int(i) for i in self.layers],
                    coreset=float(self.coreset), dim=None if self.dim is None else int(self.dim),
                    size=int(self.size), seed=int(self.seed), projection_dim=int(self.projection_dim),
                    num_neighbors=int(self.num_neighbors), dual_weight=float(self.dual_weight),
                    positive_min_fraction=float(self.positive_min_fraction), batch_size=int(self.batch_size),
                    sigma=float(self.sigma), count_include_pad=bool(self.count_include_pad),
                    positive_coreset=float(self.positive_coreset), orient_angles=int(self.orient_angles),
                    orient_flip=bool(self.orient_flip), orient_jitter=float(self.orient_jitter),
                    tiles=int(self.tiles),
                    normalization=self.normalization or default_normalization(self.backbone))
        choices = {"dual_rule": DUAL_RULES, "knn": KNN_METHODS, "image_score": IMAGE_SCORES,
                   "orient": ORIENT_MODES}
        for name, allowed in choices.items():
            if getattr(c, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {getattr(c, name)!r}")
        if not 0 < c.coreset <= 1:
            raise ValueError(f"coreset must be a fraction in (0, 1], got {c.coreset}")
        if not 0 < c.positive_coreset <= 1:
            raise ValueError(f"positive_coreset must be a fraction in (0, 1], got {c.positive_coreset}")
        if c.dual_weight < 0:
            raise ValueError(f"dual_weight must be ≥ 0, got {c.dual_weight}")
        if c.size < 32:
            raise ValueError(f"size must be at least 32 px, got {c.size}")
        if not 1 <= c.tiles <= 4:
            raise ValueError(f"tiles must be 1..4, got {c.tiles}")
        if not 1 <= c.orient_angles <= 72:
            raise ValueError(f"orient_angles must be 1..72, got {c.orient_angles}")
        if not 0 <= c.orient_jitter <= 45:
            raise ValueError(f"orient_jitter must be 0..45 degrees, got {c.orient_jitter}")
        return c


class PatchCore:
    """PatchCore anomaly detector with an optional positive (defect) bank.

    ``PatchCore(config=None, *, weights=None, **options)``: ``options`` are the fields of
    :class:`PatchCoreConfig` (which documents each), applied over ``config``; ``weights`` is an
    explicit backbone weights file (bring-your-own backbones). ``model.config`` is the dict of
    those fields.
    """

    def __init__(self, config: PatchCoreConfig | None = None, *, weights: str | Path | None = None,
                 **options):
        cfg = replace(config or PatchCoreConfig(), **options).checked()
        self.config = asdict(cfg)
        self.weights = None if weights is None else str(weights)
        self.extractor: FeatureExtractor = build_backbone(cfg.backbone, cfg.layers, weights,
                                                          normalization=cfg.normalization)
        self.config["layers"] = list(self.extractor.layers)
        self.embedder = PatchEmbedder(self.extractor.channels, cfg.dim, count_include_pad=cfg.count_include_pad)
        self.config["dim"] = self.embedder.out_dim                       # resolved, saved as such
        self.memory_bank: torch.Tensor | None = None                   # [M x D]
        self.positive_bank = torch.empty(0, self.embedder.out_dim)     # [P x D]
        self._nn: NearestNeighbours | None = None
        self._pos_nn: NearestNeighbours | None = None
        self._requested_orient = cfg.orient
        self.canon: Canonicalizer | None = None                        # orient "canonical" only
        self.orientation: dict = {"requested": cfg.orient, "used": cfg.orient}   # what fit measured

    # -- small accessors -------------------------------------------------------------------------

    @property
    def bank_size(self) -> int:
        return 0 if self.memory_bank is None else len(self.memory_bank)

    @property
    def positive_bank_size(self) -> int:
        return len(self.positive_bank)

    @property
    def dim_out(self) -> int:
        return self.embedder.out_dim

    @property
    def input_size(self) -> int:
        """Side of the working image: ``tiles · size``."""
        return self.config["size"] * self.config["tiles"]

    # -- features --------------------------------------------------------------------------------

    def _batches(self, images: list[np.ndarray]) -> Iterable[tuple[int, torch.Tensor]]:
        bs = self.config["batch_size"]
        for start in range(0, len(images), bs):
            batch = np.stack(images[start:start + bs])
            x = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div_(255.0)
            yield start, x

    def tile(self, x: torch.Tensor) -> torch.Tensor:
        """``[B x 3 x t·s x t·s]`` → the backbone's input ``[B·t² x 3 x s x s]`` (row-major tiles)."""
        t, s = self.config["tiles"], self.config["size"]
        if t == 1:
            return x
        B = len(x)
        return x.reshape(B, 3, t, s, t, s).permute(0, 2, 4, 1, 3, 5).reshape(B * t * t, 3, s, s)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B x 3 x S x S]`` → ``embeddings [B x t·h x t·w x D]`` (tiles stitched)."""
        emb = self.embedder(self.extractor(self.tile(x)))
        t = self.config["tiles"]
        if t == 1:
            return emb
        _, h, w, D = emb.shape
        B = len(x)
        return emb.reshape(B, t, t, h, w, D).permute(0, 1, 3, 2, 4, 5).reshape(B, t * h, t * w, D)

    def _inputs(self, images) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
        return _image_list(images, self.input_size)

    @torch.inference_mode()
    def embed(self, images, progress: ProgressFn | None = None, cancelled: CancelFn | None = None,
              what: str = "features") -> torch.Tensor:
        """Images → ``embeddings: [N x h x w x D]`` (batched, under ``torch.inference_mode``;
        in the canonical pose with ``orient="canonical"``)."""
        imgs, _ = self._inputs(images)
        imgs, _ = self._canonical(imgs)
        return self._embed(imgs, progress, cancelled, what)

    @torch.inference_mode()
    def _embed(self, imgs: list[np.ndarray], progress, cancelled, what) -> torch.Tensor:
        out = []
        for start, x in self._batches(imgs):
            _check(cancelled)
            out.append(self._forward(x))
            _say(progress, (start + len(x)) / len(imgs), f"{what} {start + len(x)}/{len(imgs)}")
        return torch.cat(out)

    # -- orientation -----------------------------------------------------------------------------

    def _canonical(self, imgs: list[np.ndarray]) -> tuple[list[np.ndarray], list[Pose] | None]:
        """Working images → (the same turned to the reference pose, their poses); unchanged
        (and None) unless the model's orientation is ``"canonical"``."""
        if self.canon is None:
            return imgs, None
        poses = [self.canon.pose(im) for im in imgs]
        S = self.input_size
        return [Canonicalizer.to_canonical(im, p.matrix(S)) for im, p in zip(imgs, poses)], poses

    def _fit_orientation(self, imgs: list[np.ndarray]) -> tuple[list[np.ndarray], int]:
        """Choose the orientation mode on the training images (``"auto"``) and set it up; returns
        the images the bank is built from (turned, or with their rotated views) and by how many
        views the coreset fraction is divided (canonical's jitter keeps the bank's size)."""
        mode = self._requested_orient
        self.canon = None
        record: dict = {"requested": mode}
        share = 1
        if mode in ("auto", "canonical"):
            canon = Canonicalizer()
            t0 = time.perf_counter()
            poses = canon.fit(imgs)
            gain = rotation_gain(imgs, canon, poses)
            record.update(rotation_gain=round(gain, 4), gain_min=GAIN_MIN,
                          train_angles=[round(p.angle, 1) for p in poses],
                          measure_seconds=round(time.perf_counter() - t0, 3))
            if mode == "auto":
                mode = "canonical" if gain > GAIN_MIN else "none"
            if mode == "canonical":
                self.canon = canon
                S = self.input_size
                imgs = [Canonicalizer.to_canonical(im, p.matrix(S)) for im, p in zip(imgs, poses)]
                jitter = self.config["orient_jitter"]
                if jitter:
                    imgs = imgs + [Canonicalizer.to_canonical(im, rotation_matrix(a, S))
                                   for a in (-jitter, jitter) for im in imgs]
                    share = 3
        if mode == "augment":
            n, flip = self.config["orient_angles"], self.config["orient_flip"]
            imgs = [v for im in imgs for v in augment_views(im, n, flip)]
            record.update(views_per_image=n * (2 if flip else 1))
        record["used"] = mode
        self.config["orient"] = mode
        self.orientation = record
        return imgs, share

    def _disc(self, h: int, w: int) -> torch.Tensor:
        """``[h x w]`` bool: the feature cells whose centre lies inside the disc inscribed in the
        image. With ``orient="canonical"`` the corners of the frame hold what lay outside
        the disc at the image's own angle (other background, or the fill of a rotated image):
        no two images agree there, and the good images' largest scores sat in them (randomly
        rotated transistor: image AUROC 0.94 with them, see the README), so they score 0."""
        yy, xx = torch.meshgrid((torch.arange(h) + 0.5) / h - 0.5, (torch.arange(w) + 0.5) / w - 0.5,
                                indexing="ij")
        return (yy ** 2 + xx ** 2).sqrt() <= 0.5

    # -- fitting ---------------------------------------------------------------------------------

    def fit(self, images, progress: ProgressFn | None = None, cancelled: CancelFn | None = None) -> "PatchCore":
        """Build the normal memory bank from defect-free ``images`` (list / array / paths).

        (orientation: canonical pose or rotated views, see ``orient``) → features
        ``[N·h·w x D]`` → greedy coreset of ``ceil(coreset · N·h·w)`` rows → ``memory_bank``.
        """
        imgs, _ = self._inputs(images)
        imgs, share = self._fit_orientation(imgs)
        _say(progress, 0.0, f"extracting features of {len(imgs)} images")
        emb = self._embed(imgs, lambda f, m: _say(progress, 0.4 * f, m), cancelled, "features")
        features = emb.reshape(-1, emb.shape[-1])                    # [N·h·w x D]
        n = max(1, math.ceil(self.config["coreset"] * len(features) / share))
        if n < len(features):
            _say(progress, 0.4, f"coreset: {n} of {len(features)} patches")
            idx = greedy_coreset(features, n, self.config["projection_dim"], self.config["seed"],
                                 lambda f, m: _say(progress, 0.4 + 0.55 * f, m), cancelled)
            features = features[idx]
        self.memory_bank = features.contiguous().clone()
        _say(progress, 0.96, "building the nearest-neighbour index")
        self._nn = NearestNeighbours(self.memory_bank, self.config["knn"])
        _say(progress, 1.0, f"memory bank: {len(self.memory_bank)} patches × {self.dim_out}")
        return self

    def fit_folder(self, category_root: str | Path, progress: ProgressFn | None = None,
                   cancelled: CancelFn | None = None) -> "PatchCore":
        """Fit on ``CATEGORY/train/good`` of an MVTec-AD-layout folder (bad layout → LayoutError)."""
        cat = load_category(category_root, require_test=False)
        return self.fit(cat.train, progress, cancelled)

    def fit_positive(self, images, masks, progress: ProgressFn | None = None,
                     cancelled: CancelFn | None = None) -> "PatchCore":
        """(Re)build the positive bank from defect ``images`` and their ``masks`` (``[H x W]``,
        nonzero = defect; resized to the feature grid by area averaging). A feature cell joins
        the bank when ≥ ``positive_min_fraction`` of it is defect; an image with a non-empty
        mask but no such cell contributes its most-defect cell. Of these ``E`` eligible cells a
        greedy coreset of ``ceil(positive_coreset · E)`` rows, at least one per defect image, is kept
        (``positive_bank: [P x D]``). Empty lists → empty bank. With ``orient="canonical"`` the
        images and masks are turned to the reference pose first."""
        images, masks = list(images), list(masks)
        if len(images) != len(masks):
            raise ValueError(f"{len(images)} positive images but {len(masks)} masks")
        D = self.dim_out
        if not images:
            self.positive_bank = torch.empty(0, D)
            self._pos_nn = None
            return self
        imgs, _ = self._inputs(images)
        imgs, poses = self._canonical(imgs)
        emb = self._embed(imgs, progress, cancelled, "positive features")   # [N x h x w x D]
        h, w = emb.shape[1:3]
        rows = []
        thr = self.config["positive_min_fraction"]
        S = self.input_size
        for i, (e, m) in enumerate(zip(emb, masks)):
            m = np.asarray(m)
            if m.ndim == 3:
                m = m[..., 0]
            m = (m > 0).astype(np.float32)
            if poses is not None:
                m = cv2.warpAffine(cv2.resize(m, (S, S), interpolation=cv2.INTER_NEAREST), poses[i].matrix(S),
                                   (S, S), flags=cv2.INTER_NEAREST, borderValue=0)
            frac = cv2.resize(m, (w, h), interpolation=cv2.INTER_AREA)
            if frac.max() <= 0:
                continue
            sel = frac >= thr
            if not sel.any():
                sel = frac == frac.max()
            rows.append(e[torch.from_numpy(sel)])
        bank = torch.cat(rows) if rows else torch.empty(0, D)                 # [E x D] eligible cells
        # at least one cell per defect image: a 10 % coreset of a few small defects must not keep one
        n = min(len(bank), max(len(rows), math.ceil(self.config["positive_coreset"] * len(bank)))) if rows else 0
        if rows and n < len(bank):
            _say(progress, 1.0, f"positive coreset: {n} of {len(bank)} defect cells")
            bank = bank[greedy_coreset(bank, n, self.config["projection_dim"], self.config["seed"],
                                       cancelled=cancelled)]
        self.positive_bank = bank.contiguous()
        self._pos_nn = NearestNeighbours(self.positive_bank, self.config["knn"]) if rows else None
        return self

    # -- scoring ---------------------------------------------------------------------------------

    def _combine(self, d_n: torch.Tensor, d_p: torch.Tensor | None) -> torch.Tensor:
        """Patch scores from normal-bank ``d_n`` and positive-bank ``d_p`` distances (same shape)."""
        if d_p is None:
            return d_n
        lam = self.config["dual_weight"]
        gap = (d_n - d_p).clamp_min(0)          # 0 where d_p = +inf (empty bank) or d_p ≥ d_n
        if self.config["dual_rule"] == "margin":
            return d_n + lam * gap
        return d_n * (1 + lam * gap / (d_n + d_p).clamp_min(1e-12))

    def _score_batch(self, emb: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``emb: [B x h x w x D]`` → (image scores ``[B]``, patch scores ``[B x h x w]``).
        With ``image_score="max"`` the image scores come from the maps (see :meth:`predict`)
        and the first item is None."""
        B, h, w, D = emb.shape
        flat = emb.reshape(-1, D)
        # canonical pose: only the disc every orientation keeps is searched (the corners score 0)
        cells = None if self.canon is None else self._disc(h, w).reshape(-1)
        queries = flat if cells is None else emb.reshape(B, h * w, D)[:, cells].reshape(-1, D)
        d_n = self._nn.nearest_distance(queries).reshape(B, -1)      # [B x cells]
        d_p = None
        if self._pos_nn is not None and len(self._pos_nn):
            d_p = self._pos_nn.nearest_distance(queries).reshape(B, -1)
        patch = self._combine(d_n, d_p)                                # [B x cells]
        if cells is not None:
            patch = torch.zeros(B, h * w).masked_scatter_(cells.expand(B, -1), patch)
        if self.config["image_score"] == "max":
            return None, patch.reshape(B, h, w)
        # image score: the max patch, reweighted by the softmax over its distances to the
        # nearest bank neighbours of its own nearest bank patch (the paper's eq. 7)
        rows = torch.arange(B)
        top = patch.argmax(1)
        s_star = patch[rows, top]                                      # [B]
        m_test = flat.reshape(B, h * w, D)[rows, top]                  # [B x D]
        k = min(self.config["num_neighbors"], self.bank_size)
        if k > 1:
            star = self._nn.search(m_test, 1)[1][:, 0]                 # [B] nearest bank patch m*
            m_star = self.memory_bank[star]                            # [B x D]
            _, support = self._nn.search(m_star, k)                    # [B x k], support[:, 0] ≈ m*
            support = torch.where(support < 0, star[:, None], support)
            dist = torch.linalg.vector_norm(m_test[:, None] - self.memory_bank[support], dim=-1)
            # keep m* itself first, even when the index returns a duplicate point in its place
            dist[:, 0] = torch.linalg.vector_norm(m_test - m_star, dim=-1)
            weight = 1 - torch.softmax(dist, dim=1)[:, 0]
            scores = weight * s_star
        else:
            scores = s_star
        return scores, patch.reshape(B, h, w)

    @torch.inference_mode()
    def predict(self, images, progress: ProgressFn | None = None, cancelled: CancelFn | None = None,
                original_size: bool = False):
        """Score ``images``. Returns ``(scores [N], maps [N x size x size])`` as float32 numpy
        (with ``original_size=True``, maps is a list of ``[H_i x W_i]``, one per input). Maps are
        in each image's own frame, also with ``orient="canonical"``."""
        if self._nn is None:
            raise NotFittedError("PatchCore is not fitted: call fit() (or PatchCore.load) first")
        size = self.config["size"]
        imgs, shapes = self._inputs(images)
        scores, maps = [], []
        for start, x in self._batches(imgs):
            _check(cancelled)
            batch, poses = self._canonical(imgs[start:start + len(x)])
            if poses is not None:
                x = next(self._batches(batch))[1]
            s, patch = self._score_batch(self._forward(x))
            m = patch_to_maps(patch.numpy(), size, self.config["sigma"])
            if poses is not None:                        # back to each image's own frame
                m = np.stack([Canonicalizer.to_original(mi, p.matrix(size)) for mi, p in zip(m, poses)])
            maps.append(m)
            # image score "max": the largest value of the smoothed anomaly map
            scores.append(torch.from_numpy(maps[-1].reshape(len(x), -1).max(1)) if s is None else s)
            _say(progress, (start + len(x)) / len(imgs), f"scoring {start + len(x)}/{len(imgs)}")
        scores_np = torch.cat(scores).numpy().astype(np.float32)
        maps_np = np.concatenate(maps)
        if original_size:
            return scores_np, [m if hw == (size, size) else cv2.resize(m, (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR)
                               for m, hw in zip(maps_np, shapes)]
        return scores_np, maps_np

    @torch.inference_mode()
    def backbone_ms_per_image(self, images, repeats: int = 1) -> float:
        """Milliseconds per image of the bare backbone forward (same batching and tiles, after a
        warm-up)."""
        imgs, _ = self._inputs(images)
        batches = [self.tile(x) for _, x in self._batches(imgs)]
        self.extractor(batches[0])
        t0 = time.perf_counter()
        for _ in range(repeats):
            for x in batches:
                self.extractor(x)
        return 1000 * (time.perf_counter() - t0) / (repeats * len(imgs))

    # -- persistence -----------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write ``path/config.json`` and ``path/banks.safetensors`` (atomically: temp + rename)."""
        if self.memory_bank is None:
            raise NotFittedError("nothing to save: PatchCore is not fitted")
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        cfg = {"format": "defect-studio-patchcore", "version": FORMAT_VERSION, **self.config,
               "weights": self.weights, "orientation": self.orientation}
        tensors = {"memory_bank": self.memory_bank.contiguous(), "positive_bank": self.positive_bank.contiguous()}
        if self.canon is not None:
            tensors["orient_reference"] = torch.from_numpy(self.canon.reference).contiguous()
        from safetensors.torch import save
        atomic_write_bytes(folder / "banks.safetensors", save(tensors))
        atomic_write_json(folder / "config.json", cfg, indent=1)
        return folder

    @classmethod
    def load(cls, path: str | Path, weights: str | Path | None = None) -> "PatchCore":
        """Rebuild a saved model (the backbone is rebuilt from its name; ``weights`` overrides the
        saved weights path)."""
        from safetensors.torch import load_file
        folder = Path(path)
        try:
            cfg = json.loads((folder / "config.json").read_text())
            tensors = load_file(str(folder / "banks.safetensors"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"{folder} is not a saved PatchCore model (config.json + banks.safetensors): {exc}") from exc
        if cfg.get("format") != "defect-studio-patchcore":
            raise ValueError(f"{folder}/config.json is not a PatchCore config")
        args = {**LEGACY_CONFIG, **{k: cfg[k] for k in PatchCoreConfig.names() if k in cfg}}
        if args.get("dim") is None:          # models saved before the dim was resolved on save
            args["dim"] = int(tensors["memory_bank"].shape[1])
        if args["orient"] == "auto":         # saved before a fit resolved it: nothing was turned
            args["orient"] = "none"
        model = cls(weights=weights or cfg.get("weights"), **args)
        if args["orient"] == "canonical":
            if "orient_reference" not in tensors:
                raise ValueError(f"{folder}: orient 'canonical' but no orient_reference in banks.safetensors")
            model.canon = Canonicalizer(tensors["orient_reference"].numpy())
        model.orientation = cfg.get("orientation") or {"requested": args["orient"], "used": args["orient"]}
        model.memory_bank = tensors["memory_bank"].float().contiguous()
        model._nn = NearestNeighbours(model.memory_bank, model.config["knn"])
        pos = tensors.get("positive_bank", torch.empty(0, model.dim_out)).float().contiguous()
        model.positive_bank = pos
        model._pos_nn = NearestNeighbours(pos, model.config["knn"]) if len(pos) else None
        return model


__all__ = ["PatchCore", "PatchCoreConfig", "PatchEmbedder", "NearestNeighbours", "greedy_coreset",
           "greedy_coreset_reference", "gaussian_blur", "patch_to_maps", "cdist_knn", "split_positives",
           "default_embed_dim", "Cancelled", "NotFittedError", "LayoutError", "DUAL_RULES", "ORIENT_MODES"]
