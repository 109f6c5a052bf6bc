"""Screenshots of every tab at 1600 × 1000 into docs/screenshots/ (Playwright + Debian's Chromium).

Starts the studio on a fresh temporary workspace (demo data imported), makes one painted, generated
candidate in Annotate so the before / after view shows, then visits each tab.

    python scripts/screenshots.py [--out docs/screenshots] [--examples]

``--examples`` lets the first-start example PatchCore / DDPM jobs run (and waits for the PatchCore
and DDPM ones) so those tabs show results; without it they show their empty-state guidance.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from conftest import CHROMIUM, CHROMIUM_ARGS as ARGS, free_port, start_app, stop_app  # noqa: E402

TABS = ["Dataset", "Curation", "Training", "PatchCore", "DDPM"]


def _annotate(pg, backend: str) -> None:
    """Draw a mask shaped like the damage type (Random mask) on the first demo image and generate
    4 candidates with ``backend`` (the shipped pixel-inpaint model: ~10–20 s on a CPU; a classical
    one: about a second); tried again if the mask had not arrived yet."""
    if backend:
        pg.click("#backend input")
        pg.locator("ul[role=listbox] li").filter(has_text=backend).first.click()
    for attempt in range(3):
        pg.wait_for_timeout(2000)
        pg.click("#random-mask")
        pg.wait_for_timeout(5000 * (attempt + 1))
        pg.click("#generate")
        try:
            pg.wait_for_function("document.querySelectorAll('#gallery .thumbnail-item').length >= 1",
                                 timeout=240_000)
            break
        except Exception:  # noqa: BLE001 - playwright's TimeoutError: try again
            continue
    pg.wait_for_selector("#before-after img")
    pg.wait_for_timeout(800)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "screenshots"), help="folder for the PNGs")
    ap.add_argument("--examples", action="store_true",
                    help="let the example PatchCore / DDPM jobs run and wait for them (a few minutes)")
    ap.add_argument("--backend", default="pixel-inpaint",
                    help="generator of the Annotate candidates (default: the shipped pixel-inpaint model; "
                         "'' keeps the tab's default)")
    args = ap.parse_args(argv)
    if not Path(CHROMIUM).exists():
        print(f"error: {CHROMIUM} is missing (apt-get install -y chromium)", file=sys.stderr)
        return 2
    from playwright.sync_api import sync_playwright
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="screenshots-") as tmp:
        ws = Path(tmp) / "workspace"
        ws.mkdir()
        env = {"DEFECT_STUDIO_EXAMPLES": "on"} if args.examples else {}
        proc, url, seconds = start_app(ws, free_port(), env)
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
                pg = browser.new_page(viewport={"width": 1600, "height": 1000})
                pg.set_default_timeout(60_000)
                pg.goto(url)
                pg.wait_for_selector("#generate")
                _annotate(pg, args.backend)
                pg.evaluate("window.scrollTo(0, 0)")
                pg.wait_for_timeout(500)
                pg.screenshot(path=str(out / "annotate.png"))
                pg.locator("#gallery").scroll_into_view_if_needed()
                pg.evaluate("document.querySelector('#gallery').scrollIntoView({block: 'start'})")
                pg.wait_for_timeout(800)
                pg.screenshot(path=str(out / "annotate-review.png"))
                if args.examples:
                    t0 = time.monotonic()
                    while time.monotonic() - t0 < 900 and not (ws / "examples" / "ddpm-eval-bottle.done").exists():
                        time.sleep(2)          # PatchCore per product, then DDPM train → evaluate
                    pg.reload()
                    pg.wait_for_selector("#generate")
                    pg.wait_for_timeout(1500)
                for tab in TABS:
                    pg.get_by_role("tab", name=tab, exact=True).click()
                    pg.wait_for_timeout(1200)
                    pg.screenshot(path=str(out / f"{tab.lower()}.png"))
                browser.close()
        except Exception:
            log = next(Path(tmp).glob("app-*.log"), None)
            print(f"--- the studio's log ---\n{log.read_text()[-4000:] if log else '(none)'}", file=sys.stderr)
            raise
        finally:
            stop_app(proc)
    for f in sorted(out.glob("*.png")):
        print(f"{f.relative_to(ROOT) if f.is_relative_to(ROOT) else f}  {f.stat().st_size / 1024:.0f} KB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
