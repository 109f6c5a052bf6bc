"""Example results for the demo products, computed once in the background on a first start.

A fresh studio should not open its PatchCore and DDPM tabs on an empty page: after the demo data is
imported, :func:`start_examples` queues, in the studio's job manager (progress and cancel in each
tab's job panel), one PatchCore run per demo product and one short DDPM training + evaluation on
the first demo product. Results are ordinary runs in the workspace (``runs/``, ``models/``,
``runs.db``); a marker per example (``examples/<kind>-<product>.done``) makes them run once per
workspace. ``DEFECT_STUDIO_EXAMPLES=none`` skips them (the tests do).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from pipelines.fileio import atomic_write_text
from studio.context import StudioContext

ENV = "DEFECT_STUDIO_EXAMPLES"


@dataclass(frozen=True)
class ExamplePlan:
    """How much work the examples do (the defaults take about 3 min of a 2-core CPU in all).

    The DDPM example is the 'small' U-Net for 2 minutes: on the demo bottle (one thread, depth 50,
    128 px) it reaches image / pixel AUROC / AUPRO 0.967 / 0.973 / 0.951 (880 steps), where the
    'tiny' one for 45 s gave 0.725 / 0.839 / 0.747 and 'small' for 1 minute 0.717 / 0.851 / 0.728 —
    an example that shows what the method does, not a weak model."""
    patchcore_coreset: float = 0.05
    patchcore_size: int = 256
    ddpm_minutes: float | None = 2.0
    ddpm_steps: int | None = None
    ddpm_size: int = 64
    ddpm_crop: int = 32
    ddpm_preset: str = "small"
    ddpm_depths: tuple[int, ...] = (50,)
    ddpm_eval_size: int = 128


def enabled() -> bool:
    return os.environ.get(ENV, "").strip().lower() not in ("none", "0", "off", "false", "no")


def _marker(ctx: StudioContext, kind: str, product: str) -> Path:
    return ctx.settings.workspace / "examples" / f"{kind}-{product}.done"


def _done(jctx, marker: Path, result: dict) -> dict:
    marker.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, f"{time.strftime('%Y-%m-%d %H:%M:%S')} job {jctx.job_id}\n")
    return result


def _export(ctx: StudioContext, product: str) -> Path:
    root = ctx.settings.workspace / "exports" / f"example-{product}"
    if not (root / product / "train").is_dir():
        ctx.store.export_mvtec(root, product)
    return root / product



def _recorded(ctx: StudioContext, jctx, kind: str, product: str, req, work, metrics_of) -> tuple[int, dict]:
    """Run ``work()`` recorded in the run log like the tab's own runs (params marked as an
    example): a failure or cancel is recorded as failed and re-raised. → ``(run id, summary)``."""
    from studio.runs import RunLog
    runlog = RunLog(ctx.settings.workspace)
    run_id = runlog.start(kind, product, req.data, {**req.__dict__, "example": True}, req.out, jctx.job_id)
    try:
        summary = work()
    except BaseException as exc:
        runlog.finish(run_id, status="failed", error=str(exc))
        raise
    scored = summary.get("scored_hashes") if isinstance(summary, dict) else None
    runlog.finish(run_id, metrics_of(summary), scored=scored)   # scored: a role change marks it stale
    return run_id, summary

def patchcore_example(jctx, ctx: StudioContext, product: str, plan: ExamplePlan) -> dict:
    """PatchCore, single bank, on the product's export; recorded as a run like the tab's own."""
    from studio.evaluation import PatchCoreRequest, run_patchcore
    data = _export(ctx, product)
    req = PatchCoreRequest(data=str(data), out=str(ctx.settings.workspace / "runs" / f"patchcore-example-{product}"),
                           bank="single", coreset=plan.patchcore_coreset, size=plan.patchcore_size)
    run_id, summary = _recorded(ctx, jctx, "patchcore", product, req, lambda: run_patchcore(
        req, progress=jctx.progress, cancelled=lambda: jctx.cancelled), lambda s: s["metrics"])
    return _done(jctx, _marker(ctx, "patchcore", product),
                 {"run_id": run_id, "out": req.out, "metrics": summary["metrics"], "example": True})


def ddpm_train_example(jctx, ctx: StudioContext, product: str, plan: ExamplePlan) -> dict:
    from studio.inspection import DDPMTrainRequest, train_ddpm
    data = _export(ctx, product)
    out = ctx.settings.workspace / "models" / f"ddpm-example-{product}"
    req = DDPMTrainRequest(data=str(data), out=str(out), minutes=plan.ddpm_minutes, steps=plan.ddpm_steps,
                           size=plan.ddpm_size, crop=plan.ddpm_crop, preset=plan.ddpm_preset)
    req.validate()
    _, summary = _recorded(ctx, jctx, "ddpm-train", product, req,
                           lambda: train_ddpm(req, jctx.progress, lambda: jctx.cancelled),
                           lambda s: {"step": s["step"], "loss": s["loss"]})
    if summary.get("stopped") == "cancelled":
        return {**summary, "example": True}       # no marker: a later start trains it again
    result = _done(jctx, _marker(ctx, "ddpm-train", product), {**summary, "example": True})
    if not _marker(ctx, "ddpm-eval", product).exists():   # chained: runs once this job frees its slot
        ctx.jobs.submit("ddpm-eval", ddpm_eval_example, ctx, product, plan,
                        request={"example": True, "product": product})
    return result


def ddpm_eval_example(jctx, ctx: StudioContext, product: str, plan: ExamplePlan) -> dict:
    from studio.inspection import DDPMEvalRequest, evaluate_ddpm
    data = _export(ctx, product)
    ckpt = ctx.settings.workspace / "models" / f"ddpm-example-{product}"
    out = ctx.settings.workspace / "runs" / f"ddpm-example-{product}"
    req = DDPMEvalRequest(data=str(data), checkpoint=str(ckpt), out=str(out), depths=list(plan.ddpm_depths),
                          eval_size=plan.ddpm_eval_size)
    _, summary = _recorded(ctx, jctx, "ddpm-eval", product, req,
                           lambda: evaluate_ddpm(req, jctx.progress, lambda: jctx.cancelled),
                           lambda s: s["metrics"])
    return _done(jctx, _marker(ctx, "ddpm-eval", product), {"out": req.out, "metrics": summary["metrics"],
                                                            "example": True})


def pending(ctx: StudioContext, products: list[str]) -> list[tuple[str, str]]:
    """``(kind, product)`` of the examples not computed yet in this workspace, in running order."""
    todo = [("patchcore", p) for p in products]
    if products:
        todo += [("ddpm-train", products[0]), ("ddpm-eval", products[0])]
    return [(k, p) for k, p in todo if not _marker(ctx, k, p).exists()]


def start_examples(ctx: StudioContext, products: list[str] | None = None,
                   plan: ExamplePlan | None = None) -> list[str]:
    """Queue the missing examples (one heavy job at a time, in the order of :func:`pending`);
    returns their job ids. ``products``: default the demo products found in the store."""
    plan = plan or ExamplePlan()
    if products is None:
        demo = ctx.settings.demo_dir
        names = {p.name for p in Path(demo).iterdir()} if demo and Path(demo).is_dir() else set()
        products = [p for p in ctx.store.products() if p in names]
    fns = {"patchcore": patchcore_example, "ddpm-train": ddpm_train_example, "ddpm-eval": ddpm_eval_example}
    ids = []
    todo = pending(ctx, products)
    for kind, product in todo:
        if kind == "ddpm-eval" and ("ddpm-train", product) in todo:
            continue                               # the training example queues it when done
        ids.append(ctx.jobs.submit(kind, fns[kind], ctx, product, plan,
                                   request={"example": True, "product": product}))
    return ids
