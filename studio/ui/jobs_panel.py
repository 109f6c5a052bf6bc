"""A reusable start / cancel / progress panel for background jobs (PatchCore, DDPM, training).

The job runs in ``ctx.jobs`` (a thread; state persisted in jobs.db); a ``gr.Timer`` polls it once
a second while it runs, so the page stays responsive and a reload can re-attach by job id.
The handlers are module-level functions taking the context first (testable without a server).
A job the server was running when it died shows as ``interrupted`` with what to do; a panel wired
with ``rerun`` has a Resume / Rerun button (and a ``<prefix>_rerun`` endpoint) that starts it again.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import gradio as gr

from studio.context import StudioContext
from studio.jobs import FINISHED


# What each panel says before its first job: what to do next and how long it takes (2-core CPU).
IDLE = {
    "patchcore": "No PatchCore run yet. Pick a product and press **Run PatchCore**: about 10–30 s on a "
                 "demo product. (A fresh studio computes an example for each demo product on its own.)",
    "ddpm-train": "No DDPM trained yet. Pick a product and press **Train DDPM**: the loss curve appears "
                  "after the first steps; minutes to hours (the time budget above).",
    "ddpm-eval": "No DDPM evaluation yet. Pick a checkpoint (train one, or wait for the example) and press "
                 "**Evaluate on the test split**: about a minute for a demo product.",
    "ddpm-grid": "No grid yet. Pick a checkpoint and press **Make the grid**.",
    "train": "No model trained here yet. Pick a product and press **Train**: pixel-inpaint learns in "
             "10–30 min on a CPU; the loss curve appears after the first steps.",
    "batch": "No batch yet. Press **Preview plan**, then **Run / resume batch**: about a second per "
             "classical candidate.",
    "experiment": "No experiment yet. Accept a few samples (or tick a generator), then press **Run "
                  "experiment**: 1–5 min for a demo product with 5 repeats.",
}


def _bar(fraction: float, width: int = 24) -> str:
    done = int(round(fraction * width))
    return "█" * done + "░" * (width - done)


def describe(job_row: dict) -> str:
    """The job's status line (kind, status, progress bar, message) — no internal id."""
    line = f"**{job_row['kind']}** — {job_row['status']}"
    if job_row["status"] in ("running", "queued"):
        progress = job_row["progress"] or 0
        line += f"  \n`{_bar(progress)}` {100 * progress:.0f}% {job_row['message'] or ''}"
    elif job_row["status"] == "failed":
        line += f": {job_row['error']}"
    elif job_row["status"] == "cancelled":
        line += " (partial results kept where the job saved them)"
    elif job_row["status"] == "interrupted":
        line += f": {job_row.get('message') or 'the server stopped while it ran'}"
    plan = (job_row.get("request") or {}).get("plan") if isinstance(job_row.get("request"), dict) else None
    if plan:               # what the job works on, said before it starts (e.g. a trainer's data)
        line += f"  \n{plan}"
    return line


def bind(handler: Callable, *args) -> Callable:
    """``functools.partial(handler, *args)`` that keeps ``handler``'s docstring, so an endpoint's description on
    the API page is the handler's, not ``functools.partial``'s own docstring."""
    bound = partial(handler, *args)
    bound.__doc__ = handler.__doc__ or ""
    return bound


def api_endpoint(handler: Callable, inputs: list, outputs: list, api_name: str):
    """A named API endpoint with no trigger on the page (``gr.on`` with no triggers), for calls
    that take internal ids as plain values: the page keeps those ids in ``gr.State``."""
    return gr.on([], handler, inputs, outputs, api_name=api_name)


# -- handlers: module level, each takes the context first ---------------------------------------
def on_start(ctx: StudioContext, start_fn: Callable[..., str], *args):
    """Start the background job; returns its job id and status line (poll it with the *_job endpoint)."""
    try:
        jid = start_fn(*args)
    except ValueError as exc:
        raise gr.Error(str(exc)) from exc
    return jid, describe(ctx.jobs.get(jid)), gr.Timer(active=True)


def on_tick(ctx: StudioContext, live_fn: Callable[[dict], tuple], n_outputs: int, job_id):
    """Timer tick: (status line, timer kept on while the job runs, *live_fn(job))."""
    if not job_id:
        return (gr.update(), gr.Timer(active=False), *[gr.update()] * n_outputs)
    job = ctx.jobs.get(job_id)
    done = job["status"] in FINISHED
    return (describe(job), gr.Timer(active=not done), *live_fn(job))


def on_cancel(ctx: StudioContext, job_id):
    """Ask the job to stop; it stops cleanly and keeps what it saved."""
    if not job_id:
        raise gr.Error("No job is running")
    try:
        ctx.jobs.cancel(job_id)
    except KeyError as exc:
        raise gr.Error(str(exc)) from exc
    return "Cancelling…"


def on_rerun(ctx: StudioContext, rerun_fn: Callable[[dict], str], job_id):
    """Start the panel's interrupted job again (a training run resumes from its last checkpoint, an
    experiment reruns the same request); returns the new job id and its status line."""
    if not job_id:
        raise gr.Error("No interrupted job to resume or rerun")
    try:
        new = ctx.jobs.rerun(str(job_id), rerun_fn)
    except KeyError as exc:
        raise gr.Error(f"No job {job_id!r}") from exc
    except (ValueError, OSError) as exc:      # not interrupted, started again already, files gone
        raise gr.Error(str(exc)[:1].upper() + str(exc)[1:]) from exc
    return new, describe(ctx.jobs.get(new)), gr.Timer(active=True)


def job_info(ctx: StudioContext, job_id: str) -> dict:
    """Status of a background job: status, progress, message, result, error."""
    job = ctx.jobs.get(job_id)
    return {k: job[k] for k in ("id", "kind", "status", "progress", "message", "result", "error")}


def on_attach(ctx: StudioContext, kinds: tuple[str, ...], live_fn: Callable[[dict], tuple], n_outputs: int,
              idle: str):
    """Page load: re-attach to the newest job of these kinds (running: the timer follows it; done:
    its results are shown), or show ``idle`` — what to do and how long it takes."""
    jobs = [j for k in kinds for j in ctx.jobs.list(k, limit=1)]
    if not jobs:
        return (None, idle, gr.Timer(active=False), *[gr.update()] * n_outputs)
    job = ctx.jobs.get(max(jobs, key=lambda listed: listed["created_at"])["id"])
    done = job["status"] in FINISHED
    try:
        live = live_fn(job) if done else [gr.update()] * n_outputs
    except (OSError, ValueError, KeyError, TypeError):   # its files were removed since: say so
        return (job["id"], describe(job) + "  \n(its result files are gone; run it again)",
                gr.Timer(active=False), *[gr.update()] * n_outputs)
    return (job["id"], describe(job), gr.Timer(active=not done), *live)


class JobPanel:
    """``rerun_label``: the label of the button that starts an interrupted job again (wire the panel
    with ``rerun``); None: no such button."""

    def __init__(self, ctx: StudioContext, start_label: str, prefix: str, idle: str | None = None,
                 rerun_label: str | None = None):
        self.ctx, self.prefix = ctx, prefix
        self.kind = prefix.replace("_", "-")   # the job kind its start function submits
        idle = idle if idle is not None else IDLE.get(self.kind, f"Nothing run yet — press **{start_label}**.")
        self.idle = idle
        with gr.Row():
            self.start = gr.Button(start_label, variant="primary", elem_id=f"{prefix}-start")
            self.cancel = gr.Button("Cancel", variant="stop", elem_id=f"{prefix}-cancel")
            self.rerun = gr.Button(rerun_label, elem_id=f"{prefix}-rerun") if rerun_label else None
        self.job_id = gr.State(None)           # internal: never shown
        self.status = gr.Markdown(idle, elem_id=f"{prefix}-status")
        self.timer = gr.Timer(1.0, active=False)
        with gr.Group(visible=False):          # API-only: the named endpoints take the job id as text
            self.api_job_id = gr.Textbox(label="api job")

    def wire(self, start_fn: Callable[..., str], inputs: list, live_fn: Callable[[dict], tuple],
             outputs: list, attach: tuple[str, ...] | None = None,
             rerun: Callable[[dict], str] | None = None) -> None:
        """``start_fn(*inputs) -> job id``; ``live_fn(job) -> values for outputs`` on every tick.
        ``attach``: job kinds whose newest job the panel shows on page load (progress or results;
        default: the panel's own kind, ``prefix`` with ``-`` for ``_``). ``rerun(request) -> job
        id``: starts an interrupted job of the panel again (its button, ``<prefix>_rerun``)."""
        attach = (self.kind,) if attach is None else attach
        ctx = self.ctx

        def job_status(job_id: str) -> dict:
            """Status of a background job: status, progress, message, result, error."""
            return job_info(ctx, job_id)

        start = bind(on_start, ctx, start_fn)
        self.start.click(start, inputs, [self.job_id, self.status, self.timer], api_name=False)
        api_endpoint(start, inputs, [self.api_job_id, self.status, self.timer], f"{self.prefix}_start")
        self.timer.tick(bind(on_tick, ctx, live_fn, len(outputs)), self.job_id,
                        [self.status, self.timer, *outputs], api_name=False, show_progress="hidden")
        self.cancel.click(bind(on_cancel, ctx), self.job_id, self.status, api_name=False)
        api_endpoint(bind(on_cancel, ctx), self.api_job_id, self.status, f"{self.prefix}_cancel")
        gr.api(job_status, api_name=f"{self.prefix}_job")   # gr.api needs type hints (no partial)
        if rerun is not None:
            again = bind(on_rerun, ctx, rerun)
            if self.rerun is not None:
                self.rerun.click(again, self.job_id, [self.job_id, self.status, self.timer], api_name=False)
            api_endpoint(again, self.api_job_id, [self.api_job_id, self.status, self.timer], f"{self.prefix}_rerun")
        if attach:
            root = gr.context.Context.root_block
            root.load(bind(on_attach, ctx, tuple(attach), live_fn, len(outputs), self.idle), None,
                      [self.job_id, self.status, self.timer, *outputs], api_name=False,
                      show_progress="hidden")
