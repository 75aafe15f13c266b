"""The latent checkpoint (the file ``binarize`` and ``finetune`` write) and ``load_model`` for every format.

Every file is a safetensors file whose string metadata describes the model (:mod:`equalbits_cli.files`),
so that :func:`load_model` rebuilds a ready model from the file alone.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from .files import (
    FORMAT_VERSION,
    LATENT_FORMAT,
    PACKED_FORMAT,
    FileInfo,
    _fail,
    _tensors_for_saving,
    atomic_write,
    base_metadata,
    build_model,
    check_output_path,
    file_info,
    load_state_into,
    read_metadata,
    require_file,
)
from .packing import load_packed_into

__all__ = [
    "FORMAT_VERSION",
    "LATENT_FORMAT",
    "PACKED_FORMAT",
    "FileInfo",
    "atomic_write",
    "build_model",
    "check_output_path",
    "file_info",
    "load_model",
    "load_state_into",
    "read_metadata",
    "require_file",
    "save_checkpoint",
]


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
        save_file(_tensors_for_saving(model.state_dict()), str(tmp), metadata=meta)
    return path


def load_model(path: str | os.PathLike) -> nn.Module:
    """Rebuild a ready binarized model (eval mode) from a latent checkpoint or a packed file.

    Args:
        path: A file written by :func:`save_checkpoint` or :func:`equalbits_cli.save_packed`.

    Returns:
        The model, in eval mode, with ``model.equalbits_meta`` describing it.

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
        raise _fail(path, f"cannot read tensors ({exc})") from None
    if info.format == PACKED_FORMAT:
        load_packed_into(model, state, path)
    else:
        load_state_into(model, state, path)
    model.eval()
    return model
