"""What lives for one sampling run or one model evaluation, shared through transformer_options: the run cache
(garment K'/V', resized masks), the weights generation (bumped when the host re-patches weights mid-run), the
attention probe (A_k for Garment Attention Maps and training), and which conditioning rows see the garments.

None of these is a dict: ComfyUI copies the nested dicts of model_options during sampling, which would give every
step a fresh copy; they copy as themselves instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

import torch

from .layers import LayerKey

if TYPE_CHECKING:
    from .branch import DressingBranch

# transformer_options key under which the sampling wrapper publishes the per-run cache
RUN_CACHE_KEY = "anydressing_run_cache"
# transformer_options key of the identities (uuids) of the conditioning whose rows see the garments: the run's
# positive conditioning, published by the sampling wrapper; Garment Guidance adds its garment row's. A frozenset.
GARMENT_UUIDS_KEY = "anydressing_garment_uuids"
# without identities (the model called outside a sampling run): the cond_or_uncond values whose rows see the
# garments (default 0, the positive)
GARMENT_ROWS_KEY = "anydressing_garment_rows"
# transformer_options key of a WeightsGeneration: bumped whenever the host re-patches the MODEL's weights mid-run
WEIGHTS_GENERATION_KEY = "anydressing_weights_generation"
# transformer_options key of an AttentionProbe: when present, every branch records its garments' attention mass A_k
PROBE_KEY = "anydressing_attention_probe"


class AttentionProbe:
    """Collects A_k (eq. 8) per branch and layer during one model evaluation: {branch: {layer: (mass, (h, w))}}.

    mass is [N, rows, tokens] for the rows that see the garments. Not a dict, so ComfyUI's option copies keep it.
    """

    def __init__(self, keep_grad: bool = False, on_record: Optional[Callable[[], None]] = None):
        self.maps: dict = {}
        self.order: list = []
        self.keep_grad = keep_grad  # training: the localization loss backpropagates through A_k
        self.on_record = on_record  # progress: called once per recorded (branch, layer)

    def record(self, branch: "DressingBranch", key: LayerKey, mass: torch.Tensor, grid: tuple[int, int]) -> None:
        if branch not in self.maps:
            self.maps[branch] = {}
            self.order.append(branch)
        self.maps[branch][key] = (mass if self.keep_grad else mass.detach().float().cpu(), grid)
        if self.on_record is not None:
            self.on_record()

    def __deepcopy__(self, memo):
        return self


class WeightsGeneration:
    """A counter the host bumps each time it re-applies weight hooks (scheduled LoRA keyframes, per-cond hooks).

    ComfyUI patches hook weights in place (under inference mode, where tensors keep no version counter), so K'/V'
    projected with to_k/to_v must be keyed to this counter. Shared by every clone: never copied.
    """

    def __init__(self):
        self.value = 0

    def bump(self, *args) -> None:
        self.value += 1

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self


class RunCache:
    """Per sampling run: projected garment K'/V' and resized masks. Created and cleared by a sampling wrapper.

    Deliberately not a dict: ComfyUI copies nested dicts of model_options during sampling, which would give every
    step a fresh, empty cache.
    """

    def __init__(self):
        self._items: dict = {}

    def get(self, key, default=None):
        return self._items.get(key, default)

    def __getitem__(self, key):
        return self._items[key]

    def __setitem__(self, key, value):
        self._items[key] = value

    def __contains__(self, key) -> bool:
        return key in self._items

    def clear(self) -> None:
        self._items.clear()

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self
