"""Wall-colour protocol: conditioning shared by training and generation, reference conditioning
through IP-Adapter while training, data preparation, per-step colour metrics with grades and the
untrained baseline, the ablation runner, the folder loader and the CLI — on tiny random-init
models built from configs (CPU, no downloads)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines import color as col
from pipelines import wall_train as W
from pipelines.training import ConfigError, TrainDataError, latest_checkpoint
from tests import diffusion_fixtures as dfx


def _write_sd(root: Path, text: bool = True) -> Path:
    """The tiny SD inpainting folder; ``text=False``: without text encoder / tokenizer (null in
    model_index.json), as a folder used only with learned embeddings."""
    import shutil
    from diffusers import StableDiffusionInpaintPipeline
    from transformers import CLIPTokenizer
    dfx.write_tokenizer(root / "_tokenizer")
    folder = root / "sd-inpaint"
    StableDiffusionInpaintPipeline(
        unet=dfx._unet(9), vae=dfx._vae(), text_encoder=dfx._text_encoder(),
        tokenizer=CLIPTokenizer.from_pretrained(root / "_tokenizer"), scheduler=dfx._scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False).save_pretrained(folder)
    if not text:
        index = json.loads((folder / "model_index.json").read_text())
        for part in ("text_encoder", "tokenizer"):
            shutil.rmtree(folder / part)
            index[part] = [None, None]
        (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def _write_ip_adapter(root: Path, unet) -> Path:
    """A tiny IP-Adapter folder in the h94 layout: models/ip-adapter_sd15.safetensors (image_proj
    + to_k_ip/to_v_ip per cross-attention layer) and models/image_encoder (a tiny CLIP vision)."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    torch.manual_seed(0)
    D, E = int(unet.config.cross_attention_dim), 16
    enc = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=16, projection_dim=E, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, image_size=32, patch_size=8))
    enc.save_pretrained(root / "models" / "image_encoder")
    sd = {"image_proj.proj.weight": torch.randn(4 * D, E) * 0.2, "image_proj.proj.bias": torch.zeros(4 * D),
          "image_proj.norm.weight": torch.ones(D), "image_proj.norm.bias": torch.zeros(D)}
    key, widths = 1, list(unet.config.block_out_channels)
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            h = widths[-1]
        elif name.startswith("up_blocks"):
            h = list(reversed(widths))[int(name[len("up_blocks.")])]
        else:
            h = widths[int(name[len("down_blocks.")])]
        sd[f"ip_adapter.{key}.to_k_ip.weight"] = torch.randn(h, D) * 0.2
        sd[f"ip_adapter.{key}.to_v_ip.weight"] = torch.randn(h, D) * 0.2
        key += 2
    save_file(sd, str(root / "models" / "ip-adapter_sd15.safetensors"))
    return root


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    torch.set_num_threads(1)
    return _write_sd(tmp_path_factory.mktemp("wall-sd"))


@pytest.fixture(scope="module")
def ip_adapter(tmp_path_factory):
    return _write_ip_adapter(tmp_path_factory.mktemp("ip"), dfx._unet(9))


def _wall(seed=0, size=96, rgb=(180, 60, 40)):
    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), (90, 140, 200), np.uint8)
    m = np.zeros((size, size), np.uint8)
    m[16:80, 10:86] = 255
    img[m > 0] = rgb
    img = np.clip(img.astype(int) + rng.integers(-6, 7, img.shape), 0, 255).astype(np.uint8)
    return img, m


def _cfg(sd, out, **kw):
    base = dict(output_dir=str(out), model=str(sd), resolution=64, padding=8, batch_size=1,
                learning_rate=2e-3, max_steps=2, checkpoint_every=2, validate_every=2, validation_steps=2,
                validation_count=1, validation_seeds=[0], log_every=1)
    base.update(kw)
    return W.WallTrainConfig(**base)


# -- issue 13: one empty conditioning for training and generation ------------------------------
def _captured_hidden_states(unet, calls):
    def hook(mod, args, kwargs):
        calls.append(kwargs["encoder_hidden_states"].detach().clone())
    return unet.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("text", [True, False], ids=["with-text-encoder", "no-text-encoder"])
def test_training_and_generation_use_the_same_empty_conditioning(tmp_path, text):
    from pipelines import models
    from pipelines.wall import WallColorGenerator
    folder = _write_sd(tmp_path / "m", text=text)
    img, m = _wall()
    trainer = W.WallTrainer(_cfg(folder, tmp_path / "run", max_steps=1, validate_every=0,
                                 random_color_prob=0.0), [(img, m, "wall")])
    train_calls: list = []
    orig = trainer._build

    def build(acc):
        parts = orig(acc)
        _captured_hidden_states(parts.unet, train_calls)
        return parts
    trainer._build = build
    trainer.run()
    assert len(train_calls) == 1
    models.clear_cache()
    gen = WallColorGenerator()
    if text:
        pipe = gen._pipeline({"model": str(folder), "ip_adapter": None})
    else:    # the studio's loader wants a full folder: the same components, no text encoder
        from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionInpaintPipeline,
                               UNet2DConditionModel)
        pipe = StableDiffusionInpaintPipeline(
            vae=AutoencoderKL.from_pretrained(folder, subfolder="vae"),
            unet=UNet2DConditionModel.from_pretrained(folder, subfolder="unet"),
            scheduler=DDIMScheduler.from_pretrained(folder, subfolder="scheduler"), text_encoder=None,
            tokenizer=None, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        gen._pipeline = lambda opts: pipe
    gen_calls: list = []
    handle = _captured_hidden_states(pipe.unet, gen_calls)
    try:
        gen.generate(img, m, seed=0, color="#3366cc", model=str(folder), steps=2, strength=1.0)
    finally:
        handle.remove()
    assert gen_calls
    train_enc, gen_enc = train_calls[0][0], gen_calls[0][0]
    assert train_enc.shape == gen_enc.shape and train_enc.shape[-1] == dfx.CROSS_DIM
    torch.testing.assert_close(train_enc, gen_enc)
    if text:   # CLIP's empty prompt, not zeros
        assert train_enc.abs().max() > 1e-3
    else:
        assert train_enc.abs().max() == 0


# -- reference conditioning while training ------------------------------------------------------
def test_reference_goes_through_ip_adapter_while_training(tmp_path, sd, ip_adapter):
    img, m = _wall()
    cfg = _cfg(sd, tmp_path / "run", reference="ip-adapter", ip_adapter=str(ip_adapter), max_steps=1,
               validate_every=1)
    trainer = W.WallTrainer(cfg, [(img, m, "wall")])
    seen: list = []
    orig = trainer._build

    def build(acc):
        parts = orig(acc)

        def hook(mod, args, kwargs):
            if mod.training:     # the training step, not the validation's pipeline
                seen.append(kwargs.get("added_cond_kwargs"))
        parts.unet.register_forward_pre_hook(hook, with_kwargs=True)
        return parts
    trainer._build = build
    res = trainer.run()
    assert trainer.ip and res.step == 1 and np.isfinite(res.loss)
    train_kw = [k for k in seen if k and "image_embeds" in k]
    assert train_kw, "the reference never reached the U-Net"
    emb = train_kw[0]["image_embeds"][0]
    assert emb.shape[:2] == (1, 1)
    # the embedding is the reference's: another colour gives another embedding
    from PIL import Image
    a, _ = trainer.pipe.encode_image([Image.fromarray(trainer.reference((200, 30, 30), 0))], "cpu", 1)
    b, _ = trainer.pipe.encode_image([Image.fromarray(trainer.reference((30, 30, 200), 0))], "cpu", 1)
    assert not torch.allclose(a, b)
    # only LoRA trains: IP-Adapter layers stay frozen
    trainable = [n for n, p in trainer.pipe.unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    rows = W.read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [0, 1] and all(r["reference"] for r in rows)
    with pytest.raises(Exception, match="IP-Adapter"):
        W.WallTrainer(_cfg(sd, tmp_path / "r2", reference="ip-adapter", ip_adapter=str(tmp_path / "none")),
                      [(img, m, "wall")]).run()


def test_random_colour_recolours_the_wall_and_its_reference(tmp_path, sd):
    img, m = _wall()
    t = W.WallTrainer(_cfg(sd, tmp_path / "r", random_color_prob=1.0, batch_size=4), [(img, m, "wall")])
    x, mm, _, cols = t.batch(np.random.default_rng(0))
    own = np.array(t.colors[0]) / 255
    assert all(np.abs(c.numpy() - own).max() > 0.02 for c in cols)
    for k in range(4):   # the crop's wall and the reference both show the drawn colour
        crop = ((x[k].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
        target = tuple(int(v) for v in np.round(cols[k].numpy() * 255))
        assert col.color_metrics(crop, mm[k, 0].numpy() > 0, target)["delta_e2000"] < 5
        assert col.color_metrics(t._refs[k], np.ones(t._refs[k].shape[:2]), target)["delta_e2000"] < 2
    t0 = W.WallTrainer(_cfg(sd, tmp_path / "r0", random_color_prob=0.0, batch_size=4), [(img, m, "wall")])
    _, _, _, cols0 = t0.batch(np.random.default_rng(0))
    assert np.allclose(cols0.numpy(), own)


# -- data preparation ---------------------------------------------------------------------------
def test_prepare_defaults_erosion_quality_and_small_mask_fallback():
    cfg = W.WallTrainConfig(output_dir="x")
    assert (cfg.wall_erode_px, cfg.wall_min_quality, cfg.random_color_prob, cfg.min_mask_px) == (5.0, 0.6, 0.3, 100)
    img, m = _wall()
    p = W.prepare_wall_samples([(img, m, "wall")])[0]
    assert not p.fallback and p.quality > 0.95 and abs(p.color[0] - 180) <= 3
    assert np.count_nonzero(p.mask) < np.count_nonzero(m)
    assert np.count_nonzero(p.mask) == np.count_nonzero(__import__("pipelines.masks", fromlist=["x"]).erode(m, 5))
    # a mask that leaks onto the blue background: most pixels are not the wall's colour → dropped
    leak = np.zeros_like(m)
    leak[:, :60] = 255
    with pytest.raises(TrainDataError, match="wall's colour"):
        W.prepare_wall_samples([(img, leak, "wall")])
    kept = W.prepare_wall_samples([(img, m, "wall"), (img, leak, "wall")])
    assert len(kept) == 1
    # a small mask (< 100 px after erosion): kept, colour = the image's mean
    small = np.zeros_like(m)
    small[40:52, 40:52] = 255          # 144 px, ~4 px after a 5 px erosion
    s = W.prepare_wall_samples([(img, small, "wall")])[0]
    assert s.fallback and s.mask.any()
    assert np.allclose(s.color, img.reshape(-1, 3).mean(0), atol=1)


def test_config_errors():
    for bad in [dict(random_color_prob=1.5), dict(reference="clip"), dict(validation_colors=["nope"]),
                dict(wall_color_method="mode"), dict(wall_min_quality=2.0), dict(color_loss_weight=-1.0)]:
        with pytest.raises(ConfigError):
            W.WallTrainConfig(output_dir="x", **bad)
    with pytest.raises(ConfigError, match="unknown WallTrainConfig key.*mode"):   # a kind of its own (TRAINERS)
        W.WallTrainConfig.from_dict({"output_dir": "x", "mode": "damage"})
    assert W.WallTrainConfig(output_dir="x", validation_colors="#112233,#445566").validation_colors == \
        ["#112233", "#445566"]


def test_folder_loader(tmp_path):
    from pipelines.imageio import write_png_atomic
    img, m = _wall()
    (tmp_path / "a" / "images").mkdir(parents=True)
    (tmp_path / "a" / "masks").mkdir()
    write_png_atomic(tmp_path / "a" / "images" / "w1.png", img)
    write_png_atomic(tmp_path / "a" / "masks" / "w1.png", m)
    write_png_atomic(tmp_path / "a" / "images" / "w2.png", img)
    write_png_atomic(tmp_path / "a" / "masks" / "w2_mask.png", m)
    s = W.wall_samples_from_folder(tmp_path / "a", size=48)
    assert len(s) == 2 and s[0].image.shape == (48, 48, 3) and s[0].mask.shape == (48, 48)
    write_png_atomic(tmp_path / "a" / "images" / "w3.png", img)
    with pytest.raises(TrainDataError, match="no mask for 1 photo"):
        W.wall_samples_from_folder(tmp_path / "a")
    (tmp_path / "b").mkdir()                   # side by side
    write_png_atomic(tmp_path / "b" / "w.png", img)
    write_png_atomic(tmp_path / "b" / "w_mask.png", m)
    assert len(W.wall_samples_from_folder(tmp_path / "b")) == 1
    with pytest.raises(TrainDataError, match="does not exist"):
        W.wall_samples_from_folder(tmp_path / "missing")


# -- validation: metrics file, grades, untrained baseline, grid ----------------------------------
def test_validation_metrics_file_baseline_and_grid(tmp_path, sd):
    import cv2
    img, m = _wall()
    cfg = _cfg(sd, tmp_path / "run", max_steps=2, validate_every=2, validation_colors=["#3366cc"],
               validation_seeds=[0, 1])
    res = W.train_wall(cfg, [(img, m, "wall")])
    rows = W.read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [0, 2] and rows[0]["baseline"] and not rows[1]["baseline"]
    for r in rows:
        assert r["grade"] in ("poor", "good", "excellent") and r["n"] == 2
        assert {"lab_distance", "hue_error_deg", "delta_e2000"} <= set(r)
        assert all(it["target"] == "#3366cc" for it in r["items"])
    grid = cv2.imread(str(Path(res.validation)))
    assert grid.shape[:2] == (64, 64 * 6)       # crop, mask, reference, depth, 2 seeds
    ref = cv2.cvtColor(grid[:, 128:192], cv2.COLOR_BGR2RGB)
    assert col.color_metrics(ref, np.ones((64, 64)), "#3366cc")["delta_e2000"] < 2
    ck = Path(res.checkpoint)
    assert json.loads((ck / "color_metrics.json").read_text())["step"] == 2
    assert (ck / "pytorch_lora_weights.safetensors").is_file()


def test_metrics_row_grades():
    ref = col.solid_reference("#3366cc", 32, noise_sigma=0, gradient=(1, 1))
    full = np.full((32, 32), 255, np.uint8)
    row = W.metrics_row(3, [(ref, full, "#3366cc"), (ref, full, "#cc3333")])
    assert row["step"] == 3 and row["n"] == 2
    assert [it["grade"] for it in row["items"]] == ["excellent", "poor"] and row["good_share"] == 0.5
    table = W.metrics_table([row])
    assert "| 3 |" in table and "poor" in table


def test_ablation_runner_writes_a_table(tmp_path, sd):
    img, m = _wall()
    cfg = _cfg(sd, tmp_path / "unused", max_steps=1, validate_every=0, color_loss_weight=0.0)
    table = W.run_ablation(cfg, [(img, m, "wall")], tmp_path / "abl")
    assert [r["variant"] for r in table] == ["baseline", "kmeans", "color-loss", "no-texture", "unconditional"]
    for r in table:
        assert r["steps"] == 1 and r["untrained"]["grade"] in ("poor", "good", "excellent")
        assert [x["step"] for x in W.read_metrics(tmp_path / "abl" / r["variant"])] == [0, 1]
    md = (tmp_path / "abl" / "ablation.md").read_text()
    assert md.count("\n") >= 7 and "unconditional" in md
    with pytest.raises(ConfigError, match="unknown ablation"):
        W.run_ablation(cfg, [(img, m, "wall")], tmp_path / "x", variants=["texture2"])


# -- CLI ------------------------------------------------------------------------------------------
def _photo_folder(root: Path) -> Path:
    from pipelines.imageio import write_png_atomic
    for k, rgb in enumerate([(180, 60, 40), (60, 150, 90)]):
        img, m = _wall(k, rgb=rgb)
        write_png_atomic(root / "images" / f"w{k}.png", img)
        write_png_atomic(root / "masks" / f"w{k}.png", m)
    return root


def test_cli_train_wall_and_ablation(tmp_path, sd, capsys):
    from studio.__main__ import main
    data = _photo_folder(tmp_path / "photos")
    rc = main(["train", "--kind", "wall", "--data", str(data), "--out", str(tmp_path / "run"),
               "--model", str(sd), "--steps", "1", "--resolution", "64", "--validate-every", "0",
               "--validation-colors", "#3366cc", "--random-color-prob", "0.5", "--erode", "3",
               "--min-quality", "0.5", "--reference", "none", "--quiet"])
    assert rc == 0
    assert '"stopped": "steps"' in capsys.readouterr().out
    assert W.read_metrics(tmp_path / "run") == []          # --validate-every 0: no validation
    state = json.loads((Path(latest_checkpoint(tmp_path / "run")) / "trainer_state.json").read_text())
    assert state["config"]["wall_erode_px"] == 3 and state["config"]["random_color_prob"] == 0.5
    assert state["config"]["reference"] == "none" and state["config"]["validate_every"] == 0
    assert state["config"]["validation_colors"] == ["#3366cc"]
    # bad input: one line, non-zero
    rc = main(["train", "--kind", "wall", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r2"),
               "--model", str(sd), "--steps", "1", "--quiet"])
    err = capsys.readouterr().err
    assert rc != 0 and "does not exist" in err and "Traceback" not in err
    rc = main(["wall-ablation", "--data", str(data), "--out", str(tmp_path / "abl"), "--model", str(sd),
               "--steps", "1", "--resolution", "64", "--validation-steps", "2",
               "--variants", "unconditional", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0 and "| unconditional |" in out and (tmp_path / "abl" / "ablation.md").is_file()
    train_help = _help(["train", "--help"])
    for flag in ("--kind", "--masks", "--random-color-prob", "--reference", "--ip-adapter", "--color-method",
                 "--color-loss-weight", "--erode", "--min-quality", "--validate-every", "--validation-colors"):
        assert flag in train_help
    assert "wall" in train_help
    abl_help = _help(["wall-ablation", "--help"])
    for flag in ("--data", "--masks", "--out", "--model", "--steps", "--variants", "--validation-colors"):
        assert flag in abl_help


def _help(argv) -> str:
    import contextlib
    import io
    from studio.__main__ import main
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        main(argv)
    return buf.getvalue()


# -- Training tab (handlers, no server) -------------------------------------------------------------
def test_training_tab_wall_handlers(tmp_path):
    import gradio as gr
    from studio.config import Settings
    from studio.context import StudioContext
    from studio.ui import training_tab, training_wall as TW
    ctx = StudioContext(Settings.from_env(workspace=tmp_path / "ws"))
    data = _photo_folder(tmp_path / "photos")
    model = str(tmp_path / "m")                 # a model folder inside the data roots (studio.paths)
    args = dict(folder=str(data), masks="", model=model, name="", minutes=15, steps=3, rank=4, prob=0.3,
                reference=list(TW.REFERENCES)[2], method="kmeans", color_loss=0.5, colors="#3366cc", resume=False)
    run = TW.wall_command(ctx, *args.values())
    cmd = " ".join(run.cmd)
    for part in ("--kind wall", f"--data {data}", "--steps 3", "--reference none", "--color-method kmeans",
                 "--random-color-prob 0.3", "--color-loss-weight 0.5", "--validation-colors #3366cc",
                 f"--model {model}", "--no-resume"):
        assert part in cmd
    assert run.out == training_tab.adapters_root(ctx) / "wall-photos"
    for bad, msg in ((dict(folder=""), "photos"), (dict(folder=str(tmp_path / "nope")), "does not exist"),
                     (dict(colors="#12"), "Validation colours"), (dict(prob=2), "probability")):
        with pytest.raises(gr.Error, match=msg):
            TW.wall_command(ctx, *{**args, **bad}.values())
    # the metrics table reads the run's file (step 0 flagged as the untrained baseline)
    ref = col.solid_reference("#3366cc", 32, noise_sigma=0, gradient=(1, 1))
    W.append_metrics(run.out, W.metrics_row(0, [(ref, np.full((32, 32), 255, np.uint8), "#3366cc")], baseline=True))
    rows = TW.metric_rows(run.out)
    assert rows[0][0] == 0 and rows[0][4] == "excellent (untrained)"
    with gr.Blocks():                                          # the tab renders with the wall block
        training_tab.build(ctx)
