"""Pixel-space inpainting diffusion model — the offline default diffusion backend (``pixel-inpaint``).

A diffusers ``UNet2DModel`` trained from scratch on the product's own images (no SD weights):

    input   cat[x_t (noisy RGB), x0·(1 − m) (masked RGB), m (mask)]     [B x 7 x r x r], in [-1, 1]
    class   damage type id (``num_class_embeds`` = types + 1; the last id, "normal", is for random
            masks on good images: the model also learns to fill a hole with the product itself)
    output  v (``prediction_type='v_prediction'``, default) or ε                [B x 3 x r x r]

Training examples are square crops around a defect (side = max(``min_crop``, bbox side ·
``context``), jittered), after :func:`pipelines.augment.augment_pair`, resized to ``resolution``
(64 px by default); with probability ``good_fraction`` a good image with a random mask of the
type's style (:func:`pipelines.classical.style_for`) labelled "normal". The loss is weighted
towards the mask (``1 + mask_weight·m``).

Two-stage schedule (opt-in: ``pretrain_steps`` > 0 or ``pretrain_minutes`` set; see
:class:`PixelInpaintConfig`):

    1. "product" — learn the product: every example is a ``train/good`` image with a mask shaped
       like one of the damage types (:func:`pipelines.shapes.shape_model_for` fitted on that
       type's training masks, kept on :func:`pipelines.shapes.estimate_foreground` of the good
       images; ``pretrain_masks='random'``: the type's classic style), labelled "normal". No
       defect image is drawn in this stage. The U-Net learns to fill a hole with the product's own
       texture and geometry; the damage-type embeddings stay untouched. (Why "normal" and not each
       type's id: a type id trained to mean "fill with the product" would have to be unlearnt from
       two or three defects in stage 2, and guidance contrasts the type with "normal".)
    2. "damage" — learn the damage: the reference defects with their type's class id (mask-aware
       augmentation as above), plus ``good_fraction`` of shaped-mask good examples labelled
       "normal" so the product is not forgotten.

The stage, the step where stage 2 began, the stage-1 seconds and the examples drawn per stage and
source are kept in ``trainer_state.json`` and ``config.json`` (``"schedule"``), so a resumed run
continues in the right stage; a checkpoint is written at the boundary.

Generation (:class:`PixelInpaintGenerator`, the classical calling convention
``gen(image, mask, *, seed, feather=4, damage_type=..., strength=1.0, **params)``):

    1. the same crop box around ``dilate(mask, feather)``, resized to ``resolution``;
    2. DDIM (``steps``, 25) from noise (``strength`` < 1: from the noised crop) with the known
       pixels outside the mask re-injected at every step at the current noise level (RePaint);
       optional guidance ``g``: ``pred = pred_normal + g·(pred_type − pred_normal)``;
    3. resized back and pasted with ``feather(mask, feather)`` → every pixel outside
       ``dilate(mask, feather)`` is byte-identical to the input.

Checkpoints: the layout of :mod:`pipelines.training` (``OUT/latest`` → ``OUT/checkpoints/step-N/``
holding ``model.safetensors``, ``config.json``, ``optimizer.safetensors``, ``trainer_state.json``);
the training glue (config loading, budget, checkpoints, optimizer state, history) is that toolkit's.
The generator's ``model=`` is the output folder, one checkpoint folder or an exported model
folder (``model.safetensors`` + ``config.json``, :func:`export_model`).

Which model, when a request names none (:func:`find_model`, used by the service for a product):
``$DEFECT_STUDIO_PIXEL_INPAINT`` if set; else the newest model trained for the product in one of
the given run roots (the studio passes ``<workspace>/adapters``, where the Training tab writes;
a run belongs to the product whose name its ``training_data.json`` data folder carries); else the
model shipped with the repository in ``assets/models/<product>/pixel-inpaint/``
(``scripts/train_demo_models.py``). A model that was not trained for the requested damage type is
passed over for the next one.

Modules: this one is the generator and the "which model" lookup and imports no torch (the registry
imports it to read ``info``); the training config, the U-Net, the trainer and the sampler live in
:mod:`pipelines.pixel_inpaint_model` and are reachable here by name, imported on first use.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from pipelines import masks as mk
from pipelines.generators.base import DEFAULT_FEATHER, check_image
from pipelines.generator import GeneratorBase, GeneratorInfo, option
from pipelines.models import ModelError
from pipelines.training import latest_checkpoint

if TYPE_CHECKING:
    from pipelines.pixel_inpaint_model import PixelInpaintModel


from pipelines.pixel_inpaint_files import (  # noqa: F401 (the model's files, re-exported: P.MODEL_FILE …)
    ENV, SHIPPED_DIR, SHIPPED_NAME, FORMAT, MODEL_FILE, CONFIG_FILE, NORMAL, PRODUCT, DAMAGE, PRETRAIN_MASKS, TRAIN_HINT, crop_box, resolve_model, read_meta, check_model, available, shipped_model, trained_models, model_candidates, find_model, product_status)


def load_model(model: str | os.PathLike | None = None) -> PixelInpaintModel:
    """Loaded through the model manager, keyed by checkpoint folder and file mtime (a newer
    checkpoint reloads); one pixel-inpaint model stays loaded at a time, so retraining and
    switching models never piles them up in memory."""
    from pipelines.model_manager import MANAGER
    from pipelines.pixel_inpaint_model import PixelInpaintModel
    folder = resolve_model(model)
    key = ("pixel-inpaint", str(folder.resolve()), (folder / MODEL_FILE).stat().st_mtime_ns)
    return MANAGER.get(key, lambda: PixelInpaintModel.load(folder), group="pixel-inpaint", group_limit=1)


@dataclass(frozen=True)
class PixelInpaintOptions:
    model: str | None = option(None, "model folder, output folder or checkpoint (pixel-inpaint default: "
                                     "$DEFECT_STUDIO_PIXEL_INPAINT, else the product's newest trained "
                                     "model, else the one shipped in assets/models/<product>/pixel-inpaint)", path=True)
    steps: int = option(25, "sampling steps", min=1, max=200, step=1)
    guidance: float = option(1.0, "guidance on the damage-type embedding (1 = none)", min=1.0, max=10.0, step=0.5)


class PixelInpaintGenerator(GeneratorBase):
    """Registry backend ``pixel-inpaint`` (mode 'damage'); the classical calling convention.
    It fills the mask from pure noise (strength 1) unless ``strength`` is passed explicitly."""

    info = GeneratorInfo(
        "pixel-inpaint", "1", "damage",
        "Pixel-space inpainting diffusion trained on this product's own reference defects (offline; "
        "the demo products ship with one, other products need `python -m studio train --kind pixel-inpaint`)",
        options=PixelInpaintOptions, takes_strength=False, default_strength=1.0, learns_from_data=True)

    def __init__(self, model: str | None = None):
        self.model = model

    @property
    def defaults(self) -> dict[str, Any]:
        return {"strength": self.info.default_strength, **self.info.defaults}

    @classmethod
    def available(cls, product: str | None = None, roots: Sequence[str | os.PathLike] = (),
                  any_product: bool = False) -> tuple[bool, str]:
        """Whether a model is found for ``product`` (:func:`product_status`; loads no weights).
        Without a product: whether a call that names no model runs (``$DEFECT_STUDIO_PIXEL_INPAINT``),
        or with ``any_product`` (what a backend list shows) whether some product has a model."""
        if product or any_product:
            return product_status(product, roots)
        return available(None)

    @classmethod
    def default_model(cls, product: str | None, roots: Sequence[str | os.PathLike] = (),
                      damage_type: str | None = None) -> str | None:
        """The model a request for ``product`` that names none runs with (:func:`find_model`)."""
        found = find_model(product, roots, damage_type)
        return None if found is None else str(found)

    @classmethod
    def model_types(cls, model: str | os.PathLike) -> list[str]:
        """The damage types ``model`` (a folder, as ``model=``) was trained for: its ``config.json``
        (no weights are read; a missing or broken folder raises :class:`ModelError` with the fix)."""
        return [str(t) for t in check_model(model)[1].get("damage_types", [])]

    def ancestors(self, params: dict) -> list[str]:
        """The reference defects its training run used (``training_data.json``)."""
        from pipelines.training_data import read_manifest
        model = params.get("model") or self.model or os.environ.get(ENV)
        return list(read_manifest(model).get("ancestors", [])) if model else []

    def __call__(self, image, mask, *, seed: int, feather: int = DEFAULT_FEATHER, **params) -> np.ndarray:
        image = check_image(image)
        m = mk.validate_mask(mask, image.shape)
        unknown = sorted(set(params) - set(self.defaults) - {"damage_type"})
        if unknown:
            raise TypeError(f"{self.name} got unknown parameter(s) {', '.join(unknown)}; accepted: "
                            f"{', '.join(sorted({'damage_type', *self.defaults}))}")
        opts = {**self.defaults, **{k: v for k, v in params.items() if v is not None}}
        if opts.get("damage_type") is None:
            raise ValueError("pixel-inpaint needs a damage type")
        steps, strength = int(opts["steps"]), float(opts["strength"])
        if steps < 1:
            raise ValueError(f"steps must be ≥ 1, got {steps}")
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        model = load_model(opts.get("model") or self.model)
        return model.inpaint(image, m, opts["damage_type"], int(seed), steps, strength,
                             float(opts["guidance"]), feather)


# -- the model, its training and sampling: pipelines.pixel_inpaint_model (torch), loaded on first use
_MODEL_NAMES = ("PRESETS", "PixelInpaintConfig", "PixelInpaintTrainer", "PixelInpaintModel", "build_unet",
                "make_scheduler", "model_input", "train_pixel_inpaint", "run_from_config", "export_model",
                "check_safetensors_file", "TrainResult", "Checkpoints", "CheckpointError", "Cancelled")


def __getattr__(name: str) -> Any:
    """``pipelines.pixel_inpaint.PixelInpaintConfig`` etc.: the names of
    :mod:`pipelines.pixel_inpaint_model`, imported (with torch) only when first asked for."""
    if name in _MODEL_NAMES:
        from pipelines import pixel_inpaint_model
        return getattr(pixel_inpaint_model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
