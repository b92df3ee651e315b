"""Apply Dressing-Attention: a clone of the MODEL whose self-attention layers add the garments (paper eq. 6)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from comfy_api.latest import io

from ..anydressing_core.branch import DressingBranch, DressingLayer
from ..anydressing_core.features import GarmentFeatures
from ..anydressing_core.formats import TRAINING_FREE_STRENGTH
from ..anydressing_core.layers import format_key
from . import glue, io_types
from .garment_masks import GarmentMasks

NODE = "Apply Dressing-Attention"


def parse_weights(text: str, count: int) -> Optional[list[float]]:
    """'' -> None (all 1); '1, 0.5' -> per-garment weights. The count must match the garments."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        values = [float(t) for t in text.replace(";", ",").split(",") if t.strip()]
    except ValueError:
        raise glue.NodeError(NODE, f"garment_weights {text!r} is not a comma-separated list of numbers, "
                                   f"e.g. '1.0, 0.8'") from None
    if len(values) != count:
        raise glue.NodeError(NODE, f"garment_weights has {len(values)} value(s) for {count} garment(s); give one "
                                   f"weight per garment in Encode Garments order, or leave it empty for all 1.0")
    if any(not torch.isfinite(torch.tensor(v)) or v < 0 for v in values):
        raise glue.NodeError(NODE, f"garment_weights must be finite and >= 0; got {values}")
    return values


def build_layers(features: GarmentFeatures, blocks: dict) -> dict:
    """Match the features' layers to the MODEL's self-attention layers; refuse another model family."""
    model_ch = glue.layer_channels(blocks)
    feat_ch = features.channels()
    mismatched = [k for k in model_ch if k in feat_ch and feat_ch[k] != model_ch[k]]
    missing = [k for k in model_ch if k not in feat_ch]
    if mismatched or missing or not feat_ch:
        raise glue.NodeError(NODE, f"GARMENT_FEATURES from {features.source or 'Encode Garments'} do not fit this "
                                   f"MODEL (features: {glue.describe_channels(feat_ch)}; MODEL self-attention: "
                                   f"{glue.describe_channels(model_ch)}): they were made for another model family. "
                                   f"Encode the garments with a GarmentsNet of the same family as the MODEL")
    layers = {}
    for key, block in blocks.items():
        if features.weighted_layers_only and key not in features.dressing_weights:
            continue  # e.g. DreamFit: garments enter the mid and output blocks only
        wk, wv = features.dressing_weights.get(key, (None, None))
        c = model_ch[key]
        for name, w in (("W_k'", wk), ("W_v'", wv)):
            if w is not None and tuple(w.shape) != (c, c):
                raise glue.NodeError(NODE, f"{features.source}: Dressing-Attention {name} of layer {format_key(key)} "
                                           f"is {tuple(w.shape)}, the MODEL layer needs ({c}, {c})")
        # Absent W_k'/W_v': the paper's initialisation, the MODEL's own to_k/to_v as loaded for sampling (LoRA included)
        layers[key] = DressingLayer(features=features.layers[key], segments=features.segments[key],
                                    key_proj=wk if wk is not None else block.attn1.to_k,
                                    value_proj=wv if wv is not None else block.attn1.to_v)
    return layers


def resolve_strength(strength: Optional[float], features: GarmentFeatures) -> float:
    """A negative (or missing) strength is auto: the lambda the garment model is meant for (GarmentFeatures.strength,
    from the GarmentsNet file); 0 and up are used as given."""
    if strength is None or strength < 0:
        value = float(getattr(features, "strength", TRAINING_FREE_STRENGTH))
        glue.info(f"{NODE}: strength auto = {value:g} for {features.source or 'these garments'}")
        return value
    return float(strength)


def apply(model: Any, features: GarmentFeatures, strength: float, weights_text: str, start_percent: float,
          end_percent: float, include_uncond, masks: Optional[torch.Tensor]) -> Any:
    if not isinstance(features, GarmentFeatures):
        raise glue.NodeError(NODE, "garment_features must come from an Encode Garments node")
    if start_percent > end_percent:
        raise glue.NodeError(NODE, f"start_percent ({start_percent}) is after end_percent ({end_percent}); "
                                   f"set start_percent <= end_percent")
    weights = parse_weights(weights_text, features.count)
    strength = resolve_strength(strength, features)
    if include_uncond in ("auto", None):  # the model's authors' choice: off (paper eq. 16) except DreamFit
        include_uncond = getattr(features, "uncond_default", False)
    elif isinstance(include_uncond, str):
        include_uncond = include_uncond == "yes"
    if masks is not None and masks.shape[0] != features.count:
        raise glue.NodeError(NODE, f"garment_masks has {masks.shape[0]} mask(s) for {features.count} garment(s) "
                                   f"({', '.join(features.slots)}); give one mask per garment, in order")
    m = model.clone()
    blocks = glue.self_attention_layers(m.model.diffusion_model)
    layers = build_layers(features, blocks)
    mode = getattr(features, "injection", "dressing")
    try:
        branch = DressingBranch(layers, strength=strength, weights=weights, masks=masks,
                                sigma_start=glue.percent_to_sigma(m, start_percent),
                                sigma_end=glue.percent_to_sigma(m, end_percent),
                                include_uncond=include_uncond, attention=glue.garment_attention_fn, mode=mode)
    except ValueError as e:
        raise glue.NodeError(NODE, f"{features.source}: {e}; disconnect garment_masks and clear garment_weights") from None
    glue.install_branch(m, branch, {k: blocks[k] for k in layers})
    return m


AUTO_STRENGTH = -1.0  # a negative strength means auto; a FLOAT sentinel keeps old saved workflows' values valid


class ApplyDressingAttention(io.ComfyNode):
    """The node: MODEL and GARMENT_FEATURES in, the dressed MODEL out."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AnyDressingApplyDressingAttention",
            display_name=NODE,
            category=io_types.CATEGORY,
            description="Patches a copy of the MODEL so every self-attention layer becomes Dressing-Attention: "
                        "O = SelfAttn(Q,K,V) + strength * Attn(Q, F W_k', F W_v') over all garments' tokens (one "
                        "softmax, paper eq. 6). The input MODEL is not changed; chain several to add independent "
                        "garment sets.",
            inputs=[
                io.Model.Input("model", tooltip="Your SD1.5-family MODEL (DressingNet). It is cloned, never changed."),
                io_types.GarmentFeatures.Input("garment_features", tooltip="From Encode Garments."),
                io.Float.Input("strength", default=AUTO_STRENGTH, min=AUTO_STRENGTH, max=3.0, step=0.05,
                               display_name="strength (-1 = auto)",
                               tooltip="lambda: how strongly garments enter self-attention. -1 (any negative value) "
                                       "= auto: the strength the garment model is meant for (a trained AnyDressing "
                                       "file's recorded value; 1.0 for MagicClothing, IMAGDressing and DreamFit "
                                       "files; 0.7, the paper's, for training-free). 0 leaves the MODEL unchanged."),
                io.String.Input("garment_weights", default="", multiline=False,
                                tooltip="Optional weight per garment, comma-separated in Encode Garments order "
                                        "(e.g. '1.0, 0.6'). Empty: all 1.0."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Where in the sampling schedule dressing starts (0 = first step)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Where in the sampling schedule dressing ends (1 = last step)."),
                io.Combo.Input("apply_to_uncond", options=["auto", "no", "yes"], default="auto",
                               tooltip="Whether the unconditional (negative) half sees the garments too. auto: what "
                                       "the garment model's authors did (no for AnyDressing, paper eq. 16, "
                                       "IMAGDressing and MagicClothing; yes for DreamFit)."),
                io_types.GarmentMasks.Input("garment_masks", optional=True,
                                            tooltip="Optional, from Garment Masks: garment k only reaches pixels "
                                                    "inside mask k (soft masks scale it)."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The dressed MODEL, for KSampler (works with "
                                                                   "ControlNet, LoRA and IP-Adapter).")],
        )

    @classmethod
    def execute(cls, model, garment_features, strength, garment_weights, start_percent, end_percent,
                apply_to_uncond, garment_masks=None) -> io.NodeOutput:
        masks = garment_masks.masks if isinstance(garment_masks, GarmentMasks) else garment_masks
        return io.NodeOutput(apply(model, garment_features, strength, garment_weights, start_percent, end_percent,
                                   apply_to_uncond, masks))
