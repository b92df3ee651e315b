"""The engine the training loop runs on: processes, devices, mixed precision, gradient accumulation.

With the training extra installed (`pip install "accelerate>=1.0"`, the `train` extra of pyproject.toml),
`accelerate launch` runs the same loop on several GPUs or nodes (DistributedDataParallel) and handles fp16 loss
scaling; without it, a single-process engine with the same interface keeps the loop usable on one device. The loop
only talks to this interface. DDP rather than sharding (FSDP, DeepSpeed ZeRO): the trained weights (LoRA and W')
are small and the frozen UNet fits on every GPU, so sharding would add communication and save little.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Optional

import torch

MIXED_PRECISION = ("no", "fp16", "bf16")
SHARDED = ("DEEPSPEED", "FSDP", "MEGATRON_LM")  # accelerate's distributed types that shard or rewrite the model


def half_dtype(mixed_precision: str) -> Optional[torch.dtype]:
    """The dtype frozen weights are stored in under a mixed-precision mode (None: keep float32)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision)


def _check_mode(mixed_precision: str) -> None:
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"mixed precision must be one of {', '.join(MIXED_PRECISION)}, not {mixed_precision!r}")


def check_distributed_type(kind: str) -> None:
    """Refuse accelerate setups that shard or rewrite the model: the loop saves and resumes plain state dicts."""
    if kind in SHARDED:
        raise RuntimeError(f"[AnyDressing] training: accelerate is configured for {kind}, which this trainer does "
                           f"not support (it trains small LoRA and W' weights next to a frozen UNet that fits on "
                           f"every GPU); launch with DDP instead: accelerate launch --multi_gpu ... (or run "
                           f"`accelerate config` and pick multi-GPU without DeepSpeed or FSDP)")


class LocalEngine:
    """One process on one device: autocast for mixed precision, a GradScaler for fp16, local accumulation."""

    num_processes = 1
    process_index = 0
    is_main_process = True

    def __init__(self, mixed_precision: str = "no", device: Optional[torch.device] = None,
                 gradient_accumulation_steps: int = 1):
        _check_mode(mixed_precision)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if mixed_precision == "fp16" and self.device.type != "cuda":
            raise ValueError("fp16 mixed precision needs a CUDA device; use bf16 on the CPU")
        self.mixed_precision = mixed_precision
        self.gradient_accumulation_steps = max(1, int(gradient_accumulation_steps))
        self.scaler = torch.amp.GradScaler("cuda") if mixed_precision == "fp16" else None
        self._micro = 0
        self._optimizers: list = []
        self.sync_gradients = True

    def prepare(self, *objects):
        self._optimizers += [o for o in objects if isinstance(o, torch.optim.Optimizer)]
        return objects if len(objects) > 1 else objects[0]

    def autocast(self):
        dtype = half_dtype(self.mixed_precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    @contextlib.contextmanager
    def accumulate(self, model):
        self._micro += 1
        self.sync_gradients = self._micro % self.gradient_accumulation_steps == 0
        yield

    def backward(self, loss: torch.Tensor) -> None:
        loss = loss / self.gradient_accumulation_steps
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def clip_grad_norm_(self, parameters, max_norm: float):
        if self.scaler is not None:
            # parameters may be a generator: materialise once so the unscale and the clip see the same list
            parameters = list(parameters)
            for opt in self._optimizers:
                self.scaler.unscale_(opt)
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)

    def step(self, optimizer) -> None:
        """Optimizer step and zero_grad, only at the end of an accumulation cycle."""
        if not self.sync_gradients:
            return
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def wait_for_everyone(self) -> None:
        pass


class AccelerateEngine(LocalEngine):
    """accelerate's Accelerator behind the same interface (DDP; unused LoRA slots of a step are allowed)."""

    def __init__(self, mixed_precision: str = "no", cpu: bool = False, gradient_accumulation_steps: int = 1):
        _check_mode(mixed_precision)
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        # garment dropout leaves some slots' LoRA without gradients in a step: DDP must allow unused parameters
        self.accelerator = Accelerator(mixed_precision=mixed_precision, cpu=cpu,
                                       gradient_accumulation_steps=max(1, int(gradient_accumulation_steps)),
                                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
        check_distributed_type(str(getattr(self.accelerator.distributed_type, "value",
                                           self.accelerator.distributed_type)))
        self.mixed_precision = mixed_precision
        self.gradient_accumulation_steps = self.accelerator.gradient_accumulation_steps
        self.device = self.accelerator.device
        self.scaler = None

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes

    @property
    def process_index(self) -> int:
        return self.accelerator.process_index

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def sync_gradients(self) -> bool:
        return self.accelerator.sync_gradients

    def prepare(self, *objects):
        return self.accelerator.prepare(*objects)

    def autocast(self):
        return self.accelerator.autocast()

    def accumulate(self, model):
        return self.accelerator.accumulate(model)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)  # divides by the accumulation steps and scales fp16 losses

    def clip_grad_norm_(self, parameters, max_norm: float):
        return self.accelerator.clip_grad_norm_(parameters, max_norm)

    def step(self, optimizer) -> None:
        optimizer.step()  # accelerate's optimizer wrapper skips the step inside an accumulation cycle
        optimizer.zero_grad(set_to_none=True)

    def reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(value.detach().to(self.device), reduction="mean")

    def wait_for_everyone(self) -> None:
        self.accelerator.wait_for_everyone()


def accelerate_available() -> bool:
    return importlib.util.find_spec("accelerate") is not None


def launched_processes() -> int:
    """How many processes a launcher (accelerate launch, torchrun) started, from the environment."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def make_engine(mixed_precision: str = "no", device: Optional[torch.device] = None, cpu: bool = False,
                gradient_accumulation_steps: int = 1, use_accelerate: Optional[bool] = None) -> LocalEngine:
    """accelerate when it is installed (always under a multi-process launch), else the single-process engine."""
    _check_mode(mixed_precision)
    available = accelerate_available()
    if use_accelerate is None:
        use_accelerate = available
    if launched_processes() > 1 and not available:
        raise RuntimeError("[AnyDressing] training: this run was launched with several processes but accelerate is "
                           "not installed; install the training extra: pip install 'accelerate>=1.0'")
    if use_accelerate:
        if not available:
            raise RuntimeError("[AnyDressing] training: accelerate is not installed; install the training extra: "
                               "pip install 'accelerate>=1.0'")
        return AccelerateEngine(mixed_precision, cpu=cpu, gradient_accumulation_steps=gradient_accumulation_steps)
    return LocalEngine(mixed_precision, device=device, gradient_accumulation_steps=gradient_accumulation_steps)
