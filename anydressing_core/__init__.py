"""AnyDressing core: plain-torch math, feature bank, checkpoint format and masks.

Nothing in this package imports ComfyUI, so it can be tested, trained against and reused without a host.
"""

__all__ = ["layers", "attention", "branch", "masks", "features", "lora", "native_format", "preprocess", "slots"]
