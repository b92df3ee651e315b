"""Host-free: mutated native files end in FormatError or a valid load, nothing else (bounded, seeded)."""

from __future__ import annotations

import random

import torch

from anydressing_core.native_format import FormatError, read_native, write_native

LAYER = "input_blocks.1.1.transformer_blocks.0"
CASES = 300


def seed_file(path):
    g = torch.Generator().manual_seed(0)
    write_native(str(path), unet={"input_blocks.0.0.weight": torch.randn(8, 4, 3, 3, generator=g)},
                 loras={"upper": {LAYER: {"q": (torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g), 1.0)}}},
                 dressing={LAYER: (torch.randn(8, 8, generator=g), torch.randn(8, 8, generator=g))})
    return path.read_bytes()


def mutate(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    header_len = int.from_bytes(b[:8], "little")
    kind = rng.randrange(6)
    if kind == 0:  # flip bytes in the JSON header
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(8, 8 + header_len)
            b[i] = rng.randrange(256)
    elif kind == 1:  # wrong header length
        b[:8] = rng.choice([0, 1, header_len - 1, header_len + 7, 2**40, 2**63 - 1]).to_bytes(8, "little")
    elif kind == 2:  # truncate
        b = b[:rng.randrange(len(b))]
    elif kind == 3:  # corrupt the tensor data (NaN/inf patterns included)
        for _ in range(rng.randint(1, 16)):
            i = rng.randrange(8 + header_len, len(b))
            b[i] = rng.choice([0xFF, 0x7F, 0x80, 0x00, rng.randrange(256)])
    elif kind == 4:  # append junk
        b += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    else:  # swap header text fragments (dtype, shapes, offsets)
        text = bytes(b[8:8 + header_len]).decode("utf-8", "replace")
        for a, c in (("F32", rng.choice(["I64", "F16", "BOOL", "U8", "F64"])), ("[8,8]", "[64,1]"),
                     ("anydressing_format\":\"1", "anydressing_format\":\"9"), ("upper", "scarf")):
            if rng.random() < 0.5:
                text = text.replace(a, c, 1)
        new = text.encode()
        b = bytearray(len(new).to_bytes(8, "little")) + new + b[8 + header_len:]
    return bytes(b)


def test_mutated_native_files_give_format_errors_or_valid_loads(tmp_path):
    data = seed_file(tmp_path / "seed.safetensors")
    rng = random.Random(1234)
    outcomes = {"error": 0, "valid": 0}
    for i in range(CASES):
        path = tmp_path / f"case{i}.safetensors"
        path.write_bytes(mutate(data, rng))
        try:
            contents = read_native(str(path))
        except FormatError:
            outcomes["error"] += 1
        else:
            outcomes["valid"] += 1
            for t in contents.unet.values():
                assert t.is_floating_point() and torch.isfinite(t).all()
            for layer in contents.dressing.values():
                assert set(layer) == {"k", "v"}
        path.unlink()
    assert outcomes["error"] + outcomes["valid"] == CASES
    assert outcomes["error"] > CASES // 3 and outcomes["valid"] > 0, outcomes
