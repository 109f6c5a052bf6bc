"""Diffusion backends (sd-inpaint, controlnet, controlnet-full, wall) on tiny random-init models.

The models are built from configs (tests/diffusion_fixtures.py), written with save_pretrained and
loaded back from the local folder offline — the same code path as a real SD 1.5 checkpoint.
2 inference steps at 64 px (one only-masked case at the model's 256 px)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from skimage import data  # noqa: E402

from pipelines import masks as mk  # noqa: E402
from pipelines import models  # noqa: E402
from pipelines.color import color_metrics, rgb_to_lab  # noqa: E402
from pipelines.masks import MaskError  # noqa: E402
from pipelines.models import ModelError, ModelMissingError  # noqa: E402

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
torch.set_num_threads(1)

FAST = dict(steps=2, resolution=64)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    from tests.diffusion_fixtures import build_model_dir
    return build_model_dir(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture()
def env(tiny, monkeypatch):
    monkeypatch.setenv("DEFECT_STUDIO_SD_INPAINT", str(tiny["sd-inpaint"]))
    monkeypatch.setenv("DEFECT_STUDIO_SD_BASE", str(tiny["sd-base"]))
    monkeypatch.setenv("DEFECT_STUDIO_CONTROLNET", str(tiny["controlnet-seg"]))
    monkeypatch.setenv("DEFECT_STUDIO_CONTROLNET_CANNY", str(tiny["controlnet-canny"]))
    monkeypatch.delenv("DEFECT_STUDIO_IP_ADAPTER", raising=False)
    monkeypatch.delenv("DEFECT_STUDIO_MODELS", raising=False)
    monkeypatch.delenv("DEFECT_STUDIO_ANNOTATORS", raising=False)
    return tiny


def _image(h=64, w=64, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([80 + 100 * xx / w, 60 + 120 * yy / h, 140 + 0 * xx], -1)
    return np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


def _mask(h=64, w=64, box=(20, 24, 40, 44)):
    m = np.zeros((h, w), np.uint8)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = 255
    return m


def _outside_equal(out, img, m, feather):
    keep = mk.dilate(m, feather) == 0
    return out.shape == img.shape and out.dtype == np.uint8 and np.array_equal(out[keep], img[keep])


def _gen(name):
    from pipelines.registry import generator_class
    return generator_class(name)()


# --------------------------------------------------------------------------------------------
# Models: availability, instructions, corrupt / wrong files; lazy imports
# --------------------------------------------------------------------------------------------
def test_registry_import_is_light():
    code = ("import sys, pipelines.registry as r; r.backend_status('sd-inpaint'); "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.stdout.strip() == "[]"


def test_missing_weights_give_exact_instruction(monkeypatch, tmp_path):
    from pipelines.registry import backend_status, get_info
    for var in ("DEFECT_STUDIO_SD_INPAINT", "DEFECT_STUDIO_MODELS", "DEFECT_STUDIO_IP_ADAPTER"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    ok, msg = models.available("sd-inpaint")
    assert not ok
    for part in ("stable-diffusion-v1-5/stable-diffusion-inpainting", "model_index.json", "unet/",
                 "vae/", "text_encoder/", "tokenizer/", "scheduler/", "DEFECT_STUDIO_SD_INPAINT"):
        assert part in msg
    assert not backend_status("sd-inpaint")[0] and backend_status("perlin")[0]
    assert get_info("controlnet-full").full_image and not get_info("controlnet").full_image
    monkeypatch.setenv("DEFECT_STUDIO_SD_INPAINT", str(tmp_path / "nowhere"))
    with pytest.raises(ModelMissingError, match="does not exist.*DEFECT_STUDIO_SD_INPAINT"):
        models.resolve("sd-inpaint")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model_index.json").write_text("{}")
    with pytest.raises(ModelMissingError, match="lacks unet/config.json"):
        models.resolve("sd-inpaint", tmp_path / "half")
    ok, msg = models.available("ip-adapter")
    assert not ok and "models/ip-adapter_sd15.safetensors" in msg and "DEFECT_STUDIO_IP_ADAPTER" in msg
    with pytest.raises(ModelMissingError):
        _gen("sd-inpaint")(_image(), _mask(), seed=0, damage_type="scratch", **FAST)


def test_local_folders_resolve(env):
    status = models.availability()
    for kind in ("sd-inpaint", "sd-base", "controlnet-seg", "controlnet-canny"):
        assert status[kind][0], status[kind][1]
    assert not status["ip-adapter"][0]


def test_corrupt_and_wrong_architecture(env, tmp_path):
    bad = tmp_path / "corrupt"
    shutil.copytree(env["sd-inpaint"], bad)
    (bad / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00garbage" * 50)
    with pytest.raises(ModelError, match="corrupt"):
        models.load_inpaint(bad, device="cpu")
    with pytest.raises(ModelError, match="4 input channels.*needs 9"):
        models.load_inpaint(env["sd-base"], device="cpu")
    with pytest.raises(ModelError, match="not a ControlNetModel"):
        models.load_controlnet("controlnet-seg", env["sd-inpaint"] / "unet", device="cpu")
    with pytest.raises(ModelError, match="corrupt"):
        models.check_safetensors(bad / "unet" / "diffusion_pytorch_model.safetensors")


# --------------------------------------------------------------------------------------------
# sd-inpaint
# --------------------------------------------------------------------------------------------
def test_sd_inpaint_candidates_contract_and_seed(env):
    gen = _gen("sd-inpaint")
    img, m = _image(64, 80), _mask(64, 80)
    res = gen.generate(img, m, seed=3, n=3, feather=4, damage_type="scratch", **FAST)
    assert len(res.images) == 3 and res.info["conditioning"] == "text"
    for out in res.images:
        assert _outside_equal(out, img, m, 4)
        assert not np.array_equal(out, img)
    assert not np.array_equal(res.images[0], res.images[1])
    again = gen(img, m, seed=3, feather=4, damage_type="scratch", **FAST)
    assert np.array_equal(again, gen(img, m, seed=3, feather=4, damage_type="scratch", **FAST))
    assert _outside_equal(again, img, m, 4)
    # candidate i of a batch is the single call with seed + i (what the service does)
    assert np.array_equal(res.images[1], gen(img, m, seed=4, feather=4, damage_type="scratch", **FAST))


def test_progress_and_cancel(env):
    from pipelines.training import Cancelled
    gen = _gen("sd-inpaint")
    seen = []
    gen.generate(_image(), _mask(), seed=0, n=2, damage_type="scratch",
                 progress=lambda f, t: seen.append(f), **FAST)
    assert seen and seen[-1] == 1.0 and seen == sorted(seen)
    with pytest.raises(Cancelled):
        gen.generate(_image(), _mask(), seed=0, n=2, damage_type="scratch",
                     cancelled=lambda: True, **FAST)


def test_only_masked_256(env):
    gen = _gen("sd-inpaint")
    img = _image(256, 320, seed=1)
    m = _mask(256, 320, (150, 100, 180, 120))
    res = gen.generate(img, m, seed=0, n=2, feather=6, damage_type="crack", steps=2,
                       only_masked=True, padding=16)
    x0, y0, x1, y1 = res.info["box"]
    assert res.info["work_size"] == (256, 256)            # the model's resolution
    assert (x1 - x0, y1 - y0) == (x1 - x0, x1 - x0) and x1 - x0 < 100
    assert x0 <= 150 - 6 and x1 >= 180 + 6 and y0 <= 100 - 6 and y1 >= 120 + 6
    for out in res.images:
        assert _outside_equal(out, img, m, 6)
    full = gen.generate(img, m, seed=0, feather=6, damage_type="crack", steps=2, only_masked=False)
    assert full.info["box"] == (0, 0, 320, 256) and _outside_equal(full.images[0], img, m, 6)


def test_damage_embedding_table(env, tmp_path):
    from types import SimpleNamespace

    from pipelines.inpaint import DamageEmbedding, condition_embeddings
    pipe = models.load_inpaint(device="cpu")
    table = DamageEmbedding.for_unet(pipe.unet, ["scratch", "crack"], tokens=4, seed=1)
    assert table.dim == pipe.unet.config.cross_attention_dim == 32
    ids = torch.tensor([1, 0, 1])
    assert tuple(table(ids).shape) == (3, 4, 32)
    table.save(tmp_path / "emb")
    loaded = DamageEmbedding.load(tmp_path / "emb")
    assert loaded.damage_types == ["scratch", "crack"]
    assert torch.equal(loaded.embed("crack"), table.embed("crack"))
    gen = _gen("sd-inpaint")
    img, m = _image(), _mask()
    a = gen.generate(img, m, seed=1, damage_type="crack", embedding=tmp_path / "emb", **FAST)
    b = gen.generate(img, m, seed=1, damage_type="scratch", embedding=tmp_path / "emb", **FAST)
    assert a.info["conditioning"] == "table" and not np.array_equal(a.images[0], b.images[0])
    assert _outside_equal(a.images[0], img, m, 4)
    # a type missing from the table falls back to the text encoder
    c = gen.generate(img, m, seed=1, damage_type="hole", embedding=tmp_path / "emb", **FAST)
    assert c.info["conditioning"] == "text"
    # no table entry and no text encoder: a clear message
    bare = SimpleNamespace(unet=pipe.unet, text_encoder=None, tokenizer=None, device=pipe.device)
    with pytest.raises(ModelError, match="no text encoder"):
        condition_embeddings(bare, "hole", loaded)
    cond, _, src = condition_embeddings(bare, None)
    assert src == "unconditional" and tuple(cond.shape) == (1, 77, 32)
    # corrupt table / table for another width
    (tmp_path / "emb" / "damage_embedding.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelError, match="corrupt"):
        DamageEmbedding.load(tmp_path / "emb")
    DamageEmbedding(["scratch"], 2, 768).save(tmp_path / "wide")
    with pytest.raises(ModelError, match="width 768"):
        gen(img, m, seed=0, damage_type="scratch", embedding=tmp_path / "wide", **FAST)


def test_lora_loading_and_errors(env, tmp_path):
    gen = _gen("sd-inpaint")
    img, m = _image(), _mask()
    plain = gen(img, m, seed=0, damage_type="scratch", **FAST)
    with_lora = gen.generate(img, m, seed=0, damage_type="scratch", lora=env["lora"], **FAST)
    assert with_lora.info["lora"] and not np.array_equal(plain, with_lora.images[0])
    assert _outside_equal(with_lora.images[0], img, m, 4)
    # LoRA off again → the plain result comes back exactly
    assert np.array_equal(plain, gen(img, m, seed=0, damage_type="scratch", **FAST))
    with pytest.raises(ModelError, match="another architecture"):
        gen(img, m, seed=0, damage_type="scratch", lora=env["lora-other"], **FAST)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    with pytest.raises(ModelError, match="corrupt"):
        gen(img, m, seed=0, damage_type="scratch", lora=bad, **FAST)
    assert np.array_equal(plain, gen(img, m, seed=0, damage_type="scratch", **FAST))


def test_bad_inputs_have_clear_messages(env):
    gen = _gen("sd-inpaint")
    img = _image()
    with pytest.raises(MaskError, match="empty"):
        gen(img, np.zeros((64, 64), np.uint8), seed=0, damage_type="scratch", **FAST)
    with pytest.raises(ValueError, match="RGB"):
        gen(np.zeros((64, 64, 2), np.uint8), _mask(), seed=0, damage_type="scratch", **FAST)
    with pytest.raises(ValueError, match="uint8"):
        gen(img.astype(np.float32), _mask(), seed=0, damage_type="scratch", **FAST)
    with pytest.raises(ValueError, match="no denoising step"):
        gen(img, _mask(), seed=0, damage_type="scratch", steps=1, strength=0.5)
    with pytest.raises(TypeError, match="unknown parameter"):
        gen(img, _mask(), seed=0, damage_type="scratch", bogus=1, **FAST)


# --------------------------------------------------------------------------------------------
# ControlNet
# --------------------------------------------------------------------------------------------
def test_controlnet_inpaint(env):
    gen = _gen("controlnet")
    img, m = _image(), _mask()
    res = gen.generate(img, m, seed=5, n=2, damage_type="crack", **FAST)
    assert len(res.images) == 2 and not np.array_equal(res.images[0], res.images[1])
    for out in res.images:
        assert _outside_equal(out, img, m, 4) and not np.array_equal(out, img)
    assert np.array_equal(res.images[0], gen(img, m, seed=5, damage_type="crack", **FAST))
    multi = gen.generate(img, m, seed=5, damage_type="crack", structure="canny", **FAST)
    assert multi.info["structure"] == "canny" and _outside_equal(multi.images[0], img, m, 4)
    assert not np.array_equal(multi.images[0], res.images[0])
    with pytest.raises(ModelMissingError, match="DEFECT_STUDIO_ANNOTATORS"):
        gen(img, m, seed=5, damage_type="crack", structure="hed", **FAST)


def test_controlnet_full_image(env):
    gen = _gen("controlnet-full")
    img, m = _image(64, 80), _mask(64, 80)
    res = gen.generate(img, m, seed=2, n=2, damage_type="stain", **FAST)
    assert [o.shape for o in res.images] == [img.shape] * 2
    assert not np.array_equal(res.images[0], res.images[1])
    assert any("full-image" in n for n in res.info["notes"])
    again = gen.generate(img, m, seed=2, n=1, damage_type="stain", structure="canny", **FAST)
    assert again.images[0].shape == img.shape
    assert np.array_equal(res.images[0], gen(img, m, seed=2, damage_type="stain", **FAST))


# --------------------------------------------------------------------------------------------
# Wall colour
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("color", ["#3366cc", "#e8d8b0"])
def test_wall_colour_fidelity_on_photo(env, color):
    img = np.ascontiguousarray(data.coffee()[100:228, 200:328])        # 128×128 real photo
    m = np.zeros(img.shape[:2], np.uint8)
    m[24:104, 20:110] = 255
    gen = _gen("wall")
    res = gen.generate(img, m, seed=0, n=2, feather=3, color=color, steps=2, resolution=128)
    assert res.info["ip_adapter"] is False and any("IP-Adapter" in n for n in res.info["notes"])
    assert res.info["conditioning"] == "unconditional"
    inside = m > 0
    for out in res.images:
        assert _outside_equal(out, img, m, 3)
        assert color_metrics(out, m, color)["delta_e2000"] < 2.0
        r = np.corrcoef(rgb_to_lab(img)[..., 0][inside], rgb_to_lab(out)[..., 0][inside])[0, 1]
        assert r >= 0.9
    assert np.array_equal(res.images[0], gen(img, m, seed=0, feather=3, color=color, steps=2,
                                             resolution=128))


def test_wall_dominant_colour_when_no_colour(env):
    img = np.ascontiguousarray(data.coffee()[100:164, 200:264])
    m = _mask()
    res = _gen("wall").generate(img, m, seed=0, color=None, color_method="kmeans", **FAST)
    assert res.info["target_color"].startswith("#")
    assert color_metrics(res.images[0], m, res.info["target_color"])["delta_e2000"] < 2.0


def test_through_the_service(env):
    """The studio service drives the new backends with its usual calling convention."""
    from studio.services import GenerateRequest, generate
    img, m = _image(), _mask()
    cands = generate(GenerateRequest(img, m, damage_type="scratch", backend="sd-inpaint", n=2))
    assert len(cands) == 2 and all(_outside_equal(c.image, img, m, 4) for c in cands)
    wall = generate(GenerateRequest(img, m, color="#3366cc", backend="wall", n=1))
    assert color_metrics(wall[0].image, m, "#3366cc")["delta_e2000"] < 2.0
