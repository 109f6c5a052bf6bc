"""LoRA + damage-embedding training on tiny local SD components (CPU, no downloads)."""
from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines import lora as L
from pipelines import training as T
from pipelines.inpaint import DamageEmbedding, SDInpaintGenerator
from tests import diffusion_fixtures as dfx

ROOT = Path(__file__).resolve().parent.parent
BOTTLE = ROOT / "assets" / "demo" / "bottle"


def write_sd_inpaint(root: Path) -> Path:
    """Only the tiny SD inpainting folder of ``diffusion_fixtures`` (the rest is not needed):
    ``root/sd-inpaint`` (also used by ``benchmarks/train.py speed``)."""
    from diffusers import StableDiffusionInpaintPipeline
    from transformers import CLIPTokenizer
    dfx.write_tokenizer(root / "_tokenizer")
    StableDiffusionInpaintPipeline(
        unet=dfx._unet(9), vae=dfx._vae(), text_encoder=dfx._text_encoder(),
        tokenizer=CLIPTokenizer.from_pretrained(root / "_tokenizer"), scheduler=dfx._scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(root / "sd-inpaint")
    return root / "sd-inpaint"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.set_num_threads(1)
    return {"sd-inpaint": write_sd_inpaint(tmp_path_factory.mktemp("sd"))}


@pytest.fixture(scope="module")
def samples():
    return T.samples_from_category(BOTTLE, ["broken_large", "contamination"], size=128)


def _cfg(models, out, **kw):
    base = dict(output_dir=str(out), model=str(models["sd-inpaint"]), resolution=64, padding=8,
                batch_size=1, learning_rate=2e-3, max_steps=20, checkpoint_every=10,
                checkpoint_limit=2, validate_every=20, validation_steps=2, validation_count=2,
                log_every=5)
    base.update(kw)
    return L.LoraTrainConfig(**base)


def _pipe(models):
    from diffusers import StableDiffusionInpaintPipeline
    pipe = StableDiffusionInpaintPipeline.from_pretrained(models["sd-inpaint"], safety_checker=None,
                                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, emb, samples):
    from PIL import Image
    img = samples[0].image[:64, :64]
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    cond = emb.embed("broken_large")
    return pipe(prompt_embeds=cond, negative_prompt_embeds=torch.zeros_like(cond),
                image=Image.fromarray(img), mask_image=Image.fromarray(mask), height=64, width=64,
                num_inference_steps=2, guidance_scale=1.0, output_type="np",
                generator=torch.Generator().manual_seed(0)).images[0]


def test_config_errors(tmp_path, samples):
    with pytest.raises(L.ConfigError, match="unknown LoraTrainConfig key.*lerning_rate.*known keys:.*learning_rate"):
        L.LoraTrainConfig.from_dict({"output_dir": str(tmp_path), "lerning_rate": 1e-4})
    with pytest.raises(L.ConfigError, match="rank must be an integer ≥ 1, got 0"):
        L.LoraTrainConfig(output_dir=str(tmp_path), rank=0)
    with pytest.raises(L.ConfigError, match="unknown augment key"):
        L.LoraTrainConfig(output_dir=str(tmp_path), augment={"brightness": 0.2})
    yml = tmp_path / "c.yaml"
    yml.write_text("output_dir: x\nrank: 8\nfocus: restricted\naugment: {rotate: 25}\n")
    cfg = L.LoraTrainConfig.from_yaml(yml)
    assert cfg.rank == 8 and cfg.focus == "restricted" and cfg.augment.rotate == 25
    with pytest.raises(T.TrainDataError, match="no defect samples of type 'scratch'.*broken_large"):
        L.LoraTrainer(L.LoraTrainConfig(output_dir=str(tmp_path), damage_types=["scratch"]), samples)
    with pytest.raises(T.TrainDataError, match="no defect samples of type 'scratch'"):
        T.samples_from_category(BOTTLE, ["scratch"])


def test_train_load_resume(tmp_path, models, samples):
    out = tmp_path / "run"
    trainer = L.LoraTrainer(_cfg(models, out), samples)
    res = trainer.run()
    # ≥ 20 CPU steps, live loss history, checkpoints at 10 and 20, validation grid
    assert res.step == 20 and res.steps_this_run == 20 and res.stopped == "steps"
    assert [s for s, _ in trainer.losses] == [5, 10, 15, 20]
    assert all(np.isfinite(v) for _, v in trainer.losses)
    assert T.read_history(out) == trainer.losses
    ck = T.latest_checkpoint(out)
    assert ck.name == "step-0000020" and (out / "latest").read_text() == "step-0000020"
    assert [p.name for p in L.Checkpoints(out).all()] == ["step-0000010", "step-0000020"]
    for f in ("pytorch_lora_weights.safetensors", "damage_embedding.safetensors",
              "damage_embedding.json", "optimizer.safetensors", "trainer_state.json", "validation.png"):
        assert (ck / f).is_file(), f
    assert Path(res.validation).is_file()

    # the embedding table reloads exactly
    emb = DamageEmbedding.load(ck)
    assert emb.damage_types == ["broken_large", "contamination"]
    assert torch.equal(emb.table.weight, trainer.embedding.table.weight.detach().cpu())

    # plain diffusers: load_lora_weights() works and changes the output
    pipe = _pipe(models)
    before = _run(pipe, emb, samples)
    pipe.load_lora_weights(str(ck))
    after = _run(pipe, emb, samples)
    assert np.abs(after - before).max() > 1e-3

    # the sd-inpaint backend takes lora=<checkpoint> and embedding=<checkpoint>
    img, mask = samples[0].image, samples[0].mask
    gen = SDInpaintGenerator()(img, mask, seed=0, model=str(models["sd-inpaint"]), lora=str(ck),
                               embedding=str(ck), damage_type="broken_large", steps=2,
                               resolution=64)
    from pipelines import masks as mk
    outside = mk.dilate(mask, 4) == 0
    assert np.array_equal(gen[outside], img[outside])

    # resume continues from the saved step; the limit keeps 2 checkpoints
    trainer2 = L.LoraTrainer(_cfg(models, out, max_steps=30, validate_every=0), samples)
    res2 = trainer2.run()
    assert (res2.step, res2.steps_this_run) == (30, 10)
    assert [s for s, _ in trainer2.losses] == [5, 10, 15, 20, 25, 30]
    assert [p.name for p in L.Checkpoints(out).all()] == ["step-0000020", "step-0000030"]


def test_cancel_keeps_loadable_checkpoint(tmp_path, models, samples):
    out = tmp_path / "cancel"
    calls = {"n": 0}

    def cancelled():
        calls["n"] += 1
        return calls["n"] > 3

    res = L.train_lora(_cfg(models, out, validate_every=0), samples, cancelled=cancelled)
    assert res.stopped == "cancelled" and res.step == 3
    ck = T.latest_checkpoint(out)
    assert ck.name == "step-0000003"
    pipe = _pipe(models)
    pipe.load_lora_weights(str(ck))
    assert DamageEmbedding.load(ck).damage_types == ["broken_large", "contamination"]


def test_failed_save_keeps_previous_latest(tmp_path, models, samples, monkeypatch):
    out = tmp_path / "diskfull"
    real = L.save_optimizer
    calls = {"n": 0}

    def flaky(opt, folder):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(opt, folder)

    monkeypatch.setattr(L, "save_optimizer", flaky)
    with pytest.raises(L.CheckpointError, match="No space left.*step-0000010 stays the latest"):
        L.train_lora(_cfg(models, out, validate_every=0), samples)
    assert T.latest_checkpoint(out).name == "step-0000010"
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    assert (out / "checkpoints" / "step-0000010" / "pytorch_lora_weights.safetensors").is_file()


def test_wall_colour_is_its_own_trainer_kind_with_color_loss(tmp_path, models):
    """The wall-colour LoRA is TRAINERS["wall"] (pipelines.wall_train.WallTrainer, its protocol:
    tests/test_wall_protocol.py); the LoRA config has no wall fields and never hands off to it."""
    from pipelines.training.trainers import TRAINERS
    from pipelines.wall_train import WallTrainConfig, WallTrainer
    rng = np.random.default_rng(0)
    img = np.full((96, 96, 3), (180, 60, 40), np.uint8) + rng.integers(0, 10, (96, 96, 3)).astype(np.uint8)
    good = np.zeros((96, 96), np.uint8)
    good[20:80, 10:70] = 255
    for key in ("mode", "color_loss_weight", "wall_erode_px"):
        with pytest.raises(L.ConfigError, match=f"unknown LoraTrainConfig key.*{key}"):
            L.LoraTrainConfig.from_dict({"output_dir": "x", key: 1})
    assert TRAINERS["wall"].config_class() is WallTrainConfig and TRAINERS["lora"].config_class() is L.LoraTrainConfig
    cfg = WallTrainConfig(**{**_cfg(models, tmp_path / "wall").to_dict(), "max_steps": 2, "color_loss_weight": 1.0,
                             "validate_every": 2, "validation_count": 1, "validation_seeds": [0]})
    trainer = WallTrainer(cfg, [(img, good, "wall")])
    res = trainer.run()
    assert res.step == 2 and np.isfinite(res.loss) and trainer.embedding is None
    ck = T.latest_checkpoint(tmp_path / "wall")
    assert (ck / "pytorch_lora_weights.safetensors").is_file()
    assert not (ck / "damage_embedding.json").exists()     # unconditional: no table
    assert (ck / "color_metrics.json").is_file()
