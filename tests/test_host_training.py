"""Host: training GFE LoRA + W_k'/W_v' on a synthetic dataset (tiny models, CPU): it learns, and the trained file
gives the node pack the training-time features."""

from __future__ import annotations

import random

import pytest
import torch

from training_setup import setup, trainer_for  # noqa: F401  (setup: the module's fixture)

pytestmark = pytest.mark.host



def test_a_short_run_localizes_held_out_garments_at_the_papers_lambda(setup, tmp_path):
    """Held out: samples of another seed, garments in random places (a slot says nothing about where). At the paper's
    lambda1 = 0.01 (L_loc at the paper's 768 x 576 scale), the held-out inside-mask attention share rises over the
    pack's training-free mode and the held-out diffusion loss does not rise."""
    from anydressing_train.data import FolderDataset, make_synthetic
    from anydressing_train.loop import evaluate, latent_std, latent_std_warning, train

    _, base, sd_scaled, enc_txt = setup
    make_synthetic(str(tmp_path / "train"), count=8, size=64, seed=0, layout="random")
    make_synthetic(str(tmp_path / "val"), count=4, size=64, seed=1, layout="random")
    ds, val = FolderDataset(str(tmp_path / "train")), FolderDataset(str(tmp_path / "val"))
    # the toy's random VAE at SD's 0.18215 gives latents of std ~0.09, which noise drowns at every t: the training
    # command warns of that; here the latents get unit std on the training samples, as 0.18215 does for SD's VAE
    std = latent_std(sd_scaled, ds)
    assert latent_std_warning(std) is not None and std < 0.2
    enc_img = lambda x: sd_scaled(x) / std  # noqa: E731
    assert latent_std_warning(latent_std(enc_img, ds)) is None and abs(latent_std(enc_img, ds) - 1) < 1e-4
    free = evaluate(trainer_for(base, feature_tap="attn1_input", strength=0.7, loc_reduction="paper_scale"), val,
                    enc_img, enc_txt, timesteps=(200, 500, 800))
    # F^new, the default tap, which the bench's runs show localizing faster than attn1_input (README)
    tr = trainer_for(base, loc_reduction="paper_scale")
    assert tr.feature_tap == "gfe_output"
    history = train(tr, ds, enc_img, enc_txt, steps=LEARN_STEPS, lr=LEARN_LR, lambda_loc=0.01, dropout=0.0,
                    val_dataset=val, eval_every=LEARN_STEPS, eval_timesteps=(200, 500, 800),
                    log=str(tmp_path / "log.csv"))
    after = {k[4:]: v for k, v in history[-1].items() if k.startswith("val_")}
    print("training-free", free, "trained", after)
    assert len(history) == LEARN_STEPS and (tmp_path / "log.csv").read_text().count("\n") == LEARN_STEPS + 2
    assert abs(free["mass_inside"] - 0.5) < 0.02 and abs(free["mass_outside"] - 0.5) < 0.02
    # each garment's attention moved into its mask (measured: inside 0.499 -> 0.535, outside 0.499 -> 0.483)
    assert after["mass_inside"] > free["mass_inside"] + 0.015
    assert after["mass_inside"] - after["mass_outside"] > free["mass_inside"] - free["mass_outside"] + 0.03
    assert after["diffusion"] <= free["diffusion"]  # measured: 1.379 -> 1.190
    # the per-resolution breakdown (bench --by-resolution) splits the same figure: one key per grid and timestep
    split = evaluate(tr, val, enc_img, enc_txt, timesteps=(200, 500, 800), by_grid=True)
    assert split["mass_inside"] == after["mass_inside"]
    parts = {k: v for k, v in split.items() if k.startswith("mass_inside_") and "_t" in k}
    assert {k.rsplit("_t", 1)[1] for k in parts} == {"200", "500", "800"}
    assert {k.split("_")[2] for k in parts} >= {"2x2", "4x4", "8x8"}
    assert min(parts.values()) <= split["mass_inside"] <= max(parts.values())


LEARN_STEPS, LEARN_LR = 40, 1e-2


@pytest.mark.parametrize("tap", ["gfe_output", "attn1_input"])
def test_trained_file_gives_the_pack_the_training_time_features(host, setup, tmp_path, tap):
    from anydressing_core.native_format import read_native

    ds, base, enc_img, enc_txt = setup
    tr = trainer_for(base, feature_tap=tap, strength=0.85)
    with torch.no_grad():  # make the LoRA and W' non-trivial without training
        for p in list(tr.lora.values()) + list(tr.w_k.values()):
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    path = host.anydressing_dir() / f"trained_test_{tap}.safetensors"
    tr.save(str(path), {"base_model": "tiny", "steps": 0})
    contents = read_native(str(path))
    assert contents.slots == ["lower", "upper"] and contents.metadata["lora_rank"] == "4"
    # the tap and the training strength round-trip through the file's metadata into the loaded GarmentsNet
    assert contents.metadata["feature_tap"] == tap and float(contents.metadata["strength"]) == 0.85
    gnet = host.pack_module("nodes.load_garments_net").load(path.name, str(path), base)
    assert gnet.feature_tap == tap and gnet.strength == 0.85
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    # the pack takes raw VAE latents and scales them (x 0.18215); training works on scaled latents
    pack = host.pack_module("nodes.encode_garments").encode(gnet, latents / 0.18215, ["lower", "upper"])
    with torch.no_grad():
        ours = tr.encode(latents, ["lower", "upper"])
    for key, t in ours.items():
        ref = t.reshape(1, -1, t.shape[-1])
        assert float((pack.layers[key] - ref).abs().max() / ref.abs().max()) < 1e-5, key
    assert torch.equal(pack.dressing_weights[("middle", 0, 0)][0], tr.w_k["middle_0_0"].detach())
    assert pack.strength == 0.85
    # the last layer's LoRA exists in the file only where it can change a feature (F^new, not the attn1 input)
    assert (("output", 11, 0) in contents.loras["upper"]) == (tap == "gfe_output")
    assert len(contents.loras["upper"]) == (16 if tap == "gfe_output" else 15)
    path.unlink()


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


def test_resume_refuses_a_checkpoint_of_another_setup(setup, tmp_path):
    """Other slots, another LoRA rank or another feature tap: a line naming the difference and the checkpoint, never
    a run that silently trains fresh parameters where the saved ones do not fit."""
    from anydressing_train.loop import ResumeError, train
    from anydressing_train.trainer import DressingTrainer

    ds, base, enc_img, enc_txt = setup
    ckpt = str(tmp_path / "state.pt")
    train(trainer_for(base), ds, enc_img, enc_txt, steps=1, lr=1e-3, checkpoint=ckpt)
    head = f"[AnyDressing] training: cannot resume from {ckpt}: it was saved by another training setup ("
    tail = ("). Run with the --slots, --rank, --feature-tap and --finetune-garments-net it was started with, or start "
            "afresh with another --out")
    cases = {
        "slots": (DressingTrainer(base.model.diffusion_model, ["upper", "shoes"], rank=4, alpha=4.0),
                  "it lacks 96 tensor(s) this run trains, e.g. lora.shoes__input_1_0__k__down; it has 96 tensor(s) "
                  "this run does not train, e.g. lora.lower__input_1_0__k__down"),
        "rank": (DressingTrainer(base.model.diffusion_model, ["upper", "lower"], rank=8, alpha=4.0),
                 "192 tensor(s) have another shape, e.g. lora.lower__input_1_0__k__down (4, 32) here (8, 32)"),
        "tap": (trainer_for(base, feature_tap="attn1_input"),
                "it has 12 tensor(s) this run does not train, e.g. lora.lower__output_11_0__k__down"),
    }
    for name, (trainer, problem) in cases.items():
        with pytest.raises(ResumeError) as e:
            train(trainer, ds, enc_img, enc_txt, steps=2, lr=1e-3, checkpoint=ckpt)
        assert str(e.value) == head + problem + tail, name


def test_held_out_evaluation_without_masks_on_both_sides_gives_nan_not_a_division_by_zero(setup):
    """A held-out set whose masks cover everything (or nothing) has no inside/outside contrast: NaN, said plainly;
    per-grid figures are kept apart from per-slot ones whatever the slots are called."""
    import math

    from anydressing_train.data import Sample
    from anydressing_train.loop import evaluate
    from anydressing_train.trainer import DressingTrainer

    ds, base, enc_img, enc_txt = setup
    s = ds[0]
    full = Sample(s.person, dict(s.garments), {k: torch.ones_like(m) for k, m in s.masks.items()}, s.caption)
    out = evaluate(trainer_for(base), [full], enc_img, enc_txt, timesteps=(500,), slots=["upper"])
    assert math.isnan(out["mass_inside"]) and math.isnan(out["mass_outside"]) and math.isnan(out["mass_inside_upper"])
    assert math.isfinite(out["diffusion"])
    odd = DressingTrainer(base.model.diffusion_model, ["my_top", "lower"], rank=4, alpha=4.0)
    sample = Sample(s.person, {"my_top": s.garments["upper"], "lower": s.garments["lower"]},
                    {"my_top": s.masks["upper"], "lower": s.masks["lower"]}, s.caption)
    out = evaluate(odd, [sample], enc_img, enc_txt, timesteps=(500,), slots=["my_top"], by_grid=True)
    grids = sorted(k for k in out if k.startswith("mass_inside_") and k.endswith("_t500"))
    assert "mass_inside_my_top" in out and "mass_inside_8x8_t500" in grids  # (grids whose masks have both sides)
    assert set(grids) <= {f"mass_inside_{g}_t500" for g in ("1x1", "2x2", "4x4", "8x8")}


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


def test_held_out_evaluation_is_logged_and_a_fresh_run_starts_a_new_log(setup, tmp_path):
    import csv

    from anydressing_train.loop import train

    ds, base, enc_img, enc_txt = setup
    train_ds, val = ds.split(0.25, seed=0)
    assert not set(train_ds.items) & set(val.items) and len(val) == 2 and len(train_ds) == 6
    log = tmp_path / "losses.csv"
    log.write_text("step,old\n1,stale\n")
    ckpt = str(tmp_path / "state.pt")
    train(trainer_for(base), train_ds, enc_img, enc_txt, steps=3, lr=1e-3, log=str(log), val_dataset=val,
          eval_every=2, eval_timesteps=(500,), checkpoint=ckpt)
    rows = list(csv.DictReader(log.open()))
    assert "stale" not in log.read_text() and [r["step"] for r in rows] == ["0", "1", "2", "3"]
    evaluated = [r["step"] for r in rows if r["val_diffusion"]]
    assert evaluated == ["0", "2", "3"]  # before training, every 2 steps, and at the end
    for r in rows:
        if r["val_diffusion"]:
            inside, outside = float(r["val_mass_inside_upper"]), float(r["val_mass_outside_upper"])
            assert 0 < inside < 1 and 0 < outside < 1 and float(r["val_localization"]) > 0
    assert rows[0]["diffusion"] == "" and float(rows[1]["diffusion"]) > 0
    train(trainer_for(base), train_ds, enc_img, enc_txt, steps=4, lr=1e-3, log=str(log), val_dataset=val,
          eval_every=2, eval_timesteps=(500,), checkpoint=ckpt)
    assert [r["step"] for r in csv.DictReader(log.open())] == ["0", "1", "2", "3", "4"]  # a resumed run appends


def test_random_synthetic_layout_does_not_tie_a_garments_place_to_its_slot(tmp_path):
    import numpy as np

    from anydressing_train.data import FolderDataset, make_synthetic

    make_synthetic(str(tmp_path), count=24, size=32, layout="random")
    ds = FolderDataset(str(tmp_path))
    halves = {"upper": set(), "lower": set()}
    for i in range(len(ds)):
        s = ds[i]
        assert float((s.masks["upper"] * s.masks["lower"]).sum()) == 0  # never overlapping
        for slot, m in s.masks.items():
            ys, xs = np.nonzero(m.numpy() > 0.5)
            halves[slot].add(("top" if ys.mean() < 16 else "bottom", "left" if xs.mean() < 16 else "right"))
    assert len(halves["upper"]) >= 3 and len(halves["lower"]) >= 3 and halves["upper"] & halves["lower"]
    with pytest.raises(ValueError, match="layout must be one of fixed, random, halves, not 'grid'"):
        make_synthetic(str(tmp_path), layout="grid")


def test_apply_auto_strength_is_the_files_value(host, setup):
    """Apply Dressing-Attention's default strength (-1, auto) runs a trained file at its recorded strength and
    training-free at the paper's 0.7; a number is used as given (so workflows saved with 0.7 keep 0.7)."""
    ds, base, enc_img, enc_txt = setup
    nodes = host.pack_module("nodes.apply_dressing_attention")
    spec = nodes.ApplyDressingAttention.INPUT_TYPES()["required"]["strength"][1]
    assert spec["default"] == -1.0 and spec["min"] == -1.0 and "auto" in spec["tooltip"]
    tr = trainer_for(base, strength=0.85)
    path = host.anydressing_dir() / "trained_strength_test.safetensors"
    tr.save(str(path), {"steps": 0})
    gnets = host.pack_module("nodes.load_garments_net")
    encode = host.pack_module("nodes.encode_garments").encode
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))

    def strength_used(gnet, value):
        feats = encode(gnet, latents, ["upper"])
        (m,) = nodes.ApplyDressingAttention.execute(base, feats, value, "", 0.0, 1.0, "auto").args
        return {b.strength for b in host.pack_module("nodes.glue").garment_term(m).branches[-1:]}

    trained = gnets.load(path.name, str(path), base)
    assert strength_used(trained, -1.0) == {0.85}
    assert strength_used(trained, 0.7) == {0.7} and strength_used(trained, 0.0) == {0.0}
    assert strength_used(gnets.load("training-free", None, base), -1.0) == {0.7}
    path.unlink()


def test_a_workflow_saved_with_a_numeric_strength_still_validates(host):
    """UI workflows keep widget values by position: the strength FLOAT stays where it was, so an older workflow's
    0.7 loads as 0.7, and the shipped ones carry -1 (auto)."""
    import asyncio

    from anydressing_core.workflow_api import to_api
    from test_host_workflows import FILE_INPUTS, WORKFLOWS, load

    path = next(p for p in WORKFLOWS if p.name == "anydressing_upper_lower.json")
    wf, classes, absent = load(path, host)
    apply = next(n for n in wf["nodes"] if n["type"] == "AnyDressingApplyDressingAttention")
    assert apply["widgets_values"][0] == -1.0
    apply["widgets_values"][0] = 0.7  # as every workflow saved before issue 13
    api = to_api(wf, classes)
    node = next(n for n in api.values() if n["class_type"] == "AnyDressingApplyDressingAttention")
    assert node["inputs"]["strength"] == 0.7 and node["inputs"]["apply_to_uncond"] == "auto"
    for n in api.values():  # placeholders so combo validation sees the files; validation never opens them
        if n["class_type"] in FILE_INPUTS and n["inputs"][FILE_INPUTS[n["class_type"]][0]] != "training-free":
            key, folder = FILE_INPUTS[n["class_type"]]
            (host.base / folder).mkdir(parents=True, exist_ok=True)
            (host.base / folder / n["inputs"][key]).touch()
    valid, err, outputs, node_errors = asyncio.run(host.execution.validate_prompt("wf", api, None))
    assert valid, (err, node_errors)
