"""Pixel-space DDPM trained on defect-free images; residual maps for anomaly localisation.

The model (``build_unet``) is a plain diffusers ``UNet2DModel`` trained on random ``crop``-px
patches of good images resized to ``size`` px, predicting v (default) or the noise ε
(``ModelConfig.prediction``; the same choice sets the training target, the schedulers'
``prediction_type`` and so the reconstruction; checkpoints without the field load as v). Reconstruction (AnoDDPM-style):
noise a test image to depth ``t`` (Gaussian or simplex noise), denoise it with DDIM from ``t`` to 0,
and the residual |x - x̂| lights up where the part differs from what the model knows. Images larger
than the crop are handled patch-wise: at every DDIM step the model runs on overlapping windows and
the window predictions are blended (Hann weights) into one full-image prediction, so the windows
agree with each other. Several depths / seeds are averaged.

Layout:
  ModelConfig / build_unet / make_scheduler   the plain model (no training glue)
  TrainConfig / DDPMInspector.train           training (time or step budget, progress, cancel)
  DDPMInspector.save / load                   checkpoint folder: model.safetensors (+ ema.safetensors,
                                              optimizer.safetensors) and config.json
  DDPMInspector.reconstruct / residual_map / score / evaluate
  DDPMInspector.depth_grid / depth_grid_image  reconstructions and residuals at several depths
                                              (depths x images) for failure analysis

The training glue (budget and stop rule, optimizer state files, CheckpointError, TrainResult, the
Cancelled exception, progress / cancel callback types) is :mod:`pipelines.training`; files are
written with :mod:`pipelines.fileio`. ``CheckpointError`` and ``TrainResult`` stay importable from
here. Never imports gradio or ``studio``.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from pipelines.fileio import atomic_write_bytes, atomic_write_json
from pipelines.noise import NOISE_KINDS, SIMPLEX_DEFAULTS, make_noise
from pipelines.training import (Budget, CancelFn, Cancelled, CheckpointError, ProgressFn,  # noqa: F401 (re-export)
                                TrainResult, apply_optimizer_state, check_cancelled, load_tensors,
                                read_optimizer_state, report, save_optimizer)

CHECKPOINT_FORMAT = "defect-studio-ddpm/1"
PRESETS: dict[str, dict] = {
    # 32 px tests; ~0.1 M parameters
    "tiny": dict(block_out_channels=(16, 32), down_block_types=("DownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=8),
    # CPU default; ~2.7 M parameters, attention only at the lowest resolution (8 x 8 at 64 px):
    # ~0.33 s per training step (batch 8, 64 px) on 2 cores
    "small": dict(block_out_channels=(16, 32, 64, 128),
                  down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                  up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
                  layers_per_block=1, norm_num_groups=8),
    # ~8 M parameters, ~1.7 s per step on 2 cores (for a GPU or a long run)
    "default": dict(block_out_channels=(64, 96, 128, 192),
                    down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
                    layers_per_block=1, norm_num_groups=32),
}


# Measured on the demo products (20-min CPU runs, t_max 350): depth 50 alone gave the best pixel
# AUROC on both (bottle 0.983, brushed_metal 0.989); (100, 200) gave 0.973 / 0.985.
DEFAULT_DEPTHS = (50,)
RESIDUAL_KINDS = ("color", "ssim", "feature", "color+ssim", "color+feature")
FEATURE_BACKBONE, FEATURE_LAYERS, FEATURE_INPUT = "efficientnet_lite0", (1, 2), 256
# what the network predicts -> the diffusers schedulers' prediction_type
PREDICTIONS = {"v": "v_prediction", "epsilon": "epsilon"}
# the depth x image grid's default depths (of 1000 timesteps): from fine detail to heavy noise
GRID_DEPTHS = (100, 250, 400, 600)


# ------------------------------------------------------------------------------------------------
# The plain model
# ------------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    """Everything needed to rebuild the network and its noise process (saved in config.json)."""
    size: int = 128                  # working resolution: images are resized to size x size
    crop: int = 64                   # training / reconstruction window (= the U-Net's sample size)
    channels: int = 3
    preset: str = "small"
    noise: str = "gaussian"          # 'gaussian' | 'simplex' (training and default reconstruction)
    simplex: dict = field(default_factory=lambda: dict(SIMPLEX_DEFAULTS, frequency=16.0))
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    prediction: str = "v"            # 'v' | 'epsilon' (older checkpoints without it: v)

    def validate(self) -> None:
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {self.prediction!r}; known: {', '.join(PREDICTIONS)}")
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; known: {', '.join(PRESETS)}")
        if self.noise not in NOISE_KINDS:
            raise ValueError(f"unknown noise {self.noise!r}; known: {', '.join(NOISE_KINDS)}")
        down = 2 ** (len(PRESETS[self.preset]["block_out_channels"]) - 1)
        if self.crop % down or self.crop > self.size:
            raise ValueError(f"crop {self.crop} must be a multiple of {down} and <= size {self.size}")

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if d.get("prediction") in ("v_prediction", "eps"):      # the schedulers' spellings
            d["prediction"] = {"v_prediction": "v", "eps": "epsilon"}[d["prediction"]]
        return cls(**d)


def build_unet(size: int, channels: int = 3, preset: str = "small"):
    """A randomly initialised ``UNet2DModel`` for ``size`` x ``size`` x ``channels`` inputs."""
    from diffusers import UNet2DModel

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    return UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels,
                       attention_head_dim=32, **PRESETS[preset])


def make_scheduler(cfg: ModelConfig, kind: str = "ddpm"):
    """DDPMScheduler (training) or DDIMScheduler (reconstruction), both with the model's
    ``prediction_type`` (``cfg.prediction``: v → 'v_prediction', epsilon → 'epsilon')."""
    from diffusers import DDIMScheduler, DDPMScheduler

    common = dict(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                  prediction_type=PREDICTIONS[cfg.prediction], clip_sample=False)
    if kind == "ddpm":
        return DDPMScheduler(**common)
    return DDIMScheduler(**common, set_alpha_to_one=True, timestep_spacing="leading")


def v_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The v-prediction training target, exactly the scheduler's own ``get_velocity``."""
    return scheduler.get_velocity(x0, noise, t)


def training_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the network learns to output, read from the scheduler's ``prediction_type``:
    the noise itself (epsilon) or the velocity (v_prediction)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return v_target(scheduler, x0, noise, t)
    raise ValueError(f"unsupported prediction_type {kind!r}")


# ------------------------------------------------------------------------------------------------
# Training configuration (the result is pipelines.training.TrainResult)
# ------------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    steps: int | None = None         # stop after this many steps in total (None: time budget only)
    minutes: float | None = 20.0     # wall-clock budget of this call (None: steps only)
    batch_size: int = 8
    lr: float = 3e-4
    weight_decay: float = 0.0
    ema_decay: float = 0.999         # 0 disables EMA
    t_max: int = 350                 # timesteps sampled uniformly in [0, t_max) (cover the depths used)
    flip_h: bool = True
    flip_v: bool = True
    rot90: bool = True               # only for rotation-invariant products (not brushed textures)
    seed: int = 0
    log_every: int = 10


@dataclass
class EvalResult:
    metrics: dict
    samples: list                    # TestSample per image
    scores: np.ndarray               # [N]
    maps: np.ndarray                 # [N x H x W] smoothed residual maps
    masks: np.ndarray                # [N x H x W] bool
    images: list                     # [N] uint8 RGB at map size


@dataclass
class DepthGrid:
    """Reconstructions at several depths: rows = ``depths`` [D], columns = images [N]."""
    depths: list                     # [D] timesteps
    inputs: np.ndarray               # [N x S x S x 3] uint8, the images at cfg.size
    reconstructions: np.ndarray      # [D x N x S x S x 3] uint8
    residuals: np.ndarray            # [D x N x S x S] float32, unsmoothed
    kind: str = "color"
    noise: str = "gaussian"
    prediction: str = "v"

    def stats(self, masks: Sequence[np.ndarray | None] | None = None) -> list[dict]:
        """Per cell (depth-major): mean residual, and with a defect mask the mean inside / outside
        it (texture loss shows as a rising outside mean; over-smoothing hides the defect: the
        inside / outside ratio falls)."""
        out = []
        s = self.inputs.shape[1]
        for di, d in enumerate(self.depths):
            for ni in range(self.inputs.shape[0]):
                r = self.residuals[di, ni]
                cell = {"depth": int(d), "image": ni, "mean": float(r.mean())}
                m = None if masks is None else masks[ni]
                if m is not None and np.any(m):
                    mm = cv2.resize((np.asarray(m) > 0).astype(np.uint8), (s, s),
                                    interpolation=cv2.INTER_NEAREST) > 0
                    if mm.any() and (~mm).any():
                        cell["inside"], cell["outside"] = float(r[mm].mean()), float(r[~mm].mean())
                out.append(cell)
        return out


def _label(img: np.ndarray, text: str, scale: float = 0.4) -> np.ndarray:
    """Write ``text`` (black on the light background) into a uint8 RGB strip, in place."""
    cv2.putText(img, text, (4, img.shape[0] - 6), cv2.FONT_HERSHEY_SIMPLEX, scale, (20, 20, 20), 1, cv2.LINE_AA)
    return img


def depth_grid_image(grid: DepthGrid, names: Sequence[str] | None = None,
                     masks: Sequence[np.ndarray | None] | None = None, vmax: float | None = None) -> np.ndarray:
    """The grid as one labelled picture, uint8 RGB.

    Layout: a header row with each image's name, then a row "input" (the image | its defect mask
    outline, when given), then one row per depth "t=D": for every image its reconstruction | the
    residual heatmap. Heatmaps share one scale (``vmax``, default the 99.5th percentile of all
    residuals) so the depths compare by colour.
    """
    from pipelines.visual import contour, heatmap

    d_n, n = grid.reconstructions.shape[:2]
    s = grid.inputs.shape[1]
    names = list(names) if names is not None else [f"image {i}" for i in range(n)]
    hi = float(np.percentile(grid.residuals, 99.5)) if vmax is None else float(vmax)
    gap, head, lab = 4, 22, 70
    W = lab + n * (2 * s + gap) + gap
    foot = 18
    H = head + (d_n + 1) * (s + gap) + gap + foot
    out = np.full((H, W, 3), 245, np.uint8)
    for j, name in enumerate(names):
        x = lab + j * (2 * s + gap)
        _label(out[0:head, x:x + 2 * s], str(name)[: max(6, 2 * s // 8)])
    rows = [("input", None)] + [(f"t={d}", k) for k, d in enumerate(grid.depths)]
    for r, (title, k) in enumerate(rows):
        y = head + r * (s + gap)
        _label(out[y:y + s // 2 + 8, 0:lab], title, 0.45)
        for j in range(n):
            x = lab + j * (2 * s + gap)
            if k is None:
                left = grid.inputs[j]
                m = None if masks is None else masks[j]
                if m is not None and np.any(m):
                    mm = cv2.resize((np.asarray(m) > 0).astype(np.uint8), (s, s), interpolation=cv2.INTER_NEAREST)
                    right = contour(grid.inputs[j], mm, (0, 255, 0), 1)
                else:
                    right = np.full_like(left, 245)
            else:
                left, right = grid.reconstructions[k, j], heatmap(grid.residuals[k, j], 0.0, hi)
            out[y:y + s, x:x + s] = left
            out[y:y + s, x + s:x + 2 * s] = right
    if d_n:
        _label(out[H - foot:H, 0:W], f"pairs: reconstruction | residual ({grid.kind}, 0..{hi:.3f}) · "
                                   f"{grid.prediction}-prediction, {grid.noise} noise", 0.35)
    return out


def _to_tensor(images: Sequence[np.ndarray], size: int) -> torch.Tensor:
    """uint8 RGB [H x W x 3] list -> float [N x 3 x size x size] in [-1, 1]."""
    out = []
    for im in images:
        im = np.asarray(im)
        if im.ndim == 2:
            im = np.stack([im] * 3, -1)
        if im.shape[:2] != (size, size):
            im = cv2.resize(im, (size, size), interpolation=cv2.INTER_AREA)
        out.append(torch.from_numpy(np.ascontiguousarray(im[..., :3])).permute(2, 0, 1))
    return torch.stack(out).float() / 127.5 - 1.0


def _hann_window(n: int) -> torch.Tensor:
    w = torch.hann_window(n + 2, periodic=False)[1:-1]
    return (w[:, None] * w[None, :]).clamp_min(1e-3)


def _window_starts(total: int, win: int, stride: int) -> list[int]:
    if total <= win:
        return [0]
    starts = list(range(0, total - win + 1, stride))
    if starts[-1] != total - win:
        starts.append(total - win)
    return starts


def _gaussian_blur(m: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return m
    return cv2.GaussianBlur(m.astype(np.float32), (0, 0), sigmaX=sigma, borderType=cv2.BORDER_REFLECT)


# ------------------------------------------------------------------------------------------------
# The inspector: model + training glue + reconstruction
# ------------------------------------------------------------------------------------------------
class DDPMInspector:
    """A pixel-space DDPM (v- or ε-prediction) over ``cfg.crop``-px windows of ``cfg.size``-px images."""

    def __init__(self, cfg: ModelConfig | None = None, device: str = "cpu"):
        self.cfg = cfg or ModelConfig()
        self.cfg.validate()
        self.device = torch.device(device)
        self.unet = build_unet(self.cfg.crop, self.cfg.channels, self.cfg.preset).to(self.device)
        self.ema: dict[str, torch.Tensor] | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._opt_state: dict | None = None   # loaded optimizer state waiting for train()
        self.step = 0
        self.losses: list = []
        self.train_meta: dict = {}
        self.scheduler = make_scheduler(self.cfg, "ddpm")

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.unet.parameters())

    # -------------------------------------------------------------------------------- training
    def train(self, images: Sequence[np.ndarray] | Sequence[str | Path], tcfg: TrainConfig | None = None,
              progress: ProgressFn | None = None, cancelled: CancelFn | None = None) -> TrainResult:
        """Train on good images (uint8 RGB arrays or paths) until the step or time budget.

        Continues from ``self.step`` (and the optimizer state) after :meth:`load`, so a resumed
        run counts on. ``progress(fraction, message)`` is called every ``log_every`` steps;
        ``cancelled()`` is polled every step and stops training cleanly (the model is kept).
        """
        from pipelines.mvtec import load_image

        tcfg = tcfg or TrainConfig()
        if tcfg.steps is None and tcfg.minutes is None:
            raise ValueError("give a step budget (steps) or a time budget (minutes)")
        if not 0 < tcfg.t_max <= self.cfg.num_train_timesteps:
            raise ValueError(f"t_max must be in 1..{self.cfg.num_train_timesteps}, got {tcfg.t_max}")
        if len(images) == 0:
            raise ValueError("no training images")
        imgs = [load_image(Path(p), None) if isinstance(p, (str, Path)) else p for p in images]
        data = _to_tensor(imgs, self.cfg.size)               # [N x C x S x S]
        gen = torch.Generator().manual_seed(tcfg.seed * 100003 + self.step)
        unet = self.unet.train()
        params = [p for p in unet.parameters() if p.requires_grad]
        if self.optimizer is None:
            self.optimizer = torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
            if self._opt_state is not None:
                apply_optimizer_state(self.optimizer, self._opt_state, "the loaded DDPM checkpoint")
                self._opt_state = None
        for g in self.optimizer.param_groups:
            g["lr"], g["weight_decay"] = tcfg.lr, tcfg.weight_decay
        if tcfg.ema_decay > 0 and self.ema is None:
            self.ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
        budget = Budget(None if tcfg.steps is None else int(tcfg.steps), tcfg.minutes, self.step)
        window: list[float] = []
        while not (stopped := budget.stop_reason(self.step, cancelled)):
            # 1-2. random augmented crops, noised to t < t_max; target (v or ε) from the scheduler
            x0, noise, t, x_t, target = self.training_batch(data, tcfg, gen)
            # 3. MSE on the target, AdamW step, EMA
            pred = unet(x_t, t).sample
            loss = F.mse_loss(pred, target)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            self.optimizer.step()
            self.step += 1
            if self.ema is not None:
                decay = min(tcfg.ema_decay, (1 + self.step) / (10 + self.step))
                with torch.no_grad():
                    for k, v in unet.state_dict().items():
                        if v.dtype.is_floating_point:
                            self.ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
                        else:
                            self.ema[k].copy_(v)
            window.append(loss.item())
            if len(window) >= tcfg.log_every:
                self.losses.append((self.step, float(np.mean(window))))
                window = []
                report(progress, budget.fraction(self.step), f"step {self.step} loss {self.losses[-1][1]:.4f}")
        unet.eval()
        if window:
            self.losses.append((self.step, float(np.mean(window))))
        secs = budget.elapsed()
        self.train_meta = {**asdict(tcfg), "seconds_last_run": secs,
                           "seconds_total": self.train_meta.get("seconds_total", 0.0) + secs}
        report(progress, 1.0, f"stopped ({stopped}) at step {self.step}")
        return TrainResult(self.step, self.step - budget.start_step, secs,
                           self.losses[-1][1] if self.losses else float("nan"), stopped, losses=list(self.losses))

    def training_batch(self, data: torch.Tensor, tcfg: TrainConfig, gen: torch.Generator):
        """One training batch from ``data`` [N x C x S x S] in [-1, 1].

        returns (x0, noise, t, x_t, target), each [B x C x crop x crop] except t [B]:
        random crops with mask-free geometric augmentation (flips, 90° rotations when
        ``tcfg.rot90``), noise of ``cfg.noise``, t uniform in [0, t_max), x_t = add_noise(x0, noise, t)
        and the target of ``cfg.prediction``: scheduler.get_velocity(x0, noise, t) (v) or noise (epsilon).
        """
        n, _, s, _ = data.shape
        crop, b = self.cfg.crop, tcfg.batch_size
        idx = torch.randint(0, n, (b,), generator=gen)
        ys = torch.randint(0, s - crop + 1, (b,), generator=gen)
        xs = torch.randint(0, s - crop + 1, (b,), generator=gen)
        aug = torch.randint(0, 8, (b, 3), generator=gen)
        crops = []
        for k in range(b):
            c = data[idx[k], :, ys[k]:ys[k] + crop, xs[k]:xs[k] + crop]
            if tcfg.flip_h and aug[k, 0] % 2:
                c = c.flip(-1)
            if tcfg.flip_v and aug[k, 1] % 2:
                c = c.flip(-2)
            if tcfg.rot90:
                c = torch.rot90(c, int(aug[k, 2] % 4), dims=(-2, -1))
            crops.append(c)
        x0 = torch.stack(crops).to(self.device)
        noise = make_noise(self.cfg.noise, x0.shape, gen, device=self.device, **self.cfg.simplex)
        t = torch.randint(0, tcfg.t_max, (b,), generator=gen).to(self.device)
        x_t = self.scheduler.add_noise(x0, noise, t)
        return x0, noise, t, x_t, training_target(self.scheduler, x0, noise, t)

    # -------------------------------------------------------------------------------- checkpoints
    def save(self, path: str | Path) -> Path:
        """Write the checkpoint folder ``path`` (created if needed; files replaced atomically)."""
        from safetensors.torch import save

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().cpu().contiguous() for k, v in self.unet.state_dict().items()}
        atomic_write_bytes(path / "model.safetensors", save(sd))
        if self.ema is not None:
            atomic_write_bytes(path / "ema.safetensors", save({k: v.cpu().contiguous() for k, v in self.ema.items()}))
        groups = None
        if self.optimizer is not None or self._opt_state is not None:
            osd = self.optimizer.state_dict() if self.optimizer is not None else self._opt_state
            groups = save_optimizer(osd, path)["param_groups"]
        meta = {"format": CHECKPOINT_FORMAT, "model": asdict(self.cfg), "step": self.step,
                "noise": self.cfg.noise, "prediction": self.cfg.prediction,
                "size": self.cfg.size, "crop": self.cfg.crop,
                "parameters": self.num_parameters, "has_ema": self.ema is not None,
                "optimizer_param_groups": groups, "losses": self.losses, "train": self.train_meta}
        atomic_write_json(path / "config.json", meta, indent=1)
        return path

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", expect: ModelConfig | None = None) -> "DDPMInspector":
        """Rebuild from a checkpoint folder. ``expect``: refuse a checkpoint of another model config.

        Raises :class:`CheckpointError` with a readable message for a missing folder, a corrupt
        file, or weights that do not fit the architecture in config.json.
        """
        path = Path(path)
        if path.is_file() and path.name in ("config.json", "model.safetensors"):
            path = path.parent
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise CheckpointError(f"{path} is not a DDPM checkpoint folder (no config.json)")
        try:
            meta = json.loads(cfg_file.read_text())
            if meta.get("format") != CHECKPOINT_FORMAT:
                raise CheckpointError(f"{cfg_file} is not a Defect Studio DDPM checkpoint "
                                      f"(format {meta.get('format')!r}, expected {CHECKPOINT_FORMAT!r})")
            cfg = ModelConfig.from_dict(meta["model"])
            cfg.validate()
        except CheckpointError:
            raise
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{cfg_file} is corrupt or not a DDPM checkpoint config: {exc}") from None
        if expect is not None:
            diffs = {k: (getattr(cfg, k), getattr(expect, k))
                     for k in ("size", "crop", "channels", "preset", "noise", "prediction")
                     if getattr(cfg, k) != getattr(expect, k)}
            if diffs:
                desc = ", ".join(f"{k}: checkpoint {a!r} vs requested {b!r}" for k, (a, b) in diffs.items())
                raise CheckpointError(f"{path} holds another model configuration ({desc})")

        obj = cls(cfg, device=device)
        weights = load_tensors(path / "model.safetensors")
        obj._load_weights(obj.unet, weights, path / "model.safetensors")
        if meta.get("has_ema") and (path / "ema.safetensors").is_file():
            ema = load_tensors(path / "ema.safetensors")
            obj._check_keys(ema, path / "ema.safetensors", obj.unet.state_dict())
            obj.ema = {k: v.to(obj.device) for k, v in ema.items()}
        if meta.get("optimizer_param_groups"):          # resumed by train() (None: no optimizer file)
            obj._opt_state = read_optimizer_state(path, meta["optimizer_param_groups"])
        obj.step = int(meta.get("step", 0))
        obj.losses = [tuple(x) for x in meta.get("losses", [])]
        obj.train_meta = meta.get("train", {}) or {}
        return obj

    @staticmethod
    def _check_keys(weights: dict, where: Path, ref: dict) -> None:
        missing = sorted(set(ref) - set(weights))
        unexpected = sorted(set(weights) - set(ref))
        shape = [k for k in ref if k in weights and tuple(weights[k].shape) != tuple(ref[k].shape)]
        if missing or unexpected or shape:
            parts = []
            if missing:
                parts.append(f"{len(missing)} missing tensors (e.g. {missing[0]})")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})")
            if shape:
                k = shape[0]
                parts.append(f"{len(shape)} tensors of another shape (e.g. {k}: "
                             f"{tuple(weights[k].shape)} vs {tuple(ref[k].shape)})")
            raise CheckpointError(f"{where} holds weights of another architecture than its config.json "
                                  f"describes: {'; '.join(parts)}")

    def _load_weights(self, module: torch.nn.Module, weights: dict, where: Path) -> None:
        self._check_keys(weights, where, module.state_dict())
        module.load_state_dict(weights, strict=True)

    # -------------------------------------------------------------------------------- reconstruction
    def _inference_unet(self):
        """The EMA weights when there are any (a copy; the training weights stay untouched)."""
        if self.ema is None:
            return self.unet.eval()
        cached = getattr(self, "_ema_unet", None)
        if cached is None or cached[0] != self.step:
            m = build_unet(self.cfg.crop, self.cfg.channels, self.cfg.preset).to(self.device)
            m.load_state_dict(self.ema)
            self._ema_unet = (self.step, m.eval())
        return self._ema_unet[1]

    def _predict(self, unet, x: torch.Tensor, t: int, stride: int, batch: int) -> torch.Tensor:
        """Model output for full images ``x`` [B x C x S x S] by blending overlapping windows."""
        crop = self.cfg.crop
        _, _, h, w = x.shape
        if h == crop and w == crop:
            return unet(x, torch.full((x.shape[0],), t, device=x.device)).sample
        wy, wx = _window_starts(h, crop, stride), _window_starts(w, crop, stride)
        coords = [(y, xx) for y in wy for xx in wx]
        weight = _hann_window(crop).to(x.device)
        out = torch.zeros_like(x)
        norm = torch.zeros(1, 1, h, w, device=x.device)
        patches = torch.cat([x[:, :, y:y + crop, xx:xx + crop] for y, xx in coords])   # [K*B x C x c x c]
        preds = []
        for i in range(0, patches.shape[0], batch):
            p = patches[i:i + batch]
            preds.append(unet(p, torch.full((p.shape[0],), t, device=x.device)).sample)
        preds = torch.cat(preds)
        B = x.shape[0]
        for k, (y, xx) in enumerate(coords):
            out[:, :, y:y + crop, xx:xx + crop] += preds[k * B:(k + 1) * B] * weight
            norm[:, :, y:y + crop, xx:xx + crop] += weight
        return out / norm

    @torch.no_grad()
    def reconstruct(self, images: np.ndarray | Sequence[np.ndarray], depth: int = 50,
                    noise: str | None = None, seed: int = 0, stride: int = 25,
                    window_stride: int | None = None, batch: int = 16,
                    progress: ProgressFn | None = None) -> np.ndarray:
        """Noise to timestep ``depth`` and denoise with DDIM (every ``stride`` timesteps) to 0.

        images: one uint8 RGB [H x W x 3] or a list of them (resized to cfg.size).
        returns x̂ as float32 [N x S x S x 3] in [0, 1] (S = cfg.size); [S x S x 3] for one image.
        """
        single = isinstance(images, np.ndarray) and images.ndim == 3
        batch_imgs = [images] if single else list(images)
        x0 = _to_tensor(batch_imgs, self.cfg.size).to(self.device)
        xh = self._reconstruct_tensor(x0, depth, noise, seed, stride, window_stride, batch, progress)
        out = ((xh.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy().astype(np.float32)
        return out[0] if single else out

    @torch.no_grad()
    def _reconstruct_tensor(self, x0, depth, noise, seed, stride, window_stride, batch, progress=None):
        """x0 [B x C x S x S] in [-1, 1] -> x̂ (same shape). The start is the largest DDIM timestep
        <= depth (a multiple of ``stride``)."""
        cfg = self.cfg
        kind = noise or cfg.noise
        depth = int(depth)
        if not 0 < depth < cfg.num_train_timesteps:
            raise ValueError(f"depth must be in 1..{cfg.num_train_timesteps - 1}, got {depth}")
        stride = max(1, min(int(stride), depth))
        ddim = make_scheduler(cfg, "ddim")
        ddim.set_timesteps(cfg.num_train_timesteps // stride)
        steps = [int(t) for t in ddim.timesteps if int(t) <= depth]
        t_start = steps[0]
        gen = torch.Generator().manual_seed(int(seed))
        eps = make_noise(kind, x0.shape, gen, device=self.device, **cfg.simplex)
        x = ddim.add_noise(x0, eps, torch.full((x0.shape[0],), t_start, dtype=torch.long))
        unet = self._inference_unet()
        wstride = window_stride or cfg.crop // 2
        for i, t in enumerate(steps):
            out = self._predict(unet, x, t, wstride, batch)      # v or ε, as ddim's prediction_type
            res = ddim.step(out, t, x)
            x = res.prev_sample if t > 0 else res.pred_original_sample
            if progress is not None:
                progress((i + 1) / len(steps), f"DDIM t={t}")
        return x

    @torch.no_grad()
    def residual_map(self, image: np.ndarray, depths: Sequence[int] = DEFAULT_DEPTHS, noise: str | None = None,
                     seeds: Sequence[int] = (0,), stride: int = 25, sigma: float = 4.0,
                     kind: str = "color", out_size: int | None = None,
                     return_reconstruction: bool = False):
        """Anomaly map [H x W] float32 (H, W of ``image`` unless ``out_size``), averaged over depths
        and seeds, Gaussian-smoothed with ``sigma`` (in output pixels).

        kind: 'color' (RGB distance, in [0, sqrt(3)]), 'ssim' (1 - SSIM on grey), 'feature'
        (1 - cosine similarity of pretrained EfficientNet-Lite0 features, strides 4 and 8; needs
        pipelines.backbones and its offline weights) or a '+'-joined sum (see RESIDUAL_KINDS).
        With ``return_reconstruction`` also returns the last x̂ (uint8 RGB at cfg.size).
        """
        maps, recs = self.residual_maps([image], depths, noise, seeds, stride, sigma, kind, out_size)
        return (maps[0], recs[0]) if return_reconstruction else maps[0]

    @torch.no_grad()
    def residual_maps(self, images: Sequence[np.ndarray], depths: Sequence[int] = DEFAULT_DEPTHS,
                      noise: str | None = None, seeds: Sequence[int] = (0,), stride: int = 25,
                      sigma: float = 4.0, kind: str = "color", out_size: int | None = None,
                      batch: int = 16):
        """Batched :meth:`residual_map`: returns (maps [N x H x W], reconstructions [N x S x S x 3] uint8)."""
        if kind not in RESIDUAL_KINDS:
            raise ValueError(f"unknown residual kind {kind!r}; known: {', '.join(RESIDUAL_KINDS)}")
        x0 = _to_tensor(images, self.cfg.size).to(self.device)
        x_in = ((x0 + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
        acc = np.zeros(x_in.shape[:3], np.float32)
        last = None
        for d in depths:
            for sd in seeds:
                xh = self._reconstruct_tensor(x0, d, noise, sd, stride, None, batch)
                xh = ((xh.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
                acc += self._residual(x_in, xh, kind)
                last = xh
        acc /= len(depths) * len(seeds)
        maps = []
        for i, im in enumerate(images):
            h, w = (out_size, out_size) if out_size else np.asarray(im).shape[:2]
            m = cv2.resize(acc[i], (w, h), interpolation=cv2.INTER_LINEAR) if acc[i].shape != (h, w) else acc[i]
            maps.append(_gaussian_blur(m, sigma))
        recs = (np.clip(last, 0, 1) * 255 + 0.5).astype(np.uint8)
        return np.stack(maps), recs

    @torch.no_grad()
    def depth_grid(self, images: Sequence[np.ndarray], depths: Sequence[int] = GRID_DEPTHS,
                   noise: str | None = None, seed: int = 0, stride: int = 25, kind: str = "color",
                   batch: int = 16, progress: ProgressFn | None = None,
                   cancelled: CancelFn | None = None) -> "DepthGrid":
        """Reconstructions and raw residuals of every image at every depth (failure analysis:
        over-smoothing and texture loss grow with the depth). One noise seed for all depths, so the
        rows differ only by the depth. A cancel raises :class:`Cancelled` between depths.

        images: uint8 RGB [H x W x 3] (resized to cfg.size). returns a :class:`DepthGrid` with
        inputs [N x S x S x 3] uint8, reconstructions [D x N x S x S x 3] uint8 and residuals
        [D x N x S x S] float32 (``kind``, unsmoothed).
        """
        if kind not in RESIDUAL_KINDS:
            raise ValueError(f"unknown residual kind {kind!r}; known: {', '.join(RESIDUAL_KINDS)}")
        depths = [int(d) for d in depths]
        if not depths or not images:
            raise ValueError("the grid needs at least one depth and one image")
        x0 = _to_tensor(images, self.cfg.size).to(self.device)
        x_in = ((x0 + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
        recs, res = [], []
        for i, d in enumerate(depths):
            check_cancelled(cancelled, "the depth grid")
            xh = self._reconstruct_tensor(x0, d, noise, seed, stride, None, batch)
            xh = ((xh.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
            res.append(self._residual(x_in, xh, kind))
            recs.append((np.clip(xh, 0, 1) * 255 + 0.5).astype(np.uint8))
            report(progress, (i + 1) / len(depths), f"depth {d} ({i + 1}/{len(depths)})")
        return DepthGrid(depths, (np.clip(x_in, 0, 1) * 255 + 0.5).astype(np.uint8), np.stack(recs),
                         np.stack(res), kind, noise or self.cfg.noise, self.cfg.prediction)

    def _feature_residual(self, x: np.ndarray, xh: np.ndarray) -> np.ndarray:
        """1 - cosine similarity of pretrained backbone features of x and x̂, averaged over the
        stages (strides 4 and 8 at ``FEATURE_INPUT`` px), upsampled to [N x S x S]."""
        extractor = getattr(self, "_feature_extractor", None)
        if extractor is None:
            try:
                from pipelines.backbones import build_backbone
            except ImportError as exc:   # the backbone module is optional for DDPM
                raise ValueError(f"feature residuals need pipelines.backbones ({exc})") from None
            extractor = self._feature_extractor = build_backbone(FEATURE_BACKBONE, FEATURE_LAYERS)
        s = x.shape[1]
        both = torch.from_numpy(np.concatenate([x, xh])).permute(0, 3, 1, 2).float()
        both = F.interpolate(both, size=(FEATURE_INPUT, FEATURE_INPUT), mode="bilinear", align_corners=False)
        n = x.shape[0]
        acc = torch.zeros(n, 1, s, s)
        with torch.no_grad():
            feats = extractor(both)
        for f in feats:
            d = 1 - F.cosine_similarity(f[:n], f[n:], dim=1).unsqueeze(1)
            acc += F.interpolate(d, size=(s, s), mode="bilinear", align_corners=False)
        return (acc[:, 0] / len(feats)).numpy().astype(np.float32)

    def _residual(self, x: np.ndarray, xh: np.ndarray, kind: str) -> np.ndarray:
        """x, xh: [N x S x S x 3] in [0, 1] -> residual [N x S x S] (the parts of ``kind`` summed)."""
        out = np.zeros(x.shape[:3], np.float32)
        if "feature" in kind:
            out += self._feature_residual(x, xh)
        if "color" in kind:
            out += np.sqrt(((x - xh) ** 2).sum(-1))
        if "ssim" in kind:
            from skimage.metrics import structural_similarity
            for i in range(x.shape[0]):
                g1 = x[i].mean(-1)
                g2 = xh[i].mean(-1)
                _, s = structural_similarity(g1, g2, data_range=1.0, win_size=7, full=True)
                out[i] += (1 - s).clip(0, None).astype(np.float32)
        return out

    @staticmethod
    def score(amap: np.ndarray, top_percent: float = 0.0) -> float:
        """Image score: the map's max (``top_percent`` 0) or the mean of its top ``top_percent`` %."""
        flat = np.asarray(amap, np.float32).ravel()
        if top_percent <= 0:
            return float(flat.max())
        k = max(1, int(flat.size * top_percent / 100.0))
        return float(np.partition(flat, -k)[-k:].mean())

    def evaluate(self, category_root: str | Path, depths: Sequence[int] = DEFAULT_DEPTHS, noise: str | None = None,
                 seeds: Sequence[int] = (0,), stride: int = 25, sigma: float = 4.0, kind: str = "color",
                 eval_size: int = 256, top_percent: float = 0.0, batch_images: int = 4,
                 progress: ProgressFn | None = None, cancelled: CancelFn | None = None) -> EvalResult:
        """Residual maps for every test image of an MVTec-layout category and the shared metrics.

        Maps and masks are compared at ``eval_size`` px. metrics: image_auroc, pixel_auroc, aupro,
        image_f1_max, pixel_f1_max (pipelines.metrics.evaluate) plus ms_per_image.
        """
        from pipelines import metrics as M
        from pipelines.mvtec import check_sizes, load_category, load_image, load_mask

        cat = load_category(category_root)
        for note in check_sizes(cat):           # a mask of another size than its image raises
            if progress is not None:
                progress(0.0, f"note: {note}")
        samples = cat.test
        images = [load_image(s.path, eval_size) for s in samples]
        masks = np.stack([load_mask(s, eval_size) for s in samples])
        maps = []
        t0 = time.monotonic()
        for i in range(0, len(images), batch_images):
            check_cancelled(cancelled, "evaluation")      # raises Cancelled
            m, _ = self.residual_maps(images[i:i + batch_images], depths, noise, seeds, stride, sigma, kind,
                                      out_size=eval_size)
            maps.append(m)
            if progress is not None:
                progress(min(1.0, (i + batch_images) / len(images)), f"{min(i + batch_images, len(images))}/{len(images)} images")
        ms = (time.monotonic() - t0) * 1000.0 / len(images)
        maps = np.concatenate(maps)
        scores = np.array([self.score(m, top_percent) for m in maps])
        labels = np.array([int(s.is_anomaly) for s in samples])
        met = M.evaluate(labels, scores, masks, maps)
        met["ms_per_image"] = ms
        met["depths"] = list(map(int, depths))
        met["noise"] = noise or self.cfg.noise
        return EvalResult(met, samples, scores, maps, masks, images)


def train_category(category_root: str | Path, out: str | Path | None, cfg: ModelConfig | None = None,
                   tcfg: TrainConfig | None = None, resume: bool = False,
                   progress: ProgressFn | None = None, cancelled: CancelFn | None = None,
                   device: str = "cpu") -> tuple[DDPMInspector, TrainResult]:
    """Train on CATEGORY/train/good (MVTec layout; LayoutError otherwise), save to ``out``.

    With ``resume`` and an existing checkpoint at ``out``, loads it (refusing another model
    config) and continues the step count; ``tcfg.steps`` is then the total step target.
    """
    from pipelines.mvtec import load_category

    cat = load_category(category_root, require_masks=False, require_test=False)
    if resume and out is not None and (Path(out) / "config.json").is_file():
        insp = DDPMInspector.load(out, device=device, expect=cfg)
    else:
        insp = DDPMInspector(cfg or ModelConfig(), device=device)
    result = insp.train(cat.train, tcfg, progress, cancelled)
    if out is not None:
        insp.save(out)
    return insp, result
