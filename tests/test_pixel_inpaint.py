"""Pixel-space inpainting model: training (budget, resume, cancel), the generator contract."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines import masks as mk
from pipelines import pixel_inpaint as P
from pipelines.training import CheckpointError, Checkpoints, ConfigError, TrainDataError, latest_checkpoint
from pipelines.models import ModelError

ROOT = Path(__file__).resolve().parent.parent
BOTTLE = ROOT / "assets" / "demo" / "bottle"


def _cfg(out, **kw):
    base = dict(output_dir=str(out), data=str(BOTTLE), image_size=128, preset="tiny", resolution=32,
                min_crop=32, batch_size=4, max_steps=6, minutes=None, checkpoint_every=3,
                checkpoint_limit=2, log_every=2, validate_every=6, validation_steps=2)
    base.update(kw)
    return P.PixelInpaintConfig(**base)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("pix") / "run"
    res = P.run_from_config(_cfg(out))
    return out, res


def test_train_checkpoints_and_resume(trained):
    out, res = trained
    assert (res.step, res.steps_this_run, res.stopped) == (6, 6, "steps")
    assert [s for s, _ in res.losses] == [2, 4, 6] and all(np.isfinite(v) for _, v in res.losses)
    ck = latest_checkpoint(out)
    assert ck.name == "step-0000006"
    for f in ("model.safetensors", "config.json", "optimizer.safetensors", "trainer_state.json"):
        assert (ck / f).is_file()
    assert Path(res.validation).is_file()
    res2 = P.run_from_config(_cfg(out, max_steps=9))
    assert (res2.step, res2.steps_this_run) == (9, 3)
    assert [s for s, _ in res2.losses] == [2, 4, 6, 8]
    assert [p.name for p in Checkpoints(out).all()] == ["step-0000006", "step-0000009"]
    with pytest.raises(CheckpointError, match="use a new output_dir"):
        P.run_from_config(_cfg(out, max_steps=12, damage_types=["contamination"]))


def test_cancel_and_budget(tmp_path):
    calls = {"n": 0}

    def cancelled():
        calls["n"] += 1
        return calls["n"] > 2

    res = P.run_from_config(_cfg(tmp_path / "c", max_steps=100, validate_every=0), cancelled=cancelled)
    assert res.stopped == "cancelled" and res.step == 2
    assert P.load_model(tmp_path / "c").types == ["broken_large", "broken_small", "contamination"]
    res = P.run_from_config(_cfg(tmp_path / "t", max_steps=None, minutes=0.02, validate_every=0))
    assert res.stopped == "time" and res.step >= 1


def test_generator_contract(trained):
    out, _ = trained
    from pipelines.mvtec import load_image
    img = load_image(BOTTLE / "test" / "good" / "000.png", 128)
    mask = mk.random_mask("blob", img.shape[:2], 1)
    gen = P.PixelInpaintGenerator()
    a = gen(img, mask, seed=3, feather=4, damage_type="contamination", model=str(out), steps=3)
    b = gen(img, mask, seed=3, feather=4, damage_type="contamination", model=str(out), steps=3)
    c = gen(img, mask, seed=4, feather=4, damage_type="contamination", model=str(out), steps=3)
    outside = mk.dilate(mask, 4) == 0
    assert a.shape == img.shape and a.dtype == np.uint8
    assert np.array_equal(a[outside], img[outside])
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert not np.array_equal(a[mask > 0], img[mask > 0])
    g = gen(img, mask, seed=3, feather=0, damage_type="broken_small", model=str(out), steps=2,
            strength=0.5, guidance=2.0)
    assert np.array_equal(g[mask == 0], img[mask == 0])
    from pipelines.registry import get_spec
    assert get_spec("pixel-inpaint").mode == "damage"


def test_clear_errors(tmp_path, trained, monkeypatch):
    out, _ = trained
    img = np.zeros((64, 64, 3), np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[20:30, 20:30] = 255
    monkeypatch.delenv(P.ENV, raising=False)
    with pytest.raises(ModelError, match="python -m studio train --kind pixel-inpaint"):
        P.PixelInpaintGenerator()(img, mask, seed=0, damage_type="contamination")
    with pytest.raises(ModelError, match="holds no pixel-inpaint checkpoint"):
        P.PixelInpaintGenerator()(img, mask, seed=0, damage_type="x", model=str(tmp_path))
    with pytest.raises(ModelError, match="trained for broken_large, broken_small, contamination, not 'scratch'"):
        P.PixelInpaintGenerator()(img, mask, seed=0, damage_type="scratch", model=str(out))
    monkeypatch.setenv(P.ENV, str(out))
    assert P.available()[0]
    with pytest.raises(ConfigError, match="unknown PixelInpaintConfig key.*stepz.*known keys"):
        P.PixelInpaintConfig.from_dict({"output_dir": "x", "stepz": 3})
    with pytest.raises(TrainDataError, match="no defect samples of type 'scratch'"):
        P.run_from_config(_cfg(tmp_path / "x", damage_types=["scratch"]))
