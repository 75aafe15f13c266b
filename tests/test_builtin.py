"""The built-in datasets: deterministic, complete or absent, never mixed with another build."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import invoke_cli
from PIL import Image

from equalbits_cli.data import builtin
from equalbits_cli.data.builtin import CHARS, make_chars_imagefolder, make_dataset
from equalbits_cli.errors import SettingError

SMALL = dict(size=16, train_per_class=2, val_per_class=1)


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_chars_is_complete_and_the_same_however_often_it_is_built(tmp_path):
    a = make_chars_imagefolder(tmp_path / "a", **SMALL)
    b = make_chars_imagefolder(tmp_path / "b", **SMALL)
    files = _files(a)
    assert len(files) == 3 * len(CHARS) == 108
    assert sorted(p.name for p in (a / "train").iterdir()) == sorted(CHARS)
    assert files == _files(b)  # byte for byte: every image has its own seeded generator
    img = Image.open(a / "val" / "Q" / "0000.png")
    assert img.size == (16, 16) and img.mode == "RGB"
    assert np.asarray(img).std() > 10  # drawn, not blank
    # Another seed draws other images.
    c = make_chars_imagefolder(tmp_path / "c", **{**SMALL, "seed": 1})
    assert _files(c).keys() == files.keys() and _files(c) != files


def test_a_complete_build_is_reused_and_another_build_replaced(tmp_path):
    root = make_chars_imagefolder(tmp_path / "d", **SMALL)
    stamp = (root / "train" / "A" / "0000.png").stat().st_mtime_ns
    make_chars_imagefolder(root, **SMALL)
    assert (root / "train" / "A" / "0000.png").stat().st_mtime_ns == stamp
    make_chars_imagefolder(root, **{**SMALL, "train_per_class": 1})
    assert len(list((root / "train" / "A").iterdir())) == 1  # rebuilt, no file of the old build left
    marker = json.loads((root / ".equalbits-dataset").read_text())
    assert marker["train_per_class"] == 1 and marker["version"] == builtin.CHARS_VERSION


def test_an_interrupted_build_leaves_nothing_to_reuse(tmp_path, monkeypatch):
    calls = []
    draw = builtin._draw_char

    def failing(*args):
        calls.append(1)
        if len(calls) == 40:
            raise KeyboardInterrupt
        return draw(*args)

    monkeypatch.setattr(builtin, "_draw_char", failing)
    with pytest.raises(KeyboardInterrupt):
        make_chars_imagefolder(tmp_path / "e", **SMALL)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary sibling


def test_a_folder_no_builder_wrote_is_refused_not_deleted(tmp_path):
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(SettingError, match="holds no built-in dataset"):
        make_dataset("chars", mine, size=16)
    assert (mine / "holiday.jpg").read_bytes() == b"x"


def test_a_digits_folder_from_an_earlier_version_is_rebuilt(tmp_path):
    old = tmp_path / "digits"
    (old / "train" / "0").mkdir(parents=True)
    (old / "train" / "0" / "stale.png").write_bytes(b"x")
    (old / ".equalbits-digits").write_text("32 0.2 0")  # the marker 0.6 wrote
    make_dataset("digits", old, size=8)
    assert not (old / "train" / "0" / "stale.png").exists()
    assert sum(1 for _ in old.rglob("*.png")) == 1797


def test_data_command(tmp_path, monkeypatch):
    monkeypatch.setattr(
        builtin,
        "make_chars_imagefolder",
        lambda root, size, seed: make_chars_imagefolder(root, size=size, seed=seed, train_per_class=2, val_per_class=1),
    )
    res = invoke_cli("data", "chars", tmp_path / "c", "--img-size", "16", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {
        "dataset": "chars",
        "out": str(tmp_path / "c"),
        "img_size": 16,
        "classes": 36,
        "train": 72,
        "val": 36,
    }
    res = invoke_cli("data", "letters", tmp_path / "l")
    assert res.returncode == 2
    assert res.stderr.strip() == "error: unknown dataset 'letters'; the built-in ones are digits, chars"
    assert not (tmp_path / "l").exists()
    res = invoke_cli("quickstart", "--dataset", "letters", "--out", tmp_path / "q")
    assert res.returncode == 2 and "the built-in ones are digits, chars" in res.stderr
    assert not (tmp_path / "q").exists()
