"""Host: the public contracts the pack leans on, so that releases newer than the pinned ones keep working.

Wrappers take and pass on every argument (newer releases add some); attention-backend overrides in
transformer_options reach the garment branch as they reach the layer's own attention; the pack holds no attn1
replacement, so another pack's stays where it put it (ComfyUI asks it for its models and its cleanup itself).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.host


def _dressed(host, masks=None, strength=0.7, model=None):
    import adtest_tiny

    enc = host.pack_module("nodes.encode_garments")
    gn = host.pack_module("nodes.load_garments_net")
    base = model or adtest_tiny.tiny_model_patcher(0)
    g = torch.Generator().manual_seed(3)
    feats = enc.encode(gn.load("training-free", None, base), torch.randn(2, 4, 8, 6, generator=g), ["upper", "lower"])
    return host.pack_module("nodes.apply_dressing_attention").apply(base, feats, strength, "", 0.0, 1.0, "auto", masks), feats


def _sample(m, seed=0):
    import comfy.sample

    g = torch.Generator().manual_seed(5)
    latent = torch.zeros(1, 4, 8, 8)
    cond = [[torch.randn(1, 77, 768, generator=g), {}]]
    return comfy.sample.sample(m, comfy.sample.prepare_noise(latent, seed), 2, 5.0, "euler", "normal", cond, cond,
                               latent, denoise=1.0, disable_pbar=True, seed=seed)


def test_wrappers_pass_every_argument_on_unchanged(host):
    """Newer releases add arguments to sampling wrappers (latent_shapes, ...): ours (the pack's one wrapper, the
    OUTER_SAMPLE run cache) takes *args/**kwargs and passes them on as they came, whatever their number."""
    glue = host.pack_module("nodes.glue")
    seen = []

    class Guider:
        model_options = {"transformer_options": {}}

    class Executor:
        class_obj = Guider()

        def __call__(self, *args, **kwargs):
            seen.append((args, kwargs))
            return "result"

    args = ("noise", torch.zeros(1, 4, 8, 8), "sampler", "sigmas", "denoise_mask", "callback", "disable_pbar", "seed",
            "a_new_positional_argument")
    kwargs = {"latent_shapes": [(1, 4, 8, 8)], "another_new_one": 1}
    assert glue.run_cache_wrapper(Executor(), *args, **kwargs) == "result"
    assert seen[-1][0] == args and seen[-1][1] == kwargs


def test_an_attention_override_in_transformer_options_reaches_the_garment_branch(host):
    """ComfyUI routes every attention call through transformer_options['optimized_attention_override'] (a core node
    and several packs set it to change the backend). The garment branch's attention goes through it too: the
    override sees keys with the garments' token count, and what it returns is what the layer adds."""
    import comfy.model_management as mm

    plain_m, feats = _dressed(host)
    garment_tokens = {feats.segments[k][-1][1] for k in feats.layers}
    calls = []

    def override(func, *args, **kwargs):
        calls.append(int(args[1].shape[1]))
        return func(*args, **kwargs)

    def scaled(func, *args, **kwargs):
        out = func(*args, **kwargs)
        return out * 2.0 if int(args[1].shape[1]) in garment_tokens and args[1].shape[1] != args[0].shape[1] else out

    reference = _sample(plain_m)
    for fn in (override, scaled):
        m = plain_m.clone()
        m.model_options["transformer_options"]["optimized_attention_override"] = fn
        out = _sample(m)
        if fn is override:
            assert torch.equal(out, reference)  # an override that only watches changes nothing
            assert garment_tokens & set(calls), (sorted(garment_tokens), sorted(set(calls)))
    doubled, _ = _dressed(host, strength=1.4)
    assert float((out - _sample(doubled)).abs().max()) < 1e-4 * float(reference.abs().max())
    mm.unload_all_models()


def test_another_packs_attn1_replacement_stays_where_it_was(host):
    """The pack takes no attn1 replace slot: a replacement another pack put on a layer (with its models and its
    cleanup, which ComfyUI calls on it) is the very object in the very slot after Apply Dressing-Attention."""
    fixtures = host.nodes.NODE_CLASS_MAPPINGS

    class Foreign:
        def __call__(self, q, k, v, extra):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

        def __deepcopy__(self, memo):
            return self

    base = fixtures["ADTestTinyModel"]().run(0, 32)[0].clone()
    foreign = Foreign()
    base.set_model_attn1_replace(foreign, "output", 11, 0)
    m, _ = _dressed(host, model=base)
    assert m.model_options["transformer_options"]["patches_replace"] == {"attn1": {("output", 11, 0): foreign}}
