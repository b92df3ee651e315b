"""Garment Attention Maps: where each garment went, the paper's A_k from one evaluation of the dressed MODEL, as
masks and overlays."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

import comfy.sample
import comfy.samplers
from comfy_api.latest import io

from ..anydressing_core.run_state import PROBE_KEY, AttentionProbe
from . import glue, io_types

NODE = "Garment Attention Maps"
PALETTE = ((0.94, 0.33, 0.31), (0.26, 0.65, 0.96), (0.40, 0.73, 0.42), (1.0, 0.76, 0.03), (0.67, 0.28, 0.74),
           (0.0, 0.74, 0.83), (1.0, 0.44, 0.26), (0.55, 0.43, 0.39))


def aggregate(probe: AttentionProbe, batch_index: int, height: int, width: int) -> torch.Tensor:
    """Average each branch's A_k over its layers, upsampled to height x width -> [N_total, height, width]."""
    out = []
    for branch in probe.order:
        layers = probe.maps[branch]
        total, count = None, 0
        for mass, (h, w) in layers.values():
            row = min(batch_index, mass.shape[1] - 1)
            m = mass[:, row].reshape(-1, 1, h, w)
            up = F.interpolate(m, size=(height, width), mode="bilinear", align_corners=False).squeeze(1)
            total = up if total is None else total + up
            count += 1
        out.append(total / count)
    return torch.cat(out, dim=0).clamp(0.0, 1.0)


def overlays(maps: torch.Tensor, image: Optional[torch.Tensor]) -> torch.Tensor:
    """One IMAGE per garment: its map tinted over `image` (or over black)."""
    n, h, w = maps.shape
    if image is not None:
        base = F.interpolate(image[:1].permute(0, 3, 1, 2).float(), size=(h, w), mode="bilinear",
                             align_corners=False).permute(0, 2, 3, 1)[0].clamp(0, 1)
    else:
        base = torch.zeros(h, w, 3)
    result = []
    for k in range(n):
        color = torch.tensor(PALETTE[k % len(PALETTE)])
        alpha = (0.75 * maps[k]).unsqueeze(-1)
        result.append(base * (1 - alpha) + color * alpha)
    return torch.stack(result, dim=0)


def attention_maps(model: Any, positive: Any, latent: dict, at_percent: float, seed: int, batch_index: int,
                   image: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    if glue.garment_term(model) is None:
        raise glue.NodeError(NODE, "the MODEL has no Dressing-Attention: connect the MODEL output of Apply "
                                   "Dressing-Attention")
    branches = glue.garment_term(model).branches
    modes = {b.mode for b in branches}
    if modes == {"concat"}:
        raise glue.NodeError(NODE, "maps need garment attention of its own (Dressing-Attention); MagicClothing's "
                                   "concat files mix garment tokens into self-attention, which this node does not "
                                   "map")
    samples = latent["samples"]
    m = model.clone()
    probe = AttentionProbe(on_record=glue.progress_bar(sum(len(b.layers) for b in branches if b.mode != "concat")))
    m.model_options.setdefault("transformer_options", {})[PROBE_KEY] = probe
    model_sampling = m.get_model_object("model_sampling")
    sigma = min(glue.percent_to_sigma(m, at_percent), float(model_sampling.sigma_max))
    sigma = max(sigma, float(model_sampling.sigma_min))
    sigmas = torch.tensor([sigma, 0.0])
    noise = comfy.sample.prepare_noise(samples, seed)
    sampler = comfy.samplers.sampler_object("euler")
    # One evaluation of the cond rows (cfg 1 skips the uncond rows), through ComfyUI's own sampling path.
    comfy.sample.sample_custom(m, noise, 1.0, sampler, sigmas, positive, positive, samples, disable_pbar=True,
                               seed=seed)
    if not probe.order:
        raise glue.NodeError(NODE, "no garment attention was recorded: the garments are switched off at this point "
                                   "(strength 0, all-zero masks, or at_percent outside start/end percent)")
    height, width = samples.shape[-2] * 8, samples.shape[-1] * 8
    maps = aggregate(probe, batch_index, height, width)
    return overlays(maps, image), maps


class GarmentAttentionMaps(io.ComfyNode):
    """The node: the dressed MODEL, a conditioning and a latent in, one map and one overlay per garment out."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AnyDressingGarmentAttentionMaps",
            display_name=NODE,
            category=io_types.CATEGORY,
            description="Shows where each garment went: runs the dressed MODEL once at a chosen point of the schedule "
                        "and returns, per garment, how much attention each pixel gives to that garment's tokens (the "
                        "paper's A_k, averaged over heads and the 16 layers), as overlays and as a MASK batch.",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL output of Apply Dressing-Attention."),
                io.Conditioning.Input("positive", tooltip="The positive conditioning you sample with."),
                io.Latent.Input("latent", tooltip="A latent to look at, e.g. KSampler's output."),
                io.Float.Input("at_percent", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Point of the schedule to evaluate (0 = pure noise, 1 = the end)."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff,
                             tooltip="Seed of the noise added to reach that point."),
                io.Int.Input("batch_index", default=0, min=0, max=4096,
                             tooltip="Which image of the latent batch to show."),
                io.Image.Input("image", optional=True,
                               tooltip="Optional image to draw the maps on (e.g. the decoded result)."),
            ],
            outputs=[
                io.Image.Output(display_name="overlays",
                                tooltip="One image per garment: its attention map tinted over `image`."),
                io.Mask.Output(display_name="maps", tooltip="One map per garment, values in [0, 1]; without masks "
                                                            "they sum to 1 at every pixel."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, latent, at_percent, seed, batch_index, image=None) -> io.NodeOutput:
        return io.NodeOutput(*attention_maps(model, positive, latent, at_percent, seed, batch_index, image))
