"""Host: every GarmentsNet format loads when the host builds UNet layers without weights until they are loaded.

Newer ComfyUI releases (past the pinned ones) have a memory manager that creates Linear layers with no weight until
ComfyUI's loader fills them, so a freshly built model's state_dict() lacks them. Here the pinned host's operations
are swapped for such layers (meta-device construction, weights assigned by load_state_dict) and each format must
load and encode exactly as it does with ordinary layers.
"""

from __future__ import annotations

import pytest
import torch

from anydressing_core.layers import path_from_key
from anydressing_core.native_format import write_native
from test_host_peer_formats import FAMILIES, _family_files, diffusers_sd

pytestmark = pytest.mark.host


def weightless_operations(ops, built: list):
    """`ops` with a Linear that holds no weight (nor bias) until load_state_dict assigns the file's tensors."""

    class Linear(ops.Linear):
        def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, **kwargs):
            super().__init__(in_features, out_features, bias, device="meta", dtype=dtype, **kwargs)
            self.weight = None
            self.bias = None
            built.append(self)

        def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
            for name in ("weight", "bias"):
                if prefix + name in state_dict:
                    setattr(self, name, torch.nn.Parameter(state_dict[prefix + name].detach().clone(),
                                                           requires_grad=False))

    return type("WeightlessOps", (ops,), {"Linear": Linear})


@pytest.fixture
def weightless(monkeypatch):
    """ComfyUI's operation picker returns weightless Linear layers; yields the layers built that way."""
    import comfy.ops

    built: list = []
    pick = comfy.ops.pick_operations
    monkeypatch.setattr(comfy.ops, "pick_operations", lambda *a, **k: weightless_operations(pick(*a, **k), built))
    yield built


def _other_files(host, kind):
    """The native formats not in the peer families: diffusers naming, a partial fine-tune, dressing weights only."""
    import adtest_tiny

    d = host.anydressing_dir()
    sd, dsd = diffusers_sd(21)
    if kind == "native_diffusers":
        write_native(str(d / "wl_diffusers.safetensors"), unet=dsd)
        return "wl_diffusers.safetensors"
    if kind == "native_partial":
        write_native(str(d / "wl_partial.safetensors"), unet={k: v for k, v in sd.items() if k.startswith("output_")})
        return "wl_partial.safetensors"
    if kind == "dressing_only":
        base = adtest_tiny.tiny_unet_state_dict(0)
        paths = {path_from_key(k) for k in [("input", 1, 0), ("middle", 0, 0), ("output", 11, 0)]}
        write_native(str(d / "wl_dressing.safetensors"),
                     dressing={p: (base[f"{p}.attn1.to_k.weight"] * 1.5, base[f"{p}.attn1.to_v.weight"] * 0.5)
                               for p in paths})
        return "wl_dressing.safetensors"
    return "training-free"


KINDS = FAMILIES + ["native_diffusers", "native_partial", "dressing_only", "training-free"]


def _load_and_encode(host, kind):
    import adtest_tiny
    import comfy.model_management as mm

    gn = host.pack_module("nodes.load_garments_net")
    enc = host.pack_module("nodes.encode_garments")
    fixtures = host.nodes.NODE_CLASS_MAPPINGS
    d = host.anydressing_dir()
    base = adtest_tiny.tiny_model_patcher(0)
    if kind in FAMILIES:
        name, extra, _, _ = _family_files(host, kind)
    else:
        name, extra = _other_files(host, kind), None
    path = None if name == "training-free" else str(d / name)
    gnet = gn.load(name, path, base, str(d / extra) if extra else None)
    g = torch.Generator().manual_seed(13)
    latents = torch.randn(2, 4, 8, 6, generator=g)
    pixels = torch.rand(2, 64, 48, 3, generator=g)
    feats = enc.encode(gnet, latents, ["upper", "lower"], fixtures["ADTestStubCLIP"]().run(0)[0],
                       fixtures["ADTestStubCLIPVision"]().run(20)[0], pixels)
    mm.unload_all_models()
    return gnet, feats


@pytest.mark.parametrize("kind", KINDS)
def test_each_format_loads_into_layers_built_without_weights(host, kind, request):
    gnet_plain, plain = _load_and_encode(host, kind)
    built = request.getfixturevalue("weightless")
    gnet, feats = _load_and_encode(host, kind)
    # GarmentsNet (a UNet of the file's, or the connected MODEL's own) was built from weightless layers, and the
    # loading filled every one of them
    linears = [m for m in gnet.patcher.model.diffusion_model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) > 100 and all(any(m is b for b in built) for m in linears)
    assert all(m.weight is not None and m.weight.device.type != "meta" for m in linears)
    assert (gnet.injection, gnet.feature_tap, sorted(gnet.dressing)) == (
        gnet_plain.injection, gnet_plain.feature_tap, sorted(gnet_plain.dressing))
    assert list(feats.layers) == list(plain.layers) and len(feats.layers) == 16
    for key, t in plain.layers.items():
        assert torch.equal(feats.layers[key], t), key
