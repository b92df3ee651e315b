"""Host-free: the single-process training engine (accumulation, scaling) and the refusals of the accelerate one."""

from __future__ import annotations

import pytest
import torch

from anydressing_train.engine import LocalEngine, check_distributed_type, make_engine


def test_local_engine_accumulates_gradients_and_steps_once_per_cycle():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = torch.optim.SGD([w], lr=1.0)
    engine = LocalEngine(gradient_accumulation_steps=2)
    assert engine.prepare(opt) is opt
    xs = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0])]
    for x in xs:
        with engine.accumulate(None):
            engine.backward((w * x).sum())
            engine.step(opt)
        if x is xs[0]:
            assert torch.equal(w.detach(), torch.tensor([1.0, 2.0]))  # no step inside the cycle
    # one SGD step with the mean of the two gradients
    assert torch.allclose(w.detach(), torch.tensor([1.0 - 0.5, 2.0 - 1.5])) and w.grad is None


def test_engine_refusals_say_what_to_do():
    with pytest.raises(ValueError, match="mixed precision must be one of no, fp16, bf16, not 'fp8'"):
        LocalEngine("fp8")
    with pytest.raises(RuntimeError, match=r"configured for FSDP.*accelerate launch --multi_gpu"):
        check_distributed_type("FSDP")
    with pytest.raises(RuntimeError, match=r"configured for DEEPSPEED"):
        check_distributed_type("DEEPSPEED")
    check_distributed_type("MULTI_GPU")
    assert type(make_engine(use_accelerate=False)) is LocalEngine


def test_a_multi_process_launch_without_accelerate_is_refused(monkeypatch):
    import anydressing_train.engine as engine_mod

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(engine_mod, "accelerate_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"launched with several processes but accelerate is not installed; "
                                           r"install the training extra: pip install 'accelerate>=1.0'"):
        make_engine()
