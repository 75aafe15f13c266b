"""The latent checkpoint (the file ``binarize`` and ``finetune`` write) and ``load_model`` for every format.

Every file is a safetensors file whose string metadata describes the model (:mod:`equalbits_cli.formats.files`),
so that :func:`load_model` rebuilds a ready model from the file alone.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from ..paths import atomic_write
from . import LATENT_FORMAT, PACKED_FORMAT
from .files import (
    base_metadata,
    build_model,
    file_info,
    load_state_into,
    tensors_for_saving,
)
from .packed import load_packed

__all__ = ["load_model", "save_checkpoint"]


def save_checkpoint(
    model: nn.Module, path: str | os.PathLike, extra: dict[str, str] | None = None, *, exclusive: bool = False
) -> Path:
    """Write the binarized model's latent weights and all other tensors, with metadata, atomically.

    Args:
        model: A model from :func:`equalbits_cli.binarize_model` or :func:`load_model`.
        path: Output ``.safetensors`` path.
        extra: Further string metadata to record.
        exclusive: Refuse (ValueError) if ``path`` exists when the file is renamed into place.

    Returns:
        The path written.
    """
    from safetensors.torch import save_file

    meta = base_metadata(model, LATENT_FORMAT)
    meta.update(extra or {})
    path = Path(path)
    with atomic_write(path, exclusive=exclusive) as tmp:
        save_file(tensors_for_saving(model.state_dict()), str(tmp), metadata=meta)
    return path


def load_model(path: str | os.PathLike) -> nn.Module:
    """Rebuild a ready binarized model (eval mode) from a latent checkpoint or a packed file.

    Args:
        path: A file written by :func:`save_checkpoint` or :func:`equalbits_cli.save_packed`.

    Returns:
        The model, in eval mode, with ``model.equalbits_meta`` describing it: from a latent checkpoint in
        the training form (:class:`equalbits_cli.BinaryConv2d` / ``BinaryLinear`` layers with latent
        weights); from a packed file in the packed inference form
        (:class:`equalbits_cli.nn.packed.PackedBinary` layers holding the file's bit planes: they
        evaluate and export, but do not train).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not an equalbits file or is damaged.
    """
    from safetensors.torch import load_file

    path = Path(path)
    info = file_info(path)
    model = build_model(info)
    try:
        state = load_file(str(path))
    except Exception as exc:
        raise ValueError(f"{path}: cannot read tensors ({exc})") from None
    if info.format == PACKED_FORMAT:
        model = load_packed(model, state, path, info.version)
    else:
        load_state_into(model, state, path, info.version)
    model.eval()
    return model
