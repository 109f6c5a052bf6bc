"""Reliability and security of a live ``python app.py`` on a fresh workspace: one table.

    python benchmarks/robustness.py [--users 8] [--seconds 120] [--kills 10] [--short]

- **load**: N concurrent ``gradio_client`` users, each looping generate (4 candidates, a classical
  backend) → accept one, for T seconds: throughput, p50 / p95 latency per call, errors, and the
  accepted count read back from the store against the accepts the clients were told succeeded;
  ``PRAGMA integrity_check``.
- **crashes**: K × ``kill -9`` of the server at a random moment during that load, restart each time:
  every accept acknowledged before the kill is present (status and both files), no row names a
  missing file, orphan files (written before a row that never committed) counted while the server
  is down and removed by the restarted studio's start-up clean-up (none left), integrity ok.
- **jobs**: one ``kill -9`` during a training run (pixel-inpaint, a few steps, after its first
  checkpoint) and one during an experiment (the demo product, one repeat): after the restart each
  job (and its run row) shows as interrupted; the training run resumes from its last checkpoint to
  the step target, the experiment reruns to its report.
- **bad inputs**: a corpus (≥ 40 cases) through the named API endpoints and the CLI — broken,
  huge, odd-format files, wrong masks, bad names, unknown types / backends, negative / NaN / huge
  numbers — each must be answered with a message saying what is wrong (a per-case pattern), the
  server must still serve, and a refused call must leave the store as it was.
- **security**: traversal names, folders outside the data roots, served paths, public bind.

``--short`` (a few seconds of load, 2 kills, the training kill, the whole corpus; the experiment
kill only in the full run: minutes on 2 cores) is what ``tests/test_robustness.py`` runs. Prints a
Markdown table; ``--json FILE`` writes every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DEMO = ROOT / "assets" / "demo"
PRODUCT, DAMAGE, BACKEND = "bottle", "contamination", "perlin"
CALL_TIMEOUT = 120.0


# -- the server -----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(ws: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("DEFECT_STUDIO_DATA_ROOTS", "DEFECT_STUDIO_AUTH",
                                                             "DEFECT_STUDIO_HOST")}
    env.update(DEFECT_STUDIO_WORKSPACE=str(ws), DEFECT_STUDIO_DEMO=str(DEMO), DEFECT_STUDIO_EXAMPLES="none",
               GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               # the studio is the only writer of this workspace: its start-up clean-up may remove
               # every orphan at once (the default keeps files younger than a minute)
               DEFECT_STUDIO_ORPHAN_MIN_AGE_S="0")
    return env


class Server:
    """``python app.py`` on a port, started from the repository (its default data roots: the
    workspace and the repository)."""

    def __init__(self, ws: Path, log: Path):
        self.ws, self.log, self.port, self.proc = ws, log, free_port(), None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self, timeout: float = 180) -> float:
        t0 = time.monotonic()
        with open(self.log, "a") as fh:
            self.proc = subprocess.Popen([sys.executable, "app.py", "--port", str(self.port)], cwd=ROOT,
                                         env=server_env(self.ws), stdout=fh, stderr=subprocess.STDOUT)
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"app exited: {self.log.read_text()[-2000:]}")
            if http_status(self.url, 2) == 200:
                return time.monotonic() - t0
            time.sleep(0.1)
        raise RuntimeError("the studio did not answer in time")

    def log_size(self) -> int:
        return self.log.stat().st_size if self.log.exists() else 0

    def wait_log(self, pattern: str, since: int, timeout: float = 60) -> re.Match | None:
        """The first match of ``pattern`` in what the server logged after byte ``since``."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            with open(self.log, "rb") as fh:
                fh.seek(since)
                m = re.search(pattern, fh.read().decode(errors="replace"))
            if m:
                return m
            time.sleep(0.2)
        return None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and http_status(self.url) == 200

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def http_status(url: str, timeout: float = 10) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def client(url: str):
    from gradio_client import Client
    return Client(url, verbose=False)


def call(c, *args, api: str, timeout: float = CALL_TIMEOUT):
    return c.submit(*args, api_name=api).result(timeout=timeout)


def raw_call(url: str, api: str, body: str, timeout: float = 60) -> list:
    """A named endpoint called over plain HTTP with a hand-written JSON body (``NaN`` included: a
    client library refuses to send it, a hand-made request does not)."""
    req = urllib.request.Request(f"{url}gradio_api/call/{api}", data=body.encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        event_id = json.loads(r.read())["event_id"]
    with urllib.request.urlopen(f"{url}gradio_api/call/{api}/{event_id}", timeout=timeout) as r:
        text = r.read().decode()
    events = re.findall(r"event: (\w+)\ndata: (.*)", text)
    kind, data = events[-1] if events else ("error", text)
    if kind == "error":
        err = json.loads(data) if data.strip() not in ("", "null") else "error (no message)"
        raise RuntimeError(err.get("error") if isinstance(err, dict) else err)
    return json.loads(data)


def raw_upload(url: str, path: Path) -> dict:
    """Upload one file over plain HTTP; its FileData for a raw call."""
    boundary = "----robustness"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{path.name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + path.read_bytes() + \
        f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(f"{url}gradio_api/upload", data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        server_path = json.loads(r.read())[0]
    return {"path": server_path, "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}


def _path(x):
    return _path(x.get("image") or x.get("path")) if isinstance(x, dict) else x


# -- one user's loop ------------------------------------------------------------------------------
def editor_for(c, work: Path, empty: bool = False) -> tuple[dict, int]:
    """A train image of the product loaded through the API and a painted mask layer over it."""
    from gradio_client import handle_file
    rows = call(c, PRODUCT, api="/list_images")
    pick = next(r for r in rows if r["split"] == "train")
    editor, *_ = call(c, pick["id"], 4, api="/load_image")
    bg = _path(editor["background"])
    w, h = Image.open(bg).size
    layer = np.zeros((h, w, 4), np.uint8)
    if not empty:
        layer[h // 3: h // 3 + 40, w // 3: w // 3 + 50] = (255, 45, 45, 255)
    work.mkdir(parents=True, exist_ok=True)
    lp = work / ("empty.png" if empty else "layer.png")
    Image.fromarray(layer).save(lp)
    bgp = work / "bg.png"
    shutil.copyfile(bg, bgp)
    return ({"background": handle_file(str(bgp)), "layers": [handle_file(str(lp))],
             "composite": handle_file(str(bgp))}, int(pick["id"]))


class Load:
    """Users looping generate → accept until ``stop`` is set; what each was told."""

    def __init__(self, url: str, users: int, work: Path, seed: int = 0):
        self.url, self.users, self.work = url, users, work
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.gen_s: list[float] = []
        self.acc_s: list[float] = []
        self.acked: list[int] = []
        self.errors: dict[str, int] = {}
        self.seed = seed
        self.threads: list[threading.Thread] = []

    def _error(self, exc: BaseException) -> None:
        with self.lock:
            key = type(exc).__name__
            self.errors[key] = self.errors.get(key, 0) + 1

    def user(self, i: int) -> None:
        try:
            c = client(self.url)
            editor, pid = editor_for(c, self.work / f"user{i}")
        except Exception as exc:     # noqa: BLE001 — counted: a user that could not start
            self._error(exc)
            return
        seed = self.seed + 1000 * i
        while not self.stop.is_set():
            try:
                t0 = time.perf_counter()
                _, cands, _, _ = call(c, editor, PRODUCT, pid, "Damage type", DAMAGE, "#3366cc", BACKEND, 4, seed,
                                      4, 0.8, api="/generate")
                t1 = time.perf_counter()
                sid = int(cands[0]["sample_id"])
                status, _ = call(c, sid, "", cands, api="/accept")
                t2 = time.perf_counter()
                if "accepted" not in status:
                    raise RuntimeError(f"accept said {status!r}")
                with self.lock:
                    self.gen_s.append(t1 - t0)
                    self.acc_s.append(t2 - t1)
                    self.acked.append(sid)
                seed += 4
            except Exception as exc:   # noqa: BLE001 — counted (during a kill: expected)
                self._error(exc)
                if self.stop.is_set():
                    return
                time.sleep(0.2)

    def start(self) -> None:
        self.threads = [threading.Thread(target=self.user, args=(i,), daemon=True) for i in range(self.users)]
        for t in self.threads:
            t.start()

    def finish(self, timeout: float = CALL_TIMEOUT) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def store_facts(ws: Path, acked: list[int]) -> dict:
    """What the store holds of the acknowledged accepts (opened beside the running server: WAL)."""
    from studio.dataset import Store
    with Store(ws) as s:
        accepted = {int(r["id"]): r for r in s.query("SELECT id, image_path, mask_path FROM samples "
                                                     "WHERE status = 'accepted'")}
        missing = [i for i in acked if i not in accepted]
        no_files = [i for i in acked if i in accepted and not all(
            (s.root / accepted[i][k]).is_file() for k in ("image_path", "mask_path") if accepted[i][k])]
        return {"accepted_in_store": len(accepted), "acked": len(acked), "acked_missing": len(missing),
                "acked_without_files": len(no_files), "dangling_rows": len(s.dangling_rows()),
                "integrity": s.integrity_check()}


def run_load(ws: Path, url: str, users: int, seconds: float, work: Path) -> dict:
    load = Load(url, users, work)
    t0 = time.monotonic()
    load.start()
    time.sleep(seconds)
    load.finish()
    wall = time.monotonic() - t0
    facts = store_facts(ws, load.acked)
    return {"users": users, "seconds": round(wall, 1), "loops": len(load.acked),
            "loops_per_s": len(load.acked) / wall, "calls_per_s": 2 * len(load.acked) / wall,
            "generate_p50_s": pct(load.gen_s, 50), "generate_p95_s": pct(load.gen_s, 95),
            "accept_p50_s": pct(load.acc_s, 50), "accept_p95_s": pct(load.acc_s, 95),
            "errors": sum(load.errors.values()), "error_kinds": load.errors, **facts}


def run_crashes(server: Server, kills: int, users: int, work: Path, rng: random.Random,
                window: tuple[float, float]) -> dict:
    from studio.dataset import Store
    acked_all: list[int] = []
    rows = []
    for k in range(kills):
        load = Load(server.url, users, work / f"kill{k}", seed=10_000 * (k + 1))
        load.start()
        time.sleep(rng.uniform(*window))
        server.kill9()                                   # at a random moment of the load
        load.finish(timeout=30)
        acked_all += load.acked
        with Store(server.ws) as s:                      # the server is down: what the kill left
            found = len(s.orphan_files(0))
        mark = server.log_size()
        restart = server.start()                         # its start-up clean-up removes them
        m = server.wait_log(r"start-up clean-up: removed (\d+) orphan", mark)
        with Store(server.ws) as s:                      # no load now: nothing is being written
            left = len(s.orphan_files(0))
        facts = store_facts(server.ws, acked_all)
        rows.append({"kill": k + 1, "acked_this_round": len(load.acked), "orphans_found": found,
                     "orphans_removed": int(m.group(1)) if m else None, "orphans_left": left,
                     "restart_s": round(restart, 1), **facts})
    lost = sum(r["acked_missing"] + r["acked_without_files"] for r in rows[-1:])
    return {"kills": kills, "acked": len(acked_all), "lost": lost,
            "orphans_found": sum(r["orphans_found"] for r in rows),
            "orphans_removed": sum(r["orphans_removed"] or 0 for r in rows),
            "orphans_left": sum(r["orphans_left"] for r in rows),
            "cleanup_logged": all(r["orphans_removed"] is not None for r in rows),
            "dangling_rows": max((r["dangling_rows"] for r in rows), default=0),
            "integrity_ok": all(r["integrity"] == "ok" for r in rows),
            "restart_s_max": max((r["restart_s"] for r in rows), default=0.0), "rounds": rows}


# -- kill -9 during a training run and during an experiment ---------------------------------------------
PIXEL = "pixel-inpaint (offline, trains from scratch)"
FINISHED = ("done", "failed", "cancelled", "interrupted")
EXP_PRODUCT, EXP_GENERATOR = "brushed_metal", "perlin"     # a product the load does not touch


def job_of(c, prefix: str, jid: str) -> dict:
    return call(c, jid, api=f"/{prefix}_job")


def wait_job(c, prefix: str, jid: str, until, timeout: float) -> dict:
    t0 = time.monotonic()
    while True:
        job = job_of(c, prefix, jid)
        if until(job) or time.monotonic() - t0 > timeout:
            return job
        time.sleep(0.5)


def trainers_writing(out: Path) -> int:
    """Trainer processes still writing ``out`` (the killed server's child stops at its next
    progress line: its output pipe is gone)."""
    n = 0
    for d in Path("/proc").iterdir():
        try:
            args = (d / "cmdline").read_bytes().split(b"\0") if d.name.isdigit() else []
        except OSError:
            continue
        n += b"train" in args and str(out).encode() in args
    return n


def run_row(ws: Path, kind: str, job_id: str) -> str | None:
    """The status of the run a job recorded (studio.db's runs table)."""
    from studio.runs import RunLog
    log = RunLog(ws)
    try:
        return next((r["status"] for r in log.list(kind) if r.get("job_id") == job_id), None)
    finally:
        log.db.conn.close()


def _kill_and_restart(server: Server) -> float:
    server.kill9()
    return server.start()


def kill_during_training(server: Server, steps: int, timeout: float = 900) -> dict:
    """Start a pixel-inpaint run of ``steps`` steps in the Training tab, kill -9 the server once the
    run has a checkpoint, restart: the job and its run row must show as interrupted, and Resume must
    continue from the last checkpoint to the step target."""
    c = client(server.url)
    name = "rb-train"
    out = server.ws / "adapters" / name
    t0 = time.monotonic()
    jid, _, _ = call(c, PIXEL, PRODUCT, [], "real only", "", name, 15, steps, 4, 0, True, api="/train_start")
    job = wait_job(c, "train", jid, lambda j: (out / "latest").is_file() or j["status"] in FINISHED, timeout)
    res = {"steps": steps, "killed": job["status"] == "running", "killed_after_s": round(time.monotonic() - t0, 1)}
    if not res["killed"]:
        return {**res, "ok": False, "why": f"the run was {job['status']} before the kill: {job.get('error')}"}
    res["checkpoint_at_kill"] = (out / "latest").read_text().strip()
    res["restart_s"] = round(_kill_and_restart(server), 1)
    t1 = time.monotonic()
    while trainers_writing(out) and time.monotonic() - t1 < 30:
        time.sleep(0.5)
    res["orphan_trainers"] = trainers_writing(out)
    c = client(server.url)
    shown = job_of(c, "train", jid)
    res.update(shown=shown["status"], message=shown["message"], run_row=run_row(server.ws, "train-pixel-inpaint", jid))
    latest = (out / "latest").read_text().strip()
    res["resumed_from"] = latest
    t2 = time.monotonic()
    new, status, _ = call(c, jid, api="/train_rerun")
    done = wait_job(c, "train", new, lambda j: j["status"] in FINISHED, timeout)
    r = done.get("result") or {}
    res.update(resumed=done["status"], resume_s=round(time.monotonic() - t2, 1), final_step=r.get("step"),
               steps_this_run=r.get("steps_this_run"), error=done.get("error"))
    res["ok"] = (res["shown"] == "interrupted" and res["run_row"] == "interrupted" and res["orphan_trainers"] == 0
                 and done["status"] == "done" and r.get("step") == steps
                 and r.get("steps_this_run") == steps - int(latest.rsplit("-", 1)[-1]))
    return res


def kill_during_experiment(server: Server, repeats: int = 1, per_type: int = 4, timeout: float = 1800) -> dict:
    """Start an experiment (``EXP_PRODUCT``, ``EXP_GENERATOR`` inside the protocol) in the Curation
    tab, kill -9 the server while it runs, restart: the job and its run row must show as
    interrupted, and Rerun must run the same request to its report."""
    c = client(server.url)
    t0 = time.monotonic()
    jid, _, _ = call(c, EXP_PRODUCT, repeats, [EXP_GENERATOR], per_type, api="/experiment_start")
    job = wait_job(c, "experiment", jid, lambda j: (j["progress"] or 0) >= 0.05 or j["status"] in FINISHED, timeout)
    res = {"repeats": repeats, "killed": job["status"] == "running", "killed_at_progress": job["progress"],
           "killed_after_s": round(time.monotonic() - t0, 1)}
    if not res["killed"]:
        return {**res, "ok": False, "why": f"the experiment was {job['status']} before the kill: {job.get('error')}"}
    res["restart_s"] = round(_kill_and_restart(server), 1)
    c = client(server.url)
    shown = job_of(c, "experiment", jid)
    res.update(shown=shown["status"], message=shown["message"], run_row=run_row(server.ws, "experiment", jid))
    t2 = time.monotonic()
    new, status, _ = call(c, jid, api="/experiment_rerun")
    done = wait_job(c, "experiment", new, lambda j: j["status"] in FINISHED, timeout)
    out = Path((done.get("result") or {}).get("out") or server.ws / "none")
    res.update(rerun=done["status"], rerun_s=round(time.monotonic() - t2, 1), error=done.get("error"),
               report=(out / "report.md").is_file())
    res["ok"] = (res["shown"] == "interrupted" and res["run_row"] == "interrupted" and done["status"] == "done"
                 and res["report"])
    return res


# -- the bad-input corpus ---------------------------------------------------------------------------
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_of_size(path: Path, w: int, h: int, *, rows: bool = True) -> Path:
    """A grey PNG of ``w×h`` zeros (``rows=False``: the header only, a decompression bomb's shape)."""
    out = [b"\x89PNG\r\n\x1a\n", _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))]
    comp = zlib.compressobj(9)
    data = b""
    if rows:
        row = b"\x00" * (w + 1)
        parts = [comp.compress(row) for _ in range(h)]
        data = b"".join(parts) + comp.flush()
    else:
        data = comp.compress(b"\x00" * 1024) + comp.flush()
    out += [_png_chunk(b"IDAT", data), _png_chunk(b"IEND", b"")]
    path.write_bytes(b"".join(out))
    return path


def make_files(d: Path) -> dict[str, Path]:
    """Every file the corpus sends, made here (nothing downloaded)."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    good = Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8))
    f: dict[str, Path] = {}
    f["good"] = d / "good.png"
    good.save(f["good"])
    f["zero"] = d / "zero.png"
    f["zero"].write_bytes(b"")
    f["truncated"] = d / "truncated.png"
    f["truncated"].write_bytes(f["good"].read_bytes()[:200])
    f["text_png"] = d / "notes.png"
    f["text_png"].write_text("this is not an image\n" * 20)
    f["text_jpg"] = d / "notes.jpg"
    f["text_jpg"].write_text("GIF89a? no: plain text\n")
    f["random_tif"] = d / "noise.tif"
    f["random_tif"].write_bytes(rng.integers(0, 255, 4096, dtype=np.uint8).tobytes())
    f["bomb"] = png_of_size(d / "bomb.png", 100_000, 100_000, rows=False)
    f["huge"] = png_of_size(d / "huge.png", 20_000, 20_000)
    f["one"] = d / "one.png"
    Image.new("RGB", (1, 1), (10, 20, 30)).save(f["one"])
    f["grey16"] = d / "grey16.png"
    Image.fromarray((rng.integers(0, 65535, (96, 128))).astype(np.uint16)).save(f["grey16"])
    f["cmyk"] = d / "cmyk.jpg"
    good.convert("CMYK").save(f["cmyk"])
    f["palette"] = d / "palette.png"
    good.convert("P", palette=Image.Palette.ADAPTIVE).save(f["palette"])
    f["exif"] = d / "exif_rot.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6                                  # rotate 90° on display
    good.save(f["exif"], exif=exif)
    f["oversize"] = d / "oversize.png"                # over the 25 MB upload limit
    f["oversize"].write_bytes(f["good"].read_bytes() + rng.integers(0, 255, 26 * 2**20, dtype=np.uint8).tobytes())
    f["mask_small"] = d / "mask_small.png"
    Image.fromarray(np.full((10, 12), 255, np.uint8)).save(f["mask_small"])
    return f


class Case:
    def __init__(self, name: str, via: str, fn, expect: str | None, kind: str = "refuse"):
        self.name, self.via, self.fn, self.expect, self.kind = name, via, fn, expect, kind


def store_snapshot(ws: Path) -> tuple:
    from studio.dataset import Store
    with Store(ws) as s:
        q = s.query("SELECT (SELECT COUNT(*) FROM images) AS i, (SELECT COUNT(*) FROM samples) AS n, "
                    "(SELECT COUNT(*) FROM samples WHERE status='accepted') AS a, "
                    "(SELECT COALESCE(MAX(id), 0) FROM samples) AS m")[0]
        nfiles = sum(1 for p in s.files_dir.rglob("*") if p.is_file())
    return q["i"], q["n"], q["a"], q["m"], nfiles


def api_cases(url: str, ws: Path, files: dict[str, Path], work: Path) -> list[Case]:
    from gradio_client import handle_file
    c = client(url)
    editor, pid = editor_for(c, work / "corpus")
    empty_editor, _ = editor_for(c, work / "corpus-empty", empty=True)
    nan = float("nan")

    def upload(key, product=PRODUCT):
        return lambda: call(c, handle_file(str(files[key])), product, 4, api="/upload_image")

    def gen(**kw):
        a = dict(editor=editor, product=PRODUCT, src=pid, mode="Damage type", damage=DAMAGE, colour="#3366cc",
                 backend=BACKEND, n=4, seed=0, feather=4, strength=0.8)
        a.update(kw)
        return lambda: call(c, *a.values(), api="/generate")

    def mask(key):
        return lambda: call(c, handle_file(str(files[key])), editor, pid, 4, api="/upload_mask")

    bg, layer = (raw_upload(url, work / "corpus" / n) for n in ("bg.png", "layer.png"))
    raw_editor = json.dumps({"background": bg, "layers": [layer], "composite": bg})

    params = c.view_api(print_info=False, return_format="dict")["named_endpoints"]["/generate"]["parameters"]
    rest = json.dumps([q.get("parameter_default") for q in params[11:]])[1:-1]   # the backend options

    def raw_gen(n="4", seed="0", feather="4", strength="0.8"):   # numbers as JSON text: NaN, Infinity
        body = (f'{{"data": [{raw_editor}, "{PRODUCT}", {pid}, "Damage type", "{DAMAGE}", "#3366cc", '
                f'"{BACKEND}", {n}, {seed}, {feather}, {strength}{", " + rest if rest else ""}]}}')
        return lambda: raw_call(url, "generate", body)

    cases = [
        Case("zero-byte .png", "upload_image", upload("zero"), r"empty|0 bytes|cannot|not"),
        Case("truncated .png", "upload_image", upload("truncated"), r"truncated|cannot|broken|not"),
        Case("text file named .png", "upload_image", upload("text_png"), r"not an image|cannot|identify"),
        Case("text file named .jpg", "upload_image", upload("text_jpg"), r"not an image|cannot|identify"),
        Case("random bytes .tif", "upload_image", upload("random_tif"), r"not an image|cannot|identify"),
        Case("decompression bomb (100000² header)", "upload_image", upload("bomb"), r"MP limit|too large|pixels"),
        Case("20000×20000 image", "upload_image", upload("huge"), r"MP limit|too large|pixels"),
        Case("file over the upload limit (26 MB)", "upload_image", upload("oversize"), r"MB|large|limit|size"),
        Case("1×1 image", "upload_image", upload("one"), r"Uploaded|small|1×1", kind="either"),
        Case("16-bit grey PNG", "upload_image", upload("grey16"), r"Uploaded", kind="accept"),
        Case("CMYK JPEG", "upload_image", upload("cmyk"), r"Uploaded", kind="accept"),
        Case("palette PNG", "upload_image", upload("palette"), r"Uploaded", kind="accept"),
        Case("EXIF-rotated JPEG (128×96 stored, 96×128 upright)", "upload_image", upload("exif"),
             r"Uploaded.*96×128", kind="accept"),
        Case("product '../../x'", "upload_image", upload("good", "../../x"), r"invalid product name"),
        Case("product with NUL", "upload_image", upload("good", "a\x00b"), r"invalid product name"),
        Case("product of 300 characters", "upload_image", upload("good", "p" * 300), r"invalid product name"),
        Case("no product", "upload_image", upload("good", ""), r"[Pp]ick a product"),
        Case("mask of another size", "upload_mask", mask("mask_small"), r"size|shape"),
        Case("zero-byte mask", "upload_mask", mask("zero"), r"empty|0 bytes|cannot|not"),
        Case("non-image mask", "upload_mask", mask("text_png"), r"not an image|cannot|identify"),
        Case("all-zero mask", "generate", gen(editor=empty_editor), r"mask|empty|paint"),
        Case("unknown damage type", "generate", gen(damage="laser_burn"), r"laser_burn|damage"),
        Case("unknown backend", "generate", gen(backend="teleport"), r"teleport|backend"),
        Case("n = -1", "generate", gen(n=-1), r"candidates|minimum value"),
        Case("n = 0", "generate", gen(n=0), r"candidates|minimum value"),
        Case("n = 1000", "generate", gen(n=1000), r"candidates|maximum value"),
        Case("n = NaN (gradio_client)", "generate", gen(n=nan), r"JSON compliant"),
        Case("n = NaN (raw HTTP)", "generate", raw_gen(n="NaN"), r"candidates|NaN"),
        Case("n = 1e30", "generate", gen(n=1e30), r"candidates|maximum value"),
        Case("seed = -5", "generate", gen(seed=-5), r"seed"),
        Case("seed = NaN (raw HTTP)", "generate", raw_gen(seed="NaN"), r"seed must be"),
        Case("seed = NaN (gradio_client)", "generate", gen(seed=nan), r"JSON compliant"),
        Case("seed = 2.5", "generate", gen(seed=2.5), r"seed must be an integer"),
        Case("seed = 1e30", "generate", gen(seed=1e30), r"seed"),
        Case("strength = -1", "generate", gen(strength=-1), r"strength|minimum value"),
        Case("strength = NaN (raw HTTP)", "generate", raw_gen(strength="NaN"), r"strength"),
        Case("strength = 5", "generate", gen(strength=5), r"strength|maximum value"),
        Case("feather = -3", "generate", gen(feather=-3), r"feather|minimum value"),
        Case("feather = 1e9", "generate", gen(feather=1e9), r"feather|maximum value"),
        Case("feather = Infinity (raw HTTP)", "generate", raw_gen(feather="Infinity"), r"feather|maximum value"),
        Case("product '../../x' (generate)", "generate", gen(product="../../x", src=0), r"invalid product name"),
        Case("wall colour '#12'", "generate", gen(mode="Wall colour", colour="#12", backend="auto"), r"colou?r|#12"),
        Case("source image id -1", "generate", gen(src=-1), r"image|-1"),
        Case("accept sample -1", "accept", lambda: call(c, -1, "", [], api="/accept"), r"sample|-1|id"),
        Case("accept sample 10^12", "accept", lambda: call(c, 10**12, "", [], api="/accept"), r"sample|no|id"),
        Case("accept sample NaN (raw HTTP)", "accept", lambda: raw_call(url, "accept", '{"data": [NaN, "", []]}'),
             r"sample|id|NaN"),
        Case("load image 999999", "load_image", lambda: call(c, 999999, 4, api="/load_image"), r"999999|image"),
        Case("set role of image -1", "set_role", lambda: call(c, -1, "reference", PRODUCT, api="/set_role"),
             r"image|-1|id"),
    ]
    return cases


def cli_cases(ws: Path, files: dict[str, Path], work: Path) -> list[Case]:
    env = server_env(ws)
    out = work / "cli-out"
    good_mask = work / "cli-mask.png"
    m = np.zeros((96, 128), np.uint8)
    m[30:60, 40:80] = 255
    Image.fromarray(m).save(good_mask)
    zero_mask = work / "cli-zero-mask.png"
    Image.fromarray(np.zeros((96, 128), np.uint8)).save(zero_mask)

    def cli(*args):
        def run():
            r = subprocess.run([sys.executable, "-m", "studio", *args], cwd=ROOT, env=env, capture_output=True,
                               text=True, timeout=300)
            if r.returncode == 0:
                return r.stdout[-300:]
            raise RuntimeError((r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1])
        return run

    def gen(image="good", mask=good_mask, *extra):
        return cli("generate", "--image", str(files[image] if image in files else image), "--mask", str(mask),
                   "--damage", DAMAGE, "--backend", BACKEND, "--product", PRODUCT, "--n", "2", "--out", str(out),
                   "--record", "--quiet", *extra)

    return [
        Case("zero-byte image", "CLI generate", gen("zero"), r"empty|0 bytes|cannot|not"),
        Case("truncated image", "CLI generate", gen("truncated"), r"truncated|cannot|broken|not"),
        Case("non-image .png", "CLI generate", gen("text_png"), r"not an image|cannot|identify"),
        Case("decompression bomb", "CLI generate", gen("bomb"), r"MP limit|too large|pixels"),
        Case("mask of another size", "CLI generate", gen("good", files["mask_small"]), r"size|shape"),
        Case("all-zero mask", "CLI generate", gen("good", zero_mask), r"mask|empty"),
        Case("unknown damage type", "CLI generate", cli("generate", "--image", str(files["good"]), "--mask",
                                                        str(good_mask), "--damage", "laser_burn", "--product",
                                                        PRODUCT, "--out", str(out), "--record"), r"laser_burn"),
        Case("unknown backend", "CLI generate", gen("good", good_mask, "--backend", "teleport"), r"teleport"),
        Case("--n -1", "CLI generate", gen("good", good_mask, "--n", "-1"), r"candidates|--n"),
        Case("--n nan", "CLI generate", gen("good", good_mask, "--n", "nan"), r"invalid int|--n"),
        Case("--strength nan", "CLI generate", gen("good", good_mask, "--strength", "nan"), r"strength"),
        Case("--feather -5", "CLI generate", gen("good", good_mask, "--feather", "-5"), r"feather"),
        Case("--product ../../x", "CLI generate", gen("good", good_mask, "--product", "../../x"),
             r"invalid product name"),
        Case("import a missing folder", "CLI import", cli("import", str(work / "nope")), r"not a folder|nope"),
        Case("import with product '../../x'", "CLI import", cli("import", str(DEMO / "bottle"), "--kind", "folder",
                                                                 "--product", "../../x"), r"invalid product name"),
        Case("export product '../../x'", "CLI export", cli("export", "--product", "../../x", "--out", str(out)),
             r"invalid product name|no product"),
        Case("review sample 999999", "CLI review", cli("review", "999999", "accepted"), r"999999|sample"),
        Case("train --kind nope", "CLI train", cli("train", "--kind", "nope", "--data", str(DEMO / "bottle"),
                                                   "--out", str(out / "t")), r"nope|kind"),
    ]


def run_case(case: Case, ws: Path) -> dict:
    before = store_snapshot(ws)
    t0 = time.perf_counter()
    try:
        got = case.fn()
        answered = "accepted"
        texts = [x for x in (got if isinstance(got, (list, tuple)) else [got]) if isinstance(x, str)]
        message = next((t for t in texts if not t.startswith(("/", tempfile.gettempdir()))), None) \
            or json.dumps(got, default=str)[:300]
    except Exception as exc:  # noqa: BLE001 — the answer under test
        answered, message = "refused", str(exc).strip()
    after = store_snapshot(ws)
    clear = bool(message) and "Traceback" not in message and (
        case.expect is None or re.search(case.expect, message) is not None)
    if case.kind == "refuse":
        ok = answered == "refused" and clear and before == after
    elif case.kind == "accept":
        ok = answered == "accepted" and clear
    else:
        ok = clear and (answered == "accepted" or before == after)
    return {"case": case.name, "via": case.via, "expected": case.kind, "answer": answered, "clear": clear,
            "store_unchanged": before == after, "ok": ok, "message": message[:240],
            "seconds": round(time.perf_counter() - t0, 2)}


def run_corpus(server: Server, work: Path) -> dict:
    files = make_files(work / "files")
    rows = [run_case(case, server.ws) for case in api_cases(server.url, server.ws, files, work)]
    alive_api = server.alive()
    with ThreadPoolExecutor(2) as pool:           # two CLI processes at a time (2 cores)
        rows += list(pool.map(lambda case: run_case(case, server.ws), cli_cases(server.ws, files, work)))
    # two CLI cases at a time see each other's (absent) changes only: every one of them is refused
    c = client(server.url)
    alive = alive_api and server.alive() and bool(call(c, PRODUCT, api="/list_images"))
    return {"cases": len(rows), "ok": sum(r["ok"] for r in rows), "api": sum(r["via"][:3] != "CLI" for r in rows),
            "cli": sum(r["via"][:3] == "CLI" for r in rows), "server_alive": alive, "rows": rows}


# -- security -----------------------------------------------------------------------------------------
def run_security(server: Server, work: Path) -> dict:
    c = client(server.url)
    ws = server.ws
    outside = Path(tempfile.mkdtemp(prefix="outside-roots-"))
    shutil.copytree(DEMO / "brushed_metal", outside / "brushed_metal")
    (ws / "models").mkdir(exist_ok=True)
    (ws / "models" / "weights.safetensors").write_bytes(b"\0" * 64)
    rows = []

    def attempt(name: str, fn, expect: str, created: Path | None = None):
        before = store_snapshot(ws)
        try:
            got = fn()
            refused, message = False, str(got)[:200]
        except Exception as exc:  # noqa: BLE001
            refused, message = True, str(exc)
        ok = refused and re.search(expect, message) is not None and store_snapshot(ws) == before and (
            created is None or not created.exists())
        rows.append({"attempt": name, "refused": refused, "ok": ok, "message": message[:240]})

    pix = "pixel-inpaint (offline, trains from scratch)"
    attempt("import a folder outside the roots", lambda: call(c, str(outside / "brushed_metal"), "auto", "",
                                                              api="/import_folder"), "outside the folders")
    attempt("import /etc", lambda: call(c, "/etc", "folder", "etc", api="/import_folder"), "outside the folders")
    attempt("import ../../.. (relative)", lambda: call(c, "../../..", "auto", "", api="/import_folder"),
            "outside the folders")
    attempt("export to a folder outside the roots", lambda: call(c, str(outside / "exp"), PRODUCT, "MVTec AD",
                                                                 api="/export"), "outside the folders",
            outside / "exp")
    attempt("PatchCore on a folder outside the roots",
            lambda: call(c, PRODUCT, str(outside / "brushed_metal"), "single (normal patches only)",
                         "efficientnet_lite0", 5, 256, api="/patchcore_start"), "outside the folders")
    for bad in ("../../x", "/tmp/abs-run", "a\x00b", "x" * 300):
        attempt(f"training run name {bad[:12]!r}{'…' if len(bad) > 12 else ''}",
                lambda bad=bad: call(c, pix, PRODUCT, [], "real only", "", bad, 15, 1, 4, 0, True,
                                     api="/train_start"), r"[Ii]nvalid run name", ws.parent / "x")
    attempt("LoRA model folder outside the roots",
            lambda: call(c, "LoRA + damage embedding (SD 1.5 inpainting folder)", PRODUCT, [], "real only",
                         str(outside), "", 15, 1, 4, 0, True, api="/train_start"), "outside the folders")
    for name, target in (("studio.db", ws / "studio.db"), ("studio.db-wal", ws / "studio.db-wal"),
                         ("jobs.db", ws / "jobs.db"), ("a model file", ws / "models" / "weights.safetensors"),
                         ("a file outside the workspace", outside / "brushed_metal" / "train" / "good" / "000.png")):
        codes = [http_status(f"{server.url}{route}{target}") for route in ("file=", "gradio_api/file=")]
        rows.append({"attempt": f"download {name} (/file=, /gradio_api/file=)", "refused": all(x in (403, 404)
                     for x in codes), "ok": all(x in (403, 404) for x in codes), "message": f"HTTP {codes}"})
    image = next((ws / "files").rglob("*.png"))
    code = http_status(f"{server.url}gradio_api/file={image}")
    rows.append({"attempt": "control: a store image is served", "refused": code != 200, "ok": code == 200,
                 "message": f"HTTP {code}"})
    env = server_env(work / "bind-ws")
    r = subprocess.run([sys.executable, "app.py", "--host", "0.0.0.0", "--port", str(free_port())], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=120)
    rows.append({"attempt": "public bind (--host 0.0.0.0) without DEFECT_STUDIO_AUTH", "refused": r.returncode != 0,
                 "ok": r.returncode == 2 and "refusing to serve" in r.stderr, "message": r.stderr.strip()[:240]})
    shutil.rmtree(outside, ignore_errors=True)
    return {"attempts": len(rows), "refused_ok": sum(r["ok"] for r in rows), "rows": rows}


# -- the table -----------------------------------------------------------------------------------------
PARTS = ("load", "crashes", "jobs", "corpus", "security")


def table(res: dict) -> str:
    """One Markdown table of the parts that ran."""
    ok = lambda x: "ok" if x else "FAIL"  # noqa: E731
    lines = ["| check | result |", "|---|---|"]
    L = res.get("load")
    if L:
        lines += [
            f"| load: users × seconds | {L['users']} × {L['seconds']:g} s, generate {BACKEND} × 4 → accept 1 |",
            f"| load: throughput | {L['loops_per_s']:.2f} generate+accept loops/s ({L['calls_per_s']:.2f} calls/s) |",
            f"| load: generate latency p50 / p95 | {L['generate_p50_s']:.2f} s / {L['generate_p95_s']:.2f} s |",
            f"| load: accept latency p50 / p95 | {L['accept_p50_s']:.2f} s / {L['accept_p95_s']:.2f} s |",
            f"| load: errors | {L['errors']} |",
            f"| load: accepted in the store = acknowledged | {L['accepted_in_store']} = {L['acked']} "
            f"({ok(L['accepted_in_store'] == L['acked'] and not L['acked_missing'])}) |",
            f"| load: PRAGMA integrity_check | {L['integrity']} |"]
    C = res.get("crashes")
    if C:
        lines += [
            f"| crashes: kill -9 during load, restarts | {C['kills']} (restart ≤ {C['restart_s_max']:g} s) |",
            f"| crashes: acknowledged accepts lost | {C['lost']} of {C['acked']} ({ok(C['lost'] == 0)}) |",
            f"| crashes: rows naming a missing file | {C['dangling_rows']} |",
            f"| crashes: orphan files the kills left → removed by the studio's start-up clean-up | "
            f"{C['orphans_found']} → {C['orphans_removed']} removed, {C['orphans_left']} left "
            f"({ok(C['orphans_left'] == 0 and C['cleanup_logged'])}) |",
            f"| crashes: integrity after every restart | {ok(C['integrity_ok'])} |"]
    lines += job_rows(res.get("jobs") or {}, ok)
    B = res.get("corpus")
    if B:
        lines += [
            f"| bad inputs: answered as expected with a clear message | {B['ok']} / {B['cases']} "
            f"({B['api']} API, {B['cli']} CLI) |",
            f"| bad inputs: refused calls that changed the store | "
            f"{sum(1 for r in B['rows'] if r['answer'] == 'refused' and not r['store_unchanged'])} |",
            f"| bad inputs: server still serving | {ok(B['server_alive'])} |"]
    S = res.get("security")
    if S:
        lines.append(f"| security: attempts refused | {S['refused_ok']} / {S['attempts']} |")
    return "\n".join(lines)


def job_rows(J: dict, ok) -> list[str]:
    rows = []
    t = J.get("training")
    if t:
        rows.append(f"| jobs: kill -9 during a training run ({t['steps']} steps) | " + (
            f"shown {t.get('shown')} (run row {t.get('run_row')}), resumed from {t.get('resumed_from')}: "
            f"{t.get('resumed')} at step {t.get('final_step')} ({t.get('steps_this_run')} steps this run) "
            f"({ok(t['ok'])}) |" if t.get("killed") else f"{t.get('why')} (FAIL) |"))
    e = J.get("experiment")
    if e:
        rows.append(f"| jobs: kill -9 during an experiment ({EXP_PRODUCT}, {e['repeats']} repeat) | " + (
            f"killed at {100 * (e.get('killed_at_progress') or 0):.0f} %, shown {e.get('shown')} (run row "
            f"{e.get('run_row')}), rerun: {e.get('rerun')} in {e.get('rerun_s')} s ({ok(e['ok'])}) |"
            if e.get("killed") else f"{e.get('why')} (FAIL) |"))
    return rows


def case_table(res: dict) -> str:
    lines = ["| via | case | expected | answer | ok | message |", "|---|---|---|---|---|---|"]
    for r in (res.get("corpus") or {}).get("rows", []):
        msg = r["message"].replace("|", "/").replace("\n", " ")[:110]
        mark = "✓" if r["ok"] else "✗"
        lines.append(f"| {r['via']} | {r['case']} | {r['expected']} | {r['answer']} | {mark} | {msg} |")
    lines += ["", "| security attempt | ok | answer |", "|---|---|---|"]
    for r in (res.get("security") or {}).get("rows", []):
        msg = r["message"].replace("|", "/").replace("\n", " ")[:110]
        lines.append(f"| {r['attempt']} | {'✓' if r['ok'] else '✗'} | {msg} |")
    return "\n".join(lines)


def run(users: int, seconds: float, kills: int, crash_users: int, window: tuple[float, float],
        workdir: Path | None = None, seed: int = 0, train_steps: int = 20, experiment: bool = True,
        parts: tuple[str, ...] = PARTS) -> dict:
    """Every part in ``parts`` (:data:`PARTS`) on one fresh workspace; ``train_steps``: the killed
    training run's step target (0: no training kill); ``experiment``: the experiment kill too."""
    base = Path(workdir or tempfile.mkdtemp(prefix="robustness-"))
    ws = base / "workspace"
    ws.mkdir(parents=True)
    server = Server(ws, base / "app.log")
    res: dict = {}
    try:
        res["first_start_s"] = server.start()
        if "load" in parts:
            res["load"] = run_load(ws, server.url, users, seconds, base / "load")
        if "crashes" in parts:
            res["crashes"] = run_crashes(server, kills, crash_users, base / "crash", random.Random(seed), window)
        if "jobs" in parts:
            res["jobs"] = {}
            if train_steps:
                res["jobs"]["training"] = kill_during_training(server, train_steps)
            if experiment:
                res["jobs"]["experiment"] = kill_during_experiment(server)
        if "corpus" in parts:
            res["corpus"] = run_corpus(server, base / "corpus")
        if "security" in parts:
            res["security"] = run_security(server, base)
    finally:
        server.stop()
    if workdir is None:
        shutil.rmtree(base, ignore_errors=True)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--seconds", type=float, default=120)
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--crash-users", type=int, default=4, help="users during the kill rounds")
    p.add_argument("--short", action="store_true",
                   help="3 users × 4 s, 2 kills, the training kill (10 steps), the whole corpus; no experiment kill")
    p.add_argument("--train-steps", type=int, default=20, help="step target of the killed training run (0: none)")
    p.add_argument("--no-experiment", action="store_true", help="skip the kill during an experiment")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)} "
                                                           "(the table shows the parts run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write every figure here")
    p.add_argument("--cases", action="store_true", help="also print one row per corpus case and attempt")
    a = p.parse_args(argv)
    if a.short:
        a.users, a.seconds, a.kills, a.crash_users, a.train_steps, a.no_experiment = 3, 4, 2, 2, 10, True
    window = (1.0, 3.0) if a.short else (2.0, 8.0)
    parts = tuple(x for x in a.parts.split(",") if x)
    unknown = set(parts) - set(PARTS)
    if unknown:
        p.error(f"unknown parts {sorted(unknown)}; choose from {','.join(PARTS)}")
    t0 = time.monotonic()
    res = run(a.users, a.seconds, a.kills, a.crash_users, window, seed=a.seed, train_steps=a.train_steps,
              experiment=not a.no_experiment, parts=parts)
    res["total_s"] = time.monotonic() - t0
    print(table(res))
    if a.cases:
        print()
        print(case_table(res))
    print(f"\n(total {res['total_s']:.0f} s, {os.cpu_count()} CPU cores)")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
