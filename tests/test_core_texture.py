"""Host-free: the texture-learning pieces (Canny edges, a VGG-feature distance from a user's file, eq. 10-13)."""

from __future__ import annotations

import torch

from anydressing_train.texture import VGGFeatures, canny, perceptual_distance, texture_loss


def random_vgg16_state_dict(seed=0):
    g = torch.Generator().manual_seed(seed)
    chans = [3, 64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    convs = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
    sd = {}
    for j, i in enumerate(convs):
        cin, cout = chans[j], chans[j + 1]
        sd[f"features.{i}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) / (cin * 9) ** 0.5
        sd[f"features.{i}.bias"] = torch.zeros(cout)
    return sd


def square(size=32, lo=8, hi=24):
    img = torch.zeros(1, 3, size, size)
    img[:, :, lo:hi, lo:hi] = 1.0
    return img


def test_canny_finds_the_border_of_a_square_and_nothing_else():
    e = canny(square())
    assert e.shape == (1, 1, 32, 32)
    assert float(e[0, 0, 16, 16]) == 0 and float(e[0, 0, 2, 2]) == 0  # flat inside and outside
    border = e[0, 0, 6:26, 6:26].sum() - e[0, 0, 10:22, 10:22].sum()
    assert float(border) >= 4 * 12 and float(e.sum()) == float(border)  # edges only around the border
    assert float(canny(torch.full((1, 3, 16, 16), 0.3)).sum()) == 0


def test_perceptual_distance_is_zero_for_equal_images_and_grows_with_change():
    net = VGGFeatures(random_vgg16_state_dict())
    a = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert float(perceptual_distance(net, a, a)) == 0
    small = perceptual_distance(net, a, (a + 0.02).clamp(0, 1))
    large = perceptual_distance(net, a, 1 - a)
    assert 0 < float(small) < float(large)


def test_texture_loss_backpropagates_to_the_noise_prediction():
    net = VGGFeatures(random_vgg16_state_dict())
    target = square(32)
    masks = torch.zeros(2, 32, 32)
    masks[0, :16] = 1
    masks[1, 16:] = 1
    decoder = torch.nn.Conv2d(4, 3, 1)

    def decode(z):
        return torch.sigmoid(decoder(torch.nn.functional.interpolate(z, size=(32, 32))))

    x_t = torch.randn(1, 4, 4, 4)
    eps = torch.randn(1, 4, 4, 4, requires_grad=True)
    out = texture_loss(decode, x_t, eps, torch.tensor(0.9), target, masks, net)
    assert set(out) == {"perceptual", "highfreq"} and all(float(v.detach()) > 0 for v in out.values())
    (out["perceptual"] + out["highfreq"]).backward()
    assert eps.grad is not None and float(eps.grad.abs().sum()) > 0
