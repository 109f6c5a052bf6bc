"""LoRA + damage-type embedding training for the SD 1.5 inpainting U-Net, and the training glue
shared with :mod:`pipelines.pixel_inpaint` (configs, samples, atomic checkpoints, Accelerate).

The model (SD 1.5 inpainting, 9-channel U-Net) stays frozen — VAE and U-Net weights never move.
What trains:

* peft LoRA adapters (``rank``, ``alpha``, ``target_modules`` = to_q/to_k/to_v/to_out.0) added
  with ``unet.add_adapter(LoraConfig(...))``;
* a :class:`pipelines.inpaint.DamageEmbedding` table (``nn.Embedding(n_types, tokens·D)``) whose
  rows are fed as ``encoder_hidden_states: [B x tokens x D]`` in place of CLIP text.

One step (numbered as in the code)::

    1. latents  = vae.encode(image)·sf                         [B x 4 x h x w]
       masked   = vae.encode(image · (mask < 0.5))·sf           [B x 4 x h x w]
       m        = nearest(mask → h x w)                         [B x 1 x h x w]
    2. noisy    = scheduler.add_noise(latents, ε, t)   (focus='restricted': only where m = 1)
    3. pred     = unet(cat[noisy, m, masked], t, table[type])   (9 channels, as the pipeline)
    4. loss     = mean(w · (pred − target)²), target = ε or v;  w = 1 + mask_weight·m
                  (focus='restricted': w = m) [+ color_loss_weight · LAB colour loss]

HF Accelerate wraps the loop (``Accelerator(mixed_precision, gradient_accumulation_steps,
cpu=<no CUDA>)``), so ``accelerate launch`` on several GPUs runs the same code.

Wall-colour mode (``mode='wall'``): samples are (image, wall mask, _); masks are eroded, masks of
low quality dropped, the conditioning is the unconditional (all-zero) embedding ``[B x 77 x D]``
(no table is trained), and the optional LAB colour-consistency loss pulls the predicted image's
mean LAB inside the mask towards the sample's dominant colour (:func:`prepare_wall_samples`).

Output folder layout (both trainers)::

    OUT/latest                       text: the name of the newest complete checkpoint (written last)
    OUT/checkpoints/step-0000200/    one complete checkpoint (renamed into place when complete)
        pytorch_lora_weights.safetensors     diffusers LoRA format → pipe.load_lora_weights(...)
        damage_embedding.safetensors/.json   → sd-inpaint ``embedding=<this folder>``
        adapter_state.safetensors            peft-format adapter (resume)
        optimizer.safetensors                flattened AdamW state (resume)
        trainer_state.json                   step, losses, config, rng seeds
        validation.png                       the validation grid of this step (if made)
    OUT/history.jsonl                one {"step", "loss", "time"} line per log (live loss curve)
    OUT/validation/step-0000200.png  validation grids

Never imports gradio or ``studio``.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from pipelines import masks as mk
from pipelines.augment import AugmentConfig, augment_pair

Progress = Callable[[float, str], None]
Cancelled = Callable[[], bool]

LORA_FILE = "pytorch_lora_weights.safetensors"
LATEST = "latest"
CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
HISTORY_FILE = "history.jsonl"
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class ConfigError(ValueError):
    """A training configuration is invalid (message names the key and what is allowed)."""


class TrainDataError(ValueError):
    """The training data cannot be used (no samples of a chosen type, empty masks, …)."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the previous one stays the latest."""


class TrainingCancelled(RuntimeError):
    pass


# ================================================================================================
# Configs: dataclasses validated from dicts / YAML with unknown keys refused
# ================================================================================================
class ConfigMixin:
    """``from_dict`` / ``from_yaml`` / ``to_dict`` for a config dataclass; unknown keys raise
    :class:`ConfigError` listing the known ones; ``validate()`` runs in ``__post_init__``."""

    @classmethod
    def known_keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, d: dict | None, **overrides):
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


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _augment_cfg(value) -> AugmentConfig:
    if isinstance(value, AugmentConfig):
        return value
    try:
        return AugmentConfig.from_dict(value)
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc)) from exc


# ================================================================================================
# Samples
# ================================================================================================
class Sample(NamedTuple):
    image: np.ndarray        # H x W x 3 uint8
    mask: np.ndarray         # H x W uint8 {0, 255}
    damage_type: str


def samples_from_category(root: str | Path, damage_types: Sequence[str] | None = None,
                          extra: str | Path | None = None, size: int | None = None) -> list[Sample]:
    """Reference real defects (data role ``reference``, see :mod:`pipelines.roles`) of an
    MVTec-layout category (``test/<type>`` + ``ground_truth/<type>``), plus
    optionally accepted synthetic ones from ``extra`` (``synthetic/<type>`` +
    ``synthetic_ground_truth/<type>``, as written by export, or the same test layout).
    ``damage_types=None`` takes every type found. A chosen type with no sample → TrainDataError."""
    from pipelines.mvtec import _images, load_category, load_image, load_mask
    from pipelines.roles import category_roles
    cat = load_category(root, require_masks=True, require_test=False)
    out: list[Sample] = []
    for s in category_roles(cat).reference:    # evaluation defects are never trained on
        if damage_types is None or s.label in damage_types:
            m = load_mask(s, size)
            out.append(Sample(load_image(s.path, size), np.where(m, 255, 0).astype(np.uint8), s.label))
    if extra is not None:
        extra = Path(extra)
        if not extra.is_dir():
            raise TrainDataError(f"the extra sample folder {extra} does not exist")
        for img_root, gt_root in (("synthetic", "synthetic_ground_truth"), ("test", "ground_truth")):
            if not (extra / img_root).is_dir():
                continue
            for d in sorted(p for p in (extra / img_root).iterdir() if p.is_dir()):
                if d.name == "good" or (damage_types is not None and d.name not in damage_types):
                    continue
                for img in _images(d):
                    mp = extra / gt_root / d.name / f"{img.stem}_mask.png"
                    if mp.is_file():
                        from pipelines.mvtec import TestSample
                        m = load_mask(TestSample(img, d.name, mp), size)
                        out.append(Sample(load_image(img, size), np.where(m, 255, 0).astype(np.uint8),
                                          d.name))
    check_samples(out, damage_types, where=str(root))
    return out


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
# Atomic checkpoints
# ================================================================================================
def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def stop_reason(step: int, max_steps: int | None, deadline: float | None,
                cancelled: Callable[[], bool] | None) -> str | None:
    """Why a training loop stops before its next step: "steps" (``max_steps`` reached),
    "time" (``time.monotonic()`` past ``deadline``), "cancelled", or None to go on."""
    if max_steps is not None and step >= max_steps:
        return "steps"
    if deadline is not None and time.monotonic() >= deadline:
        return "time"
    if cancelled is not None and cancelled():
        return "cancelled"
    return None


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
            _atomic_write_text(self.out / LATEST, final.name)
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
    """The newest complete checkpoint folder under a training output folder (None if none).
    For LoRA runs pass it as both ``lora=`` and ``embedding=`` of the sd-inpaint backend."""
    out = Path(out_dir)
    if (out / STATE_FILE).is_file():
        return out
    return Checkpoints(out).latest()


def save_optimizer(opt: torch.optim.Optimizer, folder: Path) -> dict:
    """Flatten an optimizer's state into ``optimizer.safetensors``; returns the param_groups (json)."""
    from safetensors.torch import save_file
    sd = opt.state_dict()
    flat = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            t = v if torch.is_tensor(v) else torch.tensor(v)
            flat[f"{pid}.{k}"] = t.detach().cpu().contiguous()
    save_file(flat, str(folder / "optimizer.safetensors"))
    return {"param_groups": sd["param_groups"]}


def load_optimizer(opt: torch.optim.Optimizer, folder: Path, groups: dict) -> None:
    from safetensors.torch import load_file
    path = folder / "optimizer.safetensors"
    if not path.is_file():
        return
    flat = load_file(str(path))
    state: dict = {}
    for key, v in flat.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    saved = groups["param_groups"]
    cur = opt.state_dict()["param_groups"]
    if [len(g["params"]) for g in saved] != [len(g["params"]) for g in cur]:
        raise CheckpointError(f"{folder}: the optimizer state does not match these parameters "
                              "(another model or rank) — start a new output folder")
    for g_saved, g_cur in zip(saved, cur):
        g_saved["params"] = g_cur["params"]
    opt.load_state_dict({"state": state, "param_groups": saved})


def append_history(out_dir: Path, step: int, loss: float, **extra) -> None:
    with open(out_dir / HISTORY_FILE, "a") as fh:
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
    checkpoint: str | None    # the latest checkpoint folder
    losses: list = field(default_factory=list)     # [(step, loss)]
    validation: str | None = None                  # newest validation grid PNG


def _say(progress: Progress | None, frac: float, msg: str) -> None:
    if progress is not None:
        progress(float(min(1.0, max(0.0, frac))), msg)


# ================================================================================================
# LoRA trainer
# ================================================================================================
@dataclass
class LoraTrainConfig(ConfigMixin):
    output_dir: str = ""                   # checkpoints go here (required)
    model: str | None = None               # SD 1.5 inpainting folder / hub id (default $DEFECT_STUDIO_SD_INPAINT)
    data: str | None = None                # MVTec-layout category (for run_from_config / the CLI)
    damage_types: list | None = None       # None: every type with samples
    extra_data: str | None = None          # accepted synthetic defects (synthetic/<type> layout)
    image_size: int | None = None          # resize loaded images to this square size (None: as is)
    mode: str = "damage"                   # 'damage' (table of types) | 'wall' (colour, empty embedding)
    resolution: int = 512                  # training crops (px), as the generator's working size
    padding: int = 32                      # context around the mask (px), as sd-inpaint only_masked
    rank: int = 4
    alpha: float | None = None             # LoRA alpha (None: = rank)
    lora_dropout: float = 0.0
    target_modules: list = field(default_factory=lambda: list(DEFAULT_TARGETS))
    embedding_tokens: int = 8
    learning_rate: float = 1e-4            # LoRA weights
    embedding_learning_rate: float = 1e-3  # damage table
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"            # 'no' | 'fp16' | 'bf16'
    max_steps: int | None = 1000
    minutes: float | None = None
    focus: str = "weighted"                # 'weighted': loss 1 + mask_weight·m | 'restricted': noise and loss only in the mask
    mask_weight: float = 4.0
    color_loss_weight: float = 0.0         # wall mode: LAB colour-consistency loss weight
    wall_color_method: str = "median"      # dominant colour: median | mean | kmeans
    wall_erode_px: float = 3.0             # erode wall masks to drop segmentation noise
    wall_min_quality: float = 0.3          # drop masks below this quality (0..1)
    checkpoint_every: int = 100
    checkpoint_limit: int = 3
    validate_every: int = 100              # 0: no validation grids
    validation_seeds: list = field(default_factory=lambda: [0, 1])
    validation_count: int = 3              # fixed masks in the grid
    validation_steps: int = 20
    validation_guidance: float = 3.0
    log_every: int = 10
    augment: Any = field(default_factory=AugmentConfig)
    resume: bool = True
    seed: int = 0

    def __post_init__(self):
        self.augment = _augment_cfg(self.augment)
        self.target_modules = list(self.target_modules)
        self.validate()

    def validate(self) -> None:
        _check(bool(self.output_dir), "output_dir is required (where checkpoints are written)")
        _check(isinstance(self.rank, int) and self.rank >= 1, f"rank must be an integer ≥ 1, got {self.rank!r}")
        _check(self.alpha is None or self.alpha > 0, f"alpha must be > 0, got {self.alpha}")
        _check(0.0 <= self.lora_dropout < 1.0, f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        _check(bool(self.target_modules), "target_modules must name at least one layer (to_q, to_k, …)")
        _check(self.mode in ("damage", "wall"), f"mode must be 'damage' or 'wall', got {self.mode!r}")
        _check(self.resolution >= 64 and self.resolution % 8 == 0,
               f"resolution must be ≥ 64 and a multiple of 8, got {self.resolution}")
        _check(self.embedding_tokens >= 1, f"embedding_tokens must be ≥ 1, got {self.embedding_tokens}")
        _check(self.learning_rate > 0 and self.embedding_learning_rate > 0, "learning rates must be > 0")
        _check(self.batch_size >= 1, f"batch_size must be ≥ 1, got {self.batch_size}")
        _check(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be ≥ 1")
        _check(self.mixed_precision in ("no", "fp16", "bf16"),
               f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}")
        _check(self.max_steps is not None or self.minutes is not None,
               "set max_steps or minutes (or both): the run needs a budget")
        _check(self.max_steps is None or self.max_steps >= 1, f"max_steps must be ≥ 1, got {self.max_steps}")
        _check(self.minutes is None or self.minutes > 0, f"minutes must be > 0, got {self.minutes}")
        _check(self.focus in ("weighted", "restricted"),
               f"focus must be 'weighted' or 'restricted', got {self.focus!r}")
        _check(self.mask_weight >= 0, f"mask_weight must be ≥ 0, got {self.mask_weight}")
        _check(self.color_loss_weight >= 0, f"color_loss_weight must be ≥ 0, got {self.color_loss_weight}")
        _check(self.wall_color_method in ("median", "mean", "kmeans"),
               f"wall_color_method must be median, mean or kmeans, got {self.wall_color_method!r}")
        _check(0.0 <= self.wall_min_quality <= 1.0, f"wall_min_quality must be in [0, 1]")
        _check(self.checkpoint_every >= 1, f"checkpoint_every must be ≥ 1, got {self.checkpoint_every}")
        _check(self.checkpoint_limit >= 0, f"checkpoint_limit must be ≥ 0, got {self.checkpoint_limit}")
        _check(self.validate_every >= 0, f"validate_every must be ≥ 0, got {self.validate_every}")
        _check(self.validation_count >= 1 and len(self.validation_seeds) >= 1,
               "validation needs at least one mask and one seed")


# ------------------------------------------------------------------------------------------------
# Wall-colour data preparation
# ------------------------------------------------------------------------------------------------
class WallSample(NamedTuple):
    image: np.ndarray        # H x W x 3 uint8
    mask: np.ndarray         # eroded wall mask, H x W uint8 {0, 255}
    color: tuple             # dominant RGB of the wall
    reference: np.ndarray    # solid reference patch (texture noise + lighting gradient), 256 x 256 x 3
    quality: float


def mask_quality(mask: np.ndarray, erode_px: float = 3.0) -> float:
    """0..1: the share of the mask surviving an erosion by ``erode_px`` × the share of its
    largest connected component (speckled, thin or fragmented segmentations score low)."""
    m = mk.to_binary(mask)
    area = int(np.count_nonzero(m))
    if area == 0:
        return 0.0
    kept = np.count_nonzero(mk.erode(m, erode_px)) / area
    n, labels, stats, _ = cv2.connectedComponentsWithStats((m > 0).astype(np.uint8), connectivity=8)
    largest = stats[1:, cv2.CC_STAT_AREA].max() / area if n > 1 else 0.0
    return float(kept * largest)


def prepare_wall_samples(samples: Sequence, method: str = "median", erode_px: float = 3.0,
                         min_quality: float = 0.3, seed: int = 0) -> list[WallSample]:
    """Wall-colour training data: per (image, wall mask, _) the dominant colour of the mask, a solid
    reference with texture noise and a lighting gradient, the mask eroded by ``erode_px``;
    masks with :func:`mask_quality` < ``min_quality`` are dropped (all dropped → TrainDataError)."""
    from pipelines.color import dominant_color, solid_reference
    out, dropped = [], []
    for i, s in enumerate(samples):
        img, m = np.asarray(s[0]), mk.to_binary(s[1])
        q = mask_quality(m, erode_px)
        er = mk.erode(m, erode_px)
        if q < min_quality or not er.any():
            dropped.append(f"{i} (quality {q:.2f})")
            continue
        rgb = dominant_color(img, er, method)
        out.append(WallSample(img, er, rgb, solid_reference(rgb, 256, seed=seed + i), q))
    if not out:
        raise TrainDataError(f"every wall mask was below the quality threshold {min_quality} "
                             f"({', '.join(dropped[:10])}); lower wall_min_quality or fix the masks")
    return out


def rgb_to_lab_torch(x: torch.Tensor) -> torch.Tensor:
    """``x: [B x 3 x H x W]`` sRGB in [0, 1] → CIE LAB (D65), differentiable."""
    x = x.clamp(0, 1)
    lin = torch.where(x > 0.04045, ((x + 0.055) / 1.055) ** 2.4, x / 12.92)
    M = torch.tensor([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
                      [0.0193339, 0.1191920, 0.9503041]], dtype=x.dtype, device=x.device)
    xyz = torch.einsum("ij,bjhw->bihw", M, lin)
    white = torch.tensor([0.95047, 1.0, 1.08883], dtype=x.dtype, device=x.device)[None, :, None, None]
    t = xyz / white
    f = torch.where(t > (6 / 29) ** 3, t.clamp_min(1e-8) ** (1 / 3), t / (3 * (6 / 29) ** 2) + 4 / 29)
    return torch.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], 1)


# ------------------------------------------------------------------------------------------------
# The trainer
# ------------------------------------------------------------------------------------------------
def load_components(model: str | None):
    """``(folder, vae, unet, noise_scheduler)`` of an SD 1.5 inpainting folder (fresh instances,
    never the generators' cached pipeline)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from pipelines import models
    folder = models.resolve("sd-inpaint", model)
    try:
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True)
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True)
        sched = DDPMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
    except Exception as exc:   # noqa: BLE001 — diffusers raises many types; one message
        raise models._wrap_load_error("the SD inpainting model", folder, exc) from exc
    if int(unet.config.in_channels) != 9:
        raise models.ModelError(f"{folder} has a U-Net with {unet.config.in_channels} input channels; "
                                "LoRA inpainting training needs a 9-channel inpainting checkpoint")
    return folder, vae, unet, sched


class LoraTrainer:
    """LoRA + damage-embedding training (see the module docstring).

    ``samples``: ``[(image H×W×3 uint8, mask H×W uint8, damage_type)]``. ``self.losses`` is the
    live ``[(step, loss)]`` history (also appended to ``OUT/history.jsonl``)."""

    def __init__(self, cfg: LoraTrainConfig, samples: Sequence):
        from pipelines.classical import _check_image
        self.cfg = cfg
        if cfg.mode == "wall":
            wall = prepare_wall_samples(samples, cfg.wall_color_method, cfg.wall_erode_px,
                                        cfg.wall_min_quality, cfg.seed)
            self.types = []
            self.samples = [Sample(_check_image(w.image), w.mask, "wall") for w in wall]
            self.colors = [w.color for w in wall]
        else:
            self.types = check_samples(samples, cfg.damage_types, where="the training samples")
            self.samples = [Sample(_check_image(s[0]), mk.to_binary(s[1]), s[2]) for s in samples
                            if s[2] in self.types]
            self.colors = [None] * len(self.samples)
        self.out = Path(cfg.output_dir)
        self.ckpt = Checkpoints(self.out, cfg.checkpoint_limit)
        self.losses: list[tuple[int, float]] = []
        self.step = 0
        self.last_validation: str | None = None
        self.embedding = None

    # -- data --------------------------------------------------------------------------------------
    def example(self, i: int, rng: np.random.Generator | None):
        """Sample ``i`` → ``(image [3 x r x r] in [-1, 1], mask [1 x r x r] {0, 1})``; augmented
        when ``rng`` is given (validation uses the un-augmented crop)."""
        from pipelines.inpaint import work_box
        s, r = self.samples[i], self.cfg.resolution
        img, m = s.image, s.mask
        if rng is not None:
            img, m = augment_pair(img, m, rng, self.cfg.augment)
        x0, y0, x1, y1 = work_box(m, 4.0, self.cfg.padding)
        crop = img[y0:y1, x0:x1]
        crop = cv2.resize(crop, (r, r), interpolation=cv2.INTER_AREA if crop.shape[0] > r else cv2.INTER_CUBIC)
        cm = cv2.resize(m[y0:y1, x0:x1], (r, r), interpolation=cv2.INTER_NEAREST)
        x = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1).float() / 127.5 - 1.0
        return x, torch.from_numpy((cm > 0).astype(np.float32))[None]

    def batch(self, rng: np.random.Generator):
        idx = rng.integers(len(self.samples), size=self.cfg.batch_size)
        ex = [self.example(int(i), rng) for i in idx]
        ids = torch.tensor([self.types.index(self.samples[i].damage_type) if self.types else 0 for i in idx])
        cols = torch.tensor([self.colors[i] or (0, 0, 0) for i in idx], dtype=torch.float32) / 255.0
        return torch.stack([e[0] for e in ex]), torch.stack([e[1] for e in ex]), ids, cols

    # -- checkpoints ---------------------------------------------------------------------------------
    def _write(self, folder: Path, unet, opt) -> None:
        from diffusers import StableDiffusionInpaintPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file
        peft_sd = {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}
        StableDiffusionInpaintPipeline.save_lora_weights(
            folder, unet_lora_layers=convert_state_dict_to_diffusers(peft_sd), safe_serialization=True)
        save_file(peft_sd, str(folder / "adapter_state.safetensors"))
        if self.embedding is not None:
            self.embedding.save(folder)
        groups = save_optimizer(opt, folder)
        if self.last_validation and Path(self.last_validation).name == f"step-{self.step:07d}.png":
            shutil.copyfile(self.last_validation, folder / "validation.png")
        (folder / STATE_FILE).write_text(json.dumps(
            {"kind": "lora", "step": self.step, "losses": self.losses, "optimizer": groups,
             "damage_types": self.types, "config": self.cfg.to_dict()}, default=list))

    def _resume(self, unet, opt) -> bool:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file
        last = self.ckpt.latest() if self.cfg.resume else None
        if last is None:
            return False
        state = json.loads((last / STATE_FILE).read_text())
        if state.get("kind") != "lora" or state.get("damage_types") != self.types:
            raise CheckpointError(f"{self.out} holds a run for {state.get('damage_types')}; this run "
                                  f"trains {self.types} — use a new output_dir or resume: false")
        try:
            set_peft_model_state_dict(unet, load_file(str(last / "adapter_state.safetensors")))
        except Exception as exc:   # noqa: BLE001
            raise CheckpointError(f"cannot resume from {last}: the adapter does not fit this model "
                                  f"(another rank or base model?) ({type(exc).__name__}: {str(exc)[:200]})") from exc
        if self.embedding is not None:
            from pipelines.inpaint import DamageEmbedding
            with torch.no_grad():
                self.embedding.table.weight.copy_(DamageEmbedding.load(last).table.weight)
        load_optimizer(opt, last, state["optimizer"])
        self.step = int(state["step"])
        self.losses = [tuple(x) for x in state.get("losses", [])]
        return True

    # -- loop ------------------------------------------------------------------------------------
    def run(self, progress: Progress | None = None, cancelled: Cancelled | None = None) -> TrainResult:
        from peft import LoraConfig
        from pipelines.inpaint import DamageEmbedding
        c = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        self.ckpt.clean_partial()
        acc = make_accelerator(c.mixed_precision, c.gradient_accumulation_steps, c.seed)
        _say(progress, 0.0, "loading the SD inpainting model")
        folder, vae, unet, sched = load_components(c.model)
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(acc.mixed_precision, torch.float32)
        vae.requires_grad_(False)
        unet.requires_grad_(False)
        torch.manual_seed(c.seed)
        unet.add_adapter(LoraConfig(r=c.rank, lora_alpha=c.alpha or c.rank, lora_dropout=c.lora_dropout,
                                    init_lora_weights="gaussian", target_modules=list(c.target_modules)))
        lora_params = [p for p in unet.parameters() if p.requires_grad]
        if not lora_params:
            raise ConfigError(f"target_modules {c.target_modules} match no layer of this U-Net")
        for mod in (vae, unet):
            mod.to(acc.device) if dtype == torch.float32 else mod.to(acc.device, dtype)
        for p in lora_params:                 # trainable weights stay fp32 under mixed precision
            p.data = p.data.float()
        D = int(unet.config.cross_attention_dim)
        groups = [{"params": lora_params, "lr": c.learning_rate}]
        if c.mode == "damage":
            self.embedding = DamageEmbedding(self.types, c.embedding_tokens, D, c.seed)
            self.embedding.table.to(acc.device)
            groups.append({"params": list(self.embedding.table.parameters()), "lr": c.embedding_learning_rate})
        opt = torch.optim.AdamW(groups, weight_decay=1e-2)
        self._resume(unet, opt)
        start_step = self.step
        if self.embedding is not None:
            unet, table, opt = acc.prepare(unet, self.embedding.table, opt)
        else:
            unet, opt = acc.prepare(unet, opt)
            table = None
        sf = float(getattr(vae.config, "scaling_factor", 0.18215))
        rng = np.random.default_rng([c.seed, self.step])
        gen = torch.Generator(device="cpu").manual_seed(c.seed * 100003 + self.step)
        t_start, window, stopped, last_loss = time.monotonic(), [], "steps", float("nan")
        deadline = None if c.minutes is None else t_start + 60.0 * c.minutes
        alphas = sched.alphas_cumprod.to(acc.device)

        def budget() -> float:
            fr = []
            if c.max_steps:
                fr.append((self.step - start_step) / max(1, c.max_steps - start_step))
            if deadline:
                fr.append((time.monotonic() - t_start) / (deadline - t_start))
            return max(fr) if fr else 0.0

        def save():
            if acc.is_main_process:
                self.ckpt.save(self.step, lambda f: self._write(f, acc.unwrap_model(unet), opt))
            acc.wait_for_everyone()

        unet.train()
        _say(progress, 0.0, f"training LoRA from step {self.step} on {len(self.samples)} samples")
        while True:
            stopped = stop_reason(self.step, c.max_steps, deadline, cancelled)
            if stopped:
                break
            for _ in range(c.gradient_accumulation_steps):
                with acc.accumulate(unet):
                    img, m, ids, cols = self.batch(rng)
                    img, m, ids, cols = (img.to(acc.device, dtype), m.to(acc.device, dtype),
                                         ids.to(acc.device), cols.to(acc.device))
                    B = len(img)
                    # 1. latents of the image and of the masked image; the mask at latent size
                    with torch.no_grad():
                        lat = vae.encode(img).latent_dist.sample(gen) * sf
                        mlat = vae.encode(img * (m < 0.5)).latent_dist.sample(gen) * sf
                    m_in = F.interpolate(m, size=lat.shape[-2:])                  # as the pipeline
                    m_w = F.adaptive_max_pool2d(m, lat.shape[-2:]).float()      # never loses thin masks
                    # 2. noise (only inside the mask when focus='restricted')
                    noise = torch.randn(lat.shape, generator=gen).to(acc.device, lat.dtype)
                    t = torch.randint(0, sched.config.num_train_timesteps, (B,), generator=gen).to(acc.device)
                    noisy = sched.add_noise(lat, noise, t)
                    if c.focus == "restricted":
                        noisy = m_w.to(lat.dtype) * noisy + (1 - m_w.to(lat.dtype)) * lat
                    # 3. the 9-channel U-Net with the damage table as encoder_hidden_states
                    if table is not None:
                        enc = table(ids).view(B, c.embedding_tokens, D).to(dtype)
                    else:
                        enc = torch.zeros(B, 77, D, device=acc.device, dtype=dtype)
                    pred = unet(torch.cat([noisy, m_in, mlat], 1), t, encoder_hidden_states=enc).sample
                    # 4. the loss, weighted towards (or restricted to) the mask
                    target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(lat, noise, t)
                    w = m_w if c.focus == "restricted" else 1.0 + c.mask_weight * m_w
                    w = w.expand_as(pred)
                    loss = (w * (pred.float() - target.float()) ** 2).sum() / w.sum().clamp_min(1.0)
                    if c.color_loss_weight > 0 and c.mode == "wall":
                        a = alphas[t].view(-1, 1, 1, 1).float()
                        if sched.config.prediction_type == "epsilon":
                            x0 = (noisy.float() - (1 - a).sqrt() * pred.float()) / a.sqrt()
                        else:
                            x0 = a.sqrt() * noisy.float() - (1 - a).sqrt() * pred.float()
                        rgb = (vae.decode((x0 / sf).to(dtype)).sample.float() + 1) / 2
                        lab = rgb_to_lab_torch(rgb)
                        mm = m.float()
                        mean_lab = (lab * mm).sum((2, 3)) / mm.sum((2, 3)).clamp_min(1.0)
                        target_lab = rgb_to_lab_torch(cols[:, :, None, None]).view(B, 3)
                        loss = loss + c.color_loss_weight * ((mean_lab - target_lab) / 100.0).pow(2).sum(1).mean()
                    acc.backward(loss)
                    if acc.sync_gradients:
                        acc.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                window.append(float(loss.detach()))
            self.step += 1
            if self.step % c.log_every == 0:
                last_loss = float(np.mean(window))
                window = []
                self.losses.append((self.step, last_loss))
                if acc.is_main_process:
                    append_history(self.out, self.step, last_loss)
            if c.validate_every and self.step % c.validate_every == 0 and acc.is_main_process:
                self.last_validation = str(self.validation_grid(vae, acc.unwrap_model(unet), sched))
                unet.train()
            if self.step % c.checkpoint_every == 0:
                save()
            _say(progress, budget(), f"step {self.step} loss {last_loss:.4f}")
        if window and not math.isfinite(last_loss):
            last_loss = float(np.mean(window))
        if self.step > start_step or self.ckpt.latest() is None:
            if self.ckpt.latest() is None or self.ckpt.latest().name != Checkpoints.name(self.step):
                save()
        _say(progress, 1.0, f"stopped ({stopped}) at step {self.step}")
        latest = self.ckpt.latest()
        return TrainResult(self.step, self.step - start_step, time.monotonic() - t_start, last_loss,
                           stopped, str(latest) if latest else None, list(self.losses), self.last_validation)

    @torch.no_grad()
    def validation_grid(self, vae, unet, sched) -> Path:
        """Rows: the first ``validation_count`` samples (fixed masks); columns: crop, mask, one
        inpainting per ``validation_seeds``. Saved as ``OUT/validation/step-NNNNNNN.png``."""
        from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline
        from PIL import Image
        c = self.cfg
        pipe = StableDiffusionInpaintPipeline(
            vae=vae, text_encoder=None, tokenizer=None, unet=unet,
            scheduler=DDIMScheduler.from_config(sched.config), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        unet.eval()
        order = sorted(range(len(self.samples)), key=lambda i: (self.samples[i].damage_type, i))
        picks, seen = [], set()
        for i in order:                       # one per type first, then the rest
            if self.samples[i].damage_type not in seen:
                picks.append(i)
                seen.add(self.samples[i].damage_type)
        picks += [i for i in order if i not in picks]
        rows = []
        for i in picks[: c.validation_count]:
            x, m = self.example(i, None)
            crop = ((x.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
            mask = (m[0].numpy() * 255).astype(np.uint8)
            dev, dt = unet.device, unet.dtype
            if self.embedding is not None:
                cond = self.embedding.embed(self.samples[i].damage_type).to(dev, dt)
            else:
                cond = torch.zeros(1, 77, int(unet.config.cross_attention_dim), device=dev, dtype=dt)
            cells = [crop, np.repeat(mask[..., None], 3, 2)]
            for s in c.validation_seeds:
                out = pipe(prompt_embeds=cond, negative_prompt_embeds=torch.zeros_like(cond),
                           image=Image.fromarray(crop), mask_image=Image.fromarray(mask),
                           height=c.resolution, width=c.resolution, num_inference_steps=c.validation_steps,
                           guidance_scale=c.validation_guidance, output_type="np",
                           generator=torch.Generator("cpu").manual_seed(int(s))).images[0]
                cells.append(np.clip(np.round(out * 255), 0, 255).astype(np.uint8))
            rows.append(np.concatenate(cells, 1))
        grid = np.concatenate(rows, 0)
        path = self.out / "validation" / f"step-{self.step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.tmp.png")
        cv2.imwrite(str(tmp), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
        os.replace(tmp, path)
        return path


def train_lora(cfg: LoraTrainConfig, samples: Sequence, progress: Progress | None = None,
               cancelled: Cancelled | None = None) -> TrainResult:
    """Train (or resume) LoRA + damage embedding; see :class:`LoraTrainer` for live losses."""
    return LoraTrainer(cfg, samples).run(progress, cancelled)


def run_from_config(cfg: LoraTrainConfig, progress: Progress | None = None,
                    cancelled: Cancelled | None = None) -> TrainResult:
    """Load ``cfg.data`` (real defects of the chosen types + ``extra_data``) and train."""
    if not cfg.data:
        raise ConfigError("data (an MVTec-layout category folder) is required")
    from pipelines.training_data import training_manifest, write_manifest
    manifest = training_manifest(cfg.data, cfg.damage_types, cfg.extra_data)
    samples = samples_from_category(cfg.data, cfg.damage_types, cfg.extra_data, cfg.image_size)
    write_manifest(cfg.output_dir, manifest)
    return train_lora(cfg, samples, progress, cancelled)
