"""DDPM ε- vs v-prediction and the depth × image reconstruction grid (tiny 32 px UNet2DModels)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import gradient_images

from pipelines.ddpm import (CheckpointError, DDPMInspector, ModelConfig, TrainConfig, depth_grid_image,
                            make_scheduler)

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "assets" / "demo" / "bottle"
TINY = dict(size=32, crop=32, preset="tiny")


pytestmark = pytest.mark.usefixtures("one_torch_thread")
_images = gradient_images


# ------------------------------------------------------------------------------------------ target
def test_epsilon_training_target_is_the_noise_and_schedulers_agree():
    insp = DDPMInspector(ModelConfig(**TINY, prediction="epsilon"))
    assert insp.scheduler.config.prediction_type == "epsilon"
    assert make_scheduler(insp.cfg, "ddim").config.prediction_type == "epsilon"
    data = torch.rand(3, 3, 32, 32) * 2 - 1
    x0, noise, t, x_t, target = insp.training_batch(data, TrainConfig(batch_size=4, t_max=80),
                                                    torch.Generator().manual_seed(3))
    assert torch.equal(target, noise)
    ab = insp.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(x_t, ab.sqrt() * x0 + (1 - ab).sqrt() * noise, atol=1e-5)
    # the v model's target on the same batch is not the noise (the two arms really differ)
    v = DDPMInspector(ModelConfig(**TINY))
    assert v.cfg.prediction == "v" and v.scheduler.config.prediction_type == "v_prediction"
    *_, vt = v.training_batch(data, TrainConfig(batch_size=4, t_max=80), torch.Generator().manual_seed(3))
    assert not torch.allclose(vt, noise)
    with pytest.raises(ValueError, match="unknown prediction"):
        ModelConfig(**TINY, prediction="sample").validate()


class _EpsOracle(torch.nn.Module):
    """Knows the clean image is the constant ``value``: the exact ε for any window and t."""

    def __init__(self, value, alphas_cumprod):
        super().__init__()
        self.value, self.ab = value.view(1, 3, 1, 1), alphas_cumprod

    def forward(self, x, t):
        ab = self.ab[t.long()].view(-1, 1, 1, 1)
        return SimpleNamespace(sample=(x - ab.sqrt() * self.value) / (1 - ab).sqrt())


def test_epsilon_oracle_reconstructs_through_the_scheduler():
    cfg = ModelConfig(size=64, crop=32, preset="tiny", prediction="epsilon")
    insp = DDPMInspector(cfg)
    colour = np.array([90, 150, 200], np.uint8)
    clean = np.broadcast_to(colour, (64, 64, 3)).copy()
    oracle = _EpsOracle(torch.tensor(colour / 127.5 - 1.0, dtype=torch.float32),
                        make_scheduler(cfg, "ddim").alphas_cumprod)
    insp.unet = oracle
    assert np.abs(insp.reconstruct(clean, depth=300, stride=50) - clean / 255.0).max() < 0.01
    defect = clean.copy()
    defect[20:30, 36:46] = (20, 20, 20)
    amap = insp.residual_map(defect, depths=(300,), stride=50, sigma=1.0)
    assert amap[22:28, 38:44].min() > 0.3 and np.delete(amap, np.s_[14:36], axis=0).max() < 0.05


def test_epsilon_model_trained_briefly_reconstructs_close_at_small_depth(tmp_path):
    insp = DDPMInspector(ModelConfig(**TINY, prediction="epsilon"))
    imgs = _images()
    res = insp.train(imgs, TrainConfig(steps=60, minutes=None, batch_size=4, lr=2e-3, t_max=100,
                                       ema_decay=0.0, log_every=5))
    assert np.isfinite(res.loss) and res.losses[-1][1] < res.losses[0][1]
    err = lambda m, d: float(np.abs(m.reconstruct(imgs[0], depth=d, stride=10) - imgs[0] / 255.0).mean())
    assert err(insp, 20) < 0.05               # at t small the reconstruction is close to the input
    # and it is the training that reconstructs (measured 0.033 vs 0.139 at t = 100)
    untrained = DDPMInspector(ModelConfig(**TINY, prediction="epsilon"))
    assert err(insp, 100) < 0.5 * err(untrained, 100)
    # saved with the field, reloaded as epsilon; resuming with v is refused
    insp.save(tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert meta["model"]["prediction"] == "epsilon" and meta["prediction"] == "epsilon"
    back = DDPMInspector.load(tmp_path / "ck")
    assert back.cfg.prediction == "epsilon" and back.scheduler.config.prediction_type == "epsilon"
    assert np.allclose(back.reconstruct(imgs[0], depth=20, stride=10), insp.reconstruct(imgs[0], depth=20, stride=10))
    with pytest.raises(CheckpointError, match="prediction"):
        DDPMInspector.load(tmp_path / "ck", expect=ModelConfig(**TINY, prediction="v"))


def test_old_checkpoint_without_the_field_loads_as_v(tmp_path):
    DDPMInspector(ModelConfig(**TINY)).save(tmp_path / "old")
    cfg_file = tmp_path / "old" / "config.json"
    meta = json.loads(cfg_file.read_text())
    del meta["model"]["prediction"], meta["prediction"]            # as written before the field
    cfg_file.write_text(json.dumps(meta))
    insp = DDPMInspector.load(tmp_path / "old")
    assert insp.cfg.prediction == "v" and make_scheduler(insp.cfg, "ddim").config.prediction_type == "v_prediction"


# ------------------------------------------------------------------------------------------ grid
def test_depth_grid_has_depths_times_images_cells_and_a_labelled_picture():
    insp = DDPMInspector(ModelConfig(**TINY, prediction="epsilon"))
    imgs = _images(3)
    seen = []
    grid = insp.depth_grid(imgs, (100, 250, 400, 600), stride=50, progress=lambda f, m: seen.append(f))
    assert grid.reconstructions.shape == (4, 3, 32, 32, 3) and grid.residuals.shape == (4, 3, 32, 32)
    assert grid.depths == [100, 250, 400, 600] and seen[-1] == 1.0 and grid.prediction == "epsilon"
    # the residual of each cell is the colour distance of its own reconstruction
    d = np.sqrt(((grid.inputs[1] / 255.0 - grid.reconstructions[2, 1] / 255.0) ** 2).sum(-1))
    assert np.allclose(d, grid.residuals[2, 1], atol=0.01)
    mask = np.zeros((32, 32), bool)
    mask[8:16, 8:16] = True
    cells = grid.stats([None, mask, None])
    assert len(cells) == 12 and [c["depth"] for c in cells[:4]] == [100, 100, 100, 250]
    assert "inside" in cells[1] and "inside" not in cells[0]
    pic = depth_grid_image(grid, ["a", "b", "c"], [None, mask, None])
    assert pic.dtype == np.uint8 and pic.ndim == 3
    # rows: header + input + 4 depths; columns: label strip + 3 images x (reconstruction | residual)
    assert pic.shape[0] > 5 * 32 and pic.shape[1] > 3 * 64
    # the first depth row's first cell holds the reconstruction pixels exactly
    ys, xs = np.where((pic[..., 0] == grid.reconstructions[0, 0, 0, 0, 0]))
    assert len(ys)
    with pytest.raises(ValueError, match="at least one depth"):
        insp.depth_grid(imgs, [])
    from pipelines.training import Cancelled
    with pytest.raises(Cancelled):
        insp.depth_grid(imgs, (100, 200), stride=50, cancelled=lambda: True)


def test_grid_use_case_and_cli_write_the_picture(tmp_path, monkeypatch):
    from studio.__main__ import main
    from studio.inspection import DDPMGridRequest, depth_grid, grid_items_from_folder
    DDPMInspector(ModelConfig(size=64, crop=32, preset="tiny", prediction="epsilon")).save(tmp_path / "ck")
    items = grid_items_from_folder(str(DEMO), 4)
    labels = [it.label for it in items]
    assert len(items) == 4 and labels[-1] == "good" and len(set(labels[:3])) == 3     # one per type, then good
    assert all(it.mask is not None and it.mask.any() for it in items[:3]) and items[3].mask is None
    s = depth_grid(DDPMGridRequest(str(tmp_path / "ck"), str(tmp_path / "g.png"), [100, 300], stride=100),
                   items[:2])
    assert Path(s["grid"]).is_file() and len(s["cells"]) == 4 and s["prediction"] == "epsilon"
    assert json.loads((tmp_path / "g.json").read_text())["depths"] == [100, 300]

    rc = main(["ddpm", "grid", "--data", str(DEMO), "--checkpoint", str(tmp_path / "ck"), "--depth", "50,150",
               "--images", "2", "--quiet", "--out", str(tmp_path / "cli.png")])
    assert rc == 0 and (tmp_path / "cli.png").is_file()
    cells = json.loads((tmp_path / "cli.json").read_text())["cells"]
    assert len(cells) == 4
    assert main(["ddpm", "grid", "--data", str(tmp_path / "nope"), "--checkpoint", str(tmp_path / "ck"),
                 "--out", str(tmp_path / "x.png"), "--quiet"]) == 2


def test_cli_train_flag_in_help_and_epsilon_checkpoint(tmp_path, capsys):
    from studio.__main__ import build_parser, main
    sub = build_parser()._subparsers._group_actions[0].choices["ddpm"]._subparsers._group_actions[0].choices
    assert "--prediction" in sub["train"].format_help() and "epsilon" in sub["train"].format_help()
    for flag in ("--depth", "--images", "--out", "--checkpoint"):
        assert flag in sub["grid"].format_help()
    data = tmp_path / "cat"
    shutil.copytree(DEMO / "train", data / "train")
    rc = main(["ddpm", "train", "--data", str(data), "--out", str(tmp_path / "ck"), "--steps", "2",
               "--size", "32", "--crop", "32", "--preset", "tiny", "--batch-size", "2", "--prediction", "epsilon",
               "--quiet"])
    assert rc == 0
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["model"]["prediction"] == "epsilon"
    assert json.loads((tmp_path / "ck" / "training.json").read_text())["prediction"] == "epsilon"
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["ddpm", "train", "--data", str(data), "--out", str(tmp_path / "x"), "--prediction", "sample"])


def test_ddpm_tab_grid_job_from_the_store(tmp_path):
    """The DDPM tab's grid: a product's test images from the store (defect types first, then good),
    a background job that writes the picture, refusals as gr.Error."""
    import gradio as gr
    from studio.config import Settings
    from studio.context import StudioContext
    from studio.dataset import Store
    from studio.formats import import_any
    from studio.ui import ddpm_tab as DD
    ws = tmp_path / "ws"
    import_any(Store(ws), DEMO, "auto", "bottle")
    ctx = StudioContext(Settings.from_env(workspace=ws))
    ck = DD.models_root(ctx) / "eps"
    DDPMInspector(ModelConfig(size=64, crop=32, preset="tiny", prediction="epsilon")).save(ck)
    with pytest.raises(gr.Error, match="Pick a checkpoint"):
        DD.start_grid(ctx, "bottle", "", "", "100", 2, "as trained")
    with pytest.raises(gr.Error, match="integers"):
        DD.start_grid(ctx, "bottle", "", str(ck), "deep", 2, "as trained")
    with pytest.raises(gr.Error, match="Pick a product"):
        DD.start_grid(ctx, "", "", str(ck), "100", 2, "as trained")
    items, _ = DD.grid_items(ctx, "bottle", "", 4)
    assert [it.label for it in items][-1] == "good" and len({it.label for it in items}) == 4
    jid = DD.start_grid(ctx, "bottle", "", str(ck), "100,200", 2, "as trained")
    job = ctx.jobs.wait(jid, timeout=300)
    assert job["status"] == "done", job["error"]
    pic, cells = DD.live_grid(job)
    assert Path(pic).is_file() and len(cells["cells"]) == 4 and cells["prediction"] == "epsilon"
