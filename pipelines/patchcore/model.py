"""The :class:`PatchCore` detector: fitting the normal (and positive) bank, scoring, save / load."""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Iterable

import cv2
import numpy as np
import torch

from pipelines.backbones import FeatureExtractor, build_backbone
from pipelines.fileio import atomic_write_bytes, atomic_write_json
from pipelines.mvtec import load_category
from pipelines.orientation import GAIN_MIN, Canonicalizer, Pose, augment_views, rotation_gain, rotation_matrix
from pipelines.patchcore.config import FORMAT_VERSION, LEGACY_CONFIG, PatchCoreConfig
from pipelines.patchcore.coreset import greedy_coreset
from pipelines.patchcore.embed import PatchEmbedder
from pipelines.patchcore.images import image_list, patch_to_maps
from pipelines.patchcore.knn import NearestNeighbours
from pipelines.training import CancelFn, ProgressFn, check_cancelled, report


class NotFittedError(RuntimeError):
    """predict/save before fit."""


def _check(cancelled: CancelFn | None) -> None:
    """Raise the one :class:`pipelines.training.Cancelled` once ``cancelled()`` is True."""
    check_cancelled(cancelled, "PatchCore")


def _say(progress: ProgressFn | None, fraction: float, message: str) -> None:
    report(progress, fraction, message)


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
        return image_list(images, self.input_size)

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
