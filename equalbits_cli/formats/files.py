"""What every equalbits file shares: metadata, safe writing, and rebuilding the model a file describes.

Each file format has its own module (:mod:`equalbits_cli.formats.latent` the latent checkpoint and the
``load_model`` entry point, :mod:`equalbits_cli.formats.packed` the packed file,
:mod:`equalbits_cli.export.onnx` ONNX); this one sits below them all, so none imports another.
Writes are atomic: the data go to a temporary file in the target directory, which is flushed and then
renamed to the target.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import BinarizeConfig
from ..data.config import DataConfig, resolve_data_config
from ..model.convert import binarize_, binarized_names
from ..model.policy import INPUT_REASONS, KEEP_REASONS, LayerPolicy
from ..paths import mismatch_detail, read_metadata
from . import LATENT_FORMAT, PACKED_FORMAT
from .migrate import FORMAT_VERSION, READS, migrate_metadata, migrate_state

__all__ = ["FileInfo", "base_metadata", "build_model", "file_info", "load_state_into"]


@dataclass(frozen=True)
class FileInfo:
    """What an equalbits file's metadata says about the model it holds."""

    path: str
    format: str
    model: str
    model_kwargs: dict[str, Any]
    config: BinarizeConfig
    binarized: list[str]
    source: dict[str, Any] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)
    policy: dict[str, Any] | None = None
    classes: list[str] | None = None
    data_config: DataConfig | None = None
    version: str = FORMAT_VERSION  # the format version the file was written in
    real_inputs: dict[str, str] = field(default_factory=dict)  # 1W/1A layers computing on real inputs


def tensors_for_saving(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share memory; clone those (and make everything contiguous).
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in state.items():
        v = v.detach().cpu()
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        if ptr in seen or not v.is_contiguous():
            v = v.clone().contiguous()
        if ptr != -1:
            seen.add(ptr)
        out[k] = v
    return out


def base_metadata(model: nn.Module, fmt: str) -> dict[str, str]:
    """The metadata every equalbits file carries (all values are strings)."""
    from ..nn.packed import PackedBinary
    from ..version import __version__

    meta = getattr(model, "equalbits_meta", None)
    if meta is None:
        raise ValueError("model has no equalbits metadata; build it with equalbits_cli.binarize_model or load_model")
    policy = meta.get("policy")
    return {
        "format": fmt,
        "format_version": FORMAT_VERSION,
        "equalbits_version": __version__,
        "model": meta["model"],
        "model_kwargs": json.dumps(meta["model_kwargs"], sort_keys=True),
        "binarize_config": meta["config"].to_json(),
        "binarized": json.dumps(binarized_names(model)),
        "kept": json.dumps(meta.get("kept", {})),
        "layer_policy": json.dumps(policy.to_dict() if policy is not None else None),
        "source": json.dumps(meta.get("source", {}), sort_keys=True),
        **({"classes": json.dumps(meta["classes"])} if meta.get("classes") else {}),
        **({"real_inputs": json.dumps(real)} if (real := real_inputs(model)) else {}),
        # How images were prepared in training: eval and export use it unless the user says otherwise.
        "data_config": json.dumps(resolve_data_config(model).to_dict()),
        # What inspect needs to report a packed file without building the model (numpy only); a model in
        # the packed form holds its binarized weights as bit-plane buffers, counted as the weights they are.
        "layers": json.dumps(
            [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear, PackedBinary))]
        ),
        "param_count": str(
            sum(p.numel() for p in model.parameters())
            + sum(m.count for m in model.modules() if isinstance(m, PackedBinary))
        ),
    }


def real_inputs(model: nn.Module) -> dict[str, str]:
    """The binarized layers of a 1W/1A model that compute on real-valued inputs, with the input policy's
    reason for each (:func:`equalbits_cli.model.policy.plan_inputs`)."""
    from ..nn.layers import BinaryLayer
    from ..nn.packed import PackedBinary

    meta = getattr(model, "equalbits_meta", None) or {}
    packed_sign = meta.get("config") is not None and meta["config"].activations == "sign"
    reasons = meta.get("real_inputs", {})

    def one_bit_model(m: nn.Module) -> bool:  # a packed layer has no config of its own: the model's says
        return m.config.activations == "sign" if isinstance(m, BinaryLayer) else packed_sign

    return {
        n: reasons.get(n, "pattern")
        for n, m in model.named_modules()
        if isinstance(m, (BinaryLayer, PackedBinary)) and m.act_threshold is None and one_bit_model(m)
    }


def _fail(path: Path, problem: str) -> ValueError:
    return ValueError(f"{path}: {problem}")


def _json_field(path: Path, meta: dict[str, str], key: str, kind: type) -> Any:
    if key not in meta:
        raise _fail(path, f"metadata lacks {key!r}; the file was not written by equalbits or is damaged")
    try:
        value = json.loads(meta[key])
    except json.JSONDecodeError:
        raise _fail(path, f"metadata {key!r} is not valid JSON") from None
    if not isinstance(value, kind):
        raise _fail(path, f"metadata {key!r} must be a JSON {kind.__name__}")
    return value


# Constructor arguments a file may record, with their accepted ranges: anything else is refused, so
# that a forged file cannot make timm build something huge or unexpected.
_MODEL_KWARGS = {"num_classes": (0, 1_000_000), "img_size": (8, 4096)}


def _check_model_kwargs(path: Path, kwargs: dict[str, Any]) -> None:
    for key, value in kwargs.items():
        if key not in _MODEL_KWARGS:
            raise _fail(path, f"metadata model_kwargs has unsupported key {key!r}")
        low, high = _MODEL_KWARGS[key]
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise _fail(path, f"metadata model_kwargs {key}={value!r} is out of range [{low}, {high}]")


def file_info(
    path: str | os.PathLike, meta: dict[str, str] | None = None, input_size: tuple[int, int, int] | None = None
) -> FileInfo:
    """Parse and check an equalbits file's metadata, of any version this equalbits reads
    (:mod:`equalbits_cli.formats.migrate` brings earlier versions to today's form first).

    Args:
        path: The file.
        meta: Its metadata, when already read.
        input_size: For an ONNX file, its graph's input ``(C, H, W)``.

    Raises:
        ValueError: not an equalbits file, an unsupported version, or malformed metadata.
    """
    import timm

    path = Path(path)
    meta = read_metadata(path) if meta is None else meta
    fmt = meta.get("format")
    if fmt not in (LATENT_FORMAT, PACKED_FORMAT):
        raise _fail(path, f"not an equalbits file (format {fmt!r}); for a plain timm state dict pass `model_name` NAME")
    stored_version = meta.get("format_version")
    meta, version = migrate_metadata(meta, input_size)
    if version is None:
        raise _fail(
            path,
            f"{fmt} version {stored_version!r} is not supported by this equalbits (reads versions "
            f"{', '.join(READS)}); upgrade equalbits",
        )
    model = meta.get("model", "")
    if not model or not (model.startswith("hf-hub:") or timm.is_model(model)):
        raise _fail(path, f"model {model!r} is not known to this timm; upgrade timm")
    kwargs = _json_field(path, meta, "model_kwargs", dict)
    _check_model_kwargs(path, kwargs)
    try:
        config = BinarizeConfig.from_dict(_json_field(path, meta, "binarize_config", dict))
    except (TypeError, ValueError) as exc:
        raise _fail(path, f"bad binarize_config: {exc}") from None
    binarized = _json_field(path, meta, "binarized", list)
    if not all(isinstance(b, str) for b in binarized):
        raise _fail(path, "metadata 'binarized' must be a list of module names")
    source = _json_field(path, meta, "source", dict) if "source" in meta else {}
    kept = _json_field(path, meta, "kept", dict) if "kept" in meta else {}
    if not all(isinstance(k, str) and v in KEEP_REASONS + ("filter",) for k, v in kept.items()):
        raise _fail(path, "metadata 'kept' must map module names to a reason")
    real = _json_field(path, meta, "real_inputs", dict) if "real_inputs" in meta else {}
    if not all(isinstance(k, str) and k in binarized and v in INPUT_REASONS for k, v in real.items()):
        raise _fail(path, "metadata 'real_inputs' must map binarized module names to a reason")
    if real and config.activations != "sign":
        raise _fail(path, "metadata 'real_inputs' is only meaningful with binary activations")
    policy = None if meta.get("layer_policy") in (None, "null") else _json_field(path, meta, "layer_policy", dict)
    if policy is not None:
        try:
            LayerPolicy.from_dict(policy)
        except (TypeError, ValueError) as exc:
            raise _fail(path, f"bad layer_policy: {exc}") from None
    classes = _json_field(path, meta, "classes", list) if "classes" in meta else None
    if classes is not None and (
        not all(isinstance(c, str) and 0 < len(c) <= 255 for c in classes) or len(set(classes)) != len(classes)
    ):
        raise _fail(path, "metadata 'classes' must be a list of distinct folder names")
    if classes is not None and kwargs.get("num_classes") is not None and len(classes) > kwargs["num_classes"]:
        raise _fail(path, "metadata 'classes' lists more classes than the classifier has")
    data_config = None
    if "data_config" in meta:  # absent only where a version-1 file names an architecture unknown here
        try:
            data_config = DataConfig.from_dict(_json_field(path, meta, "data_config", dict))
        except (TypeError, ValueError) as exc:
            raise _fail(path, f"bad data_config: {exc}") from None
    return FileInfo(
        str(path),
        fmt,
        model,
        kwargs,
        config,
        binarized,
        source,
        kept,
        policy,
        classes,
        data_config,
        version,
        real,
    )


_MAX_ELEMENTS = 4_000_000_000  # about 16 GB of fp32: more than any file equalbits writes should ask for


def _check_declared_size(info: FileInfo, path: Path) -> None:
    """Refuse, before allocating anything, a file too small for the model its metadata names.

    The model is built on the meta device (shapes only, no memory), and the bytes its tensors need at
    the least (1 bit per binarized weight, everything else as stored) are compared with the file's size,
    so that a forged 500-byte header cannot make us allocate gigabytes.
    """
    import timm

    try:
        with torch.device("meta"):
            model = timm.create_model(info.model, pretrained=False, **info.model_kwargs)
    except Exception:  # a model that cannot be built on meta: the real build reports the problem
        return
    binarized = {n + ".weight" for n in info.binarized}
    need = total = 0
    for name, t in model.state_dict().items():
        total += t.numel()
        need += t.numel() // 8 if name in binarized else t.numel() * t.element_size()
    if total > _MAX_ELEMENTS:
        raise _fail(path, f"model {info.model} with {info.model_kwargs} has {total:,} values, over the limit")
    size = path.stat().st_size
    if size < 0.9 * need:
        raise _fail(
            path, f"file of {size:,} bytes is too small for model {info.model!r}, which needs at least {need:,}"
        )


def build_model(info: FileInfo) -> nn.Module:
    """An untrained timm model with the file's architecture, binarized as the file says.

    Raises:
        ValueError: the model cannot be built or a listed module is missing or not Conv2d/Linear.
    """
    import timm

    path = Path(info.path)
    kwargs = dict(info.model_kwargs)
    _check_declared_size(info, path)
    try:
        model = timm.create_model(info.model, pretrained=False, **kwargs)
    except Exception as exc:
        raise _fail(path, f"cannot build model {info.model!r} with {kwargs}: {exc}") from None
    modules = dict(model.named_modules())
    wanted = set(info.binarized)
    for name in wanted:
        if not isinstance(modules.get(name), (nn.Conv2d, nn.Linear)):
            raise _fail(path, f"binarized module {name!r} is not a Conv2d/Linear of {info.model}")
    if not wanted:
        raise _fail(path, "metadata 'binarized' lists no layer; the file holds no binary network")
    binarize_(model, info.config, filter_fn=lambda m, fqn: fqn in wanted, real_inputs=info.real_inputs)
    model.equalbits_meta = {
        "model": info.model,
        "model_kwargs": kwargs,
        "config": info.config,
        "source": info.source,
        "kept": dict(info.kept),
        "policy": LayerPolicy.from_dict(info.policy) if info.policy is not None else None,
        "classes": info.classes,
        "real_inputs": dict(info.real_inputs),
    }
    if info.data_config is not None:
        model.equalbits_meta["data_config"] = info.data_config
    return model


def _check_finite(path: Path, name: str, t: torch.Tensor) -> None:
    if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
        raise _fail(path, f"tensor {name!r} holds NaN or inf values")


def load_state_into(model: nn.Module, state: dict[str, torch.Tensor], path: Path, version: str | None = None) -> None:
    """Load ``state`` (of a file written in format ``version``) strictly, turning mismatches into one-line
    errors."""
    expected = model.state_dict()
    state = migrate_state(state, expected, version)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise _fail(path, "tensors do not match the model: " + mismatch_detail(missing, unexpected))
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise _fail(path, f"tensor {k!r} has shape {tuple(state[k].shape)}, model expects {tuple(v.shape)}")
        _check_finite(path, k, state[k])
    model.load_state_dict(state, strict=True)
