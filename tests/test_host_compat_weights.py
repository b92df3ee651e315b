"""Host: dressing while the MODEL's weights change: hook keyframes and in-place patches re-project the garments'
K'/V' (never served stale from the run cache)."""

from __future__ import annotations

import pytest
import torch

from compare import rel
from test_host_compat import LAYERS, assert_every_layer_dressed, calls, prompt  # noqa: F401  (calls: a fixture)

pytestmark = pytest.mark.host


# ---- weights that change mid-run (scheduled LoRA hooks swap to_k/to_v per keyframe and per cond) ----

def test_garment_kv_are_projected_again_when_the_weights_change(host):
    """Hook keyframes replace to_k/to_v's weight mid-run: the run cache must not serve K'/V' of the old weights."""
    branch_mod = host.pack_module("anydressing_core.branch")
    to_k, to_v = torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 8, bias=False)
    layer = branch_mod.DressingLayer(features=torch.randn(1, 5, 8), segments=[(0, 5)], key_proj=to_k, value_proj=to_v)
    branch = branch_mod.DressingBranch({("middle", 0, 0): layer})
    cache = host.pack_module("anydressing_core.run_state").RunCache()
    import gc
    import weakref

    k1, _ = branch.projected(("middle", 0, 0), layer, torch.device("cpu"), torch.float32, cache)
    again, _ = branch.projected(("middle", 0, 0), layer, torch.device("cpu"), torch.float32, cache)
    assert again is k1  # same weights: served from the run cache
    first, reference = weakref.ref(k1), k1.clone()
    del k1, again
    to_k.weight = torch.nn.Parameter(to_k.weight.detach() * 2)  # what ComfyUI's hook patching does (set_attr_param)
    k2, _ = branch.projected(("middle", 0, 0), layer, torch.device("cpu"), torch.float32, cache)
    assert torch.allclose(k2, reference * 2)
    gc.collect()
    assert first() is None  # one entry per layer, replaced: the old weights' K' is not kept
    with torch.no_grad():
        to_k.weight.mul_(0.5)  # an in-place patch bumps the version counter
    k3, _ = branch.projected(("middle", 0, 0), layer, torch.device("cpu"), torch.float32, cache)
    assert torch.allclose(k3, reference)


def write_hook_lora(host) -> str:
    """A LoRA file on every attn1.to_k/to_v of the tiny model, for ComfyUI's own Create Hook LoRA node."""
    import adtest_tiny
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(11)
    sd = {}
    for k, w in adtest_tiny.tiny_unet_state_dict(0).items():
        if ".attn1.to_k." in k or ".attn1.to_v." in k:
            base = f"diffusion_model.{k[:-len('.weight')]}"
            sd[f"{base}.lora_up.weight"] = 0.3 * torch.randn(w.shape[0], 4, generator=g)
            sd[f"{base}.lora_down.weight"] = 0.3 * torch.randn(4, w.shape[1], generator=g)
    folder = host.models_dir / "loras"
    folder.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(folder / "adtest_hook_lora.safetensors"))
    return "adtest_hook_lora.safetensors"


def with_hook_keyframes(p: dict, lora: str) -> dict:
    """Scheduled LoRA on the positive prompt: strength 0 for the first half of the steps, 1 after (hook keyframes)."""
    p["hook"] = {"class_type": "CreateHookLora", "inputs": {"lora_name": lora, "strength_model": 1.0,
                                                            "strength_clip": 1.0}}
    p["kf0"] = {"class_type": "CreateHookKeyframe", "inputs": {"strength_mult": 0.0, "start_percent": 0.0}}
    p["kf1"] = {"class_type": "CreateHookKeyframe", "inputs": {"strength_mult": 1.0, "start_percent": 0.5,
                                                               "prev_hook_kf": ["kf0", 0]}}
    p["hook_kf"] = {"class_type": "SetHookKeyframes", "inputs": {"hooks": ["hook", 0], "hook_kf": ["kf1", 0]}}
    p["hooked"] = {"class_type": "ConditioningSetProperties",
                   "inputs": {"cond_NEW": ["pos", 0], "strength": 1.0, "set_cond_area": "default",
                              "hooks": ["hook_kf", 0]}}
    p["sampler"]["inputs"]["positive"] = ["hooked", 0]
    return p


def test_hook_keyframe_lora_reprojects_garments_when_the_weights_change(host, store, calls, monkeypatch):
    branch_mod = host.pack_module("anydressing_core.branch")
    projections = []
    original = branch_mod.DressingLayer.project

    def counting(self, device, dtype):
        projections.append(1)
        return original(self, device, dtype)

    monkeypatch.setattr(branch_mod.DressingLayer, "project", counting)
    lora = write_hook_lora(host)
    p, without = prompt("without", patched=False)
    p["sampler"]["inputs"]["steps"] = 2
    assert host.run(with_hook_keyframes(p, lora))["success"]
    calls.clear()
    projections.clear()
    p, dressed = prompt("dressed")
    p["sampler"]["inputs"]["steps"] = 2
    r = host.run(with_hook_keyframes(p, lora))
    assert r["success"], r["errors"]
    assert_every_layer_dressed(calls)
    assert rel(store[dressed], store[without]) > 1e-2
    # K'/V' once with the keyframe-0 weights and once more after the keyframe at 50% patched the LoRA in
    assert len(projections) == 2 * LAYERS
