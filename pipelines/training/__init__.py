"""The training toolkit shared by every trainer (:mod:`pipelines.lora`, :mod:`pipelines.wall_train`,
:mod:`pipelines.controlnet_train`, :mod:`pipelines.pixel_inpaint_model`, :mod:`pipelines.ddpm`):
configs, training samples, the budget / stop rule, atomic checkpoints, optimizer state, the loss
history, Accelerate, the result, the one cancel exception — and, in :mod:`pipelines.training.trainers`,
the one table of trainers (``TRAINERS``: kind → config class and ``run_from_config``) that the
``train --kind`` CLI and the Training tab dispatch through.

Every name is importable from here (``from pipelines.training import Cancelled``); the homes:

* :mod:`~pipelines.training.base` — ``ProgressFn`` / ``CancelFn`` (``progress(fraction, message)``,
  ``cancelled() -> bool``), :func:`report`, :func:`check_cancelled`; :class:`Cancelled` (the one
  "the user cancelled" exception), :class:`ConfigError`, :class:`TrainDataError`,
  :class:`CheckpointError`; :class:`ConfigMixin` (``from_dict`` / ``from_yaml`` with unknown keys
  refused, ``to_dict``, ``check_run``), :func:`check`, :func:`augment_config`, and
  :class:`RunConfig` — the run fields every checkpointed trainer's config shares.
* :mod:`~pipelines.training.data` — :class:`Sample`, :func:`training_data`,
  :func:`samples_from_category`, :func:`load_training_samples`, :func:`good_images`,
  :func:`check_samples`: defects to train on, through the guard.
* :mod:`~pipelines.training.checkpoints` — :class:`Checkpoints` / :func:`latest_checkpoint` (the
  output folder layout below), the trainer state, :func:`save_optimizer` / :func:`load_optimizer`
  (AdamW state as flat safetensors), :func:`save_validation_grid`.
* :mod:`~pipelines.training.loop` — :func:`stop_reason` / :class:`Budget` (``max_steps`` in total,
  ``minutes`` of wall clock, cancel), :func:`append_history` / :func:`read_history`,
  :func:`make_accelerator`, :class:`TrainResult`, :class:`CheckpointedTrainer` (the loop glue of
  the checkpointed trainers).

Output folder layout of a checkpointed trainer::

    OUT/latest                       text: the name of the newest complete checkpoint (written last)
    OUT/checkpoints/step-0000200/    one complete checkpoint (renamed into place when complete)
        trainer_state.json           kind, step, losses, optimizer param_groups, config (+ trainer keys)
        optimizer.safetensors        flattened optimizer state ("<param id>.<key>" → tensor)
        …                            the trainer's weights
    OUT/history.jsonl                one {"step", "loss", "time"} line per log (live loss curve)
    OUT/validation/step-0000200.png  validation grids

Never imports gradio or ``studio``; torch, safetensors, accelerate and cv2 are imported where used,
so importing this package (e.g. for ``ProgressFn``) stays cheap.
"""
from __future__ import annotations

from pipelines.training.base import (CHECKPOINTS, HISTORY_FILE, LATEST, OPTIMIZER_FILE, STATE_FILE,
                                     VALIDATION_DIR, CancelFn, Cancelled, CheckpointError, ConfigError,
                                     ConfigMixin, ProgressFn, RunConfig, TrainDataError, augment_config,
                                     check, check_cancelled, report)
from pipelines.training.checkpoints import (Checkpoints, apply_optimizer_state, latest_checkpoint,
                                            load_optimizer, load_tensors, read_optimizer_state,
                                            read_trainer_state, save_optimizer, save_validation_grid,
                                            validation_row, write_trainer_state)
from pipelines.training.data import (Sample, TrainingData, check_samples, good_images, load_training_samples,
                                     samples_from_category, training_data)
from pipelines.training.loop import (Budget, CheckpointedTrainer, TrainResult, append_history,
                                     make_accelerator, read_history, stop_reason)

__all__ = ["CHECKPOINTS", "HISTORY_FILE", "LATEST", "OPTIMIZER_FILE", "STATE_FILE", "VALIDATION_DIR",
           "Budget", "CancelFn", "Cancelled", "CheckpointError", "CheckpointedTrainer", "Checkpoints",
           "ConfigError", "ConfigMixin", "ProgressFn", "RunConfig", "Sample", "TrainDataError",
           "TrainResult", "TrainingData", "append_history", "apply_optimizer_state", "augment_config",
           "check", "check_cancelled", "check_samples", "good_images", "latest_checkpoint",
           "load_optimizer", "load_tensors", "load_training_samples", "make_accelerator",
           "read_history", "read_optimizer_state", "read_trainer_state", "report", "samples_from_category",
           "save_optimizer", "save_validation_grid", "validation_row", "stop_reason", "training_data", "write_trainer_state"]
