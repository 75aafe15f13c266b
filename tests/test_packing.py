"""Bit packing is bit-exact for every length; packed files reload to identical outputs and are small."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from equalbits_cli import BinarizeConfig, binarize_model, collect_stats, load_model, save_packed
from equalbits_cli.formats.planes import pack_bits, pack_codes, unpack_bits, unpack_codes
from equalbits_cli.paths import read_metadata


@pytest.mark.parametrize("n", range(0, 70))
@pytest.mark.parametrize("ternary", [False, True])
def test_pack_unpack_every_length(n, ternary):
    g = torch.Generator().manual_seed(n)
    low = -1 if ternary else 0
    codes = torch.randint(low, 2, (n,), generator=g).to(torch.int8)
    if not ternary:
        codes = codes * 2 - 1
    sign, nonzero = pack_codes(codes.numpy())
    assert sign.size == (n + 7) // 8 and sign.dtype == np.uint8
    assert (nonzero is not None) == bool((codes == 0).any())
    assert np.array_equal(unpack_codes(sign, nonzero, (n,)), codes.numpy())


def test_bit_order_is_numpy_little():
    bits = np.array([1, 0, 1, 1, 0, 0, 0, 0, 1, 1], dtype=bool)
    packed = pack_bits(bits)
    assert packed.tolist() == [0b00001101, 0b00000011]
    assert np.array_equal(unpack_bits(packed, 10), bits)
    with pytest.raises(ValueError):
        unpack_bits(packed, 17)


@pytest.mark.parametrize(
    "config",
    [BinarizeConfig(), BinarizeConfig(prune=0.3), BinarizeConfig(method="sign"), BinarizeConfig(ratio=0.7, prune=0.1)],
)
def test_packed_round_trip_and_size(tmp_path, resnet18_state, config):
    model = binarize_model("resnet18", config, checkpoint=resnet18_state).eval()
    path = save_packed(model, tmp_path / "m.packed.safetensors")
    loaded = load_model(path)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    for (name, m), (_, lm) in zip(model.named_modules(), loaded.named_modules(), strict=True):
        if hasattr(m, "quantize"):  # the packed form holds exactly the codes and scales the model computes
            assert type(lm).__name__ == "PackedBinary", name
            codes, scale = m.quantize()
            assert torch.equal(codes, lm.codes()) and torch.equal(scale.float(), lm.scale), name
    stats = collect_stats(model)
    size = path.stat().st_size
    header = 32 * 1024  # fixed allowance for the safetensors JSON header
    assert size <= stats.packed_bytes * 1.005 + header
    assert stats.fp32_bytes / size >= 12
    meta = read_metadata(path)
    assert meta["format"] == "equalbits.packed" and meta["bit_order"] == "little"


def test_damaged_planes_are_clear_errors(tmp_path, resnet18_state):
    model = binarize_model("resnet18", BinarizeConfig(prune=0.3), checkpoint=resnet18_state)
    path = save_packed(model, tmp_path / "m.safetensors")
    state, meta = load_file(str(path)), read_metadata(path)
    cases = {
        "short plane": ("layer1.0.conv1.weight.sign", lambda t: t[:-1]),
        "nan scale": ("layer1.0.conv1.weight.scale", lambda t: t * float("nan")),
        "huge shape": ("layer1.0.conv1.weight.shape", lambda t: torch.tensor([2**40, 1, 1, 1])),
        "sign on zero": ("layer1.0.conv1.weight.sign", lambda t: torch.full_like(t, 255)),
    }
    for label, (key, mutate) in cases.items():
        bad = dict(state)
        bad[key] = mutate(state[key]).contiguous()
        p = tmp_path / "bad.safetensors"
        save_file(bad, str(p), metadata=meta)
        with pytest.raises(ValueError, match="layer1.0.conv1"):
            load_model(p)
        assert label


def test_format_doc_decoder_gives_the_model_weights(tmp_path, resnet18_state, monkeypatch):
    """The decode example in docs/format.md, run as written, reproduces the weights load_model computes."""
    import re
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "format.md").read_text()
    example = re.search(r"Python example, without equalbits:\n\n```python\n(.*?)```", doc, re.S).group(1)
    model = binarize_model("resnet18", BinarizeConfig(ratio=0.3, prune=0.1), checkpoint=resnet18_state).eval()
    save_packed(model, tmp_path / "model.packed.safetensors")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(example, scope)
    want = load_model(tmp_path / "model.packed.safetensors").layer1[0].conv1.weight()
    torch.testing.assert_close(torch.from_numpy(scope["weight"]).float(), want, rtol=0, atol=1e-7)


@pytest.mark.parametrize(
    "config", [BinarizeConfig(), BinarizeConfig(ratio=0.3, prune=0.2), BinarizeConfig(method="sign")]
)
def test_numpy_inspect_of_packed_files_matches_the_torch_one(tmp_path, config):
    """inspect reads packed files with numpy alone; its report is the one the torch path gives."""
    import subprocess
    import sys

    import timm

    from equalbits_cli import LayerPolicy, binarize_
    from equalbits_cli.report.inspect import inspect_file
    from equalbits_cli.report.packed_report import packed_report

    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=7)
    binarize_(model, config, policy=LayerPolicy(exclude=("blocks.5.*",)))
    path = save_packed(model.eval(), tmp_path / "m.packed.safetensors")
    fast, slow = packed_report(path).to_dict(), inspect_file(path).to_dict()
    assert fast == slow
    code = (
        "import sys\nfrom equalbits_cli.cli import app\ntry:\n"
        f"    app(['inspect', {str(path)!r}, '--json'])\nexcept SystemExit:\n    pass\n"
        "print('LOADED', 'torch' in sys.modules, 'timm' in sys.modules)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "LOADED False False" in res.stdout, res.stdout[-500:] + res.stderr


def test_a_packed_model_saves_the_same_packed_file(tmp_path, resnet18_state):
    """``load_model`` of a packed file gives the packed form; saving that again writes the same tensors
    and the metadata the torch-free inspect needs (every binarized layer listed, the same parameter count)."""
    from equalbits_cli.report.packed_report import packed_report

    model = binarize_model("resnet18", BinarizeConfig(ratio=0.3, prune=0.1), checkpoint=resnet18_state).eval()
    first = save_packed(model, tmp_path / "a.safetensors")
    second = save_packed(load_model(first), tmp_path / "b.safetensors")
    a, b = load_file(str(first)), load_file(str(second))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta_a, meta_b = read_metadata(first), read_metadata(second)
    for key in ("layers", "binarized", "param_count", "binarize_config", "data_config"):
        assert meta_a[key] == meta_b[key], key
    report_a, report_b = packed_report(first).to_dict(), packed_report(second).to_dict()
    assert report_a["layers"] == report_b["layers"] and report_a["totals"] | {"file_bytes": 0} == report_b["totals"] | {
        "file_bytes": 0
    }
