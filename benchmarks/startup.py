"""Seconds from `python app.py` to the first page (HTTP 200 on /), cold workspace and warm.

Target: ≤ 5 s on a 2-core CPU machine with no network. Usage: python benchmarks/startup.py
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import free_port, start_app, stop_app  # noqa: E402


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ws = Path(tmp) / "workspace"
        ws.mkdir()
        for label in ("first start (imports the demo set)", "restart (existing workspace)"):
            proc, url, seconds = start_app(ws, free_port())
            stop_app(proc)
            print(f"{label:40s} first page after {seconds:5.2f} s")


if __name__ == "__main__":
    main()
