"""The one table of trainers: ``TRAINERS[kind]`` → its config class and its ``run_from_config``.

The ``train --kind`` CLI (:mod:`studio.__main__`) and the Training tab (:mod:`studio.ui.training_tab`
and its wall / ControlNet panels) dispatch through it; no trainer hands a config to another (the
wall-colour LoRA is its own kind, :mod:`pipelines.wall_train`, built on :mod:`pipelines.lora`).

A trainer's module imports torch at module level, so the table names modules and imports one
only when its config class or its run is asked for: listing the kinds (CLI help, the tab's
choices) stays cheap. **Adding a trainer** = a module with a :class:`pipelines.training.RunConfig`
subclass and ``run_from_config(cfg, progress, cancelled) -> TrainResult``, and one line here.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module

from pipelines.training.base import CancelFn, ProgressFn


@dataclass(frozen=True)
class Trainer:
    kind: str          # the ``train --kind`` value
    module: str        # where the trainer lives (imported on use)
    config: str        # its config class (a RunConfig) in ``module``
    label: str         # one line for the Training tab's choices

    def config_class(self) -> type:
        return getattr(import_module(self.module), self.config)

    def run(self, cfg, progress: ProgressFn | None = None, cancelled: CancelFn | None = None):
        """Load ``cfg.data`` as this trainer reads it and train (``run_from_config``) → TrainResult."""
        return import_module(self.module).run_from_config(cfg, progress, cancelled)


TRAINERS: dict[str, Trainer] = {t.kind: t for t in (
    Trainer("lora", "pipelines.lora", "LoraTrainConfig", "LoRA + damage embedding (SD 1.5 inpainting folder)"),
    Trainer("pixel-inpaint", "pipelines.pixel_inpaint_model", "PixelInpaintConfig",
            "pixel-inpaint (offline, trains from scratch)"),
    Trainer("wall", "pipelines.wall_train", "WallTrainConfig", "wall-colour LoRA (a folder of photos + wall masks)"),
    Trainer("controlnet", "pipelines.controlnet_train", "ControlNetTrainConfig",
            "ControlNet on the reference defects (masks as the control image)"),
)}
