"""Name → generator class registry.

A plain dict from names to import paths (``"module:Class"``), filled explicitly — no ``eval``, no
``__subclasses__`` magic. Everything else about a generator (mode, description, options, what it
needs) is read from its class's ``info`` (:class:`pipelines.generator.GeneratorInfo`): nothing is
written twice. Importing a generator's module never loads a model (models load on first use).
An unknown name raises ``KeyError`` whose message lists the known names.

Adding a generator: write its module (a class with ``info`` and ``__call__``), then add one line
to :data:`GENERATORS` — or call :func:`register` (plugins, tests). The service, the CLI flags and
help, the Annotate widgets and the Curation plan all read the registry (names, what "auto" picks,
availability); no other module keeps a list of backends.

A generator whose model depends on the product (pixel-inpaint) declares
``default_model(product, roots, damage_type)``, ``available(product=, roots=, any_product=)``
and ``model_types(model)`` (the damage types a model was trained for) on its class:
:func:`default_model` and :func:`backend_status` pass the product (and ``roots``, the folders of
trained runs, e.g. ``<workspace>/adapters``) through.
"""
from __future__ import annotations

import importlib
import os
import threading
from typing import Any, Sequence

from pipelines.generator import GeneratorInfo, OptionSpec

GENERATORS: dict[str, str] = {
    "perlin": "pipelines.classical:PerlinDefectGenerator",
    "cutpaste": "pipelines.classical:CutPasteGenerator",
    "defect-transfer": "pipelines.transfer:DefectTransferGenerator",
    "stroke": "pipelines.generators.stroke:StrokeGenerator",
    "warp": "pipelines.generators.warp:WarpGenerator",
    "remove": "pipelines.generators.remove:RemoveGenerator",
    "wall-lab": "pipelines.classical:LabRecolorGenerator",
    "pixel-inpaint": "pipelines.pixel_inpaint:PixelInpaintGenerator",
    "sd-inpaint": "pipelines.inpaint:SDInpaintGenerator",
    "controlnet": "pipelines.controlnet:ControlNetInpaintGenerator",
    "controlnet-full": "pipelines.controlnet:ControlNetFullGenerator",
    "wall": "pipelines.wall:WallColorGenerator",
}

# What "auto" picks, in order: the first generator of the mode whose needs are met (donors for a
# generator that copies reference defects).
AUTO: dict[str, tuple[str, ...]] = {"damage": ("cutpaste", "perlin"), "color": ("wall-lab",)}

_lock = threading.Lock()
_instances: dict[str, Any] = {}
PLUGINS_ENV = "DEFECT_STUDIO_GENERATORS"   # "name=module:Class[,name2=module:Class2]"


def register(name: str, path: str) -> None:
    """Add (or replace) a generator at run time: ``register("toy", "my_pkg.toy:ToyGenerator")``."""
    if ":" not in path:
        raise ValueError(f"generator path must look like 'module:Class', got {path!r}")
    with _lock:
        GENERATORS[name] = path
        _instances.pop(name, None)


def register_plugins(spec: str | None = None) -> list[str]:
    """Register the generators named in ``$DEFECT_STUDIO_GENERATORS`` (or ``spec``)."""
    import os
    spec = os.environ.get(PLUGINS_ENV, "") if spec is None else spec
    names = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        name, sep, path = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"{PLUGINS_ENV}: expected name=module:Class, got {item!r}")
        register(name.strip(), path.strip())
        names.append(name.strip())
    return names


def unregister(name: str) -> None:
    with _lock:
        GENERATORS.pop(name, None)
        _instances.pop(name, None)


def _path(name: str) -> str:
    try:
        return GENERATORS[name]
    except KeyError:
        raise KeyError(f"unknown generator {name!r}; known: {', '.join(GENERATORS)}") from None


def generator_class(name: str) -> type:
    module, _, cls = _path(name).partition(":")
    return getattr(importlib.import_module(module), cls)


def get_info(name: str) -> GeneratorInfo:
    """The generator's declared :class:`GeneratorInfo` (imports its module, loads no model)."""
    info = generator_class(name).info
    if info.name != name:
        raise ValueError(f"generator registered as {name!r} declares the name {info.name!r}")
    return info




def generator_names(mode: str | None = None) -> list[str]:
    return [n for n in GENERATORS if mode is None or get_info(n).mode == mode]


def picks_model(name: str) -> bool:
    """Whether generator ``name`` picks its model per product when a request names none: its class
    declares ``default_model(product, roots, damage_type)`` and ``available(product, roots)``
    (pixel-inpaint: the workspace's trained model, else the one shipped for the product)."""
    return callable(getattr(generator_class(name), "default_model", None))


def default_model(name: str, product: str | None, roots: Sequence[str | os.PathLike] = (),
                  damage_type: str | None = None) -> str | None:
    """The model generator ``name`` runs with for ``product`` when the request names none (None:
    the generator has no per-product default, or none is found). ``roots``: folders of trained runs."""
    if not picks_model(name):
        return None
    return generator_class(name).default_model(product, tuple(roots), damage_type)


def model_types(name: str, model: str | os.PathLike) -> list[str] | None:
    """The damage types generator ``name``'s model ``model`` was trained for, when its class
    declares ``model_types(model)`` (pixel-inpaint); None: the generator does not say (any type)."""
    fn = getattr(generator_class(name), "model_types", None)
    return None if fn is None else list(fn(model))


def backend_status(name: str, product: str | None = None,
                   roots: Sequence[str | os.PathLike] = ()) -> tuple[bool, str]:
    """``(ok, message)``: whether generator ``name`` can run here (its model files are present; for
    a generator that picks its model per product, for ``product`` — without one, for any product).
    Loads no weights; the message is the exact instruction when something is missing."""
    cls = generator_class(name)
    if picks_model(name):
        return cls.available(product=product, roots=tuple(roots), any_product=not product)
    return cls.available()


def offline_names(mode: str = "damage", product: str | None = None,
                  roots: Sequence[str | os.PathLike] = ()) -> list[str]:
    """Generators of ``mode`` that can run now, on this machine (no missing weights), in the
    registry's order (for ``product`` when given)."""
    return [n for n in generator_names(mode) if backend_status(n, product, roots)[0]]


def auto_choice(mode: str = "damage", have_donors: bool = False) -> str | None:
    """What "auto" runs for ``mode``: the first of :data:`AUTO` whose needs are met (None: none)."""
    for name in AUTO.get(mode, ()):
        if name in GENERATORS and (not get_info(name).needs_donors or have_donors):
            return name
    return None


def auto_description(mode: str = "damage") -> str:
    """One line saying what "auto" picks, read from :data:`AUTO` (for help texts and the UI)."""
    names = [n for n in AUTO.get(mode, ()) if n in GENERATORS]
    parts = [f"{n} when reference defects of the type exist" if get_info(n).needs_donors else n
             for n in names]
    return "auto: " + (", else ".join(parts) if parts else "(nothing registered)")


def plan_defaults(product: str | None = None, roots: Sequence[str | os.PathLike] = ()) -> list[str]:
    """The backends a generation plan preselects: :data:`AUTO`'s damage generators that run here
    (the others that run here — a shipped or trained pixel-inpaint model included — are offered
    beside them: :func:`offline_names`)."""
    ok = offline_names("damage", product, roots)
    return [n for n in AUTO.get("damage", ()) if n in ok]


def get_generator(name: str) -> Any:
    """The generator instance for ``name``, built once (thread-safe; models load lazily)."""
    with _lock:
        inst = _instances.get(name)
        if inst is None:
            inst = _instances[name] = generator_class(name)()
        return inst


def all_option_specs(names: list[str] | None = None) -> dict[str, tuple[OptionSpec, list[str]]]:
    """Every option of the given (default: all) generators → (its spec, the generators taking it).
    One option name has one meaning: two generators declaring it with different types is an error."""
    out: dict[str, tuple[OptionSpec, list[str]]] = {}
    for n in names or list(GENERATORS):
        for spec in get_info(n).option_specs:
            if spec.name in out:
                first, users = out[spec.name]
                if first.type is not spec.type:
                    raise TypeError(f"option {spec.name!r} is {first.type.__name__} in {users[0]} but "
                                    f"{spec.type.__name__} in {n}")
                users.append(n)
            else:
                out[spec.name] = (spec, [n])
    return out


register_plugins()

__all__ = ["register_plugins", "GENERATORS", "AUTO", "register", "unregister", "generator_class", "get_info",
           "generator_names", "backend_status", "offline_names", "get_generator", "all_option_specs",
           "picks_model", "default_model", "model_types", "auto_choice", "auto_description", "plan_defaults"]
