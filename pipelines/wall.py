"""Zero-prompt wall colour with diffusion (``wall``): SD inpainting + IP-Adapter + LAB correction.

Steps for each candidate:

1. The target colour: ``color`` (``'#RRGGBB'`` / ``(r, g, b)``), or, when it is None, the
   dominant colour of the masked region (``color_method``: ``median`` | ``mean`` | ``kmeans``).
2. SD 1.5 inpainting of the padded box around the mask with the **unconditional** embedding (the
   empty prompt's text encoding, or zeros ``[1, 77, D]`` without a text encoder) — no text prompt.
   The wall LoRA trainer (:mod:`pipelines.wall_train`) conditions on exactly this (same function),
   and feeds its solid reference through the same IP-Adapter path as step 3.
3. When IP-Adapter weights are present (``$DEFECT_STUDIO_IP_ADAPTER``, see
   :mod:`pipelines.models`), a solid colour reference (512×512, Gaussian noise σ=8, lighting
   gradient 0.95–1.05, :func:`pipelines.color.solid_reference`) is the image prompt; otherwise the
   step is skipped and ``info["notes"]`` says so (the LAB correction still sets the colour).
4. Final LAB correction inside the mask — :class:`pipelines.classical.LabRecolorGenerator`'s
   logic — on a *shading source* whose lightness is the input's plus the diffusion output's
   lightness change, scaled so its spread is at most ``detail`` × the input's (default 0.25).
   The scene's lighting is kept (Pearson r of L vs the input ≥ √(1 − detail²) ≈ 0.97 before
   rounding), the diffusion contributes surface detail, and the region's mean colour meets the
   target (ΔE2000 < 2 — the recolour's correction passes measure after 8-bit rounding).

Pixels outside ``dilate(mask, feather)`` equal the input exactly. Params: ``color``,
``color_method``, ``detail``, ``keep_chroma`` (0.15), ``mottle`` (0.8), ``ip_adapter`` (folder /
hub id), ``ip_adapter_scale`` (0.6), plus the common diffusion params (``strength`` 0.6, ``steps``
30, ``guidance`` — 1.0 without IP-Adapter, 5.0 with it — ``model``, ``lora``, ``only_masked``…).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipelines import models
from pipelines.classical import LabRecolorGenerator
from pipelines.color import as_rgb, dominant_color, lab_to_rgb, rgb_to_lab, solid_reference
from pipelines.generator import GeneratorInfo, option
from pipelines.inpaint import DiffusionGenerator, DiffusionOptions, condition_embeddings


# The wall-colour training ablations (:func:`pipelines.wall_train.run_ablation`): variant → the
# WallTrainConfig fields it changes. Declared here, beside the generator, so that the CLI's help can
# list them without importing the trainer (torch).
ABLATIONS: dict[str, dict] = {
    "baseline": {},
    "kmeans": {"wall_color_method": "kmeans"},           # k-means dominant colour (not the median)
    "color-loss": {"color_loss_weight": 0.5},            # + LAB colour-consistency loss
    "no-texture": {"reference_texture": False},          # flat reference: no noise, no lighting gradient
    "unconditional": {"reference": "none", "random_color_prob": 0.0},  # zero prompt only
}


@dataclass(frozen=True)
class WallOptions(DiffusionOptions):
    guidance: float | None = option(None, "classifier-free guidance (default: none, zero prompt)",
                                    min=1.0, max=20.0, step=0.5)
    color_method: str = option("median", "how the wall's current colour is measured when no target is given",
                               choices=("median", "kmeans", "mean"))
    detail: float = option(0.25, "share of the generated texture kept by the LAB correction",
                           min=0.0, max=1.0, step=0.05)
    keep_chroma: float = option(0.15, "share of the wall's own a/b texture kept (0 = flat colour)",
                                min=0.0, max=1.0, step=0.05)
    mottle: float = option(0.8, "seeded low-amplitude colour variation (a/b units; 0 = none)",
                           min=0.0, max=5.0, step=0.1)
    ip_adapter: str | None = option(None, "IP-Adapter folder for the solid colour reference "
                                          "(default $DEFECT_STUDIO_IP_ADAPTER)", path=True)
    ip_adapter_scale: float = option(0.6, "IP-Adapter scale", min=0.0, max=2.0, step=0.05)
    reference_size: int = option(512, "size of the solid reference image (px)", min=64, max=1024, step=8)


class WallColorGenerator(DiffusionGenerator):
    info = GeneratorInfo("wall", "1", "color",
                         "Zero-prompt wall colour: SD inpainting (+ IP-Adapter colour reference when "
                         "present) then a LAB correction to the target colour",
                         options=WallOptions, default_strength=0.6, needs_model=("sd-inpaint",))

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self._recolor = LabRecolorGenerator()

    def generate(self, image, mask, *, seed, feather=4, n=1, **params):
        params.pop("damage_type", None)          # wall mode has no damage type
        color = params.get("color")
        if color is None:
            from pipelines.generators.base import check_image
            img = check_image(image)
            from pipelines import masks as mk
            m = mk.validate_mask(mask, img.shape)
            color = dominant_color(img, m, params.get("color_method") or "median")
            params["color"] = color
        params["color"] = as_rgb(params["color"])  # fail fast on a bad colour
        res = super().generate(image, mask, seed=seed, feather=feather, n=n, **params)
        res.info["target_color"] = "#%02x%02x%02x" % tuple(params["color"])
        return res

    def _pipeline(self, opts):
        # IP-Adapter layers change the U-Net: a pipeline with them is kept apart from sd-inpaint's.
        ok, _ = models.available("ip-adapter", opts.get("ip_adapter"))
        return models.load_inpaint(self._model(opts), self.device, self.dtype,
                                   tag="ip-adapter" if ok else "")

    def _conditioning(self, pipe, opts):
        return condition_embeddings(pipe, None)

    def _extra(self, pipe, crop_w, mask_w, opts, info) -> dict:
        ok, msg = models.available("ip-adapter", opts.get("ip_adapter"))
        guidance = opts.get("guidance")
        if ok:
            models.attach_ip_adapter(pipe, opts.get("ip_adapter"), float(opts["ip_adapter_scale"]))
            ref = solid_reference(opts["color"], int(opts["reference_size"]), 8, (0.95, 1.05))
            info["ip_adapter"] = True
            from PIL import Image
            extra = {"ip_adapter_image": Image.fromarray(ref)}
        else:
            info["ip_adapter"] = False
            info["notes"].append("IP-Adapter weights not found — colour reference skipped; the "
                                 "LAB correction sets the colour. " + msg)
            extra = {}
        info["guidance"] = float(guidance if guidance is not None else (5.0 if ok else 1.0))
        extra["guidance_scale"] = info["guidance"]
        return extra

    def _post(self, gen, crop, cmask, feather, opts, info, seed) -> np.ndarray:
        inside = cmask > 0
        lab_in, lab_gen = rgb_to_lab(crop), rgb_to_lab(gen)
        d_in = lab_in[..., 0] - lab_in[..., 0][inside].mean()
        change = lab_gen[..., 0] - lab_in[..., 0]
        change = change - change[inside].mean()
        s_in, s_ch = float(d_in[inside].std()), float(change[inside].std())
        limit = float(np.clip(opts["detail"], 0.0, 1.0)) * s_in
        if s_ch > limit:
            change *= limit / s_ch if s_ch > 0 else 0.0
        src = lab_in.copy()
        src[..., 0] = np.clip(lab_in[..., 0] + change, 0.0, 100.0)
        src[..., 1:] = lab_gen[..., 1:]          # a/b texture of the diffusion (keep_chroma of it)
        source = lab_to_rgb(src)
        rng = np.random.default_rng(int(seed))
        out = self._recolor._generate(source, cmask, rng, feather, strength=1.0,
                                      color=opts["color"], keep_chroma=opts["keep_chroma"],
                                      mottle=opts["mottle"])
        return np.clip(np.round(out), 0, 255).astype(np.uint8)
