"""Catalog of products and their damage types.

MVTec AD's own category and defect names are used where they exist, so a user's MVTec AD
folder and the studio speak the same language. ``good`` is always a damage type: it has no
mask and generation is bypassed (the source image is the sample).
Products imported from a folder that are not listed here get their damage types from the
folder names (see ``Catalog.with_store_labels``).
"""
from __future__ import annotations

from dataclasses import dataclass

GOOD = "good"


@dataclass(frozen=True)
class Product:
    name: str
    damage_types: tuple[str, ...]
    description: str = ""

    @property
    def choices(self) -> tuple[str, ...]:
        """Damage types offered in the UI: ``good`` first."""
        return (GOOD, *[d for d in self.damage_types if d != GOOD])


_MVTEC_AD: dict[str, tuple[str, ...]] = {
    "bottle": ("broken_large", "broken_small", "contamination"),
    "cable": ("bent_wire", "cable_swap", "combined", "cut_inner_insulation", "cut_outer_insulation",
              "missing_cable", "missing_wire", "poke_insulation"),
    "capsule": ("crack", "faulty_imprint", "poke", "scratch", "squeeze"),
    "carpet": ("color", "cut", "hole", "metal_contamination", "thread"),
    "grid": ("bent", "broken", "glue", "metal_contamination", "thread"),
    "hazelnut": ("crack", "cut", "hole", "print"),
    "leather": ("color", "cut", "fold", "glue", "poke"),
    "metal_nut": ("bent", "color", "flip", "scratch"),
    "pill": ("color", "combined", "contamination", "crack", "faulty_imprint", "pill_type", "scratch"),
    "screw": ("manipulated_front", "scratch_head", "scratch_neck", "thread_side", "thread_top"),
    "tile": ("crack", "glue_strip", "gray_stroke", "oil", "rough"),
    "toothbrush": ("defective",),
    "transistor": ("bent_lead", "cut_lead", "damaged_case", "misplaced"),
    "wood": ("color", "combined", "hole", "liquid", "scratch"),
    "zipper": ("broken_teeth", "combined", "fabric_border", "fabric_interior", "rough", "split_teeth",
               "squeezed_teeth"),
}

_BUILTIN: dict[str, Product] = {
    name: Product(name, types, "MVTec AD category") for name, types in _MVTEC_AD.items()
}
_BUILTIN["brushed_metal"] = Product(
    "brushed_metal", ("scratch", "crack", "stain"), "Demo: flat brushed-metal surface")
_BUILTIN["bottle"] = Product(
    "bottle", _MVTEC_AD["bottle"], "MVTec AD category; demo: glass bottle seen from above")
_BUILTIN["wall"] = Product("wall", (), "Wall repainting: use a colour instead of a damage type")


class UnknownDamageType(ValueError):
    pass


class Catalog:
    """Name-keyed products. Immutable; ``with_labels`` returns an extended copy."""

    def __init__(self, products: dict[str, Product] | None = None):
        self._products = dict(_BUILTIN if products is None else products)

    def names(self) -> list[str]:
        return sorted(self._products)

    def get(self, name: str) -> Product:
        if name not in self._products:
            return Product(name, (), "imported")
        return self._products[name]

    def damage_types(self, product: str) -> tuple[str, ...]:
        return self.get(product).choices

    def check_damage(self, product: str, damage_type: str) -> str:
        """Return ``damage_type`` or raise UnknownDamageType listing the known ones."""
        known = self.damage_types(product)
        if damage_type not in known:
            raise UnknownDamageType(
                f"Unknown damage type {damage_type!r} for product {product!r}. "
                f"Known: {', '.join(known) or '(none: use a wall colour)'}")
        return damage_type

    def all_damage_types(self) -> tuple[str, ...]:
        return tuple(sorted({GOOD, *(d for p in self._products.values() for d in p.damage_types)}))

    def check_any_damage(self, damage_type: str) -> str:
        """For requests with no product: the name must be known to some product."""
        known = self.all_damage_types()
        if damage_type not in known:
            raise UnknownDamageType(
                f"Unknown damage type {damage_type!r}. Known: {', '.join(known)}")
        return damage_type

    def with_labels(self, labels_by_product: dict[str, list[str]]) -> "Catalog":
        """Extend products with labels found in the dataset (imported folders)."""
        products = dict(self._products)
        for name, labels in labels_by_product.items():
            base = products.get(name, Product(name, (), "imported"))
            extra = [lab for lab in labels if lab != GOOD and lab not in base.damage_types]
            if extra:
                base = Product(name, (*base.damage_types, *sorted(extra)), base.description)
            products[name] = base
        return Catalog(products)
