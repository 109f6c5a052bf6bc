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
    from pipelines.registry import get_info
    assert get_info("pixel-inpaint").mode == "damage"


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


# ------------------------------------------------------------------------------ two-stage schedule
def _recording(monkeypatch):
    """Wrap the trainer's two data sources: ``[(stage, 'good' | 'defect', pixel hash)]`` in draw order."""
    from pipelines.roles import pixel_hash
    seen = []
    good, defect = P.PixelInpaintTrainer.good_example, P.PixelInpaintTrainer.defect_example

    def rec(kind, fn):
        def wrapper(self, rng):
            img, m, cls = fn(self, rng)
            seen.append((self.stage, kind, pixel_hash(img), cls))
            return img, m, cls
        return wrapper

    monkeypatch.setattr(P.PixelInpaintTrainer, "good_example", rec("good", good))
    monkeypatch.setattr(P.PixelInpaintTrainer, "defect_example", rec("defect", defect))
    return seen


def _hashes(folder, size=128):
    from pipelines.mvtec import load_image
    from pipelines.roles import pixel_hash
    return {pixel_hash(load_image(p, size)) for p in sorted(folder.glob("*.png"))}


def _state(out):
    from pipelines.training import read_trainer_state
    return read_trainer_state(latest_checkpoint(out))


def test_two_stage_runs_product_then_damage_on_the_right_data(tmp_path, monkeypatch):
    import json
    from pipelines import roles as R
    from pipelines.training_data import read_manifest
    torch.set_num_threads(1)
    seen = _recording(monkeypatch)
    out = tmp_path / "two"
    res = P.run_from_config(_cfg(out, pretrain_steps=4, max_steps=7, checkpoint_every=100, checkpoint_limit=0,
                                 validate_every=0, good_fraction=0.25))
    assert (res.step, res.stopped) == (7, "steps")
    train_good = _hashes(BOTTLE / "train" / "good")
    defects = set().union(*(_hashes(d) for d in (BOTTLE / "test").iterdir() if d.name != "good"))
    stages = [s for s, *_ in seen]
    assert stages == sorted(stages, key=[P.PRODUCT, P.DAMAGE].index)          # stage 1 strictly first
    stage1 = [x for x in seen if x[0] == P.PRODUCT]
    assert len(stage1) == 4 * 4                                               # 4 steps x batch 4
    assert {k for _, k, _, _ in stage1} == {"good"} and {c for *_, c in stage1} == {3}   # class "normal"
    assert {h for _, _, h, _ in stage1} <= train_good and not {h for _, _, h, _ in stage1} & defects
    stage2 = [x for x in seen if x[0] == P.DAMAGE]
    assert len(stage2) == 3 * 4 and any(k == "defect" for _, k, _, _ in stage2)
    assert {h for _, k, h, _ in stage2 if k == "defect"} <= defects
    # the boundary and the counts are in the checkpoint (trainer state and config.json)
    sch = _state(out)["schedule"]
    assert sch["stages"] == [P.PRODUCT, P.DAMAGE] and sch["stage"] == P.DAMAGE and sch["pretrain_end"] == 4
    assert sch["steps"] == {P.PRODUCT: 4, P.DAMAGE: 3} and sch["pretrain_masks"] == "shapes"
    assert sch["examples"][P.PRODUCT] == {"good": 16, "defect": 0}
    assert sch["examples"][P.DAMAGE] == {"good": sum(k == "good" for _, k, _, _ in stage2),
                                         "defect": sum(k == "defect" for _, k, _, _ in stage2)}
    assert sch["data"] == {"good_images": 30, "defects": {"broken_large": 2, "broken_small": 2, "contamination": 2}}
    assert json.loads((latest_checkpoint(out) / "config.json").read_text())["schedule"] == sch
    assert [p.name for p in Checkpoints(out).all()] == ["step-0000004", "step-0000007"]   # the product model kept
    # what the model learned from: still the reference defects only
    assert set(read_manifest(out)["ancestors"]) == R.folder_roles(BOTTLE).reference_hashes


def test_two_stage_resumes_mid_stage_1_then_goes_on_to_stage_2(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    seen = _recording(monkeypatch)
    out = tmp_path / "res"
    kw = dict(pretrain_steps=4, checkpoint_every=100, checkpoint_limit=0, validate_every=0)
    res = P.run_from_config(_cfg(out, max_steps=2, **kw))
    assert res.step == 2 and {s for s, *_ in seen} == {P.PRODUCT}
    sch = _state(out)["schedule"]
    assert (sch["stage"], sch["pretrain_end"], sch["examples"][P.PRODUCT]["good"]) == (P.PRODUCT, None, 8)
    seen.clear()
    res = P.run_from_config(_cfg(out, max_steps=6, **kw))
    assert (res.step, res.steps_this_run) == (6, 4)
    assert [s for s, *_ in seen] == [P.PRODUCT] * 8 + [P.DAMAGE] * 8        # 2 more steps of stage 1, then 2
    assert all(k == "good" for s, k, *_ in seen if s == P.PRODUCT)
    sch = _state(out)["schedule"]
    assert sch["pretrain_end"] == 4 and sch["steps"] == {P.PRODUCT: 4, P.DAMAGE: 2}
    assert sch["examples"][P.PRODUCT] == {"good": 16, "defect": 0}
    assert sum(sch["examples"][P.DAMAGE].values()) == 8
    assert [p.name for p in Checkpoints(out).all()] == ["step-0000002", "step-0000004", "step-0000006"]
    # resumed from stage 2 it stays in stage 2
    seen.clear()
    P.run_from_config(_cfg(out, max_steps=7, **kw))
    assert {s for s, *_ in seen} == {P.DAMAGE} and _state(out)["schedule"]["pretrain_end"] == 4


def test_two_stage_by_minutes_and_cancel_in_stage_1(tmp_path):
    torch.set_num_threads(1)
    res = P.run_from_config(_cfg(tmp_path / "m", pretrain_minutes=1e-4, max_steps=3, validate_every=0))
    sch = _state(tmp_path / "m")["schedule"]
    assert res.step == 3 and sch["pretrain_end"] == 1 and sch["pretrain_seconds"] >= 0.006
    calls = {"n": 0}

    def cancelled():
        calls["n"] += 1
        return calls["n"] > 2

    out = tmp_path / "c"
    res = P.run_from_config(_cfg(out, pretrain_steps=50, max_steps=100, pretrain_masks="random", validate_every=0),
                            cancelled=cancelled)
    assert (res.stopped, res.step) == ("cancelled", 2)
    sch = _state(out)["schedule"]
    assert (sch["stage"], sch["pretrain_masks"]) == (P.PRODUCT, "random")
    assert sch["examples"][P.PRODUCT] == {"good": 8, "defect": 0}
    model = P.load_model(out)                                                  # loadable, every type
    assert model.types == ["broken_large", "broken_small", "contamination"]
    img = np.full((64, 64, 3), 120, np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[20:40, 20:40] = 255
    got = model.inpaint(img, mask, "contamination", seed=0, steps=2)
    assert np.array_equal(got[mk.dilate(mask, 4) == 0], img[mk.dilate(mask, 4) == 0])


def test_two_stage_masks_config_and_default(tmp_path, trained):
    from pipelines.mvtec import load_category, load_image
    from pipelines.shapes import estimate_foreground
    from pipelines.training import samples_from_category
    samples = samples_from_category(BOTTLE, size=128)
    good = [load_image(p, 128) for p in load_category(BOTTLE, require_test=False).train]
    tr = P.PixelInpaintTrainer(_cfg(tmp_path / "x", pretrain_steps=2), samples, good)
    fg = estimate_foreground(good)
    rng = np.random.default_rng(0)
    for t in tr.types:                       # shaped like the type, on the product
        m = tr.good_mask(t, (128, 128), rng)
        assert m.any() and not (m[~fg] > 0).any()
    with pytest.raises(ConfigError, match="pretrain_masks must be one of shapes, random"):
        _cfg(tmp_path / "x", pretrain_masks="blobs")
    with pytest.raises(ConfigError, match="pretrain_minutes must be > 0"):
        _cfg(tmp_path / "x", pretrain_minutes=0)
    with pytest.raises(TrainDataError, match="two-stage schedule"):
        P.PixelInpaintTrainer(_cfg(tmp_path / "x", pretrain_steps=2, good_fraction=0.0), samples, ())
    assert not _cfg(tmp_path / "x").two_stage
    # the default run: one stage, no product examples (its bytes are pinned in test_generator_pins)
    out, _ = trained
    sch = _state(out)["schedule"]
    assert sch["stages"] == [P.DAMAGE] and sch["pretrain_end"] is None and sch["pretrain_masks"] is None
    assert sch["examples"][P.PRODUCT] == {"good": 0, "defect": 0} and sch["steps"][P.PRODUCT] == 0
