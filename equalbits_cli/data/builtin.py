"""Built-in datasets written as ImageFolders from what the installed packages ship (no download).

- ``digits``: scikit-learn's UCI handwritten digits (10 classes, 1,797 images of 8x8 pixels, upscaled).
  Easy: a full-precision resnet18 reaches about 97% and most binarization settings tie with it.
- ``chars``: the 36 characters ``0-9A-Z`` rendered from the 21 text fonts matplotlib ships (DejaVu Sans,
  Sans Mono and Serif, STIX and Computer Modern, in their regular, bold and italic styles), each with a
  random size, rotation, shift and grey levels, over clutter (lines and fragments of other characters) and
  noise. Harder: binarization costs accuracy there, so settings can be told apart.

Each image is drawn from its own seeded generator (the dataset's seed, the split, the class and the
index), so a dataset is the same however it is built. A tree is written into a temporary folder and
renamed into place with a marker naming the builder and its settings: an interrupted build leaves
nothing that a later run would use, and a tree written by another builder version is rebuilt.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import SettingError

__all__ = ["DATASETS", "make_chars_imagefolder", "make_dataset", "make_digits_imagefolder"]

DATASETS = {
    "digits": "scikit-learn's UCI handwritten digits, 10 classes, 1,797 images (easy)",
    "chars": "0-9A-Z rendered from matplotlib's fonts with clutter and noise, 36 classes, 12,600 images (harder)",
}
CHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# The fonts that hold Latin letters and digits; matplotlib's other files are symbol and display fonts.
CHAR_FONTS = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf",
    "cmr10.ttf",
    "cmb10.ttf",
    "cmti10.ttf",
    "cmss10.ttf",
    "cmtt10.ttf",
)
# Bumped whenever the drawing changes: a tree written by another version is rebuilt, never mixed.
CHARS_VERSION = 1
_MARKER = ".equalbits-dataset"
_OLD_MARKERS = (".equalbits-digits",)  # written by 0.6 and earlier


def make_dataset(name: str, root: str | os.PathLike, size: int = 32, seed: int = 0) -> Path:
    """Write the built-in dataset ``name`` as an ImageFolder under ``root`` (``train/``, ``val/``).

    A complete tree with the same settings is reused as it is; one written with other settings or by
    another version is rebuilt.

    Args:
        name: One of :data:`DATASETS`.
        size: Image side in pixels (8 to 512).

    Returns:
        ``root``.

    Raises:
        SettingError: an unknown name (the message lists the known ones), a bad size, or ``root`` a
            non-empty folder that no built-in dataset wrote.

    Example:
        >>> make_dataset("letters", "/tmp/x")
        Traceback (most recent call last):
        ...
        equalbits_cli.errors.SettingError: unknown dataset 'letters'; the built-in ones are digits, chars
    """
    if name not in DATASETS:
        raise SettingError(f"unknown dataset {name!r}; the built-in ones are {', '.join(DATASETS)}")
    if name == "digits":
        return make_digits_imagefolder(root, size=size, seed=seed)
    return make_chars_imagefolder(root, size=size, seed=seed)


def make_digits_imagefolder(root: str | os.PathLike, size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> Path:
    """Write the UCI handwritten digits that scikit-learn ships as an ImageFolder (no download).

    1,797 grey 8x8 images of 10 classes, upscaled to ``size`` x ``size`` RGB PNGs; a fixed, stratified
    split puts ``val_fraction`` of each class into ``val/``.

    Returns:
        ``root``.
    """
    settings = {"dataset": "digits", "version": 1, "size": size, "val_fraction": val_fraction, "seed": seed}

    def write(tmp: Path) -> None:
        import numpy as np
        from PIL import Image
        from sklearn.datasets import load_digits

        digits = load_digits()
        rng = np.random.default_rng(seed)
        for c in range(10):
            idx = np.flatnonzero(digits.target == c)
            rng.shuffle(idx)
            n_val = int(round(val_fraction * len(idx)))
            for split in ("train", "val"):
                (tmp / split / str(c)).mkdir(parents=True)
            for j, i in enumerate(idx):
                split = "val" if j < n_val else "train"
                pixels = (digits.images[i] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
                img = Image.fromarray(pixels, mode="L").resize((size, size), Image.BILINEAR).convert("RGB")
                img.save(tmp / split / str(c) / f"{i:04d}.png")

    return _build(Path(root), settings, write)


def make_chars_imagefolder(
    root: str | os.PathLike, size: int = 32, train_per_class: int = 300, val_per_class: int = 50, seed: int = 0
) -> Path:
    """Write the ``chars`` dataset: ``0-9A-Z`` drawn from matplotlib's fonts over clutter and noise.

    Each image: a random font of :data:`CHAR_FONTS` at 40-80% of the side (its em size), the character
    rotated up to 20 degrees either way and shifted up to 15% of the side; a dark grey background and a
    character at least 120 grey levels brighter; one to three clutter strokes and, in half of the
    images, a fragment of another character at the border; Gaussian noise of 0-12 grey levels. Drawn
    at twice ``size`` and downscaled with a box filter.

    Returns:
        ``root``.
    """
    if not isinstance(size, int) or not 8 <= size <= 512:
        raise SettingError(f"`size` must be an integer from 8 to 512, got {size!r}")
    settings = {
        "dataset": "chars",
        "version": CHARS_VERSION,
        "size": size,
        "train_per_class": train_per_class,
        "val_per_class": val_per_class,
        "seed": seed,
    }

    def write(tmp: Path) -> None:
        fonts = _char_fonts(2 * size)
        for s, (split, count) in enumerate((("train", train_per_class), ("val", val_per_class))):
            for c, char in enumerate(CHARS):
                folder = tmp / split / char
                folder.mkdir(parents=True)
                for i in range(count):
                    _draw_char(char, fonts, size, (seed, s, c, i)).save(folder / f"{i:04d}.png")

    return _build(Path(root), settings, write)


def _char_fonts(canvas: int) -> list:
    from PIL import ImageFont

    try:
        import matplotlib
    except ImportError:  # pragma: no cover - a declared dependency
        raise SettingError("the chars dataset draws matplotlib's fonts; install matplotlib") from None
    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    missing = [f for f in CHAR_FONTS if not (folder / f).is_file()]
    if missing:
        raise SettingError(f"matplotlib's font folder {folder} lacks {missing[0]}; reinstall matplotlib")
    # One loaded face per font and pixel height: the drawing picks a height, then a face.
    return [
        (f, {h: ImageFont.truetype(str(folder / f), h) for h in range(canvas * 2 // 5, canvas * 4 // 5 + 1, 2)})
        for f in CHAR_FONTS
    ]


def _colours(rng) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A dark background and a character at least 120 grey levels brighter.

    Measured on resnet18 from scratch at 32x32 (AdamW 2e-3): with random colours, or with either
    polarity (light on dark and dark on light), it stays at chance for several epochs; with a fixed
    polarity and grey levels it learns in the first epoch.
    """
    bg = int(rng.integers(0, 101))
    fg = int(rng.integers(bg + 120, 256))
    return (bg, bg, bg), (fg, fg, fg)


def _glyph(char: str, font, canvas: int):
    """The character's mask, centred on a ``canvas`` square."""
    from PIL import Image, ImageDraw

    mask = Image.new("L", (canvas, canvas), 0)
    left, top, right, bottom = font.getbbox(char)
    xy = ((canvas - (right - left)) / 2 - left, (canvas - (bottom - top)) / 2 - top)
    ImageDraw.Draw(mask).text(xy, char, fill=255, font=font)
    return mask


def _draw_char(char: str, fonts: list, size: int, key: tuple[int, ...]):
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(key)
    canvas = 2 * size
    bg, fg = _colours(rng)
    img = Image.new("RGB", (canvas, canvas), bg)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 4))):  # clutter strokes, in grey levels between the two
        mix = rng.uniform(0.2, 0.8)
        colour = tuple(int(b + mix * (f - b)) for b, f in zip(bg, fg))
        points = [tuple(int(v) for v in rng.integers(0, canvas, size=2)) for _ in range(2)]
        draw.line(points, fill=colour, width=int(rng.integers(1, max(2, canvas // 16))))
    heights = fonts[0][1]
    if rng.random() < 0.5:  # a fragment of another character, its centre beyond the border
        other = CHARS[int(rng.integers(len(CHARS)))]
        face = fonts[int(rng.integers(len(fonts)))][1][min(heights)]
        piece = _glyph(other, face, canvas)
        away = rng.choice([-1, 1], size=2) * rng.integers(canvas * 9 // 20, canvas * 13 // 20, size=2)
        dx, dy = (int(v) for v in away)
        img.paste(Image.new("RGB", (canvas, canvas), fg), (dx, dy), piece)
    height = list(heights)[int(rng.integers(len(heights)))]
    face = fonts[int(rng.integers(len(fonts)))][1][height]
    mask = _glyph(char, face, canvas).rotate(float(rng.uniform(-20, 20)), resample=Image.BILINEAR)
    shift = (int(v) for v in rng.integers(-canvas * 3 // 20, canvas * 3 // 20 + 1, size=2))
    img.paste(Image.new("RGB", (canvas, canvas), fg), tuple(shift), mask)
    small = np.asarray(img.resize((size, size), Image.BOX), dtype=np.float32)
    small = small + rng.normal(0.0, rng.uniform(0, 12), size=small.shape)
    return Image.fromarray(small.round().clip(0, 255).astype(np.uint8), mode="RGB")


def _foreign(root: Path) -> bool:
    """``root`` holds something that no built-in dataset wrote (it is never deleted)."""
    if not root.exists():
        return False
    if not root.is_dir():
        return True
    return any(root.iterdir()) and not any((root / m).is_file() for m in _OLD_MARKERS)


def _build(root: Path, settings: dict, write) -> Path:
    """Reuse ``root`` if it holds this build; else write a new one beside it and swap it in."""
    marker = root / _MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == settings:
                return root
        except (OSError, ValueError):
            pass
    elif _foreign(root):
        raise SettingError(f"{root} exists and holds no built-in dataset (no {_MARKER}); pass an empty or new folder")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        write(tmp)
        (tmp / _MARKER).write_text(json.dumps(settings))
        if root.exists():
            shutil.rmtree(root)  # ours (it has a marker): another version or other settings
        tmp.rename(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root
