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

Modules: :mod:`~pipelines.patchcore.config` (the options), :mod:`~pipelines.patchcore.embed`
(features → patch embeddings), :mod:`~pipelines.patchcore.coreset`, :mod:`~pipelines.patchcore.knn`,
:mod:`~pipelines.patchcore.images` (inputs, anomaly maps, positives split) and
:mod:`~pipelines.patchcore.model` (the detector, save / load); the names below are its API.
"""

from __future__ import annotations

from pipelines.mvtec import LayoutError
from pipelines.orientation import ORIENT_MODES
from pipelines.patchcore.config import DUAL_RULES, PatchCoreConfig, default_normalization
from pipelines.patchcore.coreset import greedy_coreset, greedy_coreset_reference
from pipelines.patchcore.embed import PatchEmbedder, adaptive_pool_matrix, default_embed_dim
from pipelines.patchcore.images import gaussian_blur, patch_to_maps, split_positives
from pipelines.patchcore.knn import NearestNeighbours, cdist_knn
from pipelines.patchcore.model import NotFittedError, PatchCore
from pipelines.training import Cancelled

__all__ = ["PatchCore", "PatchCoreConfig", "PatchEmbedder", "NearestNeighbours", "greedy_coreset",
           "greedy_coreset_reference", "gaussian_blur", "patch_to_maps", "cdist_knn", "split_positives",
           "default_embed_dim", "Cancelled", "NotFittedError", "LayoutError", "DUAL_RULES", "ORIENT_MODES",
           "adaptive_pool_matrix", "default_normalization"]
