"""DDPM tab: train a pixel-space DDPM on a product's good images (background job, live loss,
cancel keeps the checkpoint, resume), inspect one image at a chosen depth, evaluate and compare."""
from __future__ import annotations

import json
import time
from pathlib import Path

import gradio as gr
import numpy as np

from studio.context import StudioContext
from studio.inspection import DDPMEvalRequest, DDPMTrainRequest, evaluate_ddpm, inspect_image, train_ddpm
from pipelines.training import Cancelled
from studio.jobs import JobCancelled
from studio.runs import RunLog
from studio.ui.jobs_panel import JobPanel
from studio.ui.patchcore_tab import roc_figure

EVAL_COLS = ["id", "product", "depths", "noise", "residual", "image_auroc", "pixel_auroc", "aupro",
             "pixel_f1_max", "ms_per_image", "status"]


def loss_figure(losses: list, title: str = "training loss"):
    import plotly.graph_objects as go
    fig = go.Figure()
    if losses:
        steps, vals = zip(*losses)
        fig.add_scatter(x=list(steps), y=list(vals), mode="lines", name="loss (window mean)")
    fig.update_layout(title=title, xaxis_title="step", yaxis_title="v-prediction MSE", yaxis_type="log",
                      height=300, margin=dict(l=40, r=10, t=40, b=40))
    return fig


def _checkpoints(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return sorted(str(p.parent) for p in root.glob("*/config.json"))


def build(ctx: StudioContext) -> list:
    store = ctx.store
    runlog = RunLog(ctx.settings.workspace)
    models_root = ctx.settings.workspace / "models"
    live_models: dict[str, object] = {}   # job id → inspector being trained (for the live loss)
    products = store.products()

    def category_for(product: str, folder: str) -> tuple[Path, str]:
        if folder:
            p = Path(folder).expanduser()
            if not p.is_dir():
                raise gr.Error(f"{folder} is not a folder on the server")
            return p, p.name
        if not product:
            raise gr.Error("Pick a product or give a folder")
        out = ctx.settings.workspace / "exports" / f"{product}-{time.strftime('%Y%m%d-%H%M%S')}"
        store.export_mvtec(out, product)
        return out / product, product

    with gr.Row():
        product = gr.Dropdown(products, value=products[0] if products else None, label="Product",
                              elem_id="dd-product")
        folder = gr.Textbox("", label="…or an MVTec-AD-layout category folder on the server")
    with gr.Tab("Train"):
        with gr.Row():
            with gr.Column(scale=1, min_width=280):
                ckpt_name = gr.Textbox("", label="Checkpoint name (default: ddpm-<product>)",
                                       elem_id="dd-ckpt-name")
                noise = gr.Radio(["gaussian", "simplex"], value="gaussian", label="Noise", elem_id="dd-noise")
                minutes = gr.Slider(0.5, 120, 20, step=0.5, label="Time budget (minutes)", elem_id="dd-minutes")
                steps = gr.Number(0, label="…or total steps (0 = time budget only)", precision=0,
                                  elem_id="dd-steps")
                with gr.Row():
                    size = gr.Dropdown([64, 128, 256], value=128, label="Working size", elem_id="dd-size")
                    crop = gr.Dropdown([32, 64, 128], value=64, label="Crop (U-Net size)", elem_id="dd-crop")
                preset = gr.Dropdown(["tiny", "small", "default"], value="small", label="Model size",
                                     elem_id="dd-preset")
                t_max = gr.Slider(50, 1000, 350, step=10, label="Train on timesteps below", elem_id="dd-tmax")
                rot90 = gr.Checkbox(True, label="90° rotations (rotation-invariant products only)")
                resume = gr.Checkbox(False, label="Resume the checkpoint", elem_id="dd-resume")
                train_panel = JobPanel(ctx, "Train DDPM", "ddpm_train")
            with gr.Column(scale=2):
                loss_plot = gr.Plot(loss_figure([]), label="Loss", elem_id="dd-loss")
                train_info = gr.JSON(label="Last run", elem_id="dd-train-info")
    with gr.Tab("Inspect"):
        with gr.Row():
            ckpt = gr.Dropdown(_checkpoints(models_root), label="Checkpoint", allow_custom_value=True,
                               elem_id="dd-ckpt")
            refresh_ckpt = gr.Button("↻", size="sm", min_width=40)
            image_id = gr.Dropdown([], label="Test image", allow_custom_value=True, elem_id="dd-image")
            depth = gr.Slider(10, 800, 50, step=10, label="Depth t", elem_id="dd-depth")
            inspect_noise = gr.Radio(["as trained", "gaussian", "simplex"], value="as trained", label="Noise")
            seed = gr.Number(0, label="Seed", precision=0)
        inspect_btn = gr.Button("Inspect", variant="primary", elem_id="dd-inspect")
        with gr.Row():
            im_in = gr.Image(label="input", format="png", interactive=False)
            im_rec = gr.Image(label="reconstruction", format="png", interactive=False)
            im_res = gr.Image(label="residual", format="png", interactive=False)
            im_ov = gr.Image(label="overlay", format="png", interactive=False)
            im_gt = gr.Image(label="ground truth", format="png", interactive=False)
        inspect_status = gr.Markdown(elem_id="dd-inspect-status")
    with gr.Tab("Evaluate"):
        with gr.Row():
            with gr.Column(scale=1, min_width=280):
                eval_ckpt = gr.Dropdown(_checkpoints(models_root), label="Checkpoint", allow_custom_value=True,
                                        elem_id="dd-eval-ckpt")
                depths = gr.Textbox("50", label="Depths (comma-separated; maps are averaged)",
                                    elem_id="dd-depths")
                eval_noise = gr.Radio(["as trained", "gaussian", "simplex"], value="as trained", label="Noise")
                residual = gr.Radio(["color", "ssim", "feature", "color+ssim"], value="color", label="Residual")
                eval_panel = JobPanel(ctx, "Evaluate on the test split", "ddpm_eval")
            with gr.Column(scale=2):
                eval_metrics = gr.Dataframe(headers=["metric", "value"], label="Metrics", elem_id="dd-metrics")
                eval_roc = gr.Plot(label="Image-level ROC")
                eval_gallery = gr.Gallery(label="input · ground truth · residual heatmap · thresholded",
                                          columns=2, height=420, object_fit="contain", format="png")
        compare = gr.Dataframe(headers=EVAL_COLS, label="Depth comparison (all DDPM evaluations)",
                               interactive=False, elem_id="dd-compare")

    # -- training ----------------------------------------------------------------------------
    def start_train(p, fold, name, nz, mins, st, sz, cr, pre, tm, rot, res):
        data, pname = category_for(p, fold)
        out = models_root / (name.strip() or f"ddpm-{pname}")
        req = DDPMTrainRequest(data=str(data), out=str(out), minutes=float(mins) if not st else None,
                               steps=int(st) or None, noise=nz, size=int(sz), crop=int(cr), preset=pre,
                               t_max=int(tm), rot90=bool(rot), resume=bool(res))
        try:
            req.validate()
            from pipelines.ddpm import ModelConfig
            ModelConfig(size=req.size, crop=req.crop, preset=req.preset, noise=req.noise).validate()
        except ValueError as exc:
            raise gr.Error(str(exc)) from exc

        def job(jctx, req):
            run_id = runlog.start("ddpm-train", pname, req.data, req.__dict__, req.out, jctx.job_id)

            def progress(f, msg=""):
                try:
                    jctx.progress(f, msg)
                except JobCancelled:
                    pass  # train() polls cancelled() and stops cleanly; the checkpoint is saved

            try:
                summary = train_ddpm(req, progress, lambda: jctx.cancelled,
                                     on_model=lambda m: live_models.__setitem__(jctx.job_id, m))
            except BaseException as exc:
                runlog.finish(run_id, status="failed", error=str(exc))
                raise
            runlog.finish(run_id, {"step": summary["step"], "loss": summary["loss"]},
                          status="cancelled" if summary["stopped"] == "cancelled" else "done")
            if summary["stopped"] == "cancelled":
                jctx.log(f"cancelled at step {summary['step']}; checkpoint saved to {req.out}")
            return summary

        return ctx.jobs.submit("ddpm-train", job, req, request=req.__dict__)

    def live_train(job):
        model = live_models.get(job["id"])
        losses = list(getattr(model, "losses", []) or [])
        if job["status"] == "done" and job["result"]:
            losses = job["result"].get("losses") or losses
            info = {k: job["result"][k] for k in ("checkpoint", "step", "steps_this_run", "seconds", "loss",
                                                  "stopped", "parameters")}
            live_models.pop(job["id"], None)
            return loss_figure(losses), info
        return loss_figure(losses, f"training loss — step {losses[-1][0] if losses else 0}"), gr.update()

    train_panel.wire(start_train, [product, folder, ckpt_name, noise, minutes, steps, size, crop, preset,
                                   t_max, rot90, resume], live_train, [loss_plot, train_info])

    # -- inspection --------------------------------------------------------------------------
    def test_images(p):
        rows = store.list_images(product=p, split="test") if p else []
        return gr.update(choices=[(f"#{r['id']} {r['label']}", int(r["id"])) for r in rows],
                         value=int(rows[0]["id"]) if rows else None)

    def refresh_checkpoints():
        c = _checkpoints(models_root)
        return gr.update(choices=c, value=c[0] if c else None), gr.update(choices=c, value=c[0] if c else None)

    def do_inspect(ck, iid, d, nz, sd):
        if not ck:
            raise gr.Error("Pick a checkpoint (train one first)")
        if not iid:
            raise gr.Error("Pick a test image")
        try:
            img = store.load_image(int(iid))
            gt = store.load_mask(int(iid))
            res = inspect_image(ck, img, int(d), None if nz == "as trained" else nz, int(sd or 0))
        except (ValueError, KeyError) as exc:
            raise gr.Error(str(exc)) from exc
        gt_img = None if gt is None else np.repeat((gt > 0).astype(np.uint8)[..., None] * 255, 3, axis=2)
        return (img, res["reconstruction"], res["residual"], res["overlay"], gt_img,
                f"depth {int(d)} · image score {res['score']:.4f}")

    product.change(test_images, product, image_id, api_name=False)
    refresh_ckpt.click(refresh_checkpoints, None, [ckpt, eval_ckpt], api_name="ddpm_checkpoints")
    inspect_btn.click(do_inspect, [ckpt, image_id, depth, inspect_noise, seed],
                      [im_in, im_rec, im_res, im_ov, im_gt, inspect_status], api_name="ddpm_inspect")

    # -- evaluation --------------------------------------------------------------------------
    def compare_frame():
        import pandas as pd
        rows = []
        for r in runlog.list("ddpm-eval"):
            m, p = r["metrics"] or {}, r["params"] or {}
            rows.append([r["id"], r["product"], ",".join(map(str, p.get("depths") or [])), p.get("noise") or "as trained",
                         p.get("kind"), *[round(m[k], 4) if isinstance(m.get(k), (int, float)) else None
                                          for k in ("image_auroc", "pixel_auroc", "aupro", "pixel_f1_max",
                                                    "ms_per_image")], r["status"]])
        return pd.DataFrame(rows, columns=EVAL_COLS)

    def start_eval(p, fold, ck, ds, nz, kind):
        if not ck:
            raise gr.Error("Pick a checkpoint")
        try:
            dl = [int(x) for x in str(ds).replace(" ", "").split(",") if x]
        except ValueError:
            raise gr.Error(f"depths must be integers like 100,200 — got {ds!r}") from None
        data, pname = category_for(p, fold)
        out = ctx.settings.workspace / "runs" / f"ddpm-{pname}-{time.strftime('%Y%m%d-%H%M%S')}"
        req = DDPMEvalRequest(data=str(data), checkpoint=ck, out=str(out), depths=dl,
                              noise=None if nz == "as trained" else nz, kind=kind)

        def job(jctx, req):
            run_id = runlog.start("ddpm-eval", pname, req.data, req.__dict__, req.out, jctx.job_id)
            try:
                summary = evaluate_ddpm(req, jctx.progress, lambda: jctx.cancelled)
            except BaseException as exc:
                runlog.finish(run_id, status="cancelled" if isinstance(exc, (JobCancelled, InterruptedError, Cancelled))
                              else "failed", error=str(exc))
                raise
            runlog.finish(run_id, summary["metrics"])
            return {"out": req.out, "metrics": summary["metrics"]}

        return ctx.jobs.submit("ddpm-eval", job, req, request=req.__dict__)

    def live_eval(job):
        if job["status"] != "done":
            return gr.update(), gr.update(), gr.update(), compare_frame()
        out = Path(job["result"]["out"])
        summary = json.loads((out / "result.json").read_text())
        m = summary["metrics"]
        table = [[k, round(v, 4) if isinstance(v, float) else v] for k, v in m.items()]
        items = [(str(out / o["file"]), f"{o['label']} · score {o['score']:.4f}") for o in summary["overlays"]]
        return table, roc_figure(summary["roc"], m.get("image_auroc"), "DDPM residuals"), items, compare_frame()

    eval_panel.wire(start_eval, [product, folder, eval_ckpt, depths, eval_noise, residual], live_eval,
                    [eval_metrics, eval_roc, eval_gallery, compare])
    return [(compare_frame, [], [compare]), (refresh_checkpoints, [], [ckpt, eval_ckpt]),
            (test_images, [product], [image_id])]
