"""An SD1.5 checkpoint loaded with ComfyUI's own loaders, as the training loop needs it: the UNet, and functions that
encode images and captions the way the pack's nodes do (ComfyUI must be importable; see __main__.boot)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn


@dataclass
class TrainingModels:
    unet: nn.Module  # ComfyUI's SD1.5 UNet (ldm layout), float32 on `device`, owned by the caller
    encode_image: Callable[[torch.Tensor], torch.Tensor]  # [B, H, W, 3] in [0, 1] -> latents x 0.18215 [B, 4, h, w]
    encode_text: Callable[[str], torch.Tensor]  # caption -> CLIP text embedding [1, 77, 768] (cached)
    decode: Callable[[torch.Tensor], torch.Tensor]  # scaled latents -> [B, 3, H, W] in [0, 1], differentiable
    device: torch.device


def load_sd15(path: str, device: Optional[torch.device] = None) -> TrainingModels:
    """Load `path` (an SD1.5-family .safetensors) with comfy.sd and wrap its VAE and CLIP for training.

    Latents are "process_latent_in"-scaled (x 0.18215 for SD1.5, what the UNet sees), as the trainer expects; the
    pack's Encode Garments applies the same scaling to the raw VAE latents it gets. The UNet is a fresh copy of the
    file's weights, not a MODEL ComfyUI is using, so training it has no side effects on a running graph."""
    import comfy.model_management as mm
    import comfy.sd

    device = torch.device(device) if device is not None else mm.get_torch_device()
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=True)
    unet = model.model.diffusion_model.to(device).float()
    latent_format = model.model

    def encode_image(pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return latent_format.process_latent_in(vae.encode(pixels)).to(device)

    cache: dict[str, torch.Tensor] = {}

    def encode_text(caption: str) -> torch.Tensor:
        if caption not in cache:
            with torch.no_grad():
                cache[caption] = clip.encode_from_tokens(clip.tokenize(caption)).float().to(device)
        return cache[caption]

    decoder = vae.first_stage_model.to(device).float().requires_grad_(False)  # frozen; gradients flow through it

    def decode(z: torch.Tensor) -> torch.Tensor:
        return ((decoder.decode(latent_format.process_latent_out(z).float()) + 1) / 2).clamp(0, 1)

    return TrainingModels(unet=unet, encode_image=encode_image, encode_text=encode_text, decode=decode, device=device)
