"""Name → factory registries for generators (and, later, backbones).

Plain dicts, filled explicitly — no ``eval``, no ``__subclasses__`` magic. Factories import their
modules lazily, so listing names never loads a model. An unknown name raises ``KeyError`` whose
message lists the known names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class GeneratorSpec:
    name: str
    mode: str            # "damage" (makes a defect of a damage type) or "color" (wall colour)
    description: str
    factory: Callable[[], Any]
    needs_donors: bool = False   # cut-paste needs real defects of the chosen type
    needs_model: tuple[str, ...] = ()   # model kinds (pipelines.models.KINDS) it needs
    full_image: bool = False     # True: makes a new image; the outside-mask contract is off


def _classical(cls_name: str) -> Callable[[], Any]:
    def factory():
        from pipelines import classical
        return getattr(classical, cls_name)()
    return factory


def _lazy(module: str, cls_name: str) -> Callable[[], Any]:
    def factory():
        import importlib
        return getattr(importlib.import_module(f"pipelines.{module}"), cls_name)()
    return factory


GENERATORS: dict[str, GeneratorSpec] = {
    "perlin": GeneratorSpec(
        "perlin", "damage", "Procedural Perlin-noise defect inside the mask (DRAEM-style); needs no data",
        _classical("PerlinDefectGenerator")),
    "cutpaste": GeneratorSpec(
        "cutpaste", "damage", "Cut-paste of a real defect of this type with Poisson blending",
        _classical("CutPasteGenerator"), needs_donors=True),
    "wall-lab": GeneratorSpec(
        "wall-lab", "color", "LAB recolour to a target colour, shading kept (wall colour mode)",
        _classical("LabRecolorGenerator")),
    "sd-inpaint": GeneratorSpec(
        "sd-inpaint", "damage", "Stable Diffusion 1.5 inpainting conditioned on a damage-type embedding",
        _lazy("inpaint", "SDInpaintGenerator"), needs_model=("sd-inpaint",)),
    "controlnet": GeneratorSpec(
        "controlnet", "damage", "SD 1.5 inpainting + ControlNet conditioned on the segmentation mask",
        _lazy("controlnet", "ControlNetInpaintGenerator"),
        needs_model=("sd-inpaint", "controlnet-seg")),
    "controlnet-full": GeneratorSpec(
        "controlnet-full", "damage",
        "SD 1.5 + ControlNet: a new full image from noise with the mask as the defect's layout",
        _lazy("controlnet", "ControlNetFullGenerator"),
        needs_model=("sd-base", "controlnet-seg"), full_image=True),
    "pixel-inpaint": GeneratorSpec(
        "pixel-inpaint", "damage",
        "Pixel-space inpainting diffusion trained on this product's own defects (offline; needs a "
        "model trained with `python -m studio train --kind pixel-inpaint`)",
        _lazy("pixel_inpaint", "PixelInpaintGenerator")),
    "wall": GeneratorSpec(
        "wall", "color", "Zero-prompt wall colour: SD inpainting (+ IP-Adapter reference) + LAB correction",
        _lazy("wall", "WallColorGenerator"), needs_model=("sd-inpaint",)),
}


def generator_names(mode: str | None = None) -> list[str]:
    return [n for n, s in GENERATORS.items() if mode is None or s.mode == mode]


def get_spec(name: str) -> GeneratorSpec:
    try:
        return GENERATORS[name]
    except KeyError:
        raise KeyError(f"unknown generator {name!r}; known: {', '.join(GENERATORS)}") from None


def backend_status(name: str) -> tuple[bool, str]:
    """``(ok, message)``: whether backend ``name`` can run here (its model files are present).
    Loads no weights; the message is the exact download instruction when something is missing."""
    spec = get_spec(name)
    if name == "pixel-inpaint":      # trained here, not downloaded: its own availability check
        from pipelines.pixel_inpaint import available
        return available(None)
    if not spec.needs_model:
        return True, "ready (no weights needed)"
    from pipelines import models     # light: no torch / diffusers import
    for kind in spec.needs_model:
        ok, msg = models.available(kind)
        if not ok:
            return False, msg
    return True, "ready"


_instances: dict[str, Any] = {}


def get_generator(name: str) -> Any:
    """The generator instance for ``name``, built on first use (models load lazily)."""
    spec = get_spec(name)
    if name not in _instances:
        _instances[name] = spec.factory()
    return _instances[name]
