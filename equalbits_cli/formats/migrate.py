"""Reading files of every earlier format version: one place that turns them into today's form.

Version 2 (equalbits 0.5) is what every writer writes. Version 1 (equalbits 0.1 to 0.4) differs in
three ways, each undone here and nowhere else:

- ``binarize_config`` may lack ``center`` (0.1 computed with plain levels ``scale * codes``);
- there is no ``data_config``: the file was read with the architecture's timm config, except that a
  file fine-tuned with ``--img-size S`` (its ``finetune`` JSON holds ``img_size``) was trained at
  ``S x S`` on the whole image (``crop_pct`` 1.0), since 0.1-0.4 forced that for an explicit size;
- 1W/1A latent and packed files of 0.1 hold no ``act_threshold``: they computed ``sign(x)`` at 0.

Readers call :func:`migrate_metadata` before checking the metadata, and :func:`migrate_state` before
loading tensors, so that the rest of the code knows version 2 only.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import torch

from ..data.config import DataConfig

__all__ = ["FORMAT_VERSION", "READS", "migrate_metadata", "migrate_state"]

FORMAT_VERSION = "2"
READS = ("1", "2")


def _json(meta: dict[str, str], key: str) -> Any:
    try:
        return json.loads(meta.get(key) or "null")
    except json.JSONDecodeError:
        return None  # left as it is: the checks after migration report it


def _legacy_data_config(meta: dict[str, str], input_size: tuple[int, int, int] | None) -> DataConfig | None:
    """The data config a version-1 file was used with (None where its architecture is unknown here)."""
    import timm

    name, kwargs = meta.get("model", ""), _json(meta, "model_kwargs")
    if not isinstance(kwargs, dict) or not (name.startswith("hf-hub:") or timm.is_model(name)):
        return None
    try:
        with torch.device("meta"):  # shapes only: no memory, no weights, no download
            arch = timm.create_model(name, pretrained=False, **kwargs)
        cfg = DataConfig.of_model(arch)
    except Exception:  # an architecture that cannot be built: the real build reports why
        return None
    tuned = _json(meta, "finetune")
    size = tuned.get("img_size") if isinstance(tuned, dict) else None
    if isinstance(size, int) and not isinstance(size, bool) and 8 <= size <= 4096:
        return replace(cfg, input_size=(cfg.input_size[0], size, size), crop_pct=1.0)
    if input_size is not None:  # an ONNX graph's own input size
        return replace(cfg, input_size=input_size)
    return cfg


def migrate_metadata(
    meta: dict[str, str], input_size: tuple[int, int, int] | None = None
) -> tuple[dict[str, str], str | None]:
    """Metadata of any version this equalbits reads, in the form version 2 writes.

    Args:
        meta: The file's metadata as stored.
        input_size: For an ONNX file, its graph's ``(C, H, W)`` (version-1 files without a data config
            were evaluated at that size).

    Returns:
        ``(metadata, version it was written in)``; the version is None for a version this equalbits
        does not read (the metadata is returned unchanged, and the reader refuses it by its version).

    Example:
        >>> meta, was = migrate_metadata({"format_version": "1", "model": "resnet18", "model_kwargs": "{}",
        ...                               "binarize_config": '{"ratio": 0.5}'})
        >>> was, json.loads(meta["binarize_config"]), json.loads(meta["data_config"])["input_size"]
        ('1', {'ratio': 0.5, 'center': False}, [3, 224, 224])
    """
    version = meta.get("format_version")
    if version not in READS:
        return meta, None
    if version == FORMAT_VERSION:
        return meta, version
    out = dict(meta, format_version=FORMAT_VERSION)
    config = _json(meta, "binarize_config")
    if isinstance(config, dict) and "center" not in config:
        out["binarize_config"] = json.dumps({**config, "center": False})
    if "data_config" not in meta:
        cfg = _legacy_data_config(meta, input_size)
        if cfg is not None:
            out["data_config"] = json.dumps(cfg.to_dict())
    return out, version


def migrate_state(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], version: str | None) -> dict:
    """Tensors of a file written in ``version``, in the form the model of version 2 expects."""
    if version != "1":
        return state
    state = dict(state)
    for key, like in expected.items():  # 1W/1A files of 0.1: sign(x) at 0
        if key.endswith(".act_threshold") and key not in state:
            state[key] = torch.zeros_like(like)
    return state
