"""The training latents' scale check: SD1.5's VAE x 0.18215 gives latents of about unit std; a checkpoint whose VAE
does not (or the toy's random VAE at 0.18215, std 0.09) leaves garments' places hidden by the noise at every t."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from anydressing_train.loop import LATENT_STD_RANGE, latent_std, latent_std_warning


def test_latent_std_is_the_std_of_the_first_samples_latents_as_the_unet_sees_them():
    gen = torch.Generator().manual_seed(0)
    people = [torch.rand(16, 16, 3, generator=gen) for _ in range(10)]
    dataset = [SimpleNamespace(person=p) for p in people]

    def encode(x):  # [1, H, W, 3] -> [1, 4, H/8... ]: any fixed map will do, the check reads what it returns
        return 3.0 * x.permute(0, 3, 1, 2)[:, :2] - 1.0

    reference = torch.cat([3.0 * p.permute(2, 0, 1)[:2].unsqueeze(0) - 1.0 for p in people[:8]]).std()
    assert abs(latent_std(encode, dataset) - float(reference)) < 1e-6
    reference4 = torch.cat([3.0 * p.permute(2, 0, 1)[:2].unsqueeze(0) - 1.0 for p in people[:4]]).std()
    assert abs(latent_std(encode, dataset, count=4) - float(reference4)) < 1e-6


def test_latent_std_warning_names_the_std_the_expected_range_and_the_fix():
    low, high = LATENT_STD_RANGE
    assert latent_std_warning(1.0) is None and latent_std_warning(low) is None and latent_std_warning(high) is None
    assert latent_std_warning(0.0939) == (
        "[AnyDressing] training: the training images' latents have std 0.0939, where SD1.5's VAE with its 0.18215 "
        "scale gives about 1 (expected 0.35-3.0): this checkpoint's VAE does not match its UNet's latent scale, so "
        "the noise of each timestep hides more of the image than the UNet learned to undo and the garments' places "
        "are hard to learn; use a checkpoint with the SD1.5 VAE baked in")
    assert "hides less of the image" in latent_std_warning(5.0)
