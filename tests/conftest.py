"""Shared fixtures: a running studio (subprocess, temp workspace, demo data), demo paths."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO = Path(os.environ.get("DEFECT_STUDIO_TEST_DEMO", ROOT / "assets" / "demo"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(workspace: Path, port: int, extra_env: dict | None = None, timeout: float = 90):
    env = dict(os.environ, DEFECT_STUDIO_WORKSPACE=str(workspace), DEFECT_STUDIO_DEMO=str(DEMO),
               GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               DEFECT_STUDIO_EXAMPLES="none")   # no background example jobs unless a test asks
    env.update(extra_env or {})
    log = open(workspace.parent / f"app-{port}.log", "w")
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"app exited: {(workspace.parent / f'app-{port}.log').read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return proc, url, time.monotonic() - t0
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("app did not answer in time")


def stop_app(proc) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def studio_server(tmp_path_factory):
    """A studio served on a free port from a fresh workspace; yields (url, workspace)."""
    base = tmp_path_factory.mktemp("studio")
    ws = base / "workspace"
    ws.mkdir()
    proc, url, _ = start_app(ws, free_port())
    yield url, ws
    stop_app(proc)
