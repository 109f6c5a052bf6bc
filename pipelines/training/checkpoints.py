"""Atomic checkpoints (:class:`Checkpoints`, :func:`latest_checkpoint`), the trainer state file,
safetensors reading, validation grids and the optimizer state as flat safetensors."""
from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Callable

import numpy as np

from pipelines.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text
from pipelines.training.base import CHECKPOINTS, LATEST, OPTIMIZER_FILE, STATE_FILE, VALIDATION_DIR, CheckpointError

# ================================================================================================
# Atomic checkpoints
# ================================================================================================
class Checkpoints:
    """``OUT/checkpoints/step-NNNNNNN`` folders, each written in a hidden temp folder and renamed
    into place when complete; ``OUT/latest`` (the pointer) is replaced last. At most ``limit``
    checkpoints are kept (0 = keep all); the latest is never pruned."""

    def __init__(self, out_dir: str | Path, limit: int = 3):
        self.out = Path(out_dir)
        self.dir = self.out / CHECKPOINTS
        self.limit = int(limit)

    @staticmethod
    def name(step: int) -> str:
        return f"step-{int(step):07d}"

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None (a dangling pointer falls back to the newest
        complete folder)."""
        ptr = self.out / LATEST
        if ptr.is_file():
            cand = self.dir / ptr.read_text().strip()
            if cand.is_dir() and (cand / STATE_FILE).is_file():
                return cand
        done = self.all()
        return done[-1] if done else None

    def all(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.iterdir()
                      if p.is_dir() and p.name.startswith("step-") and (p / STATE_FILE).is_file())

    def clean_partial(self) -> None:
        if self.dir.is_dir():
            for p in self.dir.iterdir():
                if p.name.startswith(".tmp-"):
                    shutil.rmtree(p, ignore_errors=True)

    def save(self, step: int, write: Callable[[Path], None]) -> Path:
        """Run ``write(tmp_folder)`` then publish it as ``step-NNNNNNN``. Any failure (disk full,
        cancel, crash) removes the temp folder, keeps the previous latest and raises
        :class:`CheckpointError`."""
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".tmp-{self.name(step)}-{uuid.uuid4().hex[:8]}"
        final = self.dir / self.name(step)
        try:
            tmp.mkdir()
            write(tmp)
            if final.exists():                       # re-saving the same step (e.g. after resume)
                old = self.dir / f".tmp-old-{uuid.uuid4().hex[:8]}"
                final.rename(old)
                shutil.rmtree(old, ignore_errors=True)
            tmp.rename(final)
            atomic_write_text(self.out / LATEST, final.name)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            prev = self.latest()
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            raise CheckpointError(
                f"could not write checkpoint {final.name} in {self.dir} ({type(exc).__name__}: {exc})"
                f" — {'the previous checkpoint ' + prev.name + ' stays the latest' if prev else 'no checkpoint was kept'}"
                "; free disk space and resume") from exc
        self._prune(final)
        return final

    def _prune(self, keep: Path) -> None:
        if self.limit <= 0:
            return
        done = [p for p in self.all() if p != keep]
        for p in done[: max(0, len(done) - (self.limit - 1))]:
            shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder under a training output folder (None if none); a
    checkpoint folder itself is returned as is. For LoRA runs pass it as both ``lora=`` and
    ``embedding=`` of the sd-inpaint backend."""
    out = Path(out_dir)
    if (out / STATE_FILE).is_file():
        return out
    return Checkpoints(out).latest()


def write_trainer_state(folder: Path, kind: str, step: int, losses: list, optimizer: dict,
                        **extra) -> None:
    """``trainer_state.json``: ``{"kind", "step", "losses", "optimizer", **extra}``."""
    atomic_write_json(folder / STATE_FILE, {"kind": kind, "step": step, "losses": losses,
                                            "optimizer": optimizer, **extra}, default=list)


def read_trainer_state(folder: Path) -> dict:
    return json.loads((folder / STATE_FILE).read_text())


def load_tensors(path: Path) -> dict:
    """A safetensors file → ``{name: tensor}``; missing or corrupt → :class:`CheckpointError`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is corrupt or not a safetensors file ({exc})") from None


def validation_row(pipe, cells: list, seeds, **kwargs) -> np.ndarray:
    """One row of a validation grid: ``cells`` (the inputs shown first) then ``pipe(**kwargs)``'s
    first image for each seed (a CPU generator seeded with it, ``output_type="np"``) as uint8."""
    import torch
    row = list(cells)
    for s in seeds:
        out = pipe(**kwargs, output_type="np", generator=torch.Generator("cpu").manual_seed(int(s))).images[0]
        row.append(np.clip(np.round(out * 255), 0, 255).astype(np.uint8))
    return np.concatenate(row, 1)


def save_validation_grid(out_dir: Path, step: int, grid: np.ndarray) -> Path:
    """``OUT/validation/step-NNNNNNN.png`` from an RGB uint8 grid, written atomically."""
    import cv2
    path = Path(out_dir) / VALIDATION_DIR / f"{Checkpoints.name(step)}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, png = cv2.imencode(".png", cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"could not encode the validation grid {path}")
    return atomic_write_bytes(path, png.tobytes())


# ================================================================================================
# Optimizer state: flat safetensors ("<param id>.<key>") + param_groups kept as JSON by the caller
# ================================================================================================
def save_optimizer(opt, folder: Path) -> dict:
    """Flatten an optimizer's state (the optimizer or its ``state_dict()``) into
    ``folder/optimizer.safetensors``; returns ``{"param_groups": [...]}`` (JSON) for the caller."""
    import torch
    from safetensors.torch import save
    sd = opt if isinstance(opt, dict) else opt.state_dict()
    flat = {f"{pid}.{k}": torch.as_tensor(v).detach().cpu().contiguous()
            for pid, st in sd["state"].items() for k, v in st.items()}
    atomic_write_bytes(Path(folder) / OPTIMIZER_FILE, save(flat))
    return {"param_groups": sd["param_groups"]}


def read_optimizer_state(folder: Path, param_groups: list) -> dict | None:
    """The ``state_dict`` saved by :func:`save_optimizer` (None when the folder has no optimizer
    file); ``param_groups`` as it returned them."""
    path = Path(folder) / OPTIMIZER_FILE
    if not path.is_file():
        return None
    state: dict = {}
    for key, v in load_tensors(path).items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    return {"state": state, "param_groups": param_groups}


def apply_optimizer_state(opt, saved: dict, where: Path | str) -> None:
    """Load a :func:`read_optimizer_state` dict into ``opt`` (its parameters in the same order);
    other parameter groups → :class:`CheckpointError`."""
    groups = [dict(g) for g in saved["param_groups"]]
    cur = opt.state_dict()["param_groups"]
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in cur]:
        raise CheckpointError(f"{where}: the optimizer state does not match these parameters "
                              "(another model or rank) — start a new output folder")
    for g_saved, g_cur in zip(groups, cur):
        g_saved["params"] = g_cur["params"]
    opt.load_state_dict({"state": saved["state"], "param_groups": groups})


def load_optimizer(opt, folder: Path, groups: dict) -> None:
    """Resume ``opt`` from ``folder`` (``groups``: what :func:`save_optimizer` returned)."""
    saved = read_optimizer_state(folder, groups["param_groups"])
    if saved is not None:
        apply_optimizer_state(opt, saved, folder)


