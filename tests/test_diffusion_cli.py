"""Every diffusion backend through the CLI and the UI (gradio_client) with tiny local models."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.masks import dilate

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.diffusion_fixtures import build_model_dir
    return build_model_dir(tmp_path_factory.mktemp("tiny-models-cli"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("diff-in")
    rng = np.random.default_rng(0)
    img = rng.integers(40, 220, (64, 64, 3), np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[20:40, 24:44] = 255
    Image.fromarray(img).save(d / "img.png")
    Image.fromarray(mask).save(d / "mask.png")
    return d, img, mask


def _env(tiny):
    env = dict(os.environ, HF_HUB_OFFLINE="1", DEFECT_STUDIO_SD_BASE=str(tiny["sd-base"]))
    for k in ("DEFECT_STUDIO_SD_INPAINT", "DEFECT_STUDIO_CONTROLNET", "DEFECT_STUDIO_MODELS"):
        env.pop(k, None)
    return env


@pytest.mark.parametrize("backend", ["sd-inpaint", "controlnet", "controlnet-full", "wall"])
def test_cli_backend(tiny, inputs, tmp_path, backend):
    d, img, mask = inputs
    target = ["--color", "#3366cc"] if backend == "wall" else ["--damage", "scratch"]
    model = tiny["sd-base"] if backend == "controlnet-full" else tiny["sd-inpaint"]
    args = [sys.executable, "-m", "studio", "generate", "--image", d / "img.png", "--mask", d / "mask.png",
            *target, "--backend", backend, "--model", model, "--controlnet",
            tiny["controlnet-seg"], "--steps", "2", "--n", "2", "--seed", "3", "--quiet"]
    outs = []
    runs = ("a", "b") if backend == "sd-inpaint" else ("a",)  # seed determinism: once via the CLI
    for name in runs:
        r = subprocess.run([*map(str, args), "--out", str(tmp_path / name)], cwd=ROOT, env=_env(tiny),
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        outs.append(sorted((tmp_path / name).glob("candidate_*.png")))
    assert len(outs[0]) == 2
    if len(outs) == 2:
        for a, b in zip(*outs):
            assert a.read_bytes() == b.read_bytes()  # same seed, same images
    if backend != "controlnet-full":  # full-image mode makes a new image by design
        outside = dilate(mask, 4) == 0
        for f in outs[0]:
            out = np.asarray(Image.open(f).convert("RGB"))
            assert np.array_equal(out[outside], img[outside])
    prov = json.loads((tmp_path / "a" / "provenance.json").read_text())
    assert prov["candidates"][0]["generator"] == backend


def test_cli_missing_weights_message(inputs, tmp_path):
    d, _, _ = inputs
    env = dict(os.environ, HF_HUB_OFFLINE="1", DEFECT_STUDIO_MODELS=str(tmp_path / "none"))
    env.pop("DEFECT_STUDIO_SD_INPAINT", None)
    r = subprocess.run([sys.executable, "-m", "studio", "generate", "--image", str(d / "img.png"),
                        "--mask", str(d / "mask.png"), "--damage", "scratch", "--backend", "sd-inpaint",
                        "--out", str(tmp_path / "o"), "--quiet"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "DEFECT_STUDIO_SD_INPAINT" in r.stderr


def test_ui_sd_inpaint_via_api(tiny, tmp_path):
    from gradio_client import Client, handle_file

    from studio.ui.annotate import option_values
    from tests.conftest import free_port, start_app, stop_app
    ws = tmp_path / "ws"
    ws.mkdir()
    proc, url, _ = start_app(ws, free_port(), {"DEFECT_STUDIO_SD_INPAINT": str(tiny["sd-inpaint"]),
                                               "DEFECT_STUDIO_SD_BASE": str(tiny["sd-base"]),
                                               "DEFECT_STUDIO_CONTROLNET": str(tiny["controlnet-seg"])})
    try:
        client = Client(url, verbose=False)
        pick = client.predict("bottle", api_name="/list_images")[0]
        editor, *_ = client.predict(pick["id"], 4, api_name="/load_image")
        bg = editor["background"] if isinstance(editor["background"], str) else editor["background"]["path"]
        layer = np.zeros((256, 256, 4), np.uint8)
        layer[100:140, 60:110] = (255, 0, 0, 255)
        Image.fromarray(layer).save(tmp_path / "layer.png")
        value = {"background": handle_file(bg), "layers": [handle_file(str(tmp_path / "layer.png"))],
                 "composite": handle_file(bg)}
        for backend in ("sd-inpaint", "controlnet", "controlnet-full", "wall"):
            mode = "Wall colour" if backend == "wall" else "Damage type"
            gallery, cands, _, status = client.predict(
                value, "bottle", pick["id"], mode, "contamination", "#3366cc", backend, 2, 0,
                4, 0.8, *option_values(steps=2), api_name="/generate")
            assert len(cands) == 2 and {c["generator"] for c in cands} == {backend}
            if backend == "controlnet-full":
                continue  # a whole new image by design
            if backend == "wall":
                assert all(float(g["caption"].split("ΔE2000 ")[1].split()[0]) < 2 for g in gallery)
            src = np.asarray(Image.open(bg).convert("RGB"))
            outside = dilate((layer[..., 3] > 0).astype(np.uint8) * 255, 4) == 0
            for item in gallery:
                path = item["image"] if isinstance(item["image"], str) else item["image"]["path"]
                assert np.array_equal(np.asarray(Image.open(path).convert("RGB"))[outside], src[outside])
    finally:
        stop_app(proc)
