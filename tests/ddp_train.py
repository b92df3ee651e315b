"""Run by test_host_training under `accelerate launch --multi_gpu --num_processes 2`: the training loop on tiny models,
one sample stream per process, gradients synchronised by DDP (gloo). Writes what each rank saw to OUT/rank<i>.json.

    python -m accelerate.commands.launch --multi_gpu --num_processes 2 tests/ddp_train.py COMFYUI DATA OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
for p in (str(TESTS.parent), str(TESTS / "fixture_pack")):
    sys.path.insert(0, p)


def main(comfyui: str, data: str, out: str) -> None:
    from anydressing_train.__main__ import boot

    boot(Path(comfyui), ["--cpu", "--use-pytorch-cross-attention"])
    import torch

    import adtest_tiny
    from anydressing_train.data import FolderDataset
    from anydressing_train.engine import make_engine
    from anydressing_train.loop import train
    from anydressing_train.trainer import DressingTrainer

    engine = make_engine(cpu=True, gradient_accumulation_steps=2)
    base = adtest_tiny.tiny_model_patcher(0)
    vae = adtest_tiny.tiny_vae(0)
    context = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(5))
    drawn: list[int] = []

    class Recording(FolderDataset):
        def __getitem__(self, i):
            drawn.append(i)
            return super().__getitem__(i)

    def encode_image(x):
        with torch.no_grad():
            return vae.encode(x) * 0.18215

    tr = DressingTrainer(base.model.diffusion_model, ["upper", "lower"], rank=4, alpha=4.0)
    history = train(tr, Recording(data), encode_image, lambda caption: context, steps=2, lr=1e-2, engine=engine,
                    checkpoint=str(Path(out) / "state.pt"), log=str(Path(out) / "losses.csv"))
    digest = {n: float(p.detach().double().sum()) for n, p in tr.named_parameters() if p.requires_grad}
    (Path(out) / f"rank{engine.process_index}.json").write_text(json.dumps({
        "engine": type(engine).__name__, "processes": engine.num_processes, "drawn": drawn,
        "history": history, "digest": digest}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
