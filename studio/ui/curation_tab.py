"""Curation tab: balance → plan → batch (background, cancel, resume) → review queue (keyboard:
a = accept, r = reject, s = skip) → quality per class → "did synthetic data help?" experiment."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import gradio as gr
import numpy as np

from pipelines.registry import offline_names, picks_model, plan_defaults

from studio.context import StudioContext
from studio.curation import (MAX_RETRIES, TARGET_MODES, CurationDB, CurationError, Thresholds, make_plan,
                             next_candidate, plan_monitor,
                             plan_status, quality, run_plan)
from studio.experiment import (METRIC_KEYS, PRIMARY_METRIC, ExperimentRequest, experiment_figure,
                               run_experiment, source_blocks, table_rows)
from studio.runs import RunLog
from studio.ui.jobs_panel import JobPanel, api_endpoint, bind

# keyboard shortcuts for the review queue (ignored while typing in a text field)
KEYS_JS = """
<script>
document.addEventListener('keydown', (e) => {
  const t = e.target; if (t && (t.tagName === 'INPUT' || t.tagName === 'TEXTAREA')) return;
  const map = {a: 'rv-accept', r: 'rv-reject', s: 'rv-skip'};
  const id = map[e.key]; if (!id) return;
  const b = document.getElementById(id);
  if (b && b.offsetParent !== null) { b.click(); e.preventDefault(); }   // only on the visible review step
});
</script>
"""
EXP_COLS = ["id", "product", "model", "arm", *METRIC_KEYS, "verdict", "created_at"]


def experiment_choices() -> list[str]:
    """Generators the experiment can run inside the protocol here (registry: offline, in-mask, no
    hub weights; not the per-product models, which the experiment is not given)."""
    from studio.experiment import experiment_generators
    return [n for n in experiment_generators() if not picks_model(n)]


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


def verdict_markdown(metrics: dict) -> str:
    lines = [f"**{src}** — {b['verdict']['text']}" for src, b in source_blocks(metrics).items()]
    p = metrics["protocol"]
    lines.append(f"<small>{p['repeats']} repeats, {len(p['evaluation'])} evaluation defects + "
                 f"{len(p['scored']) - len(p['evaluation'])} good images scored; a verdict comes only from a "
                 "95 % bootstrap interval of the difference.</small>")
    return "\n\n".join(lines)


def _overlay_mask(image, mask):
    out = image.copy()
    on = mask > 0
    out[on] = (0.5 * out[on] + 0.5 * np.array([255, 45, 45])).astype(np.uint8)
    return out


@dataclass
class CurationState:
    """What the tab's handlers share: the context, the curation database and the runs log."""
    ctx: StudioContext
    cdb: CurationDB
    runlog: RunLog

    @property
    def store(self):
        return self.ctx.store


# -- handlers: module level, each takes the tab's state first (testable without a server) --------
def do_plan(state: CurationState, product, target, over, backends, mode="balance", attribute_mix="",
            retries=MAX_RETRIES):
    """Plan candidates per defect class: ``mode`` balance (top up to the largest class or to the
    target) or fixed (target new samples per class); ``attribute_mix`` an attribute mix such as
    ``severity=low:0.5,high:0.5``; ``retries`` regenerations of a candidate that fails verification."""
    if not product:
        raise gr.Error("Pick a product")
    try:
        plan = make_plan(state.store, state.cdb, product, target=int(target or 0) or None,
                         backends=tuple(backends or ()), oversample=float(over), mode=mode or "balance",
                         mix=(attribute_mix or "").strip() or None,
                         retries=int(retries if retries is not None else MAX_RETRIES))
    except CurationError as exc:
        raise gr.Error(str(exc)) from exc
    import pandas as pd
    cols = ["label", "real", "synthetic_accepted", "current", "target", "deficit", "planned", "complete_at",
            "backends"] + (["mix"] if plan["mix"] else [])
    df = pd.DataFrame(plan["summary"])[cols]
    return plan["plan_id"], df


def monitor_frame(monitor: dict | None):
    """The success-rate monitor as a table: per class accepted / attempted and the 80 % gate."""
    import pandas as pd
    cols = ["label", "target", "complete_at", "attempted", "accepted", "success_rate", "complete"]
    if not monitor:
        return pd.DataFrame(columns=cols)
    rows = [{k: c[k] for k in cols} for c in monitor["classes"]]
    o = monitor["overall"]
    rows.append({"label": "overall", "target": sum(c["target"] for c in monitor["classes"]),
                 "complete_at": None, "attempted": o["attempted"], "accepted": o["accepted"],
                 "success_rate": o["success_rate"], "complete": o["complete"]})
    df = pd.DataFrame(rows, columns=cols)
    df["success_rate"] = [None if v is None or v != v else f"{100 * v:.0f} %" for v in df["success_rate"]]
    return df


def _batch_job(jctx, state: CurationState, plan_id: int, thresholds: Thresholds):
    return run_plan(state.store, state.cdb, plan_id, jctx.progress, lambda: jctx.cancelled, thresholds=thresholds)


def start_batch(state: CurationState, plan_id, min_visibility, min_distance):
    if not plan_id:
        raise gr.Error("Preview a plan first")
    st = plan_status(state.cdb, int(plan_id))
    if st["pending"] == 0:
        raise gr.Error(f"plan #{int(plan_id)} has nothing left to generate ({st['done']} done)")
    th = Thresholds(min_visibility=float(min_visibility), min_duplicate_distance=int(min_distance))
    return state.ctx.jobs.submit("batch", lambda jctx, plan_id: _batch_job(jctx, state, plan_id, th), int(plan_id),
                             request={"plan_id": int(plan_id)})


def live_batch(state: CurationState, job_row):
    """The batch's result once done, and the plan's success-rate monitor (live while it runs)."""
    pid = (job_row.get("request") or {}).get("plan_id")
    try:
        monitor = plan_monitor(state.cdb, int(pid)) if pid else None
    except CurationError:
        monitor = None
    return (job_row["result"] if job_row["status"] == "done" else gr.update(),
            monitor_frame(monitor) if monitor else gr.update())


def show_next(state: CurationState, product, after=0):
    item = next_candidate(state.store, state.cdb, product or None, after=int(after or 0))
    if item is None:
        return (0, "**Queue empty** — run a batch (step 1, about a second per candidate) or generate in "
                "the Annotate tab, then press **Load queue**", None, None, None, {})
    s = item["sample"]
    src = state.store.load_image(s["source_image_id"]) if s.get("source_image_id") else None
    cand = state.store.load_sample_image(s["id"])
    mask = state.store.load_sample_mask(s["id"])
    return (s["id"], f"sample #{s['id']} · {item['remaining']} candidate(s) left · "
            f"**{s['damage_type'] or s['color']}** "
            f"· {s['generator']} · seed {s['seed']}", src, _overlay_mask(cand, mask), cand,
            item["prescreen"])


def review_decide(state: CurationState, decision: str, product, sample_id, note):
    if not sample_id:
        raise gr.Error("Nothing to review")
    (state.store.accept if decision == "accepted" else state.store.reject)(int(sample_id), note=note or None)
    return (*show_next(state, product, sample_id), "")


def do_quality(state: CurationState, product):
    import pandas as pd
    rows = quality(state.store, product)
    return pd.DataFrame(rows).round(4) if rows else pd.DataFrame()


def _experiment_job(jctx, state: CurationState, product: str, request: ExperimentRequest):
    from pipelines.training import Cancelled      # what the job runner records as cancelled
    run_id = state.runlog.start("experiment", product, request.data, asdict(request), request.out, jctx.job_id)
    try:
        r = run_experiment(request, jctx.progress, lambda: jctx.cancelled)
    except BaseException as exc:
        state.runlog.finish(run_id, status="cancelled" if isinstance(exc, Cancelled) else "failed", error=str(exc))
        raise
    state.runlog.finish(run_id, {k: r.get(k) for k in ("real_only", "with_synthetic", "delta", "patchcore",
                                                   "segmenter", "verdict", "source", "backends")})
    return {"out": request.out, "run_id": run_id}


def start_experiment(state: CurationState, product, repeats, gens, per_type):
    if not product:
        raise gr.Error("Pick a product")
    has_samples = bool(state.store.list_samples(product=product, status="accepted", limit=1))
    if not has_samples and not gens:
        raise gr.Error(f"No accepted synthetic samples for {product!r} — accept some candidates first, or tick "
                       "a generator to generate inside the experiment")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    export = state.ctx.settings.workspace / "exports" / f"{product}-{stamp}"
    state.store.export_mvtec(export, product)
    req = ExperimentRequest(data=str(export / product), synthetic=str(export / product) if has_samples else None,
                            generate=list(gens) or None, per_type=int(per_type or 10), repeats=int(repeats),
                            out=str(state.ctx.settings.workspace / "runs" / f"experiment-{product}-{stamp}"),
                            workspace=str(state.ctx.settings.workspace))   # its trained pixel-inpaint runs
    req.validate()
    return _submit_experiment(state, product, req)


def _submit_experiment(state: CurationState, product: str, request: ExperimentRequest) -> str:
    return state.ctx.jobs.submit("experiment", lambda jctx, queued: _experiment_job(jctx, state, product, queued),
                                 request, request=asdict(request))


def rerun_experiment(state: CurationState, request: dict) -> str:
    """An interrupted experiment run again with the same request (same export, same output folder:
    its files are rewritten)."""
    known = {f.name for f in fields(ExperimentRequest)}
    try:
        req = ExperimentRequest(**{k: v for k, v in request.items() if k in known})
        req.validate()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"this experiment's request cannot be run again: {exc}") from exc
    if not Path(req.data).is_dir():
        raise ValueError(f"the experiment's data {req.data} is gone; start a new experiment")
    return _submit_experiment(state, Path(req.data).name, req)


def live_experiment(state: CurationState, job_row):
    if job_row["status"] != "done":
        return gr.update(), gr.update(), gr.update(), gr.update(), gr.update(), experiments_frame(state.runlog)
    import pandas as pd
    out = Path(job_row["result"]["out"])
    m = json.loads((out / "metrics.json").read_text())
    return (verdict_markdown(m), experiment_figure(m), pd.DataFrame(table_rows(m)),
            (out / "report.md").read_text(), str(out / "report.md"), experiments_frame(state.runlog))


# -- layout and wiring ---------------------------------------------------------------------------
def _plan_tab(state: CurationState, product) -> None:
    with gr.Row():
        target = gr.Number(0, label="Target per class (0 = match the largest)", precision=0,
                           elem_id="cu-target")
        oversample = gr.Slider(1.0, 3.0, 1.0, step=0.25, label="Oversample (reviewers reject some)")
        backends = gr.CheckboxGroup(offline_names("damage"), value=plan_defaults(),
                                    label="Backends", elem_id="cu-backends")
        plan_btn = gr.Button("Preview plan", elem_id="cu-plan")
    with gr.Row():
        mode = gr.Radio(list(TARGET_MODES), value="balance", label="Target mode", elem_id="cu-mode",
                        info="balance: up to the largest class (or the target); fixed: target new samples "
                             "per class. A class is complete at ≥ 80 % of its target")
        mix = gr.Textbox("", label="Attribute mix (optional)", placeholder="severity=low:0.5,high:0.5",
                         info="each item gets values matching the shares (';' between attributes), kept in "
                              "its provenance; severity low|medium|high sets the strength", elem_id="cu-mix")
        retries = gr.Number(MAX_RETRIES, label="Retries per item", precision=0, minimum=0, maximum=10,
                            info="a candidate scoring < 0.6 in verification is regenerated with a new seed",
                            elem_id="cu-retries")
    plan_id = gr.State(0)
    gr.Markdown("Press **Preview plan** to see how many candidates each damage type needs to balance the "
                "classes (instant); then run the batch below.", elem_id="cu-plan-hint")
    plan_table = gr.Dataframe(label="Plan (before it runs)", interactive=False, elem_id="cu-plan-table")
    batch = JobPanel(state.ctx, "Run / resume batch", "batch")
    batch_info = gr.JSON(label="Batch", elem_id="cu-batch-info")
    monitor = gr.Dataframe(label="Success rate per class (accepted / attempted; complete at ≥ 80 % of target)",
                           interactive=False, elem_id="cu-monitor")
    with gr.Accordion("Auto-reject thresholds (applied by the batch)", open=False):
        th_vis = gr.Slider(1.0, 3.0, Thresholds.min_visibility, step=0.05,
                           label="min visibility (PatchCore inside / around the mask)")
        th_dup = gr.Slider(0, 20, Thresholds.min_duplicate_distance, step=1,
                           label="min perceptual-hash distance between defect crops")
    plan_inputs = [product, target, oversample, backends, mode, mix, retries]
    plan_btn.click(bind(do_plan, state), plan_inputs, [plan_id, plan_table], api_name=False)
    api_endpoint(bind(do_plan, state), plan_inputs, [plan_id, plan_table], "plan")
    batch.wire(bind(start_batch, state), [plan_id, th_vis, th_dup], bind(live_batch, state), [batch_info, monitor])


def _review_tab(state: CurationState, product) -> None:
    with gr.Row():
        rv_id = gr.State(0)
        rv_left = gr.Markdown("Press **Load queue** to review the batch's candidates one by one "
                              "(keys: a accept, r reject, s skip).", elem_id="rv-left")
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
    outs = [rv_id, rv_left, rv_src, rv_mask, rv_cand, rv_scores]
    load_q.click(bind(show_next, state), product, outs, api_name="review_next")
    acc.click(bind(review_decide, state, "accepted"), [product, rv_id, rv_note], [*outs, rv_note],
              api_name="review_accept")
    rej.click(bind(review_decide, state, "rejected"), [product, rv_id, rv_note], [*outs, rv_note],
              api_name="review_reject")
    skip.click(bind(show_next, state), [product, rv_id], outs, api_name="review_skip")


def _quality_tab(state: CurationState, product) -> None:
    q_btn = gr.Button("Compute per-class quality", elem_id="cu-quality")
    gr.Markdown("KID-style distance (unbiased MMD², cubic kernel) between synthetic and real reference defect "
                "crops and the mean pairwise cosine distance within a class, both on the offline "
                "EfficientNet-Lite0 features — not Inception/LPIPS.")
    gr.Markdown("Press the button to score every class with accepted samples (a few seconds per class).",
                elem_id="cu-quality-hint")
    q_table = gr.Dataframe(interactive=False, elem_id="cu-quality-table")
    q_btn.click(bind(do_quality, state), product, q_table, api_name=False)
    api_endpoint(bind(do_quality, state), product, q_table, "quality")


def _experiment_tab(state: CurationState, product):
    gr.Markdown("Did synthetic data help? PatchCore with a positive bank of reference defects only vs "
                "reference + synthetic, and a supervised segmenter trained on synthetic only / reference "
                "only / both — scored on the evaluation defects and good test images, repeated with K "
                "seeds, with 95 % bootstrap intervals. The accepted samples are exported and compared; "
                "ticked generators are also run inside the protocol on equal terms.")
    with gr.Row():
        exp_repeats = gr.Slider(1, 10, 5, step=1, label="Repeats (K seeds)", elem_id="cu-exp-repeats")
        exp_generate = gr.CheckboxGroup(experiment_choices(), value=[], elem_id="cu-exp-generate",
                                        label="Also generate with (compared on equal terms)")
        exp_per_type = gr.Number(10, label="Generated per damage type", precision=0,
                                 elem_id="cu-exp-per-type")
    exp = JobPanel(state.ctx, "Run experiment (PatchCore dual bank + segmenter)", "experiment",
                   rerun_label="Rerun interrupted experiment")
    exp_verdict = gr.Markdown(elem_id="cu-exp-verdict")
    exp_plot = gr.Plot(label="Result", elem_id="cu-exp-plot")
    exp_result = gr.Dataframe(label="This run: mean [95 % CI] over the repeats", interactive=False,
                              elem_id="cu-exp-result")
    exp_report = gr.Markdown(elem_id="cu-exp-report")
    exp_file = gr.File(label="Report (Markdown)", elem_id="cu-exp-file")
    exp_table = gr.Dataframe(experiments_frame(state.runlog), label="Stored experiments", interactive=False,
                             elem_id="cu-exp-table")
    exp.wire(bind(start_experiment, state), [product, exp_repeats, exp_generate, exp_per_type],
             bind(live_experiment, state), [exp_verdict, exp_plot, exp_result, exp_report, exp_file, exp_table],
             rerun=bind(rerun_experiment, state))

    def experiments() -> list[dict]:
        """Stored experiments, one row per model and arm (PatchCore: real_only, with_synthetic, delta;
        segmenter: synthetic_only, reference_only, reference_plus_synthetic, delta)."""
        return experiments_frame(state.runlog).to_dict("records")

    gr.api(experiments, api_name="experiments")
    return exp_table


def build(ctx: StudioContext) -> list:
    t = CurationState(ctx, CurationDB(ctx.settings.workspace), RunLog(ctx.settings.workspace))
    products = ctx.store.products()
    product = gr.Dropdown(products, value=products[0] if products else None, label="Product",
                          elem_id="cu-product")
    with gr.Tab("1 · Plan & batch"):
        _plan_tab(t, product)
    with gr.Tab("2 · Review"):
        _review_tab(t, product)
    with gr.Tab("3 · Quality"):
        _quality_tab(t, product)
    with gr.Tab("4 · Experiment"):
        exp_table = _experiment_tab(t, product)
    return [(lambda: experiments_frame(t.runlog), [], [exp_table])]
