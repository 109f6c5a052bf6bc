"""Moved to :mod:`studio.formats.coco` (kept so that old imports work)."""
from studio.formats.coco import *  # noqa: F401,F403
from studio.formats.coco import export_coco, rle_decode, rle_encode  # noqa: F401
