"""Files of every earlier version: written by equalbits 0.1, 0.2, 0.3, 0.4 and 0.5 (``tests/data/make_old_files.py``
run on each version's checkout), read today through the one migration in ``equalbits_cli.formats.migrate``;
0.5's ONNX exports (TorchScript exporter, ``eb::`` initializers) through ``eval``'s and ``inspect``'s readers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from equalbits_cli import load_model, save_checkpoint
from equalbits_cli.data.config import resolve_data_config
from equalbits_cli.formats.files import file_info
from equalbits_cli.formats.migrate import FORMAT_VERSION
from equalbits_cli.report.inspect import inspect_file
from equalbits_cli.report.packed_report import packed_report

DATA = Path(__file__).parent / "data"
VERSIONS = ["v0.1", "v0.2", "v0.3", "v0.4"]
X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # as make_old_files.py draws it


@pytest.mark.parametrize("name", ["w1", "w1a1"])
def test_files_of_0_5_compute_what_they_computed(name):
    """0.5 wrote format version 2 and ONNX through the legacy exporter, its planes named ``eb::L::sign``
    and its scales ``eb::L::factor``: today's readers give the logits 0.5 computed and exact counts."""
    import onnxruntime as ort

    want = load_file(str(DATA / "v0.5" / f"{name}.logits.safetensors"))["logits"]
    scale = float(want.max() - want.min())
    reports = []
    for suffix in ("", ".packed"):
        path = DATA / "v0.5" / f"{name}{suffix}.safetensors"
        with torch.no_grad():
            got = load_model(path)(X)
        assert float((got - want).abs().max()) <= 1e-6 * scale, (name, suffix)
        reports.append(inspect_file(path))
    onnx_path = DATA / "v0.5" / f"{name}.onnx"
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"input": X.numpy()})[0])
    # the ONNX check's tolerance; 1W/1A: a sample may take another activation bit (see check_outputs)
    close = (got - want).abs().amax(dim=1) <= 1e-4 * scale
    assert bool(close.all()) if name == "w1" else int(close.sum()) >= 3
    report = inspect_file(onnx_path)
    codes = [(s.name, s.n_plus, s.n_minus, s.n_zero) for s in report.stats.layers if s.binarized]
    assert codes == [(s.name, s.n_plus, s.n_minus, s.n_zero) for s in reports[1].stats.layers if s.binarized]
    assert all(s.exact_filters for s in report.stats.layers if s.binarized)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", ["w1", "w1a1"])
def test_old_files_compute_what_they_computed(version, name):
    """Latent and packed files of each version give the logits that version computed (float32 sums in
    another order: within 1e-6 of the logits' range), and the same codes and counts in inspect."""
    want = load_file(str(DATA / version / f"{name}.logits.safetensors"))["logits"]
    scale = float(want.max() - want.min())
    for suffix in ("", ".packed"):
        path = DATA / version / f"{name}{suffix}.safetensors"
        with safe_open(str(path), "pt") as f:
            assert f.metadata()["format_version"] == "1"
        model = load_model(path)
        with torch.no_grad():
            got = model(X)
        assert float((got - want).abs().max()) <= 1e-6 * scale, (version, name, suffix)
        cfg = resolve_data_config(model)
        if suffix == "":  # fine-tuned with --img-size 32, which used the whole image then
            assert cfg.input_size == (3, 32, 32) and cfg.crop_pct == 1.0
        elif version != "v0.1":  # 0.2-0.4 packed files kept no fine-tune record: the architecture's config
            assert cfg.input_size == (3, 160, 160)
        report = (packed_report(path) if suffix else None) or inspect_file(path)  # as the CLI reads them
        assert report.stats.binarized_params > 0 and all(s.exact_filters is not False for s in report.stats.layers)


def test_version_1_semantics_are_undone_in_one_place():
    """0.1 wrote no ``center`` (plain levels) and 0.1's 1W/1A files no thresholds (sign at 0)."""
    info = file_info(DATA / "v0.1" / "w1.safetensors")
    assert info.version == "1" and info.config.center is False and info.config.ratio == 0.3
    assert file_info(DATA / "v0.2" / "w1.safetensors").config.center is True
    model = load_model(DATA / "v0.1" / "w1a1.safetensors")
    thresholds = [m.act_threshold for m in model.modules() if getattr(m, "act_threshold", None) is not None]
    assert thresholds and all(float(t.detach().abs().max()) == 0 for t in thresholds)


def test_files_are_written_in_version_2_and_round_trip(tmp_path):
    model = load_model(DATA / "v0.4" / "w1.safetensors")
    path = save_checkpoint(model, tmp_path / "again.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["format_version"] == FORMAT_VERSION == "2"
    assert json.loads(meta["data_config"])["input_size"] == [3, 32, 32]
    with torch.no_grad():
        assert torch.equal(load_model(path)(X), model(X))


def test_unknown_versions_are_refused_naming_them(tmp_path):
    src = DATA / "v0.4" / "w1.packed.safetensors"
    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
    for version in ("0", "3", "", "2.0"):
        bad = tmp_path / f"v{version}.safetensors"
        save_file(load_file(str(src)), str(bad), metadata={**meta, "format_version": version})
        message = f"version {version!r} is not supported by this equalbits \\(reads versions 1, 2\\)"
        with pytest.raises(ValueError, match=message):
            load_model(bad)
