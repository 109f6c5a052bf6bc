"""The training toolkit's base: the callback types every long job takes, the one cancel exception
and the training errors, and the configs (:class:`ConfigMixin`, :class:`RunConfig` — the run fields
every checkpointed trainer's config shares). Cheap to import (numpy-free, no torch)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, ClassVar

ProgressFn = Callable[[float, str], None]     # progress(fraction in [0, 1], message)
CancelFn = Callable[[], bool]                 # polled; True = stop as soon as it is safe

LATEST = "latest"
CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
HISTORY_FILE = "history.jsonl"
VALIDATION_DIR = "validation"
# ================================================================================================
# Callbacks and errors
# ================================================================================================
class Cancelled(RuntimeError):
    """The user cancelled a long job (raised where stopping cleanly with a result is impossible,
    e.g. half-way through an evaluation; trainers stop instead and report ``stopped='cancelled'``)."""


class ConfigError(ValueError):
    """A training configuration is invalid (message names the key and what is allowed)."""


class TrainDataError(ValueError):
    """The training data cannot be used (no samples of a chosen type, empty masks, …)."""


class CheckpointError(RuntimeError, ValueError):
    """A checkpoint could not be written or read (missing, corrupt, another model); a failed write
    keeps the previous one the latest. Both a RuntimeError (what the ``train`` CLI reports as a
    one-line error) and a ValueError (bad input, as the DDPM commands and tab report it)."""


def report(progress: ProgressFn | None, fraction: float, message: str) -> None:
    """``progress(fraction clamped to [0, 1], message)`` when there is a callback."""
    if progress is not None:
        progress(float(min(1.0, max(0.0, fraction))), message)


def check_cancelled(cancelled: CancelFn | None, what: str = "training") -> None:
    """Raise :class:`Cancelled` ("<what> cancelled") when ``cancelled()`` says so."""
    if cancelled is not None and cancelled():
        raise Cancelled(f"{what} cancelled")


# ================================================================================================
# Configs: dataclasses validated from dicts / YAML with unknown keys refused
# ================================================================================================
def check(cond: bool, msg: str) -> None:
    """``validate()``'s one-liner: ``ConfigError(msg)`` unless ``cond``."""
    if not cond:
        raise ConfigError(msg)


def augment_config(value):
    """An :class:`pipelines.augment.AugmentConfig` from itself or a dict (bad keys → ConfigError)."""
    from pipelines.augment import AugmentConfig
    if isinstance(value, AugmentConfig):
        return value
    try:
        return AugmentConfig.from_dict(value)
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc)) from exc


class ConfigMixin:
    """``from_dict`` / ``from_yaml`` / ``to_dict`` for a config dataclass; unknown keys raise
    :class:`ConfigError` listing the known ones; ``validate()`` runs in ``__post_init__``."""

    @classmethod
    def known_keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, d: dict | None, **overrides):
        """``d`` updated with the ``overrides`` that are not None (CLI flags over a file)."""
        d = {**dict(d or {}), **{k: v for k, v in overrides.items() if v is not None}}
        unknown = sorted(set(d) - set(cls.known_keys()))
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} key(s): {', '.join(unknown)}; known keys: "
                              f"{', '.join(cls.known_keys())}")
        try:
            return cls(**d)
        except TypeError as exc:
            raise ConfigError(f"{cls.__name__}: {exc}") from exc

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides):
        import yaml
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read the config {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
        return cls.from_dict(data, **overrides)

    def to_dict(self) -> dict:
        d = asdict(self)  # type: ignore[call-overload]
        return json.loads(json.dumps(d, default=list))

    def check_run(self) -> None:
        """The keys every checkpointed trainer's config has: ``output_dir``, ``batch_size``,
        ``gradient_accumulation_steps``, ``mixed_precision``, the budget (``max_steps`` /
        ``minutes``), ``checkpoint_every`` / ``checkpoint_limit``."""
        c: Any = self
        check(bool(c.output_dir), "output_dir is required (where checkpoints are written)")
        check(c.batch_size >= 1, f"batch_size must be ≥ 1, got {c.batch_size}")
        check(c.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be ≥ 1")
        check(c.mixed_precision in ("no", "fp16", "bf16"),
              f"mixed_precision must be 'no', 'fp16' or 'bf16', got {c.mixed_precision!r}")
        check(c.max_steps is not None or c.minutes is not None,
              "set max_steps or minutes (or both): the run needs a budget")
        check(c.max_steps is None or c.max_steps >= 1, f"max_steps must be ≥ 1, got {c.max_steps}")
        check(c.minutes is None or c.minutes > 0, f"minutes must be > 0, got {c.minutes}")
        check(c.checkpoint_every >= 1, f"checkpoint_every must be ≥ 1, got {c.checkpoint_every}")
        check(c.checkpoint_limit >= 0, f"checkpoint_limit must be ≥ 0, got {c.checkpoint_limit}")


def _default_augment():
    from pipelines.augment import AugmentConfig
    return AugmentConfig()


@dataclass
class RunConfig(ConfigMixin):
    """The run fields every checkpointed trainer's config shares (LoRA, wall colour, ControlNet,
    pixel-inpaint): where it writes, what data, the budget, checkpoints, validation, logging,
    augmentation, resume and seed. A trainer's config subclasses it, adds its own fields and
    re-declares the defaults it wants otherwise (a re-declared field keeps its place here).
    ``__post_init__`` turns ``augment`` into an :class:`pipelines.augment.AugmentConfig` and runs
    ``validate()`` (here: :meth:`ConfigMixin.check_run`; subclasses extend it)."""
    what: ClassVar[str] = ""               # names the data in guard messages ("LoRA" → "LoRA training data")

    output_dir: str = ""                   # checkpoints go here (required)
    data: str | None = None                # the training data folder (for run_from_config / the CLI)
    damage_types: list | None = None       # None: every type with samples
    extra_data: str | None = None          # accepted synthetic defects (synthetic/<type> layout)
    image_size: int | None = None          # resize loaded images to this square size (None: as is)
    resolution: int = 512                  # training crops / model input (px)
    learning_rate: float = 1e-4
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"            # 'no' | 'fp16' | 'bf16'
    max_steps: int | None = 1000           # stop after this many steps in total (resumed ones included)
    minutes: float | None = None           # wall-clock budget of this run
    mask_weight: float = 4.0               # loss weight 1 + mask_weight · m
    checkpoint_every: int = 100
    checkpoint_limit: int = 3
    validate_every: int = 100              # 0: no validation grids
    validation_steps: int = 20
    log_every: int = 10
    augment: Any = field(default_factory=_default_augment)
    resume: bool = True
    seed: int = 0

    def __post_init__(self):
        self.augment = augment_config(self.augment)
        self.validate()

    def validate(self) -> None:
        self.check_run()
