"""The generator contract: what every defect / colour generator declares and how it is called.

A generator is a class with a class attribute ``info: GeneratorInfo`` and::

    gen(image: H×W×3 uint8, mask: H×W uint8, *, seed: int, feather: int = 4, **params) -> H×W×3 uint8

``params`` are the request-level ones (``damage_type``, ``color``, ``strength`` when
``info.takes_strength``, ``donors`` — ``[(image, mask)]`` of the type's *reference* real
defects — when ``info.needs_donors``, ``goods`` — the product's defect-free train images — when
``info.needs_goods``) plus the generator's own options,
declared once as a dataclass (``info.options``) whose fields carry their type, default, range,
choices and help. That dataclass is the single source of truth: the service keeps only the
options a generator declares, the CLI's ``generate`` / ``generate-batch`` flags and the Annotate
tab's option widgets are generated from it (:func:`option_specs`).

Contract (tested for every registered generator): pixels outside ``masks.dilate(mask, feather)``
are byte-identical to the input unless ``info.full_image``; the same seed gives the same output.

Adding a generator = one module with the class (``info`` + ``__call__``) and one line in
:data:`pipelines.registry.GENERATORS` (or :func:`pipelines.registry.register` at run time).
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

MODES = ("damage", "color")


def option(default: Any, help: str, *, min: float | None = None, max: float | None = None,
           step: float | None = None, choices: tuple | None = None, label: str | None = None,
           path: bool = False) -> Any:
    """A dataclass field of an options class, with what the CLI and the UI need to show it
    (``path``: the value names a file or folder on the machine, which the web studio confines)."""
    return field(default=default, metadata={"help": help, "min": min, "max": max, "step": step,
                                            "choices": choices, "label": label, "path": path})


@dataclass(frozen=True)
class OptionSpec:
    """One option, read from an options dataclass field."""
    name: str
    type: type                  # int | float | str | bool
    default: Any
    help: str
    min: float | None = None
    max: float | None = None
    step: float | None = None
    choices: tuple | None = None
    label: str | None = None
    path: bool = False          # names a file or folder (a model, weights): confined by the web studio

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def parse(self, value: Any) -> Any:
        """A widget / CLI value → the option's type (``None`` and ``""`` mean: the default)."""
        if value is None or value == "":
            return None
        if self.type is bool:
            return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")
        v = self.type(value)
        if self.choices is not None and v not in self.choices:
            raise ValueError(f"{self.name} must be one of {', '.join(map(str, self.choices))}, not {v!r}")
        if self.min is not None and v < self.min or self.max is not None and v > self.max:
            raise ValueError(f"{self.name} must be in [{self.min}, {self.max}], got {v}")
        return v


_BASE_TYPES = (bool, int, float, str)


def _base_type(tp: Any) -> type:
    """``int``, ``float | None``, ``Optional[str]`` … → the non-None base type."""
    if isinstance(tp, type) and tp in _BASE_TYPES:
        return tp
    for arg in typing.get_args(tp):
        if arg in _BASE_TYPES:
            return arg
    raise TypeError(f"option type {tp!r} is not one of bool, int, float, str (optionally | None)")


def option_specs(options_cls: type | None) -> list[OptionSpec]:
    """The :class:`OptionSpec` s of an options dataclass (in field order)."""
    if options_cls is None:
        return []
    hints = typing.get_type_hints(options_cls)
    out = []
    for f in dataclasses.fields(options_cls):
        md = f.metadata
        out.append(OptionSpec(f.name, _base_type(hints[f.name]), f.default, md.get("help", ""),
                              md.get("min"), md.get("max"), md.get("step"), md.get("choices"),
                              md.get("label"), bool(md.get("path", False))))
    return out


def option_defaults(options_cls: type | None) -> dict[str, Any]:
    return {s.name: s.default for s in option_specs(options_cls)}


@dataclass(frozen=True)
class NoOptions:
    """A generator without options of its own."""


@dataclass(frozen=True)
class GeneratorInfo:
    """What a generator is, declared once on its class (``info = GeneratorInfo(...)``)."""
    name: str
    version: str
    mode: str                               # "damage" (defect of a type) | "color" (wall colour)
    description: str
    options: type = NoOptions               # dataclass of its own options (see :func:`option`)
    full_image: bool = False                # a new image: the outside-mask contract is off
    needs_donors: bool = False              # copies real *reference* defects of the type
    learns_from_donors: bool = False        # reads the reference defects when there are some
                                            # (``donors``), works without (e.g. stroke profiles)
    needs_goods: bool = False               # reads the product's defect-free images (``goods``:
                                            # [(image H×W×3 uint8)], train/good) to register to
    takes_strength: bool = True             # uses the request's strength (0..1)
    default_strength: float = 1.0
    needs_model: tuple[str, ...] = ()       # model kinds of pipelines.models it loads
    learns_from_data: bool = False          # a model trained here (its training data = ancestors)

    @property
    def takes_donors(self) -> bool:
        """Whether the caller passes ``donors`` (required or optional)."""
        return self.needs_donors or self.learns_from_donors

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"generator {self.name}: mode must be one of {MODES}, not {self.mode!r}")

    @property
    def option_specs(self) -> list[OptionSpec]:
        return option_specs(self.options)

    def call_params(self, damage_type: str, donors: list | None = None, goods: list | None = None,
                    strength: float = 0.8, feather: int = 4) -> dict[str, Any]:
        """The request-level parameters of a damage call as the contract defines them (module
        docstring): feather and damage type; strength when it takes one; ``donors`` (``[(image,
        mask)]`` of the type's *reference* defects) when it takes donors and some are given;
        ``goods`` when it needs them."""
        p: dict[str, Any] = {"feather": int(feather), "damage_type": damage_type}
        if self.takes_strength:
            p["strength"] = float(strength)
        if self.takes_donors and donors:
            p["donors"] = list(donors)
        if self.needs_goods:
            p["goods"] = list(goods or [])
        return p

    @property
    def defaults(self) -> dict[str, Any]:
        return option_defaults(self.options)


@runtime_checkable
class Generator(Protocol):
    """The calling convention every registered generator follows."""
    info: ClassVar[GeneratorInfo]

    def __call__(self, image: np.ndarray, mask: np.ndarray, *, seed: int, feather: int = 4,
                 **params: Any) -> np.ndarray: ...


class GeneratorBase:
    """Optional mix-in: ``name`` / ``version`` / ``mode`` / ``description`` / ``full_image`` read
    from ``info``, a default :meth:`available` (its model kinds are present) and
    :meth:`ancestors` (none: it learned from no real image)."""
    info: ClassVar[GeneratorInfo]

    name = property(lambda self: self.info.name)
    version = property(lambda self: self.info.version)
    mode = property(lambda self: self.info.mode)
    description = property(lambda self: self.info.description)
    full_image = property(lambda self: self.info.full_image)

    @classmethod
    def available(cls) -> tuple[bool, str]:
        """``(ok, message)`` without loading weights; the message says what to put where."""
        if not cls.info.needs_model:
            return True, "ready (no weights needed)"
        from pipelines import models     # light: no torch / diffusers import
        for kind in cls.info.needs_model:
            ok, msg = models.available(kind)
            if not ok:
                return False, msg
        return True, "ready"

    def ancestors(self, params: dict) -> list[str]:
        """Pixel hashes of the real images this generator learned from for ``params``."""
        return []


__all__ = ["option", "OptionSpec", "option_specs", "option_defaults", "NoOptions", "GeneratorInfo",
           "Generator", "GeneratorBase", "MODES"]
