"""DDPM residual maps: tiny random-init models (32 px), a few steps, an analytic oracle denoiser."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import gradient_images

from pipelines.ddpm import (CheckpointError, DDPMInspector, ModelConfig, TrainConfig, build_unet,
                            make_scheduler, train_category)
from pipelines.mvtec import LayoutError
from pipelines.noise import NoiseError, make_noise

DEMO = Path(__file__).resolve().parent.parent / "assets" / "demo" / "bottle"
TINY = dict(size=32, crop=32, preset="tiny")


pytestmark = pytest.mark.usefixtures("one_torch_thread")
_images = gradient_images


def _tcfg(steps, **kw):
    return TrainConfig(steps=steps, minutes=None, batch_size=2, log_every=1, ema_decay=0.0, **kw)


# ------------------------------------------------------------------------------------------ model
def test_unet_shapes_and_unknown_preset():
    unet = build_unet(32, channels=3, preset="tiny")
    x = torch.randn(2, 3, 32, 32)
    assert unet(x, torch.tensor([5, 300])).sample.shape == x.shape
    with pytest.raises(ValueError, match="unknown preset"):
        build_unet(32, preset="huge")
    with pytest.raises(ValueError, match="multiple of"):
        ModelConfig(size=64, crop=33, preset="tiny").validate()


def test_training_target_is_schedulers_velocity():
    insp = DDPMInspector(ModelConfig(**TINY))
    data = torch.rand(3, 3, 32, 32) * 2 - 1
    tcfg = TrainConfig(batch_size=4, t_max=50)
    x0, noise, t, x_t, target = insp.training_batch(data, tcfg, torch.Generator().manual_seed(1))
    sched = make_scheduler(insp.cfg, "ddpm")
    assert sched.config.prediction_type == "v_prediction"
    assert torch.allclose(target, sched.get_velocity(x0, noise, t))
    ab = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(target, ab.sqrt() * noise - (1 - ab).sqrt() * x0, atol=1e-5)   # v definition
    assert torch.allclose(x_t, ab.sqrt() * x0 + (1 - ab).sqrt() * noise, atol=1e-5)
    assert int(t.max()) < 50
    # every crop is an (augmented) crop of a training image
    flat = {tuple(np.round(c.flatten().numpy(), 5)) for im in data for k in range(4)
            for c in (torch.rot90(im, k, (-2, -1)), torch.rot90(im.flip(-1), k, (-2, -1)))}
    assert all(tuple(np.round(c.flatten().numpy(), 5)) in flat for c in x0)


def test_brief_training_lowers_the_loss_and_reports_progress():
    insp = DDPMInspector(ModelConfig(**TINY))
    seen = []
    res = insp.train(_images(), _tcfg(40, lr=2e-3, t_max=200), progress=lambda f, m: seen.append((f, m)))
    first = np.mean([l for _, l in res.losses[:5]])
    last = np.mean([l for _, l in res.losses[-5:]])
    assert res.step == 40 and res.stopped == "steps"
    assert last < 0.7 * first
    assert seen[-1][0] == 1.0 and 0 < seen[0][0] < 1


def test_cancel_stops_training():
    insp = DDPMInspector(ModelConfig(**TINY))
    calls = iter(range(100))
    res = insp.train(_images(), _tcfg(50), cancelled=lambda: next(calls) >= 3)
    assert res.stopped == "cancelled" and res.step == 3


# ------------------------------------------------------------------------------------------ oracle
class _Oracle(torch.nn.Module):
    """Knows the clean image is the constant ``value``: the exact v for any window and t."""

    def __init__(self, value: torch.Tensor, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.value, self.ab = value.view(1, 3, 1, 1), alphas_cumprod

    def forward(self, x, t):
        ab = self.ab[t.long()].view(-1, 1, 1, 1)
        eps = (x - ab.sqrt() * self.value) / (1 - ab).sqrt()
        return SimpleNamespace(sample=ab.sqrt() * eps - (1 - ab).sqrt() * self.value)


@pytest.mark.parametrize("noise", ["gaussian", "simplex"])
def test_oracle_reconstruction_clean_is_exact_and_defect_lights_up(noise):
    # 64 px images through 32 px windows: exercises the window blending too
    insp = DDPMInspector(ModelConfig(size=64, crop=32, preset="tiny", noise=noise))
    colour = np.array([90, 150, 200], np.uint8)
    clean = np.broadcast_to(colour, (64, 64, 3)).copy()
    insp.unet = _Oracle(torch.tensor(colour / 127.5 - 1.0, dtype=torch.float32),
                        make_scheduler(insp.cfg, "ddim").alphas_cumprod)
    rec = insp.reconstruct(clean, depth=150, stride=50)
    assert rec.shape == (64, 64, 3)
    assert np.abs(rec - clean / 255.0).max() < 0.01
    defect = clean.copy()
    defect[20:30, 36:46] = (20, 20, 20)
    amap = insp.residual_map(defect, depths=(100, 150), stride=50, sigma=1.0)
    assert amap.shape == (64, 64)
    inside = amap[22:28, 38:44].min()
    outside = np.delete(amap, np.s_[14:36], axis=0)
    assert inside > 0.3 and outside.max() < 0.05


def test_untrained_model_does_not_reconstruct():
    """The oracle test can fail: a random-init model's reconstruction is far from the input."""
    insp = DDPMInspector(ModelConfig(**TINY))
    img = _images(1)[0]
    rec = insp.reconstruct(img, depth=200, stride=50)
    assert np.abs(rec - img / 255.0).mean() > 0.05


# ------------------------------------------------------------------------------------------ noise
def test_simplex_noise_statistics_and_correlation():
    g = torch.Generator().manual_seed(0)
    n = make_noise("simplex", (4, 3, 64, 64), g, octaves=4, persistence=0.7, frequency=16)
    per_sample = n.view(4, -1)
    assert torch.allclose(per_sample.mean(1), torch.zeros(4), atol=1e-4)
    assert torch.allclose(per_sample.std(1), torch.ones(4), atol=1e-3)

    def lag1(x):
        a, b = x[..., :, 1:].flatten(), x[..., :, :-1].flatten()
        return float(torch.corrcoef(torch.stack([a, b]))[0, 1])

    white = make_noise("gaussian", (4, 3, 64, 64), torch.Generator().manual_seed(0))
    assert lag1(n) > 0.4 and abs(lag1(white)) < 0.05
    # deterministic per generator seed, different across seeds and channels
    again = make_noise("simplex", (4, 3, 64, 64), torch.Generator().manual_seed(0), octaves=4,
                       persistence=0.7, frequency=16)
    other = make_noise("simplex", (4, 3, 64, 64), torch.Generator().manual_seed(1), octaves=4,
                       persistence=0.7, frequency=16)
    assert torch.equal(n, again) and not torch.allclose(n, other)
    assert not torch.allclose(n[0, 0], n[0, 1])
    with pytest.raises(NoiseError, match="known: gaussian, simplex"):
        make_noise("perlin", (1, 1, 8, 8))


# ------------------------------------------------------------------------------------------ checkpoints
def test_save_load_resume_continues_step_count(tmp_path):
    insp = DDPMInspector(ModelConfig(**TINY))
    insp.train(_images(), TrainConfig(steps=3, minutes=None, batch_size=2, log_every=1))
    insp.save(tmp_path / "ck")
    assert (tmp_path / "ck" / "model.safetensors").is_file()
    meta = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert meta["step"] == 3 and meta["noise"] == "gaussian" and meta["size"] == 32

    back = DDPMInspector.load(tmp_path / "ck", expect=ModelConfig(**TINY))
    assert back.step == 3 and back.ema is not None
    for k, v in insp.unet.state_dict().items():
        assert torch.equal(v, back.unet.state_dict()[k])
    img = _images(1)[0]
    assert np.allclose(insp.reconstruct(img, 100, seed=3, stride=50), back.reconstruct(img, 100, seed=3, stride=50),
                       atol=1e-5)
    res = back.train(_images(), TrainConfig(steps=5, minutes=None, batch_size=2, log_every=1))
    assert res.step == 5 and res.steps_this_run == 2
    assert [s for s, _ in res.losses] == [1, 2, 3, 4, 5]
    adam_steps = {float(st["step"]) for st in back.optimizer.state.values()}
    assert adam_steps == {5.0}                      # optimizer state was resumed, not restarted


def test_bad_checkpoints_give_clear_messages(tmp_path):
    insp = DDPMInspector(ModelConfig(**TINY))
    ck = insp.save(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="another model configuration.*preset"):
        DDPMInspector.load(ck, expect=ModelConfig(size=32, crop=32, preset="small"))
    # weights of another architecture than config.json says
    other = tmp_path / "other"
    shutil.copytree(ck, other)
    meta = json.loads((other / "config.json").read_text())
    meta["model"]["preset"] = "small"
    (other / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="another architecture.*missing tensors"):
        DDPMInspector.load(other)
    # corrupt weights / corrupt config / not a checkpoint
    bad = tmp_path / "bad"
    shutil.copytree(ck, bad)
    (bad / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupt"):
        DDPMInspector.load(bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        DDPMInspector.load(bad)
    with pytest.raises(CheckpointError, match="no config.json"):
        DDPMInspector.load(tmp_path / "nowhere")
    assert issubclass(CheckpointError, ValueError)


def test_folder_without_train_good_is_a_layout_error(tmp_path):
    (tmp_path / "test" / "good").mkdir(parents=True)
    with pytest.raises(LayoutError, match="no train/good"):
        train_category(tmp_path, tmp_path / "ck", ModelConfig(**TINY), _tcfg(1))


# ------------------------------------------------------------------------------------------ evaluation
def test_evaluate_small_category_gives_shared_metrics(tmp_path):
    root = tmp_path / "bottle"
    (root / "train" / "good").mkdir(parents=True)
    for sub in ("test/good", "test/broken_large", "ground_truth/broken_large"):
        (root / sub).mkdir(parents=True)
    for name in ("000.png", "001.png"):
        shutil.copy(DEMO / "train" / "good" / name, root / "train" / "good" / name)
        shutil.copy(DEMO / "test" / "good" / name, root / "test" / "good" / name)
        shutil.copy(DEMO / "test" / "broken_large" / name, root / "test" / "broken_large" / name)
        mask = name.replace(".png", "_mask.png")
        shutil.copy(DEMO / "ground_truth" / "broken_large" / mask, root / "ground_truth" / "broken_large" / mask)
    insp, res = train_category(root, tmp_path / "ck", ModelConfig(**TINY), _tcfg(2))
    assert res.step == 2 and (tmp_path / "ck" / "config.json").is_file()
    out = insp.evaluate(root, depths=(50,), stride=50, eval_size=64, kind="color+ssim")
    for key in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max", "ms_per_image"):
        assert np.isfinite(out.metrics[key])
    assert out.maps.shape == out.masks.shape == (4, 64, 64)
    assert out.scores.shape == (4,)


def test_feature_residual_with_oracle_lights_up_the_defect():
    backbones = pytest.importorskip("pipelines.backbones")
    insp = DDPMInspector(ModelConfig(size=64, crop=32, preset="tiny"))
    colour = np.array([90, 150, 200], np.uint8)
    insp.unet = _Oracle(torch.tensor(colour / 127.5 - 1.0, dtype=torch.float32),
                        make_scheduler(insp.cfg, "ddim").alphas_cumprod)
    defect = np.broadcast_to(colour, (64, 64, 3)).copy()
    defect[20:30, 36:46] = (20, 20, 20)
    try:
        amap = insp.residual_map(defect, depths=(100,), stride=50, sigma=1.0, kind="feature")
    except backbones.BackboneError as exc:          # weights not installed: nothing to check
        pytest.skip(str(exc))
    assert amap.shape == (64, 64)
    assert amap[22:28, 38:44].mean() > 3 * np.delete(amap, np.s_[10:40], axis=0).mean()
    with pytest.raises(ValueError, match="unknown residual kind"):
        insp.residual_map(defect, kind="lpips")
