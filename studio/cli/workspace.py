"""The CLI's workspace store: the one ``--workspace`` flag → :class:`studio.dataset.Store`."""
from __future__ import annotations


def open_store(args):
    """The store of ``args.workspace`` (default: ``$DEFECT_STUDIO_WORKSPACE`` or ./workspace)."""
    from studio.config import Settings
    from studio.dataset import Store
    settings = Settings.from_env(workspace=getattr(args, "workspace", None))
    return Store(settings.workspace, max_pixels=settings.max_pixels)
