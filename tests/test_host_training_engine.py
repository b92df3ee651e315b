"""Host: how training runs: gradient checkpointing, bf16, accumulation, periodic checkpoints, a fine-tuned GarmentsNet,
two processes, eq. 9's L_loc, every LoRA reached by a gradient, the given UNet untouched (tiny models, CPU)."""

from __future__ import annotations

import pytest
import torch

from training_setup import setup, trainer_for  # noqa: F401  (setup: the module's fixture)

pytestmark = pytest.mark.host


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
    gnet = host.pack_module("nodes.load_garments_net").load(path.name, str(path), base)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    pack = host.pack_module("nodes.encode_garments").encode(gnet, latents / 0.18215, ["upper"])
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


def test_localization_loss_is_eq9_squared_norm_over_each_layers_pixels(setup):
    """L_loc = mean over the DA layers of (1/N) sum_k ||A_k - M_k||^2, the norm a sum over the layer's pixels
    (eq. 9); the old per-pixel mean stays available as loc_reduction="mean". Reference from the probe's A_k."""
    from anydressing_core.run_state import AttentionProbe
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
