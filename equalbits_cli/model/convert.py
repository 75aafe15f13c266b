"""Turning a full-precision model into a binary one: the layer filter, ``binarize_`` and model loading."""

from __future__ import annotations

import contextlib
import difflib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import BinarizeConfig
from ..data.config import DataConfig, built_input_size
from ..errors import SettingError
from ..nn.layers import BinaryConv2d, BinaryLayer, BinaryLinear
from ..nn.step_weights import StepWeights
from .policy import LayerPlan, LayerPolicy, check_input_rules, module_names, plan_inputs, plan_layers, special_names

__all__ = [
    "FilterFn",
    "binarize_",
    "check_fits",
    "check_model_name",
    "default_filter",
    "excluded_names",
    "create_model",
    "load_state_dict_file",
    "CheckpointRecord",
    "read_checkpoint_record",
    "save_full_precision",
    "binarized_names",
]

FilterFn = Callable[[nn.Module, str], bool]
MAX_CLASSES = 1_000_000  # what file readers accept (io._MODEL_KWARGS): never write what cannot be read


def _is_plain(module: nn.Module) -> bool:
    """A Conv2d/Linear whose forward is the standard one (so swapping the class keeps its behaviour)."""
    if isinstance(module, BinaryLayer):
        return False
    if isinstance(module, nn.Conv2d):
        return type(module).forward is nn.Conv2d.forward
    if isinstance(module, nn.Linear):
        return type(module).forward is nn.Linear.forward or type(module).__module__.startswith("timm.layers")
    return False


def excluded_names(model: nn.Module) -> list[str]:
    """Module names of the stem conv and the classifier (always kept full precision unless included).

    Read from timm's ``pretrained_cfg`` (``first_conv``, ``classifier``). For a model without it, the
    first Conv2d and the last Linear in module order.
    """
    stem, head = special_names(model)
    return stem + head


def default_filter(model: nn.Module, policy: LayerPolicy | None = None) -> FilterFn:
    """The layer filter of a policy (default: :class:`LayerPolicy`'s rules), as ``(module, fqn) -> bool``.

    Example:
        >>> import timm
        >>> m = timm.create_model("resnet18", pretrained=False, num_classes=10)
        >>> keep = default_filter(m)
        >>> keep(m.conv1, "conv1"), keep(m.layer1[0].conv1, "layer1.0.conv1"), keep(m.fc, "fc")
        (False, True, False)
    """
    chosen = {p.name for p in plan_layers(model, policy) if p.binarize}

    def keep(module: nn.Module, fqn: str) -> bool:
        return fqn in chosen and isinstance(module, (nn.Conv2d, nn.Linear))

    return keep


def _set_submodule(model: nn.Module, fqn: str, module: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _plans(model: nn.Module, policy: LayerPolicy | None, filter_fn: FilterFn | None) -> list[LayerPlan]:
    if filter_fn is None:
        return plan_layers(model, policy, is_swappable=_is_plain)
    plans = []
    for fqn, module in model.named_modules():
        if not fqn or not isinstance(module, (nn.Conv2d, nn.Linear)) or isinstance(module, BinaryLayer):
            continue
        if not filter_fn(module, fqn):
            plans.append(LayerPlan(fqn, False, "filter"))
        elif not _is_plain(module):
            plans.append(LayerPlan(fqn, False, "custom forward"))
        else:
            plans.append(LayerPlan(fqn, True, None))
    return plans


def _check_counts(fqn: str, module: nn.Module, config: BinarizeConfig) -> None:
    """Refuse settings under which a layer's codes carry no information (all 0, or one sign only)."""
    from ..quant.quantize import ot_counts

    n = module.weight[0].numel()
    n_minus, n_zero, n_plus = ot_counts(n, config.ratio, config.prune)
    if n_minus + n_plus == 0:
        raise SettingError(
            f"`prune` {config.prune} sets all {n} weights of each filter of {fqn} to 0; use a smaller `prune`"
        )
    if n_minus + n_plus > 1 and (n_minus == 0 or n_plus == 0):
        sign = "+1" if n_minus == 0 else "-1"
        raise SettingError(
            f"`ratio` {config.ratio} gives each filter of {fqn} ({n_minus + n_plus} unpruned weights) only {sign} "
            "codes, which carry no information; choose a ratio nearer 0.5"
        )


def check_fits(model: nn.Module, config: BinarizeConfig, policy: LayerPolicy | None = None) -> None:
    """Check that ``config`` leaves every layer ``binarize_`` would binarize with informative codes,
    without converting anything (a model on the meta device will do).

    Raises:
        ValueError: a layer would get only one sign, or only zeros, naming the layer and the fix.
    """
    if config.method != "ot":
        return
    modules = dict(model.named_modules())
    for plan in _plans(model, policy, None):
        if plan.binarize:
            _check_counts(plan.name, modules[plan.name], config)


def binarize_(
    model: nn.Module,
    config: BinarizeConfig | None = None,
    filter_fn: FilterFn | None = None,
    *,
    policy: LayerPolicy | None = None,
    real_inputs: dict[str, str] | None = None,
) -> None:
    """Replace, in place, every selected Conv2d/Linear by its binarized version. Returns None.

    Afterwards ``model.equalbits_meta`` records the config, the policy and why each other layer was kept,
    so :func:`equalbits_cli.save_checkpoint` can write the model as it is.

    Args:
        model: The model to convert (a timm model or any ``nn.Module``).
        config: Quantizer settings; defaults to ``BinarizeConfig()`` (equal bits, no pruning).
        filter_fn: ``(module, fqn) -> bool`` choosing the layers; overrides ``policy``.
        policy: The layer policy (:class:`equalbits_cli.LayerPolicy`); default: keep the stem, the
            classifier, depthwise convolutions and squeeze-excite gates full precision.
            Conv2d/Linear subclasses with their own forward (e.g. timm's ``Conv2dSame``) are always
            kept, since swapping them would change what they compute.
        real_inputs: With 1-bit activations, the binarized layers that keep real-valued inputs, with
            their reasons, as a file records them; default: as the policy's input rules decide
            (:func:`equalbits_cli.model.policy.plan_inputs`).

    Raises:
        ValueError: nothing would be binarized, a policy pattern matches no module, or input rules are
            given without 1-bit activations.

    Example:
        >>> import timm
        >>> m = timm.create_model("resnet18", pretrained=False, num_classes=10)
        >>> binarize_(m, BinarizeConfig(ratio=0.5))
        >>> type(m.layer1[0].conv1).__name__, type(m.conv1).__name__, m.equalbits_meta["kept"]["fc"]
        ('BinaryConv2d', 'Conv2d', 'classifier')
    """
    config = config or BinarizeConfig()
    check_input_rules(policy, config.activations)
    modules = dict(model.named_modules())
    already = {n for n, m in modules.items() if isinstance(m, BinaryLayer)}
    plans = [p for p in _plans(model, policy, filter_fn) if p.name not in already]
    chosen = [p.name for p in plans if p.binarize]
    if not chosen and already:  # binarizing twice changes nothing
        return
    if not chosen:
        custom = sorted({type(modules[p.name]).__name__ for p in plans if p.reason == "custom forward"})
        if custom:
            raise ValueError(
                f"nothing to binarize: every selected layer has a custom forward ({', '.join(custom)}), "
                "which a binary layer cannot replace; choose another model"
            )
        raise SettingError(
            "nothing to binarize: the layer policy keeps every Conv2d/Linear; loosen `exclude`/`include`"
        )
    if config.method == "ot":
        for fqn in chosen:
            _check_counts(fqn, modules[fqn], config)
    if config.activations != "sign":
        real = {}
    elif real_inputs is not None:
        real = dict(real_inputs)
    else:
        real = plan_inputs(model, chosen, policy)
    for fqn in chosen:
        module = modules[fqn]
        if isinstance(module, nn.Conv2d):
            _set_submodule(model, fqn, BinaryConv2d.from_float(module, config))
        else:
            _set_submodule(model, fqn, BinaryLinear.from_float(module, config))
        if fqn in real:
            model.get_submodule(fqn).keep_real_inputs()
    # One StepWeights for all binary layers: on CUDA a training step builds their weights together.
    StepWeights([m for m in model.modules() if isinstance(m, BinaryLayer)])
    kept = {p.name: p.reason for p in plans if not p.binarize}
    recorded_policy = None if filter_fn is not None else (policy or LayerPolicy())
    meta = getattr(model, "equalbits_meta", None)
    if meta is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        arch = cfg.get("architecture") or type(model).__name__
        attach_meta(model, config, {"model": arch, "pretrained": None, "checkpoint": None})
        meta = model.equalbits_meta
    meta.update({"config": config, "kept": kept, "policy": recorded_policy, "real_inputs": real})


def binarized_names(model: nn.Module) -> list[str]:
    """Names of the binarized modules of ``model`` (training or packed form), in module order."""
    from ..nn.packed import PackedBinary

    return [n for n, m in model.named_modules() if isinstance(m, (BinaryLayer, PackedBinary))]


_WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model", "module")


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a plain state dict from ``.safetensors`` or ``.pth``/``.pt`` (never unpickling code).

    ``.pth`` files are read with ``torch.load(weights_only=True)``; common wrappers (``state_dict``,
    ``model``, ``state_dict_ema``) and a ``module.`` prefix (DataParallel) are unwrapped.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if it cannot be read as a state dict.
    """
    from ..paths import require_file

    path = require_file(path, "checkpoint")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None
        _check_finite_state(path, state)
        return state
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path}: not a readable PyTorch state dict ({first})") from None
    for key in _WRAPPER_KEYS:
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: does not hold a state dict of tensors")
    _check_finite_state(path, obj)
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


@dataclass(frozen=True)
class CheckpointRecord:
    """What a full-precision safetensors checkpoint records about its training, when it does.

    Attributes:
        data_config: The preprocessing it was trained with (metadata ``data_config``).
        top1: Its validation top-1 in percent (metadata ``val_top1``), e.g. from ``quickstart``.
    """

    data_config: DataConfig | None = None
    top1: float | None = None


def read_checkpoint_record(path: str | os.PathLike) -> CheckpointRecord:
    """The training record in a checkpoint's safetensors metadata (empty for other files).

    Raises:
        ValueError: the record is present but malformed.
    """
    import json

    path = Path(path)
    if path.suffix != ".safetensors":
        return CheckpointRecord()
    from ..paths import read_metadata

    meta = read_metadata(path)
    cfg = top1 = None
    try:
        if "data_config" in meta:
            cfg = DataConfig.from_dict(json.loads(meta["data_config"]))
        if "val_top1" in meta:
            top1 = float(meta["val_top1"])
            if not 0 <= top1 <= 100:
                raise ValueError(f"val_top1 {top1} is not a percentage")
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: bad training record in its metadata ({exc})") from None
    return CheckpointRecord(cfg, top1)


def save_full_precision(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    data_config: DataConfig | None = None,
    top1: float | None = None,
    exclusive: bool = False,
) -> Path:
    """Write a full-precision model as a plain safetensors state dict (what timm loads), recording how
    it was trained in the metadata, so that ``binarize`` and ``finetune`` default to the same images.

    Returns:
        The path written.
    """
    import json

    from safetensors.torch import save_file

    from ..paths import atomic_write

    meta = {}
    if data_config is not None:
        meta["data_config"] = json.dumps(data_config.to_dict())
    if top1 is not None:
        meta["val_top1"] = repr(float(top1))
    path = Path(path)
    with atomic_write(path, exclusive=exclusive) as tmp:
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp), metadata=meta)
    return path


def apply_record(model: nn.Module, record: CheckpointRecord) -> None:
    """Make timm's data config of ``model`` the one its checkpoint records (no-op without a record)."""
    if record.data_config is not None:
        model.pretrained_cfg = {
            **(getattr(model, "pretrained_cfg", None) or {}),
            **record.data_config.transform_kwargs(),
        }


def _check_finite_state(path: Path, state: dict[str, torch.Tensor]) -> None:
    for k, v in state.items():
        if v.is_floating_point() and v.numel() and not bool(torch.isfinite(v).all()):
            raise ValueError(f"{path}: tensor {k!r} holds NaN or inf values; the checkpoint is damaged")


def check_model_name(name: str) -> None:
    """Refuse a name timm does not know, suggesting close ones (``hf-hub:`` names pass).

    Raises:
        ValueError: an unknown name.
    """
    import timm

    if name.startswith("hf-hub:"):
        return
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise ValueError(f"unknown timm model {name!r}{hint}")


def _hub_reachable() -> bool:
    """Whether the Hugging Face Hub's host resolves (a DNS lookup, no request)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


@contextlib.contextmanager
def _offline_if_unreachable(download: bool) -> Iterator[None]:
    """Without network, put huggingface_hub in offline mode for the call: cached weights still load,
    and a missing one fails at once instead of after a minute of retries."""
    if not download or _hub_reachable():
        yield
        return
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _classifier_classes(model: nn.Module, state: dict[str, torch.Tensor]) -> int | None:
    """Number of classes the checkpoint's classifier has, if it can be read off."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    for name in module_names(cfg.get("classifier")):
        w = state.get(f"{name}.weight")
        if w is not None and w.dim() >= 1:
            return int(w.shape[0])
    return None


def create_model(
    name: str,
    *,
    pretrained: bool = False,
    checkpoint: str | os.PathLike | None = None,
    num_classes: int | None = None,
    img_size: int | None = None,
    **kwargs,
) -> nn.Module:
    """Build a full-precision timm model from the hub, ``hf-hub:org/name`` or a local state dict.

    Args:
        name: A timm model name (``resnet18``) or ``hf-hub:org/name``.
        pretrained: Download pretrained weights (ignored when ``checkpoint`` is given).
        checkpoint: A local ``.safetensors``/``.pth`` state dict to load instead of downloading.
        num_classes: Classifier size; read from the checkpoint when not given.
        img_size: Input side for architectures built for one input size (ViT, DeiT: timm's
            ``fixed_input_size``; pretrained position embeddings are resampled by timm); default: the
            size the checkpoint records it was trained at, else the architecture's own. Other
            architectures take any size and ignore it.
        **kwargs: Further ``timm.create_model`` arguments.

    Returns:
        The model in eval mode.

    Raises:
        ValueError: unknown model name, offline download, or a checkpoint that does not fit.
        FileNotFoundError: the checkpoint does not exist.

    Example:
        >>> m = create_model("resnet18", num_classes=10)
        >>> m.fc.out_features
        10
    """
    import timm

    if num_classes is not None and not 1 <= num_classes <= MAX_CLASSES:
        raise SettingError(f"`num_classes` must be between 1 and {MAX_CLASSES:,}, got {num_classes}")
    if Path(name).suffix in (".safetensors", ".pth", ".pt", ".onnx") or Path(name).is_file():
        raise SettingError(
            f"`name` is the timm architecture, not a file: pass e.g. 'resnet18' as `name` and {name} as `checkpoint`"
        )
    check_model_name(name)
    state = None
    record = CheckpointRecord()
    if checkpoint is not None:
        state = load_state_dict_file(checkpoint)
        record = read_checkpoint_record(checkpoint)
        pretrained = False
    model_kwargs = dict(kwargs)
    if num_classes is not None:
        model_kwargs["num_classes"] = num_classes
    size = img_size or (record.data_config.input_size[-1] if record.data_config is not None else None)
    if size is not None and "img_size" not in model_kwargs and fixed_input_size(name) not in (None, size):
        model_kwargs["img_size"] = size  # a ViT's position embeddings are made for one size
    download = pretrained or name.startswith("hf-hub:")
    try:
        with _offline_if_unreachable(download):
            model = timm.create_model(name, pretrained=download, **model_kwargs)
    except (OSError, RuntimeError, ValueError) as exc:
        cause = (str(exc).strip().splitlines() or [""])[0][:300]
        if pretrained or name.startswith("hf-hub:"):
            raise SettingError(
                f"could not download pretrained weights for {name!r} ({type(exc).__name__}: {cause}); pass "
                "`checkpoint` PATH with a local state dict, or `pretrained=False`"
            ) from exc
        raise ValueError(f"could not build timm model {name!r}: {cause}") from exc
    if state is not None:
        ckpt_classes = _classifier_classes(model, state)
        if num_classes is None and ckpt_classes is not None and ckpt_classes != model_kwargs.get("num_classes"):
            if ckpt_classes != getattr(model, "num_classes", ckpt_classes):
                model_kwargs["num_classes"] = ckpt_classes
                model = timm.create_model(name, pretrained=False, **model_kwargs)
        elif num_classes is not None and ckpt_classes is not None and ckpt_classes != num_classes:
            raise SettingError(
                f"{checkpoint}: its classifier has {ckpt_classes} classes but `num_classes` is {num_classes}; "
                f"pass `num_classes` {ckpt_classes} or leave it out"
            )
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:
            first = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln), str(exc)[:200])
            raise ValueError(f"{checkpoint}: does not fit timm model {name!r}: {first}") from None
        if missing or unexpected:
            from ..paths import mismatch_detail

            detail = mismatch_detail(missing, unexpected, "keys")
            raise ValueError(f"{checkpoint}: does not fit timm model {name!r}: {detail}")
    apply_record(model, record)
    model.eval()
    return model


def describe_source(name: str, pretrained: bool, checkpoint: str | os.PathLike | None) -> dict:
    """Where the full-precision weights came from (recorded in files; the default fine-tune teacher)."""
    return {
        "model": name,
        "pretrained": bool(pretrained) and checkpoint is None,
        "checkpoint": str(Path(checkpoint).resolve()) if checkpoint is not None else None,
    }


def fixed_input_size(name: str) -> int | None:
    """The input side an architecture is built for when it takes no other (timm's ``fixed_input_size``:
    ViT, DeiT), None for architectures that take any size (or that timm has no config for).

    Example:
        >>> fixed_input_size("vit_tiny_patch16_224"), fixed_input_size("resnet18")
        (224, None)
    """
    cfg = pretrained_cfg(name)
    if cfg is None or not getattr(cfg, "fixed_input_size", False) or not getattr(cfg, "input_size", None):
        return None
    return int(cfg.input_size[-1])


def pretrained_cfg(name: str):
    """timm's pretrained config for the architecture ``name`` (its default tag), or None where timm has
    none it can tell offline (unknown names, ``hf-hub:`` names, unknown tags)."""
    import timm.models

    if name.startswith("hf-hub:"):
        return None
    try:
        return timm.models.get_pretrained_cfg(name)
    except Exception:  # timm raises RuntimeError for unknown tags, others for malformed names
        return None


def attach_meta(model: nn.Module, config: BinarizeConfig, source: dict) -> None:
    """Record what :func:`equalbits_cli.save_checkpoint` needs to rebuild the model from a file."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture") or source.get("model")
    num_classes = getattr(model, "num_classes", None)
    old = getattr(model, "equalbits_meta", None) or {}
    kwargs = {"num_classes": int(num_classes)} if num_classes is not None else {}
    size = built_input_size(model)
    if size is not None and size != fixed_input_size(arch):
        kwargs["img_size"] = size
    model.equalbits_meta = {
        "model": arch,
        "model_kwargs": kwargs,
        "config": config,
        "source": source,
        "kept": old.get("kept", {}),
        "policy": old.get("policy"),
        "real_inputs": old.get("real_inputs", {}),
        **({"data_config": old["data_config"]} if old.get("data_config") is not None else {}),
    }


def binarize_model(
    name: str,
    config: BinarizeConfig | None = None,
    *,
    pretrained: bool = False,
    checkpoint: str | os.PathLike | None = None,
    num_classes: int | None = None,
    filter_fn: FilterFn | None = None,
    policy: LayerPolicy | None = None,
) -> nn.Module:
    """Load a timm model (hub, ``hf-hub:`` or local file) and binarize it, ready to save.

    Args:
        name: timm model name or ``hf-hub:org/name``.
        config: Quantizer settings (default: equal bits).
        pretrained: Download pretrained weights when no checkpoint is given.
        checkpoint: Local state dict to load.
        num_classes: Classifier size (read from the checkpoint when not given).
        filter_fn: Layer filter ``(module, fqn) -> bool``; overrides ``policy``.
        policy: Layer policy; default :class:`equalbits_cli.LayerPolicy` (see :mod:`equalbits_cli.model.policy`).

    Returns:
        The binarized model in eval mode, with ``equalbits_meta`` attached.

    Example:
        >>> from equalbits_cli import collect_stats
        >>> m = binarize_model("resnet18", BinarizeConfig(ratio=0.5), num_classes=10)
        >>> collect_stats(m).totals()["binarized_layers"]
        19
    """
    config = config or BinarizeConfig()
    model = create_model(name, pretrained=pretrained, checkpoint=checkpoint, num_classes=num_classes)
    binarize_(model, config, filter_fn, policy=policy)
    attach_meta(model, config, describe_source(name, pretrained, checkpoint))
    return model
