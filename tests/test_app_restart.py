"""A studio with login and a small upload limit: bad uploads are refused with a message, and an
accepted sample survives a server restart (the demo set is not imported twice)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import free_port, start_app, stop_app

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402

AUTH = ("inspector", "s3cret-pass")


def _accept_one(client, tmp_path) -> int:
    images = client.predict("brushed_metal", api_name="/list_images")
    pick = next(r for r in images if r["split"] == "train")
    editor, *_ = client.predict(pick["id"], 4, api_name="/load_image")
    bg = editor["background"] if isinstance(editor["background"], str) else editor["background"]["path"]
    w, h = Image.open(bg).size
    layer = np.zeros((h, w, 4), np.uint8)
    layer[40:60, 30:200] = (255, 45, 45, 255)
    Image.fromarray(layer).save(tmp_path / "layer.png")
    value = {"background": handle_file(bg), "layers": [handle_file(str(tmp_path / "layer.png"))],
             "composite": handle_file(bg)}
    _, cands, _, _ = client.predict(value, "brushed_metal", pick["id"], "Damage type", "scratch",
                                    "#3366cc", "perlin", 2, 1, 4, 0.8, api_name="/generate")
    sid = cands[1]["sample_id"]
    status, _ = client.predict(sid, "keep", cands, api_name="/accept")
    assert "accepted" in status
    return sid


def _accepted_ids(client) -> set[int]:
    table, _, _roles = client.predict("(all)", "accepted", "", api_name="/list_samples")
    return {int(r[0]) for r in table["data"] if r and r[0] is not None}


def test_login_upload_limits_and_restart(tmp_path):
    ws = tmp_path / "workspace"
    ws.mkdir()
    env = {"DEFECT_STUDIO_AUTH": f"{AUTH[0]}:{AUTH[1]}", "DEFECT_STUDIO_MAX_UPLOAD_MB": "1"}
    port = free_port()
    proc, url, _ = start_app(ws, port, env)
    try:
        with pytest.raises(Exception):
            Client(url, verbose=False).predict("bottle", api_name="/list_images")
        client = Client(url, auth=AUTH, verbose=False)
        n_images = len(client.predict("bottle", api_name="/list_images"))
        sid = _accept_one(client, tmp_path)

        big = tmp_path / "big.png"  # ~2.3 MB of noise: over the 1 MB limit
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (900, 900, 3), np.uint8)).save(big)
        with pytest.raises(Exception, match="(?i)limit|too large|size"):
            client.predict(handle_file(str(big)), "bottle", 4, api_name="/upload_image")
        huge = tmp_path / "huge.png"  # 20000×20000 px, ~50 KB on disk
        Image.new("1", (20000, 20000)).save(huge)
        with pytest.raises(Exception, match="MP limit"):
            client.predict(handle_file(str(huge)), "bottle", 4, api_name="/upload_image")
        good = tmp_path / "part.png"
        Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(good)
        trunc = tmp_path / "trunc.png"
        trunc.write_bytes(good.read_bytes()[:60])
        with pytest.raises(Exception, match="truncated|not an image"):
            client.predict(handle_file(str(trunc)), "bottle", 4, api_name="/upload_image")
        # nothing was lost by the refused uploads
        assert len(client.predict("bottle", api_name="/list_images")) == n_images
    finally:
        stop_app(proc)

    proc, url, _ = start_app(ws, free_port(), env)
    try:
        client = Client(url, auth=AUTH, verbose=False)
        assert sid in _accepted_ids(client)
        assert len(client.predict("bottle", api_name="/list_images")) == n_images
    finally:
        stop_app(proc)
