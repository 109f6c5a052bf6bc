"""The run around a trainer's own model and step: the budget / stop rule (:func:`stop_reason`,
:class:`Budget`), the loss history, Accelerate, :class:`TrainResult` and
:class:`CheckpointedTrainer` (the one training loop, ``_loop``)."""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from pipelines.training.base import HISTORY_FILE, CancelFn, ProgressFn, report
from pipelines.training.checkpoints import Checkpoints, load_optimizer

# ================================================================================================
# Budget: when a training loop stops, how far it is
# ================================================================================================
def stop_reason(step: int, max_steps: int | None, deadline: float | None,
                cancelled: CancelFn | None) -> str | None:
    """Why a training loop stops before its next step: "steps" (``max_steps`` reached),
    "time" (``time.monotonic()`` past ``deadline``), "cancelled", or None to go on."""
    if max_steps is not None and step >= max_steps:
        return "steps"
    if deadline is not None and time.monotonic() >= deadline:
        return "time"
    if cancelled is not None and cancelled():
        return "cancelled"
    return None


class Budget:
    """The budget of one run, started now: ``max_steps`` counts all steps of the model (resumed
    ones included), ``minutes`` the wall clock of this run."""

    def __init__(self, max_steps: int | None, minutes: float | None, start_step: int = 0):
        self.max_steps, self.start_step = max_steps, int(start_step)
        self.t_start = time.monotonic()
        self.deadline = None if minutes is None else self.t_start + 60.0 * minutes

    def elapsed(self) -> float:
        return time.monotonic() - self.t_start

    def stop_reason(self, step: int, cancelled: CancelFn | None) -> str | None:
        return stop_reason(step, self.max_steps, self.deadline, cancelled)

    def fraction(self, step: int) -> float:
        """How much of the budget is used: the larger of the step and the time share (0 if none)."""
        fr = []
        if self.max_steps:
            fr.append((step - self.start_step) / max(1, self.max_steps - self.start_step))
        if self.deadline:
            fr.append(self.elapsed() / (self.deadline - self.t_start))
        return max(fr) if fr else 0.0


# ================================================================================================
# Loss history, Accelerate, the result
# ================================================================================================
def append_history(out_dir: Path, step: int, loss: float, **extra) -> None:
    with open(Path(out_dir) / HISTORY_FILE, "a") as fh:
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
    import torch
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
    checkpoint: str | None = None                  # the latest checkpoint folder (if the trainer writes them)
    losses: list = field(default_factory=list)     # [(step, loss)]
    validation: str | None = None                  # newest validation grid PNG


# ================================================================================================
# The loop glue of a checkpointed trainer
# ================================================================================================
class CheckpointedTrainer:
    """What the LoRA and pixel-inpaint trainers share around their own model and step:

    ``self.step`` (total steps), ``self.losses`` (live ``[(step, loss)]``, also appended to
    ``OUT/history.jsonl``), ``self.ckpt`` (:class:`Checkpoints` of ``cfg.output_dir``), the run's
    :class:`Budget`, and the :class:`TrainResult`. A subclass's ``run`` reads::

        acc = self._open()
        ...build, resume (self._restore)...
        self._begin(progress, cancelled)
        stopped = self._loop(acc, model, micro_step, save, validate)   # steps, checkpoints, grids
        return self._result(stopped)
    """

    def __init__(self, cfg):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.ckpt = Checkpoints(self.out, cfg.checkpoint_limit)
        self.losses: list[tuple[int, float]] = []
        self.step = 0
        self.last_validation: str | None = None

    def _open(self):
        """Create ``OUT``, remove the half-written checkpoints of a crash; the (seeded) Accelerator."""
        c = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        self.ckpt.clean_partial()
        return make_accelerator(c.mixed_precision, c.gradient_accumulation_steps, c.seed)

    def _restore(self, folder: Path, opt, state: dict) -> None:
        """The optimizer, step count and loss history of the checkpoint ``folder``."""
        load_optimizer(opt, folder, state["optimizer"])
        self.step = int(state["step"])
        self.losses = [tuple(x) for x in state.get("losses", [])]

    def _begin(self, progress: ProgressFn | None, cancelled: CancelFn | None) -> None:
        """Start the clock of this run (after resuming)."""
        self._progress, self._cancelled = progress, cancelled
        self._window: list[float] = []
        self.last_loss = float("nan")
        self.budget = Budget(self.cfg.max_steps, self.cfg.minutes, self.step)

    def _stop_reason(self) -> str | None:
        return self.budget.stop_reason(self.step, self._cancelled)

    def _end_step(self, losses: Sequence[float], is_main: bool) -> None:
        """Count the step; every ``log_every`` steps the mean loss of the window is logged."""
        self._window.extend(losses)
        self.step += 1
        if self.step % self.cfg.log_every == 0:
            self.last_loss = float(np.mean(self._window))
            self._window = []
            self.losses.append((self.step, self.last_loss))
            if is_main:
                append_history(self.out, self.step, self.last_loss)

    def _report_step(self) -> None:
        # before the first logged window the loss is the running mean of this window (never "nan")
        loss = self.last_loss if math.isfinite(self.last_loss) or not self._window else float(np.mean(self._window))
        report(self._progress, self.budget.fraction(self.step),
               f"step {self.step} loss {loss:.4f}" if math.isfinite(loss) else f"step {self.step}")

    def _save(self, acc, write: Callable[[Path], None]) -> None:
        """Checkpoint ``self.step`` (the main process writes, every process waits)."""
        if acc.is_main_process:
            self.ckpt.save(self.step, write)
        acc.wait_for_everyone()

    def _loop(self, acc, model, micro_step: Callable[[], float], save: Callable[[], None],
              validate: Callable[[Any], Any] | None = None, before_step: Callable[[], None] | None = None,
              after_step: Callable[[], None] | None = None) -> str:
        """The loop every trainer runs once built, resumed and started (:meth:`_begin`): per step
        ``before_step()`` (a stage change), ``micro_step()`` → loss for each gradient-accumulation
        step, ``after_step()`` (a learning-rate schedule), (main process) ``validate(unwrapped model)`` →
        the grid's path every ``validate_every`` steps, a checkpoint every ``checkpoint_every``
        steps, and the progress line; until the budget ends or the run is
        cancelled (a cancel stops after the current step). Then a last checkpoint unless the latest
        one is of this very step. Returns the stop reason (for :meth:`_result`)."""
        c = self.cfg
        model.train()
        while not (stopped := self._stop_reason()):
            if before_step is not None:
                before_step()
            losses = [micro_step() for _ in range(c.gradient_accumulation_steps)]
            self._end_step(losses, acc.is_main_process)
            if after_step is not None:
                after_step()
            if validate is not None and c.validate_every and self.step % c.validate_every == 0 \
                    and acc.is_main_process:
                self.last_validation = str(validate(acc.unwrap_model(model)))
                model.train()
            if self.step % c.checkpoint_every == 0:
                save()                # after the grid: a checkpoint of this step keeps it
            self._report_step()
        latest = self.ckpt.latest()
        if latest is None or latest.name != Checkpoints.name(self.step):
            save()
        return stopped

    def _result(self, stopped: str) -> TrainResult:
        if self._window and not math.isfinite(self.last_loss):
            self.last_loss = float(np.mean(self._window))
        report(self._progress, 1.0, f"stopped ({stopped}) at step {self.step}")
        latest = self.ckpt.latest()
        return TrainResult(self.step, self.step - self.budget.start_step, self.budget.elapsed(), self.last_loss,
                           stopped, str(latest) if latest else None, list(self.losses), self.last_validation)
