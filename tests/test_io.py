"""Latent checkpoints: outputs equal after reload, metadata, atomic writes, damaged files."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from safetensors import safe_open

from equalbits_cli import BinarizeConfig, binarize_model, load_model, save_checkpoint
from equalbits_cli.paths import atomic_write, check_output_path, read_metadata


@pytest.mark.parametrize(
    "config",
    [BinarizeConfig(), BinarizeConfig(ratio=0.3, prune=0.2), BinarizeConfig(method="irnet", activations="sign")],
)
def test_load_model_gives_equal_outputs(tmp_path, resnet18_state, config):
    model = binarize_model("resnet18", config, checkpoint=resnet18_state).eval()
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    loaded = load_model(path)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    meta = read_metadata(path)
    assert meta["format"] == "equalbits.latent" and meta["model"] == "resnet18"
    assert json.loads(meta["model_kwargs"]) == {"num_classes": 10}
    assert BinarizeConfig.from_dict(json.loads(meta["binarize_config"])) == config
    assert "conv1" not in json.loads(meta["binarized"]) and "layer1.0.conv1" in json.loads(meta["binarized"])
    with safe_open(str(path), "pt") as f:  # latent weights keep their timm names
        assert "layer1.0.conv1.weight" in f.keys()


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_write(target) as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("crash")
    assert target.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [target]


def test_check_output_path(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        check_output_path(tmp_path / "nope" / "f.safetensors")
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="pass `overwrite`"):
        check_output_path(tmp_path / "f")
    assert check_output_path(tmp_path / "f", overwrite=True) == tmp_path / "f"


def _rewrite_meta(src, dst, **changes):
    from safetensors.torch import load_file, save_file

    meta = read_metadata(src)
    meta.update(changes)
    save_file(load_file(str(src)), str(dst), metadata=meta)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": "other"}, "not an equalbits file"),
        ({"format_version": "99"}, "version '99' is not supported"),
        ({"model": "no_such_net"}, "not known to this timm"),
        ({"binarize_config": "{bad json"}, "not valid JSON"),
        ({"binarize_config": '{"ratio": 2.0}'}, "ratio must be strictly between"),
        ({"binarized": '["fc.nope"]'}, "not a Conv2d/Linear"),
        ({"model_kwargs": '{"num_classes": 7}'}, "shape"),
        ({"model_kwargs": '{"num_classes": 10, "img_size": 32}'}, "cannot build model 'resnet18'"),
        ({"model_kwargs": '{"num_classes": 10, "img_size": 5000}'}, r"img_size=5000 is out of range \[8, 4096\]"),
        ({"model_kwargs": '{"num_classes": 10, "depth": 2}'}, "unsupported key 'depth'"),
    ],
)
def test_bad_metadata_is_a_clear_error(tmp_path, binary_ckpt, change, message):
    bad = tmp_path / "bad.safetensors"
    _rewrite_meta(binary_ckpt, bad, **change)
    with pytest.raises(ValueError, match=message):
        load_model(bad)


def test_truncated_and_garbage_files(tmp_path, binary_ckpt):
    data = binary_ckpt.read_bytes()
    for name, blob in [("trunc", data[: len(data) // 2]), ("tiny", b"abc"), ("garbage", b"\xff" * 64)]:
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(blob)
        with pytest.raises(ValueError, match=str(p)):
            load_model(p)
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing.safetensors")


def test_atomic_write_gives_normal_permissions(tmp_path):
    import os

    umask = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "new.bin") as tmp:
            tmp.write_bytes(b"x")
    finally:
        os.umask(umask)
    assert (tmp_path / "new.bin").stat().st_mode & 0o777 == 0o644


def test_output_that_is_not_a_regular_file_is_never_replaced(tmp_path):
    from equalbits_cli.paths import check_output_path

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="not a regular file"):
            check_output_path(fifo, overwrite=overwrite)
    with pytest.raises(ValueError, match="255"):
        check_output_path(tmp_path / ("x" * 300), overwrite=True)


def test_exclusive_write_refuses_a_file_that_appeared_meanwhile(tmp_path):
    from equalbits_cli.paths import atomic_write

    out = tmp_path / "out.bin"
    with pytest.raises(ValueError, match="appeared while this command ran"):
        with atomic_write(out, exclusive=True) as tmp:
            tmp.write_bytes(b"mine")
            out.write_bytes(b"theirs")  # another writer got there first
    assert out.read_bytes() == b"theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"], "no temporary is left"
    with atomic_write(out) as tmp:  # not exclusive: replaces
        tmp.write_bytes(b"mine")
    assert out.read_bytes() == b"mine"


def test_concurrent_exports_never_lose_a_file(tmp_path, binary_ckpt):
    """Two exports to one path: one wins with a verified file, the other fails cleanly."""
    from helpers import start_cli

    out = tmp_path / "same.out"
    procs = [
        start_cli(
            "export",
            binary_ckpt,
            "-f",
            fmt,
            "-o",
            out,
            "--img-size",
            "32",
            "--json",
            *(["--no-bench"] if fmt != "packed" else []),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for fmt in ("packed", "onnx")
    ]
    results = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert out.exists() and codes == [0, 2], results
    winner = next(json.loads(r[1]) for r in results if r[0] == 0)
    assert winner["bytes"] == out.stat().st_size
    loser = next(r for r in results if r[0] == 2)
    assert "exists" in loser[2] or "appeared" in loser[2]


def test_vit_at_its_training_size_round_trips(tmp_path):
    """A ViT teacher trained at 32x32 (its position embeddings made for 2x2 patches) is rebuilt at that size
    from its checkpoint's record, and every file made from it records the size and loads back."""
    from equalbits_cli import save_packed
    from equalbits_cli.data.config import DataOverrides, resolve_data_config
    from equalbits_cli.model.convert import create_model, save_full_precision

    torch.manual_seed(0)
    teacher = create_model("test_vit", num_classes=5, img_size=32)
    assert tuple(teacher.patch_embed.img_size) == (32, 32)
    cfg = resolve_data_config(teacher, DataOverrides(img_size=32, crop_pct=1.0))
    ckpt = save_full_precision(teacher, tmp_path / "teacher.safetensors", data_config=cfg)
    again = create_model("test_vit", checkpoint=ckpt)  # the size comes from the record
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(teacher(x), again(x))
    model = binarize_model("test_vit", BinarizeConfig(), checkpoint=ckpt).eval()
    assert model.equalbits_meta["model_kwargs"] == {"num_classes": 5, "img_size": 32}
    for path in (save_checkpoint(model, tmp_path / "s.safetensors"), save_packed(model, tmp_path / "p.safetensors")):
        assert json.loads(read_metadata(path)["model_kwargs"]) == {"num_classes": 5, "img_size": 32}
        with torch.no_grad():
            torch.testing.assert_close(load_model(path)(x), model(x), rtol=0, atol=1e-5)
    plain = binarize_model("resnet18", BinarizeConfig(), num_classes=5)  # any size: nothing recorded
    assert plain.equalbits_meta["model_kwargs"] == {"num_classes": 5}


def test_a_size_a_vit_was_not_built_for_is_one_line(tmp_path, digits_small):
    """A ViT built for 32x32 images cannot run at 64x64 (its position embeddings are made for one size):
    said in one line before any work, not an internal error from inside the model."""
    from helpers import invoke_cli

    from equalbits_cli.data.config import DataOverrides, resolve_data_config
    from equalbits_cli.model.convert import create_model

    model = create_model("vit_tiny_patch16_224", num_classes=10, img_size=32)
    assert resolve_data_config(model, DataOverrides(img_size=32)).input_size == (3, 32, 32)
    with pytest.raises(ValueError, match="built for 32x32 images"):
        resolve_data_config(model, DataOverrides(img_size=64))
    dynamic = create_model("test_vit", num_classes=10, img_size=32)  # resamples its embeddings per call
    assert resolve_data_config(dynamic, DataOverrides(img_size=64)).input_size == (3, 64, 64)
    student = binarize_model("vit_tiny_patch16_224", BinarizeConfig(), num_classes=10)
    path = save_checkpoint(student, tmp_path / "v.safetensors")
    r = invoke_cli("eval", path, "--data", digits_small, "--img-size", "32")
    assert r.returncode == 2 and "--img-size 32 does not fit this model: it was built for 224x224" in r.stderr
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr
