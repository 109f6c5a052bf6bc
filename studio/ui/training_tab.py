"""Training tab: LoRA + damage-type embeddings for an SD 1.5 inpainting folder, or the offline
pixel-inpaint model. Each run is a separate process (`python -m studio train …`), so the UI stays
responsive; progress comes from its output, the loss curve from its history file, cancel asks it
to stop cleanly (it keeps its last checkpoint) and a second start resumes; a run the server was
running when it died shows as interrupted, and **Resume interrupted run** continues it.

Handlers are module-level functions taking the context first (testable without a server); the
tab's per-app state (run log, output folder of each running job) is a :class:`TrainingState`
made in ``build``.
"""
from __future__ import annotations

import sys
import time

import gradio as gr

from pipelines.training.trainers import TRAINERS
from studio.context import StudioContext
from studio.ui import training_controlnet, training_wall
from studio.ui.checks import optional_path, product_name, run_folder
from studio.ui.jobs_panel import JobPanel, bind
from studio.ui.training_runs import (TrainCommand, TrainingState, adapters_root, checkpoint_flags, data_plan,
                                     on_product, resume_run, run_views, submit_run, trained_adapters)

# the main panel's trainers (label → TRAINERS kind); wall and ControlNet have their own panels
KINDS = {TRAINERS[k].label: k for k in ("pixel-inpaint", "lora")}


# -- handlers: module level, each takes the context first ---------------------------------------
def train_command(ctx: StudioContext, kind, product, types, data, model, name, minutes, steps,
                  rank, rate, resume) -> TrainCommand:
    """The trainer's command line from the widget values (the product is exported first); refusals
    are ``gr.Error`` with the reason."""
    if kind not in KINDS:
        raise gr.Error(f"Unknown model {kind!r}; choose one of: {', '.join(KINDS)}")
    kind_id = KINDS[kind]
    if not product:
        raise gr.Error("Pick a product")
    product = product_name(product)
    out = run_folder(adapters_root(ctx), name, f"{kind_id}-{product}")
    model = optional_path(ctx, model, "SD 1.5 inpainting folder", must_exist=False)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    export = ctx.settings.workspace / "exports" / f"{product}-{stamp}"
    ctx.store.export_mvtec(export, product)
    cat = export / product
    cmd = [sys.executable, "-m", "studio", "train", "--kind", kind_id, "--data", str(cat), "--out", str(out),
           "--progress-lines", "--quiet", "--cancel-file", str(out / "CANCEL")]
    if types:
        cmd += ["--damage-types", ",".join(types)]
    extra = None
    if data.startswith("real +"):
        if not (cat / "synthetic").is_dir():
            raise gr.Error(f"No accepted synthetic samples for {product!r}; choose 'real only'")
        extra = cat
        cmd += ["--extra-data", str(cat)]       # the trainer reads only its synthetic/ (+ provenance)
    plan = data_plan(cat, list(types or []) or None, extra, f"{kind_id} training data")
    cmd += ["--steps", str(int(steps)), *checkpoint_flags(steps)] if steps else \
        ["--minutes", str(float(minutes or 15))]
    if kind_id == "lora":
        cmd += ["--rank", str(int(rank))] + (["--model", model] if model else [])
    if rate:
        cmd += ["--lr", str(float(rate))]
    if not resume:
        cmd += ["--no-resume"]
    return TrainCommand(cmd, kind_id, product, cat, out, plan)


def start(ctx: StudioContext, state: TrainingState, *values) -> str:
    """Train a model in its own process as a background job (a second start resumes); ``values``:
    :func:`train_command`'s widget values."""
    return submit_run(ctx, state, "train", train_command(ctx, *values))


def live(ctx: StudioContext, state: TrainingState, job_row: dict) -> tuple:
    """Each timer tick: (loss figure, latest validation grid, trained models table)."""
    v = run_views(state, job_row)
    if v is None:
        return gr.update(), gr.update(), gr.update()
    return v[0], v[1], trained_adapters(adapters_root(ctx))


def list_adapters(ctx: StudioContext) -> list[list]:
    return trained_adapters(adapters_root(ctx))


# -- layout and wiring ---------------------------------------------------------------------------
def _settings(ctx: StudioContext) -> dict:
    w: dict = {}
    products = ctx.store.products()
    w["kind"] = gr.Radio(list(KINDS), value=list(KINDS)[0], label="Model", elem_id="tr-kind")
    w["product"] = gr.Dropdown(products, value=products[0] if products else None, label="Product",
                               elem_id="tr-product")
    w["types"] = gr.CheckboxGroup([], label="Damage types (none ticked = all with samples)",
                                  elem_id="tr-types")
    w["data"] = gr.Radio(["real only", "real + accepted synthetic"], value="real only", label="Data")
    w["model"] = gr.Textbox("", label="SD 1.5 inpainting folder (LoRA only; default $DEFECT_STUDIO_SD_INPAINT)")
    w["name"] = gr.Textbox("", label="Run name (default <kind>-<product>)", elem_id="tr-name")
    with gr.Row():
        w["minutes"] = gr.Number(15, label="Minutes", elem_id="tr-minutes")
        w["steps"] = gr.Number(0, label="…or steps (0 = time)", precision=0, elem_id="tr-steps")
    with gr.Row():
        w["rank"] = gr.Slider(1, 64, 4, step=1, label="LoRA rank")
        w["lr"] = gr.Number(0, label="Learning rate (0 = default)")
    w["resume"] = gr.Checkbox(True, label="Resume the run's last checkpoint", elem_id="tr-resume")
    w["panel"] = JobPanel(ctx, "Train", "train", rerun_label="Resume interrupted run")
    return w


def _results(ctx: StudioContext) -> dict:
    w: dict = {}
    w["loss"] = gr.Plot(None, label="Loss", elem_id="tr-loss")
    w["grid"] = gr.Image(label="Latest validation grid", format="png", interactive=False)
    w["adapters"] = gr.Dataframe(list_adapters(ctx), headers=["run", "kind", "latest", "folder"],
                                 label="Trained models (use the folder as 'model' / 'lora' in Annotate)",
                                 interactive=False, elem_id="tr-adapters")
    return w


def build(ctx: StudioContext) -> list:
    """Render the tab inside the current Blocks and wire it; returns the page-load refreshes."""
    state = TrainingState.of(ctx)   # per app: the run log and the running jobs' folders
    with gr.Row():
        with gr.Column(scale=1, min_width=300):
            s = _settings(ctx)
        with gr.Column(scale=2):
            r = _results(ctx)
    training_wall.build(ctx, state)          # wall colour from a folder of photos + masks
    training_controlnet.build(ctx, state)    # ControlNet on the product's defect masks
    types_for = bind(on_product, ctx)
    s["product"].change(types_for, s["product"], s["types"], api_name=False)
    s["panel"].wire(bind(start, ctx, state),
                    [s["kind"], s["product"], s["types"], s["data"], s["model"], s["name"], s["minutes"],
                     s["steps"], s["rank"], s["lr"], s["resume"]],
                    bind(live, ctx, state), [r["loss"], r["grid"], r["adapters"]],
                    rerun=bind(resume_run, ctx, state, "train"))
    return [(types_for, [s["product"]], [s["types"]]), (bind(list_adapters, ctx), [], [r["adapters"]])]
