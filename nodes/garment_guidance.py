"""Garment Guidance: a third row per step (negative text with the garments) and MagicClothing's joint CFG."""

from __future__ import annotations

import uuid
from typing import Any

import comfy.model_patcher
import comfy.samplers
from comfy_api.latest import io

from ..anydressing_core.guidance import joint_guidance
from ..anydressing_core.run_state import GARMENT_ROWS_KEY, GARMENT_UUIDS_KEY
from . import glue, io_types

NODE = "Garment Guidance"


class _Stash:
    """The garment row's prediction between the batch function and the cfg function of one step."""

    def __init__(self):
        self.x = None
        self.g = None


def apply(model: Any, garment_scale: float) -> Any:
    if glue.garment_term(model) is None:
        raise glue.NodeError(NODE, "the MODEL has no Dressing-Attention: connect the MODEL output of Apply "
                                   "Dressing-Attention")
    seeing = [b for b in glue.garment_term(model).branches if b.include_uncond]
    if seeing:
        raise glue.NodeError(NODE, "Apply Dressing-Attention lets the unconditional rows see the garments "
                                   "(apply_to_uncond 'yes', or 'auto' with a file whose authors did so, e.g. DreamFit), "
                                   "so the unconditional prediction u already has them and garment guidance "
                                   "(u + s_g (g - u) + s_t (t - g)) would be plain CFG; set apply_to_uncond to 'no'")
    if "sampler_calc_cond_batch_function" in model.model_options or "sampler_cfg_function" in model.model_options:
        raise glue.NodeError(NODE, "another node already replaced this MODEL's CFG; put Garment Guidance before it "
                                   "or remove one of them")
    m = model.clone()
    stash = _Stash()

    def calc(args):
        conds, x, sigma, model_ = args["conds"], args["input"], args["sigma"], args["model"]
        options = args["model_options"]
        later = options.get("sampler_cfg_function")
        if later is not cfg:  # a later node's cfg function would drop the garment row we are about to compute
            name = getattr(later, "__qualname__", type(later).__name__)
            raise glue.NodeError(NODE, f"a node after Garment Guidance replaced the MODEL's CFG function ({name}, "
                                       f"e.g. RescaleCFG or Perp-Neg), so the garment guidance would be silently "
                                       f"lost; remove that node or Garment Guidance")
        if conds[1] is None:  # cfg 1: no unconditional rows, nothing to guide
            stash.x = None
            return comfy.samplers.calc_cond_batch(model_, conds, x, sigma, options)
        # the garment row is the negative text under identities of its own, which see the garments
        garment_conds = [dict(c, uuid=uuid.uuid4()) for c in conds[1]]
        options = comfy.model_patcher.create_model_options_clone(options)
        to = options.setdefault("transformer_options", {})
        if GARMENT_UUIDS_KEY in to:
            to[GARMENT_UUIDS_KEY] = frozenset(to[GARMENT_UUIDS_KEY]) | {c["uuid"] for c in garment_conds}
        to[GARMENT_ROWS_KEY] = (0, 2)  # (for a run without identities: cond_or_uncond 0 and 2)
        cond, uncond, garment = comfy.samplers.calc_cond_batch(model_, [conds[0], conds[1], garment_conds], x, sigma,
                                                               options)
        stash.x, stash.g = x, garment
        return [cond, uncond]

    def cfg(args):
        x = args["input"]
        t, u = args["cond_denoised"], args["uncond_denoised"]
        if stash.x is not x:  # no garment row this step (cfg 1): plain CFG
            return x - (u + args["cond_scale"] * (t - u))
        denoised = joint_guidance(t, u, stash.g, args["cond_scale"], garment_scale)
        stash.x = stash.g = None
        return x - denoised

    m.set_model_sampler_calc_cond_batch_function(calc)
    m.set_model_sampler_cfg_function(cfg)
    return m


class GarmentGuidance(io.ComfyNode):
    """The node: the dressed MODEL in, the MODEL with joint garment guidance out."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AnyDressingGarmentGuidance",
            display_name=NODE,
            category=io_types.CATEGORY,
            description="MagicClothing's joint garment guidance: each step also evaluates the negative prompt with "
                        "the garments, then x0 = u + garment_scale (g - u) + cfg (t - g), where u is negative text "
                        "without garments, g negative text with them and t the positive prompt with them. KSampler's "
                        "cfg is the text scale. Costs one more row per step.",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL output of Apply Dressing-Attention."),
                io.Float.Input("garment_scale", default=2.5, min=0.0, max=30.0, step=0.1,
                               tooltip="How strongly the garments are enforced (MagicClothing: 2.5). Equal to "
                                       "KSampler's cfg gives plain CFG."),
            ],
            outputs=[io.Model.Output(display_name="model",
                                     tooltip="The dressed MODEL with joint garment guidance, for KSampler.")],
        )

    @classmethod
    def execute(cls, model, garment_scale) -> io.NodeOutput:
        return io.NodeOutput(apply(model, garment_scale))
