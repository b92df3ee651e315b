"""The training tests' shared setup: a synthetic dataset and tiny models (host: ComfyUI's VAE and UNet code)."""

from __future__ import annotations

import pytest
import torch


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
