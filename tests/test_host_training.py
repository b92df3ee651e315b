"""Host: training GFE LoRA + W_k'/W_v' on a synthetic dataset (tiny models, CPU): it learns, and the trained file
gives the node pack the training-time features."""

from __future__ import annotations

import random

import pytest
import torch

pytestmark = pytest.mark.host


@pytest.fixture(scope="module")
def setup(host, tmp_path_factory):
    import adtest_tiny
    from anydressing_train.data import FolderDataset, make_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic(str(root), count=8, size=64)
    base = adtest_tiny.tiny_model_patcher(0)
    vae = adtest_tiny.tiny_vae(0)
    context = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(5))
    return FolderDataset(str(root)), base, (lambda x: vae.encode(x) * 0.18215), (lambda caption: context)


def trainer_for(base):
    from anydressing_train.trainer import DressingTrainer

    return DressingTrainer(base.model.diffusion_model, ["upper", "lower"], rank=4, alpha=4.0)


def test_a_short_run_lowers_both_losses_and_localizes_garments(setup, tmp_path):
    from anydressing_train.loop import evaluate, train

    ds, base, enc_img, enc_txt = setup
    tr = trainer_for(base)
    before = evaluate(tr, ds, enc_img, enc_txt, timesteps=(200, 500, 800), limit=4)
    # lambda1 is raised from the paper's 0.01 (meant for 100k steps) so that 40 CPU steps show the effect
    history = train(tr, ds, enc_img, enc_txt, steps=40, lr=1e-2, lambda_loc=100.0, dropout=0.0,
                    log=str(tmp_path / "log.csv"))
    after = evaluate(tr, ds, enc_img, enc_txt, timesteps=(200, 500, 800), limit=4)
    print("before", before, "after", after)
    assert len(history) == 40 and (tmp_path / "log.csv").read_text().count("\n") == 41
    assert after["diffusion"] < 0.9 * before["diffusion"]
    assert after["localization"] < before["localization"] - 0.01
    gap_before = before["mass_inside"] - before["mass_outside"]
    gap_after = after["mass_inside"] - after["mass_outside"]
    assert gap_after > gap_before + 0.1  # each garment's attention mass moved into its mask


def test_trained_file_gives_the_pack_the_training_time_features(host, setup, tmp_path):
    from anydressing_core.native_format import read_native

    ds, base, enc_img, enc_txt = setup
    tr = trainer_for(base)
    with torch.no_grad():  # make the LoRA and W' non-trivial without training
        for p in list(tr.lora.values()) + list(tr.w_k.values()):
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    path = host.anydressing_dir() / "trained_test.safetensors"
    tr.save(str(path), {"base_model": "tiny", "steps": 0})
    contents = read_native(str(path))
    assert contents.slots == ["lower", "upper"] and contents.metadata["lora_rank"] == "4"
    gnet = host.pack_module("nodes.garments_net").load(path.name, str(path), base)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    # the pack takes raw VAE latents and scales them (x 0.18215); training works on scaled latents
    pack = host.pack_module("nodes.encode").encode(gnet, latents / 0.18215, ["lower", "upper"])
    with torch.no_grad():
        ours = tr.encode(latents, ["lower", "upper"])
    for key, t in ours.items():
        ref = t.reshape(1, -1, t.shape[-1])
        assert float((pack.layers[key] - ref).abs().max() / ref.abs().max()) < 1e-5, key
    assert torch.equal(pack.dressing_weights[("middle", 0, 0)][0], tr.w_k["middle_0_0"].detach())


def test_resume_from_a_checkpoint(setup, tmp_path):
    from anydressing_train.loop import train

    ds, base, enc_img, enc_txt = setup
    tr = trainer_for(base)
    ckpt = str(tmp_path / "state.pt")
    train(tr, ds, enc_img, enc_txt, steps=3, lr=1e-3, checkpoint=ckpt)
    saved = tr.w_v["input_1_0"].detach().clone()
    fresh = trainer_for(base)
    history = train(fresh, ds, enc_img, enc_txt, steps=5, lr=1e-3, checkpoint=ckpt)
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5]
    assert not torch.equal(fresh.w_v["input_1_0"].detach(), saved)  # it went on from the saved weights


def test_garment_dropout_and_slot_order():
    from anydressing_train.data import Sample, augment

    s = Sample(torch.zeros(4, 4, 3), {"upper": torch.zeros(1), "lower": torch.zeros(1), "shoes": torch.zeros(1)},
               {}, "")
    rng = random.Random(0)
    draws = [augment(s, rng, 0.5) for _ in range(200)]
    assert all(d for d in draws)  # never empty
    assert any(len(d) < 3 for d in draws) and any(d[0] == "shoes" for d in draws)
    assert augment(s, random.Random(1), 0.0).__len__() == 3


def test_texture_loss_joins_for_small_timesteps(setup, tmp_path):
    """Eq. 10-13: with a decoder and a perceptual network the texture term is part of the loss (t <= max_t)."""
    import adtest_tiny
    from anydressing_train.loop import train
    from anydressing_train.texture import VGGFeatures
    from test_core_texture import random_vgg16_state_dict

    ds, base, enc_img, enc_txt = setup
    vae = adtest_tiny.tiny_vae(0)

    def decode(z):  # differentiable: ComfyUI's AutoencoderKL decoder on unscaled latents, to [0, 1]
        return ((vae.first_stage_model.decode(z / 0.18215) + 1) / 2).clamp(0, 1)

    tr = trainer_for(base)
    history = train(tr, ds, enc_img, enc_txt, steps=3, lr=1e-3, decode=decode,
                    texture_net=VGGFeatures(random_vgg16_state_dict()), texture_max_t=1000)
    assert all(h["texture"] > 0 for h in history)
    never = train(trainer_for(base), ds, enc_img, enc_txt, steps=2, lr=1e-3, decode=decode, texture_max_t=-1)
    assert all(h["texture"] == 0 for h in never)
