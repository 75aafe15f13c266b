"""Untrusted files: mutated latent and packed files load correctly or fail with a clear error.

A seeded loop (bounded in count and time) applies bit flips, truncations, header edits and huge
declared shapes to valid files and checks that ``load_model`` either returns a working model or
raises ValueError / FileNotFoundError naming the file: never another exception, a hang or a crash.
"""

from __future__ import annotations

import json
import random
import struct
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from equalbits_cli import BinarizeConfig, binarize_model, load_model, save_checkpoint, save_packed
from equalbits_cli.paths import read_metadata

MUTATIONS_PER_FORMAT = 150
TIME_BUDGET_S = 60


@pytest.fixture(scope="module")
def valid_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    torch.manual_seed(0)
    model = binarize_model("test_resnet", BinarizeConfig(prune=0.25), num_classes=10)
    return {
        "latent": save_checkpoint(model, tmp / "latent.safetensors").read_bytes(),
        "packed": save_packed(model, tmp / "packed.safetensors").read_bytes(),
    }


def _header_bounds(data: bytes) -> tuple[int, int]:
    n = struct.unpack("<Q", data[:8])[0]
    return 8, 8 + n


def mutate(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    kind = rng.choice(["flip_body", "flip_header", "truncate", "edit_meta", "huge_shape", "garbage_header"])
    buf = bytearray(data)
    start, end = _header_bounds(data)
    if kind == "flip_body":
        for _ in range(rng.randint(1, 16)):
            i = rng.randrange(end, len(buf))
            buf[i] ^= 1 << rng.randrange(8)
    elif kind == "flip_header":
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(start, end)
            buf[i] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        buf = buf[: rng.randrange(0, len(buf))]
    elif kind == "garbage_header":
        buf[:8] = struct.pack("<Q", rng.choice([0, 1, 2**40, len(buf) * 2, end - 9]))
    else:
        header = json.loads(bytes(buf[start:end]))
        if kind == "edit_meta":
            meta = header["__metadata__"]
            key = rng.choice(sorted(meta))
            meta[key] = rng.choice(
                [
                    '{"num_classes": 1000000000}',
                    '{"ratio": -1}',
                    "[]",
                    "{",
                    "99",
                    "x" * 1000,
                    '["conv1"]',
                    '{"img_size": 4096}',
                    json.dumps({"num_classes": 10, "depth": 1000}),
                ]
            )
        else:  # declare a tensor far larger than its bytes
            name = rng.choice([k for k in header if k != "__metadata__"])
            header[name]["shape"] = [2**31, 2**31]
        body = json.dumps(header).encode()
        body += b" " * (-len(body) % 8)
        buf = bytearray(struct.pack("<Q", len(body)) + body + bytes(buf[end:]))
    return kind, bytes(buf)


@pytest.mark.parametrize("fmt", ["latent", "packed"])
def test_mutated_files_never_crash(tmp_path, valid_files, fmt):
    rng = random.Random(1234 if fmt == "latent" else 5678)
    path = tmp_path / "m.safetensors"
    x = torch.randn(1, 3, 32, 32)
    outcomes: dict[str, int] = {}
    started = time.monotonic()
    for i in range(MUTATIONS_PER_FORMAT):
        if time.monotonic() - started > TIME_BUDGET_S:
            break
        kind, data = mutate(valid_files[fmt], rng)
        path.write_bytes(data)
        try:
            model = load_model(path)
        except (ValueError, FileNotFoundError) as exc:
            assert str(path) in str(exc), f"mutation {i} ({kind}): error does not name the file: {exc}"
            assert "\n" not in str(exc).strip(), f"mutation {i} ({kind}): multi-line error"
            outcomes[f"{kind}: error"] = outcomes.get(f"{kind}: error", 0) + 1
            continue
        with torch.no_grad():
            y = model(x)
        assert y.shape == (1, 10), f"mutation {i} ({kind})"
        outcomes[f"{kind}: loaded"] = outcomes.get(f"{kind}: loaded", 0) + 1
    assert sum(outcomes.values()) >= 50, outcomes
    assert any(k.endswith("error") for k in outcomes)


def test_packed_shape_tensor_claiming_huge_weight(tmp_path, valid_files):
    path = tmp_path / "p.safetensors"
    path.write_bytes(valid_files["packed"])
    state, meta = load_file(str(path)), read_metadata(path)
    key = next(k for k in state if k.endswith(".weight.shape"))
    state[key] = torch.tensor([2**31, 2**31, 1, 1])
    save_file(state, str(path), metadata=meta)
    with pytest.raises(ValueError, match="shape"):
        load_model(path)
