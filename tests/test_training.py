"""The training toolkit (pipelines.training) and atomic writes (pipelines.fileio): behaviour, not
internals — what a crash leaves on disk, which checkpoint is the latest, why a loop stops, and
that every trainer shares one Cancelled / CheckpointError / TrainResult."""
from __future__ import annotations

import errno
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines import fileio
from pipelines import training as T

ROOT = Path(__file__).resolve().parent.parent
BOTTLE = ROOT / "assets" / "demo" / "bottle"


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------------------------------ fileio
def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "config.json"
    fileio.atomic_write_json(target, {"step": 3, "name": "é"}, indent=1)
    assert json.loads(target.read_text(encoding="utf-8")) == {"step": 3, "name": "é"}
    fileio.atomic_write_text(target, "new")
    fileio.atomic_write_bytes(tmp_path / "w.bin", b"\x00\x01")
    assert target.read_text() == "new" and (tmp_path / "w.bin").read_bytes() == b"\x00\x01"
    assert _names(tmp_path) == ["config.json", "w.bin"]


def test_atomic_files_get_the_permissions_of_a_plain_open(tmp_path):
    (tmp_path / "plain").write_bytes(b"x")
    fileio.atomic_write_bytes(tmp_path / "atomic", b"x")
    assert (tmp_path / "atomic").stat().st_mode == (tmp_path / "plain").stat().st_mode


def test_write_failing_midway_keeps_the_old_file_and_no_partial_one(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old complete file")
    with pytest.raises(RuntimeError, match="crash while writing"):
        with fileio.atomic_open(target) as fh:
            fh.write(b"half of the new")
            raise RuntimeError("crash while writing")
    assert target.read_bytes() == b"old complete file"
    assert _names(tmp_path) == ["model.safetensors"]
    # a new file that fails mid-way does not appear at all
    with pytest.raises(RuntimeError):
        with fileio.atomic_open(tmp_path / "new.bin") as fh:
            fh.write(b"partial")
            raise RuntimeError("crash")
    assert _names(tmp_path) == ["model.safetensors"]


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_disk_errors_keep_the_old_file(tmp_path, monkeypatch, failing):
    target = tmp_path / "latest"
    target.write_text("step-0000010")

    def boom(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio.os, failing, boom)
    with pytest.raises(OSError, match="No space left"):
        fileio.atomic_write_text(target, "step-0000020")
    monkeypatch.undo()
    assert target.read_text() == "step-0000010"
    assert _names(tmp_path) == ["latest"]


def test_png_writer_failing_midway_leaves_nothing(tmp_path):
    from pipelines.imageio import write_png_atomic
    with pytest.raises(Exception):
        write_png_atomic(tmp_path / "out" / "a.png", np.zeros((4, 4, 7), np.uint8))   # not an image
    assert _names(tmp_path / "out") == []
    path = write_png_atomic(tmp_path / "out" / "b.png", np.full((4, 4, 3), 200, np.uint8))
    from PIL import Image
    assert np.asarray(Image.open(path)).min() == 200 and _names(tmp_path / "out") == ["b.png"]


# ------------------------------------------------------------------------------------------ checkpoints
def _write_state(step: int):
    def write(folder: Path) -> None:
        (folder / "weights.bin").write_bytes(bytes([step]))
        T.write_trainer_state(folder, "test", step, [(step, 0.5)], {"param_groups": []})
    return write


def test_checkpoints_prune_to_the_limit_and_latest_is_the_newest(tmp_path):
    ck = T.Checkpoints(tmp_path, limit=2)
    for step in (1, 2, 3, 4, 5):
        ck.save(step, _write_state(step))
        assert (tmp_path / "latest").read_text() == f"step-{step:07d}"
    assert [p.name for p in ck.all()] == ["step-0000004", "step-0000005"]
    assert ck.latest() == tmp_path / "checkpoints" / "step-0000005"
    assert T.latest_checkpoint(tmp_path) == ck.latest()
    assert T.latest_checkpoint(ck.latest()) == ck.latest()              # a checkpoint folder itself
    state = T.read_trainer_state(ck.latest())
    assert list(state) == ["kind", "step", "losses", "optimizer"] and state["step"] == 5
    # limit 0 keeps every checkpoint
    keep = T.Checkpoints(tmp_path / "all", limit=0)
    for step in (1, 2, 3):
        keep.save(step, _write_state(step))
    assert len(keep.all()) == 3


def test_failed_checkpoint_keeps_the_previous_latest(tmp_path):
    ck = T.Checkpoints(tmp_path, limit=3)
    ck.save(10, _write_state(10))

    def disk_full(folder: Path) -> None:
        (folder / "weights.bin").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(T.CheckpointError, match="No space left.*step-0000010 stays the latest"):
        ck.save(20, disk_full)
    assert ck.latest().name == "step-0000010" and (tmp_path / "latest").read_text() == "step-0000010"
    assert _names(tmp_path / "checkpoints") == ["step-0000010"]          # no temp folder left


def test_incomplete_folders_and_dangling_pointers_are_never_the_latest(tmp_path):
    ck = T.Checkpoints(tmp_path)
    ck.save(5, _write_state(5))
    (tmp_path / "checkpoints" / "step-0000009").mkdir()               # no trainer_state.json: a crash
    (tmp_path / "checkpoints" / ".tmp-step-0000007-abcd").mkdir()     # a crashed write
    assert ck.latest().name == "step-0000005"
    (tmp_path / "latest").write_text("step-0000123")                  # points at nothing
    assert ck.latest().name == "step-0000005"
    ck.clean_partial()
    assert ".tmp-step-0000007-abcd" not in _names(tmp_path / "checkpoints")


# ------------------------------------------------------------------------------------------ stop rule
def test_stop_reason_steps_time_cancel():
    past, future = -1.0, float("inf")
    assert T.stop_reason(4, 5, future, lambda: False) is None
    assert T.stop_reason(5, 5, future, lambda: False) == "steps"
    assert T.stop_reason(0, None, past, None) == "time"
    assert T.stop_reason(0, None, None, lambda: True) == "cancelled"
    assert T.stop_reason(5, 5, past, lambda: True) == "steps"          # the budget wins over a cancel
    assert T.stop_reason(10**6, None, None, None) is None             # no budget: never by itself


def test_budget_fraction_and_deadline(monkeypatch):
    clock = {"t": 100.0}
    monkeypatch.setattr(time, "monotonic", lambda: clock["t"])
    b = T.Budget(max_steps=14, minutes=1.0, start_step=4)             # resumed at step 4
    assert b.fraction(9) == pytest.approx(0.5) and b.stop_reason(9, None) is None
    clock["t"] += 45.0                                                # 3/4 of the minute
    assert b.fraction(9) == pytest.approx(0.75) and b.elapsed() == pytest.approx(45.0)
    clock["t"] += 15.0
    assert b.stop_reason(9, None) == "time"
    assert b.stop_reason(14, None) == "steps"
    assert T.Budget(None, None).fraction(3) == 0.0


def test_report_clamps_and_check_cancelled_raises():
    seen = []
    T.report(lambda f, m: seen.append((f, m)), 1.7, "done")
    T.report(lambda f, m: seen.append((f, m)), -0.2, "start")
    T.report(None, 0.5, "nobody listens")
    assert seen == [(1.0, "done"), (0.0, "start")]
    T.check_cancelled(None)
    T.check_cancelled(lambda: False)
    with pytest.raises(T.Cancelled, match="evaluation cancelled"):
        T.check_cancelled(lambda: True, "evaluation")


# ------------------------------------------------------------------------------------------ optimizer
def _adam(seed: int = 0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    for _ in range(3):
        net(torch.randn(5, 3)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return net, opt


def test_optimizer_state_round_trip_and_mismatch(tmp_path):
    net, opt = _adam()
    groups = T.save_optimizer(opt, tmp_path)
    assert (tmp_path / "optimizer.safetensors").is_file() and set(groups) == {"param_groups"}
    json.dumps(groups)                                                 # stored as JSON by the caller
    net2, opt2 = _adam(seed=1)
    T.load_optimizer(opt2, tmp_path, json.loads(json.dumps(groups)))
    for a, b in zip(opt.state.values(), opt2.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and float(a["step"]) == float(b["step"]) == 3.0
    # from a state dict (DDPM keeps a loaded one until train()): the same file
    (tmp_path / "sd").mkdir()
    T.save_optimizer(opt.state_dict(), tmp_path / "sd")
    assert (tmp_path / "sd" / "optimizer.safetensors").read_bytes() == (tmp_path / "optimizer.safetensors").read_bytes()
    saved = T.read_optimizer_state(tmp_path, groups["param_groups"])
    assert sorted(saved["state"]) == [0, 1, 2, 3]
    other = torch.optim.AdamW(torch.nn.Linear(3, 4).parameters())
    with pytest.raises(T.CheckpointError, match="does not match these parameters"):
        T.apply_optimizer_state(other, saved, tmp_path)
    assert T.read_optimizer_state(tmp_path / "none", []) is None


def test_corrupt_tensor_file_is_a_checkpoint_error(tmp_path):
    (tmp_path / "optimizer.safetensors").write_bytes(b"\x00garbage" * 4)
    with pytest.raises(T.CheckpointError, match="corrupt"):
        T.read_optimizer_state(tmp_path, [])
    with pytest.raises(T.CheckpointError, match="missing"):
        T.load_tensors(tmp_path / "model.safetensors")


# ------------------------------------------------------------------------------------------ configs
@dataclass
class _Cfg(T.ConfigMixin):
    output_dir: str = ""
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"
    max_steps: int | None = 10
    minutes: float | None = None
    checkpoint_every: int = 5
    checkpoint_limit: int = 2

    def __post_init__(self):
        self.check_run()


def test_config_overrides_unknown_keys_and_run_checks(tmp_path):
    cfg = _Cfg.from_dict({"output_dir": "a", "max_steps": 3}, max_steps=7, minutes=None)
    assert (cfg.max_steps, cfg.minutes) == (7, None)                  # None overrides are ignored
    with pytest.raises(T.ConfigError, match="unknown _Cfg key.*stepz.*known keys: output_dir"):
        _Cfg.from_dict({"output_dir": "a", "stepz": 3})
    with pytest.raises(T.ConfigError, match="output_dir is required"):
        _Cfg.from_dict({})
    with pytest.raises(T.ConfigError, match="the run needs a budget"):
        _Cfg.from_dict({"output_dir": "a", "max_steps": None})
    with pytest.raises(T.ConfigError, match="mixed_precision must be"):
        _Cfg.from_dict({"output_dir": "a", "mixed_precision": "fp8"})
    (tmp_path / "c.yaml").write_text("output_dir: y\ncheckpoint_limit: 0\n")
    assert _Cfg.from_yaml(tmp_path / "c.yaml", batch_size=4).to_dict()["batch_size"] == 4


# ------------------------------------------------------------------------------------------ one toolkit
def test_one_cancelled_checkpoint_error_and_result_across_trainers():
    from pipelines import ddpm as D
    from pipelines import lora as L
    from pipelines import pixel_inpaint as P
    assert P.Cancelled is D.Cancelled is T.Cancelled
    assert issubclass(T.Cancelled, RuntimeError)
    assert L.CheckpointError is P.CheckpointError is D.CheckpointError is T.CheckpointError
    assert issubclass(T.CheckpointError, RuntimeError) and issubclass(T.CheckpointError, ValueError)
    assert L.TrainResult is P.TrainResult is D.TrainResult is T.TrainResult
    assert L.Checkpoints is P.Checkpoints is T.Checkpoints


def test_ddpm_evaluation_raises_the_shared_cancelled(tmp_path):
    from pipelines.ddpm import DDPMInspector, ModelConfig
    insp = DDPMInspector(ModelConfig(size=32, crop=32, preset="tiny"))
    with pytest.raises(T.Cancelled, match="evaluation cancelled"):
        insp.evaluate(BOTTLE, eval_size=32, cancelled=lambda: True)


def test_trainers_stop_on_cancel_with_a_loadable_checkpoint(tmp_path):
    """The trainers poll ``cancelled`` through the shared stop rule and keep a checkpoint."""
    from pipelines import pixel_inpaint as P
    from pipelines.ddpm import DDPMInspector, ModelConfig, TrainConfig
    torch.set_num_threads(1)
    calls = iter(range(100))
    res = P.run_from_config(P.PixelInpaintConfig(
        output_dir=str(tmp_path / "pix"), data=str(BOTTLE), image_size=64, preset="tiny", resolution=32,
        min_crop=32, batch_size=2, max_steps=50, minutes=None, validate_every=0, log_every=1),
        cancelled=lambda: next(calls) >= 1)
    assert isinstance(res, T.TrainResult) and (res.stopped, res.step) == ("cancelled", 1)
    assert res.checkpoint == str(T.latest_checkpoint(tmp_path / "pix"))
    assert T.read_history(tmp_path / "pix") == res.losses == [(1, res.loss)]
    insp = DDPMInspector(ModelConfig(size=32, crop=32, preset="tiny"))
    res = insp.train([np.zeros((32, 32, 3), np.uint8)] * 2,
                     TrainConfig(steps=50, minutes=None, batch_size=2, ema_decay=0.0), cancelled=lambda: True)
    assert isinstance(res, T.TrainResult) and (res.stopped, res.step) == ("cancelled", 0)


def test_progress_type_is_shared():
    import studio.inspection as I
    assert I.ProgressFn is T.ProgressFn and I.CancelFn is T.CancelFn


def test_progress_shows_a_loss_from_the_first_step_never_nan(tmp_path):
    """Before the first logged window (``log_every``) the progress line shows the running mean."""
    from pipelines import pixel_inpaint as P
    torch.set_num_threads(1)
    messages: list[str] = []
    P.run_from_config(P.PixelInpaintConfig(
        output_dir=str(tmp_path / "pix"), data=str(BOTTLE), image_size=64, preset="tiny", resolution=32,
        min_crop=32, batch_size=2, max_steps=3, minutes=None, validate_every=0, log_every=50),
        progress=lambda f, m: messages.append(m))
    steps = [m for m in messages if m.startswith("step ")]
    assert len(steps) >= 3 and all("loss" in m and "nan" not in m for m in steps), steps
