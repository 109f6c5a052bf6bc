"""Defect Studio — ``python app.py [--port 7860] [--host 127.0.0.1] [--workspace DIR] [--insecure-no-auth]``.

A host other than a loopback one needs a login (``DEFECT_STUDIO_AUTH``); ``--insecure-no-auth``
starts without one anyway, with a warning on every start.

Builds the Blocks app from one file per tab (studio/ui/). Heavy libraries and models load lazily:
the first page is served within seconds, offline, on the bundled demo data. On a first start the
demo set is imported in a thread while gradio itself is being imported. Every start recovers from
a crash (:func:`start_up`): jobs and runs a dead process left running are marked interrupted, and
files no row names are removed (logged).
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import multiprocessing
import os
import sys
import threading
import time

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no telemetry calls

from studio.config import Settings
from studio.context import StudioContext
from studio.services import bootstrap_demo

TITLE = "Defect Studio"
log = logging.getLogger("defect_studio")


def _bootstrap_child(settings: Settings) -> None:
    from studio.dataset import Store
    store = Store(settings.workspace, max_pixels=settings.max_pixels)
    bootstrap_demo(store, settings.demo_dir)
    store.close()


class _Bootstrap:
    """First-start demo import, run in a forked process so it truly overlaps gradio's import
    (a thread would fight over the GIL). Falls back to running inline where fork is missing."""

    def __init__(self, ctx: StudioContext):
        self.ctx = ctx
        self.proc = None
        if ctx.settings.demo_dir is None or (ctx.settings.workspace / "studio.db").exists():
            return  # nothing to import, or an existing workspace: bootstrap_demo is a no-op
        if "fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1:
            self.proc = multiprocessing.get_context("fork").Process(
                target=_bootstrap_child, args=(ctx.settings,), name="demo-bootstrap")
            self.proc.start()

    def join(self) -> None:
        if self.proc is not None:
            self.proc.join()
            if self.proc.exitcode != 0:
                raise RuntimeError(f"importing the demo data failed (exit code {self.proc.exitcode})")
        bootstrap_demo(self.ctx.store, self.ctx.settings.demo_dir)  # no-op once imported


def _start_bootstrap(ctx: StudioContext) -> _Bootstrap:
    return _Bootstrap(ctx)


def build_app(settings: Settings | None = None, ctx: StudioContext | None = None,
              bootstrap: _Bootstrap | None = None):
    """The studio as a ``gr.Blocks`` (not launched)."""
    ctx = ctx or StudioContext(settings or Settings.from_env())
    bootstrap = bootstrap or _start_bootstrap(ctx)
    import gradio as gr  # the slow import overlaps the demo import

    from studio.ui import annotate, curation_tab, dataset_tab, ddpm_tab, patchcore_tab, training_tab
    bootstrap.join()
    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(f"## {TITLE} — synthetic industrial defects, human in the loop  \n"
                    f"<small>workspace: `{ctx.settings.workspace}`</small>")
        with gr.Tabs():
            with gr.Tab("Annotate", id="annotate"):
                annotate.build(ctx)
            with gr.Tab("Dataset", id="dataset") as ds_tab:
                ds = dataset_tab.build(ctx)
            with gr.Tab("Curation", id="curation"):
                on_load = curation_tab.build(ctx)
            with gr.Tab("Training", id="training"):
                on_load += training_tab.build(ctx)
            with gr.Tab("PatchCore", id="patchcore"):
                on_load += patchcore_tab.build(ctx)
            with gr.Tab("DDPM", id="ddpm"):
                on_load += ddpm_tab.build(ctx)
        fn, inputs, outputs = ds["refresh"]
        # every tab's job panels re-attach on load; examples run once per workspace (studio.examples)
        ds_tab.select(fn, inputs, outputs, api_name=False)
        # a reload shows the stored state, not the state when the server started
        for fn, inputs, outputs in [(fn, inputs, outputs), *on_load]:
            demo.load(fn, inputs, outputs, api_name=False)
    from studio.ui.empty import autohide
    autohide(demo)             # empty plots / tables stay hidden until they hold data
    demo.studio_context = ctx  # for tests and embedding
    return demo


def start_examples(ctx: StudioContext) -> list[str]:
    """Queue the example PatchCore / DDPM results of the demo products (once per workspace, in the
    background; ``DEFECT_STUDIO_EXAMPLES=none`` skips them)."""
    from studio import examples
    if not examples.enabled() or ctx.settings.demo_dir is None:
        return []
    return examples.start_examples(ctx)


# the workspace folders that hold images a page may show (the store's files, run overlays and
# figures, exports); models, adapters, auto/ and the databases are never served
SERVED_DIRS = ("files", "runs", "exports")
DATABASES = ("studio.db", "jobs.db")


def served_paths(settings: Settings) -> tuple[list[str], list[str]]:
    """(allowed_paths, blocked_paths) for ``launch``: the workspace's image folders only; the
    databases (with their -wal / -shm / -journal files) blocked even where another rule would allow
    them (gradio also reads files a handler returns from the current folder)."""
    ws = settings.workspace
    blocked = [str(ws / f"{db}{suffix}") for db in DATABASES for suffix in ("", "-wal", "-shm", "-journal")]
    return [str(ws / d) for d in SERVED_DIRS], blocked


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and ``localhost``: only this machine can connect."""
    if host.strip().lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False            # a host name or 0.0.0.0 / :: (every interface)


def bind_refusal(settings: Settings, insecure_no_auth: bool = False) -> str | None:
    """Why the studio must not start on ``settings.host`` (None: it may). A public bind needs a login."""
    if is_loopback(settings.host) or settings.auth or insecure_no_auth:
        return None
    return (f"refusing to serve on {settings.host}: other machines could reach the studio without a login. "
            "Set DEFECT_STUDIO_AUTH=user:password (several: comma-separated), bind 127.0.0.1, or pass "
            "--insecure-no-auth to start without a login anyway")


def recover_jobs(ctx: StudioContext) -> dict:
    """Jobs (``jobs.db``) and runs (``studio.db``'s runs table) that a process which is gone left
    running or queued → ``interrupted`` (:meth:`studio.jobs.JobManager.mark_interrupted`,
    :meth:`studio.runs.RunLog.mark_interrupted`); logged, returned as ``{"jobs": ids, "runs": ids}``."""
    jobs = list(ctx.jobs.recovered)            # the manager marks them when it is made
    runs: list[int] = []
    if (ctx.settings.workspace / "studio.db").is_file():
        from studio.runs import RunLog
        runlog = RunLog(ctx.settings.workspace)
        try:
            runs = runlog.mark_interrupted()
        finally:
            runlog.db.conn.close()
    if jobs or runs:
        log.warning("start-up: %d job(s) and %d run(s) were running in a process that is gone; marked "
                    "interrupted (the jobs panels offer Resume / Rerun)", len(jobs), len(runs))
    return {"jobs": jobs, "runs": runs}


def clean_orphans(ctx: StudioContext, min_age_s: float | None = None) -> list[str]:
    """The start-up clean-up: files under ``files/`` that no row names (written before a row that a
    crash never committed) and older than ``min_age_s`` (default ``Settings.orphan_min_age_s``) are
    removed (:meth:`studio.dataset.Store.gc_orphans`); logged; returns their workspace paths."""
    age = ctx.settings.orphan_min_age_s if min_age_s is None else min_age_s
    removed: list[str] = []
    ctx.store.gc_orphans(age, removed=removed)
    shown = ", ".join(removed[:10]) + (f" (+{len(removed) - 10} more)" if len(removed) > 10 else "")
    log.warning("start-up clean-up: removed %d orphan file(s)%s", len(removed), f": {shown}" if removed else "")
    return removed


def start_up(ctx: StudioContext) -> threading.Thread:
    """What every start does before the first page: :func:`recover_jobs` now; :func:`clean_orphans`
    in a thread (a large store takes a while to list), once more after the age limit when the first
    pass kept files too young to remove (a crash just before this start: old enough then)."""
    recover_jobs(ctx)

    def clean() -> None:
        try:
            clean_orphans(ctx)
            age = ctx.settings.orphan_min_age_s
            if age > 0 and ctx.store.orphan_files(0):
                time.sleep(age + 1)
                clean_orphans(ctx)
        except Exception:  # noqa: BLE001 — a failed clean-up must not stop the studio: logged
            log.exception("start-up clean-up failed")
    thread = threading.Thread(target=clean, name="orphan-clean-up", daemon=True)
    thread.start()
    return thread


def _keyboard_js() -> str:
    from studio.ui.annotate import KEYS_JS as ANNOTATE_KEYS
    from studio.ui.curation_tab import KEYS_JS
    return KEYS_JS + ANNOTATE_KEYS


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Defect Studio web app")
    p.add_argument("--host", help="interface to bind (default 127.0.0.1; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, help="port (default 7860)")
    p.add_argument("--workspace", help="workspace folder (default $DEFECT_STUDIO_WORKSPACE or ./workspace)")
    p.add_argument("--insecure-no-auth", action="store_true",
                   help="serve a non-loopback --host without DEFECT_STUDIO_AUTH (anyone who reaches it can use it)")
    args = p.parse_args(argv)
    settings = Settings.from_env(host=args.host, port=args.port, workspace=args.workspace)
    refusal = bind_refusal(settings, args.insecure_no_auth)
    if refusal:
        print(f"error: {refusal}", file=sys.stderr)
        raise SystemExit(2)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not is_loopback(settings.host) and not settings.auth:
        logging.getLogger("defect_studio").warning(
            "\n%s\nWARNING: --insecure-no-auth: serving on %s WITHOUT A LOGIN; anyone who can reach port %d "
            "can read and change the dataset. Set DEFECT_STUDIO_AUTH=user:password.\n%s",
            "!" * 78, settings.host, settings.port, "!" * 78)
    ctx = StudioContext(settings)
    demo = build_app(ctx=ctx, bootstrap=_start_bootstrap(ctx))
    start_up(ctx)              # after the demo import (build_app joined it), before the first page
    allowed, blocked = served_paths(settings)
    demo.queue(default_concurrency_limit=2).launch(
        server_name=settings.host, server_port=settings.port, auth=settings.auth,
        max_file_size=f"{settings.max_upload_mb:g}mb", show_error=True, footer_links=["api"],
        ssr_mode=False, allowed_paths=allowed, blocked_paths=blocked, head=_keyboard_js(),
        prevent_thread_lock=True)
    start_examples(ctx)        # after the first page is served: it must not delay it
    demo.block_thread()


if __name__ == "__main__":
    main()
