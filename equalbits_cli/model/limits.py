"""What the tool is known not to do well yet, measured, so that a user is told before the work starts."""

from __future__ import annotations

from ..config import BinarizeConfig
from .policy import LayerPolicy

__all__ = ["known_shortfalls"]

# timm name prefix -> what was measured with 1-bit activations on every binarized layer's input
# (benchmarks/activations.py, the digits at 32x32, 5 fine-tune epochs, equalbits 0.9).
_ALL_BINARY_INPUTS = {  # prefix -> (family, measured)
    "mobilenetv3": (
        "MobileNetV3",
        "mobilenetv3_small_100 fine-tuned to 8.6% (chance; its teacher 92.5%; 87.2% with the input policy)",
    ),
    "efficientnet": (
        "EfficientNet",
        "efficientnet_b0 fine-tuned to 12.0% (chance; its teacher 90.5%; 83.8% with the input policy)",
    ),
}


def known_shortfalls(model: str, config: BinarizeConfig, policy: LayerPolicy | None = None) -> list[str]:
    """One line for each measured shortfall of ``config`` and ``policy`` on the architecture ``model``
    (a timm name). ViT and DeiT have none since 0.10: at 1W/1A on the digits at 32x32, vit_tiny
    fine-tuned to 93.6% and deit_tiny to 94.2% (teachers 95.0%).

    Example:
        >>> every = LayerPolicy(all_binary_inputs=True)
        >>> known_shortfalls("mobilenetv3_large_100", BinarizeConfig(activations="sign"), every)[0][:46]
        '1-bit inputs on every binarized layer of Mobil'
        >>> known_shortfalls("mobilenetv3_large_100", BinarizeConfig(activations="sign"))
        []
    """
    name = model.removeprefix("timm/").split("/")[-1].lower()
    out = []
    if config.activations != "sign":
        return out
    if policy is not None and policy.all_binary_inputs:
        out += [
            f"1-bit inputs on every binarized layer of {family} are known to fail: {text}; "
            "leave `all_binary_inputs` off"
            for prefix, (family, text) in _ALL_BINARY_INPUTS.items()
            if name.startswith(prefix)
        ]
    return out
