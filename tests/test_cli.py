"""The headless CLI: generate on any RGB image, determinism, and clear failures on bad input."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.masks import dilate

ROOT = Path(__file__).resolve().parent.parent


def run(*args, cwd=ROOT, env=None):
    return subprocess.run([sys.executable, "-m", "studio", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:200, 0:300]
    img = np.stack([(xx * 0.8) % 256, (yy * 1.2) % 256, (xx + yy) % 256], -1).astype(np.uint8)
    img = np.clip(img.astype(int) + rng.integers(-10, 10, img.shape), 0, 255).astype(np.uint8)
    mask = np.zeros((200, 300), np.uint8)
    mask[60:110, 100:180] = 255
    Image.fromarray(img).save(d / "part.png")
    Image.fromarray(mask).save(d / "mask.png")
    return d, img, mask


def _outputs(out: Path):
    return sorted(out.glob("candidate_*.png"))


def test_generate_writes_n_images_identical_outside_mask(inputs, tmp_path):
    d, img, mask = inputs
    r = run("generate", "--image", d / "part.png", "--mask", d / "mask.png", "--damage", "scratch",
            "--n", 3, "--seed", 5, "--feather", 4, "--quiet", "--out", tmp_path / "a")
    assert r.returncode == 0, r.stderr
    files = _outputs(tmp_path / "a")
    assert len(files) == 3
    outside = dilate(mask, 4) == 0
    outs = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    for out in outs:
        assert out.shape == img.shape
        assert np.array_equal(out[outside], img[outside])
        assert np.abs(out[mask > 0].astype(int) - img[mask > 0]).mean() > 3
    assert not np.array_equal(outs[0], outs[1])  # different seeds differ
    prov = (tmp_path / "a" / "provenance.json").read_text()
    assert '"seed": 5' in prov and '"generator": "perlin"' in prov


def test_same_seed_same_images(inputs, tmp_path):
    d, _, _ = inputs
    for name in ("x", "y"):
        r = run("generate", "--image", d / "part.png", "--mask", d / "mask.png", "--damage",
                "contamination", "--n", 2, "--seed", 11, "--quiet", "--out", tmp_path / name)
        assert r.returncode == 0, r.stderr
    for a, b in zip(_outputs(tmp_path / "x"), _outputs(tmp_path / "y")):
        assert a.read_bytes() == b.read_bytes()


def test_wall_colour_mode(inputs, tmp_path):
    d, img, mask = inputs
    r = run("generate", "--image", d / "part.png", "--mask", d / "mask.png", "--color", "#3366cc",
            "--n", 1, "--quiet", "--out", tmp_path / "w")
    assert r.returncode == 0, r.stderr
    from pipelines.color import color_metrics
    out = np.asarray(Image.open(_outputs(tmp_path / "w")[0]).convert("RGB"))
    assert color_metrics(out, mask, (0x33, 0x66, 0xCC))["delta_e2000"] < 2.0


def _bad(tmp_path, *extra, image=None, mask=None):
    out = tmp_path / "out"
    r = run("generate", "--image", image, *(("--mask", mask) if mask else ()), *extra,
            "--quiet", "--out", out)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert not out.exists() or not list(out.iterdir())  # nothing partial written
    return r.stderr


def test_bad_inputs_exit_non_zero_with_a_message(inputs, tmp_path):
    d, img, mask = inputs
    txt = tmp_path / "notes.png"
    txt.write_text("not an image at all")
    assert "not an image" in _bad(tmp_path, "--damage", "scratch", image=txt, mask=d / "mask.png")

    data = (d / "part.png").read_bytes()
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(data[: len(data) // 2])
    assert "truncated" in _bad(tmp_path, "--damage", "scratch", image=trunc, mask=d / "mask.png")

    huge = tmp_path / "huge.png"
    Image.new("1", (20000, 20000)).save(huge)  # 400 MP, ~50 KB on disk
    assert "limit" in _bad(tmp_path, "--damage", "scratch", image=huge, mask=d / "mask.png")

    small = tmp_path / "small_mask.png"
    Image.fromarray(mask[:100, :100]).save(small)
    assert "mask is 100×100" in _bad(tmp_path, "--damage", "scratch", image=d / "part.png", mask=small)

    empty = tmp_path / "empty.png"
    Image.fromarray(np.zeros_like(mask)).save(empty)
    assert "empty" in _bad(tmp_path, "--damage", "scratch", image=d / "part.png", mask=empty)

    err = _bad(tmp_path, "--damage", "melted", image=d / "part.png", mask=d / "mask.png")
    assert "Unknown damage type 'melted'" in err
    err = _bad(tmp_path, "--damage", "scratch", "--product", "bottle", image=d / "part.png",
               mask=d / "mask.png")
    assert "broken_large" in err  # lists the product's known damage types
    assert "#RRGGBB" in _bad(tmp_path, "--color", "blue-ish", image=d / "part.png", mask=d / "mask.png")


def test_every_command_has_help():
    for cmd in ("demo-data", "import", "generate", "export", "samples", "review"):
        r = run(cmd, "--help")
        assert r.returncode == 0 and "usage" in r.stdout


def test_import_generate_review_export_reimport(tmp_path):
    """The headless loop: import the demo bottle, record candidates, accept two, export, re-import."""
    import json

    demo = ROOT / "assets" / "demo" / "bottle"
    ws1, ws2 = tmp_path / "ws1", tmp_path / "ws2"
    assert run("import", demo, "--workspace", ws1).returncode == 0
    src = demo / "test" / "good" / "000.png"
    mask = tmp_path / "m.png"
    m = np.zeros((256, 256), np.uint8)
    m[60:90, 100:150] = 255
    Image.fromarray(m).save(mask)
    r = run("generate", "--image", src, "--mask", mask, "--damage", "contamination", "--product",
            "bottle", "--n", 3, "--record", "--quiet", "--workspace", ws1, "--out", tmp_path / "g")
    assert r.returncode == 0, r.stderr
    ids = [c["sample_id"] for c in json.loads((tmp_path / "g" / "provenance.json").read_text())["candidates"]]
    for sid in ids[:2]:
        assert run("review", sid, "accepted", "--note", "ok", "--workspace", ws1).returncode == 0
    assert run("review", ids[2], "rejected", "--workspace", ws1).returncode == 0
    assert run("review", 99999, "accepted", "--workspace", ws1).returncode != 0

    assert run("export", "--product", "bottle", "--out", tmp_path / "exp", "--workspace", ws1).returncode == 0
    assert len(list((tmp_path / "exp" / "bottle" / "synthetic" / "contamination").glob("*.png"))) == 2
    assert run("import", tmp_path / "exp" / "bottle", "--workspace", ws2).returncode == 0

    from studio.dataset import Store
    def counts(ws):
        return sorted((r["label"], r["real_train"], r["real_test"], r["synthetic_accepted"])
                      for r in Store(ws).class_balance("bottle"))
    assert counts(ws1) == counts(ws2)
    assert ("contamination", 0, 5, 2) in counts(ws2)
    r = run("export", "--product", "nosuch", "--out", tmp_path / "x", "--workspace", ws1)
    assert r.returncode != 0 and "no product 'nosuch'" in r.stderr


def test_generate_batch_splits_across_processes(tmp_path):
    """`generate-batch` runs unchanged in one process and under a 2-process launcher (torchrun,
    as `accelerate launch` does on GPUs): every pair is done once, by both processes together."""
    import json
    import shutil
    imgs, masks = tmp_path / "img", tmp_path / "mask"
    imgs.mkdir(), masks.mkdir()
    for i in range(4):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (48, 48, 3), np.uint8)).save(imgs / f"p{i}.png")
        m = np.zeros((48, 48), np.uint8)
        m[10:30, 10:40] = 255
        Image.fromarray(m).save(masks / f"p{i}_mask.png")
    r = run("generate-batch", "--images", imgs, "--masks", masks, "--damage", "scratch", "--n", 1,
            "--out", tmp_path / "one")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["p0", "p1", "p2", "p3"]
    torchrun = shutil.which("torchrun")
    if torchrun:
        r = subprocess.run([torchrun, "--nproc_per_node", "2", "--module", "studio", "generate-batch",
                            "--images", str(imgs), "--masks", str(masks), "--damage", "scratch",
                            "--out", str(tmp_path / "two")], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        procs = [json.loads((tmp_path / "two" / f"p{i}" / "provenance.json").read_text())["process"]
                 for i in range(4)]
        assert sorted(procs) == [0, 0, 1, 1]
        for i in range(4):  # same seeds → the same images whichever process made them
            a = (tmp_path / "one" / f"p{i}" / "candidate_00.png").read_bytes()
            assert a == (tmp_path / "two" / f"p{i}" / "candidate_00.png").read_bytes()
    (masks / "p3_mask.png").unlink()
    r = run("generate-batch", "--images", imgs, "--masks", masks, "--damage", "scratch", "--out", tmp_path / "x")
    assert r.returncode != 0 and "no mask" in r.stderr and "p3.png" in r.stderr
