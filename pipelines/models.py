"""Load diffusion models from a hub id or a local folder — lazily, offline, cached per name.

Model kinds (``KINDS``), each with an environment variable naming a folder or a hub id:

=================  ==============================  =================================================
kind               env var                         default hub id (read from the local HF cache only)
=================  ==============================  =================================================
sd-inpaint         DEFECT_STUDIO_SD_INPAINT        stable-diffusion-v1-5/stable-diffusion-inpainting
sd-base            DEFECT_STUDIO_SD_BASE           stable-diffusion-v1-5/stable-diffusion-v1-5
controlnet-seg     DEFECT_STUDIO_CONTROLNET        lllyasviel/control_v11p_sd15_seg
controlnet-canny   DEFECT_STUDIO_CONTROLNET_CANNY  lllyasviel/control_v11p_sd15_canny
controlnet-hed     DEFECT_STUDIO_CONTROLNET_HED    lllyasviel/control_v11p_sd15_softedge
controlnet-depth   DEFECT_STUDIO_CONTROLNET_DEPTH  lllyasviel/control_v11f1p_sd15_depth
ip-adapter         DEFECT_STUDIO_IP_ADAPTER        h94/IP-Adapter
=================  ==============================  =================================================

``DEFECT_STUDIO_MODELS`` (optional) is a folder searched for ``<folder>/<last part of the hub
id>`` (e.g. ``models/stable-diffusion-inpainting``) when the kind's own variable is unset.

Everything is loaded with ``local_files_only=True``: nothing is ever downloaded. A missing model
raises :class:`ModelMissingError` whose message says which files, which folder and which
environment variable; :func:`availability` reports the same without raising, so the UI can list
a backend as unavailable. A corrupt weight file or a checkpoint of the wrong architecture raises
:class:`ModelError` (a ``ValueError``) with a message for the user.

No torch / diffusers import happens at module import time.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODELS_DIR_ENV = "DEFECT_STUDIO_MODELS"


class ModelError(ValueError):
    """A model cannot be used (corrupt file, wrong architecture); the message is for the user."""


class ModelMissingError(ModelError):
    """A model's files are not on this machine; the message says what to download and where."""


@dataclass(frozen=True)
class ModelKind:
    name: str
    env_var: str
    hub_id: str
    what: str                                  # human description
    files: tuple[str, ...]                     # required, relative to the folder
    optional: tuple[str, ...] = ()             # mentioned in the instruction, not required


KINDS: dict[str, ModelKind] = {k.name: k for k in (
    ModelKind("sd-inpaint", "DEFECT_STUDIO_SD_INPAINT",
              "stable-diffusion-v1-5/stable-diffusion-inpainting",
              "Stable Diffusion 1.5 inpainting (9-channel U-Net)",
              ("model_index.json", "unet/config.json", "vae/config.json", "scheduler/"),
              ("text_encoder/", "tokenizer/")),
    ModelKind("sd-base", "DEFECT_STUDIO_SD_BASE", "stable-diffusion-v1-5/stable-diffusion-v1-5",
              "Stable Diffusion 1.5 base (4-channel U-Net, for full-image ControlNet)",
              ("model_index.json", "unet/config.json", "vae/config.json", "scheduler/"),
              ("text_encoder/", "tokenizer/")),
    ModelKind("controlnet-seg", "DEFECT_STUDIO_CONTROLNET", "lllyasviel/control_v11p_sd15_seg",
              "ControlNet (segmentation) for SD 1.5", ("config.json",),
              ("diffusion_pytorch_model.safetensors",)),
    ModelKind("controlnet-canny", "DEFECT_STUDIO_CONTROLNET_CANNY",
              "lllyasviel/control_v11p_sd15_canny", "ControlNet (canny edges) for SD 1.5",
              ("config.json",), ("diffusion_pytorch_model.safetensors",)),
    ModelKind("controlnet-hed", "DEFECT_STUDIO_CONTROLNET_HED",
              "lllyasviel/control_v11p_sd15_softedge", "ControlNet (HED soft edges) for SD 1.5",
              ("config.json",), ("diffusion_pytorch_model.safetensors",)),
    ModelKind("controlnet-depth", "DEFECT_STUDIO_CONTROLNET_DEPTH",
              "lllyasviel/control_v11f1p_sd15_depth", "ControlNet (depth) for SD 1.5",
              ("config.json",), ("diffusion_pytorch_model.safetensors",)),
    ModelKind("ip-adapter", "DEFECT_STUDIO_IP_ADAPTER", "h94/IP-Adapter",
              "IP-Adapter for SD 1.5 (image prompt)",
              ("models/ip-adapter_sd15.safetensors", "models/image_encoder/config.json")),
)}

IP_ADAPTER_SUBFOLDER = "models"
IP_ADAPTER_WEIGHT = "ip-adapter_sd15.safetensors"


# --------------------------------------------------------------------------------------------
# Where is a model?
# --------------------------------------------------------------------------------------------
def _kind(name: str) -> ModelKind:
    try:
        return KINDS[name]
    except KeyError:
        raise KeyError(f"unknown model kind {name!r}; known: {', '.join(KINDS)}") from None


def instruction(name: str, tried: str | None = None) -> str:
    """The exact instruction for putting model ``name`` on this machine."""
    k = _kind(name)
    folder_hint = (Path(os.environ[MODELS_DIR_ENV]) / k.hub_id.split("/")[-1]
                   if os.environ.get(MODELS_DIR_ENV) else Path("models") / k.hub_id.split("/")[-1])
    files = ", ".join(k.files + k.optional)
    head = f"{k.what} is not available" + (f" ({tried})" if tried else "") + ". "
    return (head + f"Download the Hugging Face repo '{k.hub_id}' (needed: {files}; weights as "
            f".safetensors) into a folder, e.g. `huggingface-cli download {k.hub_id} --local-dir "
            f"{folder_hint}`, then set {k.env_var}={folder_hint} (or pass the folder / hub id "
            f"explicitly, or put it under ${MODELS_DIR_ENV}/{k.hub_id.split('/')[-1]}). "
            "Nothing is downloaded at run time.")


def _missing_files(folder: Path, k: ModelKind) -> list[str]:
    missing = []
    for rel in k.files:
        p = folder / rel.rstrip("/")
        if rel.endswith("/") and not p.is_dir() or not rel.endswith("/") and not p.is_file():
            missing.append(rel)
    return missing


def _hub_cache_folder(hub_id: str) -> Path | None:
    """The local snapshot of ``hub_id`` in the Hugging Face cache, or None (never downloads)."""
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(hub_id, local_files_only=True))
    except Exception:    # noqa: BLE001 — any failure here means "not in the cache"
        return None


def resolve(name: str, source: str | os.PathLike | None = None) -> Path:
    """The local folder holding model ``name``: ``source`` (a folder or a hub id), else the
    kind's env var, else ``$DEFECT_STUDIO_MODELS/<repo name>``, else the default hub id in the
    local cache. Raises :class:`ModelMissingError` with the instruction when nothing is there."""
    k = _kind(name)
    src = str(source) if source not in (None, "") else os.environ.get(k.env_var) or None
    if src is None and os.environ.get(MODELS_DIR_ENV):
        cand = Path(os.environ[MODELS_DIR_ENV]) / k.hub_id.split("/")[-1]
        if cand.is_dir():
            src = str(cand)
    src = src or k.hub_id
    path = Path(src).expanduser()
    if path.is_dir():
        folder = path
    elif path.exists():
        raise ModelMissingError(f"{src} is a file, not a model folder. " + instruction(name))
    elif src.count("/") == 1 and not src.startswith((".", "/", "~")):
        folder = _hub_cache_folder(src)
        if folder is None:
            raise ModelMissingError(instruction(name, tried=f"'{src}' is not in the local "
                                                            "Hugging Face cache and downloads are off"))
    else:
        raise ModelMissingError(instruction(name, tried=f"folder {src} does not exist"))
    missing = _missing_files(folder, k)
    if missing:
        raise ModelMissingError(instruction(name, tried=f"{folder} lacks {', '.join(missing)}"))
    return folder


def available(name: str, source=None) -> tuple[bool, str]:
    """``(ok, message)`` for one model kind; never raises, loads no weights."""
    try:
        return True, f"{KINDS[name].what}: {resolve(name, source)}"
    except ModelError as exc:
        return False, str(exc)


def availability(sources: dict[str, Any] | None = None) -> dict[str, tuple[bool, str]]:
    """``{kind: (ok, message)}`` for every model kind; never raises, loads no weights."""
    return {name: available(name, (sources or {}).get(name)) for name in KINDS}


# --------------------------------------------------------------------------------------------
# Loading (cached per kind + folder + device + dtype)
# --------------------------------------------------------------------------------------------
def clear_cache() -> None:
    """Drop every loaded diffusers model (they live in :data:`pipelines.model_manager.MANAGER`)."""
    from pipelines.model_manager import MANAGER
    MANAGER.clear("diffusers")


def wrap_load_error(what: str, folder: Path, exc: Exception) -> ModelError:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    low = text.lower()
    if any(s in low for s in ("safetensor", "header", "deserializ", "invalid", "incomplete",
                              "unexpected end", "metadata")):
        return ModelError(f"{what} in {folder} has a corrupt or truncated weight file "
                          f"({type(exc).__name__}: {text}); download it again")
    if "size mismatch" in low or "shape" in low:
        return ModelError(f"{what} in {folder} does not match its config (wrong architecture?): {text}")
    return ModelError(f"Cannot load {what} from {folder}: {type(exc).__name__}: {text}")


def _dtype(dtype: Any):
    import torch
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        return {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
                "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[dtype]
    return dtype


def default_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def _cached(key: tuple, build):
    from pipelines.model_manager import MANAGER
    return MANAGER.get(("diffusers", *key), build, group="diffusers")


def _load_sd(kind: str, cls_name: str, in_channels: int, source, device, dtype, tag: str = ""):
    folder = resolve(kind, source)
    device = device or default_device()
    dt = _dtype(dtype)

    def build():
        import diffusers
        cls = getattr(diffusers, cls_name)
        try:
            pipe = cls.from_pretrained(folder, local_files_only=True, dtype=dt,
                                       safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        except ModelError:
            raise
        except Exception as exc:   # noqa: BLE001 — diffusers raises many types; one message
            raise wrap_load_error(KINDS[kind].what, folder, exc) from exc
        got = int(pipe.unet.config.in_channels)
        if got != in_channels:
            hint = ("an inpainting checkpoint (e.g. stable-diffusion-inpainting)" if in_channels == 9
                    else "a base (non-inpainting) checkpoint")
            raise ModelError(f"{folder} has a U-Net with {got} input channels; {KINDS[kind].what} "
                             f"needs {in_channels} — point {KINDS[kind].env_var} at {hint}")
        pipe.set_progress_bar_config(disable=True)
        pipe._defect_studio_folder = str(folder)
        pipe_lock(pipe)
        return pipe.to(device)
    return _cached((kind, str(folder), device, str(dt), tag), build)


def load_inpaint(source=None, device: str | None = None, dtype=None, tag: str = ""):
    """StableDiffusionInpaintPipeline (9-channel U-Net) from a folder / hub id, cached.
    ``tag`` keeps a separate instance (e.g. ``"ip-adapter"``: one with IP-Adapter layers)."""
    return _load_sd("sd-inpaint", "StableDiffusionInpaintPipeline", 9, source, device, dtype, tag)


def load_base(source=None, device: str | None = None, dtype=None):
    """StableDiffusionPipeline (4-channel U-Net) from a folder / hub id, cached."""
    return _load_sd("sd-base", "StableDiffusionPipeline", 4, source, device, dtype)


def load_controlnet(kind: str = "controlnet-seg", source=None, device: str | None = None,
                    dtype=None, cross_attention_dim: int | None = None):
    """A ControlNetModel, cached. ``cross_attention_dim`` (the U-Net's) is checked when given."""
    if not kind.startswith("controlnet"):
        raise KeyError(f"{kind!r} is not a ControlNet kind")
    folder = resolve(kind, source)
    device = device or default_device()
    dt = _dtype(dtype)

    def build():
        from diffusers import ControlNetModel
        cfg_class = _config_class(folder / "config.json")
        if cfg_class and cfg_class != "ControlNetModel":
            raise ModelError(f"{folder} holds a {cfg_class}, not a ControlNetModel — point "
                             f"{KINDS[kind].env_var} at a ControlNet folder")
        try:
            net = ControlNetModel.from_pretrained(folder, local_files_only=True, dtype=dt)
        except Exception as exc:   # noqa: BLE001
            raise wrap_load_error(KINDS[kind].what, folder, exc) from exc
        return net.to(device)
    net = _cached((kind, str(folder), device, str(dt)), build)
    if cross_attention_dim is not None and int(net.config.cross_attention_dim) != int(cross_attention_dim):
        raise ModelError(f"The ControlNet in {folder} has cross_attention_dim "
                         f"{net.config.cross_attention_dim} but the U-Net has {cross_attention_dim} "
                         "— they are for different base models (use an SD 1.5 ControlNet)")
    return net


def _config_class(path: Path) -> str | None:
    import json
    try:
        return json.loads(path.read_text()).get("_class_name")
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path} is not a readable JSON config: {exc}") from exc


def ip_adapter_folder(source=None) -> Path:
    """The IP-Adapter folder (``models/ip-adapter_sd15.safetensors`` + ``models/image_encoder``)."""
    return resolve("ip-adapter", source)


def attach_ip_adapter(pipe, source=None, scale: float = 0.6) -> Path:
    """Load the SD 1.5 IP-Adapter into ``pipe`` (once per pipeline); returns its folder."""
    folder = ip_adapter_folder(source)
    if getattr(pipe, "_defect_studio_ip_adapter", None) != str(folder):
        try:
            pipe.load_ip_adapter(str(folder), subfolder=IP_ADAPTER_SUBFOLDER,
                                 weight_name=IP_ADAPTER_WEIGHT, local_files_only=True)
        except Exception as exc:   # noqa: BLE001
            raise wrap_load_error(KINDS["ip-adapter"].what, folder, exc) from exc
        pipe._defect_studio_ip_adapter = str(folder)
    pipe.set_ip_adapter_scale(scale)
    return folder


def check_safetensors(path: str | os.PathLike, what: str = "weight file") -> dict:
    """Read a safetensors file's tensors (CPU) or raise ModelError for a missing / corrupt file."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"{what} {p} does not exist")
    if p.suffix != ".safetensors":
        raise ModelError(f"{what} {p.name} must be a .safetensors file (pickles are not loaded)")
    try:
        from safetensors.torch import load_file
        return load_file(str(p), device="cpu")
    except Exception as exc:   # noqa: BLE001
        raise ModelError(f"{what} {p.name} is corrupt or not a safetensors file "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc


_lock = threading.Lock()     # guards the per-pipeline locks below


def pipe_lock(pipe) -> threading.RLock:
    """The lock that serialises calls on ``pipe`` (and pipelines sharing its modules)."""
    with _lock:
        lk = getattr(pipe, "_defect_studio_lock", None)
        if lk is None:
            lk = pipe._defect_studio_lock = threading.RLock()
        return lk


def pipe_folder(pipe) -> str:
    return str(getattr(pipe, "_defect_studio_folder", getattr(pipe, "name_or_path", "?")))
