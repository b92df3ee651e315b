"""The glue between the plain-torch core and ComfyUI: attention functions, layer discovery, patching, wrappers."""

from __future__ import annotations

import logging
from typing import Optional

import torch

import comfy.ldm.modules.attention as comfy_attention
import comfy.model_management as mm
import comfy.model_patcher
import comfy.patcher_extension
import comfy.utils

from ..anydressing_core import hooks
from ..anydressing_core.branch import DressingBranch
from ..anydressing_core.run_state import GARMENT_UUIDS_KEY, RUN_CACHE_KEY, WEIGHTS_GENERATION_KEY, RunCache, WeightsGeneration
from ..anydressing_core.layers import LayerKey, format_key, self_attention_blocks

LOG = logging.getLogger("AnyDressing")
WRAPPER_KEY = "anydressing"


class NodeError(Exception):
    """An error the user can act on. The message names the node, the input and the fix."""

    def __init__(self, node: str, message: str):
        super().__init__(f"[AnyDressing] {node}: {message}")
        self.node, self.detail = node, message

    def __reduce__(self):  # pickled by value through this module, whatever __module__ says
        return (_node_error, (self.node, self.detail))


# ComfyUI shows an error's type as module + name; our real module path is built from the install folder (ComfyUI
# imports the pack under its folder's path), so the UI, the API and the logs would show a different type per
# install. The pack's own name, "anydressing" (pyproject.toml's), is the same everywhere; pickling goes through
# __reduce__ above, never through that name.
NodeError.__module__ = "anydressing"


def _node_error(node: str, message: str) -> NodeError:
    return NodeError(node, message)


def self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra: dict) -> torch.Tensor:
    """ComfyUI's own attention for a layer (whatever backend it picked, with overrides from transformer_options):
    GarmentsNet's GFE LoRA replacement uses it."""
    return comfy_attention.optimized_attention(q, k, v, extra.get("n_heads"), attn_precision=extra.get("attn_precision"),
                                               transformer_options=extra)


def garment_attention_fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                         transformer_options: Optional[dict] = None) -> torch.Tensor:
    """ComfyUI's attention for the garment branch of eq. 6 (one softmax over all garment tokens), with the layer's
    transformer_options, so attention-backend overrides (a core node's, other packs') reach it as they reach the
    layer's own attention."""
    options = transformer_options if transformer_options is not None else {}
    return comfy_attention.optimized_attention(q, k, v, heads, attn_precision=options.get("attn_precision"),
                                               transformer_options=options)


def self_attention_layers(diffusion_model: torch.nn.Module) -> dict[LayerKey, torch.nn.Module]:
    """Every self-attention transformer block of the MODEL's UNet, keyed the way ComfyUI's attn1 patches are
    looked up (anydressing_core.layers.self_attention_blocks: found by walking the model)."""
    return self_attention_blocks(diffusion_model)


def layer_channels(blocks: dict[LayerKey, torch.nn.Module]) -> dict[LayerKey, int]:
    return {k: int(b.attn1.to_k.in_features) for k, b in blocks.items()}


def describe_channels(ch: dict[LayerKey, int], limit: int = 4) -> str:
    items = [f"{format_key(k)}={c}" for k, c in list(ch.items())[:limit]]
    return ", ".join(items) + (", ..." if len(ch) > limit else "")


def compute_dtype(model) -> torch.dtype:
    """The dtype ComfyUI runs this BaseModel in (its manual-cast dtype when weights are stored in another)."""
    return model.manual_cast_dtype if getattr(model, "manual_cast_dtype", None) is not None else model.get_dtype()


def positive_uuids(guider) -> frozenset:
    """The identities of the run's positive conditioning (ComfyUI gives every cond entry a uuid when sampling starts;
    the rows of each model call carry them in transformer_options['uuids'])."""
    conds = getattr(guider, "conds", None) or {}
    return frozenset(c["uuid"] for c in conds.get("positive", []) or [] if isinstance(c, dict) and "uuid" in c)


def run_cache_wrapper(executor, *args, **kwargs):
    """OUTER_SAMPLE wrapper: one RunCache per sampling run (garment K'/V' and resized masks), dropped at its end, and
    the identities of the run's positive conditioning, whose rows see the garments.

    The guider's model_options are swapped for a copy for the duration of the run, so the MODEL keeps no state.
    Every argument is passed on unchanged.
    """
    guider = executor.class_obj
    original = guider.model_options
    guider.model_options = comfy.model_patcher.create_model_options_clone(original)
    cache = RunCache()
    latent = args[1] if len(args) > 1 else kwargs.get("latent_image")
    if isinstance(latent, torch.Tensor):
        cache["latent_shape"] = tuple(latent.shape)  # the whole latent: area conditioning runs the model on crops
    to = guider.model_options.setdefault("transformer_options", {})
    to[RUN_CACHE_KEY] = cache
    uuids = positive_uuids(guider)
    if uuids:
        to[GARMENT_UUIDS_KEY] = uuids
    try:
        return executor(*args, **kwargs)
    finally:
        cache.clear()
        guider.model_options = original


def install_branch(model_patcher, branch: DressingBranch, blocks: dict[LayerKey, torch.nn.Module]) -> None:
    """Add `branch` to the garment term of an already cloned ModelPatcher (see anydressing_core.hooks: an attn1_patch
    and a middle_patch, lists every pack appends to; no attn1 replacement, no restore step)."""
    to = model_patcher.model_options.setdefault("transformer_options", {})
    hooks.install(to, branch, blocks)
    if not isinstance(to.get(WEIGHTS_GENERATION_KEY), WeightsGeneration):
        # scheduled LoRA hooks re-patch to_k/to_v in place mid-run: K'/V' are projected again after each re-patch
        generation = WeightsGeneration()
        to[WEIGHTS_GENERATION_KEY] = generation
        model_patcher.remove_callbacks_with_key(comfy.patcher_extension.CallbacksMP.ON_APPLY_HOOKS, WRAPPER_KEY)
        model_patcher.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_APPLY_HOOKS, WRAPPER_KEY,
                                            generation.bump)
    model_patcher.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY)
    model_patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, run_cache_wrapper)


def garment_term(model_patcher):
    """The MODEL's garment term (None: no Apply Dressing-Attention on it)."""
    return hooks.find_term(model_patcher.model_options.get("transformer_options", {}))


def intermediate_device() -> torch.device:
    return mm.intermediate_device()


def load_for_inference(patchers: list) -> None:
    mm.load_models_gpu(patchers)


def percent_to_sigma(model_patcher, percent: float) -> float:
    """ComfyUI's own schedule mapping (start 0 -> a huge sigma, end 1 -> 0), as IP-Adapter and ControlNet use it."""
    return float(model_patcher.get_model_object("model_sampling").percent_to_sigma(percent))


def warn(msg: str) -> None:
    LOG.warning("[AnyDressing] %s", msg)


def info(msg: str) -> None:
    LOG.info("[AnyDressing] %s", msg)


def progress_bar(total: int):
    """A tick function on ComfyUI's progress bar (the node's bar in the editor, like KSampler's steps)."""
    bar = comfy.utils.ProgressBar(max(1, int(total)))

    def tick() -> None:
        if bar.current < bar.total:  # never past 100%, even if a model evaluates a layer twice
            bar.update(1)

    return tick
