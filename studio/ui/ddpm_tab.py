"""DDPM tab: train a pixel-space DDPM on a product's good images (background job, live loss,
cancel keeps the checkpoint, resume; v- or ε-prediction), inspect one image at a chosen depth, a
depth × image grid of reconstructions (failure analysis), evaluate and compare.

Handlers are module-level functions taking the context first (testable without a server); the
tab's per-app state (run log, models being trained) is a :class:`DDPMState` made in ``build``.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import numpy as np

from studio.context import StudioContext
from studio.inspection import (DDPMEvalRequest, DDPMGridRequest, DDPMTrainRequest, GridItem, depth_grid,
                               evaluate_ddpm, grid_items_from_folder, inspect_image, pick_grid_items, train_ddpm)
from pipelines.training import Cancelled
from studio.jobs import JobCancelled
from studio.runs import RunLog
from studio.ui.checks import product_name, run_folder, server_path
from studio.ui.jobs_panel import JobPanel, bind
from studio.ui.patchcore_tab import roc_figure

EVAL_COLS = ["id", "product", "depths", "noise", "residual", "image_auroc", "pixel_auroc", "aupro",
             "pixel_f1_max", "ms_per_image", "status"]


def loss_figure(losses: list, title: str = "training loss"):
    import plotly.graph_objects as go
    fig = go.Figure()
    if losses:
        steps, vals = zip(*losses)
        fig.add_scatter(x=list(steps), y=list(vals), mode="lines", name="loss (window mean)")
    fig.update_layout(title=title, xaxis_title="step", yaxis_title="MSE on the target (v or ε)", yaxis_type="log",
                      height=300, margin=dict(l=40, r=10, t=40, b=40))
    return fig


def _checkpoints(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return sorted(str(p.parent) for p in root.glob("*/config.json"))


def models_root(ctx: StudioContext) -> Path:
    return ctx.settings.workspace / "models"


@dataclass
class DDPMState:
    """Per-app state of the tab, made by ``build`` (never module-level: two apps share nothing):
    the run log and the inspectors being trained (job id → model, for the live loss curve)."""
    runlog: RunLog
    live_models: dict[str, object] = field(default_factory=dict)

    @classmethod
    def of(cls, ctx: StudioContext) -> "DDPMState":
        return cls(RunLog(ctx.settings.workspace))


def category_for(ctx: StudioContext, product: str, folder: str) -> tuple[Path, str]:
    """(category folder, name): a folder on the server, or a fresh export of ``product``."""
    if folder:
        p = server_path(ctx, folder, "data folder")
        return p, p.name
    if not product:
        raise gr.Error("Pick a product or give a folder")
    product = product_name(product)
    out = ctx.settings.workspace / "exports" / f"{product}-{time.strftime('%Y%m%d-%H%M%S')}"
    ctx.store.export_mvtec(out, product)
    return out / product, product


# -- training --------------------------------------------------------------------------------------
def start_train(ctx: StudioContext, state: DDPMState, product, fold, name, noise, mins, steps, size, crop, preset,
                t_max, rot90, resume, pred="v") -> str:
    """Train (or resume) a DDPM checkpoint on a product's good images as a background job
    (``pred``: what the U-Net predicts, v or epsilon)."""
    out = run_folder(models_root(ctx), name, f"ddpm-{Path(fold).name if fold else product}", "checkpoint")
    data, pname = category_for(ctx, product, fold)
    req = DDPMTrainRequest(data=str(data), out=str(out), minutes=float(mins) if not steps else None,
                           steps=int(steps) or None, noise=noise, size=int(size), crop=int(crop), preset=preset,
                           t_max=int(t_max), rot90=bool(rot90), resume=bool(resume), prediction=pred or "v")
    try:
        req.validate()
        from pipelines.ddpm import ModelConfig
        ModelConfig(size=req.size, crop=req.crop, preset=req.preset, noise=req.noise,
                    prediction=req.prediction).validate()
    except ValueError as exc:
        raise gr.Error(str(exc)) from exc
    return ctx.jobs.submit("ddpm-train", train_job, req, state, pname, request=req.__dict__)


def train_job(jctx, request: DDPMTrainRequest, state: DDPMState, pname: str) -> dict:
    """The background job: train, record the run; a cancel stops cleanly and keeps the checkpoint."""
    run_id = state.runlog.start("ddpm-train", pname, request.data, request.__dict__, request.out, jctx.job_id)

    def progress(fraction, message=""):
        try:
            jctx.progress(fraction, message)
        except JobCancelled:
            pass  # train() polls cancelled() and stops cleanly; the checkpoint is saved

    try:
        summary = train_ddpm(request, progress, lambda: jctx.cancelled,
                             on_model=lambda model: state.live_models.__setitem__(jctx.job_id, model))
    except BaseException as exc:
        state.runlog.finish(run_id, status="failed", error=str(exc))
        raise
    state.runlog.finish(run_id, {"step": summary["step"], "loss": summary["loss"]},
                        status="cancelled" if summary["stopped"] == "cancelled" else "done")
    if summary["stopped"] == "cancelled":
        jctx.log(f"cancelled at step {summary['step']}; checkpoint saved to {request.out}")
    return summary


def live_train(state: DDPMState, job_row: dict) -> tuple:
    """Each timer tick: (loss figure, last-run info once done)."""
    model = state.live_models.get(job_row["id"])
    losses = list(getattr(model, "losses", []) or [])
    if job_row["status"] == "done" and job_row["result"]:
        losses = job_row["result"].get("losses") or losses
        info = {k: job_row["result"][k] for k in ("checkpoint", "step", "steps_this_run", "seconds", "loss",
                                              "stopped", "parameters")}
        state.live_models.pop(job_row["id"], None)
        return loss_figure(losses), info
    return loss_figure(losses, f"training loss — step {losses[-1][0] if losses else 0}"), gr.update()


# -- inspection ------------------------------------------------------------------------------------
def test_images(ctx: StudioContext, product):
    """The product's test images as dropdown choices (first one picked)."""
    rows = ctx.store.list_images(product=product, split="test") if product else []
    return gr.update(choices=[(f"#{r['id']} {r['label']}", int(r["id"])) for r in rows],
                     value=int(rows[0]["id"]) if rows else None)


def refresh_checkpoints(ctx: StudioContext):
    c = _checkpoints(models_root(ctx))
    return gr.update(choices=c, value=c[0] if c else None), gr.update(choices=c, value=c[0] if c else None)


def do_inspect(ctx: StudioContext, checkpoint, image_id, depth, noise, seed):
    if not checkpoint:
        raise gr.Error("Pick a checkpoint (train one first)")
    checkpoint = str(server_path(ctx, checkpoint, "checkpoint", folder=False))
    if not image_id:
        raise gr.Error("Pick a test image")
    try:
        img = ctx.store.load_image(int(image_id))
        gt = ctx.store.load_mask(int(image_id))
        res = inspect_image(checkpoint, img, int(depth), None if noise == "as trained" else noise, int(seed or 0))
    except (ValueError, KeyError) as exc:
        raise gr.Error(str(exc)) from exc
    gt_img = None if gt is None else np.repeat((gt > 0).astype(np.uint8)[..., None] * 255, 3, axis=2)
    return (img, res["reconstruction"], res["residual"], res["overlay"], gt_img,
            f"depth {int(depth)} · image score {res['score']:.4f}")


# -- depth x image grid -----------------------------------------------------------------------------
def parse_depths(depths_text) -> list[int]:
    try:
        dl = [int(x) for x in str(depths_text).replace(" ", "").split(",") if x]
    except ValueError:
        raise gr.Error(f"depths must be integers like 100,250 — got {depths_text!r}") from None
    if not dl:
        raise gr.Error("give at least one depth, e.g. 100,250,400,600")
    return dl


def grid_items(ctx: StudioContext, product, fold, count: int) -> tuple[list[GridItem], str]:
    """A few test images (defect types first, then a good one) of a folder or a product."""
    if fold:
        folder = server_path(ctx, fold, "data folder")
        try:
            return grid_items_from_folder(str(folder), count), folder.name
        except ValueError as exc:
            raise gr.Error(str(exc)) from exc
    if not product:
        raise gr.Error("Pick a product or give a folder")
    product = product_name(product)
    rows = ctx.store.list_images(product=product, split="test")
    picked = pick_grid_items([GridItem(str(r["id"]), None, None, r["label"]) for r in rows], count)
    if not picked:
        raise gr.Error(f"{product} has no test images")
    items = []
    for it in picked:
        iid = int(it.name)
        m = ctx.store.load_mask(iid) if it.label != "good" else None
        items.append(GridItem(f"#{iid} {it.label}", ctx.store.load_image(iid), m, it.label))
    return items, product


def start_grid(ctx: StudioContext, product, fold, checkpoint, depths_text, count, noise) -> str:
    """Reconstruct a few test images at several depths (depths x images grid) as a background job."""
    if not checkpoint:
        raise gr.Error("Pick a checkpoint (train one first)")
    checkpoint = str(server_path(ctx, checkpoint, "checkpoint", folder=False))
    depths = parse_depths(depths_text)
    items, pname = grid_items(ctx, product, fold, int(count or 4))
    out = ctx.settings.workspace / "runs" / f"ddpm-grid-{pname}-{time.strftime('%Y%m%d-%H%M%S')}.png"
    req = DDPMGridRequest(checkpoint=checkpoint, out=str(out), depths=depths,
                          noise=None if noise == "as trained" else noise)
    return ctx.jobs.submit("ddpm-grid", grid_job, req, items, request=req.__dict__)


def grid_job(jctx, request: DDPMGridRequest, items: list[GridItem]) -> dict:
    """The background job: the grid picture and its cell figures (a cancel writes nothing)."""
    s = depth_grid(request, items, jctx.progress, lambda: jctx.cancelled)
    return {"grid": s["grid"], "depths": s["depths"], "images": s["images"], "prediction": s["prediction"],
            "cells": s["cells"]}


def live_grid(job_row: dict) -> tuple:
    """Each timer tick: (grid picture, cell figures) once done."""
    if job_row["status"] != "done" or not job_row["result"]:
        return gr.update(), gr.update()
    r = job_row["result"]
    return r["grid"], {"prediction": r["prediction"], "depths": r["depths"], "images": r["images"],
                       "cells": r["cells"]}


# -- evaluation ------------------------------------------------------------------------------------
def compare_frame(state: DDPMState):
    import pandas as pd
    rows = []
    for r in state.runlog.list("ddpm-eval"):
        m, p = r["metrics"] or {}, r["params"] or {}
        rows.append([r["id"], r["product"], ",".join(map(str, p.get("depths") or [])), p.get("noise") or "as trained",
                     p.get("kind"), *[round(m[k], 4) if isinstance(m.get(k), (int, float)) else None
                                      for k in ("image_auroc", "pixel_auroc", "aupro", "pixel_f1_max",
                                                "ms_per_image")], r["status"]])
    return pd.DataFrame(rows, columns=EVAL_COLS)


def start_eval(ctx: StudioContext, state: DDPMState, product, fold, checkpoint, depths_text, noise, kind) -> str:
    """Evaluate a checkpoint on the test split at the given depths as a background job."""
    if not checkpoint:
        raise gr.Error("Pick a checkpoint")
    checkpoint = str(server_path(ctx, checkpoint, "checkpoint", folder=False))
    try:
        dl = [int(x) for x in str(depths_text).replace(" ", "").split(",") if x]
    except ValueError:
        raise gr.Error(f"depths must be integers like 100,200 — got {depths_text!r}") from None
    data, pname = category_for(ctx, product, fold)
    out = ctx.settings.workspace / "runs" / f"ddpm-{pname}-{time.strftime('%Y%m%d-%H%M%S')}"
    req = DDPMEvalRequest(data=str(data), checkpoint=checkpoint, out=str(out), depths=dl,
                          noise=None if noise == "as trained" else noise, kind=kind)
    return ctx.jobs.submit("ddpm-eval", eval_job, req, state.runlog, pname, request=req.__dict__)


def eval_job(jctx, request: DDPMEvalRequest, runlog: RunLog, pname: str) -> dict:
    """The background job: evaluate, record the run (cancelled / failed with the reason)."""
    run_id = runlog.start("ddpm-eval", pname, request.data, request.__dict__, request.out, jctx.job_id)
    try:
        summary = evaluate_ddpm(request, jctx.progress, lambda: jctx.cancelled)
    except BaseException as exc:
        runlog.finish(run_id, status="cancelled" if isinstance(exc, (JobCancelled, InterruptedError, Cancelled))
                      else "failed", error=str(exc))
        raise
    runlog.finish(run_id, summary["metrics"])
    return {"out": request.out, "metrics": summary["metrics"]}


def live_eval(state: DDPMState, job_row: dict) -> tuple:
    """Each timer tick: (metrics table, ROC figure, overlays once done, comparison table)."""
    if job_row["status"] != "done":
        return gr.update(), gr.update(), gr.update(), compare_frame(state)
    out = Path(job_row["result"]["out"])
    summary = json.loads((out / "result.json").read_text())
    m = summary["metrics"]
    table = [[k, round(v, 4) if isinstance(v, float) else v] for k, v in m.items()]
    items = [(str(out / o["file"]), f"{o['label']} · score {o['score']:.4f}") for o in summary["overlays"]]
    return table, roc_figure(summary["roc"], m.get("image_auroc"), "DDPM residuals"), items, compare_frame(state)


# -- layout ------------------------------------------------------------------------------------------
def _train_tab(ctx: StudioContext) -> dict:
    w: dict = {}
    with gr.Row():
        with gr.Column(scale=1, min_width=280):
            w["ckpt_name"] = gr.Textbox("", label="Checkpoint name (default: ddpm-<product>)",
                                        elem_id="dd-ckpt-name")
            w["noise"] = gr.Radio(["gaussian", "simplex"], value="gaussian", label="Noise", elem_id="dd-noise")
            w["prediction"] = gr.Radio(["v", "epsilon"], value="v", label="Prediction (what the U-Net predicts)",
                                       elem_id="dd-prediction")
            w["minutes"] = gr.Slider(0.5, 120, 20, step=0.5, label="Time budget (minutes)", elem_id="dd-minutes")
            w["steps"] = gr.Number(0, label="…or total steps (0 = time budget only)", precision=0,
                                   elem_id="dd-steps")
            with gr.Row():
                w["size"] = gr.Dropdown([64, 128, 256], value=128, label="Working size", elem_id="dd-size")
                w["crop"] = gr.Dropdown([32, 64, 128], value=64, label="Crop (U-Net size)", elem_id="dd-crop")
            w["preset"] = gr.Dropdown(["tiny", "small", "default"], value="small", label="Model size",
                                      elem_id="dd-preset")
            w["t_max"] = gr.Slider(50, 1000, 350, step=10, label="Train on timesteps below", elem_id="dd-tmax")
            w["rot90"] = gr.Checkbox(True, label="90° rotations (rotation-invariant products only)")
            w["resume"] = gr.Checkbox(False, label="Resume the checkpoint", elem_id="dd-resume")
            w["panel"] = JobPanel(ctx, "Train DDPM", "ddpm_train")
        with gr.Column(scale=2):
            w["loss"] = gr.Plot(None, label="Loss", elem_id="dd-loss")
            w["info"] = gr.JSON(label="Last run", elem_id="dd-train-info")
    return w


def _inspect_tab(ctx: StudioContext) -> dict:
    w: dict = {}
    with gr.Row():
        w["ckpt"] = gr.Dropdown(_checkpoints(models_root(ctx)), label="Checkpoint", allow_custom_value=True,
                                elem_id="dd-ckpt")
        w["refresh"] = gr.Button("↻", size="sm", min_width=40)
        w["image_id"] = gr.Dropdown([], label="Test image", allow_custom_value=True, elem_id="dd-image")
        w["depth"] = gr.Slider(10, 800, 50, step=10, label="Depth t", elem_id="dd-depth")
        w["noise"] = gr.Radio(["as trained", "gaussian", "simplex"], value="as trained", label="Noise")
        w["seed"] = gr.Number(0, label="Seed", precision=0)
    w["btn"] = gr.Button("Inspect", variant="primary", elem_id="dd-inspect")
    with gr.Row():
        w["images"] = [gr.Image(label=label, format="png", interactive=False)
                       for label in ("input", "reconstruction", "residual", "overlay", "ground truth")]
    w["status"] = gr.Markdown("Pick a checkpoint (train one in **Train**, or use the example a fresh studio "
                              "makes) and a test image, then press **Inspect**: a few seconds per image.",
                              elem_id="dd-inspect-status")
    with gr.Accordion("Depth × image grid (failure analysis: over-smoothing, texture loss)", open=False):
        with gr.Row():
            with gr.Column(scale=1, min_width=260):
                w["grid_depths"] = gr.Textbox("100,250,400,600", label="Depths (rows)", elem_id="dd-grid-depths")
                w["grid_n"] = gr.Slider(1, 8, 4, step=1, label="Test images (columns)", elem_id="dd-grid-n")
                w["grid_panel"] = JobPanel(ctx, "Make the grid", "ddpm_grid")
            with gr.Column(scale=3):
                w["grid"] = gr.Image(label="rows: depth t · each image: reconstruction | residual",
                                     format="png", interactive=False, elem_id="dd-grid")
                w["grid_cells"] = gr.JSON(label="Mean residual per cell (inside / outside the defect)")
    return w


def _evaluate_tab(ctx: StudioContext) -> dict:
    w: dict = {}
    with gr.Row():
        with gr.Column(scale=1, min_width=280):
            w["ckpt"] = gr.Dropdown(_checkpoints(models_root(ctx)), label="Checkpoint", allow_custom_value=True,
                                    elem_id="dd-eval-ckpt")
            w["depths"] = gr.Textbox("50", label="Depths (comma-separated; maps are averaged)",
                                     elem_id="dd-depths")
            w["noise"] = gr.Radio(["as trained", "gaussian", "simplex"], value="as trained", label="Noise")
            w["residual"] = gr.Radio(["color", "ssim", "feature", "color+ssim"], value="color", label="Residual")
            w["panel"] = JobPanel(ctx, "Evaluate on the test split", "ddpm_eval")
        with gr.Column(scale=2):
            w["metrics"] = gr.Dataframe(headers=["metric", "value"], label="Metrics", elem_id="dd-metrics")
            w["roc"] = gr.Plot(label="Image-level ROC")
            w["gallery"] = gr.Gallery(label="input · ground truth · residual heatmap · thresholded",
                                      columns=2, height=420, object_fit="contain", format="png")
    w["compare"] = gr.Dataframe(headers=EVAL_COLS, label="Depth comparison (all DDPM evaluations)",
                                interactive=False, elem_id="dd-compare")
    return w


# -- wiring ------------------------------------------------------------------------------------------
def build(ctx: StudioContext) -> list:
    """Render the tab inside the current Blocks and wire it; returns the page-load refreshes."""
    state = DDPMState.of(ctx)   # per app: the run log and the models being trained
    products = ctx.store.products()
    with gr.Row():
        product = gr.Dropdown(products, value=products[0] if products else None, label="Product",
                              elem_id="dd-product")
        folder = gr.Textbox("", label="…or an MVTec-AD-layout category folder on the server")
    with gr.Tab("Train"):
        t = _train_tab(ctx)
    with gr.Tab("Inspect"):
        i = _inspect_tab(ctx)
    with gr.Tab("Evaluate"):
        e = _evaluate_tab(ctx)
    t["panel"].wire(bind(start_train, ctx, state),
                    [product, folder, t["ckpt_name"], t["noise"], t["minutes"], t["steps"], t["size"],
                     t["crop"], t["preset"], t["t_max"], t["rot90"], t["resume"], t["prediction"]],
                    bind(live_train, state), [t["loss"], t["info"]])
    checkpoints, images = bind(refresh_checkpoints, ctx), bind(test_images, ctx)
    product.change(images, product, i["image_id"], api_name=False)
    i["refresh"].click(checkpoints, None, [i["ckpt"], e["ckpt"]], api_name="ddpm_checkpoints")
    i["btn"].click(bind(do_inspect, ctx), [i["ckpt"], i["image_id"], i["depth"], i["noise"], i["seed"]],
                   [*i["images"], i["status"]], api_name="ddpm_inspect")
    i["grid_panel"].wire(bind(start_grid, ctx),
                         [product, folder, i["ckpt"], i["grid_depths"], i["grid_n"], i["noise"]],
                         live_grid, [i["grid"], i["grid_cells"]])
    compare = bind(compare_frame, state)
    e["panel"].wire(bind(start_eval, ctx, state),
                    [product, folder, e["ckpt"], e["depths"], e["noise"], e["residual"]],
                    bind(live_eval, state), [e["metrics"], e["roc"], e["gallery"], e["compare"]])
    return [(compare, [], [e["compare"]]), (checkpoints, [], [i["ckpt"], e["ckpt"]]),
            (images, [product], [i["image_id"]])]
