"""ControlNet conditioned on the segmentation mask, in two modes.

- ``controlnet`` (:class:`ControlNetInpaintGenerator`): StableDiffusionControlNetInpaintPipeline on
  the SD 1.5 inpainting model; the defect mask (white on black, RGB) is the control image. Same
  contract as ``sd-inpaint``: pixels outside ``dilate(mask, feather)`` equal the input exactly.
- ``controlnet-full`` (:class:`ControlNetFullGenerator`): StableDiffusionControlNetPipeline on the
  SD 1.5 *base* model (4-channel U-Net), a whole new image from noise with the mask as the
  defect's layout (defects at new places). **The outside-mask contract does not apply** — the
  output is a new image of the input's size (``full_image = True`` in its registry spec); the
  input image is only used for its size and for the optional structure condition.

Optional second condition (``structure=``): a controlnet-aux style preprocessor on the input that
holds the product's geometry, with its own ControlNet (MultiControlNet):

- ``canny`` — OpenCV Canny edges (what controlnet-aux's CannyDetector does); works offline;
  ControlNet ``controlnet-canny`` (``$DEFECT_STUDIO_CONTROLNET_CANNY``).
- ``hed`` / ``depth`` — controlnet-aux's HEDdetector / MidasDetector; they need the annotator
  weights (HF repo ``lllyasviel/Annotators``: ``ControlNetHED.pth`` /
  ``dpt_hybrid-midas-501f0c75.pt``) in a local folder named by ``$DEFECT_STUDIO_ANNOTATORS``,
  plus ControlNet ``controlnet-hed`` / ``controlnet-depth``; without them a
  :class:`~pipelines.models.ModelMissingError` says what to download.

Extra params (besides those of :mod:`pipelines.inpaint`): ``controlnet`` (folder / hub id of the
segmentation ControlNet, default ``$DEFECT_STUDIO_CONTROLNET``; a ControlNet fine-tuned here by
:mod:`pipelines.controlnet_train` is given as its checkpoint folder or its run folder, which means
the run's latest checkpoint, and its samples inherit the run's ``training_data.json`` ancestors), ``control_scale`` (1.0),
``structure`` (None | canny | hed | depth), ``structure_controlnet`` (folder / hub id),
``structure_scale`` (0.5), ``canny_low``/``canny_high`` (100/200).
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import cv2
import numpy as np

from dataclasses import dataclass

from pipelines import models
from pipelines.generator import GeneratorInfo, option
from pipelines.inpaint import DiffusionGenerator, DiffusionOptions
from pipelines.models import ModelMissingError

ANNOTATORS_ENV = "DEFECT_STUDIO_ANNOTATORS"
STRUCTURES = ("canny", "hed", "depth")
_ANNOTATOR_FILES = {"hed": "ControlNetHED.pth", "depth": "dpt_hybrid-midas-501f0c75.pt"}

_annotators: dict[str, object] = {}
_annotator_lock = threading.Lock()


def mask_control_image(mask: np.ndarray) -> np.ndarray:
    """Binary mask ``H×W`` → control image ``H×W×3 uint8`` (defect white, background black)."""
    return np.repeat(np.where(mask > 0, 255, 0).astype(np.uint8)[..., None], 3, axis=2)


def controlnet_folder(source):
    """``source`` unchanged, except a training run folder (``OUT`` with ``checkpoints/``, written by
    :mod:`pipelines.controlnet_train`), which becomes its latest complete checkpoint."""
    if source in (None, "") or not isinstance(source, (str, os.PathLike)):
        return source
    p = Path(source).expanduser()
    if (p / "checkpoints").is_dir() and not (p / "config.json").is_file():
        from pipelines.training import latest_checkpoint
        ck = latest_checkpoint(p)
        if ck is None:
            raise ModelMissingError(f"{p} is a ControlNet training run without a complete checkpoint yet")
        return str(ck)
    return source


def structure_image(kind: str, image: np.ndarray, low: int = 100, high: int = 200) -> np.ndarray:
    """The second condition for ``image`` (``H×W×3 uint8``) → ``H×W×3 uint8``."""
    if kind == "canny":
        edges = cv2.Canny(image, int(low), int(high))
        return np.repeat(edges[..., None], 3, axis=2)
    if kind not in _ANNOTATOR_FILES:
        raise ValueError(f"unknown structure condition {kind!r}; known: {', '.join(STRUCTURES)}")
    det = _annotator(kind)
    h, w = image.shape[:2]
    out = np.asarray(det(image, detect_resolution=max(h, w), image_resolution=max(h, w),
                         output_type="np"))
    if out.ndim == 2:
        out = np.repeat(out[..., None], 3, axis=2)
    return cv2.resize(out.astype(np.uint8), (w, h), interpolation=cv2.INTER_LINEAR)


def annotator_status(kind: str) -> tuple[bool, str]:
    """Whether the controlnet-aux annotator ``kind`` can run offline, with the instruction."""
    if kind == "canny":
        return True, "canny edges (OpenCV) need no weights"
    folder = os.environ.get(ANNOTATORS_ENV)
    fname = _ANNOTATOR_FILES[kind]
    if folder and (Path(folder) / fname).is_file():
        return True, f"{kind} annotator: {Path(folder) / fname}"
    return False, (f"The {kind} preprocessor needs weights: download {fname} from the Hugging Face "
                   f"repo 'lllyasviel/Annotators' into a folder and set {ANNOTATORS_ENV} to it "
                   f"(now: {folder or 'unset'}); or use structure='canny', which needs none")


def _annotator(kind: str):
    ok, msg = annotator_status(kind)
    if not ok:
        raise ModelMissingError(msg)
    with _annotator_lock:
        if kind not in _annotators:
            folder = os.environ[ANNOTATORS_ENV]
            try:
                if kind == "hed":
                    from controlnet_aux import HEDdetector
                    _annotators[kind] = HEDdetector.from_pretrained(folder)
                else:
                    from controlnet_aux import MidasDetector
                    _annotators[kind] = MidasDetector.from_pretrained(folder)
            except Exception as exc:   # noqa: BLE001
                raise models.ModelError(f"Cannot load the {kind} annotator from {folder}: "
                                        f"{type(exc).__name__}: {exc}") from exc
        return _annotators[kind]


class _ControlNetMixin:
    """Builds the ControlNet pipeline on top of a cached SD pipeline and the control images."""

    _pipe_class = ""
    _cache: dict[tuple, object]

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self._cache, self._lock = {}, threading.Lock()     # ControlNet pipelines built so far

    def _controlnets(self, base, opts):
        cross = int(base.unet.config.cross_attention_dim)
        nets = [models.load_controlnet("controlnet-seg", controlnet_folder(opts.get("controlnet")),
                                       str(base.device), base.unet.dtype, cross)]
        structure = opts.get("structure")
        if structure:
            if structure not in STRUCTURES:
                raise ValueError(f"unknown structure condition {structure!r}; known: "
                                 f"{', '.join(STRUCTURES)}")
            if structure != "canny":
                ok, msg = annotator_status(structure)
                if not ok:
                    raise ModelMissingError(msg)
            nets.append(models.load_controlnet(f"controlnet-{structure}",
                                               controlnet_folder(opts.get("structure_controlnet")), str(base.device),
                                               base.unet.dtype, cross))
        return nets

    def ancestors(self, params: dict) -> list[str]:
        """The LoRA / embedding ancestors plus those of a ControlNet trained here (its run's
        ``training_data.json``)."""
        from pipelines.training_data import read_manifest
        out = set(super().ancestors(params))
        for key in ("controlnet", "structure_controlnet"):
            src = controlnet_folder(params.get(key)) if params.get(key) else None
            if src and Path(src).expanduser().is_dir():
                out.update(read_manifest(src).get("ancestors", []))
        return sorted(out)

    def _wrap(self, base, opts):
        import diffusers
        nets = self._controlnets(base, opts)
        key = (id(base), tuple(id(n) for n in nets))
        with self._lock:
            pipe = self._cache.get(key)
            if pipe is None:
                cls = getattr(diffusers, self._pipe_class)
                pipe = cls.from_pipe(base, controlnet=nets[0] if len(nets) == 1 else nets)
                pipe.set_progress_bar_config(disable=True)
                pipe._defect_studio_lock = models.pipe_lock(base)   # shares the base's modules
                pipe._defect_studio_folder = models.pipe_folder(base)
                self._cache = {key: pipe}          # one ControlNet combination kept per generator
        return pipe

    def _control_kwargs(self, crop_w, mask_w, opts, info) -> dict:
        from PIL import Image
        images = [Image.fromarray(mask_control_image(mask_w))]
        scales = [float(opts["control_scale"])]
        if opts.get("structure"):
            images.append(Image.fromarray(structure_image(
                opts["structure"], crop_w, opts["canny_low"], opts["canny_high"])))
            scales.append(float(opts["structure_scale"]))
            info["structure"] = opts["structure"]
        key = "control_image" if self._pipe_class.endswith("InpaintPipeline") else "image"
        if len(images) == 1:
            return {key: images[0], "controlnet_conditioning_scale": scales[0]}
        return {key: images, "controlnet_conditioning_scale": scales}


@dataclass(frozen=True)
class ControlNetOptions(DiffusionOptions):
    controlnet: str | None = option(None, "ControlNet-seg folder or hub id, or a run of `train --kind controlnet` "
                                              "(its latest checkpoint; default $DEFECT_STUDIO_CONTROLNET)", path=True)
    control_scale: float = option(1.0, "ControlNet conditioning scale", min=0.0, max=2.0, step=0.05)
    structure: str | None = option(None, "a second condition that holds the product's geometry",
                                   choices=("canny", "hed", "depth"))
    structure_controlnet: str | None = option(None, "ControlNet folder for the structure condition",
                                                path=True)
    structure_scale: float = option(0.5, "structure conditioning scale", min=0.0, max=2.0, step=0.05)
    canny_low: int = option(100, "Canny low threshold", min=0, max=255, step=1)
    canny_high: int = option(200, "Canny high threshold", min=0, max=255, step=1)


@dataclass(frozen=True)
class ControlNetFullOptions(ControlNetOptions):
    only_masked: bool = option(False, "work on a padded box around the mask (off: the whole frame)")


class ControlNetInpaintGenerator(_ControlNetMixin, DiffusionGenerator):
    """Inpainting + ControlNet on the segmentation mask (pixels outside the mask kept)."""

    info = GeneratorInfo("controlnet", "1", "damage",
                         "SD 1.5 inpainting + ControlNet conditioned on the segmentation mask",
                         options=ControlNetOptions, default_strength=0.8,
                         needs_model=("sd-inpaint", "controlnet-seg"))
    _pipe_class = "StableDiffusionControlNetInpaintPipeline"

    def _pipeline(self, opts):
        return self._wrap(models.load_inpaint(self._model(opts), self.device, self.dtype), opts)

    def _extra(self, pipe, crop_w, mask_w, opts, info):
        return self._control_kwargs(crop_w, mask_w, opts, info)


class ControlNetFullGenerator(_ControlNetMixin, DiffusionGenerator):
    """A whole new image from noise with the mask as the defect's layout (``full_image``)."""

    info = GeneratorInfo("controlnet-full", "1", "damage",
                         "SD 1.5 + ControlNet: a new full image from noise with the mask as structure "
                         "(the input is not kept outside the mask)",
                         options=ControlNetFullOptions, default_strength=0.8, full_image=True,
                         needs_model=("sd-base", "controlnet-seg"))
    _pipe_class = "StableDiffusionControlNetPipeline"

    def _pipeline(self, opts):
        return self._wrap(models.load_base(self._model(opts), self.device, self.dtype), opts)

    def _extra(self, pipe, crop_w, mask_w, opts, info):
        info["notes"].append("full-image mode: a new image; pixels outside the mask are not kept")
        return self._control_kwargs(crop_w, mask_w, opts, info)
