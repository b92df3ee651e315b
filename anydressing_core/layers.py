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
    return f"{key[0]}.{key[1]}.{key[2]}"


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
