"""PatchCore's options: :class:`PatchCoreConfig` (every option, written once), the allowed values
and the defaults of models saved before an option existed."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

from pipelines.orientation import ORIENT_MODES

FORMAT_VERSION = 1
DUAL_RULES = ("margin", "ratio")
KNN_METHODS = ("auto", "faiss", "torch")
IMAGE_SCORES = ("max", "reweight")
# what a saved config.json without these keys (written before they existed) was computed with
LEGACY_CONFIG = {"normalization": "imagenet", "image_score": "reweight", "count_include_pad": False,
                 "positive_coreset": 1.0,   # models saved before the positive bank had a coreset
                 "orient": "none", "tiles": 1}   # … and before orientation / tiles (issue 27)


def default_normalization(backbone: str) -> str:
    """The input normalisation a backbone's weights were trained with: ``"tf"`` ((x − 0.5)/0.5)
    for the TF EfficientNet-Lite checkpoints, ``"imagenet"`` for everything else."""
    return "tf" if backbone.startswith("efficientnet_lite") else "imagenet"


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
