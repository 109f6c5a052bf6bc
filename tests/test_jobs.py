"""Background jobs: progress, cancel, failure recorded, state survives a restart."""
import threading
import time

import pytest

from studio.jobs import CANCELLED, DONE, FAILED, INTERRUPTED, JobManager


def test_job_runs_reports_progress_and_result(tmp_path):
    jm = JobManager(tmp_path / "jobs.db")
    seen = []

    def work(ctx, n):
        for i in range(n):
            ctx.progress((i + 1) / n, f"step {i + 1}")
            ctx.log(f"did {i}")
        return {"sum": n * (n - 1) // 2}

    jid = jm.submit("toy", work, 5, request={"n": 5}, on_progress=lambda f, m: seen.append(f))
    job = jm.wait(jid, timeout=10)
    assert job["status"] == DONE
    assert job["result"] == {"sum": 10}
    assert job["request"] == {"n": 5}
    assert seen == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert "did 4" in job["log"]


def test_cancel_stops_a_running_job(tmp_path):
    jm = JobManager(tmp_path / "jobs.db")
    started = threading.Event()
    steps = []

    def work(ctx):
        started.set()
        for i in range(1000):
            steps.append(i)
            ctx.progress(i / 1000)
            time.sleep(0.005)

    jid = jm.submit("toy", work)
    assert started.wait(5)
    jm.cancel(jid)
    job = jm.wait(jid, timeout=10)
    assert job["status"] == CANCELLED
    assert len(steps) < 1000


def test_failure_is_recorded_not_swallowed(tmp_path):
    jm = JobManager(tmp_path / "jobs.db")

    def work(ctx):
        raise RuntimeError("weights file is corrupt")

    job = jm.wait(jm.submit("toy", work), timeout=10)
    assert job["status"] == FAILED
    assert "weights file is corrupt" in job["error"]
    assert "Traceback" in job["log"]


def test_running_job_is_marked_interrupted_after_restart(tmp_path):
    jm = JobManager(tmp_path / "jobs.db")
    release = threading.Event()
    jid = jm.submit("toy", lambda ctx: release.wait(10))
    time.sleep(0.2)
    jm2 = JobManager(tmp_path / "jobs.db")  # a new server process on the same workspace
    assert jm2.get(jid)["status"] == INTERRUPTED
    release.set()
