"""Tiny random-init diffusion components for offline tests and CPU benchmarks.

Same architectures as SD 1.5 (9-channel inpainting U-Net, 4-channel base U-Net, an 8×
downsampling VAE, ControlNet, CLIP text encoder + BPE tokenizer) but a few hundred thousand
parameters each, built from configs as diffusers' own tests do (``get_dummy_components``) and
written with ``save_pretrained`` so the code under test loads them from a local folder exactly
as it would load a real checkpoint. ``cross_attention_dim`` is 32, not 768, so nothing can rely on
SD's width. Nothing is downloaded.

    build_model_dir(root) -> dict of folder paths: sd-inpaint, sd-base, controlnet-seg,
                             controlnet-canny, lora, lora-other
"""
from __future__ import annotations

import json
import string
from pathlib import Path

CROSS_DIM = 32
SAMPLE_SIZE = 32          # latent size → 256 px default resolution with the 8× VAE


def _unet(in_channels: int, block_out_channels=(32, 64), cross_dim: int = CROSS_DIM, seed: int = 0):
    import torch
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=tuple(block_out_channels), layers_per_block=1, sample_size=SAMPLE_SIZE,
        in_channels=in_channels, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_dim, attention_head_dim=(2, 4), norm_num_groups=16)


def _vae(seed: int = 0):
    """4 blocks → 8× downsampling like SD's VAE (FIELD-NOTES: the 2-block test VAE is ~40× slower)."""
    import torch
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(16, 16, 32, 32), in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4, layers_per_block=1, norm_num_groups=8, sample_size=256)


def _controlnet(seed: int = 0):
    import torch
    from diffusers import ControlNetModel
    torch.manual_seed(seed)
    net = ControlNetModel(
        block_out_channels=(32, 64), layers_per_block=1, in_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), cross_attention_dim=CROSS_DIM,
        attention_head_dim=(2, 4), norm_num_groups=16,
        conditioning_embedding_out_channels=(8, 16, 16, 32))   # 3 stride-2 convs = the VAE's 8×
    with torch.no_grad():   # ControlNet's zero convs start at 0 (no effect): make them bite
        for n, p in net.named_parameters():
            if n.startswith(("controlnet_down_blocks", "controlnet_mid_block",
                             "controlnet_cond_embedding.conv_out")):
                p.normal_(0.0, 0.1)
    return net


def _scheduler():
    from diffusers import DDIMScheduler
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def write_tokenizer(folder: Path) -> None:
    """A tiny character-level CLIP BPE tokenizer (vocab.json + merges.txt) written locally."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = string.ascii_lowercase + string.digits + "-_.,'!?"
    tokens = ["<|startoftext|>", "<|endoftext|>"] + list(chars) + [c + "</w>" for c in chars]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
         "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"model_max_length": 16, "tokenizer_class": "CLIPTokenizer", "bos_token": "<|startoftext|>",
         "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))


def _text_encoder(seed: int = 0):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=CROSS_DIM, intermediate_size=37,
        layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=2, vocab_size=100,
        max_position_embeddings=16, projection_dim=CROSS_DIM))


def _lora_file(unet, folder: Path) -> Path:
    from diffusers import StableDiffusionInpaintPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    import torch
    torch.manual_seed(1)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    with torch.no_grad():          # peft starts lora_B at zero (a no-op adapter): make it bite
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.5)
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionInpaintPipeline.save_lora_weights(folder, unet_lora_layers=state,
                                                     safe_serialization=True)
    return folder / "pytorch_lora_weights.safetensors"


def build_model_dir(root: Path | str) -> dict[str, Path]:
    """Write every tiny model under ``root``; returns name → folder / file."""
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline
    from transformers import CLIPTokenizer
    root = Path(root)
    tok_dir = root / "_tokenizer"
    write_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    out: dict[str, Path] = {}
    common = dict(vae=_vae(), text_encoder=_text_encoder(), tokenizer=tokenizer,
                  scheduler=_scheduler(), safety_checker=None, feature_extractor=None,
                  requires_safety_checker=False)
    StableDiffusionInpaintPipeline(unet=_unet(9), **common).save_pretrained(root / "sd-inpaint")
    StableDiffusionPipeline(unet=_unet(4, seed=1), **common).save_pretrained(root / "sd-base")
    out["sd-inpaint"], out["sd-base"] = root / "sd-inpaint", root / "sd-base"
    _controlnet(0).save_pretrained(root / "controlnet-seg")
    _controlnet(1).save_pretrained(root / "controlnet-canny")
    out["controlnet-seg"], out["controlnet-canny"] = root / "controlnet-seg", root / "controlnet-canny"
    out["lora"] = _lora_file(_unet(9), root / "lora")
    out["lora-other"] = _lora_file(_unet(9, block_out_channels=(16, 32), cross_dim=24),
                                   root / "lora-other")
    return out
