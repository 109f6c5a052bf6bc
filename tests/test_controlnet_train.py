"""ControlNet fine-tuning on the product's reference defects (tiny local SD components, CPU)."""
from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines import controlnet_train as C
from pipelines.training import CheckpointError, ConfigError, Checkpoints, latest_checkpoint, read_history
from tests import diffusion_fixtures as dfx

ROOT = Path(__file__).resolve().parent.parent
BOTTLE = ROOT / "assets" / "demo" / "bottle"
TYPES = ["broken_large", "contamination"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The tiny SD inpainting (9-channel) and base (4-channel) folders and a tiny ControlNet."""
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline
    from transformers import CLIPTokenizer
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("sd")
    dfx.write_tokenizer(root / "_tokenizer")
    common = dict(vae=dfx._vae(), text_encoder=dfx._text_encoder(),
                  tokenizer=CLIPTokenizer.from_pretrained(root / "_tokenizer"), scheduler=dfx._scheduler(),
                  safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    StableDiffusionInpaintPipeline(unet=dfx._unet(9), **common).save_pretrained(root / "sd-inpaint")
    StableDiffusionPipeline(unet=dfx._unet(4, seed=1), **common).save_pretrained(root / "sd-base")
    dfx._controlnet(0).save_pretrained(root / "controlnet-seg")
    return {k: root / k for k in ("sd-inpaint", "sd-base", "controlnet-seg")}


def _cfg(models, out, **kw):
    base = dict(output_dir=str(out), model=str(models["sd-inpaint"]), data=str(BOTTLE), damage_types=TYPES,
                image_size=128, resolution=64, padding=8, learning_rate=1e-4, max_steps=4, checkpoint_every=2,
                checkpoint_limit=2, validate_every=0, log_every=1)
    base.update(kw)
    return C.ControlNetTrainConfig(**base)


def _weights(folder):
    from safetensors.torch import load_file
    return load_file(str(Path(folder) / C.WEIGHTS_FILE))


def test_config_refuses_unknown_keys_and_bad_values(tmp_path):
    with pytest.raises(ConfigError, match="unknown ControlNetTrainConfig key.*lerning_rate"):
        C.ControlNetTrainConfig.from_dict({"output_dir": str(tmp_path), "lerning_rate": 1e-4})
    with pytest.raises(ConfigError, match="resolution"):
        C.ControlNetTrainConfig(output_dir=str(tmp_path), resolution=60)
    with pytest.raises(ConfigError, match="output_dir"):
        C.ControlNetTrainConfig()


def test_controlnet_from_inpainting_unet_takes_the_four_noisy_latents():
    unet = dfx._unet(9)
    net = C.controlnet_from_unet(unet)
    assert net.config.in_channels == 4 and net.conv_in.in_channels == 4
    assert torch.equal(net.conv_in.weight, unet.conv_in.weight[:, :4])
    # the zero convolutions start at zero: before training the ControlNet changes nothing
    with torch.no_grad():
        down, mid = net(torch.randn(1, 4, 8, 8), torch.tensor([10]), encoder_hidden_states=torch.randn(1, 5, 32),
                        controlnet_cond=torch.rand(1, 3, 64, 64), return_dict=False)
    assert all(float(d.abs().max()) == 0.0 for d in down) and float(mid.abs().max()) == 0.0


def test_train_checkpoint_resume_and_generate_with_the_trained_controlnet(tmp_path, models):
    from pipelines.controlnet import ControlNetInpaintGenerator
    from pipelines.roles import folder_roles
    out = tmp_path / "run"
    seen = []
    res = C.run_from_config(_cfg(models, out, validate_every=4, validation_steps=2, validation_count=1,
                                 validation_seeds=[0]), progress=lambda f, m: seen.append((f, m)))
    assert (res.step, res.steps_this_run, res.stopped) == (4, 4, "steps")
    assert len(res.losses) == 4 and all(np.isfinite(v) for _, v in res.losses)
    assert read_history(out) == res.losses and seen[-1][0] == 1.0
    assert [p.name for p in Checkpoints(out).all()] == ["step-0000002", "step-0000004"]
    ck = latest_checkpoint(out)
    for f in ("config.json", C.WEIGHTS_FILE, "optimizer.safetensors", "trainer_state.json", "validation.png"):
        assert (ck / f).is_file(), f
    state = json.loads((ck / "trainer_state.json").read_text())
    assert state["kind"] == "controlnet" and state["damage_types"] == TYPES and state["conditioning"] == "text"
    assert Path(res.validation).is_file()

    # training_data.json: reference defects only (never an evaluation image)
    manifest = json.loads((out / "training_data.json").read_text())
    roles = folder_roles(BOTTLE)
    ref = set(roles.rel([s for s in roles.reference if s.label in TYPES]))
    assert manifest["reference"] and set(manifest["reference"]) == ref
    assert not set(manifest["reference"]) & set(roles.rel(roles.evaluation))

    # a diffusers ControlNet that moved away from its from_unet start (zero convs no longer zero)
    from diffusers import ControlNetModel
    net = ControlNetModel.from_pretrained(ck)
    assert net.config.in_channels == 4
    zero = [v for k, v in _weights(ck).items() if k.startswith("controlnet_down_blocks")]
    assert max(float(v.abs().max()) for v in zero) > 0

    # resume continues the step count; checkpoint_limit keeps 2
    before = _weights(ck)
    res2 = C.run_from_config(_cfg(models, out, max_steps=6))
    assert (res2.step, res2.steps_this_run) == (6, 2)
    assert [s for s, _ in res2.losses] == [1, 2, 3, 4, 5, 6]
    assert [p.name for p in Checkpoints(out).all()] == ["step-0000004", "step-0000006"]
    after = _weights(latest_checkpoint(out))
    assert any(not torch.equal(before[k], after[k]) for k in before)

    # the controlnet generator takes the run folder (= its latest checkpoint); outside the mask unchanged
    from pipelines.mvtec import load_image, load_mask
    from pipelines import masks as mk
    sample = next(s for s in roles.reference if s.label == "contamination")
    img, mask = load_image(sample.path, 128), (load_mask(sample, 128) * 255).astype(np.uint8)
    gen = ControlNetInpaintGenerator()
    params = dict(model=str(models["sd-inpaint"]), controlnet=str(out), damage_type="contamination", steps=2,
                  resolution=64)
    a = gen(img, mask, seed=0, **params)
    outside = mk.dilate(mask, 4) == 0
    assert a.shape == img.shape and np.array_equal(a[outside], img[outside])
    assert gen.ancestors(params) == manifest["ancestors"]


def test_cancel_stops_with_a_complete_checkpoint_and_no_partial_one(tmp_path, models, monkeypatch):
    out = tmp_path / "cancel"
    calls = {"n": 0}

    def cancelled():
        calls["n"] += 1
        return calls["n"] > 3

    res = C.run_from_config(_cfg(models, out, max_steps=50, checkpoint_every=100), cancelled=cancelled)
    assert res.stopped == "cancelled" and res.step == 3
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000003"]     # nothing half-written
    assert (out / "latest").read_text() == "step-0000003"
    from diffusers import ControlNetModel
    ControlNetModel.from_pretrained(out / "checkpoints" / "step-0000003")

    # a save that fails (disk full) leaves no partial checkpoint and keeps the previous latest
    out2 = tmp_path / "diskfull"
    real = C.save_optimizer
    n = {"saves": 0}

    def flaky(opt, folder):
        n["saves"] += 1
        if n["saves"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(opt, folder)

    monkeypatch.setattr(C, "save_optimizer", flaky)
    with pytest.raises(CheckpointError, match="No space left.*step-0000002 stays the latest"):
        C.run_from_config(_cfg(models, out2))
    assert [p.name for p in (out2 / "checkpoints").iterdir()] == ["step-0000002"]


def test_base_model_from_given_weights_and_refusals(tmp_path, models):
    out = tmp_path / "base"
    res = C.run_from_config(_cfg(models, out, model=str(models["sd-base"]), controlnet=str(models["controlnet-seg"]),
                                 max_steps=2, validate_every=2, validation_steps=2, validation_count=1,
                                 validation_seeds=[0]))
    assert res.step == 2 and np.isfinite(res.loss) and Path(res.validation).is_file()
    cfg = json.loads((latest_checkpoint(out) / "config.json").read_text())
    assert cfg["_class_name"] == "ControlNetModel"
    assert cfg["conditioning_embedding_out_channels"] == [8, 16, 16, 32]      # started from the given weights
    # another run's folder cannot be resumed as this one (other damage types)
    with pytest.raises(CheckpointError, match="use a new output_dir"):
        C.run_from_config(_cfg(models, out, model=str(models["sd-base"]), damage_types=["broken_large"],
                               max_steps=3))
    with pytest.raises(ConfigError, match="not a diffusers ControlNet"):
        C.run_from_config(_cfg(models, tmp_path / "x", controlnet=str(tmp_path)))


def test_cli_train_kind_controlnet(tmp_path, models, capsys):
    from studio.__main__ import build_parser, main
    helptext = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "controlnet" in helptext and "--controlnet" in helptext
    out = tmp_path / "cli"
    rc = main(["train", "--kind", "controlnet", "--data", str(BOTTLE), "--out", str(out), "--model",
               str(models["sd-inpaint"]), "--damage-types", "contamination", "--steps", "2", "--resolution", "64",
               "--image-size", "128", "--quiet"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["step"] == 2 and Path(summary["checkpoint"]).name == "step-0000002"
    assert (out / "training_data.json").is_file()


def test_training_tab_controlnet_command_and_job(tmp_path, monkeypatch):
    """The Training tab's ControlNet section: the trainer's command line from the widget values
    (an export of the product, only its reference defects), refusals as gr.Error, the job runs it."""
    import shutil
    import gradio as gr
    from studio.config import Settings
    from studio.context import StudioContext
    from studio.dataset import Store
    from studio.formats import import_any
    from studio.ui import training_controlnet as TC
    from studio.ui import training_tab as TT
    ws = tmp_path / "ws"
    import_any(Store(ws), BOTTLE, "auto", "bottle")
    ctx = StudioContext(Settings.from_env(workspace=ws))
    sd = str(ws / "sd")                       # a model folder inside the data roots (studio.paths)
    run = TC.controlnet_command(ctx, "bottle", ["contamination"], sd, "", "", 5, 3, 0, False)
    cmd = run.cmd
    assert cmd[cmd.index("--kind") + 1] == "controlnet" and cmd[cmd.index("--steps") + 1] == "3"
    assert cmd[cmd.index("--damage-types") + 1] == "contamination" and "--no-resume" in cmd
    assert cmd[cmd.index("--model") + 1] == sd and "--controlnet" not in cmd
    assert run.out == TT.adapters_root(ctx) / "controlnet-bottle" and (run.data / "test").is_dir()
    with pytest.raises(gr.Error, match="Pick a product"):
        TC.controlnet_command(ctx, "", [], "", "", "", 5, 0, 0, True)
    with pytest.raises(gr.Error, match="not a folder"):
        TC.controlnet_command(ctx, "bottle", [], "", str(tmp_path / "missing"), "", 5, 0, 0, True)
    # the listing tells a ControlNet run from a LoRA one
    ck = TT.adapters_root(ctx) / "controlnet-bottle" / "checkpoints" / "step-0000002"
    ck.mkdir(parents=True)
    (ck / "trainer_state.json").write_text(json.dumps({"kind": "controlnet", "step": 2}))
    assert TT.trained_adapters(TT.adapters_root(ctx))[0][:3] == ["controlnet-bottle", "controlnet", "step-0000002"]
    shutil.rmtree(ck.parent.parent)
