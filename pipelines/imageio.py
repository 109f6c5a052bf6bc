"""Reading user images safely: clear errors for non-images, truncated files and huge images.

Pixel counts are checked from the header *before* decoding, so a 20000×20000 upload is refused
without allocating 1.2 GB.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipelines.fileio import atomic_open

DEFAULT_MAX_PIXELS = 40_000_000
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class ImageInputError(ValueError):
    """A user-facing problem with an input image (message is shown as-is)."""


def _open(src: str | Path | bytes, max_pixels: int) -> Image.Image:
    name = "the upload" if isinstance(src, (bytes, bytearray)) else Path(src).name
    try:
        fp = io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else open(src, "rb")
    except OSError as exc:
        raise ImageInputError(f"Cannot open {name}: {exc.strerror or exc}") from exc
    try:
        # The header is enough for the size check; PIL's own bomb guard is bypassed here
        # because we apply our (configurable) limit before any decoding happens.
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            img = Image.open(fp)
        finally:
            Image.MAX_IMAGE_PIXELS = saved
        w, h = img.size
        if w * h > max_pixels:
            raise ImageInputError(
                f"{name} is {w}×{h} px ({w * h / 1e6:.0f} MP), over the {max_pixels / 1e6:.0f} MP "
                "limit — downscale or crop it first")
        img.load()
        # a camera's EXIF orientation: the pixels as the photo is shown (upright), not as stored
        return ImageOps.exif_transpose(img) if img.getexif().get(0x0112, 1) != 1 else img
    except UnidentifiedImageError as exc:
        raise ImageInputError(f"{name} is not an image (supported: PNG, JPEG, BMP, TIFF, WebP)") from exc
    except ImageInputError:
        raise
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageInputError(f"{name} is not a readable image (truncated or corrupt: {exc})") from exc
    finally:
        if not isinstance(src, (bytes, bytearray)):
            fp.close()


def read_rgb(src: str | Path | bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Image file/bytes → H×W×3 uint8 RGB (alpha dropped, palettes/greyscale expanded)."""
    img = _open(src, max_pixels)
    if img.mode in ("I;16", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        arr = (255 * (arr - arr.min()) / max(float(np.ptp(arr)), 1e-6)).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    return np.ascontiguousarray(np.asarray(img.convert("RGB"), dtype=np.uint8))


def read_mask(src: str | Path | bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Mask file → H×W uint8 {0, 255}: alpha if present, else any channel > 127."""
    img = _open(src, max_pixels)
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        alpha = np.asarray(img.convert("RGBA"))[..., 3]
        if alpha.min() < 255:  # a painted layer: alpha is the mask
            return np.where(alpha > 0, 255, 0).astype(np.uint8)
    arr = np.asarray(img.convert("L"))
    return np.where(arr > 127, 255, 0).astype(np.uint8)


def check_array(image: np.ndarray, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Validate an in-memory image → H×W×3 uint8."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ImageInputError(f"expected an RGB image, got an array of shape {arr.shape}")
    if arr.shape[0] * arr.shape[1] > max_pixels:
        raise ImageInputError(
            f"image is {arr.shape[1]}×{arr.shape[0]} px, over the {max_pixels / 1e6:.0f} MP limit")
    if arr.dtype != np.uint8:
        arr = np.clip(arr * (255 if arr.max() <= 1.0 else 1), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr[..., :3])


def write_png_atomic(path: str | Path, image: np.ndarray) -> Path:
    """Write a PNG atomically (:func:`pipelines.fileio.atomic_open`: temp file + fsync + rename):
    readers never see a partial file. Creates the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as fh:
        Image.fromarray(np.asarray(image)).save(fh, format="PNG")
    return path
