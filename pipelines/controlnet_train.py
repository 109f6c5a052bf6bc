"""ControlNet fine-tuning on a product's reference defects, the defect mask as the control image.

The SD 1.5 model stays frozen (VAE, U-Net, text encoder); only a diffusers ``ControlNetModel``
trains. It starts from the U-Net (``ControlNetModel.from_unet``: encoder blocks copied, zero
convolutions at zero) or from given ControlNet weights (``controlnet=<folder>``), and learns to
place a defect where the mask says. The control image is exactly what the ``controlnet`` /
``controlnet-full`` generators feed at inference: :func:`pipelines.controlnet.mask_control_image`
(defect white on black, RGB, in [0, 1]).

Two base models, the same trainer:

* an **inpainting** folder (9-channel U-Net, the ``controlnet`` generator's model): the U-Net sees
  ``cat[noisy, mask, masked-image latents]`` as in the pipeline, the ControlNet sees the 4 noisy
  latents only (what ``StableDiffusionControlNetInpaintPipeline`` feeds it), so ``from_unet`` keeps
  the first 4 input channels of the U-Net's ``conv_in``;
* a **base** folder (4-channel U-Net, the ``controlnet-full`` generator's model): plain text-to-image
  ControlNet training as diffusers' ``train_controlnet.py``.

One step (numbered as in :meth:`ControlNetTrainer._loss`)::

    1. latents = vae.encode(crop)·sf    [B x 4 x h x w]   (+ masked-image latents and the mask: inpainting)
    2. noisy   = scheduler.add_noise(latents, ε, t),  t ~ U[0, T)
    3. down, mid = controlnet(noisy, t, text, controlnet_cond = mask control image [B x 3 x r x r])
    4. pred    = unet(unet_input, t, text, down/mid residuals)          (the U-Net frozen)
    5. loss    = mean(w · (pred − target)²), target = ε or v (the scheduler's prediction_type),
                 w = 1 + mask_weight · mask (mask_weight 0: plain MSE, as diffusers)

The text condition is the model's own text encoder on the damage prompt (``"<type> defect"``, as
the generators use), encoded once; a folder without text encoder / tokenizer trains with the
unconditional (all-zero) embedding. Training crops are the box around the mask (``padding`` px of
context, as the generators' ``only_masked`` mode), augmented with :mod:`pipelines.augment`.

Accelerate, the budget, atomic checkpoints, resume, cancel, the loss history and the result are
:mod:`pipelines.training` (:class:`~pipelines.training.CheckpointedTrainer`), as for LoRA. One
checkpoint is a diffusers ControlNet folder plus the trainer's state::

    OUT/checkpoints/step-0000200/
        config.json + diffusion_pytorch_model.safetensors   ControlNetModel.from_pretrained(<this folder>)
        optimizer.safetensors, trainer_state.json            resume
        validation.png                                       the validation grid of this step (if made)
    OUT/training_data.json                                   reference defects trained on (run_from_config)

Pass the checkpoint (or ``OUT``: its latest checkpoint) as ``controlnet=`` to the ``controlnet`` /
``controlnet-full`` generators. Never imports gradio or ``studio``.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipelines import masks as mk
from pipelines.lora import mask_crop
from pipelines.training import (CancelFn, CheckpointedTrainer, CheckpointError, Checkpoints, ConfigError,
                                ProgressFn, RunConfig, Sample, TrainResult, check,
                                check_samples, load_training_samples, read_trainer_state, report,
                                save_optimizer, save_validation_grid, validation_row, write_trainer_state)

KIND = "controlnet"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


@dataclass
class ControlNetTrainConfig(RunConfig):
    """A ControlNet run: the run fields of :class:`pipelines.training.RunConfig` and the fields below."""
    what: ClassVar[str] = "ControlNet"

    data: str | None = None                # MVTec-layout category (for run_from_config / the CLI)
    damage_types: list | None = None       # None: every type with reference samples
    resolution: int = 512                  # training crops (px), the generators' working size
    learning_rate: float = 1e-5            # diffusers' train_controlnet.py default
    mask_weight: float = 0.0               # loss weight 1 + mask_weight·mask (0: plain MSE)
    model: str | None = None               # SD 1.5 folder: inpainting (default $DEFECT_STUDIO_SD_INPAINT) or base
    controlnet: str | None = None          # start from these ControlNet weights (None: from the U-Net)
    padding: int = 32                      # context around the mask (px), as only_masked
    validation_seeds: list = field(default_factory=lambda: [0, 1])
    validation_count: int = 3
    validation_guidance: float = 3.0

    def validate(self) -> None:
        super().validate()
        check(self.resolution >= 64 and self.resolution % 8 == 0,
              f"resolution must be ≥ 64 and a multiple of 8, got {self.resolution}")
        check(self.padding >= 0, f"padding must be ≥ 0, got {self.padding}")
        check(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        check(self.mask_weight >= 0, f"mask_weight must be ≥ 0, got {self.mask_weight}")
        check(self.validate_every >= 0, f"validate_every must be ≥ 0, got {self.validate_every}")
        check(self.validation_count >= 1 and len(self.validation_seeds) >= 1,
              "validation needs at least one mask and one seed")


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------
def load_components(model: str | None):
    """``(folder, vae, unet, scheduler, text_encoder | None, tokenizer | None)`` of an SD 1.5 folder
    (inpainting or base), fresh instances; the text parts are None when the folder has none."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from pipelines import models
    folder = models.resolve("sd-inpaint", model)
    try:
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True)
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True)
        sched = DDPMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
    except Exception as exc:   # noqa: BLE001 — diffusers raises many types; one message
        raise models.wrap_load_error("the SD 1.5 model", folder, exc) from exc
    if int(unet.config.in_channels) not in (4, 9):
        raise models.ModelError(f"{folder} has a U-Net with {unet.config.in_channels} input channels; "
                                "ControlNet training needs an SD 1.5 base (4) or inpainting (9) U-Net")
    text_encoder = tokenizer = None
    if (folder / "text_encoder").is_dir() and (folder / "tokenizer").is_dir():
        from transformers import CLIPTextModel, CLIPTokenizer
        try:
            text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", local_files_only=True)
            tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True)
        except Exception as exc:   # noqa: BLE001
            raise models.wrap_load_error("the SD 1.5 text encoder", folder, exc) from exc
    return folder, vae, unet, sched, text_encoder, tokenizer


def controlnet_from_unet(unet, seed: int = 0):
    """``ControlNetModel.from_unet`` with 4 latent input channels: for a 9-channel inpainting U-Net
    the ControlNet still sees only the noisy latents (as the inpaint pipeline feeds it), so its
    ``conv_in`` keeps the U-Net's first 4 input channels."""
    from diffusers import ControlNetModel
    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(unet)
    if int(unet.config.in_channels) != 4:
        old = unet.conv_in
        conv = torch.nn.Conv2d(4, old.out_channels, old.kernel_size, old.stride, old.padding)
        with torch.no_grad():
            conv.weight.copy_(old.weight[:, :4])
            conv.bias.copy_(old.bias)
        net.conv_in = conv
        net.register_to_config(in_channels=4)
    return net


def load_controlnet_weights(source: str | Path, unet):
    """A ControlNetModel from a diffusers folder (or a training run: its latest checkpoint), checked
    against the U-Net it will steer."""
    from diffusers import ControlNetModel
    from pipelines.training import latest_checkpoint
    p = Path(source).expanduser()
    folder = latest_checkpoint(p) if (p / "checkpoints").is_dir() else p
    if folder is None or not (folder / "config.json").is_file():
        raise ConfigError(f"controlnet: {source} is not a diffusers ControlNet folder (no config.json)")
    try:
        net = ControlNetModel.from_pretrained(folder, local_files_only=True)
    except Exception as exc:   # noqa: BLE001
        raise ConfigError(f"controlnet: cannot load {folder} ({type(exc).__name__}: {str(exc)[:200]})") from exc
    if int(net.config.cross_attention_dim) != int(unet.config.cross_attention_dim):
        raise ConfigError(f"controlnet: {folder} has cross_attention_dim {net.config.cross_attention_dim}, "
                          f"the U-Net {unet.config.cross_attention_dim} — it is for another base model")
    if int(net.config.in_channels) != 4:
        raise ConfigError(f"controlnet: {folder} takes {net.config.in_channels} input channels, not the 4 "
                          "noisy latents an SD 1.5 ControlNet takes")
    return net


@dataclass
class _Parts:
    """The models of one run (``net``/``opt`` wrapped by Accelerate after ``_prepare``)."""
    vae: Any
    unet: Any
    net: Any
    sched: Any
    opt: Any
    dtype: torch.dtype
    text: dict                         # damage type → [1 x L x D] embedding (frozen)
    inpaint: bool                      # 9-channel U-Net
    sf: float = 0.18215


# ------------------------------------------------------------------------------------------------
# The trainer
# ------------------------------------------------------------------------------------------------
class ControlNetTrainer(CheckpointedTrainer):
    """ControlNet fine-tuning (see the module docstring).

    ``samples``: ``[(image H×W×3 uint8, mask H×W uint8, damage_type)]`` — reference defects only
    (:func:`run_from_config` reads them through :mod:`pipelines.roles`)."""

    def __init__(self, cfg: ControlNetTrainConfig, samples: Sequence):
        from pipelines.generators.base import check_image
        super().__init__(cfg)
        self.types = check_samples(samples, cfg.damage_types, where="the training samples")
        self.samples = [Sample(check_image(s[0]), mk.to_binary(s[1]), s[2]) for s in samples
                        if s[2] in self.types]
        self.conditioning = "unconditional"

    # -- data --------------------------------------------------------------------------------------
    def example(self, i: int, rng: np.random.Generator | None):
        """Sample ``i`` → ``(image [3 x r x r] in [-1, 1], mask [1 x r x r] {0, 1})``: the box
        around the mask resized to ``resolution``; augmented when ``rng`` is given."""
        s = self.samples[i]
        return mask_crop(s.image, s.mask, self.cfg.resolution, self.cfg.padding, self.cfg.augment, rng)

    def batch(self, rng: np.random.Generator):
        idx = rng.integers(len(self.samples), size=self.cfg.batch_size)
        ex = [self.example(int(i), rng) for i in idx]
        return (torch.stack([e[0] for e in ex]), torch.stack([e[1] for e in ex]),
                [self.samples[int(i)].damage_type for i in idx])

    # -- checkpoints ---------------------------------------------------------------------------------
    def _write(self, folder: Path, net, opt) -> None:
        net.save_pretrained(folder, safe_serialization=True)     # config.json + diffusion_pytorch_model.safetensors
        groups = save_optimizer(opt, folder)
        if self.last_validation and Path(self.last_validation).name == f"{Checkpoints.name(self.step)}.png":
            shutil.copyfile(self.last_validation, folder / "validation.png")
        write_trainer_state(folder, KIND, self.step, self.losses, groups, damage_types=self.types,
                            conditioning=self.conditioning, config=self.cfg.to_dict())

    def _resume(self, net, opt) -> bool:
        from safetensors.torch import load_file
        last = self.ckpt.latest() if self.cfg.resume else None
        if last is None:
            return False
        state = read_trainer_state(last)
        if state.get("kind") != KIND or state.get("damage_types") != self.types:
            raise CheckpointError(f"{self.out} holds a {state.get('kind')} run for {state.get('damage_types')}; "
                                  f"this run trains a ControlNet on {self.types} — use a new output_dir or "
                                  "resume: false")
        try:
            net.load_state_dict(load_file(str(last / WEIGHTS_FILE)), strict=True)
        except Exception as exc:   # noqa: BLE001
            raise CheckpointError(f"cannot resume from {last}: its ControlNet does not fit this model "
                                  f"({type(exc).__name__}: {str(exc)[:200]})") from exc
        self._restore(last, opt, state)
        return True

    # -- loop ------------------------------------------------------------------------------------
    def run(self, progress: ProgressFn | None = None, cancelled: CancelFn | None = None) -> TrainResult:
        """Build the ControlNet, resume from the latest checkpoint, train until ``max_steps`` /
        ``minutes`` / cancel; checkpoint every ``checkpoint_every`` steps and at the end (a cancel
        stops after the current step and saves a complete checkpoint)."""
        c = self.cfg
        acc = self._open()
        report(progress, 0.0, "loading the SD 1.5 model")
        parts = self._build(acc)
        self._resume(parts.net, parts.opt)
        parts.net, parts.opt = acc.prepare(parts.net, parts.opt)
        rng = np.random.default_rng([c.seed, self.step])
        gen = torch.Generator(device="cpu").manual_seed(c.seed * 100003 + self.step)
        self._begin(progress, cancelled)

        report(progress, 0.0, f"training the ControlNet from step {self.step} on {len(self.samples)} samples")
        stopped = self._loop(
            acc, parts.net, lambda: self._micro_step(acc, parts, rng, gen),
            save=lambda: self._save(acc, lambda f: self._write(f, acc.unwrap_model(parts.net), parts.opt)),
            validate=lambda net: self.validation_grid(parts, net))
        return self._result(stopped)

    def _build(self, acc) -> _Parts:
        """Frozen VAE / U-Net, the damage prompts' text embeddings, the trainable ControlNet, AdamW."""
        c = self.cfg
        folder, vae, unet, sched, text_encoder, tokenizer = load_components(c.model)
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(acc.mixed_precision, torch.float32)
        vae.requires_grad_(False)
        unet.requires_grad_(False)
        net = load_controlnet_weights(c.controlnet, unet) if c.controlnet else controlnet_from_unet(unet, c.seed)
        net.requires_grad_(True)
        net.to(acc.device)                                    # trainable weights stay fp32
        for mod in (vae, unet):
            mod.to(acc.device) if dtype == torch.float32 else mod.to(acc.device, dtype)
        text = self._text_embeddings(text_encoder, tokenizer, int(unet.config.cross_attention_dim))
        opt = torch.optim.AdamW(net.parameters(), lr=c.learning_rate, weight_decay=1e-2)
        return _Parts(vae, unet, net, sched, opt, dtype, {k: v.to(acc.device, dtype) for k, v in text.items()},
                      int(unet.config.in_channels) == 9, float(getattr(vae.config, "scaling_factor", 0.18215)))

    def _text_embeddings(self, text_encoder, tokenizer, dim: int) -> dict:
        """damage type → ``[1 x L x D]``: the text encoder on the damage prompt, or zeros ``[1 x 77 x D]``."""
        from pipelines.inpaint import damage_prompt
        if text_encoder is None:
            self.conditioning = "unconditional"
            return {t: torch.zeros(1, 77, dim) for t in self.types}
        self.conditioning = "text"
        out = {}
        with torch.no_grad():
            for t in self.types:
                ids = tokenizer(damage_prompt(t), padding="max_length", max_length=tokenizer.model_max_length,
                                truncation=True, return_tensors="pt").input_ids
                out[t] = text_encoder(ids)[0].float()
        return out

    def _micro_step(self, acc, parts: _Parts, rng: np.random.Generator, gen: torch.Generator) -> float:
        with acc.accumulate(parts.net):
            img, m, types = self.batch(rng)
            img, m = img.to(acc.device, parts.dtype), m.to(acc.device, parts.dtype)
            loss = self._loss(acc, parts, img, m, types, gen)
            acc.backward(loss)
            if acc.sync_gradients:
                acc.clip_grad_norm_(parts.net.parameters(), 1.0)
            parts.opt.step()
            parts.opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def _loss(self, acc, parts: _Parts, img, m, types, gen: torch.Generator) -> torch.Tensor:
        """Steps 1-5 of the module docstring: ``img [B x 3 x r x r]``, ``m [B x 1 x r x r]``."""
        sched, sf, dtype = parts.sched, parts.sf, parts.dtype
        B = len(img)
        # 1. latents (+ the masked image's latents and the mask at latent size: inpainting)
        with torch.no_grad():
            lat = parts.vae.encode(img).latent_dist.sample(gen) * sf
            mlat = parts.vae.encode(img * (m < 0.5)).latent_dist.sample(gen) * sf if parts.inpaint else None
        # 2. noise
        noise = torch.randn(lat.shape, generator=gen).to(acc.device, lat.dtype)
        t = torch.randint(0, sched.config.num_train_timesteps, (B,), generator=gen).to(acc.device)
        noisy = sched.add_noise(lat, noise, t)
        enc = torch.cat([parts.text[k] for k in types]).to(dtype)
        # 3. the ControlNet on the noisy latents and the mask control image (defect white, [0, 1])
        cond = m.expand(-1, 3, -1, -1).to(dtype)
        down, mid = parts.net(noisy, t, encoder_hidden_states=enc, controlnet_cond=cond, return_dict=False)
        # 4. the frozen U-Net with the ControlNet's residuals
        unet_in = torch.cat([noisy, F.interpolate(m, size=lat.shape[-2:]), mlat], 1) if parts.inpaint else noisy
        pred = parts.unet(unet_in, t, encoder_hidden_states=enc,
                          down_block_additional_residuals=[d.to(dtype) for d in down],
                          mid_block_additional_residual=mid.to(dtype)).sample
        # 5. the loss (optionally weighted towards the mask)
        target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(lat, noise, t)
        w = 1.0 + self.cfg.mask_weight * F.adaptive_max_pool2d(m, lat.shape[-2:]).float()
        w = w.expand_as(pred)
        return (w * (pred.float() - target.float()) ** 2).sum() / w.sum().clamp_min(1.0)

    @torch.no_grad()
    def validation_grid(self, parts: _Parts, net) -> Path:
        """Rows: the first ``validation_count`` samples (one per type first); columns: crop, control
        image, one generation per ``validation_seeds`` with the ControlNet being trained (the
        inpainting pipeline keeps the crop outside the mask). ``OUT/validation/step-NNNNNNN.png``."""
        import diffusers
        from diffusers import DDIMScheduler
        from PIL import Image
        from pipelines.controlnet import mask_control_image
        c = self.cfg
        cls = getattr(diffusers, "StableDiffusionControlNetInpaintPipeline" if parts.inpaint
                      else "StableDiffusionControlNetPipeline")
        pipe = cls(vae=parts.vae, text_encoder=None, tokenizer=None, unet=parts.unet, controlnet=net,
                   scheduler=DDIMScheduler.from_config(parts.sched.config), safety_checker=None,
                   feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        net.eval()
        order = sorted(range(len(self.samples)), key=lambda i: (self.samples[i].damage_type, i))
        picks, seen = [], set()
        for i in order:
            if self.samples[i].damage_type not in seen:
                picks.append(i)
                seen.add(self.samples[i].damage_type)
        picks += [i for i in order if i not in picks]
        rows = []
        for i in picks[: c.validation_count]:
            x, m = self.example(i, None)
            crop = ((x.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
            mask = (m[0].numpy() * 255).astype(np.uint8)
            control = Image.fromarray(mask_control_image(mask))
            cond = parts.text[self.samples[i].damage_type]
            kw = dict(prompt_embeds=cond, negative_prompt_embeds=torch.zeros_like(cond), height=c.resolution,
                      width=c.resolution, num_inference_steps=c.validation_steps,
                      guidance_scale=c.validation_guidance)
            if parts.inpaint:
                kw.update(image=Image.fromarray(crop), mask_image=Image.fromarray(mask), control_image=control)
            else:
                kw.update(image=control)
            rows.append(validation_row(pipe, [crop, mask_control_image(mask)], c.validation_seeds, **kw))
        return save_validation_grid(self.out, self.step, np.concatenate(rows, 0))


def train_controlnet(cfg: ControlNetTrainConfig, samples: Sequence, progress: ProgressFn | None = None,
                     cancelled: CancelFn | None = None) -> TrainResult:
    """Train (or resume) a ControlNet; see :class:`ControlNetTrainer` for live losses."""
    return ControlNetTrainer(cfg, samples).run(progress, cancelled)


def run_from_config(cfg: ControlNetTrainConfig, progress: ProgressFn | None = None,
                    cancelled: CancelFn | None = None) -> TrainResult:
    """Load ``cfg.data``'s reference defects of the chosen types (+ ``extra_data``), write
    ``OUT/training_data.json`` and train."""
    return train_controlnet(cfg, load_training_samples(cfg), progress, cancelled)
