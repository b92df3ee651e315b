"""Tiny models with random weights in the real SD1.5 layouts (test-only; ComfyUI detects SD1.5 only at full width)."""

from __future__ import annotations

import math

import torch

# shared with the tests (same module object through sys.modules)
STORE: dict = {}
CALLS: dict = {"foreign_attn1": 0}

SD15_TOPOLOGY = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
    "context_dim": 768, "use_temporal_resblock": False, "use_temporal_attention": False, "num_heads": 8,
    "num_head_channels": -1,
}


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Deterministic random weights (ComfyUI's ops skip initialisation, so memory would be garbage otherwise)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            if p.dim() >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def tiny_unet_config(model_channels: int = 32, num_heads: int = 8) -> dict:
    """SD1.5's topology at another width (and, for the training bench, another head count: SD1.5's 8 heads leave a
    32-channel toy 4 channels per head, where SD1.5 has 40)."""
    cfg = dict(SD15_TOPOLOGY)
    cfg["model_channels"] = model_channels
    cfg["num_heads"] = num_heads
    return cfg


def tiny_unet_state_dict(seed: int = 0, model_channels: int = 32, num_heads: int = 8) -> dict[str, torch.Tensor]:
    """ldm-named UNet weights (the keys a ComfyUI checkpoint has under model.diffusion_model.)."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    import comfy.ops

    cfg = {k: v for k, v in tiny_unet_config(model_channels, num_heads).items()}
    unet = UNetModel(**cfg, operations=comfy.ops.disable_weight_init)
    randomize(unet, seed)
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


def tiny_model_patcher(seed: int = 0, model_channels: int = 32, weight_dtype: torch.dtype = torch.float32,
                       num_heads: int = 8):
    """A MODEL like ComfyUI's loaders return; weights stored in weight_dtype, computed in fp32 (manual cast) on CPU."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    cfg = comfy.supported_models.SD15(tiny_unet_config(model_channels, num_heads))
    cfg.unet_config["num_heads"] = num_heads  # SD15's own config would set 8 again
    cfg.set_inference_dtype(weight_dtype, None if weight_dtype == torch.float32 else torch.float32)
    model = cfg.get_model({}, "")
    sd = tiny_unet_state_dict(seed, model_channels, num_heads)
    model.diffusion_model.load_state_dict({k: v.to(weight_dtype) for k, v in sd.items()})
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def tiny_vae(seed: int = 0):
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    ae = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    randomize(ae, seed)
    sd = {k: v.detach().clone() for k, v in ae.state_dict().items()}
    return comfy.sd.VAE(sd=sd, config={"params": {"ddconfig": ddconfig, "embed_dim": 4}})


def garment_image(seed: int, width: int, height: int) -> torch.Tensor:
    """A smooth random pattern [1, H, W, 3] in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand((1, 3, max(2, height // 16), max(2, width // 16)), generator=g)
    img = torch.nn.functional.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)
    return img.permute(0, 2, 3, 1).contiguous()


_CLIP = {}


def random_clip():
    """ComfyUI's own SD1 CLIP-L text encoder and tokenizer with random weights (built once per process)."""
    if "clip" not in _CLIP:
        import comfy.sd
        import comfy.sd1_clip

        class Target:
            clip = comfy.sd1_clip.SD1ClipModel
            tokenizer = comfy.sd1_clip.SD1Tokenizer
            params: dict = {}

        clip = comfy.sd.CLIP(target=Target())
        randomize(clip.cond_stage_model, 3)
        _CLIP["clip"] = clip
    return _CLIP["clip"]
