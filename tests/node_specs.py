"""Reading the node definitions ComfyUI gives (INPUT_TYPES / object_info), whichever form a host uses."""

from __future__ import annotations


def choices(spec) -> list:
    """A combo input's choices: the V1 form ([...], {...}) or the V3 form ("COMBO", {"options": [...]})."""
    if isinstance(spec[0], (list, tuple)):
        return list(spec[0])
    return list((spec[1] if len(spec) > 1 else {}).get("options") or [])

