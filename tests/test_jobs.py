"""Background jobs: progress, cancel, failure recorded, state survives a restart: a job or run left
running by a process that is gone is marked interrupted at start-up and can be started again once."""
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from studio.jobs import CANCELLED, DONE, FAILED, INTERRUPTED, JobManager, owner_alive, process_owner


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


def _dead_owner() -> str:
    """The owner token of a process that has exited (as a server killed with -9 leaves it)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    owner = process_owner(proc.pid)
    proc.kill()
    proc.wait()
    return owner


def test_job_of_a_dead_process_is_marked_interrupted_at_start_up(tmp_path):
    jm = JobManager(tmp_path / "jobs.db")
    release = threading.Event()
    mine = jm.submit("toy", lambda ctx: release.wait(10))
    queued = jm.submit("toy", lambda ctx: None)          # waits for the one slot
    time.sleep(0.2)
    dead = _dead_owner()
    with sqlite3.connect(tmp_path / "jobs.db") as db:    # rows a killed server left behind
        for jid, kind, status in (("crashed1", "train", "running"), ("crashed2", "experiment", "queued"),
                                  ("legacy", "patchcore", "running")):
            db.execute("INSERT INTO jobs (id, kind, status, progress, message, request, created_at, owner) "
                       "VALUES (?, ?, ?, 0.4, 'step 4', '{}', ?, ?)",
                       (jid, kind, status, time.time(), None if jid == "legacy" else dead))
    jm2 = JobManager(tmp_path / "jobs.db")               # the restarted server on the same workspace
    assert sorted(jm2.recovered) == ["crashed1", "crashed2", "legacy"]
    train, exp = jm2.get("crashed1"), jm2.get("crashed2")
    assert train["status"] == exp["status"] == INTERRUPTED and train["finished_at"]
    pid = dead.split("/")[2]
    assert f"process {pid}" in train["message"] and "while the job was running" in train["message"]
    assert "Resume" in train["message"] and "last checkpoint" in train["message"]
    assert "while the job was queued" in exp["message"] and "Rerun" in exp["message"]
    assert jm2.get("legacy")["status"] == INTERRUPTED             # no owner recorded: from an older studio
    # a job of a live process (this one, another manager on the same database) is left alone
    assert jm2.get(mine)["status"] == "running"
    assert owner_alive(process_owner()) and not owner_alive(dead) and not owner_alive(None)
    release.set()
    assert jm.wait(mine, 10)["status"] == DONE and jm.wait(queued, 10)["status"] == DONE


def test_an_interrupted_job_is_rerun_once_with_its_request(tmp_path):
    jm = JobManager(tmp_path / "jobs.db")
    with sqlite3.connect(tmp_path / "jobs.db") as db:
        db.execute("INSERT INTO jobs (id, kind, status, progress, request, created_at, owner) "
                   "VALUES ('old', 'experiment', 'running', 0.5, '{\"repeats\": 2}', ?, ?)",
                   (time.time(), _dead_owner()))
    jm = JobManager(tmp_path / "jobs.db")
    seen = []

    def submit(request):
        seen.append(request)
        return jm.submit("experiment", lambda ctx, r: {"again": r["repeats"]}, request, request=request)

    new = jm.rerun("old", submit)
    assert seen == [{"repeats": 2}] and jm.wait(new, 10)["result"] == {"again": 2}
    old = jm.get("old")
    assert old["status"] == INTERRUPTED and old["result"] == {"rerun_as": new} and new in old["message"]
    assert "started again from interrupted job old" in jm.get(new)["log"]
    with pytest.raises(ValueError, match="started again already"):
        jm.rerun("old", submit)
    with pytest.raises(ValueError, match="only an interrupted job.*is done"):
        jm.rerun(new, submit)
    assert len(seen) == 1


def test_run_of_a_dead_process_is_marked_interrupted(tmp_path):
    from studio.runs import RunLog
    log = RunLog(tmp_path)
    crashed = log.start("experiment", "bottle", "data", {}, "out")
    live = log.start("patchcore", "bottle", "data", {}, "out")
    done = log.start("patchcore", "bottle", "data", {}, "out")
    log.finish(done, {"image_auroc": 1.0})
    log.db["runs"].update(crashed, {"owner": _dead_owner()})
    assert log.mark_interrupted() == [crashed]
    row = log.get(crashed)
    assert row["status"] == "interrupted" and "stopped" in row["error"] and row["finished_at"]
    assert log.get(live)["status"] == "running" and log.get(done)["status"] == "done"


def test_app_start_up_marks_jobs_and_runs_interrupted_and_removes_orphans(tmp_path, caplog):
    import os
    import app
    from studio.config import Settings
    from studio.context import StudioContext
    from studio.runs import RunLog
    ws = tmp_path / "ws"
    ctx = StudioContext(Settings.from_env(workspace=ws))
    old = ctx.store.files_dir / "images" / "crash-leftover.png"      # written before a row never committed
    young = ctx.store.files_dir / "images" / "being-written.png"     # maybe another process's pending row
    for f in (old, young):
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"x")
    os.utime(old, (time.time() - 3600,) * 2)
    runlog = RunLog(ws)
    run_id = runlog.start("experiment", "bottle", "d", {}, "o", "crashed")
    runlog.db["runs"].update(run_id, {"owner": _dead_owner()})
    with sqlite3.connect(ws / "jobs.db") as db:
        JobManager(ws / "jobs.db")                                   # the table, as the killed server made it
        db.execute("INSERT INTO jobs (id, kind, status, request, created_at, owner) "
                   "VALUES ('crashed', 'experiment', 'running', '{}', ?, ?)", (time.time(), _dead_owner()))
    with caplog.at_level("WARNING", logger="defect_studio"):
        assert app.recover_jobs(ctx) == {"jobs": ["crashed"], "runs": [run_id]}
        assert app.clean_orphans(ctx) == ["files/images/crash-leftover.png"]
    assert ctx.jobs.get("crashed")["status"] == INTERRUPTED and runlog.get(run_id)["status"] == "interrupted"
    assert not old.exists() and young.exists()
    text = caplog.text
    assert "1 job(s) and 1 run(s)" in text and "removed 1 orphan file(s): files/images/crash-leftover.png" in text
    assert app.clean_orphans(ctx, min_age_s=0) == ["files/images/being-written.png"]
    from dataclasses import replace
    quick = StudioContext(replace(ctx.settings, orphan_min_age_s=0))
    (ctx.store.files_dir / "images" / "late.png").write_bytes(b"x")
    thread = app.start_up(quick)                 # both passes in a thread: the second one after the age limit
    thread.join(10)
    assert not thread.is_alive() and not (ctx.store.files_dir / "images" / "late.png").exists()
