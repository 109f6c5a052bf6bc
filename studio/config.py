"""Settings, read once from the environment (and CLI flags) into a frozen dataclass.

Environment variables (all optional):
  DEFECT_STUDIO_WORKSPACE   folder holding the SQLite store and its files (default ./workspace)
  DEFECT_STUDIO_HOST        interface to bind (default 127.0.0.1 — never 0.0.0.0 unless asked)
  DEFECT_STUDIO_PORT        port (default 7860)
  DEFECT_STUDIO_AUTH        optional login "user:password" (several separated by commas); needed
                            for a non-loopback host (app.py --insecure-no-auth overrides, loudly)
  DEFECT_STUDIO_DATA_ROOTS  folders (os.pathsep-separated) the web studio may read and write when a
                            user names a server folder (import, export, data / model folders);
                            default: the workspace and the folder the studio was started in
  DEFECT_STUDIO_MAX_UPLOAD_MB   uploads over this size are refused (default 25)
  DEFECT_STUDIO_MAX_PIXELS  images with more pixels are refused (default 40_000_000)
  DEFECT_STUDIO_DEMO        folder of MVTec-layout demo categories imported on first start
                            (default assets/demo; "none" disables)
  DEFECT_STUDIO_ORPHAN_MIN_AGE_S  the start-up clean-up removes files no row names once they are
                            this old (default 60; a younger one may be another process's pending write)
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DEMO = ROOT / "assets" / "demo"


def _parse_auth(value: str | None) -> list[tuple[str, str]] | None:
    if not value:
        return None
    pairs = []
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        if ":" not in item:
            raise ValueError("DEFECT_STUDIO_AUTH must look like 'user:password' (comma-separated for several)")
        user, pw = item.split(":", 1)
        if not user or not pw:
            raise ValueError("DEFECT_STUDIO_AUTH: empty user or password")
        pairs.append((user, pw))
    return pairs or None


@dataclass(frozen=True)
class Settings:
    workspace: Path = field(default_factory=lambda: Path("workspace").resolve())
    host: str = "127.0.0.1"
    port: int = 7860
    auth: list[tuple[str, str]] | None = None
    max_upload_mb: float = 25.0
    max_pixels: int = 40_000_000
    demo_dir: Path | None = DEFAULT_DEMO
    data_roots: tuple[Path, ...] = ()          # () = the default roots (see :attr:`roots`)
    start_dir: Path = field(default_factory=lambda: Path.cwd().resolve())
    orphan_min_age_s: float = 60.0             # the start-up clean-up's age limit (app.start_up)

    @property
    def roots(self) -> tuple[Path, ...]:
        """The folders a web user may name on the server (:func:`studio.paths.confine`):
        ``DEFECT_STUDIO_DATA_ROOTS``, default the workspace and the folder the studio was started in."""
        return self.data_roots or tuple(dict.fromkeys((self.workspace, self.start_dir)))

    @classmethod
    def from_env(cls, env: dict | None = None, **overrides) -> "Settings":
        from studio.paths import parse_roots
        env = os.environ if env is None else env
        demo = env.get("DEFECT_STUDIO_DEMO")
        start = Path.cwd().resolve()
        s = cls(
            workspace=Path(env.get("DEFECT_STUDIO_WORKSPACE", "workspace")).expanduser().resolve(),
            host=env.get("DEFECT_STUDIO_HOST", "127.0.0.1"),
            port=int(env.get("DEFECT_STUDIO_PORT", "7860")),
            auth=_parse_auth(env.get("DEFECT_STUDIO_AUTH")),
            max_upload_mb=float(env.get("DEFECT_STUDIO_MAX_UPLOAD_MB", "25")),
            max_pixels=int(env.get("DEFECT_STUDIO_MAX_PIXELS", "40000000")),
            demo_dir=None if (demo or "").lower() == "none" else (Path(demo) if demo else DEFAULT_DEMO),
            data_roots=parse_roots(env.get("DEFECT_STUDIO_DATA_ROOTS"), start),
            start_dir=start,
            orphan_min_age_s=float(env.get("DEFECT_STUDIO_ORPHAN_MIN_AGE_S", "60")),
        )
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if "workspace" in overrides:
            overrides["workspace"] = Path(overrides["workspace"]).expanduser().resolve()
        return replace(s, **overrides)
