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


def _classical(cls_name: str) -> Callable[[], Any]:
    def factory():
        from pipelines import classical
        return getattr(classical, cls_name)()
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
}


def generator_names(mode: str | None = None) -> list[str]:
    return [n for n, s in GENERATORS.items() if mode is None or s.mode == mode]


def get_spec(name: str) -> GeneratorSpec:
    try:
        return GENERATORS[name]
    except KeyError:
        raise KeyError(f"unknown generator {name!r}; known: {', '.join(GENERATORS)}") from None


_instances: dict[str, Any] = {}


def get_generator(name: str) -> Any:
    """The generator instance for ``name``, built on first use (models load lazily)."""
    spec = get_spec(name)
    if name not in _instances:
        _instances[name] = spec.factory()
    return _instances[name]
