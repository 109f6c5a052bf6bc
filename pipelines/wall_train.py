"""Wall-colour LoRA training (zero-prompt SD inpainting) and its validation protocol.

A subclass of :class:`pipelines.lora.LoraTrainer` (same LoRA adapters, loop, checkpoints,
Accelerate); what differs for walls:

* **Conditioning = generation's.** ``encoder_hidden_states`` is the empty prompt's encoding made by
  :func:`pipelines.inpaint.condition_embeddings` (``damage_type=None``) on the model folder's own
  text encoder — the function the ``wall`` generator calls — or zeros ``[1 x 77 x D]`` when the
  folder has no text encoder, exactly as generation does. Validation grids use it too.
* **Reference conditioning.** Each sample's solid colour reference (:func:`pipelines.color.
  solid_reference`, 512 px, noise σ 8, lighting gradient 0.95–1.05) is fed through IP-Adapter
  (``added_cond_kwargs={"image_embeds": …}``), loaded by :func:`pipelines.models.attach_ip_adapter`
  as in generation; IP-Adapter weights stay frozen, only LoRA trains. ``reference='auto'`` uses it
  when the weights are found (else the run notes it and trains unconditionally, as generation
  skips the reference), ``'ip-adapter'`` requires them, ``'none'`` is the unconditional ablation.
* **Random colours.** With probability ``random_color_prob`` (0.3) a sample's wall is recoloured
  (the ``wall-lab`` LAB recolour, shading kept) to a random sRGB colour and the reference shows
  that colour, so the model learns to follow the reference instead of copying the context.
* **Data.** Masks are eroded by ``wall_erode_px`` (5 px). The colour is the mask's dominant colour
  (``wall_color_method``); a mask with < ``min_mask_px`` (100) px after erosion falls back to the
  image's mean colour (the sample is kept). Quality gate (``wall_min_quality`` 0.6): a sample is
  kept when at least that share of its mask pixels grade *good* against its colour (per-pixel LAB
  distance < 15, the :data:`pipelines.color.GRADES` threshold) — a mask leaking onto furniture or
  windows fails; fallback samples are kept ungated.
* **Validation** (every ``validate_every`` steps and once before the first step — the untrained
  baseline, step 0): the grid ``OUT/validation/step-N.png`` (columns: crop, mask, reference,
  depth, one output per seed) and a line per step in ``OUT/validation/color_metrics.jsonl``:
  mean LAB distance, hue error (°), ΔE2000 (``skimage.color.deltaE_ciede2000``) of the raw
  diffusion output inside the mask vs the target colour, and their grade (:func:`pipelines.color.
  grade`). The depth column is a classical proxy — no depth model ships offline: the large-scale
  shading (L* blurred with σ = crop/16, normalised), which on a wall follows its distance and
  orientation to the light; it is not a depth estimate.
* :func:`run_ablation`: the baseline and four variants (``kmeans`` dominant colour,
  ``color-loss``, ``no-texture`` flat reference, ``unconditional``) on one budget → a table.

Data from a folder (:func:`wall_samples_from_folder`): ``DATA/images/*`` + ``DATA/masks/*`` (mask
``<stem>.png`` or ``<stem>_mask.png``), or photos with ``<stem>_mask.png`` side by side.
Never imports gradio or ``studio``.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, Sequence

import cv2
import numpy as np
import torch

from pipelines import masks as mk
from pipelines.color import (GRADES, as_rgb, color_metrics, dominant_color, grade, rgb_to_lab,
                             solid_reference, to_hex)
from pipelines.fileio import atomic_write_text
from pipelines.lora import LoraTrainConfig, LoraTrainer, TrainParts, mask_crop
from pipelines.training import (CancelFn, ConfigError, ProgressFn, Sample, TrainDataError, TrainResult,
                                check, check_cancelled, report, save_validation_grid)
from pipelines.wall import ABLATIONS

METRICS_FILE = "color_metrics.jsonl"
REFERENCE_MODES = ("auto", "ip-adapter", "none")
IMAGE_EXT = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")


@dataclass
class WallTrainConfig(LoraTrainConfig):
    """A wall-colour run (``TRAINERS["wall"]``): the LoRA config's fields and the wall's below."""
    what: ClassVar[str] = "wall LoRA"

    data: str | None = None                # a folder of wall photos + masks (wall_samples_from_folder)
    color_loss_weight: float = 0.0         # LAB colour-consistency loss weight
    wall_color_method: str = "median"      # dominant colour: median | mean | kmeans
    wall_erode_px: float = 5.0             # erode wall masks to drop segmentation noise
    wall_min_quality: float = 0.6          # keep a sample when >= this share of its mask grades good
    masks: str | None = None               # masks folder (default DATA/masks, or <stem>_mask.png beside)
    random_color_prob: float = 0.3         # share of samples recoloured to a random colour
    reference: str = "auto"                # auto | ip-adapter | none (IP-Adapter colour reference)
    ip_adapter: str | None = None          # IP-Adapter folder (default $DEFECT_STUDIO_IP_ADAPTER)
    ip_adapter_scale: float = 0.6
    reference_size: int = 512              # solid reference (px), as generation
    reference_texture: bool = True         # noise σ 8 + gradient 0.95-1.05 (False: flat; an ablation)
    min_mask_px: int = 100                 # fewer after erosion: the colour is the image's mean
    validation_colors: list = field(default_factory=list)  # '#RRGGBB' targets per row (default: own)
    validation_guidance: float | None = None  # None: as generation (1.0, 5.0 with IP-Adapter)

    def validate(self) -> None:
        super().validate()
        check(self.color_loss_weight >= 0, f"color_loss_weight must be ≥ 0, got {self.color_loss_weight}")
        check(self.wall_color_method in ("median", "mean", "kmeans"),
              f"wall_color_method must be median, mean or kmeans, got {self.wall_color_method!r}")
        check(0.0 <= self.wall_min_quality <= 1.0, "wall_min_quality must be in [0, 1]")
        check(0.0 <= self.random_color_prob <= 1.0,
              f"random_color_prob must be in [0, 1], got {self.random_color_prob}")
        check(self.reference in REFERENCE_MODES,
              f"reference must be one of {', '.join(REFERENCE_MODES)}, got {self.reference!r}")
        check(self.wall_erode_px >= 0, f"wall_erode_px must be ≥ 0, got {self.wall_erode_px}")
        check(self.min_mask_px >= 1, f"min_mask_px must be ≥ 1, got {self.min_mask_px}")
        check(self.reference_size >= 32, f"reference_size must be ≥ 32, got {self.reference_size}")
        if isinstance(self.validation_colors, str):
            self.validation_colors = [c for c in self.validation_colors.split(",") if c.strip()]
        for c in self.validation_colors:
            try:
                as_rgb(c)
            except ValueError as exc:
                raise ConfigError(f"validation_colors: {exc}") from None


def wall_config(cfg) -> WallTrainConfig:
    """A :class:`WallTrainConfig` from itself or a LoRA config (its keys kept)."""
    return cfg if isinstance(cfg, WallTrainConfig) else WallTrainConfig.from_dict(cfg.to_dict())


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
class WallSample(NamedTuple):
    image: np.ndarray        # H x W x 3 uint8
    mask: np.ndarray         # the training mask (eroded), H x W uint8 {0, 255}
    full_mask: np.ndarray    # the mask as given (random-colour recolouring paints all of it)
    color: tuple             # the wall's RGB colour
    quality: float           # share of mask pixels graded good against ``color``
    fallback: bool           # True: mask < min_mask_px after erosion, colour = the image's mean


def wall_quality(image: np.ndarray, mask: np.ndarray, color) -> float:
    """Share (0..1) of the mask's pixels whose LAB distance to ``color`` is below the *good* grade's
    threshold (15): how much of the mask really is the wall's colour."""
    px = np.asarray(image)[..., :3][mk.to_binary(mask) > 0]
    if len(px) == 0:
        return 0.0
    d = np.linalg.norm(rgb_to_lab(px) - rgb_to_lab(np.array(as_rgb(color), np.uint8)), axis=1)
    return float((d < GRADES[1][1]).mean())


def prepare_wall_samples(samples: Sequence, method: str = "median", erode_px: float = 5.0,
                         min_quality: float = 0.6, min_px: int = 100) -> list[WallSample]:
    """Per ``(image, wall mask, …)``: the mask eroded by ``erode_px``, its dominant colour (a mask of
    fewer than ``min_px`` px after erosion: the image's mean colour, sample kept), the quality
    gate (:func:`wall_quality` ≥ ``min_quality``). Every sample dropped → :class:`TrainDataError`."""
    out, dropped = [], []
    for i, s in enumerate(samples):
        img, m = np.asarray(s[0]), mk.to_binary(s[1])
        if img.ndim != 3 or img.shape[:2] != m.shape:
            raise TrainDataError(f"sample {i}: image {img.shape[:2]} and mask {m.shape} differ in size")
        if not m.any():
            dropped.append(f"{i} (empty mask)")
            continue
        er = mk.erode(m, erode_px)
        if np.count_nonzero(er) < min_px:
            use = er if er.any() else m
            rgb = tuple(int(round(float(v))) for v in img[..., :3].reshape(-1, 3).mean(axis=0))
            out.append(WallSample(img, use, m, rgb, wall_quality(img, use, rgb), True))
            continue
        rgb = dominant_color(img, er, method)
        q = wall_quality(img, er, rgb)
        if q < min_quality:
            dropped.append(f"{i} (quality {q:.2f})")
            continue
        out.append(WallSample(img, er, m, rgb, q, False))
    if not out:
        raise TrainDataError(f"every wall sample was dropped ({', '.join(dropped[:10])}): less than "
                             f"{min_quality:.0%} of each mask is the wall's colour — fix the masks or "
                             "lower wall_min_quality")
    return out


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXT and p.is_file())


def wall_samples_from_folder(folder: str | Path, masks: str | Path | None = None,
                             size: int | None = None) -> list[Sample]:
    """Photos + wall masks → ``[Sample(image, mask, 'wall')]``. Layouts: ``folder/images`` +
    ``folder/masks`` (or ``masks``), masks named ``<stem>.png`` / ``<stem>_mask.png`` (any image
    extension); or photos beside ``<stem>_mask.png``. ``size``: the long side is resized to it.
    A photo without a mask, or no photo at all → :class:`TrainDataError`."""
    from pipelines.imageio import read_mask, read_rgb
    folder = Path(folder)
    if not folder.is_dir():
        raise TrainDataError(f"the wall photo folder {folder} does not exist")
    img_dir = folder / "images" if (folder / "images").is_dir() else folder
    mask_dir = Path(masks) if masks else (folder / "masks" if (folder / "masks").is_dir() else img_dir)
    if not mask_dir.is_dir():
        raise TrainDataError(f"the wall mask folder {mask_dir} does not exist")
    by_stem = {p.stem: p for p in _image_files(mask_dir)}
    photos = [p for p in _image_files(img_dir) if not p.stem.endswith("_mask")]
    if not photos:
        raise TrainDataError(f"no photos in {img_dir} (expected {', '.join(IMAGE_EXT)} files)")
    out, missing = [], []
    for p in photos:
        mp = by_stem.get(f"{p.stem}_mask") or (by_stem.get(p.stem) if mask_dir != img_dir else None)
        if mp is None:
            missing.append(p.name)
            continue
        img, m = read_rgb(p), read_mask(mp)
        if img.shape[:2] != m.shape:
            raise TrainDataError(f"{mp.name} is {m.shape[1]}×{m.shape[0]} px but {p.name} is "
                                 f"{img.shape[1]}×{img.shape[0]} px")
        if size and max(img.shape[:2]) != size:
            s = size / max(img.shape[:2])
            wh = (max(8, round(img.shape[1] * s)), max(8, round(img.shape[0] * s)))
            img = cv2.resize(img, wh, interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC)
            m = cv2.resize(m, wh, interpolation=cv2.INTER_NEAREST)
        out.append(Sample(img, m, "wall"))
    if missing:
        raise TrainDataError(f"no mask for {len(missing)} photo(s) in {mask_dir}: {', '.join(missing[:5])} "
                             "(name masks <stem>_mask.png or put them in masks/<stem>.png)")
    return out


def random_color(rng: np.random.Generator) -> tuple[int, int, int]:
    """A random sRGB colour, uniform per channel."""
    return tuple(int(v) for v in rng.integers(0, 256, 3))  # type: ignore[return-value]


def depth_proxy(image: np.ndarray) -> np.ndarray:
    """A classical stand-in for a depth map (no depth model offline): the large-scale shading —
    L* blurred with σ = min(H, W)/16, normalised to 0..255 — as an ``H x W x 3 uint8`` picture."""
    L = rgb_to_lab(image)[..., 0].astype(np.float32)
    L = cv2.GaussianBlur(L, (0, 0), max(1.0, min(L.shape) / 16.0))
    L = (L - L.min()) / max(float(np.ptp(L)), 1e-6)
    return np.repeat(np.round(L * 255).astype(np.uint8)[..., None], 3, 2)


# ------------------------------------------------------------------------------------------------
# Colour metrics rows (the validation file; also used by benchmarks/wall_colour.py)
# ------------------------------------------------------------------------------------------------
def metrics_row(step: int, results: Sequence[tuple[np.ndarray, np.ndarray, Any]], **extra) -> dict:
    """One line of ``color_metrics.jsonl`` from ``[(output image, mask, target colour)]``: the means
    of ``lab_distance``, ``hue_error_deg``, ``delta_e2000``, the grade of those means, the share
    of outputs graded good or better, and each output's own figures (``items``)."""
    items = []
    for out, m, target in results:
        cm = color_metrics(out, m, target)
        items.append({"target": to_hex(as_rgb(target)), "lab_distance": round(cm["lab_distance"], 3),
                      "hue_error_deg": round(cm["hue_error_deg"], 3),
                      "delta_e2000": round(cm["delta_e2000"], 3),
                      "chroma_diff": round(cm["chroma_diff"], 3), "grade": grade(cm)})
    if not items:
        raise ValueError("no outputs to measure")
    mean = {k: float(np.mean([it[k] for it in items])) for k in ("lab_distance", "hue_error_deg", "delta_e2000")}
    return {"step": int(step), **{k: round(v, 3) for k, v in mean.items()}, "grade": grade(mean),
            "good_share": round(float(np.mean([it["grade"] != "poor" for it in items])), 3),
            "n": len(items), **extra, "items": items}


def append_metrics(out_dir: str | Path, row: dict) -> Path:
    """Append ``row`` to ``OUT/validation/color_metrics.jsonl`` (rewritten atomically; a row of
    the same step replaces the old one, e.g. after a resume)."""
    path = Path(out_dir) / "validation" / METRICS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [r for r in read_metrics(out_dir) if r["step"] != row["step"]] + [row]
    rows.sort(key=lambda r: r["step"])
    return atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_metrics(out_dir: str | Path) -> list[dict]:
    """The rows of ``OUT/validation/color_metrics.jsonl`` (``[]`` when there are none)."""
    path = Path(out_dir) / "validation" / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def metrics_table(rows: Sequence[dict], label: str = "step") -> str:
    """A Markdown table of metrics rows (``label`` names the first column's key)."""
    lines = [f"| {label} | LAB distance | hue error (°) | ΔE2000 | grade | good share |",
             "|---|---:|---:|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r.get(label, r['step'])} | {r['lab_distance']:.2f} | {r['hue_error_deg']:.2f} | "
                     f"{r['delta_e2000']:.2f} | {r['grade']} | {r['good_share']:.2f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# The trainer
# ------------------------------------------------------------------------------------------------
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


def _text_parts(folder: Path):
    """``(text_encoder, tokenizer)`` of an SD folder, or ``(None, None)`` when it has none."""
    if not ((folder / "text_encoder").is_dir() and (folder / "tokenizer").is_dir()):
        return None, None
    from transformers import CLIPTextModel, CLIPTokenizer
    from pipelines import models
    try:
        return (CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", local_files_only=True),
                CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True))
    except Exception as exc:   # noqa: BLE001 — one message for every loading failure
        raise models.wrap_load_error("the SD text encoder", folder, exc) from exc


class WallTrainer(LoraTrainer):
    """Wall-colour LoRA (see the module docstring). ``samples``: ``[(image, wall mask, _)]``;
    ``self.notes`` says what the run could not do (e.g. no IP-Adapter weights)."""
    damage_table = False        # the empty conditioning of generation, no table of damage types

    def __init__(self, cfg, samples: Sequence):
        from pipelines.classical import LabRecolorGenerator
        from pipelines.generators.base import check_image
        cfg = wall_config(cfg)
        super().__init__(cfg, samples)
        self.wall = prepare_wall_samples(samples, cfg.wall_color_method, cfg.wall_erode_px,
                                         cfg.wall_min_quality, cfg.min_mask_px)
        self.types = []
        self.samples = [Sample(check_image(w.image), w.mask, "wall") for w in self.wall]
        self.colors = [w.color for w in self.wall]
        self.recolor = LabRecolorGenerator()
        self.notes: list[str] = []
        self.pipe = None            # the validation pipeline (shares the trained U-Net)
        self.empty = None           # [1 x 77 x D]: generation's empty conditioning
        self.ip = False             # IP-Adapter reference conditioning active
        self._refs: list[np.ndarray] = []

    # -- data --------------------------------------------------------------------------------------
    def reference(self, color, seed: int) -> np.ndarray:
        """The solid colour reference of generation (flat when ``reference_texture`` is off)."""
        c = self.cfg
        sigma, grad = (8, (0.95, 1.05)) if c.reference_texture else (0, (1.0, 1.0))
        return solid_reference(color, c.reference_size, sigma, grad, seed=seed)

    def crop(self, img: np.ndarray, m: np.ndarray, rng: np.random.Generator | None):
        """``(image [3 x r x r] in [-1, 1], mask [1 x r x r])``: :func:`pipelines.lora.mask_crop`."""
        return mask_crop(img, m, self.cfg.resolution, self.cfg.padding, self.cfg.augment, rng)

    def example(self, i: int, rng: np.random.Generator | None):
        return self.crop(self.samples[i].image, self.samples[i].mask, rng)

    def batch(self, rng: np.random.Generator):
        """Like :meth:`LoraTrainer.batch`; a sample is recoloured to a random colour with
        probability ``random_color_prob``; the batch's references are kept for the conditioning."""
        c = self.cfg
        xs, ms, cols, self._refs = [], [], [], []
        for i in rng.integers(len(self.samples), size=c.batch_size):
            w = self.wall[int(i)]
            img, color = w.image, w.color
            if rng.random() < c.random_color_prob:
                color = random_color(rng)
                img = self.recolor(img, w.full_mask, seed=int(rng.integers(2**31)), color=color)
            x, m = self.crop(img, w.mask, rng)
            xs.append(x)
            ms.append(m)
            cols.append(color)
            self._refs.append(self.reference(color, int(rng.integers(2**31))))
        ids = torch.zeros(len(xs), dtype=torch.long)
        return (torch.stack(xs), torch.stack(ms), ids,
                torch.tensor(cols, dtype=torch.float32) / 255.0)

    # -- model -------------------------------------------------------------------------------------
    def _build(self, acc) -> TrainParts:
        """The LoRA U-Net (:meth:`LoraTrainer._build`), generation's empty conditioning and, when
        the reference is on, IP-Adapter attached to the same U-Net (frozen)."""
        from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline
        from pipelines import models
        from pipelines.inpaint import condition_embeddings
        c = self.cfg
        parts = super()._build(acc)
        folder = models.resolve("sd-inpaint", c.model)
        text_encoder, tokenizer = _text_parts(folder)
        if text_encoder is not None:
            text_encoder.requires_grad_(False)
            text_encoder.to(acc.device)
        self.pipe = StableDiffusionInpaintPipeline(
            vae=parts.vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=parts.unet,
            scheduler=DDIMScheduler.from_config(parts.sched.config), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
        self.pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            self.empty = condition_embeddings(self.pipe, None)[0].detach()
        if c.reference != "none":
            ok, msg = models.available("ip-adapter", c.ip_adapter)
            if ok:
                models.attach_ip_adapter(self.pipe, c.ip_adapter, float(c.ip_adapter_scale))
                for name, p in parts.unet.named_parameters():
                    if "lora_" not in name:
                        p.requires_grad_(False)
                self.pipe.image_encoder.requires_grad_(False)
                self.pipe.image_encoder.to(acc.device)
                self.ip = True
            elif c.reference == "ip-adapter":
                raise models.ModelError(msg)
            else:
                self.notes.append("IP-Adapter weights not found — trained without the colour "
                                  "reference (as generation skips it). " + msg)
        return parts

    def _conditioning(self, acc, parts: TrainParts, ids):
        """Generation's empty conditioning for every row (+ the references' IP-Adapter embeds)."""
        B = len(ids)
        enc = self.empty.to(acc.device, parts.dtype).expand(B, -1, -1)
        if not self.ip:
            return enc, {}
        from PIL import Image
        with torch.no_grad():
            emb, _ = self.pipe.encode_image([Image.fromarray(r) for r in self._refs], acc.device, 1)
        return enc, {"added_cond_kwargs": {"image_embeds": [emb.to(parts.dtype)[:, None]]}}

    def _add_losses(self, loss: torch.Tensor, parts: TrainParts, noisy, pred, t, m, cols) -> torch.Tensor:
        """``+ color_loss_weight ·`` :meth:`_color_loss` (when the weight is > 0)."""
        c = self.cfg
        if c.color_loss_weight > 0:
            loss = loss + c.color_loss_weight * self._color_loss(parts, noisy, pred, t, m, cols)
        return loss

    @staticmethod
    def _color_loss(parts: TrainParts, noisy, pred, t, m, cols) -> torch.Tensor:
        """Squared LAB distance (/100) of the predicted x0's mean colour inside the mask to the
        sample's dominant colour ``cols [B x 3]`` in [0, 1]."""
        B = len(noisy)
        a = parts.alphas[t].view(-1, 1, 1, 1).float()
        if parts.sched.config.prediction_type == "epsilon":
            x0 = (noisy.float() - (1 - a).sqrt() * pred.float()) / a.sqrt()
        else:
            x0 = a.sqrt() * noisy.float() - (1 - a).sqrt() * pred.float()
        rgb = (parts.vae.decode((x0 / parts.sf).to(parts.dtype)).sample.float() + 1) / 2
        lab = rgb_to_lab_torch(rgb)
        mm = m.float()
        mean_lab = (lab * mm).sum((2, 3)) / mm.sum((2, 3)).clamp_min(1.0)
        target_lab = rgb_to_lab_torch(cols[:, :, None, None]).view(B, 3)
        return ((mean_lab - target_lab) / 100.0).pow(2).sum(1).mean()

    def _prepare(self, acc, parts: TrainParts) -> None:
        super()._prepare(acc, parts)
        self._acc, self._parts = acc, parts

    def _begin(self, progress, cancelled) -> None:
        """Start the clock; on a fresh run, the untrained baseline's validation (step 0)."""
        super()._begin(progress, cancelled)
        if self.step == 0 and self.cfg.validate_every and self._acc.is_main_process:
            report(progress, 0.0, "validating the untrained model (baseline)")
            p = self._parts
            self.validation_grid(p.vae, self._acc.unwrap_model(p.unet), p.sched)
            p.unet.train()

    def _write(self, folder: Path, unet, opt) -> None:
        super()._write(folder, unet, opt)
        rows = [r for r in read_metrics(self.out) if r["step"] == self.step]
        if rows:
            atomic_write_text(folder / "color_metrics.json", json.dumps(rows[-1], indent=1))

    # -- validation -----------------------------------------------------------------------------
    def validation_targets(self) -> list[tuple[int, tuple]]:
        """``[(sample index, target colour)]`` of the grid's rows: the first ``validation_count``
        samples, each at its own colour or at ``validation_colors`` (cycled)."""
        c = self.cfg
        idx = list(range(min(c.validation_count, len(self.samples))))
        if c.validation_colors:
            return [(i, as_rgb(c.validation_colors[k % len(c.validation_colors)])) for k, i in enumerate(idx)]
        return [(i, self.colors[i]) for i in idx]

    @torch.no_grad()
    def validation_grid(self, vae, unet, sched) -> Path:
        """Rows: :meth:`validation_targets`; columns: crop, mask, reference, depth proxy, one
        inpainting per ``validation_seeds`` (the raw diffusion output, no LAB correction) with the
        pipeline, conditioning and reference of generation. Appends the step's colour metrics."""
        from PIL import Image
        c, pipe = self.cfg, self.pipe
        unet.eval()
        guidance = c.validation_guidance if c.validation_guidance is not None else (5.0 if self.ip else 1.0)
        cond = self.empty.to(unet.device, unet.dtype)
        rows, results = [], []
        for i, color in self.validation_targets():
            x, m = self.example(i, None)
            crop = ((x.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
            mask = (m[0].numpy() * 255).astype(np.uint8)
            ref = self.reference(color, i)
            cells = [crop, np.repeat(mask[..., None], 3, 2),
                     cv2.resize(ref, (c.resolution, c.resolution), interpolation=cv2.INTER_AREA), depth_proxy(crop)]
            extra = {"ip_adapter_image": Image.fromarray(ref)} if self.ip else {}
            for s in c.validation_seeds:
                out = pipe(prompt_embeds=cond, negative_prompt_embeds=cond, image=Image.fromarray(crop),
                           mask_image=Image.fromarray(mask), height=c.resolution, width=c.resolution,
                           num_inference_steps=c.validation_steps, guidance_scale=guidance, output_type="np",
                           generator=torch.Generator("cpu").manual_seed(int(s)), **extra).images[0]
                out = np.clip(np.round(out * 255), 0, 255).astype(np.uint8)
                cells.append(out)
                if np.count_nonzero(mask) >= 16:
                    results.append((out, mask, color))
            rows.append(np.concatenate(cells, 1))
        if results:
            append_metrics(self.out, metrics_row(self.step, results, baseline=self.step == 0,
                                                 reference=self.ip, guidance=guidance))
        return save_validation_grid(self.out, self.step, np.concatenate(rows, 0))

    def run(self, progress: ProgressFn | None = None, cancelled: CancelFn | None = None) -> TrainResult:
        res = super().run(progress, cancelled)
        for note in self.notes:
            report(progress, 1.0, note)
        return res


def train_wall(cfg, samples: Sequence, progress: ProgressFn | None = None,
               cancelled: CancelFn | None = None) -> TrainResult:
    """Train (or resume) a wall-colour LoRA on ``[(image, wall mask, _)]``."""
    return WallTrainer(cfg, samples).run(progress, cancelled)


def run_from_config(cfg, progress: ProgressFn | None = None, cancelled: CancelFn | None = None) -> TrainResult:
    """Train on ``cfg.data`` (a folder of photos + masks, :func:`wall_samples_from_folder`)."""
    cfg = wall_config(cfg)
    if not cfg.data:
        raise ConfigError("data (a folder of wall photos + masks) is required")
    return train_wall(cfg, wall_samples_from_folder(cfg.data, cfg.masks, cfg.image_size), progress, cancelled)


# ------------------------------------------------------------------------------------------------
# Ablations
# ------------------------------------------------------------------------------------------------
# The variants are :data:`pipelines.wall.ABLATIONS` (declared beside the generator so the CLI lists them without torch).


def run_ablation(cfg, samples: Sequence, out: str | Path, variants: Sequence[str] | None = None,
                 progress: ProgressFn | None = None, cancelled: CancelFn | None = None) -> list[dict]:
    """Train the baseline and each variant of :data:`ABLATIONS` with ``cfg``'s budget in
    ``out/<variant>`` (validation before the first and after the last step), then write
    ``out/ablation.json`` and ``out/ablation.md``: per variant the untrained and final colour
    metrics, their grades, the final loss and the time."""
    base = wall_config(cfg)
    names = list(variants or ABLATIONS)
    unknown = [v for v in names if v not in ABLATIONS]
    if unknown:
        raise ConfigError(f"unknown ablation(s) {', '.join(unknown)}; known: {', '.join(ABLATIONS)}")
    out = Path(out)
    steps = base.max_steps or 1
    table = []
    for k, name in enumerate(names):
        check_cancelled(cancelled, "the ablation")
        vcfg = replace(base, output_dir=str(out / name), resume=False,
                       validate_every=base.validate_every or steps, **ABLATIONS[name])
        vcfg.validate()

        def sub(frac, msg, k=k, name=name):
            report(progress, (k + frac) / len(names), f"{name}: {msg}")
        t0 = time.perf_counter()
        trainer = WallTrainer(vcfg, samples)
        res = trainer.run(sub, cancelled)
        if res.stopped == "cancelled":
            check_cancelled(lambda: True, "the ablation")
        rows = read_metrics(vcfg.output_dir)
        if not rows or rows[-1]["step"] != res.step:   # the final state is always measured
            trainer.validation_grid(trainer._parts.vae, trainer._acc.unwrap_model(trainer._parts.unet),
                                    trainer._parts.sched)
            rows = read_metrics(vcfg.output_dir)
        first, last = rows[0], rows[-1]
        table.append({"variant": name, "changes": ABLATIONS[name], "steps": res.step,
                      "loss": res.loss, "seconds": round(time.perf_counter() - t0, 1),
                      "reference": bool(trainer.ip), "notes": trainer.notes,
                      "untrained": {k2: first[k2] for k2 in ("lab_distance", "hue_error_deg", "delta_e2000", "grade")},
                      "final": {k2: last[k2] for k2 in ("lab_distance", "hue_error_deg", "delta_e2000",
                                                        "grade", "good_share")}})
    atomic_write_text(out / "ablation.json", json.dumps(table, indent=1))
    atomic_write_text(out / "ablation.md", ablation_table(table) + "\n")
    return table


def ablation_table(table: Sequence[dict]) -> str:
    """Markdown: one row per variant (untrained → final LAB distance / hue error / ΔE2000, grade)."""
    lines = ["| variant | steps | loss | LAB dist. (untrained → final) | hue err. ° | ΔE2000 | grade | s |",
             "|---|---:|---:|---|---|---|---|---:|"]
    for r in table:
        u, f = r["untrained"], r["final"]
        lines.append(f"| {r['variant']} | {r['steps']} | {r['loss']:.4f} | {u['lab_distance']:.1f} → "
                     f"{f['lab_distance']:.1f} | {u['hue_error_deg']:.1f} → {f['hue_error_deg']:.1f} | "
                     f"{u['delta_e2000']:.1f} → {f['delta_e2000']:.1f} | {u['grade']} → {f['grade']} | "
                     f"{r['seconds']:.0f} |")
    return "\n".join(lines)
