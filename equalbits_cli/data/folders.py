"""ImageFolder data through timm.data: datasets, transforms resolved from the model, and loaders.

Layout: ``DIR/train/<class>/*`` and ``DIR/val/<class>/*`` (``validation/`` also accepted). Class
indices follow the sorted class folder names of ``train/``, as torchvision's ImageFolder does.

An unreadable or truncated image is an error naming the file (not skipped silently): a dataset
with broken files gives wrong accuracy numbers, and the fix is the user's.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import SettingError
from .config import DataConfig

__all__ = [
    "AUGMENT",
    "DataSplits",
    "find_splits",
    "build_datasets",
    "calibration_dataset",
    "Decoded",
    "decode_once",
    "eval_transform",
    "val_dataset",
    "make_loader",
    "EpochSampler",
    "iterate",
]

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
        if not _list_images(split / c, split):
            raise ValueError(f"class folder {split / c} holds no images; remove it or add images")
    return classes


def _list_images(folder: Path, root: Path) -> list[Path]:
    """Image files directly inside a class folder, in name order.

    A folder inside a class folder is refused (its images would silently join that class), and so is a
    link that leads out of the split (a symlink loop or a link to another tree).

    Raises:
        ValueError: a nested folder or an outside link.
    """
    root_real = root.resolve()
    images = []
    for f in sorted(folder.iterdir()):
        if f.name.startswith("."):
            continue
        if f.is_symlink():
            target = f.resolve()
            if not target.is_relative_to(root_real) or target.is_dir():
                raise ValueError(f"{f} is a link out of {root} or to a folder; replace it with the file itself")
        if f.is_dir():
            raise ValueError(
                f"{f} is a folder inside the class folder {folder.name}/; images must sit directly in "
                f"{root.name}/<class>/"
            )
        if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file():
            images.append(f)
    return images


def find_splits(root: str | os.PathLike, need_train: bool = True, classes: list[str] | None = None) -> DataSplits:
    """Locate and check ``train/`` and ``val/`` (or ``validation/``) under ``root``.

    Class indices follow ``classes`` when given (what the model was trained with), else the sorted
    class folders of ``train/``. Without either (``val/`` alone) the sorted folders of ``val/`` are
    used, and the caller must check them against the model (see :func:`check_classes`).

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: ``root`` is a file, a split is missing, has no class folders, has an empty class folder,
            or val/ has a class the class list lacks.
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise SettingError(f"`data_dir` {root} is a file; pass a folder holding val/<class>/<images> (and train/)")
    if not root.is_dir():
        raise FileNotFoundError(f"data directory not found: {root}")
    val = next((root / n for n in ("val", "validation") if (root / n).is_dir()), None)
    train = root / "train"
    if val is None:
        raise ValueError(f"{root} has no val/ (or validation/) folder; expected {root}/val/<class>/<images>")
    if need_train and not train.is_dir():
        raise ValueError(f"{root} has no train/ folder; expected {root}/train/<class>/<images>")
    if classes is None and train.is_dir():
        classes = _classes(train)
    val_classes = _classes(val)
    if classes is None:
        classes = val_classes
    if not set(val_classes) <= set(classes):
        extra = sorted(set(val_classes) - set(classes))
        raise ValueError(f"{val} has classes the model was not trained on: {', '.join(extra[:5])}")
    return DataSplits(train, val, list(classes))


def _to_rgb(img):
    """RGB for any PIL mode; 16- and 32-bit grey images are scaled to 8 bits, not clipped."""
    from PIL import Image

    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    return img.convert("RGB")


class _Images(Dataset):
    """An ImageFolder split with a fixed class map, per-sample seeded augmentation and clear errors.

    The listing is done here rather than by timm's reader, which walks sub-folders and follows links:
    nested folders and outside links are refused instead (see :func:`_list_images`).
    """

    def __init__(self, root: Path, classes: list[str], transform, seed: int | None) -> None:
        class_to_idx = {c: i for i, c in enumerate(classes)}
        present = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        self.samples = [
            (p, class_to_idx[c]) for c in present if c in class_to_idx for p in _list_images(root / c, root)
        ]
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        from PIL import Image

        # A broken file is an error naming it; timm's ImageDataset would silently substitute the next sample.
        path, target = self.samples[index]
        try:
            with open(path, "rb") as fh:
                img = _to_rgb(Image.open(fh))
        except Exception as exc:
            raise ValueError(f"unreadable image {path}: {type(exc).__name__}: {exc}; remove or replace it") from None
        if self.seed is None:
            return self.transform(img), target
        # Augmentation depends on (seed, epoch, index) only: a resumed run, any number of workers or
        # ranks, sees exactly the same crops and flips as an uninterrupted one. timm's transforms draw
        # from Python's random (RandomResizedCrop) and numpy as well as torch, so all three are seeded
        # and restored afterwards.
        sample_seed = (self.seed * 1_000_003 + self.epoch) * 10_000_019 + index
        py_state, np_state = random.getstate(), np.random.get_state()
        random.seed(sample_seed)
        np.random.seed(sample_seed % 2**32)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed)
                return self.transform(img), target
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


AUGMENT = ("none", "light", "full")


def _train_transform(cfg: DataConfig, augment: str):
    """timm's training transform for an augmentation policy.

    ``light`` is a random resized crop of 64-100% of the image's area with aspect ratios 3/4 to 4/3,
    and nothing else: no flips (they change what text, digits or a left-right layout mean), no colour
    jitter. ``full`` is timm's ImageNet training transform (crops down to 8% of the image, flips,
    colour jitter). The fine-tune default is ``none``: a short distillation has the teacher's soft
    labels for regularization, and on the digits benchmark even ``light`` cost 1.4 points on resnet18
    and 19 points on mobilenetv3_small_100 after 5 epochs (``benchmarks/recipe.py``).
    """
    from timm.data import create_transform

    if augment == "full":
        return create_transform(**cfg.transform_kwargs(), is_training=True)
    return create_transform(
        **cfg.transform_kwargs(),
        is_training=True,
        scale=(0.64, 1.0),
        ratio=(3 / 4, 4 / 3),
        hflip=0.0,
        color_jitter=None,
    )


def eval_transform(cfg: DataConfig):
    """timm's evaluation transform: resize to ``size / crop_pct``, centre crop, normalize."""
    from timm.data import create_transform

    return create_transform(**cfg.transform_kwargs(), is_training=False)


def val_dataset(splits: DataSplits, cfg: DataConfig) -> Dataset:
    """The val split with the evaluation transform of ``cfg`` (train/ is not needed)."""
    return _Images(splits.val, splits.classes, eval_transform(cfg), None)


def build_datasets(splits: DataSplits, cfg: DataConfig, augment: str, seed: int) -> tuple[Dataset, Dataset]:
    """Train and val datasets with the transforms of the data config ``cfg``.

    ``augment`` is ``none``, ``light`` or ``full`` (see :func:`_train_transform`).

    Raises:
        ValueError: an unknown ``augment``, or no train/ split.
    """
    if augment not in AUGMENT:
        raise ValueError(f"augment must be one of {', '.join(AUGMENT)}, got {augment!r}")
    if not splits.train.is_dir():
        raise ValueError(f"{splits.train.parent} has no train/ folder; expected {splits.train}/<class>/<images>")
    eval_tf = eval_transform(cfg)
    train_tf = eval_tf if augment == "none" else _train_transform(cfg, augment)
    train = _Images(splits.train, splits.classes, train_tf, None if augment == "none" else seed)
    val = _Images(splits.val, splits.classes, eval_tf, None)
    return train, val


def check_classes(splits: DataSplits, num_classes: int | None, recorded: bool) -> None:
    """Refuse a class list that cannot be the model's: labels would be silently shifted.

    Raises:
        ValueError: more classes than the classifier, or (no recorded list, no train/) fewer.
    """
    n = len(splits.classes)
    if num_classes is None:
        return
    if n > num_classes:
        raise ValueError(f"the data has {n} classes but the model's classifier has {num_classes}")
    if n < num_classes and not recorded and not splits.train.is_dir():
        raise ValueError(
            f"{splits.val} has {n} class folders but the model has {num_classes} classes, so labels cannot be "
            "matched to outputs; put train/ beside val/ (its folders give the class list) or evaluate a file "
            "written by finetune (it records the list)"
        )


def calibration_dataset(splits: DataSplits, cfg: DataConfig) -> Dataset:
    """The training images with the evaluation transform: BatchNorm statistics are re-estimated on
    images as the model will see them at test time, not on augmented crops."""
    return _Images(splits.train, splits.classes, eval_transform(cfg), None)


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


def default_workers(processes_per_machine: int = 1) -> int:
    """Data loader workers per process when none are asked for: the CPUs this process may use, shared
    by the processes on the machine, less one for the training process itself, at most 8.

    Example:
        >>> 0 <= default_workers() <= 8
        True
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    return max(0, min(8, cpus // max(1, processes_per_machine) - 1))


def make_loader(dataset: Dataset, sampler: Sampler, batch_size: int, workers: int, drop_last: bool) -> DataLoader:
    """A loader of ``dataset``'s batches in ``sampler``'s order; a :class:`Decoded` split needs no workers."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=0 if isinstance(dataset, Decoded) else workers,
        drop_last=drop_last,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
    )


class Decoded(Dataset):
    """A split's ``(image, target)`` pairs decoded and transformed once and held in memory
    (:func:`decode_once`): the same tensors the split gives, without reading or decoding a file again."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        self.images, self.targets = images, targets
        self.epoch = 0  # set by the training loop, as on every split; nothing here depends on it

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        return self.images[index], int(self.targets[index])


def decode_once(dataset: Dataset, batch_size: int, workers: int, bound: int, progress=None) -> Decoded | str:
    """``dataset`` (a split whose transform draws nothing at random) decoded into memory through a loader
    with ``workers``, or, where the decoded images would take more than ``bound`` bytes, a one-line
    note saying so (the split is then read from disk every epoch)."""
    first, _ = dataset[0]
    size = len(dataset) * first.numel() * first.element_size()
    if size > bound:
        return (
            f"images are decoded every epoch: {len(dataset)} decoded images would take {size / 2**30:.1f} GiB "
            f"(bound {bound / 2**30:.1f} GiB)"
        )
    images = torch.empty((len(dataset), *first.shape), dtype=first.dtype)
    targets = torch.empty(len(dataset), dtype=torch.int64)
    loader = make_loader(dataset, EpochSampler(len(dataset), shuffle=False), batch_size, workers, drop_last=False)
    done = 0
    for x, y in iterate(loader):
        images[done : done + len(x)], targets[done : done + len(x)] = x, y
        done += len(x)
        if progress is not None:
            progress.advance(1)
    return Decoded(images, targets)


def iterate(loader):
    """Iterate a loader, turning a worker's wrapped error back into its one-line message.

    Example:
        >>> list(iterate([1, 2]))
        [1, 2]
    """
    try:
        yield from loader
    except Exception as exc:
        # DataLoader re-raises a worker's error with a multi-line "Caught ... Original Traceback" message.
        text = str(exc)
        if "Original Traceback" not in text:
            raise
        for line in reversed(text.splitlines()):
            if line.startswith("ValueError: "):
                raise ValueError(line[len("ValueError: ") :]) from None
        raise
