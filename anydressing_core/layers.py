"""Self-attention layer identities.

A layer is identified the way ComfyUI's transformer patches identify it: ``(block_name, block_id, block_index)``,
e.g. ``("input", 1, 0)``. Checkpoint files name layers by their ldm module path
(``input_blocks.1.1.transformer_blocks.0``); this module converts between the two.
"""

from __future__ import annotations

import re

LayerKey = tuple[str, int, int]

_IO_PATH = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.(\d+)\.transformer_blocks\.(\d+)$")
_MID_PATH = re.compile(r"^middle_block\.(\d+)\.transformer_blocks\.(\d+)$")


def key_from_path(path: str) -> LayerKey:
    """``input_blocks.1.1.transformer_blocks.0`` -> ``("input", 1, 0)``; ``middle_block.1...`` -> ``("middle", 0, i)``."""
    m = _IO_PATH.match(path)
    if m:
        name = "input" if m.group(1) == "input_blocks" else "output"
        return (name, int(m.group(2)), int(m.group(4)))
    m = _MID_PATH.match(path)
    if m:
        return ("middle", 0, int(m.group(2)))
    raise ValueError(f"not a transformer block path: {path!r}")


def is_layer_path(path: str) -> bool:
    return bool(_IO_PATH.match(path) or _MID_PATH.match(path))


def format_key(key: LayerKey) -> str:
    """How messages name a layer: input.1.0."""
    return f"{key[0]}.{key[1]}.{key[2]}"


def param_name(key: LayerKey) -> str:
    """The layer as a torch parameter name (no dots, which ParameterDict refuses): input_1_0."""
    return f"{key[0]}_{key[1]}_{key[2]}"


def self_attention_blocks(model) -> dict:
    """Every transformer block with self-attention, found by walking the model (no hard-coded list): layer key ->
    block (a module with attn1 and norm1), keyed the way ComfyUI's attn1 patches are looked up, in run order."""
    found = {}
    for name, module in model.named_modules():
        if not (hasattr(module, "attn1") and hasattr(module, "norm1")) or not is_layer_path(name):
            continue
        if getattr(module, "disable_self_attn", False):  # its attn1 attends to the context, not to itself
            continue
        found[key_from_path(name)] = module
    return {k: found[k] for k in sort_keys(found)}


def sort_keys(keys) -> list[LayerKey]:
    """Order layers as the UNet runs them: input blocks, middle, output blocks."""
    order = {"input": 0, "middle": 1, "output": 2}
    return sorted(keys, key=lambda k: (order.get(k[0], 3), k[1], k[2]))


def path_from_key(key: LayerKey) -> str:
    """SD1.5 layout: the SpatialTransformer sits at index 1 of its input/output block and of the middle block."""
    name, block_id, index = key
    if name == "middle":
        return f"middle_block.1.transformer_blocks.{index}"
    return f"{name}_blocks.{block_id}.1.transformer_blocks.{index}"
