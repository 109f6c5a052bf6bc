"""A reusable start / cancel / progress panel for background jobs (PatchCore, DDPM, training).

The job runs in ``ctx.jobs`` (a thread; state persisted in jobs.db); a ``gr.Timer`` polls it once
a second while it runs, so the page stays responsive and a reload can re-attach by job id.
The handlers are module-level functions taking the context first (testable without a server).
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import gradio as gr

from studio.context import StudioContext
from studio.jobs import FINISHED


def _bar(fraction: float, width: int = 24) -> str:
    done = int(round(fraction * width))
    return "█" * done + "░" * (width - done)


def describe(job: dict) -> str:
    line = f"**{job['kind']}** `{job['id']}` — {job['status']}"
    if job["status"] in ("running", "queued"):
        line += f"  \n`{_bar(job['progress'] or 0)}` {100 * (job['progress'] or 0):.0f}% {job['message'] or ''}"
    elif job["status"] == "failed":
        line += f": {job['error']}"
    elif job["status"] == "cancelled":
        line += " (partial results kept where the job saved them)"
    return line


def bind(fn: Callable, *args) -> Callable:
    """``functools.partial(fn, *args)`` that keeps ``fn``'s docstring, so an endpoint's description on
    the API page is the handler's, not ``functools.partial``'s own docstring."""
    bound = partial(fn, *args)
    bound.__doc__ = fn.__doc__ or ""
    return bound


# -- handlers: module level, each takes the context first ---------------------------------------
def on_start(ctx: StudioContext, start_fn: Callable[..., str], *args):
    """Start the background job; returns its job id and status line (poll it with the *_job endpoint)."""
    try:
        jid = start_fn(*args)
    except ValueError as exc:
        raise gr.Error(str(exc)) from exc
    return jid, describe(ctx.jobs.get(jid)), gr.Timer(active=True)


def on_tick(ctx: StudioContext, live_fn: Callable[[dict], tuple], n_outputs: int, jid):
    """Timer tick: (status line, timer kept on while the job runs, *live_fn(job))."""
    if not jid:
        return (gr.update(), gr.Timer(active=False), *[gr.update()] * n_outputs)
    job = ctx.jobs.get(jid)
    done = job["status"] in FINISHED
    return (describe(job), gr.Timer(active=not done), *live_fn(job))


def on_cancel(ctx: StudioContext, jid):
    """Ask the job to stop; it stops cleanly and keeps what it saved."""
    if not jid:
        raise gr.Error("No job is running")
    try:
        ctx.jobs.cancel(jid)
    except KeyError as exc:
        raise gr.Error(str(exc)) from exc
    return "Cancelling…"


def job_info(ctx: StudioContext, job_id: str) -> dict:
    """Status of a background job: status, progress, message, result, error."""
    job = ctx.jobs.get(job_id)
    return {k: job[k] for k in ("id", "kind", "status", "progress", "message", "result", "error")}


class JobPanel:
    def __init__(self, ctx: StudioContext, start_label: str, prefix: str):
        self.ctx, self.prefix = ctx, prefix
        with gr.Row():
            self.start = gr.Button(start_label, variant="primary", elem_id=f"{prefix}-start")
            self.cancel = gr.Button("Cancel", variant="stop", elem_id=f"{prefix}-cancel")
        self.job_id = gr.Textbox(label="Job id", interactive=False, elem_id=f"{prefix}-job-id")
        self.status = gr.Markdown(elem_id=f"{prefix}-status")
        self.timer = gr.Timer(1.0, active=False)

    def wire(self, start_fn: Callable[..., str], inputs: list, live_fn: Callable[[dict], tuple],
             outputs: list) -> None:
        """``start_fn(*inputs) -> job id``; ``live_fn(job) -> values for outputs`` on every tick."""
        ctx = self.ctx

        def job_status(job_id: str) -> dict:
            """Status of a background job: status, progress, message, result, error."""
            return job_info(ctx, job_id)

        self.start.click(bind(on_start, ctx, start_fn), inputs, [self.job_id, self.status, self.timer],
                         api_name=f"{self.prefix}_start")
        self.timer.tick(bind(on_tick, ctx, live_fn, len(outputs)), self.job_id,
                        [self.status, self.timer, *outputs], api_name=False, show_progress="hidden")
        self.cancel.click(bind(on_cancel, ctx), self.job_id, self.status, api_name=f"{self.prefix}_cancel")
        gr.api(job_status, api_name=f"{self.prefix}_job")   # gr.api needs type hints (no partial)
