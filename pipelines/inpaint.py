"""SD 1.5 inpainting driven by a damage-type embedding instead of a text prompt.

Generators (all ``gen(image, mask, *, seed, feather=4, **params) -> H×W×3 uint8``, the classical
calling convention; ``gen.generate(...)`` returns every candidate plus an ``info`` dict):

- :class:`SDInpaintGenerator` (``sd-inpaint``): StableDiffusionInpaintPipeline (9-channel U-Net:
  4 noisy latents + 4 masked-image latents + 1 mask) conditioned through ``prompt_embeds``:

  1. a trained :class:`DamageEmbedding` table (``embedding=`` folder) → ``[1, tokens, D]``, where
     ``D = unet.config.cross_attention_dim`` (768 for SD 1.5, never hard-coded);
  2. else the pipeline's own text encoder on ``"<damage type> defect"`` (underscores → spaces),
     so a stock SD 1.5 inpainting folder works before any table is trained;
  3. else a clear error (no table, no text encoder).

The result is pasted back with :func:`pipelines.classical.composite` and the feathered mask, so
every pixel outside ``masks.dilate(mask, feather)`` equals the input byte for byte. ``only_masked``
(default True) crops a padded, roughly square box around the mask, generates it at the model's
resolution (``unet.config.sample_size × vae_scale_factor``, 512 for SD 1.5) and pastes it back, so
small defects on large images keep their detail; ``only_masked=False`` resizes the whole image.

Common params: ``damage_type``, ``strength`` (0..1, default 0.8: the share of the schedule that
is re-noised), ``steps`` (30), ``guidance`` (7.5), ``n`` (candidates, seeds ``seed … seed+n-1``),
``model`` (folder / hub id, default ``$DEFECT_STUDIO_SD_INPAINT``), ``lora`` (a
``.safetensors`` file or a folder holding ``pytorch_lora_weights.safetensors``), ``lora_scale``
(1.0), ``embedding`` (folder written by :meth:`DamageEmbedding.save`), ``only_masked`` (True),
``padding`` (32 px of context around the mask in only-masked mode), ``resolution`` (working
long side in px, default the model's), ``progress(fraction, text)``, ``cancelled() -> bool``.
"""
from __future__ import annotations

import hashlib
import json
import math
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

from pipelines import masks as mk
from pipelines import models
from pipelines.fileio import atomic_write_bytes, atomic_write_json
from pipelines.generator import GeneratorBase, GeneratorInfo, option
from pipelines.training import Cancelled
from pipelines.generators.base import DEFAULT_FEATHER, check_image, composite
from pipelines.models import ModelError

EMBEDDING_FILE = "damage_embedding.safetensors"
EMBEDDING_META = "damage_embedding.json"
LORA_FILE = "pytorch_lora_weights.safetensors"




# --------------------------------------------------------------------------------------------
# Damage-type embedding table
# --------------------------------------------------------------------------------------------
def _torch():
    import torch
    return torch


class DamageEmbedding:
    """A learned table: damage type → ``prompt_embeds`` of shape ``[tokens, D]``.

    Wraps ``nn.Embedding(n_types, tokens·D)`` (``self.table``, trainable); ``D`` is the U-Net's
    ``cross_attention_dim``. Saved as ``damage_embedding.safetensors`` (key ``weight``) plus
    ``damage_embedding.json`` (``{"damage_types": [...], "tokens": T, "dim": D}``).
    """

    def __init__(self, damage_types: list[str], tokens: int = 8, dim: int = 768, seed: int = 0):
        torch = _torch()
        if not damage_types:
            raise ValueError("a damage embedding needs at least one damage type")
        if len(set(damage_types)) != len(damage_types):
            raise ValueError("damage types in an embedding table must be unique")
        self.damage_types = list(damage_types)
        self.tokens, self.dim = int(tokens), int(dim)
        g = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Embedding(len(damage_types), self.tokens * self.dim)
        with torch.no_grad():
            self.table.weight.copy_(torch.randn(self.table.weight.shape, generator=g) * 0.02)

    @classmethod
    def for_unet(cls, unet, damage_types: list[str], tokens: int = 8, seed: int = 0):
        """A fresh table whose width is the U-Net's ``cross_attention_dim``."""
        return cls(damage_types, tokens, int(unet.config.cross_attention_dim), seed)

    def index(self, damage_type: str) -> int:
        try:
            return self.damage_types.index(damage_type)
        except ValueError:
            raise KeyError(f"damage type {damage_type!r} is not in this embedding table; "
                           f"it has: {', '.join(self.damage_types)}") from None

    def __contains__(self, damage_type: str) -> bool:
        return damage_type in self.damage_types

    def __call__(self, ids):
        """``ids: [B]`` long → ``[B, tokens, D]``."""
        return self.table(ids).view(-1, self.tokens, self.dim)

    def embed(self, damage_type: str):
        torch = _torch()
        with torch.no_grad():
            return self(torch.tensor([self.index(damage_type)])).detach()

    def save(self, folder: str | Path) -> Path:
        from safetensors.torch import save
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / EMBEDDING_FILE, save({"weight": self.table.weight.detach().cpu().contiguous()}))
        atomic_write_json(folder / EMBEDDING_META, {"damage_types": self.damage_types, "tokens": self.tokens,
                                                    "dim": self.dim}, indent=1)
        return folder

    @classmethod
    def load(cls, path: str | Path) -> "DamageEmbedding":
        path = Path(path)
        folder = path if path.is_dir() else path.parent
        meta_path = folder / EMBEDDING_META
        try:
            meta = json.loads(meta_path.read_text())
            types, tokens, dim = list(meta["damage_types"]), int(meta["tokens"]), int(meta["dim"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"damage embedding {folder}: cannot read {EMBEDDING_META} "
                             f"({type(exc).__name__}: {exc})") from exc
        weights = models.check_safetensors(folder / EMBEDDING_FILE, "damage embedding")
        w = weights.get("weight")
        if w is None or tuple(w.shape) != (len(types), tokens * dim):
            raise ModelError(f"damage embedding {folder}: weight shape "
                             f"{None if w is None else tuple(w.shape)} does not match "
                             f"{len(types)} types × {tokens} tokens × {dim}")
        emb = cls(types, tokens, dim)
        with _torch().no_grad():
            emb.table.weight.copy_(w)
        return emb


# --------------------------------------------------------------------------------------------
# Conditioning
# --------------------------------------------------------------------------------------------
def damage_prompt(damage_type: str) -> str:
    return f"{damage_type.replace('_', ' ').strip()} defect"


def _has_text(pipe) -> bool:
    return getattr(pipe, "text_encoder", None) is not None and getattr(pipe, "tokenizer", None) is not None


def _encode_text(pipe, prompt: str):
    """``(cond, uncond)`` each ``[1, 77, D]``: the text encoder on ``prompt`` and on ``""``."""
    cond, uncond = pipe.encode_prompt(prompt, pipe.device, 1, True, negative_prompt="")
    return cond, uncond


def condition_embeddings(pipe, damage_type: str | None, table: DamageEmbedding | None = None):
    """``(prompt_embeds, negative_prompt_embeds, source)`` for ``damage_type``.

    ``source`` is ``"table"``, ``"text"`` or ``"unconditional"`` (``damage_type=None``: the empty
    prompt's encoding, or zeros ``[1, 77, D]`` without a text encoder). With a table the negative
    is zeros of the same shape.
    """
    torch = _torch()
    dim = int(pipe.unet.config.cross_attention_dim)
    dtype = pipe.unet.dtype
    if damage_type is None:
        if _has_text(pipe):
            _, uncond = _encode_text(pipe, "")
            return uncond, uncond, "unconditional"
        z = torch.zeros(1, 77, dim, dtype=dtype, device=pipe.device)
        return z, z, "unconditional"
    if table is not None and damage_type in table:
        if table.dim != dim:
            raise ModelError(f"the damage embedding has width {table.dim} but this U-Net's "
                             f"cross_attention_dim is {dim} — it was trained for another model")
        cond = table.embed(damage_type).to(pipe.device, dtype)
        return cond, torch.zeros_like(cond), "table"
    if _has_text(pipe):
        cond, uncond = _encode_text(pipe, damage_prompt(damage_type))
        return cond, uncond, "text"
    known = f" (the table has: {', '.join(table.damage_types)})" if table is not None else ""
    raise ModelError(f"no embedding for damage type {damage_type!r}{known} and the model has no "
                     "text encoder / tokenizer to fall back on — train a damage embedding for this "
                     "product or use a full SD 1.5 inpainting folder (with text_encoder/ and tokenizer/)")


# --------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------
def _lora_path(lora: str | Path) -> Path:
    p = Path(lora).expanduser()
    if p.is_dir():
        cands = [p / LORA_FILE] + sorted(p.glob("*.safetensors"))
        p = next((c for c in cands if c.is_file()), p / LORA_FILE)
    return p


def apply_lora(pipe, lora: str | Path | None, scale: float = 1.0) -> str | None:
    """Activate LoRA ``lora`` (file or folder) on ``pipe`` at ``scale``; ``None`` disables every
    LoRA. Each file is loaded once per pipeline (adapter name from its path and mtime)."""
    loaded = getattr(pipe, "_defect_studio_loras", None)
    if loaded is None:
        loaded = pipe._defect_studio_loras = {}
    if lora in (None, ""):
        if loaded:
            pipe.disable_lora()
        return None
    path = _lora_path(lora)
    models.check_safetensors(path, "LoRA file")          # missing / corrupt → ModelError
    key = f"{path.resolve()}:{path.stat().st_mtime_ns}"
    name = loaded.get(key)
    if name is None:
        name = "lora_" + hashlib.sha1(key.encode()).hexdigest()[:10]
        try:
            pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
        except Exception as exc:   # noqa: BLE001 — peft/diffusers raise many types
            try:
                pipe.delete_adapters(name)
            except Exception:      # noqa: BLE001 — nothing was injected
                pass
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            text = next((ln for ln in lines if "mismatch" in ln), lines[0] if lines else
                        type(exc).__name__)
            raise ModelError(f"LoRA {path.name} does not fit this model — it was trained for "
                             f"another architecture or base model ({type(exc).__name__}: "
                             f"{text[:300]})") from exc
        adapters = pipe.get_list_adapters()
        if not any(name in v for v in adapters.values()):
            raise ModelError(f"LoRA {path.name} has no weights for this model's layers — it was "
                             "trained for another architecture")
        loaded[key] = name
    pipe.enable_lora()
    pipe.set_adapters([name], adapter_weights=[float(scale)])
    return name


# --------------------------------------------------------------------------------------------
# Geometry: the working box and size
# --------------------------------------------------------------------------------------------
def work_box(mask: np.ndarray, feather: float, padding: int) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)``: the box around ``dilate(mask, feather)`` plus ``padding`` px,
    grown towards a square (context on the short side) and clamped to the image."""
    h, w = mask.shape
    x0, y0, x1, y1 = mk.bbox(mask)  # type: ignore[misc]
    m = int(math.ceil(feather)) + 1 + int(padding)
    x0, y0, x1, y1 = x0 - m, y0 - m, x1 + m, y1 + m
    side = max(x1 - x0, y1 - y0)
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    bw, bh = min(side, w), min(side, h)
    x0 = int(round(min(max(cx - bw / 2.0, 0), w - bw)))
    y0 = int(round(min(max(cy - bh / 2.0, 0), h - bh)))
    return x0, y0, x0 + bw, y0 + bh


def work_size(h: int, w: int, resolution: int, multiple: int = 8) -> tuple[int, int]:
    """``(height, width)`` with the long side ``resolution``, both multiples of ``multiple``."""
    s = resolution / float(max(h, w))
    return (max(multiple, int(round(h * s / multiple)) * multiple),
            max(multiple, int(round(w * s / multiple)) * multiple))


def model_resolution(pipe) -> int:
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


# --------------------------------------------------------------------------------------------
# Generators
# --------------------------------------------------------------------------------------------
@dataclass
class GenerationResult:
    images: list[np.ndarray]
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class DiffusionOptions:
    """Options of every SD 1.5 backend (the Annotate widgets and CLI flags come from here)."""
    model: str | None = option(None, "SD 1.5 (inpainting) folder or hub id, local files only "
                                     "(default $DEFECT_STUDIO_SD_INPAINT / _SD_BASE)", path=True)
    steps: int = option(30, "diffusion steps", min=1, max=150, step=1)
    guidance: float | None = option(7.5, "classifier-free guidance", min=1.0, max=20.0, step=0.5)
    lora: str | None = option(None, "LoRA weights (.safetensors or folder) for the SD U-Net", path=True)
    lora_scale: float = option(1.0, "LoRA weight", min=0.0, max=2.0, step=0.05)
    embedding: str | None = option(None, "damage-type embedding table folder (trained in the Training tab)",
                                 path=True)
    only_masked: bool = option(True, "work on a padded box around the mask (off: the whole frame)")
    padding: int = option(32, "context around the mask in only-masked mode (px)", min=0, max=512, step=1)
    resolution: int | None = option(None, "working size (px); default: the model's", min=64, max=2048, step=8)


class DiffusionGenerator(GeneratorBase, ABC):
    """Shared plumbing: checks, the working crop, seeding, the diffusers call, paste-back.

    Subclasses declare ``info`` and implement ``_pipeline(opts)`` and
    ``_extra(pipe, crop, cmask_work, size, opts, info) -> dict`` (extra pipeline kwargs).
    """

    info = GeneratorInfo("diffusion", "1", "damage", "", options=DiffusionOptions, default_strength=0.8)

    @property
    def defaults(self) -> dict[str, Any]:
        """Every parameter this backend takes with its default (strength + its options)."""
        return {"strength": self.info.default_strength, **self.info.defaults}

    def ancestors(self, params: dict) -> list[str]:
        """Reference defects the LoRA / damage embedding in use were trained on (their
        ``training_data.json``, written by ``python -m studio train``)."""
        from pipelines.training_data import read_manifest
        out: set[str] = set()
        for key in ("lora", "embedding"):
            if params.get(key) and not isinstance(params[key], DamageEmbedding):
                out.update(read_manifest(params[key]).get("ancestors", []))
        return sorted(out)

    def __init__(self, model: str | None = None, device: str | None = None, dtype: Any = None):
        self.model, self.device, self.dtype = model, device, dtype
        self._tables: dict[str, DamageEmbedding] = {}
        self._tables_lock = threading.Lock()

    # -- public API ----------------------------------------------------------------------------
    def __call__(self, image, mask, *, seed: int, feather: int = DEFAULT_FEATHER, **params) -> np.ndarray:
        params.pop("n", None)
        return self.generate(image, mask, seed=seed, feather=feather, n=1, **params).images[0]

    def generate(self, image, mask, *, seed: int, feather: int = DEFAULT_FEATHER, n: int = 1,
                 progress: Callable[[float, str], None] | None = None,
                 cancelled: Callable[[], bool] | None = None, **params) -> GenerationResult:
        """``n`` candidates (seeds ``seed … seed+n-1``) in one batch, plus an ``info`` dict."""
        image = check_image(image)
        m = mk.validate_mask(mask, image.shape)
        opts, n, steps, strength = self._options(params, n)
        fe = max(0.0, float(feather))
        pipe = self._pipeline(opts)
        lock = models.pipe_lock(pipe)
        info: dict[str, Any] = {"backend": self.name, "model": str(models.pipe_folder(pipe)),
                                "notes": []}
        with lock:
            info["lora"] = apply_lora(pipe, opts.get("lora"), float(opts["lora_scale"]))
            # 1. The working region: a padded box around the mask, or the whole image.
            h, w = m.shape
            x0, y0, x1, y1 = (work_box(m, fe, int(opts["padding"]))
                              if opts["only_masked"] and not self.full_image else (0, 0, w, h))
            crop, cmask = image[y0:y1, x0:x1], m[y0:y1, x0:x1]
            guidance = 7.5 if opts["guidance"] is None else float(opts["guidance"])
            # 2. The working size: the model's resolution on the long side, multiples of 8.
            res = int(opts["resolution"] or model_resolution(pipe))
            wh, ww = work_size(y1 - y0, x1 - x0, res, int(pipe.vae_scale_factor))
            crop_w = cv2.resize(crop, (ww, wh), interpolation=cv2.INTER_AREA if ww < crop.shape[1]
                                else cv2.INTER_CUBIC)
            # The model repaints dilate(mask, feather): the whole feathered ramp gets new content.
            mask_w = mk.resize_nearest(mk.dilate(cmask, fe), (wh, ww))
            info.update(box=(x0, y0, x1, y1), work_size=(ww, wh), steps=steps,
                        strength=strength, guidance=guidance, seeds=[seed + i for i in range(n)])
            # 3. Conditioning and the pipeline's extra inputs (control images, IP-Adapter, …).
            cond, uncond, info["conditioning"] = self._conditioning(pipe, opts)
            extra = self._extra(pipe, crop_w, mask_w, opts, info)
            # 4. Denoise.
            from PIL import Image
            kwargs = dict(prompt_embeds=cond, negative_prompt_embeds=uncond, height=wh, width=ww,
                          num_inference_steps=steps, guidance_scale=guidance,
                          num_images_per_prompt=1, output_type="np")
            if not self.full_image:
                kwargs.update(image=Image.fromarray(crop_w), mask_image=Image.fromarray(mask_w),
                              strength=strength)
            kwargs.update(extra)
            total = (steps if self.full_image else max(1, int(steps * strength))) * n
            out = self._denoise(pipe, kwargs, n, seed, total, progress, cancelled)
        # 5. Back to the crop's size and pasted with the feathered mask (outside stays exact).
        return GenerationResult(self._paste_back(image, out, (x0, y0, x1, y1), crop, cmask, fe, opts, info, seed),
                                info)

    def _options(self, params: dict, n) -> tuple[dict, int, int, float]:
        """The call's options over the defaults, checked → ``(opts, n, steps, strength)``."""
        unknown = sorted(set(params) - set(self.defaults) - {"damage_type", "model", "color"})
        if unknown:
            raise TypeError(f"{self.name} got unknown parameter(s) {', '.join(unknown)}; accepted: "
                            f"{', '.join(sorted({'damage_type', 'model', *self.defaults}))}")
        opts = {**self.defaults, **params}
        n = int(n)
        if not 1 <= n <= 64:
            raise ValueError(f"number of candidates must be 1..64, got {n}")
        steps, strength = int(opts["steps"]), float(opts["strength"])
        if steps < 1:
            raise ValueError(f"steps must be ≥ 1, got {steps}")
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        if not self.full_image and int(steps * strength) < 1:
            raise ValueError(f"steps × strength = {steps} × {strength} gives no denoising step; "
                             "raise steps or strength")
        return opts, n, steps, strength

    @staticmethod
    def _denoise(pipe, kwargs: dict, n: int, seed: int, total: int,
                 progress: Callable[[float, str], None] | None, cancelled: Callable[[], bool] | None) -> list:
        """One candidate per pipeline call with its own seeded generator: candidate i of a batch is
        then exactly the single call with seed+i (batched matmuls differ in the last bits, which
        rounding can turn into different bytes). Progress per denoising step of the ``total``; a
        cancel interrupts the pipeline and raises :class:`Cancelled`."""
        torch = _torch()
        done = [0]

        def on_step(p, i, t, kw):
            done[0] += 1
            if progress:
                progress(min(1.0, done[0] / total), f"step {done[0]}/{total}")
            if cancelled and cancelled():
                p._interrupt = True
            return kw

        out = []
        for i in range(n):
            gen_i = torch.Generator("cpu").manual_seed(int(seed) + i)
            with torch.inference_mode():
                out.append(pipe(**kwargs, callback_on_step_end=on_step, generator=gen_i).images[0])
            if cancelled and cancelled():
                raise Cancelled("generation cancelled")
        return out

    def _paste_back(self, image: np.ndarray, out: list, box: tuple, crop: np.ndarray, cmask: np.ndarray,
                    fe: float, opts: dict, info: dict, seed: int) -> list[np.ndarray]:
        """Each output at the crop's size, post-processed (:meth:`_post`) and pasted into the image
        with the feathered mask (the whole output for full-image backends)."""
        x0, y0, x1, y1 = box
        results = []
        alpha = mk.feather(cmask, fe)
        for arr in out:
            gen = np.clip(np.round(np.asarray(arr, np.float32) * 255.0), 0, 255).astype(np.uint8)
            gen = cv2.resize(gen, (x1 - x0, y1 - y0), interpolation=cv2.INTER_CUBIC
                             if gen.shape[1] < x1 - x0 else cv2.INTER_AREA)
            gen = self._post(gen, crop, cmask, fe, opts, info, seed + len(results))
            if self.full_image:
                results.append(gen)
                continue
            full = image.copy()
            full[y0:y1, x0:x1] = composite(crop, gen, alpha)
            results.append(full)
        return results

    # -- hooks ---------------------------------------------------------------------------------
    @abstractmethod
    def _pipeline(self, opts):
        """The loaded diffusers pipeline for these options (each backend's own method)."""

    def _conditioning(self, pipe, opts):
        damage = opts.get("damage_type")
        if damage is None:
            raise ValueError(f"{self.name} needs a damage type")
        return condition_embeddings(pipe, damage, self._table(opts.get("embedding")))

    def _extra(self, pipe, crop_w, mask_w, opts, info) -> dict:
        return {}

    def _post(self, gen, crop, cmask, feather, opts, info, seed) -> np.ndarray:
        return gen

    def _table(self, embedding) -> DamageEmbedding | None:
        if embedding is None or isinstance(embedding, DamageEmbedding):
            return embedding
        key = str(Path(embedding).expanduser().resolve())
        with self._tables_lock:
            if key not in self._tables:
                self._tables[key] = DamageEmbedding.load(key)
            return self._tables[key]

    def _model(self, opts) -> str | None:
        return opts.get("model") or self.model


class SDInpaintGenerator(DiffusionGenerator):
    """SD 1.5 inpainting with damage-type embeddings (see the module docstring)."""

    info = GeneratorInfo("sd-inpaint", "1", "damage",
                         "Stable Diffusion 1.5 inpainting conditioned on a damage-type embedding",
                         options=DiffusionOptions, default_strength=0.8, needs_model=("sd-inpaint",))

    def _pipeline(self, opts):
        return models.load_inpaint(self._model(opts), self.device, self.dtype)
