"""The pixel-inpaint model itself: training config, U-Net, trainer, loading and sampling (imports torch).

Split from :mod:`pipelines.pixel_inpaint` (the generator and the "which model" lookup) so that
importing the generator — the registry does, to read its ``info`` for every backend list, CLI flag
and the Annotate widgets — costs no torch import: the app's first page and every ``python -m
studio`` call stay ~2 s faster. Everything here is also reachable as ``pipelines.pixel_inpaint.<name>``
(loaded on first use). See :mod:`pipelines.pixel_inpaint` for the model, its two-stage schedule
and the generation steps.
"""
from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

import cv2
import numpy as np
import torch

from pipelines import masks as mk
from pipelines.augment import AugmentConfig, augment_pair
from pipelines.classical import style_for
from pipelines.generators.base import DEFAULT_FEATHER, check_image, composite
from pipelines.ddpm import PRESETS as DDPM_PRESETS
from pipelines.fileio import atomic_write_bytes, atomic_write_json
from pipelines.models import ModelError
from pipelines.pixel_inpaint_files import (CONFIG_FILE, DAMAGE, FORMAT, MODEL_FILE, NORMAL,  # noqa: F401 (re-export)
                                     PRETRAIN_MASKS, PRODUCT, crop_box, read_meta, resolve_model)
from pipelines.training import (CancelFn, Cancelled, CheckpointedTrainer, CheckpointError,  # noqa: F401 (Cancelled)
                                Checkpoints, ProgressFn, RunConfig, Sample, TrainDataError,
                                TrainResult, check, check_samples,
                                load_training_samples, read_trainer_state, report, save_optimizer,
                                save_validation_grid, write_trainer_state)


PRESETS: dict[str, dict] = {
    # the DDPM's U-Nets (tests: ~0.1 M parameters; CPU default at 64 px: ~2.7 M, attention only
    # at the 8x8 level, ~0.7 s per step with batch 8 on one busy core)
    "tiny": DDPM_PRESETS["tiny"],
    "small": DDPM_PRESETS["small"],
    # the models shipped with the demo products (scripts/train_demo_models.py): ~1.8 M parameters,
    # 3.4 MiB as float16 safetensors, ~0.6 s per step with batch 8 at 64 px on one torch thread
    "demo": dict(block_out_channels=(16, 32, 64, 96),
                 down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                 up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
                 layers_per_block=1, norm_num_groups=8),
    # a GPU / long run
    "base": dict(block_out_channels=(64, 128, 192, 256),
                 down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                 up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
                 layers_per_block=2, norm_num_groups=32),
}


# ================================================================================================
# Config
# ================================================================================================
@dataclass
class PixelInpaintConfig(RunConfig):
    """A pixel-inpaint training run.

    Budget: ``max_steps`` counts every step of the model (both stages, resumed ones included),
    ``minutes`` the wall clock of this run. The two-stage schedule is opt-in: stage 1 ("product",
    good images with damage-shaped masks, class "normal") lasts until ``pretrain_steps`` steps of
    the model or ``pretrain_minutes`` of stage-1 wall clock (summed over resumed runs), whichever
    comes first; then stage 2 ("damage", the reference defects + ``good_fraction`` good examples)
    runs until the budget ends. With both at their defaults (0 / None) the run is today's single
    stage, byte for byte.

    Recommended CPU budget (``benchmarks/pixel_inpaint_fewshot.py``, default model: 'small', 64 px,
    batch 8 — about 1.3 steps/s on one torch thread of a quiet 2-core machine, 2–3× fewer when it
    is shared; use one thread there): 15 minutes or more per run (the default ``minutes``; 806
    steps on a shared machine), and for the two-stage schedule half of it in stage 1 (``pretrain_minutes = minutes / 2``
    or ``pretrain_steps = max_steps // 2``). Measured on the MVTec transistor (157 and 806 steps)
    and the demo bottle (339 and 461 steps, two seeds), the two-stage schedule did not make the
    defects measurably closer to the reference ones: its KID-style gain (−0.07 … −0.10) flipped
    to a loss (+0.10) with another seed. Neither schedule makes convincing defects on this budget:
    ≤ 6 minutes fills masks with coloured noise, 15 minutes with the product's colours but no
    defect structure; no CPU budget that does has been measured.
    """
    what: ClassVar[str] = "pixel-inpaint"

    data: str | None = None                # MVTec-layout category (for run_from_config / the CLI)
    resolution: int = 64                   # model input size (px)
    batch_size: int = 8
    learning_rate: float = 4e-4
    max_steps: int | None = None           # stop after this many steps in total
    minutes: float | None = 15.0           # wall-clock budget of this run
    checkpoint_every: int = 250
    validate_every: int = 0                # 0: no validation grid during training
    augment: Any = field(default_factory=lambda: AugmentConfig(rotate=20.0))
    preset: str = "small"                  # see PRESETS
    context: float = 1.6                   # crop side = max(min_crop, bbox side · context)
    min_crop: int = 64                     # smallest crop side on the source image (px)
    prediction_type: str = "v_prediction"  # or 'epsilon'
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    good_fraction: float = 0.25            # share of 'normal' examples (random masks on good images)
    pretrain_steps: int = 0                # two-stage: stage 1 ("product") ends at this step (0: no step limit)
    pretrain_minutes: float | None = None  # two-stage: ... or after this much stage-1 wall clock (all runs)
    pretrain_masks: str = "shapes"         # two-stage masks on good images: 'shapes' (fitted) | 'random' (style)
    warmup_steps: int = 50

    def validate(self) -> None:
        super().validate()
        check(self.preset in PRESETS, f"preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        down = 2 ** (len(PRESETS[self.preset]["block_out_channels"]) - 1)
        check(self.resolution >= 16 and self.resolution % down == 0,
              f"resolution must be ≥ 16 and a multiple of {down} for preset {self.preset}, got {self.resolution}")
        check(self.prediction_type in ("v_prediction", "epsilon"),
              f"prediction_type must be 'v_prediction' or 'epsilon', got {self.prediction_type!r}")
        check(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        check(0.0 <= self.good_fraction < 1.0, f"good_fraction must be in [0, 1), got {self.good_fraction}")
        check(self.context >= 1.0, f"context must be ≥ 1, got {self.context}")
        check(self.pretrain_steps >= 0, f"pretrain_steps must be ≥ 0, got {self.pretrain_steps}")
        check(self.pretrain_minutes is None or self.pretrain_minutes > 0,
              f"pretrain_minutes must be > 0 (or unset), got {self.pretrain_minutes}")
        check(self.pretrain_masks in PRETRAIN_MASKS,
              f"pretrain_masks must be one of {', '.join(PRETRAIN_MASKS)}, got {self.pretrain_masks!r}")

    @property
    def two_stage(self) -> bool:
        """Whether stage 1 ("product") runs before the defects (``pretrain_steps`` / ``pretrain_minutes``)."""
        return self.pretrain_steps > 0 or self.pretrain_minutes is not None


# ================================================================================================
# The plain model
# ================================================================================================
def build_unet(resolution: int, n_classes: int, preset: str = "small"):
    """``UNet2DModel``: 7 input channels (noisy RGB, masked RGB, mask) → 3, ``n_classes`` class ids."""
    from diffusers import UNet2DModel
    return UNet2DModel(sample_size=resolution, in_channels=7, out_channels=3,
                       num_class_embeds=int(n_classes), attention_head_dim=32, **PRESETS[preset])


def make_scheduler(meta: dict, kind: str = "ddpm"):
    from diffusers import DDIMScheduler, DDPMScheduler
    common = dict(num_train_timesteps=int(meta["num_train_timesteps"]), beta_schedule=meta["beta_schedule"],
                  prediction_type=meta["prediction_type"], clip_sample=False)
    if kind == "ddpm":
        return DDPMScheduler(**common)
    return DDIMScheduler(**common, set_alpha_to_one=True, timestep_spacing="trailing")




def resize_img(img: np.ndarray, r: int) -> np.ndarray:
    return cv2.resize(img, (r, r), interpolation=cv2.INTER_AREA if img.shape[0] > r else cv2.INTER_CUBIC)


def resize_mask(m: np.ndarray, r: int) -> np.ndarray:
    """Area-resize then threshold low, so thin scratches survive downscaling; stays binary."""
    f = cv2.resize((m > 0).astype(np.float32), (r, r), interpolation=cv2.INTER_AREA)
    return (f > 0.25).astype(np.float32)


def to_tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float() / 127.5 - 1.0


def model_input(x_t: torch.Tensor, x0: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``[B x 7 x r x r]``: noisy RGB, masked RGB (0 inside the mask), mask."""
    return torch.cat([x_t, x0 * (1.0 - m), m], dim=1)


# ================================================================================================
# Training
# ================================================================================================
class PixelInpaintTrainer(CheckpointedTrainer):
    """Train (or resume) a pixel-space inpainting model.

    ``samples``: ``[(image H×W×3 uint8, mask H×W uint8, damage_type)]`` (real defects);
    ``good``: defect-free images for the 'normal' examples (may be empty if ``good_fraction`` = 0
    and the schedule has one stage).
    ``self.losses`` — ``[(step, loss)]``, appended live (also ``OUT/history.jsonl``).
    ``self.stage`` — ``"product"`` (stage 1 of the two-stage schedule) or ``"damage"``;
    ``self.examples`` — ``{stage: {"good": n, "defect": n}}``, the examples drawn so far (resumed
    runs included); ``self.pretrain_end`` — the step where stage 2 began (None before / without it).
    """

    def __init__(self, cfg: PixelInpaintConfig, samples: Sequence, good: Sequence[np.ndarray] = ()):
        super().__init__(cfg)
        self.types = check_samples(samples, cfg.damage_types, where="the training samples")
        self.samples = [Sample(check_image(s[0]), mk.to_binary(s[1]), s[2]) for s in samples
                        if s[2] in self.types]
        self.good = [check_image(g) for g in good]
        if cfg.good_fraction > 0 and not self.good:
            raise TrainDataError("good_fraction > 0 needs defect-free images (train/good); "
                                 "pass good images or set good_fraction: 0")
        if cfg.two_stage and not self.good:
            raise TrainDataError("the two-stage schedule (pretrain_steps / pretrain_minutes) learns the "
                                 "product from defect-free images (train/good); pass good images")
        self.stage = PRODUCT if cfg.two_stage else DAMAGE
        self.pretrain_end: int | None = None
        self.pretrain_seconds = 0.0               # stage-1 wall clock of earlier runs (+ this one, live)
        self.examples = {PRODUCT: {"good": 0, "defect": 0}, DAMAGE: {"good": 0, "defect": 0}}
        self._shapes: dict[str, Any] = {}         # damage type → shape model (built on first use)
        self._fg: dict[tuple, np.ndarray | None] = {}   # image size → foreground at that size
        self._fg_est: np.ndarray | None = None

    # -- data ------------------------------------------------------------------------------------
    def meta(self) -> dict:
        c = self.cfg
        return dict(format=FORMAT, damage_types=self.types, resolution=c.resolution, preset=c.preset,
                    context=c.context, min_crop=c.min_crop, prediction_type=c.prediction_type,
                    num_train_timesteps=c.num_train_timesteps, beta_schedule=c.beta_schedule,
                    styles={t: style_for(t) for t in self.types})

    def _foreground(self, hw: tuple[int, int]) -> np.ndarray | None:
        """The product's foreground (from the good images) at ``hw``; None when it is the whole frame."""
        if hw not in self._fg:
            from pipelines.shapes import estimate_foreground
            if self._fg_est is None:
                self._fg_est = estimate_foreground(self.good)
            fg = self._fg_est
            if fg.shape != hw:
                fg = cv2.resize(fg.astype(np.uint8), (hw[1], hw[0]), interpolation=cv2.INTER_NEAREST) > 0
            self._fg[hw] = None if fg.all() or not fg.any() else fg
        return self._fg[hw]

    def shape_model(self, damage_type: str):
        """:func:`pipelines.shapes.shape_model_for` fitted on this type's training masks (the
        reference defects), against the good images' foreground."""
        if damage_type not in self._shapes:
            from pipelines.shapes import shape_model_for
            masks = [s.mask for s in self.samples if s.damage_type == damage_type]
            fgs = [self._foreground(m.shape[:2]) for m in masks]
            self._shapes[damage_type] = shape_model_for(
                damage_type, masks, foregrounds=None if all(f is None for f in fgs) else
                [np.ones(m.shape[:2], bool) if f is None else f for m, f in zip(masks, fgs)])
        return self._shapes[damage_type]

    def good_mask(self, damage_type: str, hw: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        """A mask for a 'normal' example on a good image: the type's classic style (today's single
        stage, or ``pretrain_masks='random'``), else a sample of the type's shape model."""
        if not self.cfg.two_stage or self.cfg.pretrain_masks == "random":
            return mk.random_mask(style_for(damage_type), hw, rng)
        model = self.shape_model(damage_type)
        where = self._foreground(hw) if getattr(model, "on_product", True) else None
        return model.sample(hw, rng, where)

    def good_example(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
        """A train/good image, a mask shaped like a random damage type, the 'normal' class id."""
        img = self.good[int(rng.integers(len(self.good)))]
        t = self.types[int(rng.integers(len(self.types)))]
        return img, self.good_mask(t, img.shape[:2], rng), len(self.types)

    def defect_example(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
        """A reference defect, its mask and its type's class id."""
        s = self.samples[int(rng.integers(len(self.samples)))]
        return s.image, s.mask, self.types.index(s.damage_type)

    def example(self, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One training example: ``(x0 [3 x r x r], m [1 x r x r], class id)``. Stage "product":
        always a good image; stage "damage": a good image with probability ``good_fraction``, else
        a reference defect."""
        c, r = self.cfg, self.cfg.resolution
        if self.stage == PRODUCT or (self.good and rng.random() < c.good_fraction):
            img, m, cls = self.good_example(rng)
            source = "good"
        else:
            img, m, cls = self.defect_example(rng)
            source = "defect"
        self.examples[self.stage][source] += 1
        img, m = augment_pair(img, m, rng, c.augment)
        if rng.random() < 0.5:                      # the generator repaints dilate(mask, feather)
            m = mk.dilate(m, float(rng.uniform(0, DEFAULT_FEATHER)))
        x0, y0, x1, y1 = crop_box(m, c.context, c.min_crop, rng)
        crop, cm = resize_img(img[y0:y1, x0:x1], r), resize_mask(m[y0:y1, x0:x1], r)
        if not cm.any():                            # degenerate: keep at least the centre pixel
            cm[r // 2, r // 2] = 1.0
        return to_tensor(crop), torch.from_numpy(cm)[None], cls

    def batch(self, rng: np.random.Generator, n: int):
        ex = [self.example(rng) for _ in range(n)]
        return (torch.stack([e[0] for e in ex]), torch.stack([e[1] for e in ex]),
                torch.tensor([e[2] for e in ex], dtype=torch.long))

    # -- checkpoint --------------------------------------------------------------------------------
    def _write(self, folder: Path, unet, opt, rng_state: dict) -> None:
        from safetensors.torch import save_file
        state = {k: v.detach().cpu().contiguous() for k, v in unet.state_dict().items()}
        save_file(state, str(folder / MODEL_FILE))
        schedule = self.schedule()
        atomic_write_json(folder / CONFIG_FILE, {**self.meta(), "unet": dict(unet.config),
                                                 "step": self.step, "schedule": schedule},
                          indent=1, default=list)
        groups = save_optimizer(opt, folder)
        write_trainer_state(folder, "pixel-inpaint", self.step, self.losses, groups, config=self.cfg.to_dict(),
                            rng=rng_state, schedule=schedule)

    def schedule(self) -> dict:
        """The run's stages so far: where stage 2 began, stage-1 seconds, examples drawn per stage
        and source, and the data each stage draws from (kept in the checkpoint)."""
        c = self.cfg
        stages = [PRODUCT, DAMAGE] if c.two_stage or self.pretrain_end is not None else [DAMAGE]
        end = self.pretrain_end if self.pretrain_end is not None else (self.step if self.stage == PRODUCT else 0)
        return {"stages": stages, "stage": self.stage, "pretrain_end": self.pretrain_end,
                "steps": {PRODUCT: end if PRODUCT in stages else 0, DAMAGE: self.step - end},
                "pretrain_seconds": round(self._pretrain_clock(), 3),
                "pretrain_masks": c.pretrain_masks if c.two_stage else None,
                "examples": {k: dict(v) for k, v in self.examples.items()},
                "data": {"good_images": len(self.good),
                         "defects": {t: sum(s.damage_type == t for s in self.samples) for t in self.types}}}

    def _pretrain_clock(self) -> float:
        """Stage-1 wall clock so far: earlier runs + this run while it is in stage 1."""
        live = getattr(self, "_stage_t0", None)
        return self.pretrain_seconds + (0.0 if live is None else max(0.0, time.monotonic() - live))

    def _resume(self, unet, opt) -> dict | None:
        last = self.ckpt.latest() if self.cfg.resume else None
        if last is None:
            return None
        meta = json.loads((last / CONFIG_FILE).read_text())
        if meta["damage_types"] != self.types or meta["resolution"] != self.cfg.resolution \
                or meta["preset"] != self.cfg.preset:
            raise CheckpointError(
                f"{self.out} holds a model for types {meta['damage_types']} at {meta['resolution']} px "
                f"({meta['preset']}); this run has {self.types} at {self.cfg.resolution} px "
                f"({self.cfg.preset}) — use a new output_dir or resume: false")
        _load_weights(unet, last)
        state = read_trainer_state(last)
        self._restore(last, opt, state)
        sch = state.get("schedule") or {}
        if sch:
            self.pretrain_end = sch.get("pretrain_end")
            self.pretrain_seconds = float(sch.get("pretrain_seconds") or 0.0)
            for stage, counts in (sch.get("examples") or {}).items():
                self.examples.setdefault(stage, {"good": 0, "defect": 0}).update(counts)
            # a run that reached stage 2 stays there; one saved in stage 1 goes on with it
            # (this config permitting: without a stage 1 it moves to stage 2 now)
            self.stage = DAMAGE if sch.get("stage") == DAMAGE or not self.cfg.two_stage else PRODUCT
        elif self.step > 0:
            self.stage = DAMAGE        # a checkpoint from before the schedule: single-stage training
        return state

    def _next_stage(self, progress: ProgressFn | None, save) -> None:
        """Stage 1 → 2 when stage 1 has used its steps / minutes (checked before each step): the
        boundary step is recorded and a checkpoint of the product model is written."""
        c = self.cfg
        if self.stage != PRODUCT:
            return
        done = (not c.two_stage or (c.pretrain_steps > 0 and self.step >= c.pretrain_steps)
                or (c.pretrain_minutes is not None and self._pretrain_clock() >= 60.0 * c.pretrain_minutes))
        if not done:
            return
        self.pretrain_seconds, self._stage_t0 = self._pretrain_clock(), None
        self.stage, self.pretrain_end = DAMAGE, self.step
        latest = self.ckpt.latest()
        if self.step > 0 and (latest is None or latest.name != Checkpoints.name(self.step)):
            save()                     # the product model (a resumed run would switch here too)
        report(progress, self.budget.fraction(self.step),
               f"stage 2 (damage) from step {self.step} after {self.pretrain_seconds / 60:.1f} min of stage 1")

    # -- loop ------------------------------------------------------------------------------------
    def run(self, progress: ProgressFn | None = None, cancelled: CancelFn | None = None) -> TrainResult:
        """Build the U-Net (or resume it from the latest checkpoint) and train it, with a linear
        learning-rate warm-up, until ``max_steps`` / ``minutes`` / cancel; checkpoint every
        ``checkpoint_every`` steps and at the end."""
        c = self.cfg
        acc = self._open()
        torch.manual_seed(c.seed)
        unet = build_unet(c.resolution, len(self.types) + 1, c.preset)
        opt = torch.optim.AdamW(unet.parameters(), lr=c.learning_rate, weight_decay=0.0)
        self._resume(unet, opt)
        sched = make_scheduler(self.meta(), "ddpm")
        lr_lambda = lambda s: min(1.0, (s + 1) / max(1, c.warmup_steps))  # noqa: E731
        for g in opt.param_groups:
            g["initial_lr"] = c.learning_rate
        lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda, last_epoch=self.step - 1)
        unet, opt = acc.prepare(unet, opt)
        rng = np.random.default_rng([c.seed, self.step])
        self._begin(progress, cancelled)

        def save():
            self._save(acc, lambda f: self._write(f, acc.unwrap_model(unet), opt, {"seed": c.seed}))

        report(progress, 0.0, f"training pixel-inpaint from step {self.step} on {len(self.samples)} "
                              f"defects of {len(self.types)} type(s)"
                              + (f", stage {self.stage}" if c.two_stage else ""))
        self._stage_t0 = time.monotonic() if self.stage == PRODUCT else None
        stopped = self._loop(acc, unet, lambda: self._micro_step(acc, unet, opt, sched, rng), save,
                             validate=self._validation_grid, before_step=lambda: self._next_stage(progress, save),
                             after_step=lr_sched.step)
        self.pretrain_seconds, self._stage_t0 = self._pretrain_clock(), None
        return self._result(stopped)

    def _micro_step(self, acc, unet, opt, sched, rng: np.random.Generator) -> float:
        """One batch: noise to a random t, predict v (or ε), loss weighted ``1 + mask_weight·m``."""
        c = self.cfg
        with acc.accumulate(unet):
            x0, m, cls = self.batch(rng, c.batch_size)
            x0, m, cls = x0.to(acc.device), m.to(acc.device), cls.to(acc.device)
            noise = torch.randn_like(x0)
            t = torch.randint(0, sched.config.num_train_timesteps, (len(x0),), device=x0.device)
            x_t = sched.add_noise(x0, noise, t)
            pred = unet(model_input(x_t, x0, m), t, class_labels=cls).sample
            target = noise if c.prediction_type == "epsilon" else sched.get_velocity(x0, noise, t)
            w = 1.0 + c.mask_weight * m
            loss = (w * (pred.float() - target) ** 2).mean() / w.mean()
            acc.backward(loss)
            if acc.sync_gradients:
                acc.clip_grad_norm_(unet.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    @torch.inference_mode()
    def _validation_grid(self, unet) -> Path:
        """One row per damage type: crop, mask, generated (fixed masks and seeds)."""
        model = PixelInpaintModel(unet.eval(), self.meta())
        rows = []
        for i, t in enumerate(self.types):
            s = next(s for s in self.samples if s.damage_type == t)
            gen = model.inpaint(s.image, s.mask, t, seed=i, steps=self.cfg.validation_steps)
            x0, y0, x1, y1 = crop_box(mk.dilate(s.mask, DEFAULT_FEATHER), model.context, model.min_crop)
            cells = [s.image[y0:y1, x0:x1], np.repeat(s.mask[y0:y1, x0:x1, None], 3, 2), gen[y0:y1, x0:x1]]
            rows.append(np.concatenate([resize_img(x, 96) for x in cells], 1))
        return save_validation_grid(self.out, self.step, np.concatenate(rows, 0))


def train_pixel_inpaint(cfg: PixelInpaintConfig, samples: Sequence, good: Sequence[np.ndarray] = (),
                        progress: ProgressFn | None = None, cancelled: CancelFn | None = None) -> TrainResult:
    return PixelInpaintTrainer(cfg, samples, good).run(progress, cancelled)


def run_from_config(cfg: PixelInpaintConfig, progress: ProgressFn | None = None,
                    cancelled: CancelFn | None = None) -> TrainResult:
    """Load ``cfg.data`` (MVTec category: real defects of the chosen types + train/good) and train."""
    samples = load_training_samples(cfg)
    good: list = []
    if cfg.good_fraction > 0 or cfg.two_stage:
        from pipelines.training import good_images
        from pipelines.training_data import read_manifest, write_manifest
        good, good_hashes = good_images(cfg.data, cfg.image_size, "pixel-inpaint good images")
        manifest = read_manifest(cfg.output_dir)
        if manifest:
            write_manifest(cfg.output_dir, {**manifest, "fit_good_hashes": good_hashes})
    return train_pixel_inpaint(cfg, samples, good, progress, cancelled)


# ================================================================================================
# Loading and sampling
# ================================================================================================
def _load_weights(unet, folder: Path) -> None:
    from pipelines.models import check_safetensors
    weights = check_safetensors(folder / MODEL_FILE, "pixel-inpaint model")
    try:
        unet.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"{folder / MODEL_FILE} does not fit its config.json ({str(exc)[:300]})") from exc




def export_model(checkpoint: str | os.PathLike, dest: str | os.PathLike, dtype: str = "float16",
                 extra_meta: dict | None = None) -> Path:
    """Copy a checkpoint's weights (cast to ``dtype``: 'float16' halves the file; the model loads
    them into float32) and its ``config.json`` into ``dest`` — no optimizer, no trainer state, no
    timings: what a generator needs and nothing else, the same bytes for the same weights. Written
    atomically, file by file."""
    from safetensors.torch import save as save_bytes
    folder = resolve_model(checkpoint)
    meta = read_meta(folder)
    tdt = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    weights = check_safetensors_file(folder / MODEL_FILE)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(dest / MODEL_FILE, save_bytes(
        {k: v.to(tdt).contiguous() for k, v in sorted(weights.items())}, metadata={"format": FORMAT}))
    unet_cfg = dict(meta["unet"])                 # diffusers keeps a *set* here: a stable order
    if isinstance(unet_cfg.get("_use_default_values"), list):
        unet_cfg["_use_default_values"] = sorted(unet_cfg["_use_default_values"])
    meta["unet"] = unet_cfg
    if isinstance(meta.get("schedule"), dict):   # wall-clock timing: not part of what the model is
        meta["schedule"] = {k: v for k, v in meta["schedule"].items() if k != "pretrain_seconds"}
    atomic_write_json(dest / CONFIG_FILE, {**meta, "weights_dtype": dtype, **(extra_meta or {})},
                      indent=1, default=list)
    return dest


def check_safetensors_file(path: Path) -> dict:
    from pipelines.models import check_safetensors
    return check_safetensors(path, "pixel-inpaint model")


class PixelInpaintModel:
    """A loaded model + its metadata; ``inpaint`` is the whole-image operation (no paste-back)."""

    def __init__(self, unet, meta: dict):
        self.unet, self.meta = unet, meta
        self.types: list[str] = list(meta["damage_types"])
        self.resolution, self.context = int(meta["resolution"]), float(meta["context"])
        self.min_crop = int(meta["min_crop"])
        self.lock = threading.Lock()

    @classmethod
    def load(cls, model: str | os.PathLike | None = None) -> "PixelInpaintModel":
        folder = resolve_model(model)
        meta = read_meta(folder)
        from diffusers import UNet2DModel
        unet = UNet2DModel.from_config(meta["unet"])
        _load_weights(unet, folder)
        obj = cls(unet.eval(), meta)
        obj.folder = folder
        return obj

    def class_id(self, damage_type: str | None) -> int:
        if damage_type is None or damage_type == NORMAL:
            return len(self.types)
        if damage_type not in self.types:
            raise ModelError(f"this pixel-inpaint model was trained for {', '.join(self.types)}, not "
                             f"{damage_type!r} — train one with that type (python -m studio train "
                             "--kind pixel-inpaint --types ...)")
        return self.types.index(damage_type)

    @torch.inference_mode()
    def sample(self, crop: np.ndarray, m: np.ndarray, cls: int, seed: int, steps: int = 25,
               strength: float = 1.0, guidance: float = 1.0) -> np.ndarray:
        """``crop: r x r x 3 uint8``, ``m: r x r`` {0,1} → generated ``r x r x 3 uint8``.
        DDIM with the known pixels re-injected at each step (RePaint)."""
        sched = make_scheduler(self.meta, "ddim")
        sched.set_timesteps(int(steps))
        g = torch.Generator("cpu").manual_seed(int(seed))
        x0 = to_tensor(crop)[None]
        mt = torch.from_numpy(m.astype(np.float32))[None, None]
        timesteps = sched.timesteps
        n_keep = max(1, int(round(len(timesteps) * float(strength))))
        timesteps = timesteps[len(timesteps) - n_keep:]
        noise = torch.randn(x0.shape, generator=g)
        x = noise if strength >= 1.0 else sched.add_noise(x0, noise, timesteps[:1])
        known_noise = torch.randn(x0.shape, generator=g)
        labels = torch.tensor([cls])
        normal = torch.tensor([len(self.types)])
        for i, t in enumerate(timesteps):
            # 1. the known region at the current noise level (RePaint)
            known_t = sched.add_noise(x0, known_noise, t.reshape(1))
            x = mt * x + (1 - mt) * known_t
            # 2. predict (optionally guided away from the 'normal' class)
            inp = model_input(x, x0, mt)
            pred = self.unet(inp, t, class_labels=labels).sample
            if guidance != 1.0:
                pred_n = self.unet(inp, t, class_labels=normal).sample
                pred = pred_n + guidance * (pred - pred_n)
            # 3. one DDIM step
            x = sched.step(pred, t, x).prev_sample
        x = mt * x + (1 - mt) * x0
        return ((x[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()

    def inpaint(self, image: np.ndarray, mask: np.ndarray, damage_type: str | None, seed: int,
                steps: int = 25, strength: float = 1.0, guidance: float = 1.0,
                feather: float = DEFAULT_FEATHER) -> np.ndarray:
        """Full image in → full image out; outside ``dilate(mask, feather)`` byte-identical."""
        fe = max(0.0, float(feather))
        grown = mk.dilate(mask, fe)
        x0, y0, x1, y1 = crop_box(grown, self.context, self.min_crop)
        crop, cmask = image[y0:y1, x0:x1], mask[y0:y1, x0:x1]
        r = self.resolution
        with self.lock:
            gen = self.sample(resize_img(crop, r), resize_mask(grown[y0:y1, x0:x1], r),
                              self.class_id(damage_type), seed, steps, strength, guidance)
        side = x1 - x0
        gen = cv2.resize(gen, (side, y1 - y0), interpolation=cv2.INTER_CUBIC if side > r else cv2.INTER_AREA)
        out = image.copy()
        out[y0:y1, x0:x1] = composite(crop, gen, mk.feather(cmask, fe))
        return out
