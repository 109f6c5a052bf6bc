"""Curation tab: balance → plan → batch (background, cancel, resume) → review queue (keyboard:
a = accept, r = reject, s = skip) → quality per class → "did synthetic data help?" experiment."""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import gradio as gr

from pipelines.registry import offline_names
import numpy as np

from studio.context import StudioContext
from studio.curation import (CurationDB, CurationError, Thresholds, balance, make_plan, next_candidate,
                             plan_status, quality, run_plan)
from studio.experiment import (METRIC_KEYS, PRIMARY_METRIC, ExperimentRequest, experiment_figure,
                               run_experiment, source_blocks, table_rows)
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
EXP_COLS = ["id", "product", "model", "arm", *METRIC_KEYS, "verdict", "created_at"]
EXP_GENERATORS = ("perlin", "cutpaste")       # generated inside the protocol (offline, no weights)


def experiments_frame(runlog: RunLog):
    """Stored experiments: PatchCore rows ``real_only`` / ``with_synthetic`` / ``delta`` (the
    means, as before) and, for runs of the current protocol, the segmenter's rows; a delta row
    carries the verdict of the primary metric. Older runs show the metrics they stored."""
    import pandas as pd
    rows = []
    for r in runlog.list("experiment"):
        m = r["metrics"] or {}
        pc, seg = m.get("patchcore") or {}, m.get("segmenter") or {}
        for arm in ("real_only", "with_synthetic", "delta"):
            if arm in m:
                v = pc.get("delta", {}).get(PRIMARY_METRIC, {}).get("verdict", "") if arm == "delta" else ""
                rows.append([r["id"], r["product"], "PatchCore", arm,
                             *[round(m[arm][k], 4) if k in m[arm] else None for k in METRIC_KEYS], v,
                             r["created_at"]])
        for arm in ("synthetic_only", "reference_only", "reference_plus_synthetic", "delta"):
            if arm in seg:
                rows.append([r["id"], r["product"], "segmenter", arm,
                             *[round(seg[arm][k]["mean"], 4) for k in METRIC_KEYS],
                             seg[arm][PRIMARY_METRIC].get("verdict", ""), r["created_at"]])
    return pd.DataFrame(rows, columns=EXP_COLS)


def verdict_markdown(m: dict) -> str:
    lines = [f"**{src}** — {b['verdict']['text']}" for src, b in source_blocks(m).items()]
    p = m["protocol"]
    lines.append(f"<small>{p['repeats']} repeats, {len(p['evaluation'])} evaluation defects + "
                 f"{len(p['scored']) - len(p['evaluation'])} good images scored; a verdict comes only from a "
                 "95 % bootstrap interval of the difference.</small>")
    return "\n\n".join(lines)


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
        gr.Markdown("Did synthetic data help? PatchCore with a positive bank of reference defects only vs "
                    "reference + synthetic, and a supervised segmenter trained on synthetic only / reference "
                    "only / both — scored on the evaluation defects and good test images, repeated with K "
                    "seeds, with 95 % bootstrap intervals. The accepted samples are exported and compared; "
                    "ticked generators are also run inside the protocol on equal terms.")
        with gr.Row():
            exp_repeats = gr.Slider(1, 10, 5, step=1, label="Repeats (K seeds)", elem_id="cu-exp-repeats")
            exp_generate = gr.CheckboxGroup(list(EXP_GENERATORS), value=[], elem_id="cu-exp-generate",
                                            label="Also generate with (compared on equal terms)")
            exp_per_type = gr.Number(10, label="Generated per damage type", precision=0,
                                     elem_id="cu-exp-per-type")
        exp = JobPanel(ctx, "Run experiment (PatchCore dual bank + segmenter)", "experiment")
        exp_verdict = gr.Markdown(elem_id="cu-exp-verdict")
        exp_plot = gr.Plot(label="Result", elem_id="cu-exp-plot")
        exp_result = gr.Dataframe(label="This run: mean [95 % CI] over the repeats", interactive=False,
                                  elem_id="cu-exp-result")
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
    def start_experiment(p, repeats, gens, per_type):
        if not p:
            raise gr.Error("Pick a product")
        has_samples = bool(store.list_samples(product=p, status="accepted", limit=1))
        if not has_samples and not gens:
            raise gr.Error(f"No accepted synthetic samples for {p!r} — accept some candidates first, or tick "
                           "a generator to generate inside the experiment")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        export = ctx.settings.workspace / "exports" / f"{p}-{stamp}"
        store.export_mvtec(export, p)
        req = ExperimentRequest(data=str(export / p), synthetic=str(export / p) if has_samples else None,
                                generate=list(gens) or None, per_type=int(per_type or 10),
                                repeats=int(repeats), out=str(ctx.settings.workspace / "runs" / f"experiment-{p}-{stamp}"))
        req.validate()

        def job(jctx, req):
            from pipelines.training import Cancelled      # what the job runner records as cancelled
            run_id = runlog.start("experiment", p, req.data, asdict(req), req.out, jctx.job_id)
            try:
                r = run_experiment(req, jctx.progress, lambda: jctx.cancelled)
            except BaseException as exc:
                runlog.finish(run_id, status="cancelled" if isinstance(exc, Cancelled) else "failed",
                              error=str(exc))
                raise
            runlog.finish(run_id, {k: r.get(k) for k in ("real_only", "with_synthetic", "delta", "patchcore",
                                                         "segmenter", "verdict", "source", "backends")})
            return {"out": req.out, "run_id": run_id}
        return ctx.jobs.submit("experiment", job, req, request=asdict(req))

    def live_experiment(job):
        if job["status"] != "done":
            return gr.update(), gr.update(), gr.update(), gr.update(), gr.update(), experiments_frame(runlog)
        import pandas as pd
        out = Path(job["result"]["out"])
        m = json.loads((out / "metrics.json").read_text())
        return (verdict_markdown(m), experiment_figure(m), pd.DataFrame(table_rows(m)),
                (out / "report.md").read_text(), str(out / "report.md"), experiments_frame(runlog))

    exp.wire(start_experiment, [product, exp_repeats, exp_generate, exp_per_type], live_experiment,
             [exp_verdict, exp_plot, exp_result, exp_report, exp_file, exp_table])

    def experiments() -> list[dict]:
        """Stored experiments, one row per model and arm (PatchCore: real_only, with_synthetic, delta;
        segmenter: synthetic_only, reference_only, reference_plus_synthetic, delta)."""
        return experiments_frame(runlog).to_dict("records")

    gr.api(experiments, api_name="experiments")
    return [(lambda: experiments_frame(runlog), [], [exp_table])]
