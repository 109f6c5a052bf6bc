"""One model resolver (issue 23): for every (demo product, damage type) the Annotate tab
(``annotate.on_generate``), the CLI (``python -m studio generate``) and the experiment
(``pick_models`` with ``ExperimentRequest.model_roots()``) pick the same pixel-inpaint model folder
— all three go through :func:`pipelines.registry.default_model` — and a type no model was trained
for is refused by the UI and the CLI and skipped by the experiment, for the same reason.

The generator itself is stubbed (it inverts the masked pixels): what is checked is the folder each
path hands it and records in the candidate's provenance, not the sampling."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from pipelines import pixel_inpaint as P
from pipelines import pixel_inpaint_files as PF

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "assets" / "demo"
MODELS = ROOT / "assets" / "models"
PRODUCTS = sorted(p.name for p in DEMO.iterdir() if (p / "ground_truth").is_dir())
BACKEND = "pixel-inpaint"


def _types(product: str) -> list[str]:
    return sorted(t.name for t in (DEMO / product / "ground_truth").iterdir() if t.is_dir())


@pytest.fixture(autouse=True)
def _stub_generator(monkeypatch):
    """No environment model; the generator inverts the masked pixels (no weights loaded)."""
    monkeypatch.delenv(P.ENV, raising=False)

    def fake_call(self, image, mask, *, seed, feather=4, **params):
        assert params.get("model"), "the service must hand the generator a model folder"
        out = image.copy()
        out[mask > 0] = 255 - out[mask > 0]
        return out
    monkeypatch.setattr(P.PixelInpaintGenerator, "__call__", fake_call)


@pytest.fixture
def studio(tmp_path):
    """``(ctx, {product: (source image id, image path, mask path)})``: a workspace holding the
    demo products, and one good image + a painted mask of each as files for the CLI."""
    from studio.config import Settings
    from studio.context import StudioContext
    ctx = StudioContext(Settings.from_env(workspace=tmp_path / "ws"))
    sources = {}
    for product in PRODUCTS:
        ctx.store.import_mvtec(DEMO / product)
        row = ctx.store.list_images(product=product, split="train", label="good")[0]
        image = ctx.store.load_image(row["id"])
        mask = np.zeros(image.shape[:2], np.uint8)
        mask[60:100, 60:110] = 255
        Image.fromarray(image).save(tmp_path / f"{product}.png")
        Image.fromarray(mask).save(tmp_path / f"{product}_mask.png")
        sources[product] = (row["id"], tmp_path / f"{product}.png", tmp_path / f"{product}_mask.png")
    return ctx, sources


def _ui_pick(ctx, product: str, damage: str, src_id: int) -> str:
    """The Annotate tab's Generate: the model folder its candidate records, or the refusal."""
    from studio.ui import annotate as A
    image = ctx.store.load_image(src_id)
    layer = np.zeros((*image.shape[:2], 4), np.uint8)
    layer[60:100, 60:110] = (255, 45, 45, 255)
    editor = {"background": image, "layers": [layer], "composite": image}
    try:
        _, info, first, _ = A.on_generate(ctx, editor, product, src_id, A.DAMAGE, damage, "#000000", BACKEND,
                                          1, 0, 4, 0.8, *A.option_values(), progress=lambda *a, **k: None)
    except gr.Error as exc:
        return f"refused: {exc.message}"
    return ctx.store.get_sample(first)["params"]["model"]


def _cli_pick(ws: Path, product: str, damage: str, image: Path, mask: Path, out: Path) -> str:
    """``python -m studio generate`` (in-process): the folder in its provenance.json, or the refusal."""
    from studio.__main__ import main
    try:
        rc = main(["generate", "--image", str(image), "--mask", str(mask), "--damage", damage,
                   "--product", product, "--backend", BACKEND, "--n", "1", "--quiet", "--out", str(out),
                   "--workspace", str(ws)])
    except SystemExit as exc:
        return f"refused: {str(exc.code).removeprefix('error: ')}"
    assert rc == 0
    return json.loads((out / "provenance.json").read_text())["candidates"][0]["params"]["model"]


def _experiment_picks(ws: Path, product: str, types: list[str], out: Path) -> tuple[dict, dict]:
    """The experiment's models per type for the data folder of ``product`` (product = its name)."""
    from studio.experiment import ExperimentRequest, pick_models
    req = ExperimentRequest(data=str(DEMO / product), out=str(out), generate=BACKEND, workspace=str(ws))
    return pick_models(BACKEND, req.product, req.model_roots(), types)


def _all_picks(ctx, sources, tmp_path) -> dict[tuple[str, str], tuple[str, str, str | None, str | None]]:
    """``{(product, type): (ui, cli, experiment's folder, experiment's reason for none)}``."""
    ws = ctx.settings.workspace
    picks = {}
    for product in PRODUCTS:
        src_id, image, mask = sources[product]
        types = _types(product)
        models, missing = _experiment_picks(ws, product, types, tmp_path / "exp")
        for t in types:
            assert (t in models) != (t in missing), (product, t)
            picks[product, t] = (_ui_pick(ctx, product, t, src_id),
                                 _cli_pick(ws, product, t, image, mask, tmp_path / "cli" / product / t),
                                 models.get(t), missing.get(t))
    assert len(picks) >= 6
    return picks


def test_the_ui_the_cli_and_the_experiment_pick_the_same_model_folder(studio, tmp_path):
    """The demo as shipped, plus a workspace run for bottle trained for contamination only: that run
    for bottle/contamination (a workspace run comes before the shipped model), the shipped model
    for every other (product, type) — the same folder from all three paths."""
    ctx, sources = studio
    ws = ctx.settings.workspace
    shipped = MODELS / "bottle" / "pixel-inpaint"
    run = ws / "adapters" / "pixel-inpaint-bottle"
    ck = run / "checkpoints" / "step-0000010"
    ck.mkdir(parents=True)
    shutil.copy(shipped / "model.safetensors", ck / "model.safetensors")
    meta = json.loads((shipped / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**meta, "damage_types": ["contamination"]}))
    (ck / "trainer_state.json").write_text(json.dumps({"kind": BACKEND, "step": 10}))
    (run / "latest").write_text(ck.name)
    (run / "training_data.json").write_text(json.dumps({"data": str(ws / "exports" / "bottle-1" / "bottle"),
                                                         "ancestors": ["abc"]}))   # a run for bottle
    for (product, t), (ui, cli, experiment, why_none) in _all_picks(ctx, sources, tmp_path).items():
        assert why_none is None, (product, t, why_none)
        expected = str(run) if (product, t) == ("bottle", "contamination") else \
            str(MODELS / product / "pixel-inpaint")
        assert ui == cli == experiment == expected, (product, t)


def test_a_type_without_a_model_is_refused_by_the_ui_and_the_cli_and_skipped_by_the_experiment(
        studio, tmp_path, monkeypatch):
    """Shipped models where bottle's knows no ``broken_small`` and brushed_metal has none: the
    other bottle types keep their model; bottle/broken_small is refused (UI, CLI) and skipped
    (experiment) with the same reason (no model of the product was trained for the type — never
    another type's model); every brushed_metal type likewise (no model for the product: the
    Annotate tab says how to train one)."""
    from studio.ui import annotate as A
    ctx, sources = studio
    shipped = tmp_path / "models"
    shutil.copytree(MODELS, shipped)
    monkeypatch.setattr(PF, "SHIPPED_DIR", shipped)
    config = shipped / "bottle" / "pixel-inpaint" / "config.json"
    meta = json.loads(config.read_text())
    config.write_text(json.dumps({**meta, "damage_types": [t for t in meta["damage_types"] if t != "broken_small"]}))
    shutil.rmtree(shipped / "brushed_metal" / "pixel-inpaint")
    refused = 0
    for (product, t), (ui, cli, experiment, why_none) in _all_picks(ctx, sources, tmp_path).items():
        if (product, t) in (("bottle", "broken_large"), ("bottle", "contamination")):
            assert ui == cli == experiment == str(shipped / "bottle" / "pixel-inpaint"), (product, t)
            continue
        assert experiment is None and why_none, (product, t)
        assert cli == f"refused: {why_none}" or cli.startswith(f"refused: {why_none}"), (product, t, cli)
        if product == "bottle":
            assert "was trained for type 'broken_small'" in why_none
            assert ui == cli, (product, t)               # the service's refusal, as the CLI's
        else:
            assert ui == f"refused: {A.no_model_fix(ctx, BACKEND, product)}", (product, t)
        refused += 1
    assert refused == 1 + len(_types("brushed_metal"))
