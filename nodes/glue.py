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

from ..anydressing_core.branch import DressedLayers, DressingAttentionReplace, DressingBranch, restore_dressing
from ..anydressing_core.run_state import RUN_CACHE_KEY, WEIGHTS_GENERATION_KEY, RunCache, WeightsGeneration
from ..anydressing_core.layers import LayerKey, format_key, self_attention_blocks

LOG = logging.getLogger("AnyDressing")
WRAPPER_KEY = "anydressing"
# transformer_options key of the DressedLayers registry (which layers our Apply nodes dressed)
DRESSED_KEY = "anydressing_dressed_layers"


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
    """ComfyUI's own attention for the layer (whatever backend it picked, with overrides from transformer_options)."""
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


def run_cache_wrapper(executor, *args, **kwargs):
    """OUTER_SAMPLE wrapper: one RunCache per sampling run (garment K'/V' and resized masks), dropped at its end.

    The guider's model_options are swapped for a copy for the duration of the run, so the MODEL keeps no state.
    """
    guider = executor.class_obj
    original = guider.model_options
    guider.model_options = comfy.model_patcher.create_model_options_clone(original)
    cache = RunCache()
    latent = args[1] if len(args) > 1 else kwargs.get("latent_image")
    if isinstance(latent, torch.Tensor):
        cache["latent_shape"] = tuple(latent.shape)  # the whole latent: area conditioning runs the model on crops
    guider.model_options.setdefault("transformer_options", {})[RUN_CACHE_KEY] = cache
    try:
        return executor(*args, **kwargs)
    finally:
        cache.clear()
        guider.model_options = original


TRANSFORMER_OPTIONS_ARG = 5  # UNetModel.forward(x, timesteps, context, y, control, transformer_options, ...)


def keep_dressing_wrapper(executor, *args, **kwargs):
    """DIFFUSION_MODEL wrapper: put the garment branches back under attn1 replacements installed after ours.

    Self-Attention Guidance (on the MODEL) and Perturbed-Attention Guidance (in its extra pass) replace the middle
    block's attn1 after Apply Dressing-Attention ran; without this the garments would silently vanish there.
    The per-call transformer_options is ComfyUI's shallow copy: the nested dicts are copied, never edited. Every
    argument, known or not, is passed on unchanged.
    """
    positional = len(args) > TRANSFORMER_OPTIONS_ARG
    options = args[TRANSFORMER_OPTIONS_ARG] if positional else kwargs.get("transformer_options")
    dressed = options.get(DRESSED_KEY) if isinstance(options, dict) else None
    if isinstance(dressed, DressedLayers):
        replaces = options.get("patches_replace", {})
        fix = restore_dressing(replaces.get("attn1", {}), dressed)
        if fix:
            options["patches_replace"] = {**replaces, "attn1": {**replaces.get("attn1", {}), **fix}}
    return executor(*args, **kwargs)


def install_branch(model_patcher, branch: DressingBranch, keys: list[LayerKey]) -> None:
    """Add `branch` to the attn1 replacement of every layer in `keys` on an already cloned ModelPatcher.

    Our own replacement on a layer gets one more branch (copy-on-write); another pack's replacement is kept and called.
    """
    to = model_patcher.model_options.setdefault("transformer_options", {})
    existing = to.get("patches_replace", {}).get("attn1", {})
    installed = {}
    for key in keys:
        current = existing.get(key)
        if current is None:
            current = existing.get((key[0], key[1]))  # a 2-tuple entry applies to every block index
        if isinstance(current, DressingAttentionReplace):
            replace = current.with_branch(branch)
        else:
            replace = DressingAttentionReplace(key, self_attention, previous=current, branches=[branch])
        model_patcher.set_model_attn1_replace(replace, key[0], key[1], key[2])
        installed[key] = replace
    to = model_patcher.model_options["transformer_options"]  # set_model_attn1_replace put in a new dict
    dressed = to.get(DRESSED_KEY)
    to[DRESSED_KEY] = dressed.with_layers(installed) if isinstance(dressed, DressedLayers) else DressedLayers(installed)
    if not isinstance(to.get(WEIGHTS_GENERATION_KEY), WeightsGeneration):
        # scheduled LoRA hooks re-patch to_k/to_v in place mid-run: K'/V' are projected again after each re-patch
        generation = WeightsGeneration()
        to[WEIGHTS_GENERATION_KEY] = generation
        model_patcher.remove_callbacks_with_key(comfy.patcher_extension.CallbacksMP.ON_APPLY_HOOKS, WRAPPER_KEY)
        model_patcher.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_APPLY_HOOKS, WRAPPER_KEY,
                                            generation.bump)
    for kind, fn in ((comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, run_cache_wrapper),
                     (comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, keep_dressing_wrapper)):
        model_patcher.remove_wrappers_with_key(kind, WRAPPER_KEY)
        model_patcher.add_wrapper_with_key(kind, WRAPPER_KEY, fn)


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
