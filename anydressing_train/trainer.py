"""The trainable parts of AnyDressing around a frozen SD1.5 UNet (paper §4, §5.1).

Trained: per-slot LoRA on GarmentsNet's self-attention q/k/v (the Garment-Specific Feature Extractor) and the
Dressing-Attention projections W_k'/W_v' (initialised from W_k/W_v); optionally the whole GarmentsNet (a copy of the
UNet). Frozen: the denoising UNet (DressingNet) and, by default, GarmentsNet's base weights (the same UNet, as in the
pack's training-free mode). The forward pass uses the pack's own hooks and attention code, so a trained file gives
the node pack the same features as training did.

The UNet passed in is never changed: the trainer works on its own copy (requires_grad, device, dtype and
checkpointing hooks apply to the copy), unless copy_unet=False hands it over (the command line does, since it loaded
the checkpoint itself).
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from anydressing_core.attention import sdpa_attention
from anydressing_core.branch import DressingBranch, DressingLayer
from anydressing_core.run_state import PROBE_KEY, AttentionProbe
from anydressing_core.encoder import (TAP_OUTPUT, GarmentEncodeHooks, check_tap,
                                      zero_cross_attention_output, zero_cross_attention_replace)
from anydressing_core.hooks import install as install_garment_term
from anydressing_core.layers import LayerKey, param_name, path_from_key, self_attention_blocks
from anydressing_core.lora import LoRA
from anydressing_core.masks import resize_to_grid
from anydressing_core.native_format import write_native

SelfAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, dict], torch.Tensor]

# How L_loc reduces (A_k - M_k)^2 within one layer of h x w pixels (then: mean over garments, mean over layers):
#   "sum"          eq. 9's squared L2 norm, a sum over the layer's pixels: every query of every layer counts once, so
#                  a layer weighs in proportion to its pixel count (the 96 x 72 layers of a 768 x 576 image 64 times
#                  the 12 x 9 middle one), and L_loc grows with the image's pixel count while the diffusion loss (a
#                  mean) does not: lambda1 = 0.01 is the paper's balance at its 768 x 576 only.
#   "paper_scale"  the same sum as if the image were 768 x 576: each layer's per-pixel mean times the pixel count that
#                  layer has at 768 x 576 (6912 / f^2 at latent downsampling f). Equal to "sum" at 768 x 576; at any
#                  other size lambda1 = 0.01 keeps the paper's balance and the same layer weights as "sum".
#   "mean"         a per-pixel mean (every layer weighs the same; the reduction before issue 13, 1/6912 of "sum" on
#                  the finest layers at 768 x 576, so lambda1 = 0.01 did nothing).
LOC_REDUCTIONS = ("sum", "paper_scale", "mean")
PAPER_LATENT_PIXELS = (768 // 8) * (576 // 8)  # 6912


def layer_loc_term(sq: torch.Tensor, grid: tuple[int, int], latent_hw: tuple[int, int], reduction: str
                   ) -> torch.Tensor:
    """One layer's L_loc from the squared errors sq [..., h*w]: [...] (garments and rows left to average)."""
    if reduction == "sum":
        return sq.sum(-1)
    if reduction == "mean":
        return sq.mean(-1)
    f2 = (latent_hw[0] * latent_hw[1]) / float(grid[0] * grid[1])  # (latent downsampling)^2 of this layer
    return sq.mean(-1) * (PAPER_LATENT_PIXELS / f2)


def probed_layers(probe: AttentionProbe, masks: torch.Tensor):
    """(A_k [N, rows, h*w], M_k resized to that layer's grid [N, h*w], (h, w)) for every recorded branch and layer;
    each grid's masks are resized once (several layers share a grid)."""
    resized: dict[tuple[int, int], torch.Tensor] = {}
    for branch in probe.order:
        for mass, grid in probe.maps[branch].values():
            if grid not in resized:
                resized[grid] = resize_to_grid(masks, *grid)
            yield mass, resized[grid].to(mass.device), grid


def localization_loss(probe: AttentionProbe, masks: torch.Tensor, latent_hw: tuple[int, int], reduction: str
                      ) -> Optional[torch.Tensor]:
    """L_loc (eq. 7-9): per layer ||A_k - M_k||^2 as `reduction` says, the mean over garments (and rows), then the
    (1/m) sum over the m Dressing-Attention layers of section 4.4. None when no layer was recorded."""
    terms = [layer_loc_term((mass.float() - target.unsqueeze(1)) ** 2, grid, latent_hw, reduction).mean()
             for mass, target, grid in probed_layers(probe, masks)]
    return torch.stack(terms).mean() if terms else None


def ddpm_alphas_cumprod(steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """SD1.5's scaled-linear schedule."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


def checkpointed_blocks(unet: nn.Module) -> list[nn.Module]:
    """The UNet's residual and transformer blocks: the units whose activations gradient checkpointing recomputes."""
    return [m for m in unet.modules()
            if (hasattr(m, "attn1") and hasattr(m, "norm1")) or
            (hasattr(m, "in_layers") and hasattr(m, "out_layers") and hasattr(m, "emb_layers"))]


class DressingTrainer(nn.Module):
    """The trainable AnyDressing parts around a frozen UNet. Calling it returns the losses of one sample, so that a
    DistributedDataParallel wrapper (accelerate) sees a forward() and synchronises the gradients."""

    def __init__(self, unet: nn.Module, slots: list[str], rank: int = 8, alpha: float = 8.0,
                 self_attention: Optional[SelfAttention] = None, strength: float = 1.0,
                 finetune_garments_net: bool = False, gradient_checkpointing: bool = False,
                 feature_tap: str = TAP_OUTPUT, loc_reduction: str = "sum", copy_unet: bool = True):
        super().__init__()
        if loc_reduction not in LOC_REDUCTIONS:
            raise ValueError(f"loc_reduction must be one of {', '.join(LOC_REDUCTIONS)}, not {loc_reduction!r}")
        if not strength > 0:
            raise ValueError(f"strength (the Dressing-Attention lambda trained at) must be > 0, not {strength}")
        self.feature_tap = check_tap(feature_tap)
        self.loc_reduction = loc_reduction
        # a private copy: the caller's UNet (e.g. ComfyUI's loaded MODEL) keeps its flags, device and hooks
        self.unet = (copy.deepcopy(unet) if copy_unet else unet).requires_grad_(False)
        # paper §5.1 may mean the whole GarmentsNet is trained: then it is a float32 copy of the UNet, trained too
        self.garments_net = copy.deepcopy(unet).float().requires_grad_(True) if finetune_garments_net else None
        self.slots = list(slots)
        self.rank, self.alpha, self.strength = rank, float(alpha), strength
        self.blocks = self_attention_blocks(self.unet)
        if not self.blocks:
            raise ValueError("the UNet has no self-attention transformer blocks")
        # under the attn1-input tap a layer's q/k/v LoRA only reaches the layers after it: the last layer's would
        # never get a gradient, so it is not made (nor saved); under F^new every layer's LoRA shapes its own feature
        self.lora_layers = list(self.blocks) if self.feature_tap == TAP_OUTPUT else list(self.blocks)[:-1]
        self.self_attention = self_attention or _sdpa_self_attention
        self.lora = nn.ParameterDict()
        self.w_k = nn.ParameterDict()
        self.w_v = nn.ParameterDict()
        g = torch.Generator().manual_seed(0)
        for key, block in self.blocks.items():
            c = block.attn1.to_k.in_features
            name = param_name(key)
            self.w_k[name] = nn.Parameter(block.attn1.to_k.weight.detach().clone().float())
            self.w_v[name] = nn.Parameter(block.attn1.to_v.weight.detach().clone().float())
            if key not in self.lora_layers:
                continue
            for slot in self.slots:
                for proj in "qkv":
                    # LoRA init: down random, up zero, so training starts from the base GarmentsNet
                    self.lora[f"{slot}__{name}__{proj}__down"] = nn.Parameter(
                        torch.randn(rank, c, generator=g) / math.sqrt(c))
                    self.lora[f"{slot}__{name}__{proj}__up"] = nn.Parameter(torch.zeros(c, rank))
        self.register_buffer("alphas_cumprod", ddpm_alphas_cumprod(), persistent=False)
        if self.garments_net is not None:
            self._freeze_unreachable_garments_net()
        if gradient_checkpointing:
            self.enable_gradient_checkpointing()

    def _freeze_unreachable_garments_net(self) -> None:
        """A fine-tuned GarmentsNet's weights past the last feature tap (the last block's tail, the output conv) can
        never get a gradient: found by one small backward pass, they are frozen so the optimizer and DDP skip them.
        They are still saved, since the loader needs a whole UNet."""
        net = self.garments_net
        latents = torch.randn(1, int(getattr(net, "in_channels", 4)), 8, 8, generator=torch.Generator().manual_seed(0))
        feats = self.encode(latents.to(next(net.parameters()).device), self.slots[:1])
        sum(f.float().square().mean() for f in feats.values()).backward()
        for p in net.parameters():
            if p.grad is None:
                p.requires_grad_(False)
        self.zero_grad(set_to_none=True)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each residual and transformer block's activations in the backward pass instead of keeping them
        (PyTorch's hook-based activation checkpointing; the modules' code and parameter names are unchanged)."""
        from torch.distributed._composable import checkpoint

        for net in filter(None, (self.unet, self.garments_net)):
            for block in checkpointed_blocks(net):
                # the recomputation must see the layer's own transformer_options (its "block" and "block_index"),
                # not the values the shared dict holds by the time backward runs: snapshot them first
                block.register_forward_pre_hook(_snapshot_transformer_options, with_kwargs=True)
                checkpoint(block)

    def slot_loras(self) -> dict:
        out: dict = {}
        scale = self.alpha / self.rank
        for key in self.lora_layers:
            name = param_name(key)
            for slot in self.slots:
                out.setdefault(slot, {})[key] = {
                    proj: LoRA(self.lora[f"{slot}__{name}__{proj}__down"], self.lora[f"{slot}__{name}__{proj}__up"],
                               scale) for proj in "qkv"}
        return out

    def encode(self, garment_latents: torch.Tensor, row_slots: list[str]) -> dict[LayerKey, torch.Tensor]:
        """GarmentsNet at t = 0, cross-attention removed, each row through its slot's LoRA: [N, S, C] per layer."""
        n = garment_latents.shape[0]
        hooks = GarmentEncodeHooks(row_slots, self.slot_loras(), self.self_attention, tap=self.feature_tap)
        to = {"patches": {"attn1_patch": [hooks.capture], "attn2_output_patch": [zero_cross_attention_output]},
              "patches_replace": {"attn1": {k: hooks.gfe_replace for k in self.blocks},
                                  "attn2": {k: zero_cross_attention_replace for k in self.blocks}}}
        net = self.garments_net if self.garments_net is not None else self.unet
        garment_latents = garment_latents.to(_dtype_of(net))  # ComfyUI's UNet runs in its weights' dtype
        context = garment_latents.new_zeros((n, 1, self.context_dim))
        net(garment_latents, timesteps=torch.zeros(n, device=garment_latents.device), context=context,
                  transformer_options=to)
        return {k: hooks.captured[k] for k in self.blocks}

    @property
    def context_dim(self) -> int:
        block = next(iter(self.blocks.values()))
        return int(block.attn2.to_k.in_features)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor, features: dict,
                masks: Optional[torch.Tensor] = None, probe: Optional[AttentionProbe] = None) -> torch.Tensor:
        """DressingNet's noise prediction with the garments (one garment set for the batch)."""
        layers = {}
        for key, f in features.items():
            nk, s, c = f.shape
            name = param_name(key)
            layers[key] = DressingLayer(features=f.reshape(1, nk * s, c), segments=[(i * s, (i + 1) * s)
                                                                                    for i in range(nk)],
                                        key_proj=self.w_k[name], value_proj=self.w_v[name])
        branch = DressingBranch(layers, strength=self.strength, masks=masks, attention=sdpa_attention)
        to: dict = {}
        install_garment_term(to, branch, {k: self.blocks[k] for k in layers})  # the pack's own hooks, as at inference
        if probe is not None:
            to[PROBE_KEY] = probe
        dtype = _dtype_of(self.unet)
        return self.unet(x_t.to(dtype), timesteps=t, context=context.to(dtype), transformer_options=to)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod.to(x0.device)[t].view(-1, 1, 1, 1)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def forward(self, x0: torch.Tensor, context: torch.Tensor, garment_latents: torch.Tensor, row_slots: list[str],
                person_masks: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, texture: Optional[dict] = None
                ) -> dict[str, torch.Tensor]:
        """The losses of one sample: the diffusion loss, the instance-level localization loss (eq. 7-9) and, when
        `texture` is given ({"decode", "net", "image", "max_t"}) and t <= max_t, the texture loss (eq. 10-13)."""
        features = self.encode(garment_latents, row_slots)
        probe = AttentionProbe(keep_grad=True)
        x_t = self.add_noise(x0, noise, t)
        eps = self.denoise(x_t, t.float(), context, features, probe=probe)
        out = {"diffusion": F.mse_loss(eps.float(), noise.float())}
        loc = localization_loss(probe, person_masks, tuple(x0.shape[-2:]), self.loc_reduction)
        out["localization"] = loc if loc is not None else x0.new_zeros(())
        out["texture"] = x0.new_zeros(())
        if texture is not None and int(t.max()) <= texture.get("max_t", 350):
            from .texture import texture_loss

            a = self.alphas_cumprod.to(x0.device)[t].view(-1, 1, 1, 1)
            parts = texture_loss(texture["decode"], x_t, eps.float(), a, texture["image"], person_masks,
                                 texture.get("net"))
            out["texture"] = sum(parts.values())
        return out

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a training checkpoint keeps: everything but the frozen UNet."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("unet.")}

    def save(self, path: str, metadata: dict) -> None:
        loras = {}
        scale_alpha = self.alpha
        for slot in self.slots:
            for key in self.lora_layers:
                name = param_name(key)
                loras.setdefault(slot, {})[path_from_key(key)] = {
                    proj: (self.lora[f"{slot}__{name}__{proj}__down"].detach().cpu().float(),
                           self.lora[f"{slot}__{name}__{proj}__up"].detach().cpu().float(), scale_alpha)
                    for proj in "qkv"}
        dressing = {path_from_key(k): (self.w_k[param_name(k)].detach().cpu().float(),
                                       self.w_v[param_name(k)].detach().cpu().float()) for k in self.blocks}
        meta = {"lora_rank": str(self.rank), "lora_alpha": str(self.alpha),
                "garments_net": "fine-tuned" if self.garments_net is not None else "base",
                "feature_tap": self.feature_tap, "strength": repr(float(self.strength)),
                "loc_reduction": self.loc_reduction}
        meta.update({k: str(v) for k, v in metadata.items()})
        unet = None
        if self.garments_net is not None:  # group (a), ldm naming; the loader uses it instead of the MODEL's UNet
            unet = {k: v.detach().cpu().float() for k, v in self.garments_net.state_dict().items()}
        write_native(path, unet=unet, loras=loras, dressing=dressing, extra_metadata=meta)


def _sdpa_self_attention(q, k, v, extra):
    return sdpa_attention(q, k, v, extra.get("n_heads"))


def _dtype_of(net: nn.Module) -> torch.dtype:
    return next(net.parameters()).dtype


def _snapshot_transformer_options(module: nn.Module, args: tuple, kwargs: dict):
    if isinstance(kwargs.get("transformer_options"), dict):
        return args, {**kwargs, "transformer_options": dict(kwargs["transformer_options"])}
    if len(args) >= 3 and isinstance(args[2], dict):
        return (*args[:2], dict(args[2]), *args[3:]), kwargs
    return None
