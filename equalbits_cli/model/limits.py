"""What the tool is known not to do well yet, measured, so that a user is told before the work starts."""

from __future__ import annotations

from ..config import BinarizeConfig

__all__ = ["known_shortfalls"]

# timm name prefix -> what was measured with 1-bit activations (benchmarks/recipe.py, the digits).
_ONE_BIT_ACTIVATIONS = {
    "mobilenetv3": (
        "1-bit activations on MobileNetV3 are known to fail: mobilenetv3_small_100 at 1W/1A fine-tuned to "
        "12.0% on the 10-class digits (chance; its teacher 92.5%, equalbits 0.3-0.4); expect a model at "
        "chance, or keep `activations` none"
    ),
}


def known_shortfalls(model: str, config: BinarizeConfig) -> list[str]:
    """One line for each measured shortfall of ``config`` on the architecture ``model`` (a timm name).

    Example:
        >>> known_shortfalls("mobilenetv3_large_100", BinarizeConfig(activations="sign"))[0][:38]
        '1-bit activations on MobileNetV3 are k'
        >>> known_shortfalls("resnet18", BinarizeConfig(activations="sign"))
        []
    """
    name = model.removeprefix("timm/").split("/")[-1].lower()
    out = []
    if config.activations == "sign":
        out += [text for prefix, text in _ONE_BIT_ACTIVATIONS.items() if name.startswith(prefix)]
    return out
