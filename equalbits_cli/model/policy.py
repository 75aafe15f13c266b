"""Which layers to binarize: the default layer policy, name patterns, and why each kept layer is kept.

Every Conv2d and Linear is a candidate. The default policy keeps full precision:

- ``stem``: the first convolution (timm's ``pretrained_cfg["first_conv"]``). It sees raw pixels with
  three input channels and holds a tiny share of the weights.
- ``classifier``: the final classifier (``pretrained_cfg["classifier"]``). It decides the logits.
- ``depthwise``: depthwise convolutions (``groups == in_channels > 1``). A 3x3 depthwise filter has
  only 9 weights: at equal bits that is 4 or 5 of each sign, almost no freedom, and the layers hold 2-5%
  of a MobileNet's or EfficientNet's parameters.
- ``gate`` (only with ``gates=False``): the convolutions and linears inside squeeze-excite and other
  gating modules. They are binarized by default: measured on mobilenetv3_small_100 (digits, 5
  epochs), keeping them full precision gave 84.4% against 83.8% binarized, for a packed file of
  2.26 MiB instead of 0.57 MiB; the accuracy is within noise, the size is 4x.
- ``excluded``: anything matched by an ``exclude`` pattern.
- ``custom forward``: a Conv2d/Linear subclass with its own forward (timm's ``Conv2dSame``,
  ``ScaledStdConv2d``), which cannot be swapped for a binary layer without changing what it computes.

``include`` patterns override every rule but ``exclude`` and ``custom forward``: ``--include conv1``
binarizes the stem too. Patterns are shell-style globs on module names (``blocks.*.se.*``).
The benchmark ``benchmarks/recipe.py`` measures what each rule is worth in accuracy and size.

With 1-bit activations a second set of rules, :func:`plan_inputs`, decides which binarized layers
keep real-valued inputs (``benchmarks/activations.py`` measures them).
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from ..errors import SettingError

if TYPE_CHECKING:  # torch is imported where modules are examined, so that reading files needs none
    from torch import nn

__all__ = ["LayerPolicy", "LayerPlan", "plan_layers", "plan_inputs", "KEEP_REASONS", "INPUT_REASONS"]

KEEP_REASONS = ("stem", "classifier", "depthwise", "gate", "excluded", "custom forward")
# Why a binarized layer of a 1W/1A model computes on real-valued inputs (see plan_inputs).
INPUT_REASONS = ("pooled", "no shortcut", "bottleneck", "shortcut", "pattern")

# Class names of timm's gating modules (squeeze-excite and relatives); their Conv2d/Linear children
# compute channel gates. Matched as substrings so that variants (EffectiveSEModule, SqueezeExciteCl)
# are covered without a table per architecture.
_GATE_CLASS_HINTS = ("SqueezeExcite", "SEModule", "SqueezeExcitation", "GatherExcite", "Cbam", "Gate", "EcaModule")


@dataclass(frozen=True)
class LayerPolicy:
    """Which Conv2d/Linear layers ``binarize_`` turns binary.

    Attributes:
        depthwise: Binarize depthwise convolutions too (default: keep them full precision).
        gates: Binarize squeeze-excite and other gating layers (default: yes; ``False`` keeps them).
        include: Globs of module names to binarize whatever the rules say (stem and classifier too).
        exclude: Globs of module names to keep full precision; wins over ``include``.
        all_binary_inputs: With 1-bit activations, every binarized layer binarizes its input (default:
            the layers :func:`plan_inputs` names keep real-valued inputs).
        real_inputs: Globs of binarized layers that keep real-valued inputs with 1-bit activations.

    Example:
        >>> LayerPolicy(exclude=("layer4.*",)).exclude
        ('layer4.*',)
        >>> LayerPolicy(include=("",))
        Traceback (most recent call last):
        ...
        ValueError: include patterns must be non-empty strings, got ''
    """

    depthwise: bool = False
    gates: bool = True
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    all_binary_inputs: bool = False
    real_inputs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for field in ("include", "exclude", "real_inputs"):
            value = getattr(self, field)
            if isinstance(value, str) or not isinstance(value, (list, tuple)):
                raise ValueError(f"{field} must be a list of glob patterns, got {value!r}")
            for p in value:
                if not isinstance(p, str) or not p.strip():
                    raise ValueError(f"{field} patterns must be non-empty strings, got {p!r}")
            object.__setattr__(self, field, tuple(value))
        for field in ("depthwise", "gates", "all_binary_inputs"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"{field} must be true or false, got {getattr(self, field)!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["include"], d["exclude"], d["real_inputs"] = list(self.include), list(self.exclude), list(self.real_inputs)
        return d

    @classmethod
    def from_dict(cls, data: Any) -> LayerPolicy:
        """Build from a dict (file metadata), rejecting unknown keys.

        Raises:
            ValueError: unknown keys or bad values.
        """
        if not isinstance(data, dict):
            raise ValueError("layer policy must be a JSON object")
        unknown = set(data) - {"depthwise", "gates", "include", "exclude", "all_binary_inputs", "real_inputs"}
        if unknown:
            raise ValueError(f"unknown layer policy keys: {', '.join(sorted(unknown))}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


@dataclass(frozen=True)
class LayerPlan:
    """The decision for one Conv2d/Linear: binarize it, or keep it and why."""

    name: str
    binarize: bool
    reason: str | None  # one of KEEP_REASONS when kept


def module_names(entry: object) -> list[str]:
    if isinstance(entry, str):
        return [entry]
    if isinstance(entry, (list, tuple)):
        return [str(e) for e in entry]
    return []


def special_names(model: nn.Module) -> tuple[list[str], list[str]]:
    """``(stem, classifier)`` module names, from timm's ``pretrained_cfg`` where present, else the first
    Conv2d and the last Linear in module order."""
    from torch import nn

    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    modules = dict(model.named_modules())
    stem = [n for n in module_names(cfg.get("first_conv")) if n in modules]
    head = [n for n in module_names(cfg.get("classifier")) if n in modules]
    if not stem and not head:
        convs = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
        linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
        stem, head = convs[:1], linears[-1:]
    return stem, head


def is_depthwise(module: nn.Module) -> bool:
    from torch import nn

    return isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels


def _gate_parents(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if n and any(h in type(m).__name__ for h in _GATE_CLASS_HINTS)]


def _under(fqn: str, prefixes: list[str]) -> bool:
    return any(fqn == p or fqn.startswith(p + ".") for p in prefixes)


def _check_patterns(
    patterns: tuple[str, ...], names: list[str], option: str, what: str = "Conv2d/Linear module"
) -> None:
    for p in patterns:
        if not any(fnmatch.fnmatchcase(n, p) for n in names):
            close = difflib.get_close_matches(p, names, n=3, cutoff=0.4)
            hint = f"; closest module names: {', '.join(close)}" if close else ""
            raise SettingError(f"`{option}` {p!r} matches no {what}{hint}")


def plan_layers(
    model: nn.Module, policy: LayerPolicy | None = None, is_swappable: Callable[[nn.Module], bool] | None = None
) -> list[LayerPlan]:
    """Decide, for every Conv2d/Linear of ``model`` in module order, whether to binarize it.

    Args:
        model: The full-precision model.
        policy: The rules; default ``LayerPolicy()``.
        is_swappable: Whether a module can be replaced by a binary layer (default: always).

    Raises:
        ValueError: an include/exclude pattern matches no Conv2d/Linear module.

    Example:
        >>> import timm
        >>> m = timm.create_model("mobilenetv3_small_100", pretrained=False, num_classes=10)
        >>> plans = {p.name: p.reason for p in plan_layers(m)}
        >>> plans["conv_stem"], plans["blocks.0.0.conv_dw"], plans["blocks.0.0.se.conv_reduce"]
        ('stem', 'depthwise', None)
        >>> {p.name: p.reason for p in plan_layers(m, LayerPolicy(gates=False))}["blocks.0.0.se.conv_reduce"]
        'gate'
        >>> plans["blocks.0.0.conv_pw"] is None
        True
    """
    from torch import nn

    policy = policy or LayerPolicy()
    candidates = [(n, m) for n, m in model.named_modules() if n and isinstance(m, (nn.Conv2d, nn.Linear))]
    names = [n for n, _ in candidates]
    _check_patterns(policy.include, names, "include")
    _check_patterns(policy.exclude, names, "exclude")
    stem, head = special_names(model)
    gates = _gate_parents(model)
    plans = []
    for fqn, module in candidates:
        reason = None
        if is_swappable is not None and not is_swappable(module):
            reason = "custom forward"
        elif any(fnmatch.fnmatchcase(fqn, p) for p in policy.exclude):
            reason = "excluded"
        elif any(fnmatch.fnmatchcase(fqn, p) for p in policy.include):
            reason = None
        elif _under(fqn, stem):
            reason = "stem"
        elif _under(fqn, head):
            reason = "classifier"
        elif not policy.depthwise and is_depthwise(module):
            reason = "depthwise"
        elif not policy.gates and _under(fqn, gates):
            reason = "gate"
        plans.append(LayerPlan(fqn, reason is None, reason))
    return plans


def pooled_layers(model: nn.Module, names: list[str]) -> list[str]:
    """Those of ``names`` (Conv2d/Linear modules) whose input has no spatial or token extent: a vector
    per image, as after global pooling. Found by forwards of zero images at the size of the model's
    ``pretrained_cfg`` (224x224 when it has none), at twice that and at a ViT's own size, where the
    model takes them: a layer is pooled only if its input is 1x1 at every size, so that a small input
    (32x32 leaves ResNet's last stage 1x1 too) does not count."""
    import torch

    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    c, h, w = tuple(cfg.get("input_size") or (3, 224, 224))
    fixed = getattr(getattr(model, "patch_embed", None), "img_size", None)  # a ViT built for another size
    sizes = [(h, w), (2 * h, 2 * w)] + ([tuple(fixed)] if fixed is not None and tuple(fixed) != (h, w) else [])
    modules = dict(model.named_modules())
    seen: dict[str, bool] = {}
    flat: dict[str, list[bool]] = {n: [] for n in names}

    def hook(name):
        def record(module, args):
            x = args[0]
            seen[name] = x.dim() == 2 or (x.dim() == 4 and x.shape[-1] * x.shape[-2] == 1)

        return record

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    was_training = model.training
    param = next(model.parameters(), None)
    probes = 0
    try:
        model.eval()
        for size in sizes:
            seen.clear()
            try:
                with torch.no_grad():
                    model(torch.zeros((1, c, *size), device=None if param is None else param.device))
            except (RuntimeError, ValueError, AssertionError):  # a model fixed to one input size
                continue
            probes += 1
            for n in names:
                flat[n].append(seen.get(n, False))
    finally:
        model.train(was_training)
        for hnd in handles:
            hnd.remove()
    if not probes:
        raise SettingError(
            f"cannot run the model on a {h}x{w} image to find the layers fed by pooled vectors; "
            "set `real_inputs` yourself with `all_binary_inputs`"
        )
    return [n for n in names if flat[n] and all(flat[n])]


def _blocks(model: nn.Module, skip: bool) -> list[tuple[str, nn.Module]]:
    """timm's MobileNet/EfficientNet blocks (they say ``has_skip``) with or without a shortcut."""
    return [(n, m) for n, m in model.named_modules() if n and getattr(m, "has_skip", None) is skip]


def unshortcut_layers(model: nn.Module, names: list[str]) -> list[str]:
    """Those of ``names`` inside a block whose ``has_skip`` is false (timm's MobileNet and EfficientNet
    blocks: the stride-2 and widening ones)."""
    blocks = [n for n, _ in _blocks(model, False)]
    return [n for n in names if _under(n, blocks)]


def bottleneck_layers(model: nn.Module, names: list[str]) -> list[str]:
    """Those of ``names`` that are the first Conv2d/Linear (module order, which is forward order in
    timm's blocks) of a block with a shortcut: the layer that reads the linear bottleneck, as the
    expansion ``conv_pw`` of an inverted residual does."""
    from torch import nn

    wanted, out = set(names), []
    for block_name, block in _blocks(model, True):
        layers = (n for n, m in block.named_modules() if n and isinstance(m, (nn.Conv2d, nn.Linear)))
        first = next(layers, None)
        if first is not None and f"{block_name}.{first}" in wanted:
            out.append(f"{block_name}.{first}")
    return out


def shortcut_layers(model: nn.Module, names: list[str]) -> list[str]:
    """Those of ``names`` inside a module named ``downsample`` or ``shortcut``: the projection on a
    residual block's shortcut (ResNet) or the downsampling between stages (ConvNeXt)."""
    paths = [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in ("downsample", "shortcut")]
    return [n for n in names if _under(n, paths)]


def check_input_rules(policy: LayerPolicy | None, activations: str) -> None:
    """Refuse input rules (``all_binary_inputs``, ``real_inputs``) for a model without 1-bit activations.

    Raises:
        SettingError: naming the settings.
    """
    if activations != "sign" and policy is not None and (policy.all_binary_inputs or policy.real_inputs):
        raise SettingError("`real_inputs` and `all_binary_inputs` need `activations` sign")


def plan_inputs(model: nn.Module, names: list[str], policy: LayerPolicy | None = None) -> dict[str, str]:
    """Which of the layers ``names`` (those to binarize) keep real-valued inputs in a model with 1-bit
    activations, each with its reason (one of :data:`INPUT_REASONS`):

    - ``pooled``: the input is one vector per image (squeeze-excite gates, MobileNetV3's head
      convolution after global pooling). One sign per channel of an averaged feature leaves a gate
      almost nothing to tell images apart by; measured in ``benchmarks/activations.py``.
    - ``no shortcut``: the layers of a block that has no residual shortcut (timm's ``has_skip`` is
      false: the stride-2 and widening blocks of MobileNet and EfficientNet). A sign there cuts the
      whole signal; in a block with a shortcut it cuts a branch beside a real-valued path (Bi-Real's
      argument). Measured on mobilenetv3_small_100 (digits, 5 epochs, ``benchmarks/activations.py``):
      8.6% with every input binary, 38.4% with only the first layer of such blocks real, 78.0% with
      all of them (teacher 92.5%).
    - ``bottleneck``: the first layer of a block with a shortcut in those families (the expansion
      ``conv_pw`` of an inverted residual): it reads the narrow linear bottleneck, the real-valued path
      itself, not a branch. Measured (same setting): with it, mobilenetv3_small_100 87.2% against
      78.0% without, efficientnet_b0 83.8% against 68.2% (teacher 90.5%; 12.0% with every input
      binary).
    - ``shortcut``: a layer on a residual block's shortcut (timm's ``downsample``/``shortcut``
      modules: ResNet's strided 1x1 projections, ConvNeXt's downsampling between stages). All of the
      signal passes it, so the real-valued path Bi-Real and ReActNet keep beside every binary
      convolution runs through it. Measured on resnet18 (digits, 5 epochs): 91.9% with every input
      binary, 95.5% with these three layers real (teacher 97.5%).
    - ``pattern``: matched by ``policy.real_inputs``.

    Every other layer binarizes its input.

    Raises:
        ValueError: a ``real_inputs`` pattern matches none of ``names``.
    """
    policy = policy or LayerPolicy()
    _check_patterns(policy.real_inputs, names, "real_inputs", "binarized layer")
    real = {n: "pattern" for n in names if any(fnmatch.fnmatchcase(n, p) for p in policy.real_inputs)}
    if not policy.all_binary_inputs:
        for n in pooled_layers(model, names):
            real.setdefault(n, "pooled")
        for n in unshortcut_layers(model, names):
            real.setdefault(n, "no shortcut")
        for n in bottleneck_layers(model, names):
            real.setdefault(n, "bottleneck")
        for n in shortcut_layers(model, names):
            real.setdefault(n, "shortcut")
    return {n: real[n] for n in names if n in real}
