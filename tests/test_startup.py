"""The first page and the CLI start without the heavy libraries.

`python app.py` must serve its first page within seconds (benchmarks/startup.py prints the figure):
torch alone costs ~2 s to import on a 2-core machine, so building every tab — backend lists,
option widgets and availability read from the registry — must not import it (nor diffusers).
The same holds for the CLI's parser (`python -m studio <command> --help`, and every command's
start). A generator module that imports torch at module level, or a widget that loads a model at
build time, fails here.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "diffusers", "transformers", "peft", "accelerate", "faiss", "timm")

_PROBE = """
import json, sys
{body}
print("MODULES=" + json.dumps([m for m in {heavy!r} if m in sys.modules]))
"""


def _loaded(body: str, env: dict | None = None) -> list[str]:
    import os
    proc = subprocess.run([sys.executable, "-c", _PROBE.format(body=body, heavy=HEAVY)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DEFECT_STUDIO_EXAMPLES": "none", **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("MODULES="))
    return json.loads(line.split("=", 1)[1])


def test_building_every_tab_imports_no_heavy_library(tmp_path):
    body = ("import app\nfrom studio.config import Settings\n"
            "demo = app.build_app(Settings.from_env())\n"
            "assert len(demo.blocks) > 100, 'the app was not built'")
    assert _loaded(body, {"DEFECT_STUDIO_WORKSPACE": str(tmp_path / "ws")}) == []


def test_cli_parser_and_registry_info_import_no_heavy_library():
    body = ("import runpy\nsys.argv = ['studio', 'generate', '--help']\n"
            "try:\n    runpy.run_module('studio', run_name='__main__')\nexcept SystemExit as e:\n"
            "    assert e.code in (0, None)\n"
            "from pipelines import registry\n"
            "names = registry.generator_names()\n"
            "assert 'pixel-inpaint' in names and all(registry.get_info(n).name == n for n in names)\n"
            "registry.backend_status('pixel-inpaint', 'bottle')\n"
            "registry.all_option_specs()")
    assert _loaded(body) == []


def test_pixel_inpaint_names_still_reach_the_model_module():
    """The training / sampling API moved to pipelines.pixel_inpaint_model; the old names still work."""
    body = ("from pipelines import pixel_inpaint as P\n"
            "from pipelines import pixel_inpaint_model as M\n"
            "assert P.PixelInpaintConfig is M.PixelInpaintConfig and P.run_from_config is M.run_from_config\n"
            "try:\n    P.no_such_name\nexcept AttributeError:\n    pass\nelse:\n    raise SystemExit(1)")
    assert "torch" in _loaded(body)
