"""LoRA + damage-type embedding training for the SD 1.5 inpainting U-Net.

The model (SD 1.5 inpainting, 9-channel U-Net) stays frozen — VAE and U-Net weights never move.
What trains:

* peft LoRA adapters (``rank``, ``alpha``, ``target_modules`` = to_q/to_k/to_v/to_out.0) added
  with ``unet.add_adapter(LoraConfig(...))``;
* a :class:`pipelines.inpaint.DamageEmbedding` table (``nn.Embedding(n_types, tokens·D)``) whose
  rows are fed as ``encoder_hidden_states: [B x tokens x D]`` in place of CLIP text.

One step (numbered as in the code, :meth:`LoraTrainer._loss`)::

    1. latents  = vae.encode(image)·sf                         [B x 4 x h x w]
       masked   = vae.encode(image · (mask < 0.5))·sf           [B x 4 x h x w]
       m        = nearest(mask → h x w)                         [B x 1 x h x w]
    2. noisy    = scheduler.add_noise(latents, ε, t)   (focus='restricted': only where m = 1)
    3. pred     = unet(cat[noisy, m, masked], t, table[type])   (9 channels, as the pipeline)
    4. loss     = mean(w · (pred − target)²), target = ε or v;  w = 1 + mask_weight·m
                  (focus='restricted': w = m) [+ the subclass's terms, _add_losses]

HF Accelerate wraps the loop (``Accelerator(mixed_precision, gradient_accumulation_steps,
cpu=<no CUDA>)``), so ``accelerate launch`` on several GPUs runs the same code.

The wall-colour LoRA is its own trainer kind (``TRAINERS["wall"]``): :class:`pipelines.wall_train.
WallTrainer`, a subclass of :class:`LoraTrainer` (this module never imports it): the empty
conditioning of generation, the solid colour reference through IP-Adapter, random target colours,
colour metrics per validation step. Its hooks here: ``damage_table = False``,
:meth:`LoraTrainer._conditioning` and :meth:`LoraTrainer._add_losses` (its LAB colour loss).

The training glue (configs, samples, budget, atomic checkpoints, optimizer state, history,
Accelerate, the result) is :mod:`pipelines.training`: import its names from there. Output folder
layout: :mod:`pipelines.training`; one LoRA checkpoint holds::

    OUT/checkpoints/step-0000200/
        pytorch_lora_weights.safetensors     diffusers LoRA format → pipe.load_lora_weights(...)
        damage_embedding.safetensors/.json   → sd-inpaint ``embedding=<this folder>``
        adapter_state.safetensors            peft-format adapter (resume)
        optimizer.safetensors                flattened AdamW state (resume)
        trainer_state.json                   step, losses, config, damage types
        validation.png                       the validation grid of this step (if made)

Never imports gradio or ``studio``.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from pipelines import masks as mk
from pipelines.augment import AugmentConfig, augment_pair
from pipelines.training import (CancelFn, CheckpointedTrainer, CheckpointError, Checkpoints, ConfigError,
                                ProgressFn, RunConfig, Sample, TrainResult, check, check_samples,
                                load_training_samples, read_trainer_state, report, save_optimizer,
                                save_validation_grid, validation_row, write_trainer_state)

LORA_FILE = "pytorch_lora_weights.safetensors"
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


# ================================================================================================
# LoRA trainer
# ================================================================================================
@dataclass
class LoraTrainConfig(RunConfig):
    """A LoRA + damage-table run: the run fields of :class:`pipelines.training.RunConfig` and the
    LoRA / table / validation fields below."""
    what: ClassVar[str] = "LoRA"

    data: str | None = None                # MVTec-layout category (for run_from_config / the CLI)
    resolution: int = 512                  # training crops (px), as the generator's working size
    learning_rate: float = 1e-4            # LoRA weights
    model: str | None = None               # SD 1.5 inpainting folder / hub id (default $DEFECT_STUDIO_SD_INPAINT)
    padding: int = 32                      # context around the mask (px), as sd-inpaint only_masked
    rank: int = 4
    alpha: float | None = None             # LoRA alpha (None: = rank)
    lora_dropout: float = 0.0
    target_modules: list = field(default_factory=lambda: list(DEFAULT_TARGETS))
    embedding_tokens: int = 8
    embedding_learning_rate: float = 1e-3  # damage table
    focus: str = "weighted"                # 'weighted': loss 1 + mask_weight·m | 'restricted': noise and loss only in the mask
    validation_seeds: list = field(default_factory=lambda: [0, 1])
    validation_count: int = 3              # fixed masks in the grid
    validation_guidance: float = 3.0

    def __post_init__(self):
        self.target_modules = list(self.target_modules)
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        check(isinstance(self.rank, int) and self.rank >= 1, f"rank must be an integer ≥ 1, got {self.rank!r}")
        check(self.alpha is None or self.alpha > 0, f"alpha must be > 0, got {self.alpha}")
        check(0.0 <= self.lora_dropout < 1.0, f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        check(bool(self.target_modules), "target_modules must name at least one layer (to_q, to_k, …)")
        check(self.resolution >= 64 and self.resolution % 8 == 0,
              f"resolution must be ≥ 64 and a multiple of 8, got {self.resolution}")
        check(self.embedding_tokens >= 1, f"embedding_tokens must be ≥ 1, got {self.embedding_tokens}")
        check(self.learning_rate > 0 and self.embedding_learning_rate > 0, "learning rates must be > 0")
        check(self.focus in ("weighted", "restricted"),
              f"focus must be 'weighted' or 'restricted', got {self.focus!r}")
        check(self.mask_weight >= 0, f"mask_weight must be ≥ 0, got {self.mask_weight}")
        check(self.validate_every >= 0, f"validate_every must be ≥ 0, got {self.validate_every}")
        check(self.validation_count >= 1 and len(self.validation_seeds) >= 1,
              "validation needs at least one mask and one seed")


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
        raise models.wrap_load_error("the SD inpainting model", folder, exc) from exc
    if int(unet.config.in_channels) != 9:
        raise models.ModelError(f"{folder} has a U-Net with {unet.config.in_channels} input channels; "
                                "LoRA inpainting training needs a 9-channel inpainting checkpoint")
    return folder, vae, unet, sched



@dataclass
class TrainParts:
    """The models of one run (``unet``/``table``/``opt`` wrapped by Accelerate after ``_prepare``)."""
    vae: Any
    unet: Any
    sched: Any
    opt: Any
    dtype: torch.dtype
    cross_dim: int                     # D, the U-Net's cross-attention width
    table: Any = None                  # the damage table (None in wall mode)
    sf: float = 0.18215                # VAE scaling factor
    alphas: Any = None                 # alphas_cumprod on the device (colour loss)



def mask_crop(image: np.ndarray, mask: np.ndarray, resolution: int, padding: float,
              augment: AugmentConfig | None, rng: np.random.Generator | None):
    """One training example of the SD trainers (LoRA, wall colour, ControlNet): the work box around
    ``mask`` (as generation crops it, :func:`pipelines.inpaint.work_box`) resized to ``resolution``
    → ``(image [3 x r x r] in [-1, 1], mask [1 x r x r] {0, 1})``; augmented when ``rng`` is given
    (validation uses the un-augmented crop)."""
    from pipelines.inpaint import work_box
    r = int(resolution)
    if rng is not None:
        image, mask = augment_pair(image, mask, rng, augment)
    x0, y0, x1, y1 = work_box(mask, 4.0, padding)
    crop = image[y0:y1, x0:x1]
    crop = cv2.resize(crop, (r, r), interpolation=cv2.INTER_AREA if crop.shape[0] > r else cv2.INTER_CUBIC)
    cm = cv2.resize(mask[y0:y1, x0:x1], (r, r), interpolation=cv2.INTER_NEAREST)
    x = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1).float() / 127.5 - 1.0
    return x, torch.from_numpy((cm > 0).astype(np.float32))[None]

class LoraTrainer(CheckpointedTrainer):
    """LoRA + damage-embedding training (see the module docstring).

    ``samples``: ``[(image H×W×3 uint8, mask H×W uint8, damage_type)]``. ``self.losses`` is the
    live ``[(step, loss)]`` history (also appended to ``OUT/history.jsonl``)."""
    damage_table: ClassVar[bool] = True     # trains the table of damage types (the wall trainer: no)

    def __init__(self, cfg: LoraTrainConfig, samples: Sequence):
        from pipelines.generators.base import check_image
        super().__init__(cfg)
        if self.damage_table:
            self.types = check_samples(samples, cfg.damage_types, where="the training samples")
            self.samples = [Sample(check_image(s[0]), mk.to_binary(s[1]), s[2]) for s in samples
                            if s[2] in self.types]
            self.colors = [None] * len(self.samples)
        self.embedding = None

    # -- data --------------------------------------------------------------------------------------
    def example(self, i: int, rng: np.random.Generator | None):
        """Sample ``i`` → ``(image [3 x r x r] in [-1, 1], mask [1 x r x r] {0, 1})``; augmented
        when ``rng`` is given (validation uses the un-augmented crop)."""
        s = self.samples[i]
        return mask_crop(s.image, s.mask, self.cfg.resolution, self.cfg.padding, self.cfg.augment, rng)

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
        if self.last_validation and Path(self.last_validation).name == f"{Checkpoints.name(self.step)}.png":
            shutil.copyfile(self.last_validation, folder / "validation.png")
        write_trainer_state(folder, "lora", self.step, self.losses, groups, damage_types=self.types,
                            config=self.cfg.to_dict())

    def _resume(self, unet, opt) -> bool:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file
        last = self.ckpt.latest() if self.cfg.resume else None
        if last is None:
            return False
        state = read_trainer_state(last)
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
        self._restore(last, opt, state)
        return True

    # -- loop ------------------------------------------------------------------------------------
    def run(self, progress: ProgressFn | None = None, cancelled: CancelFn | None = None) -> TrainResult:
        """Add LoRA adapters (and the damage table) to the frozen model, resume from the latest
        checkpoint, train until ``max_steps`` / ``minutes`` / cancel; checkpoint every
        ``checkpoint_every`` steps and at the end."""
        c = self.cfg
        acc = self._open()
        report(progress, 0.0, "loading the SD inpainting model")
        parts = self._build(acc)
        self._resume(parts.unet, parts.opt)
        self._prepare(acc, parts)
        rng = np.random.default_rng([c.seed, self.step])
        gen = torch.Generator(device="cpu").manual_seed(c.seed * 100003 + self.step)
        self._begin(progress, cancelled)

        report(progress, 0.0, f"training LoRA from step {self.step} on {len(self.samples)} samples")
        stopped = self._loop(
            acc, parts.unet, lambda: self._micro_step(acc, parts, rng, gen),
            save=lambda: self._save(acc, lambda f: self._write(f, acc.unwrap_model(parts.unet), parts.opt)),
            validate=lambda unet: self.validation_grid(parts.vae, unet, parts.sched))
        return self._result(stopped)

    def _build(self, acc) -> TrainParts:
        """The frozen VAE / U-Net with fresh LoRA adapters, the damage table, AdamW (not yet
        wrapped by Accelerate)."""
        from peft import LoraConfig
        from pipelines.inpaint import DamageEmbedding
        c = self.cfg
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
        if self.damage_table:
            self.embedding = DamageEmbedding(self.types, c.embedding_tokens, D, c.seed)
            self.embedding.table.to(acc.device)
            groups.append({"params": list(self.embedding.table.parameters()), "lr": c.embedding_learning_rate})
        opt = torch.optim.AdamW(groups, weight_decay=1e-2)
        return TrainParts(vae, unet, sched, opt, dtype, D)

    def _prepare(self, acc, parts: TrainParts) -> None:
        """Wrap U-Net, table and optimizer with Accelerate (after resuming)."""
        if self.embedding is not None:
            parts.unet, parts.table, parts.opt = acc.prepare(parts.unet, self.embedding.table, parts.opt)
        else:
            parts.unet, parts.opt = acc.prepare(parts.unet, parts.opt)
        parts.sf = float(getattr(parts.vae.config, "scaling_factor", 0.18215))
        parts.alphas = parts.sched.alphas_cumprod.to(acc.device)

    def _micro_step(self, acc, parts: TrainParts, rng: np.random.Generator, gen: torch.Generator) -> float:
        """One batch forward/backward (an optimizer step when the accumulation is complete)."""
        with acc.accumulate(parts.unet):
            img, m, ids, cols = self.batch(rng)
            img, m, ids, cols = (img.to(acc.device, parts.dtype), m.to(acc.device, parts.dtype),
                                 ids.to(acc.device), cols.to(acc.device))
            loss = self._loss(acc, parts, img, m, ids, cols, gen)
            acc.backward(loss)
            if acc.sync_gradients:
                acc.clip_grad_norm_([p for g in parts.opt.param_groups for p in g["params"]], 1.0)
            parts.opt.step()
            parts.opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def _loss(self, acc, parts: TrainParts, img, m, ids, cols, gen: torch.Generator) -> torch.Tensor:
        """Steps 1-4 of the module docstring: ``img [B x 3 x r x r]``, ``m [B x 1 x r x r]``."""
        c, vae, sched, sf, dtype = self.cfg, parts.vae, parts.sched, parts.sf, parts.dtype
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
        enc, extra = self._conditioning(acc, parts, ids)
        pred = parts.unet(torch.cat([noisy, m_in, mlat], 1), t, encoder_hidden_states=enc, **extra).sample
        # 4. the loss, weighted towards (or restricted to) the mask
        target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(lat, noise, t)
        w = m_w if c.focus == "restricted" else 1.0 + c.mask_weight * m_w
        w = w.expand_as(pred)
        loss = (w * (pred.float() - target.float()) ** 2).sum() / w.sum().clamp_min(1.0)
        return self._add_losses(loss, parts, noisy, pred, t, m, cols)

    def _add_losses(self, loss: torch.Tensor, parts: TrainParts, noisy, pred, t, m, cols) -> torch.Tensor:
        """The step's loss plus a subclass's own terms (the wall trainer's LAB colour loss); here
        the loss as it is."""
        return loss

    def _conditioning(self, acc, parts: TrainParts, ids) -> tuple[torch.Tensor, dict]:
        """``encoder_hidden_states [B x T x D]`` of a batch and extra U-Net keyword arguments
        (the wall trainer adds ``added_cond_kwargs``): the damage table's rows."""
        return parts.table(ids).view(len(ids), self.cfg.embedding_tokens, parts.cross_dim).to(parts.dtype), {}

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
            rows.append(validation_row(pipe, [crop, np.repeat(mask[..., None], 3, 2)], c.validation_seeds,
                                       prompt_embeds=cond, negative_prompt_embeds=torch.zeros_like(cond),
                                       image=Image.fromarray(crop), mask_image=Image.fromarray(mask),
                                       height=c.resolution, width=c.resolution,
                                       num_inference_steps=c.validation_steps,
                                       guidance_scale=c.validation_guidance))
        return save_validation_grid(self.out, self.step, np.concatenate(rows, 0))


def train_lora(cfg: LoraTrainConfig, samples: Sequence, progress: ProgressFn | None = None,
               cancelled: CancelFn | None = None) -> TrainResult:
    """Train (or resume) LoRA + damage embedding; see :class:`LoraTrainer` for live losses."""
    return LoraTrainer(cfg, samples).run(progress, cancelled)


def run_from_config(cfg: LoraTrainConfig, progress: ProgressFn | None = None,
                    cancelled: CancelFn | None = None) -> TrainResult:
    """Load ``cfg.data`` (real defects of the chosen types + ``extra_data``) and train
    (``TRAINERS["lora"]``, :mod:`pipelines.training.trainers`)."""
    return train_lora(cfg, load_training_samples(cfg), progress, cancelled)
