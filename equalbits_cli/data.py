"""ImageFolder data through timm.data: datasets, transforms resolved from the model, and loaders.

Layout: ``DIR/train/<class>/*`` and ``DIR/val/<class>/*`` (``validation/`` also accepted). Class
indices follow the sorted class folder names of ``train/``, as torchvision's ImageFolder does.

An unreadable or truncated image is an error naming the file (not skipped silently): a dataset
with broken files gives wrong accuracy numbers, and the fix is the user's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["DataSplits", "find_splits", "build_datasets", "make_loader", "EpochSampler"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


@dataclass(frozen=True)
class DataSplits:
    train: Path
    val: Path
    classes: list[str]


def _classes(split: Path) -> list[str]:
    classes = sorted(d.name for d in split.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"{split} has no class folders; expected {split}/<class>/<image files>")
    for c in classes:
        if not any(f.suffix.lower() in IMAGE_SUFFIXES for f in (split / c).iterdir() if f.is_file()):
            raise ValueError(f"class folder {split / c} holds no images; remove it or add images")
    return classes


def find_splits(root: str | os.PathLike, need_train: bool = True) -> DataSplits:
    """Locate and check ``train/`` and ``val/`` (or ``validation/``) under ``root``.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: a split is missing, has no class folders, or has an empty class folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data directory not found: {root}")
    val = next((root / n for n in ("val", "validation") if (root / n).is_dir()), None)
    train = root / "train"
    if val is None:
        raise ValueError(f"{root} has no val/ (or validation/) folder; expected {root}/val/<class>/<images>")
    if need_train and not train.is_dir():
        raise ValueError(f"{root} has no train/ folder; expected {root}/train/<class>/<images>")
    classes = _classes(train) if need_train else _classes(val)
    val_classes = _classes(val)
    if need_train and not set(val_classes) <= set(classes):
        extra = sorted(set(val_classes) - set(classes))
        raise ValueError(f"{val} has classes not in train/: {', '.join(extra[:5])}")
    return DataSplits(train, val, classes)


class _Images(Dataset):
    """timm's ImageDataset with a fixed class map, per-sample seeded augmentation and clear errors."""

    def __init__(self, root: Path, classes: list[str], transform, seed: int | None) -> None:
        from timm.data import ImageDataset

        class_to_idx = {c: i for i, c in enumerate(classes)}
        self.inner = ImageDataset(str(root), class_map=class_to_idx)
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int):
        from PIL import Image

        # timm's reader finds (path, target); the image is opened here rather than through
        # ImageDataset.__getitem__, which silently substitutes the next sample for a broken file.
        path, target = self.inner.reader.samples[index]
        try:
            with open(path, "rb") as fh:
                img = Image.open(fh).convert("RGB")
        except Exception as exc:
            raise ValueError(f"unreadable image {path}: {type(exc).__name__}: {exc}; remove or replace it") from None
        if self.seed is None:
            return self.transform(img), target
        # Augmentation depends on (seed, epoch, index) only: a resumed run, any number of workers or
        # ranks, sees exactly the same crops and flips as an uninterrupted one.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index)
            return self.transform(img), target


def build_datasets(
    splits: DataSplits, model: nn.Module, img_size: int | None, augment: bool, seed: int
) -> tuple[Dataset, Dataset]:
    """Train and val datasets with transforms resolved from the model's data config (timm)."""
    from timm.data import create_transform, resolve_data_config

    overrides = {"input_size": (3, img_size, img_size)} if img_size else {}
    cfg = resolve_data_config(overrides, model=model)
    if img_size:
        cfg["crop_pct"] = 1.0  # small explicit sizes: use the whole image
    train_tf = create_transform(**cfg, is_training=augment)
    eval_tf = create_transform(**cfg, is_training=False)
    train = _Images(splits.train, splits.classes, train_tf, seed if augment else None)
    val = _Images(splits.val, splits.classes, eval_tf, None)
    return train, val


class EpochSampler(Sampler[int]):
    """Shuffled (or ordered) indices for one epoch, sharded by rank, from a given position on.

    The permutation depends on (seed, epoch) only, so resuming at ``start`` batches into an epoch
    continues exactly where an uninterrupted run would be.
    """

    def __init__(self, n: int, *, shuffle: bool, seed: int = 0, rank: int = 0, world: int = 1) -> None:
        self.n, self.shuffle, self.seed, self.rank, self.world = n, shuffle, seed, rank, world
        self.epoch = 0
        self.start = 0

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        per_rank = -(-self.n // self.world)
        order = order + order[: per_rank * self.world - self.n]  # pad so every rank has equal work
        return order[self.rank :: self.world]

    def __iter__(self):
        return iter(self._indices()[self.start :])

    def __len__(self) -> int:
        return len(self._indices()) - self.start


def make_loader(dataset: Dataset, sampler: Sampler, batch_size: int, workers: int, drop_last: bool) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        drop_last=drop_last,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
    )


def make_digits_imagefolder(root: str | os.PathLike, size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> Path:
    """Write the UCI handwritten digits that scikit-learn ships as an ImageFolder (no download).

    1,797 grey 8x8 images of 10 classes, upscaled to ``size`` x ``size`` RGB PNGs; a fixed, stratified
    split puts ``val_fraction`` of each class into ``val/``. Re-running on an existing complete tree
    does nothing.

    Returns:
        ``root``.
    """
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    root = Path(root)
    marker = root / ".equalbits-digits"
    if marker.is_file() and marker.read_text() == f"{size} {val_fraction} {seed}":
        return root
    digits = load_digits()
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for c in range(10):
            (root / split / str(c)).mkdir(parents=True, exist_ok=True)
    for c in range(10):
        idx = np.flatnonzero(digits.target == c)
        rng.shuffle(idx)
        n_val = int(round(val_fraction * len(idx)))
        for j, i in enumerate(idx):
            split = "val" if j < n_val else "train"
            pixels = (digits.images[i] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
            img = Image.fromarray(pixels, mode="L").resize((size, size), Image.BILINEAR).convert("RGB")
            img.save(root / split / str(c) / f"{i:04d}.png")
    marker.write_text(f"{size} {val_fraction} {seed}")
    return root


__all__ += ["make_digits_imagefolder"]
