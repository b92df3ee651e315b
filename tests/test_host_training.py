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


def trainer_for(base, **kwargs):
    from anydressing_train.trainer import DressingTrainer

    return DressingTrainer(base.model.diffusion_model, ["upper", "lower"], rank=4, alpha=4.0, **kwargs)


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
    gnet = host.pack_module("nodes.garments_net").load(path.name, str(path), base)
    assert gnet.feature_tap == tap and gnet.strength == 0.85
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    # the pack takes raw VAE latents and scales them (x 0.18215); training works on scaled latents
    pack = host.pack_module("nodes.encode").encode(gnet, latents / 0.18215, ["lower", "upper"])
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


def one_sample_batch(ds, enc_img, enc_txt, slots=("upper", "lower")):
    from anydressing_train.loop import batch_for

    with torch.no_grad():
        x0, garments, masks, context = batch_for(ds[0], list(slots), enc_img, enc_txt)
    g = torch.Generator().manual_seed(3)
    return x0, context, garments, list(slots), masks, torch.tensor([400]), torch.randn(x0.shape, generator=g)


def losses_and_grads(tr, batch):
    tr.zero_grad(set_to_none=True)
    out = tr(*batch)
    (out["diffusion"] + out["localization"]).backward()
    return out, {n: p.grad.detach().clone() for n, p in tr.named_parameters() if p.grad is not None}


def saved_activation_bytes(fn) -> int:
    """Bytes autograd keeps for the backward pass while fn runs (the memory gradient checkpointing saves)."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


def test_gradient_checkpointing_gives_the_same_gradients_with_fewer_kept_activations(setup):
    from anydressing_train.trainer import DressingTrainer

    ds, base, enc_img, enc_txt = setup
    batch = one_sample_batch(ds, enc_img, enc_txt)
    plain = trainer_for(base)
    ref, ref_grads = losses_and_grads(plain, batch)
    import copy

    ckpt = DressingTrainer(copy.deepcopy(base.model.diffusion_model), ["upper", "lower"], rank=4, alpha=4.0,
                           gradient_checkpointing=True)
    out, grads = losses_and_grads(ckpt, batch)
    assert torch.equal(out["diffusion"], ref["diffusion"]) and torch.equal(out["localization"], ref["localization"])
    assert grads.keys() == ref_grads.keys() and len(grads) > 16
    for n, g in grads.items():
        scale = ref_grads[n].abs().max().clamp_min(1e-12)
        assert float((g - ref_grads[n]).abs().max() / scale) < 1e-5, n
    kept_plain = saved_activation_bytes(lambda: plain(*batch))
    kept_ckpt = saved_activation_bytes(lambda: ckpt(*batch))
    print("activations kept for backward: plain", kept_plain, "checkpointed", kept_ckpt)
    assert kept_ckpt < 0.5 * kept_plain


def test_bf16_mixed_precision_keeps_float32_weights_and_trains(setup):
    import copy

    from anydressing_train.engine import LocalEngine, half_dtype
    from anydressing_train.loop import train
    from anydressing_train.trainer import DressingTrainer

    ds, base, enc_img, enc_txt = setup
    batch = one_sample_batch(ds, enc_img, enc_txt)
    ref = trainer_for(base)
    with torch.no_grad():
        want = ref(*batch)
    unet = copy.deepcopy(base.model.diffusion_model).to(half_dtype("bf16"))  # frozen weights stored in bf16
    tr = DressingTrainer(unet, ["upper", "lower"], rank=4, alpha=4.0)
    engine = LocalEngine("bf16")
    with torch.no_grad(), engine.autocast():
        got = tr(*batch)
    for k in ("diffusion", "localization"):
        assert abs(float(got[k]) - float(want[k])) < 0.05 * float(want[k]), (k, got[k], want[k])
    before = tr.w_k["input_1_0"].detach().clone()
    history = train(tr, ds, enc_img, enc_txt, steps=2, lr=1e-3, engine=engine)
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(h["total"])) for h in history)
    assert all(p.dtype == torch.float32 for p in tr.parameters() if p.requires_grad)
    assert not torch.equal(tr.w_k["input_1_0"].detach(), before)
    with pytest.raises(ValueError, match="fp16 mixed precision needs a CUDA device; use bf16 on the CPU"):
        LocalEngine("fp16")


def test_gradient_accumulation_takes_one_optimizer_step_per_step(setup, tmp_path):
    from anydressing_train.engine import LocalEngine
    from anydressing_train.loop import train

    ds, base, enc_img, enc_txt = setup
    ckpt = tmp_path / "state.pt"
    history = train(trainer_for(base), ds, enc_img, enc_txt, steps=2, lr=1e-3, checkpoint=str(ckpt),
                    engine=LocalEngine(gradient_accumulation_steps=3))
    state = torch.load(ckpt, weights_only=True)
    adam_steps = {float(s["step"]) for s in state["optimizer"]["state"].values()}
    assert [h["step"] for h in history] == [1, 2] and adam_steps == {2.0}


class Interrupt(Exception):
    pass


class StopAfter:
    """A dataset that raises after `limit` samples: an interrupted run."""

    def __init__(self, ds, limit):
        self.ds, self.limit, self.drawn = ds, limit, 0

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        self.drawn += 1
        if self.drawn > self.limit:
            raise Interrupt()
        return self.ds[i]


def test_an_interrupted_run_resumes_from_its_last_periodic_checkpoint(setup, tmp_path):
    from anydressing_train.loop import train

    ds, base, enc_img, enc_txt = setup
    ckpt = str(tmp_path / "state.pt")
    tr = trainer_for(base)
    with pytest.raises(Interrupt):
        train(tr, StopAfter(ds, 5), enc_img, enc_txt, steps=8, lr=1e-3, checkpoint=ckpt, save_every=2)
    state = torch.load(ckpt, weights_only=True)
    assert int(state["step"]) == 4 and not (tmp_path / "state.pt.tmp").exists()
    saved = state["trainer"]["w_v.input_1_0"]
    assert not torch.equal(saved, tr.w_v["input_1_0"].detach())  # step 5 ran after the save but was not kept
    fresh = trainer_for(base)
    history = train(fresh, ds, enc_img, enc_txt, steps=8, lr=1e-3, checkpoint=ckpt, save_every=2)
    assert [h["step"] for h in history] == list(range(1, 9))
    assert int(torch.load(ckpt, weights_only=True)["step"]) == 8


def test_finetuned_garments_net_is_saved_and_gives_the_pack_the_training_time_features(host, setup):
    from anydressing_core.native_format import read_native
    from anydressing_train.trainer import DressingTrainer

    ds, base, enc_img, enc_txt = setup
    unet = base.model.diffusion_model
    frozen = {k: v.clone() for k, v in unet.state_dict().items()}
    tr = DressingTrainer(unet, ["upper"], rank=4, alpha=4.0, finetune_garments_net=True, feature_tap="attn1_input")
    trainable = {n for n, p in tr.named_parameters() if p.requires_grad}
    assert any(n.startswith("garments_net.input_blocks.") for n in trainable)
    assert not any(n.startswith("unet.") for n in trainable)
    # past the last feature tap (attn1 input of output_blocks.11) nothing can get a gradient: frozen, not trained
    assert not any(n.startswith(("garments_net.out.", "garments_net.output_blocks.11.1.proj_out",
                                 "garments_net.output_blocks.11.1.transformer_blocks.0.attn1.")) for n in trainable)
    assert "garments_net.output_blocks.11.1.transformer_blocks.0.norm1.weight" in trainable
    with torch.no_grad():  # as if GarmentsNet had been trained: it now differs from the denoising UNet
        for p in tr.garments_net.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(4)))
    assert all(torch.equal(v, frozen[k]) for k, v in unet.state_dict().items())
    path = host.anydressing_dir() / "trained_full_test.safetensors"
    tr.save(str(path), {"base_model": "tiny", "steps": 0})
    contents = read_native(str(path))
    assert contents.metadata["garments_net"] == "fine-tuned"
    assert contents.unet.keys() == tr.garments_net.state_dict().keys()
    gnet = host.pack_module("nodes.garments_net").load(path.name, str(path), base)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    pack = host.pack_module("nodes.encode").encode(gnet, latents / 0.18215, ["upper"])
    with torch.no_grad():
        ours = tr.encode(latents, ["upper"])
        base_feats = trainer_for(base, feature_tap="attn1_input").encode(latents, ["upper"])
    for key, t in ours.items():
        ref = t.reshape(1, -1, t.shape[-1])
        assert float((pack.layers[key] - ref).abs().max() / ref.abs().max()) < 1e-5, key
    key = ("output", 5, 0)
    assert float((ours[key] - base_feats[key]).abs().max()) > 1e-3  # the fine-tuned GarmentsNet was used
    path.unlink()


def test_two_processes_under_accelerate_launch_share_synchronised_weights(host, tmp_path):
    """Multi-process training (accelerate launch, DDP on gloo): each rank draws its own samples, the weights stay
    identical across ranks, the log and checkpoint are written once."""
    import json
    import os
    import subprocess
    import sys

    import host as host_mod
    from anydressing_train.data import make_synthetic

    pytest.importorskip("accelerate")
    make_synthetic(str(tmp_path / "data"), count=8, size=64)
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_DISABLE_RICH="1")
    # the command a user runs on a multi-GPU machine; on this CPU-only one its launcher (torch.distributed.run)
    # starts the two processes all the same and Accelerator(cpu=True) joins them over gloo
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                        str(host_mod.REPO / "tests" / "ddp_train.py"), str(host.root), str(tmp_path / "data"),
                        str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    ranks = [json.loads((out / f"rank{i}.json").read_text()) for i in range(2)]
    assert [x["engine"] for x in ranks] == ["AccelerateEngine"] * 2 and [x["processes"] for x in ranks] == [2, 2]
    assert all(len(x["drawn"]) == 4 for x in ranks)  # 2 steps x 2 accumulated samples each
    assert ranks[0]["drawn"] != ranks[1]["drawn"]  # different data per rank ...
    d0, d1 = ranks[0]["digest"], ranks[1]["digest"]
    assert d0.keys() == d1.keys() and all(d0[k] == d1[k] for k in d0)  # ... yet the same weights: DDP averaged
    assert ranks[0]["history"] == ranks[1]["history"]  # logged losses are the mean over ranks
    assert (out / "losses.csv").read_text().count("\n") == 3
    state = torch.load(out / "state.pt", weights_only=True)
    assert int(state["step"]) == 2
    assert float(state["trainer"]["w_k.input_1_0"].double().sum()) == d0["w_k.input_1_0"]
    import adtest_tiny

    w_k = adtest_tiny.tiny_model_patcher(0).model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn1.to_k
    assert float(w_k.weight.detach().double().sum()) != d0["w_k.input_1_0"]  # and they were trained


def test_localization_loss_is_eq9_squared_norm_over_each_layers_pixels(setup):
    """L_loc = mean over the DA layers of (1/N) sum_k ||A_k - M_k||^2, the norm a sum over the layer's pixels
    (eq. 9); the old per-pixel mean stays available as loc_reduction="mean". Reference from the probe's A_k."""
    from anydressing_core.branch import AttentionProbe
    from anydressing_core.masks import resize_to_grid

    ds, base, enc_img, enc_txt = setup
    batch = one_sample_batch(ds, enc_img, enc_txt)
    x0, context, garments, slots, masks, t, noise = batch
    tr = trainer_for(base)
    with torch.no_grad():
        got = tr(*batch)["localization"]
        probe = AttentionProbe()
        tr.denoise(tr.add_noise(x0, noise, t), t.float(), context, tr.encode(garments, slots), probe=probe)
    sums, means, pixels = [], [], []
    for mass, (h, w) in next(iter(probe.maps.values())).values():  # [N, 1, h*w] per layer
        target = resize_to_grid(masks, h, w)
        per_garment = [float(((mass[k, 0] - target[k]) ** 2).sum()) for k in range(len(slots))]
        sums.append(sum(per_garment) / len(slots))
        means.append(sum(p / (h * w) for p in per_garment) / len(slots))
        pixels.append(h * w)
    assert len(sums) == 16 and sorted(set(pixels)) == [1, 4, 16, 64]
    assert abs(float(got) - sum(sums) / 16) < 1e-5 * sum(sums)
    with torch.no_grad():
        old = trainer_for(base, loc_reduction="mean")(*batch)["localization"]
    assert abs(float(old) - sum(means) / 16) < 1e-5 * sum(means)
    assert float(got) > 10 * float(old)  # the 8 x 8 layers weigh 64 times what they did
    # paper_scale: the sum each layer would have at 768 x 576 (96 x 72 latent pixels / f^2 at downsampling f)
    paper = sum(m * 6912 / (64 / p) for m, p in zip(means, pixels)) / 16
    with torch.no_grad():
        scaled = trainer_for(base, loc_reduction="paper_scale")(*batch)["localization"]
    assert abs(float(scaled) - paper) < 1e-5 * paper and abs(float(scaled) / float(got) - 108.0) < 1e-3
    with pytest.raises(ValueError, match="loc_reduction must be one of sum, paper_scale, mean, not 'max'"):
        trainer_for(base, loc_reduction="max")


@pytest.mark.parametrize("tap", ["gfe_output", "attn1_input"])
def test_every_gfe_lora_the_trainer_makes_receives_a_gradient(setup, tap):
    """Under F^new every layer's LoRA shapes its own feature, the last layer's included; under the attn1-input tap
    the last layer's LoRA could never get a gradient, so it is not made."""
    ds, base, enc_img, enc_txt = setup
    tr = trainer_for(base, feature_tap=tap)
    _, grads = losses_and_grads(tr, one_sample_batch(ds, enc_img, enc_txt))
    ups = [n for n in tr.lora if n.endswith("__up")]  # up starts at 0, so only its gradient is non-zero at step 0
    assert len(ups) == 2 * 3 * (16 if tap == "gfe_output" else 15)
    last = [n for n in ups if "__output_11_0__" in n]
    assert len(last) == (6 if tap == "gfe_output" else 0)
    dead = [n for n in ups if float(grads[f"lora.{n}"].abs().max()) == 0.0]
    assert dead == []
    assert all(float(grads[f"w_k.{n}"].abs().max()) > 0 for n in tr.w_k)


def test_the_trainer_leaves_the_unet_it_was_given_unchanged(setup):
    """The documented API trains a private copy: the caller's UNet (e.g. ComfyUI's loaded MODEL) keeps its
    requires_grad flags, weights, dtype and hooks, even with gradient checkpointing and a training step."""
    from anydressing_train.loop import train

    ds, base, enc_img, enc_txt = setup
    unet = base.model.diffusion_model
    flags = {n: p.requires_grad for n, p in unet.named_parameters()}
    weights = {k: v.clone() for k, v in unet.state_dict().items()}
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in unet.modules())
    tr = trainer_for(base, gradient_checkpointing=True)
    train(tr, ds, enc_img, enc_txt, steps=1, lr=1e-3)
    assert tr.unet is not unet
    assert {n: p.requires_grad for n, p in unet.named_parameters()} == flags and any(flags.values())
    assert all(torch.equal(v, weights[k]) for k, v in unet.state_dict().items())
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in unet.modules()) == hooks
    assert not any(p.requires_grad for p in tr.unet.parameters())


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
    nodes = host.pack_module("nodes.node_classes")
    spec = nodes.ApplyDressingAttention.INPUT_TYPES()["required"]["strength"][1]
    assert spec["default"] == -1.0 and spec["min"] == -1.0 and "auto" in spec["tooltip"]
    tr = trainer_for(base, strength=0.85)
    path = host.anydressing_dir() / "trained_strength_test.safetensors"
    tr.save(str(path), {"steps": 0})
    gnets = host.pack_module("nodes.garments_net")
    encode = host.pack_module("nodes.encode").encode
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))

    def strength_used(gnet, value):
        feats = encode(gnet, latents, ["upper"])
        (m,) = nodes.ApplyDressingAttention().apply(base, feats, value, "", 0.0, 1.0, "auto")
        replaces = m.model_options["transformer_options"]["patches_replace"]["attn1"]
        return {r.branches[-1].strength for r in replaces.values()}

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
