"""The generator contract: a new generator is one file + one registry line, and it shows up in the
service, the CLI (flags and help), the Annotate tab and the Curation plan without touching them."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines import registry
from pipelines.generator import Generator, option_specs

ROOT = Path(__file__).resolve().parent.parent
BOTTLE = ROOT / "assets" / "demo" / "bottle"
TOY = "tests.plugins.toy_generator:ToyGenerator"


@pytest.fixture
def toy():
    registry.register("toy", TOY)
    yield
    registry.unregister("toy")


def test_every_registered_generator_declares_its_info():
    for name in registry.GENERATORS:
        cls = registry.generator_class(name)
        info = registry.get_info(name)
        assert info.name == name and info.mode in ("damage", "color") and info.description
        assert isinstance(cls.available(), tuple)
        for spec in option_specs(info.options):           # typed, with help
            assert spec.type in (bool, int, float, str) and spec.help
    assert isinstance(registry.get_generator("perlin"), Generator)


def test_service_runs_a_registered_toy(toy):
    from studio.services import GenerateRequest, generate
    img = np.full((64, 64, 3), 30, np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[10:20, 10:20] = 255
    cands = generate(GenerateRequest(image=img, mask=mask, damage_type="scratch", backend="toy", n=2,
                                     options={"level": 77, "steps": 5}))   # steps: not a toy option
    assert [c.generator for c in cands] == ["toy", "toy"]
    assert (cands[0].image[mask > 0] == 77).all() and (cands[0].image[mask == 0] == 30).all()
    assert cands[0].params["level"] == 77 and "steps" not in cands[0].params


def test_toy_appears_in_annotate_dropdown_and_widgets_and_plan(toy, tmp_path):
    from studio.ui.annotate import build_option_widgets, options_from_widgets
    import app as studio_app
    from studio.config import Settings
    from studio.context import StudioContext
    settings = Settings.from_env(workspace=tmp_path / "ws")
    demo = studio_app.build_app(ctx=StudioContext(settings))
    comps = {getattr(c, "elem_id", None): c for c in demo.blocks.values()}
    assert "toy" in [c[0] if isinstance(c, tuple) else c for c in comps["backend"].choices]
    assert "opt-level" in comps                                    # its option became a widget
    values = [77 if getattr(w, "elem_id", "") == "opt-level" else None for w in build_option_widgets()]
    assert options_from_widgets("toy", values) == {"level": 77}
    backends = comps["cu-backends"]
    assert "toy" in [c[0] if isinstance(c, tuple) else c for c in backends.choices]
    from studio.curation import CurationDB, make_plan
    from studio.dataset import Store
    store = Store(tmp_path / "plan")
    store.import_mvtec(BOTTLE)
    plan = make_plan(store, CurationDB(tmp_path / "plan"), "bottle", target=6, backends=("toy",))
    assert plan["items"] > 0 and {s["backends"] for s in plan["summary"]} == {"toy"}


def test_toy_in_cli_help_flags_and_run(tmp_path):
    env = {**os.environ, "DEFECT_STUDIO_GENERATORS": f"toy={TOY}", "PYTHONPATH": str(ROOT)}
    run = lambda *a: subprocess.run([sys.executable, "-m", "studio", *a], capture_output=True, text=True,
                                    cwd=ROOT, env=env)
    for cmd in ("generate", "generate-batch"):
        helptext = run(cmd, "--help").stdout
        assert "toy (damage): Paints a flat grey level" in " ".join(helptext.split())
        assert "--level" in helptext
    img = np.full((48, 48, 3), 40, np.uint8)
    mask = np.zeros((48, 48), np.uint8)
    mask[5:15, 5:25] = 255
    Image.fromarray(img).save(tmp_path / "i.png")
    Image.fromarray(mask).save(tmp_path / "m.png")
    proc = run("generate", "--image", str(tmp_path / "i.png"), "--mask", str(tmp_path / "m.png"),
               "--damage", "scratch", "--backend", "toy", "--level", "123", "--n", "1", "--quiet",
               "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    out = np.asarray(Image.open(tmp_path / "out" / "candidate_00.png"))
    assert (out[mask > 0] == 123).all() and (out[mask == 0] == 40).all()
    bad = run("generate", "--image", str(tmp_path / "i.png"), "--mask", str(tmp_path / "m.png"),
              "--damage", "scratch", "--backend", "toy", "--level", "999", "--out", str(tmp_path / "o2"))
    assert bad.returncode != 0 and "level must be in [0, 255]" in bad.stderr
