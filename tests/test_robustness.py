"""What benchmarks/robustness.py found, kept: numbers of a generate request are checked with a message
naming them, an EXIF-rotated photo is read upright; and the benchmark's short mode on a live studio
(load, 2 × kill -9 and the start-up clean-up, a kill -9 during a training run that then resumes, the
whole bad-input corpus, the security attempts)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("field, value, msg", [
    ("n", float("nan"), "number of candidates"), ("n", 0, "number of candidates"),
    ("seed", -5, "seed must be an integer in 0..4294967295"), ("seed", 10**30, "seed"),
    ("seed", float("nan"), "seed"), ("strength", float("nan"), "strength"), ("strength", 5.0, "strength"),
    ("feather", -3, "feather"), ("feather", float("inf"), "feather"), ("feather", 2.5, "feather")])
def test_generate_numbers_are_checked_with_a_message(field, value, msg):
    from studio.services import GenerateRequest, UserError, generate
    img = np.zeros((32, 32, 3), np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:16, 8:16] = 255
    req = GenerateRequest(image=img, mask=mask, damage_type="scratch", backend="perlin", n=1)
    setattr(req, field, value)
    with pytest.raises(UserError, match=msg):
        generate(req)
    ok = GenerateRequest(image=img, mask=mask, damage_type="scratch", backend="perlin", n=2, seed=7, feather=3.0,
                         strength=1)
    assert len(generate(ok)) == 2                     # integral floats and the range ends pass


def test_exif_rotated_photo_is_read_upright(tmp_path):
    from pipelines.imageio import read_mask, read_rgb
    arr = np.zeros((96, 128, 3), np.uint8)
    arr[:10] = 255                                    # the top rows, as stored
    exif = Image.Exif()
    exif[0x0112] = 6                                  # shown rotated 90° clockwise
    Image.fromarray(arr).save(tmp_path / "r.jpg", exif=exif, quality=95)
    up = read_rgb(tmp_path / "r.jpg")
    assert up.shape == (128, 96, 3) and up[:, -10:].mean() > 200 and up[:, :10].mean() < 50
    Image.fromarray(arr[..., 0]).save(tmp_path / "m.png")
    assert read_mask(tmp_path / "m.png").shape == (96, 128)          # no EXIF: as stored


@pytest.mark.slow
def test_robustness_benchmark_short_mode(tmp_path, capsys):
    """``python benchmarks/robustness.py --short`` on a live studio: every figure the issue asks for."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import robustness
    res = robustness.run(users=3, seconds=4, kills=2, crash_users=2, window=(1.0, 3.0), workdir=tmp_path / "rb",
                         train_steps=10, experiment=False)
    load, crashes, corpus, security = res["load"], res["crashes"], res["corpus"], res["security"]
    assert load["acked"] > 0 and load["errors"] == 0 and load["integrity"] == "ok"
    assert load["accepted_in_store"] == load["acked"] and load["acked_missing"] == 0
    assert crashes["kills"] == 2 and crashes["lost"] == 0 and crashes["integrity_ok"]
    assert crashes["dangling_rows"] == 0
    assert crashes["cleanup_logged"] and crashes["orphans_left"] == 0          # the start-up clean-up
    assert crashes["orphans_removed"] == crashes["orphans_found"]
    train = res["jobs"]["training"]           # kill -9 during a run: interrupted, then resumed to its target
    assert train["ok"], train
    assert train["shown"] == train["run_row"] == "interrupted" and "stopped while the job was running" in train["message"]
    bad = [r for r in corpus["rows"] if not r["ok"]]
    assert corpus["cases"] >= 40 and not bad, bad
    assert corpus["server_alive"]
    failed = [r for r in security["rows"] if not r["ok"]]
    assert not failed, failed
    print(robustness.table(res))
