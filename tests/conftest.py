"""Shared fixtures: a running studio (subprocess, temp workspace, demo data), demo paths."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# "auto" measures its choice with a segmenter (studio.auto): a random-init backbone at 64 px keeps
# that to seconds in tests (and in the apps they start); the real default is benchmarks/auto_choice.py's
os.environ.setdefault("DEFECT_STUDIO_AUTO_BACKBONE", "random")
os.environ.setdefault("DEFECT_STUDIO_AUTO_SIZE", "64")
# the folders a web user may name (studio.paths.confine): the tests' data lives in the repository and
# in pytest's temp folders; tests/test_security.py checks the default roots (workspace + start folder)
os.environ.setdefault("DEFECT_STUDIO_DATA_ROOTS", os.pathsep.join([str(ROOT), tempfile.gettempdir()]))
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


@pytest.fixture()
def curation_ws(tmp_path):
    """A workspace holding the demo brushed_metal category: ``(Store, CurationDB)`` (the plan tests)."""
    from studio.curation import CurationDB
    from studio.dataset import Store
    store = Store(tmp_path / "ws")
    store.import_mvtec(DEMO / "brushed_metal")
    return store, CurationDB(tmp_path / "ws")


@pytest.fixture()
def one_torch_thread():
    """torch on one thread for the test (two threads on a shared 2-core machine are far slower)."""
    import torch
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def gradient_images(n: int = 4, size: int = 32, seed: int = 0) -> list:
    """``n`` smooth RGB gradients with a little noise (size x size x 3 uint8): "good" images a tiny
    DDPM learns in a few steps."""
    import numpy as np
    rng = np.random.default_rng(seed)
    base = np.linspace(40, 200, size, dtype=np.float32)
    out = []
    for _ in range(n):
        im = np.stack([base[None, :].repeat(size, 0), base[:, None].repeat(size, 1),
                       np.full((size, size), 120.0)], -1) + rng.normal(0, 3, (size, size, 3))
        out.append(np.clip(im, 0, 255).astype(np.uint8))
    return out


# Debian's Chromium for the browser tests and scripts/screenshots.py (no browser download)
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]


@contextlib.contextmanager
def studio_page(url: str, height: int = 1000):
    """A headless Chromium page (1600 px wide) on the studio at ``url``, once the Annotate tab is up."""
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            pg = browser.new_page(viewport={"width": 1600, "height": height})
            pg.set_default_timeout(60_000)
            pg.goto(url)
            pg.wait_for_selector("#generate")
            yield pg
        finally:
            browser.close()



@pytest.fixture()
def bottle_store(tmp_path):
    """A fresh store in ``tmp_path/ws`` holding the demo bottle category."""
    from studio.dataset import Store
    s = Store(tmp_path / "ws")
    s.import_mvtec(ROOT / "assets" / "demo" / "bottle")
    yield s
    s.close()
