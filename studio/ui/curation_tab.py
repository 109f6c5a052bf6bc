"""Curation tab: balance → plan → batch (background, cancel, resume) → review queue (keyboard:
a = accept, r = reject, s = skip) → quality per class → "did synthetic data help?" experiment."""
from __future__ import annotations

import json
import time
from pathlib import Path

import gradio as gr

from pipelines.registry import offline_names
import numpy as np

from studio.context import StudioContext
from studio.curation import (CurationDB, CurationError, Thresholds, balance, make_plan, next_candidate,
                             plan_status, quality, run_plan)
from studio.experiment import METRIC_KEYS, ExperimentRequest, run_experiment
from studio.runs import RunLog
from studio.ui.jobs_panel import JobPanel

# keyboard shortcuts for the review queue (ignored while typing in a text field)
KEYS_JS = """
<script>
document.addEventListener('keydown', (e) => {
  const t = e.target; if (t && (t.tagName === 'INPUT' || t.tagName === 'TEXTAREA')) return;
  const map = {a: 'rv-accept', r: 'rv-reject', s: 'rv-skip'};
  const id = map[e.key]; if (!id) return;
  const b = document.getElementById(id); if (b) { b.click(); e.preventDefault(); }
});
</script>
"""
EXP_COLS = ["id", "product", "arm", *METRIC_KEYS, "created_at"]


def experiments_frame(runlog: RunLog):
    import pandas as pd
    rows = []
    for r in runlog.list("experiment"):
        m = r["metrics"] or {}
        for arm in ("real_only", "with_synthetic", "delta"):
            if arm in m:
                rows.append([r["id"], r["product"], arm, *[round(m[arm][k], 4) for k in METRIC_KEYS],
                             r["created_at"]])
    return pd.DataFrame(rows, columns=EXP_COLS)


def experiment_figure(m: dict):
    import plotly.graph_objects as go
    fig = go.Figure()
    for arm, colour in (("real_only", "#4c78a8"), ("with_synthetic", "#f58518")):
        fig.add_bar(x=list(METRIC_KEYS), y=[m[arm][k] for k in METRIC_KEYS], name=arm, marker_color=colour)
    fig.update_layout(barmode="group", yaxis_range=[min(0.5, min(min(m[a][k] for k in METRIC_KEYS)
                                                                 for a in ("real_only", "with_synthetic"))), 1.0],
                      title="Real test split: real crops only vs + synthetic", height=340,
                      margin=dict(l=40, r=10, t=50, b=40))
    return fig


def _overlay_mask(image, mask):
    out = image.copy()
    on = mask > 0
    out[on] = (0.5 * out[on] + 0.5 * np.array([255, 45, 45])).astype(np.uint8)
    return out


def build(ctx: StudioContext) -> list:
    store = ctx.store
    cdb = CurationDB(ctx.settings.workspace)
    runlog = RunLog(ctx.settings.workspace)
    products = store.products()

    product = gr.Dropdown(products, value=products[0] if products else None, label="Product",
                          elem_id="cu-product")
    with gr.Tab("1 · Plan & batch"):
        with gr.Row():
            target = gr.Number(0, label="Target per class (0 = match the largest)", precision=0,
                               elem_id="cu-target")
            oversample = gr.Slider(1.0, 3.0, 1.0, step=0.25, label="Oversample (reviewers reject some)")
            backends = gr.CheckboxGroup(offline_names("damage"), value=["perlin", "cutpaste"],
                                        label="Backends", elem_id="cu-backends")
            plan_btn = gr.Button("Preview plan", elem_id="cu-plan")
        plan_id = gr.Number(0, label="Plan id", precision=0, elem_id="cu-plan-id")
        plan_table = gr.Dataframe(label="Plan (before it runs)", interactive=False, elem_id="cu-plan-table")
        batch = JobPanel(ctx, "Run / resume batch", "batch")
        batch_info = gr.JSON(label="Batch", elem_id="cu-batch-info")
    with gr.Tab("2 · Review"):
        with gr.Row():
            rv_id = gr.Number(0, label="Candidate id", precision=0, interactive=False, elem_id="rv-id")
            rv_left = gr.Markdown(elem_id="rv-left")
        with gr.Row():
            rv_src = gr.Image(label="source", format="png", interactive=False)
            rv_mask = gr.Image(label="mask", format="png", interactive=False)
            rv_cand = gr.Image(label="candidate", format="png", interactive=False)
        rv_scores = gr.JSON(label="Pre-screen", elem_id="rv-scores")
        rv_note = gr.Textbox("", label="Note", elem_id="rv-note")
        with gr.Row():
            acc = gr.Button("Accept (a)", variant="primary", elem_id="rv-accept")
            rej = gr.Button("Reject (r)", variant="stop", elem_id="rv-reject")
            skip = gr.Button("Skip (s)", elem_id="rv-skip")
            load_q = gr.Button("Load queue", elem_id="rv-load")
        with gr.Accordion("Auto-reject thresholds (applied by the batch)", open=False):
            th_vis = gr.Slider(1.0, 3.0, Thresholds.min_visibility, step=0.05,
                               label="min visibility (PatchCore inside / around the mask)")
            th_dup = gr.Slider(0, 20, Thresholds.min_duplicate_distance, step=1,
                               label="min perceptual-hash distance between defect crops")
    with gr.Tab("3 · Quality"):
        q_btn = gr.Button("Compute per-class quality", elem_id="cu-quality")
        gr.Markdown("KID-style distance (unbiased MMD², cubic kernel) between synthetic and real defect "
                    "crops and the mean pairwise cosine distance within a class, both on the offline "
                    "EfficientNet-Lite0 features — not Inception/LPIPS.")
        q_table = gr.Dataframe(interactive=False, elem_id="cu-quality-table")
    with gr.Tab("4 · Experiment"):
        exp = JobPanel(ctx, "Run experiment (PatchCore dual bank)", "experiment")
        exp_plot = gr.Plot(label="Result", elem_id="cu-exp-plot")
        exp_report = gr.Markdown(elem_id="cu-exp-report")
        exp_file = gr.File(label="Report (Markdown)", elem_id="cu-exp-file")
        exp_table = gr.Dataframe(experiments_frame(runlog), label="Stored experiments", interactive=False,
                                 elem_id="cu-exp-table")

    # -- plan & batch --------------------------------------------------------------------------
    def do_plan(p, tgt, over, bks):
        if not p:
            raise gr.Error("Pick a product")
        try:
            plan = make_plan(store, cdb, p, target=int(tgt) or None, backends=tuple(bks or ()),
                             oversample=float(over))
        except CurationError as exc:
            raise gr.Error(str(exc)) from exc
        import pandas as pd
        df = pd.DataFrame(plan["summary"])[["label", "real", "synthetic_accepted", "current", "target",
                                            "deficit", "planned", "backends"]]
        return plan["plan_id"], df

    def start_batch(pid, vis, dup):
        if not pid:
            raise gr.Error("Preview a plan first")
        st = plan_status(cdb, int(pid))
        if st["pending"] == 0:
            raise gr.Error(f"plan #{int(pid)} has nothing left to generate ({st['done']} done)")
        th = Thresholds(min_visibility=float(vis), min_duplicate_distance=int(dup))

        def job(jctx, pid):
            return run_plan(store, cdb, pid, jctx.progress, lambda: jctx.cancelled, thresholds=th)
        return ctx.jobs.submit("batch", job, int(pid), request={"plan_id": int(pid)})

    def live_batch(job):
        return (job["result"] if job["status"] == "done" else gr.update(),)

    plan_btn.click(do_plan, [product, target, oversample, backends], [plan_id, plan_table], api_name="plan")
    batch.wire(start_batch, [plan_id, th_vis, th_dup], live_batch, [batch_info])

    # -- review --------------------------------------------------------------------------------
    def show(p, after=0):
        item = next_candidate(store, cdb, p or None, after=int(after or 0))
        if item is None:
            return 0, "**Queue empty** — run a batch or generate in the Annotate tab", None, None, None, {}
        s = item["sample"]
        src = store.load_image(s["source_image_id"]) if s.get("source_image_id") else None
        cand = store.load_sample_image(s["id"])
        mask = store.load_sample_mask(s["id"])
        return (s["id"], f"{item['remaining']} candidate(s) left · **{s['damage_type'] or s['color']}** "
                f"· {s['generator']} · seed {s['seed']}", src, _overlay_mask(cand, mask), cand,
                item["prescreen"])

    def decide(decision):
        def handler(p, sid, note):
            if not sid:
                raise gr.Error("Nothing to review")
            (store.accept if decision == "accepted" else store.reject)(int(sid), note=note or None)
            return (*show(p, sid), "")
        return handler

    outs = [rv_id, rv_left, rv_src, rv_mask, rv_cand, rv_scores]
    load_q.click(show, product, outs, api_name="review_next")
    acc.click(decide("accepted"), [product, rv_id, rv_note], [*outs, rv_note], api_name="review_accept")
    rej.click(decide("rejected"), [product, rv_id, rv_note], [*outs, rv_note], api_name="review_reject")
    skip.click(lambda p, sid: show(p, sid), [product, rv_id], outs, api_name="review_skip")

    # -- quality -------------------------------------------------------------------------------
    def do_quality(p):
        import pandas as pd
        rows = quality(store, p)
        return pd.DataFrame(rows).round(4) if rows else pd.DataFrame()

    q_btn.click(do_quality, product, q_table, api_name="quality")

    # -- experiment ----------------------------------------------------------------------------
    def start_experiment(p):
        if not p:
            raise gr.Error("Pick a product")
        if not store.list_samples(product=p, status="accepted", limit=1):
            raise gr.Error(f"No accepted synthetic samples for {p!r} — accept some candidates first")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        export = ctx.settings.workspace / "exports" / f"{p}-{stamp}"
        store.export_mvtec(export, p)
        req = ExperimentRequest(data=str(export / p), synthetic=str(export / p),
                                out=str(ctx.settings.workspace / "runs" / f"experiment-{p}-{stamp}"))

        def job(jctx, req):
            run_id = runlog.start("experiment", p, req.data, req.__dict__, req.out, jctx.job_id)
            try:
                r = run_experiment(req, jctx.progress, lambda: jctx.cancelled)
            except BaseException as exc:
                runlog.finish(run_id, status="failed", error=str(exc))
                raise
            runlog.finish(run_id, {k: r[k] for k in ("real_only", "with_synthetic", "delta")})
            return {"out": req.out, "run_id": run_id}
        return ctx.jobs.submit("experiment", job, req, request=req.__dict__)

    def live_experiment(job):
        if job["status"] != "done":
            return gr.update(), gr.update(), gr.update(), experiments_frame(runlog)
        out = Path(job["result"]["out"])
        m = json.loads((out / "metrics.json").read_text())
        return experiment_figure(m), (out / "report.md").read_text(), str(out / "report.md"), \
            experiments_frame(runlog)

    exp.wire(start_experiment, [product], live_experiment, [exp_plot, exp_report, exp_file, exp_table])
    def experiments() -> list[dict]:
        """Stored experiments, one row per arm (real_only, with_synthetic, delta)."""
        return experiments_frame(runlog).to_dict("records")

    gr.api(experiments, api_name="experiments")
    return [(lambda: experiments_frame(runlog), [], [exp_table])]
