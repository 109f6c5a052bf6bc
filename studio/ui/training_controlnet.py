"""Training tab, ControlNet: fine-tune a ControlNet on a product's reference defects with their masks
as the control image (:mod:`pipelines.controlnet_train`). Rendered by :mod:`studio.ui.training_tab`
inside its tab; the run is ``python -m studio train --kind controlnet …`` on an export of the product,
in its own process (the same job function, run log and cancel file as the other trainers). Shows the
loss and the latest validation grid (crop, control image, generations).
"""
from __future__ import annotations

import sys
import time

import gradio as gr

from pipelines.training.trainers import TRAINERS
from studio.context import StudioContext
from studio.ui.checks import optional_path, product_name, run_folder, server_path
from studio.ui.jobs_panel import JobPanel, bind
from studio.ui.training_runs import (TrainCommand, adapters_root, data_plan, on_product, resume_run, run_views,
                                     submit_run)

KIND = TRAINERS["controlnet"].kind


def controlnet_command(ctx: StudioContext, product, types, model, init, name, minutes, steps, rate, resume):
    """The trainer's command line from the widget values (the product is exported first, so only its
    reference defects are trained on); bad input → ``gr.Error`` with the fix."""
    if not product:
        raise gr.Error("Pick a product")
    product = product_name(product)
    init = (init or "").strip()
    if init:
        init = str(server_path(ctx, init, "initial ControlNet folder"))
    model = optional_path(ctx, model, "SD 1.5 folder", must_exist=False)
    if rate and float(rate) < 0:
        raise gr.Error("The learning rate must be > 0 (0 = the default 1e-5)")
    out = run_folder(adapters_root(ctx), name, f"controlnet-{product}")
    export = ctx.settings.workspace / "exports" / f"{product}-{time.strftime('%Y%m%d-%H%M%S')}"
    ctx.store.export_mvtec(export, product)
    cat = export / product
    cmd = [sys.executable, "-m", "studio", "train", "--kind", KIND, "--data", str(cat), "--out", str(out),
           "--progress-lines", "--quiet", "--cancel-file", str(out / "CANCEL")]
    if types:
        cmd += ["--damage-types", ",".join(types)]
    cmd += ["--steps", str(int(steps))] if steps else ["--minutes", str(float(minutes or 15))]
    if (model or "").strip():
        cmd += ["--model", model.strip()]
    if init:
        cmd += ["--controlnet", init]
    if rate:
        cmd += ["--lr", str(float(rate))]
    if not resume:
        cmd += ["--no-resume"]
    plan = data_plan(cat, list(types or []) or None, None, "ControlNet training data")
    return TrainCommand(cmd, KIND, product, cat, out, plan)


def start_controlnet(ctx: StudioContext, state, *values) -> str:
    """Fine-tune a ControlNet in its own process as a background job (a second start resumes)."""
    return submit_run(ctx, state, "train-controlnet", controlnet_command(ctx, *values))


def live_controlnet(state, job_row: dict) -> tuple:
    """Each timer tick: (loss figure, latest validation grid)."""
    v = run_views(state, job_row)
    if v is None:
        return gr.update(), gr.update()
    return v[0], v[1]


def build(ctx: StudioContext, state) -> None:
    """The ControlNet block (inside the Training tab's Blocks); ``state`` is the tab's TrainingState."""
    with gr.Accordion("ControlNet — fine-tune on the product's defect masks", open=False):
        gr.Markdown("Trains a ControlNet (started from the U-Net, or from given weights) on the product's "
                    "**reference** defects with their masks as the control image; the SD 1.5 model stays "
                    "frozen. Use the run folder as `controlnet` in Annotate (backends `controlnet` with an "
                    "inpainting model, `controlnet-full` with a base model).")
        products = ctx.store.products()
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                w = {}
                w["product"] = gr.Dropdown(products, value=products[0] if products else None, label="Product",
                                           elem_id="trc-product")
                w["types"] = gr.CheckboxGroup([], label="Damage types (none ticked = all with samples)")
                w["model"] = gr.Textbox("", label="SD 1.5 inpainting or base folder "
                                                  "(default $DEFECT_STUDIO_SD_INPAINT)")
                w["init"] = gr.Textbox("", label="Initial ControlNet folder (empty: from the U-Net)")
                w["name"] = gr.Textbox("", label="Run name (default controlnet-<product>)", elem_id="trc-name")
                with gr.Row():
                    w["minutes"] = gr.Number(15, label="Minutes")
                    w["steps"] = gr.Number(0, label="…or steps (0 = time)", precision=0)
                w["lr"] = gr.Number(0, label="Learning rate (0 = 1e-5)")
                w["resume"] = gr.Checkbox(True, label="Resume the run's last checkpoint")
                panel = JobPanel(ctx, "Train ControlNet", "train_controlnet", rerun_label="Resume interrupted run",
                                 idle="No ControlNet run yet — pick a product and press **Train ControlNet**.")
            with gr.Column(scale=2):
                loss = gr.Plot(None, label="Loss")
                grid = gr.Image(label="Latest validation grid (crop, control image, generations)", format="png",
                                interactive=False)
        w["product"].change(bind(on_product, ctx), w["product"], w["types"], api_name=False)
        panel.wire(bind(start_controlnet, ctx, state),
                   [w[k] for k in ("product", "types", "model", "init", "name", "minutes", "steps", "lr", "resume")],
                   bind(live_controlnet, state), [loss, grid],
                   rerun=bind(resume_run, ctx, state, "train-controlnet"))
