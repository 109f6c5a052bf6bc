"""The training toolkit shared by every trainer (:mod:`pipelines.lora`, :mod:`pipelines.pixel_inpaint`,
:mod:`pipelines.ddpm`): configs, training samples, the budget / stop rule, atomic checkpoints,
optimizer state, the loss history, Accelerate, the result, and the one cancel exception.

Contents, in the order of this file:

* ``ProgressFn`` / ``CancelFn`` — the callback types every long job takes (``progress(fraction,
  message)``, ``cancelled() -> bool``); :func:`report` and :func:`check_cancelled` call them.
* :class:`Cancelled` — the one "the user cancelled" exception;
  :class:`ConfigError`, :class:`TrainDataError`, :class:`CheckpointError`.
* :class:`ConfigMixin` — ``from_dict`` / ``from_yaml`` (unknown keys refused, keyword overrides),
  ``to_dict``; :func:`check` and :meth:`ConfigMixin.check_run` for ``validate()``.
* :class:`Sample`, :func:`samples_from_category`, :func:`check_samples` — defects to train on.
* :func:`stop_reason` / :class:`Budget` — ``max_steps`` in total, ``minutes`` of wall clock, cancel.
* :class:`Checkpoints` / :func:`latest_checkpoint` — the output folder layout below.
* :func:`save_optimizer` / :func:`load_optimizer` — AdamW state as flat safetensors.
* :func:`append_history` / :func:`read_history`, :func:`make_accelerator`, :class:`TrainResult`,
  :class:`CheckpointedTrainer` (the loop glue of the LoRA and pixel-inpaint trainers).

Output folder layout of a checkpointed trainer::

    OUT/latest                       text: the name of the newest complete checkpoint (written last)
    OUT/checkpoints/step-0000200/    one complete checkpoint (renamed into place when complete)
        trainer_state.json           kind, step, losses, optimizer param_groups, config (+ trainer keys)
        optimizer.safetensors        flattened optimizer state ("<param id>.<key>" → tensor)
        …                            the trainer's weights
    OUT/history.jsonl                one {"step", "loss", "time"} line per log (live loss curve)
    OUT/validation/step-0000200.png  validation grids

Never imports gradio or ``studio``; torch, safetensors, accelerate and cv2 are imported where used,
so importing this module (e.g. for ``ProgressFn``) stays cheap.
"""
from __future__ import annotations

import json
import math
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from pipelines.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text

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


# ================================================================================================
# Samples
# ================================================================================================
class Sample(NamedTuple):
    image: np.ndarray        # H x W x 3 uint8
    mask: np.ndarray         # H x W uint8 {0, 255}
    damage_type: str


def _binary(m: np.ndarray) -> np.ndarray:
    return np.where(m, 255, 0).astype(np.uint8)


class TrainingData(NamedTuple):
    """What a trainer fits, as built: the samples, their names, the pixel hashes of their images
    (:func:`pipelines.guard.guard`, computed from exactly these arrays) and how many of each kind."""
    samples: list            # Sample
    names: list              # str: "test/<type>/NNN.png" (reference) or "<extra>/synthetic/<type>/…"
    fit_hashes: list         # str: pixel hash of each sample's image, in order
    counts: dict             # {"reference": n, "synthetic": m, "evaluation": 0}


def training_data(root: str | Path, damage_types: Sequence[str] | None = None,
                  extra: str | Path | None = None, size: int | None = None,
                  purpose: str = "training data") -> TrainingData:
    """Reference real defects (data role ``reference``, see :mod:`pipelines.roles`) of an
    MVTec-layout category (``test/<type>`` + ``ground_truth/<type>``), plus optionally the accepted
    synthetic ones of an export ``extra`` (only its ``synthetic/<type>`` +
    ``synthetic_ground_truth/<type>``; its ``test/`` is never read). Every image, as built (after
    resizing to ``size``), goes through :func:`pipelines.guard.guard` against the category's scored
    images (evaluation defects + ``test/good``): a copy — exact, re-encoded, resized or locally
    edited — raises :class:`pipelines.roles.LeakageError` naming it. ``damage_types=None`` takes
    every type found. A chosen type with no sample → TrainDataError."""
    from pipelines.guard import ScoredSet, guard
    from pipelines.mvtec import load_category, load_image, load_mask
    from pipelines.roles import category_roles
    cat = load_category(root, require_masks=True, require_test=False)
    roles = category_roles(cat)
    named: list[tuple[str, Sample]] = []
    for s in roles.reference:    # evaluation defects are never trained on
        if damage_types is None or s.label in damage_types:
            named.append((str(Path(s.path).relative_to(roles.root)),
                          Sample(load_image(s.path, size), _binary(load_mask(s, size)), s.label)))
    n_ref = len(named)
    if extra is not None:
        named += _extra_samples(Path(extra), damage_types, size)
    samples = [s for _, s in named]
    check_samples(samples, damage_types, where=str(root))
    hashes = guard(((n, s.image) for n, s in named), ScoredSet.from_roles(roles), purpose)
    return TrainingData(samples, [n for n, _ in named], hashes,
                        {"reference": n_ref, "synthetic": len(named) - n_ref, "evaluation": 0})


def samples_from_category(root: str | Path, damage_types: Sequence[str] | None = None,
                          extra: str | Path | None = None, size: int | None = None) -> list[Sample]:
    """The samples of :func:`training_data` (reference defects + ``extra``'s accepted synthetic
    ones, guarded against the category's scored images)."""
    return training_data(root, damage_types, extra, size).samples


def load_training_samples(cfg) -> list[Sample]:
    """``run_from_config``'s data: the samples of ``cfg.data`` (+ ``cfg.extra_data``) for
    ``cfg.damage_types`` at ``cfg.image_size``, after writing their provenance
    (``OUT/training_data.json``, :mod:`pipelines.training_data`: the hashes of exactly the arrays
    returned, ``fit_hashes``, and the counts; a leak of evaluation data raises)."""
    if not cfg.data:
        raise ConfigError("data (an MVTec-layout category folder) is required")
    from pipelines.training_data import training_manifest, write_manifest
    kind = {"LoraTrainConfig": "LoRA", "WallTrainConfig": "wall LoRA", "ControlNetTrainConfig": "ControlNet",
            "PixelInpaintConfig": "pixel-inpaint"}.get(type(cfg).__name__, type(cfg).__name__)
    data = training_data(cfg.data, cfg.damage_types, cfg.extra_data, cfg.image_size,
                         purpose=f"{kind} training data")          # the guard: names each copied file
    manifest = training_manifest(cfg.data, cfg.damage_types, cfg.extra_data)   # + provenance descent
    manifest.update(fit_hashes=data.fit_hashes, fit_files=data.names, counts=data.counts)
    write_manifest(cfg.output_dir, manifest)
    return data.samples


def good_images(root: str | Path, size: int | None, purpose: str = "good training images"
                ) -> tuple[list[np.ndarray], list[str]]:
    """The category's ``train/good`` images at ``size`` (for trainers that also learn defect-free
    texture), guarded like the defects (a copy of a scored image — ``test/good`` or an evaluation
    defect — placed in ``train/good`` is refused). Returns ``(images, their pixel hashes)``."""
    from pipelines.guard import ScoredSet, guard
    from pipelines.mvtec import load_category, load_image
    from pipelines.roles import category_roles
    cat = load_category(root, require_masks=True, require_test=False)
    images = [load_image(p, size) for p in cat.train]
    names = [str(Path(p).relative_to(cat.root)) for p in cat.train]
    return images, guard(zip(names, images), ScoredSet.from_roles(category_roles(cat)), purpose)


def _extra_samples(extra: Path, damage_types: Sequence[str] | None, size: int | None
                   ) -> list[tuple[str, Sample]]:
    """Accepted synthetic samples of an export: ``synthetic/<type>/*`` (every supported image
    extension) with ``synthetic_ground_truth/<type>/<stem>_mask.png``. Nothing else of the folder
    is read (its ``test/`` holds the product's real images, evaluation ones included)."""
    from pipelines.mvtec import LayoutError, export_samples
    if not extra.is_dir():
        raise TrainDataError(f"the extra sample folder {extra} does not exist")
    try:
        found = export_samples(extra, size, damage_types, missing="; the real reference defects of --data "
                                                                  "are already trained on")
    except LayoutError as exc:
        raise TrainDataError(str(exc)) from None
    return [(name, Sample(img, _binary(m), t)) for name, t, img, m in found]


def check_samples(samples: Sequence, damage_types: Sequence[str] | None, where: str = "the dataset"
                  ) -> list[str]:
    """The damage types to train (sorted, unique); a chosen type with no samples, an empty mask
    or a size mismatch → :class:`TrainDataError`."""
    have: dict[str, int] = {}
    for i, s in enumerate(samples):
        img, m, t = s
        if np.asarray(img).shape[:2] != np.asarray(m).shape[:2]:
            raise TrainDataError(f"sample {i} ({t}): image {np.asarray(img).shape[:2]} and mask "
                                 f"{np.asarray(m).shape[:2]} differ in size")
        if not np.asarray(m).any():
            raise TrainDataError(f"sample {i} ({t}) has an empty mask")
        have[t] = have.get(t, 0) + 1
    if damage_types is None:
        if not have:
            raise TrainDataError(f"{where} holds no defect samples with masks to train on")
        return sorted(have)
    missing = [t for t in damage_types if not have.get(t)]
    if missing:
        found = ", ".join(f"{k} ({v})" for k, v in sorted(have.items())) or "none"
        raise TrainDataError(f"no defect samples of type {', '.join(map(repr, missing))} in {where}; "
                             f"types with samples: {found}")
    return sorted(dict.fromkeys(damage_types))


# ================================================================================================
# Budget: when a training loop stops, how far it is
# ================================================================================================
def stop_reason(step: int, max_steps: int | None, deadline: float | None,
                cancelled: CancelFn | None) -> str | None:
    """Why a training loop stops before its next step: "steps" (``max_steps`` reached),
    "time" (``time.monotonic()`` past ``deadline``), "cancelled", or None to go on."""
    if max_steps is not None and step >= max_steps:
        return "steps"
    if deadline is not None and time.monotonic() >= deadline:
        return "time"
    if cancelled is not None and cancelled():
        return "cancelled"
    return None


class Budget:
    """The budget of one run, started now: ``max_steps`` counts all steps of the model (resumed
    ones included), ``minutes`` the wall clock of this run."""

    def __init__(self, max_steps: int | None, minutes: float | None, start_step: int = 0):
        self.max_steps, self.start_step = max_steps, int(start_step)
        self.t_start = time.monotonic()
        self.deadline = None if minutes is None else self.t_start + 60.0 * minutes

    def elapsed(self) -> float:
        return time.monotonic() - self.t_start

    def stop_reason(self, step: int, cancelled: CancelFn | None) -> str | None:
        return stop_reason(step, self.max_steps, self.deadline, cancelled)

    def fraction(self, step: int) -> float:
        """How much of the budget is used: the larger of the step and the time share (0 if none)."""
        fr = []
        if self.max_steps:
            fr.append((step - self.start_step) / max(1, self.max_steps - self.start_step))
        if self.deadline:
            fr.append(self.elapsed() / (self.deadline - self.t_start))
        return max(fr) if fr else 0.0


# ================================================================================================
# Atomic checkpoints
# ================================================================================================
class Checkpoints:
    """``OUT/checkpoints/step-NNNNNNN`` folders, each written in a hidden temp folder and renamed
    into place when complete; ``OUT/latest`` (the pointer) is replaced last. At most ``limit``
    checkpoints are kept (0 = keep all); the latest is never pruned."""

    def __init__(self, out_dir: str | Path, limit: int = 3):
        self.out = Path(out_dir)
        self.dir = self.out / CHECKPOINTS
        self.limit = int(limit)

    @staticmethod
    def name(step: int) -> str:
        return f"step-{int(step):07d}"

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None (a dangling pointer falls back to the newest
        complete folder)."""
        ptr = self.out / LATEST
        if ptr.is_file():
            cand = self.dir / ptr.read_text().strip()
            if cand.is_dir() and (cand / STATE_FILE).is_file():
                return cand
        done = self.all()
        return done[-1] if done else None

    def all(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.iterdir()
                      if p.is_dir() and p.name.startswith("step-") and (p / STATE_FILE).is_file())

    def clean_partial(self) -> None:
        if self.dir.is_dir():
            for p in self.dir.iterdir():
                if p.name.startswith(".tmp-"):
                    shutil.rmtree(p, ignore_errors=True)

    def save(self, step: int, write: Callable[[Path], None]) -> Path:
        """Run ``write(tmp_folder)`` then publish it as ``step-NNNNNNN``. Any failure (disk full,
        cancel, crash) removes the temp folder, keeps the previous latest and raises
        :class:`CheckpointError`."""
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".tmp-{self.name(step)}-{uuid.uuid4().hex[:8]}"
        final = self.dir / self.name(step)
        try:
            tmp.mkdir()
            write(tmp)
            if final.exists():                       # re-saving the same step (e.g. after resume)
                old = self.dir / f".tmp-old-{uuid.uuid4().hex[:8]}"
                final.rename(old)
                shutil.rmtree(old, ignore_errors=True)
            tmp.rename(final)
            atomic_write_text(self.out / LATEST, final.name)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            prev = self.latest()
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            raise CheckpointError(
                f"could not write checkpoint {final.name} in {self.dir} ({type(exc).__name__}: {exc})"
                f" — {'the previous checkpoint ' + prev.name + ' stays the latest' if prev else 'no checkpoint was kept'}"
                "; free disk space and resume") from exc
        self._prune(final)
        return final

    def _prune(self, keep: Path) -> None:
        if self.limit <= 0:
            return
        done = [p for p in self.all() if p != keep]
        for p in done[: max(0, len(done) - (self.limit - 1))]:
            shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder under a training output folder (None if none); a
    checkpoint folder itself is returned as is. For LoRA runs pass it as both ``lora=`` and
    ``embedding=`` of the sd-inpaint backend."""
    out = Path(out_dir)
    if (out / STATE_FILE).is_file():
        return out
    return Checkpoints(out).latest()


def write_trainer_state(folder: Path, kind: str, step: int, losses: list, optimizer: dict,
                        **extra) -> None:
    """``trainer_state.json``: ``{"kind", "step", "losses", "optimizer", **extra}``."""
    atomic_write_json(folder / STATE_FILE, {"kind": kind, "step": step, "losses": losses,
                                            "optimizer": optimizer, **extra}, default=list)


def read_trainer_state(folder: Path) -> dict:
    return json.loads((folder / STATE_FILE).read_text())


def load_tensors(path: Path) -> dict:
    """A safetensors file → ``{name: tensor}``; missing or corrupt → :class:`CheckpointError`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is corrupt or not a safetensors file ({exc})") from None


def save_validation_grid(out_dir: Path, step: int, grid: np.ndarray) -> Path:
    """``OUT/validation/step-NNNNNNN.png`` from an RGB uint8 grid, written atomically."""
    import cv2
    path = Path(out_dir) / VALIDATION_DIR / f"{Checkpoints.name(step)}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, png = cv2.imencode(".png", cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"could not encode the validation grid {path}")
    return atomic_write_bytes(path, png.tobytes())


# ================================================================================================
# Optimizer state: flat safetensors ("<param id>.<key>") + param_groups kept as JSON by the caller
# ================================================================================================
def save_optimizer(opt, folder: Path) -> dict:
    """Flatten an optimizer's state (the optimizer or its ``state_dict()``) into
    ``folder/optimizer.safetensors``; returns ``{"param_groups": [...]}`` (JSON) for the caller."""
    import torch
    from safetensors.torch import save
    sd = opt if isinstance(opt, dict) else opt.state_dict()
    flat = {f"{pid}.{k}": torch.as_tensor(v).detach().cpu().contiguous()
            for pid, st in sd["state"].items() for k, v in st.items()}
    atomic_write_bytes(Path(folder) / OPTIMIZER_FILE, save(flat))
    return {"param_groups": sd["param_groups"]}


def read_optimizer_state(folder: Path, param_groups: list) -> dict | None:
    """The ``state_dict`` saved by :func:`save_optimizer` (None when the folder has no optimizer
    file); ``param_groups`` as it returned them."""
    path = Path(folder) / OPTIMIZER_FILE
    if not path.is_file():
        return None
    state: dict = {}
    for key, v in load_tensors(path).items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    return {"state": state, "param_groups": param_groups}


def apply_optimizer_state(opt, saved: dict, where: Path | str) -> None:
    """Load a :func:`read_optimizer_state` dict into ``opt`` (its parameters in the same order);
    other parameter groups → :class:`CheckpointError`."""
    groups = [dict(g) for g in saved["param_groups"]]
    cur = opt.state_dict()["param_groups"]
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in cur]:
        raise CheckpointError(f"{where}: the optimizer state does not match these parameters "
                              "(another model or rank) — start a new output folder")
    for g_saved, g_cur in zip(groups, cur):
        g_saved["params"] = g_cur["params"]
    opt.load_state_dict({"state": saved["state"], "param_groups": groups})


def load_optimizer(opt, folder: Path, groups: dict) -> None:
    """Resume ``opt`` from ``folder`` (``groups``: what :func:`save_optimizer` returned)."""
    saved = read_optimizer_state(folder, groups["param_groups"])
    if saved is not None:
        apply_optimizer_state(opt, saved, folder)


# ================================================================================================
# Loss history, Accelerate, the result
# ================================================================================================
def append_history(out_dir: Path, step: int, loss: float, **extra) -> None:
    with open(Path(out_dir) / HISTORY_FILE, "a") as fh:
        fh.write(json.dumps({"step": int(step), "loss": float(loss), "time": time.time(), **extra}) + "\n")


def read_history(out_dir: str | Path) -> list[tuple[int, float]]:
    """``[(step, loss)]`` from ``OUT/history.jsonl`` (for a live curve from another process)."""
    path = Path(out_dir) / HISTORY_FILE
    out = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                d = json.loads(line)
                out.append((int(d["step"]), float(d["loss"])))
            except (ValueError, KeyError):
                continue      # a line being written
    return out


def make_accelerator(mixed_precision: str = "no", gradient_accumulation_steps: int = 1, seed: int = 0):
    """An ``accelerate.Accelerator`` (CPU when there is no CUDA). Under ``accelerate launch`` the
    launcher's distributed settings apply; the same code runs on one CPU or several GPUs."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import set_seed
    kw = dict(mixed_precision=mixed_precision, gradient_accumulation_steps=int(gradient_accumulation_steps),
              cpu=not torch.cuda.is_available())
    try:
        acc = Accelerator(**kw)
    except ValueError:                 # an earlier Accelerator in this process used other settings
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        acc = Accelerator(**kw)
    set_seed(int(seed))
    return acc


@dataclass
class TrainResult:
    step: int                 # total optimisation steps of the model (resumed ones included)
    steps_this_run: int
    seconds: float
    loss: float               # mean loss of the last log window (nan if none)
    stopped: str              # 'steps' | 'time' | 'cancelled'
    checkpoint: str | None = None                  # the latest checkpoint folder (if the trainer writes them)
    losses: list = field(default_factory=list)     # [(step, loss)]
    validation: str | None = None                  # newest validation grid PNG


# ================================================================================================
# The loop glue of a checkpointed trainer
# ================================================================================================
class CheckpointedTrainer:
    """What the LoRA and pixel-inpaint trainers share around their own model and step:

    ``self.step`` (total steps), ``self.losses`` (live ``[(step, loss)]``, also appended to
    ``OUT/history.jsonl``), ``self.ckpt`` (:class:`Checkpoints` of ``cfg.output_dir``), the run's
    :class:`Budget`, and the :class:`TrainResult`. A subclass's ``run`` reads::

        acc = self._open()
        ...build, resume (self._restore)...
        self._begin(progress, cancelled)
        stopped = self._loop(acc, model, micro_step, save, validate)   # steps, checkpoints, grids
        return self._result(stopped)
    """

    def __init__(self, cfg):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.ckpt = Checkpoints(self.out, cfg.checkpoint_limit)
        self.losses: list[tuple[int, float]] = []
        self.step = 0
        self.last_validation: str | None = None

    def _open(self):
        """Create ``OUT``, remove the half-written checkpoints of a crash; the (seeded) Accelerator."""
        c = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        self.ckpt.clean_partial()
        return make_accelerator(c.mixed_precision, c.gradient_accumulation_steps, c.seed)

    def _restore(self, folder: Path, opt, state: dict) -> None:
        """The optimizer, step count and loss history of the checkpoint ``folder``."""
        load_optimizer(opt, folder, state["optimizer"])
        self.step = int(state["step"])
        self.losses = [tuple(x) for x in state.get("losses", [])]

    def _begin(self, progress: ProgressFn | None, cancelled: CancelFn | None) -> None:
        """Start the clock of this run (after resuming)."""
        self._progress, self._cancelled = progress, cancelled
        self._window: list[float] = []
        self.last_loss = float("nan")
        self.budget = Budget(self.cfg.max_steps, self.cfg.minutes, self.step)

    def _stop_reason(self) -> str | None:
        return self.budget.stop_reason(self.step, self._cancelled)

    def _end_step(self, losses: Sequence[float], is_main: bool) -> None:
        """Count the step; every ``log_every`` steps the mean loss of the window is logged."""
        self._window.extend(losses)
        self.step += 1
        if self.step % self.cfg.log_every == 0:
            self.last_loss = float(np.mean(self._window))
            self._window = []
            self.losses.append((self.step, self.last_loss))
            if is_main:
                append_history(self.out, self.step, self.last_loss)

    def _report_step(self) -> None:
        # before the first logged window the loss is the running mean of this window (never "nan")
        loss = self.last_loss if math.isfinite(self.last_loss) or not self._window else float(np.mean(self._window))
        report(self._progress, self.budget.fraction(self.step),
               f"step {self.step} loss {loss:.4f}" if math.isfinite(loss) else f"step {self.step}")

    def _save(self, acc, write: Callable[[Path], None]) -> None:
        """Checkpoint ``self.step`` (the main process writes, every process waits)."""
        if acc.is_main_process:
            self.ckpt.save(self.step, write)
        acc.wait_for_everyone()

    def _loop(self, acc, model, micro_step: Callable[[], float], save: Callable[[], None],
              validate: Callable[[Any], Any] | None = None, before_step: Callable[[], None] | None = None,
              after_step: Callable[[], None] | None = None) -> str:
        """The loop every trainer runs once built, resumed and started (:meth:`_begin`): per step
        ``before_step()`` (a stage change), ``micro_step()`` → loss for each gradient-accumulation
        step, ``after_step()`` (a learning-rate schedule), (main process) ``validate(unwrapped model)`` →
        the grid's path every ``validate_every`` steps, a checkpoint every ``checkpoint_every``
        steps, and the progress line; until the budget ends or the run is
        cancelled (a cancel stops after the current step). Then a last checkpoint unless the latest
        one is of this very step. Returns the stop reason (for :meth:`_result`)."""
        c = self.cfg
        model.train()
        while not (stopped := self._stop_reason()):
            if before_step is not None:
                before_step()
            losses = [micro_step() for _ in range(c.gradient_accumulation_steps)]
            self._end_step(losses, acc.is_main_process)
            if after_step is not None:
                after_step()
            if validate is not None and c.validate_every and self.step % c.validate_every == 0 \
                    and acc.is_main_process:
                self.last_validation = str(validate(acc.unwrap_model(model)))
                model.train()
            if self.step % c.checkpoint_every == 0:
                save()                # after the grid: a checkpoint of this step keeps it
            self._report_step()
        latest = self.ckpt.latest()
        if latest is None or latest.name != Checkpoints.name(self.step):
            save()
        return stopped

    def _result(self, stopped: str) -> TrainResult:
        if self._window and not math.isfinite(self.last_loss):
            self.last_loss = float(np.mean(self._window))
        report(self._progress, 1.0, f"stopped ({stopped}) at step {self.step}")
        latest = self.ckpt.latest()
        return TrainResult(self.step, self.step - self.budget.start_step, self.budget.elapsed(), self.last_loss,
                           stopped, str(latest) if latest else None, list(self.losses), self.last_validation)
